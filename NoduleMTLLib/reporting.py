"""The report outputs of ``nodulemtl analyze`` / ``batch``, in one place for the command line,
the batch runner and the Slicer module.

* :func:`add_arguments`: ``--dicom-sr``, ``--no-pictures``, ``--age``, ``--sex``,
  ``--family-history``, ``--emphysema``.
* :func:`prepare`: before the analysis: ``--dicom-sr`` implies ``--dicom-seg``.
* :func:`annotate`: after the analysis, before ``write_outputs``: Lung-RADS and Brock
  records (:func:`NoduleMTLLib.assessment.annotate_result`), so ``nodules.json`` / ``.csv``
  carry them.
* :func:`write_report_files`: after ``write_outputs`` (and the DICOM SEG):
  ``pictures/nodule_<id>.png``, ``report.html`` and, with ``--dicom-sr``, ``report.sr.dcm``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: What :func:`write_report_files` adds to an output folder besides ``outputs.OUTPUT_FILES``
#: (``report.sr.dcm`` too with ``--dicom-sr``; ``pictures`` holds ``nodule_<id>.png``).
REPORT_FILES = ("pictures", "report.html")


def _age(text: str) -> float:
    from .brock import parse_age

    a = parse_age(text)
    if a is None or a >= 130:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age in years")
    return a


def _sex(text: str) -> str:
    from .brock import parse_sex

    s = parse_sex(text)
    if s is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give F or M")
    return s


def _yes_no(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("yes", "y", "true", "1"):
        return True
    if t in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give yes or no")


def add_arguments(p: argparse.ArgumentParser, batch: bool = False) -> None:
    """Report options of ``analyze`` (``batch=False``) and ``batch``."""
    where = "for cases that are DICOM series folders" if batch else "(input must be a DICOM series folder)"
    p.add_argument("--dicom-sr", action="store_true",
                   help=f"also write report.sr.dcm: DICOM SR (TID 1500) of the nodules referencing segmentation.dcm; "
                        f"implies --dicom-seg {where}")
    p.add_argument("--no-pictures", action="store_true", help="do not write pictures/nodule_<id>.png (report.html has "
                                                              "the table only)")
    p.add_argument("--age", type=_age, help="patient age in years for the Brock risk (default: DICOM header)")
    p.add_argument("--sex", type=_sex, help="patient sex F or M for the Brock risk (default: DICOM header)")
    p.add_argument("--family-history", type=_yes_no, metavar="yes|no",
                   help="lung cancer in a first-degree relative (Brock; unknown: assumed no, risk marked lower bound)")
    p.add_argument("--emphysema", type=_yes_no, metavar="yes|no",
                   help="emphysema on the CT (Brock; unknown: assumed no, risk marked lower bound)")


def prepare(args) -> None:
    """``--dicom-sr`` implies ``--dicom-seg`` (in place on the parsed ``args``)."""
    if getattr(args, "dicom_sr", False):
        args.dicom_seg = True


def patient_options(args=None) -> dict:
    """The Brock patient options of parsed ``args`` (``age``, ``sex``, ``family_history``,
    ``emphysema``; None when not given): the ``patient`` of :func:`NoduleMTLLib.analysis.analyze`,
    which records Lung-RADS / Brock on the result (DICOM header first, these options over it)."""
    return {k: getattr(args, k, None) for k in ("age", "sex", "family_history", "emphysema")}


def write_report_files(result, ct, out_dir, pictures: bool = True, dicom_sr: bool = False) -> list[Path]:
    """Pictures (unless ``pictures`` is False), ``report.html`` and (``dicom_sr``) ``report.sr.dcm`` in ``out_dir``.

    Call after ``write_outputs`` and, for ``dicom_sr``, after the DICOM SEG was written.

    Raises:
        NoduleMTLLib.outputs.OutputError: a file cannot be written or the SR not built.
        NoduleMTLLib.io.InputError: ``dicom_sr`` for a CT not read from DICOM.
    """
    from .outputs import OutputError
    from .pictures import PICTURES_DIR, write_pictures
    from .report_html import write_report_html

    out = Path(out_dir)
    paths = []
    try:
        if pictures:
            paths += write_pictures(result, ct, out)
        paths.append(write_report_html(result, out, out / PICTURES_DIR if pictures else None))
    except OSError as e:
        raise OutputError(f"Cannot write the report to {out}: {e.strerror or e}") from None
    if dicom_sr:
        from .dicom_sr import write_sr_into_output_dir

        p = write_sr_into_output_dir(result, ct, out)
        if p is not None:
            paths.append(p)
    return paths

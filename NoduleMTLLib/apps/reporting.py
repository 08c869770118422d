"""The report outputs of ``nodulemtl analyze`` / ``batch``, in one place for the command line,
the batch runner and the Slicer module.

* :func:`add_arguments`: ``--dicom-sr``, ``--no-pictures``, ``--age``, ``--sex``,
  ``--family-history``, ``--emphysema``.
* :func:`prepare`: before the analysis: ``--dicom-sr`` implies ``--dicom-seg``.
* :func:`patient_options`: the Brock patient options the analysis service takes.

The report files themselves (``pictures/``, ``report.html``, ``report.sr.dcm``) are written by
the one writer, :func:`NoduleMTLLib.outputs.writer.write_result_set`.
"""

from __future__ import annotations

import argparse

from ..core.filenames import PICTURES_DIR, REPORT_FILE

#: What the report adds to an output folder besides ``filenames.OUTPUT_FILES``
#: (``report.sr.dcm`` too with ``--dicom-sr``; ``pictures`` holds ``nodule_<id>.png``).
REPORT_FILES = (PICTURES_DIR, REPORT_FILE)


def _age(text: str) -> float:
    from ..clinical.brock import parse_age

    a = parse_age(text)
    if a is None or a >= 130:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age in years")
    return a


def _sex(text: str) -> str:
    from ..clinical.brock import parse_sex

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
    ``emphysema``; None when not given): the ``patient`` of :func:`NoduleMTLLib.service.analysis.analyze`,
    which records Lung-RADS / Brock on the result (DICOM header first, these options over it)."""
    return {k: getattr(args, k, None) for k in ("age", "sex", "family_history", "emphysema")}

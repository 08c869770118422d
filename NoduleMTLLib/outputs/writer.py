"""The one writer of an analysis' result set: :func:`write_result_set`.

``nodulemtl analyze``, ``nodulemtl reclassify``, ``nodulemtl batch`` and the Slicer module's
*Export report* all write through it.  It stages once (:class:`NoduleMTLLib.core.safe_output.OutputSet`:
a temporary folder beside the output folder, moved into place only when every file is
written, an earlier set replaced only on success), then writes, in this order (names from
:mod:`NoduleMTLLib.core.filenames`):

1. ``labels.nrrd`` (uint16 label map on the CT grid), ``segmentation.seg.nrrd`` (one segment
   per nodule, tags and colours from the reported fields), ``nodules.json`` (the result
   record, ``schema_version`` :data:`NoduleMTLLib.core.results.SCHEMA_VERSION`), ``nodules.csv``;
2. with ``dicom_seg``: ``segmentation.dcm`` (DICOM SEG, :mod:`NoduleMTLLib.outputs.dicom_seg`);
3. with ``dicom_sr``: ``report.sr.dcm`` (TID 1500, :mod:`NoduleMTLLib.outputs.dicom_sr`; needs the SEG);
4. with ``report``: ``pictures/nodule_<id>.png`` (unless ``pictures`` is False) and ``report.html``.

The file writers write straight into the staged folder (no temporary file of their own), so
every file gets the mode the umask gives (0644 under umask 022).
"""

from __future__ import annotations

import csv
import io as _io
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.filenames import CSV_FILE, JSON_FILE, LABELS_FILE, PICTURES_DIR, SEG_NRRD_FILE


@dataclass(frozen=True)
class WriteOptions:
    """What :func:`write_result_set` writes and the output-folder rules it applies.

    Attributes:
        overwrite: replace NoduleMTL's files of an earlier run in the folder (else refused).
        inputs: input paths the output folder must not be or contain.
        lock: take the folder's lock (False when the caller holds a lock over it: batch).
        dicom_seg: write ``segmentation.dcm`` (the CT must come from a DICOM series).
        dicom_sr: write ``report.sr.dcm`` too (implies ``dicom_seg``).
        report: write ``report.html`` (and the pictures).
        pictures: write ``pictures/nodule_<id>.png`` (with ``report``).
        dicom_folder: the folder of the CT's DICOM series (default ``ct.source``).
        json_record: the ``nodules.json`` record to write instead of ``result.to_dict()`` (the
            web reviewer's export: every finding with its review status, the other files the
            accepted ones).
        labels_result: the result whose label map ``labels.nrrd`` holds (default ``result``).
    """

    overwrite: bool = False
    inputs: tuple = ()
    lock: bool = True
    dicom_seg: bool = False
    dicom_sr: bool = False
    report: bool = True
    pictures: bool = True
    dicom_folder: str | os.PathLike | None = None
    json_record: dict | None = None
    labels_result: object = None


def options_from_args(args, **over) -> WriteOptions:
    """:class:`WriteOptions` of parsed ``nodulemtl analyze`` / ``reclassify`` / ``batch`` arguments
    (``--overwrite``, ``--dicom-seg``, ``--dicom-sr``, ``--no-pictures``), ``over`` on top."""
    sr = bool(getattr(args, "dicom_sr", False))
    opts = {"overwrite": bool(getattr(args, "overwrite", False)), "dicom_seg": bool(getattr(args, "dicom_seg", False)) or sr,
            "dicom_sr": sr, "pictures": not getattr(args, "no_pictures", False)}
    opts.update(over)
    return WriteOptions(**opts)


def write_core_files(result, ct, folder: Path, json_record: dict | None = None, labels_result=None) -> list[Path]:
    """``labels.nrrd``, ``segmentation.seg.nrrd``, ``nodules.json``, ``nodules.csv`` into ``folder``
    (``json_record`` / ``labels_result``: see :class:`WriteOptions`)."""
    import SimpleITK as sitk
    import slicerio

    from .files import csv_rows, segmentation_dict

    lab = sitk.GetImageFromArray((labels_result or result).label_array(ct.shape_zyx))
    lab.CopyInformation(ct.image)
    sitk.WriteImage(lab, str(folder / LABELS_FILE), True)
    del lab
    slicerio.write_segmentation(str(folder / SEG_NRRD_FILE), segmentation_dict(result, ct), compression_level=1)
    from ..core.strict_json import dumps  # no NaN / Infinity: OutputError naming the field

    record = json_record if json_record is not None else result.to_dict()
    (folder / JSON_FILE).write_text(dumps(record, JSON_FILE, indent=2, default=str) + "\n")
    head, rows = csv_rows(result)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=head)
    w.writeheader()
    w.writerows(rows)
    (folder / CSV_FILE).write_text(buf.getvalue())
    return [folder / n for n in (LABELS_FILE, SEG_NRRD_FILE, JSON_FILE, CSV_FILE)]


def write_files(result, ct, folder, options: WriteOptions = WriteOptions(), warn=None, shown=None) -> list[Path]:
    """Every file of the set into ``folder`` (an existing, normally staged, folder), as they are.

    ``warn``: ``callback(message)`` for what is skipped (no nodule found: no DICOM SEG / SR);
    ``shown``: the folder named in error messages (the output folder, never the hidden staging one).

    Raises:
        NoduleMTLLib.core.io.InputError: ``dicom_seg`` for a CT not read from a DICOM series.
        NoduleMTLLib.core.safe_output.OutputError: a file cannot be written or the SEG / SR not built.
    """
    from ..core.safe_output import OutputError

    folder = Path(folder)
    if options.dicom_seg or options.dicom_sr:
        from ..core.io import InputError

        if ct.dicom_series_uid is None:
            raise InputError(f"{'--dicom-sr' if options.dicom_sr else '--dicom-seg'} needs a CT read from a DICOM "
                             f"series folder; {ct.source or 'this CT'} is not one")
    try:
        paths = write_core_files(result, ct, folder, options.json_record, options.labels_result)
    except OSError as e:
        raise OutputError(f"Cannot write outputs to {shown or folder}: {e.strerror or e}") from None
    if options.dicom_seg or options.dicom_sr:
        from .dicom_seg import write_seg_into_output_dir

        seg = write_seg_into_output_dir(result, ct, folder, options.dicom_folder)
        if seg is None:
            (warn or (lambda m: None))("no nodule found: no DICOM SEG written")
        else:
            paths.append(seg)
        if options.dicom_sr and seg is not None:
            from .dicom_sr import write_sr_into_output_dir

            sr = write_sr_into_output_dir(result, ct, folder, options.dicom_folder)
            if sr is not None:
                paths.append(sr)
    if options.report:
        from .pictures import write_pictures
        from .report_html import write_report_html

        try:
            if options.pictures:
                paths += write_pictures(result, ct, folder)
            paths.append(write_report_html(result, folder, folder / PICTURES_DIR if options.pictures else None))
        except OSError as e:
            raise OutputError(f"Cannot write the report to {shown or folder}: {e.strerror or e}") from None
    return paths


def write_result_set(result, ct, out, options: WriteOptions = WriteOptions(), warn=None) -> list[Path]:
    """Write the whole result set of ``result`` (see the module docstring), all or nothing.

    Args:
        result: :class:`NoduleMTLLib.core.results.AnalysisResult` of ``ct`` (calibrated and assessed
            by the analysis service).
        ct: :class:`NoduleMTLLib.core.io.CTVolume`.
        out: the output folder, or an :class:`NoduleMTLLib.core.safe_output.OutputSet` already entered
            by the caller (who checked and locked the folder before computing); it is committed.
        options: :class:`WriteOptions`.
        warn: ``callback(message)`` for what is skipped.

    Returns:
        The paths of the written files and folders in the output folder (after the commit).

    Raises:
        NoduleMTLLib.core.safe_output.OutputError / OutputLocked: the folder rules refuse it, or a
            file cannot be written (nothing changed in the folder then).
        NoduleMTLLib.core.io.InputError: ``dicom_seg`` / ``dicom_sr`` for a CT not read from DICOM.
    """
    from ..core.safe_output import OutputSet

    if isinstance(out, OutputSet):
        return _write_staged(result, ct, out, options, warn)
    with OutputSet(out, inputs=options.inputs, overwrite=options.overwrite, lock=options.lock) as outset:
        return _write_staged(result, ct, outset, options, warn)


def _write_staged(result, ct, outset, options, warn) -> list[Path]:
    stage = outset.staging_dir()
    written = write_files(result, ct, stage, options, warn, shown=outset.out)
    outset.commit()
    return [outset.out / p.relative_to(stage) for p in written]


def write_outputs(result, ct, out_dir: str | os.PathLike) -> list[Path]:
    """Write the four outputs all-or-nothing with :func:`write_result_set`
    (no report), replacing NoduleMTL's files of an earlier run in ``out_dir`` (library use; the
    command line refuses that without ``--overwrite``).  Returns their paths.

    Raises OutputError if the folder cannot be written (or another run holds its lock).
    """
    return write_result_set(result, ct, out_dir, WriteOptions(overwrite=True, report=False))

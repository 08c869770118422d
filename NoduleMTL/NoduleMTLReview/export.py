"""Write a review's outputs: only accepted findings in SEG, SR, report and CSV; all in nodules.json.

Pure Python on :mod:`NoduleMTLLib` (no ``slicer``): the app builds the
:class:`~NoduleMTLLib.results.AnalysisResult` of the findings as they are now (masks possibly
edited, ``NoduleMTLMRML.result_from_segmentation``) and calls :func:`write_review_outputs`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from NoduleMTLLib.safe_output import OutputError, OutputSet

from .state import export_selection


def write_review_outputs(result, statuses: dict[int, str], ct, out_dir: str | os.PathLike, overwrite: bool = False,
                         pictures: bool = True) -> list[Path]:
    """Write the reviewed findings into ``out_dir``, all or nothing.

    Files (the rules of :mod:`NoduleMTLLib.safe_output`: refused when ``out_dir`` already holds
    NoduleMTL outputs unless ``overwrite``; staged beside the folder and moved in only when
    every file was written; one writer at a time):

    * ``segmentation.seg.nrrd``, ``nodules.csv``: accepted findings only;
    * ``nodules.json``: every finding, each with ``review_status`` (accepted / rejected /
      undecided), and the counts under ``review``;
    * ``labels.nrrd``: every finding (voxel value = finding id; the statuses are in
      nodules.json), so that ``nodulemtl review --results`` reopens the whole review;
    * ``report.html`` (+ ``pictures/``): accepted findings only, Lung-RADS / Brock recomputed
      on the current masks (:func:`NoduleMTLLib.assessment.annotate_result`);
    * ``segmentation.dcm`` (DICOM SEG) and ``report.sr.dcm`` (DICOM SR TID 1500): accepted
      findings only, when ``ct`` was read from a DICOM series (``ct.source`` its folder) and at
      least one finding is accepted.

    Args:
        result: every finding (nodule ids = finding ids; masks on ``ct``'s grid).
        statuses: finding id -> status (:data:`NoduleMTLReview.state.STATUSES`).
        ct: the :class:`NoduleMTLLib.io.CTVolume` the masks belong to.
        out_dir: output folder.
        overwrite: replace NoduleMTL files already in ``out_dir``.
        pictures: write ``pictures/`` and embed them in the report.

    Returns:
        the written paths.

    Raises:
        OutputError: the folder holds outputs (without ``overwrite``), is locked, or a file
            cannot be written (nothing is changed then).
        ValueError: an unknown status.
    """
    import SimpleITK as sitk

    from NoduleMTLLib.assessment import annotate_result, patient_for
    from NoduleMTLLib.outputs import write_output_files
    from NoduleMTLLib.reporting import write_report_files

    if any(n.found for n in result.nodules):
        annotate_result(result, ct, patient_for(ct))  # Lung-RADS / Brock of every finding (also the rejected ones)
    accepted, everything = export_selection(result, statuses)
    dicom = ct.dicom_series_uid is not None and bool(accepted.nodules)
    inputs = [ct.source] if ct.source else []
    with OutputSet(out_dir, inputs=inputs, overwrite=overwrite) as s:
        stage = s.staging_dir()
        try:
            write_output_files(accepted, ct, stage)
            (stage / "nodules.json").write_text(json.dumps(everything, indent=2, default=str, allow_nan=False) + "\n")
            labels = sitk.GetImageFromArray(result.label_array(ct.shape_zyx))  # every finding: the review reopens
            labels.CopyInformation(ct.image)
            sitk.WriteImage(labels, str(stage / "labels.nrrd"), True)
        except OSError as e:
            raise OutputError(f"Cannot write outputs to {out_dir}: {e.strerror or e}") from None
        if dicom:
            from NoduleMTLLib.dicom_seg import write_seg_into_output_dir
            write_seg_into_output_dir(accepted, ct, stage)
        write_report_files(accepted, ct, stage, pictures=pictures, dicom_sr=dicom)
        return s.commit()

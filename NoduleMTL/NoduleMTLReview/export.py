"""Write a review's outputs: only accepted findings in SEG, SR, report and CSV; all in nodules.json.

Pure Python on :mod:`NoduleMTLLib` (no ``slicer``): the app builds the
:class:`~NoduleMTLLib.core.results.AnalysisResult` of the findings as they are now (masks possibly
edited, ``NoduleMTLMRML.result_from_segmentation``) and calls :func:`write_review_outputs`.
"""

from __future__ import annotations

import os
from pathlib import Path

from NoduleMTLLib.core.safe_output import OutputSet

from .state import export_selection


def write_review_outputs(result, statuses: dict[int, str], ct, out_dir: str | os.PathLike, overwrite: bool = False,
                         pictures: bool = True) -> list[Path]:
    """Write the reviewed findings into ``out_dir``, all or nothing.

    Files (the rules of :mod:`NoduleMTLLib.core.safe_output`: refused when ``out_dir`` already holds
    NoduleMTL outputs unless ``overwrite``; staged beside the folder and moved in only when
    every file was written; one writer at a time):

    * ``segmentation.seg.nrrd``, ``nodules.csv``: accepted findings only;
    * ``nodules.json``: every finding, each with ``review_status`` (accepted / rejected /
      undecided), and the counts under ``review``;
    * ``labels.nrrd``: every finding (voxel value = finding id; the statuses are in
      nodules.json), so that ``nodulemtl review --results`` reopens the whole review;
    * ``report.html`` (+ ``pictures/``): accepted findings only, Lung-RADS / Brock recomputed
      on the current masks (:func:`NoduleMTLLib.service.assessment.annotate_result`);
    * ``segmentation.dcm`` (DICOM SEG) and ``report.sr.dcm`` (DICOM SR TID 1500): accepted
      findings only, when ``ct`` was read from a DICOM series (``ct.source`` its folder) and at
      least one finding is accepted.

    Args:
        result: every finding (nodule ids = finding ids; masks on ``ct``'s grid).
        statuses: finding id -> status (:data:`NoduleMTLReview.state.STATUSES`).
        ct: the :class:`NoduleMTLLib.core.io.CTVolume` the masks belong to.
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
    from NoduleMTLLib.outputs.writer import WriteOptions, write_result_set
    from NoduleMTLLib.service.analysis import complete_result

    if any(n.found for n in result.nodules):
        # the service's part on the current masks: reported probability, Lung-RADS / Brock of every finding
        complete_result(result, ct)
    accepted, everything = export_selection(result, statuses)
    dicom = ct.dicom_series_uid is not None and bool(accepted.nodules)
    inputs = [ct.source] if ct.source else []
    with OutputSet(out_dir, inputs=inputs, overwrite=overwrite) as s:
        # the one writer: accepted findings, nodules.json of every finding, labels.nrrd of every finding
        # (the review reopens from them)
        return write_result_set(accepted, ct, s, WriteOptions(
            dicom_seg=dicom, dicom_sr=dicom, pictures=pictures, json_record=everything, labels_result=result))

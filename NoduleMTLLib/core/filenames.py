"""The names of everything NoduleMTL writes into an output folder: the one place they are defined.

Every writer (:mod:`NoduleMTLLib.outputs.writer` and the file writers it calls), the output-folder
rules (:mod:`NoduleMTLLib.core.safe_output`) and the readers (:func:`NoduleMTLLib.outputs.files.read_outputs`,
the Slicer module, batch) take the names from here.
"""

from __future__ import annotations

#: uint16 label map on the CT grid (voxel value = nodule id).
LABELS_FILE = "labels.nrrd"
#: Slicer segmentation (one segment per nodule, tags and colours from the field list).
SEG_NRRD_FILE = "segmentation.seg.nrrd"
#: The result record (validated against ``Resources/Schema/nodules.schema.json``).
JSON_FILE = "nodules.json"
#: One row per nodule.
CSV_FILE = "nodules.csv"
#: DICOM SEG (``--dicom-seg``; DICOM input only).
DICOM_SEG_FILE = "segmentation.dcm"
#: DICOM SR TID 1500 (``--dicom-sr``; DICOM input only).
DICOM_SR_FILE = "report.sr.dcm"
#: Self-contained HTML report.
REPORT_FILE = "report.html"
#: Folder of the key images ``nodule_<id>.png``.
PICTURES_DIR = "pictures"

#: The four outputs every analysis writes.
OUTPUT_FILES = (LABELS_FILE, SEG_NRRD_FILE, JSON_FILE, CSV_FILE)
#: Every file or folder NoduleMTL writes into an output folder (the four outputs, the optional
#: DICOM SEG and SR, the report page and its pictures).
MANAGED_FILES = OUTPUT_FILES + (DICOM_SEG_FILE, DICOM_SR_FILE, REPORT_FILE, PICTURES_DIR)


def picture_file(nodule_id: int) -> str:
    """File name of a nodule's picture inside :data:`PICTURES_DIR`: ``nodule_<id>.png``."""
    return f"nodule_{int(nodule_id)}.png"

"""DICOM Segmentation (SEG) export of the nodule masks, with highdicom.

Only for CTs read from a DICOM series: the SEG references the source series (its study,
frame of reference and every source image), so a PACS or viewer (3D Slicer's
QuantitativeReporting / DCMQI, OHIF) shows it on the CT.  One binary segment per found
nodule; overlapping nodules stay separate segments (BINARY SEG frames are per segment).

Frame alignment: SimpleITK/GDCM's ``ImageSeriesReader`` orders the series' files
(``GetGDCMSeriesFileNames``) and array slice ``k`` of the CT is file ``k`` of that order;
the masks are on that grid, so slice ``k`` of a mask becomes a frame referencing file
``k``'s SOPInstanceUID with its ImagePositionPatient.  Empty frames are omitted
(highdicom's default).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.filenames import DICOM_SEG_FILE
from ..core.io import CTVolume, InputError
from ..core.results import NODULE_TERMINOLOGY, AnalysisResult
from .fields import reported_color

#: Series number and description of the written SEG series.
SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "NoduleMTL nodules"


from ..core.errors import DicomSegError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def _codes_from_terminology(entry: str = NODULE_TERMINOLOGY):
    """(category, type, anatomic region) ``highdicom.sr.CodedConcept`` from a Slicer
    terminology entry string (``context~cat~type~modifier~anatomic context~region~modifier``)."""
    from highdicom.sr import CodedConcept

    parts = entry.split("~")

    def code(s):
        scheme, value, meaning = s.split("^")
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)

    return code(parts[1]), code(parts[2]), code(parts[5])


def source_files(ct: CTVolume, dicom_folder) -> list[str]:
    """The files of the CT's series in the order GDCM sorted them when the CT was read.

    Raises:
        InputError: the CT did not come from DICOM, or the folder does not hold its series
            with one file per CT slice.
    """
    import SimpleITK as sitk

    if ct.dicom_series_uid is None:
        raise InputError(
            f"DICOM SEG export needs a CT read from a DICOM series; {ct.source or 'this CT'} was not "
            "(NRRD/NIfTI/MetaImage input): use labels.nrrd or segmentation.seg.nrrd instead")
    folder = Path(dicom_folder)
    if not folder.is_dir():
        raise InputError(f"DICOM folder {folder} not found")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ct.dicom_series_uid))
    if not files:
        raise InputError(f"Folder {folder} does not hold the CT's series {ct.dicom_series_uid}")
    if len(files) != ct.shape_zyx[0]:
        raise InputError(f"Series {ct.dicom_series_uid} in {folder} has {len(files)} files, the CT has "
                         f"{ct.shape_zyx[0]} slices: not single-frame slices of this CT")
    return files


def write_dicom_seg(result: AnalysisResult, ct: CTVolume, dicom_folder, out_path, algorithm_type: str = "AUTOMATIC") -> Path:
    """Write the found nodules of ``result`` as a DICOM SEG referencing the CT's source series.

    One BINARY segment per found nodule, in nodule order (segment number 1..N; label
    ``"Nodule <id>"``; tracking id ``"Nodule <id>"`` with a new tracking UID), coded with the
    terminology of :data:`NoduleMTLLib.core.results.NODULE_TERMINOLOGY`: category
    *Morphologically Altered Structure* (SCT 49755003), type *Nodule* (SCT 27925004),
    anatomic region *Lung* (SCT 39607008); algorithm identification name ``NoduleMTL``,
    family *Artificial Intelligence* (DCM 123110), version, parameter ``networks`` (the
    run's network ids); recommended display colour from the malignancy probability ramp
    (:mod:`NoduleMTLLib.outputs.colors`).  Equipment: manufacturer / model ``NoduleMTL``.

    Args:
        result: the analysis of ``ct`` (masks bool (z, y, x) on the CT grid).
        ct: the CT, read from a DICOM series folder (``dicom_series_uid`` set).
        dicom_folder: folder holding that series (usually ``ct.source``).
        out_path: file to write (``.dcm``), normally inside the staged output folder of
            :func:`NoduleMTLLib.outputs.writer.write_result_set` (which makes the set all-or-nothing);
            its mode follows the umask.
        algorithm_type: "AUTOMATIC" (click path) or "SEMIAUTOMATIC" (user-edited masks).

    Returns:
        ``out_path`` as a Path.

    Raises:
        InputError: CT not from DICOM, series not found / not matching the CT, no nodule
            found, a mask of another shape.
        DicomSegError: highdicom refused the source images.
        OSError: the file cannot be written.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = source_files(ct, dicom_folder)
    found = [(n, n.mask_box) for n in result.nodules if n.found]
    found = [(n, b) for n, b in found if b is not None]  # MaskBox: no CT-sized array per nodule
    if not found:
        raise InputError("No nodule was found: there is nothing to write as DICOM SEG")
    for n, b in found:
        if tuple(b.shape_zyx) != tuple(ct.shape_zyx):
            raise InputError(f"Mask of nodule {n.id} has shape {tuple(b.shape_zyx)}, the CT {tuple(ct.shape_zyx)}")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if (rows, cols) != tuple(ct.shape_zyx[1:]):
        raise InputError(f"DICOM images are {rows} x {cols}, the CT slices {ct.shape_zyx[1]} x {ct.shape_zyx[2]}")
    # the CT's slice k must be file k: compare the world positions
    for k in (0, len(files) - 1):
        ipp = [float(v) for v in sources[k].ImagePositionPatient]
        if not np.allclose(ipp, ct.image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-2):
            raise InputError(f"Slice {k} of the CT is not at the position of {Path(files[k]).name}: "
                             "the CT was not read from this series in GDCM order")

    category, prop_type, region = _codes_from_terminology()
    nets = [str(v) for v in (result.run or {}).get("networks", [])]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="NoduleMTL", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"networks": ",".join(nets) or "unknown"})
    descriptions = []
    for number, (n, _box) in enumerate(found, start=1):
        rgb = reported_color(n)  # the reported (calibrated) probability, as every output
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=n.name, segmented_property_category=category,
            segmented_property_type=prop_type, algorithm_type=algorithm_type, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=n.name, anatomic_regions=[region],
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in rgb))))
    pixels = segment_pixels([b for _, b in found], tuple(ct.shape_zyx))
    try:
        with warnings.catch_warnings():  # the source's PatientName is copied as it is (often one component)
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="NoduleMTL",
                manufacturer_model_name="NoduleMTL", software_versions=f"NoduleMTL {__version__}", device_serial_number="0",
                content_description="Pulmonary nodules (research use only)", content_label="NODULES",
                series_description=SEG_SERIES_DESCRIPTION)
    except (ValueError, TypeError, AttributeError) as e:
        raise DicomSegError(f"Cannot build a DICOM SEG on series {ct.dicom_series_uid}: {e}") from None
    out = Path(out_path)
    seg.save_as(out)  # into the staged folder of NoduleMTLLib.outputs.writer: it is all-or-nothing, not this file
    return out


def segment_pixels(boxes, shape_zyx) -> np.ndarray:
    """highdicom's ``pixel_array`` of the segments, built once from their boxes.

    Disjoint masks (the usual case): one label array (frames = slices, rows, cols) uint8 (uint16
    beyond 255 segments) whose value is the segment number - one CT-sized byte array whatever
    the number of nodules (20 nodules on 300 x 512 x 512: 79 MB instead of 20 bool stacks).
    Overlapping masks: the one-hot stack (slices, rows, cols, segments) bool that BINARY
    segments need to stay separate.

    Args:
        boxes: one :class:`~NoduleMTLLib.core.consensus.MaskBox` per segment, in segment order.
        shape_zyx: the CT grid.
    """
    dtype = np.uint8 if len(boxes) < 256 else np.uint16
    labels = np.zeros(shape_zyx, dtype)
    for number, b in enumerate(boxes, start=1):
        region = labels[b.slices]
        if region[b.array].any():  # overlap: a label array cannot hold both
            del labels
            stack = np.zeros((*shape_zyx, len(boxes)), bool)
            for k, bb in enumerate(boxes):
                stack[(*bb.slices, k)] = bb.array
            return stack
        region[b.array] = number
    return labels


#: File name of the DICOM SEG in an output folder (``nodulemtl analyze/batch --dicom-seg``).
SEG_FILE = DICOM_SEG_FILE


def write_seg_into_output_dir(result: AnalysisResult, ct: CTVolume, out_dir, dicom_folder=None) -> Path | None:
    """``--dicom-seg`` of the command line: write ``out_dir/segmentation.dcm`` beside the other outputs.

    The SEG references ``dicom_folder`` (default ``ct.source``: the DICOM series folder the CT was read from).  When no
    nodule was found there is nothing to encode: no SEG is written, a SEG left by an earlier
    run in that folder is removed (it would describe other masks), and None is returned.

    Raises:
        InputError: the CT was not read from a DICOM series, or the series does not match it.
        NoduleMTLLib.outputs.files.OutputError: the SEG cannot be built or written.
    """
    from ..core.errors import OutputError

    path = Path(out_dir) / SEG_FILE
    if not any(n.found and n.mask_box is not None for n in result.nodules):
        if path.is_file():
            path.unlink()
        return None
    try:
        return write_dicom_seg(result, ct, dicom_folder or ct.source, path)
    except DicomSegError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror or e}") from None

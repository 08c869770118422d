"""DICOM Structured Report of the nodules: Comprehensive 3D SR, TID 1500 (Measurement Report), with highdicom.

Modelled on the standard representation of the LIDC-IDRI annotations on TCIA (Fedorov A.
et al., "DICOM re-encoding of volumetrically annotated Lung Imaging Database Consortium
(LIDC) nodules", Med Phys 2020, doi:10.1002/mp.14445; DICOM SEG + TID 1500 SR per reader;
their highdicom converter ``lidc2dicom_highdicom.py`` in github.com/QIICR/lidc2dicom uses the
same concepts: finding *Nodule*, site *Lung*, *Volume* / *Diameter*, tracking identifier and
UID shared with the segment, a hand-built ``ReferencedSegment``, evidence = CT + SEG,
procedure *CT unspecified body region*): one *Imaging Measurements* group per nodule
(TID 1411, Volumetric ROI Measurements and Qualitative Evaluations), whose ROI is the
nodule's segment in the DICOM SEG written beside it (``segmentation.dcm``,
:mod:`NoduleMTLLib.outputs.dicom_seg`; same tracking identifier and tracking UID as the segment),
with the source series.  Per nodule:

* finding type *Nodule* (SCT 27925004), finding site *Lung* (SCT 39607008);
* measurements (TID 1419, UCUM units): *Long axis* (SCT 103339001, mm) and *Short axis*
  (SCT 103340004, mm) - the longest axial diameter and its perpendicular; *Volume* (SCT
  118565006, mm3); *Attenuation Coefficient* (DCM 112031) with derivation *Mean* (SCT
  373098007), [hnsf'U]; *Diameter* (SCT 81827009) with derivation *Mean* (the Lung-RADS
  size, mm); *Probability of cancer* (DCM 111047, unit 1) of each network, with that
  network as algorithm identification, and the Brock risk (method code
  ``99NODULEMTL BROCK``) when it could be computed;
* qualitative evaluations with codes of our private coding scheme ``99NODULEMTL``
  (declared in the Coding Scheme Identification Sequence; DICOM has no standard codes for
  them): *Nodule composition (HU estimate)* = solid / part-solid / non-solid, and
  *Lung-RADS v2022 assessment category* = 1 ... 4B.
* algorithm identification *NoduleMTL* (version, networks) on the group; observer: the
  device NoduleMTL.

Only for CTs read from a DICOM series, like the SEG.  Validated by reading it back with
highdicom (``highdicom.sr.srread``, ``MeasurementReport`` content) and ``dciodvfy``
(``Testing/Python/test_dicom_sr.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.filenames import DICOM_SR_FILE
from ..core.io import CTVolume, InputError
from ..core.results import AnalysisResult

#: File name of the SR in an output folder (``nodulemtl analyze/batch --dicom-sr``).
SR_FILE = DICOM_SR_FILE
SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "NoduleMTL nodule report"

#: Private coding scheme of the concepts DICOM has no code for.
PRIVATE_SCHEME = "99NODULEMTL"


from ..core.errors import DicomSrError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def _code(value, meaning, scheme=PRIVATE_SCHEME):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def lung_rads_code(category: str):
    """Private code of a Lung-RADS category (``LR4B`` / "Lung-RADS 4B")."""
    return _code(f"LR{category}", f"Lung-RADS {category}")


TYPE_CODES = {"solid": ("SOLID", "Solid nodule"), "part-solid": ("PARTSOLID", "Part-solid nodule"),
              "ground-glass": ("NONSOLID", "Non-solid (ground-glass) nodule")}


def _device_uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["NoduleMTL device observer"])


def _referenced_segment(hd, seg_ds, number: int, mask, sources):
    """TID 1411 ROI: segment ``number`` of the SEG and the source images (CT slices) it covers.

    Built by hand: ``ReferencedSegment.from_segmentation`` of highdicom 0.28 expects the
    segment identification per frame, which a single-segment SEG keeps in the shared
    functional groups.
    """
    ks = mask.offset_zyx[0] + np.flatnonzero(mask.array.any(axis=(1, 2)))  # slices the MaskBox covers
    images = [hd.sr.SourceImageForSegmentation(referenced_sop_class_uid=sources[k].SOPClassUID,
                                               referenced_sop_instance_uid=sources[k].SOPInstanceUID) for k in ks]
    return hd.sr.ReferencedSegment(sop_class_uid=seg_ds.SOPClassUID, sop_instance_uid=seg_ds.SOPInstanceUID,
                                   segment_number=number, source_images=images)


def write_dicom_sr(result: AnalysisResult, ct: CTVolume, seg_path, out_path, dicom_folder=None) -> Path:
    """Write the TID 1500 Comprehensive 3D SR of ``result``'s found nodules to ``out_path``.

    Args:
        result: analysis of ``ct``; found nodules carry their measurements, networks'
            probabilities and (optionally) ``lung_rads`` / ``brock`` records.
        ct: the CT, read from a DICOM series (``dicom_series_uid`` set).
        seg_path: the DICOM SEG of the same result (:func:`NoduleMTLLib.outputs.dicom_seg.write_dicom_seg`);
            its segments are matched to the nodules by label (``"Nodule <id>"``).
        out_path: file to write (inside the staged folder of :func:`NoduleMTLLib.outputs.writer.write_result_set`).
        dicom_folder: folder of the source series (default ``ct.source``).

    Returns:
        ``out_path`` as a Path.

    Raises:
        InputError: CT not from DICOM, no found nodule, a found nodule without a segment in the SEG.
        DicomSrError: highdicom refused the content.
        OSError: the file cannot be written.
    """
    import highdicom as hd
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from .dicom_seg import source_files

    files = source_files(ct, dicom_folder or ct.source)  # raises InputError for non-DICOM input
    found = [n for n in result.nodules if n.found and n.mask_box is not None]
    if not found:
        raise InputError("No nodule was found: there is nothing to write as DICOM SR")
    seg_ds = pydicom.dcmread(str(seg_path))
    segments = {str(s.SegmentLabel): s for s in seg_ds.SegmentSequence}
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    nets = [str(v) for v in (result.run or {}).get("networks", [])]
    run_model = (result.run or {}).get("malignancy_probability")
    run_model = run_model if isinstance(run_model, dict) else None
    algorithm = hd.sr.AlgorithmIdentification(name="NoduleMTL", version=__version__,
                                             parameters=[f"networks={','.join(nets) or 'unknown'}"])
    groups = []
    for n in found:
        s = segments.get(n.name)
        if s is None:
            raise InputError(f"{n.name} has no segment in {seg_path}")
        number = int(s.SegmentNumber)
        tracking = hd.sr.TrackingIdentifier(uid=str(s.TrackingUID), identifier=str(s.TrackingID))
        ms = [hd.sr.Measurement(name=codes.SCT.LongAxis, value=float(n.diameter_mm), unit=codes.UCUM.Millimeter),
              hd.sr.Measurement(name=codes.SCT.ShortAxis, value=float(n.short_axis_mm), unit=codes.UCUM.Millimeter),
              hd.sr.Measurement(name=codes.SCT.Volume, value=float(n.volume_mm3), unit=codes.UCUM.CubicMillimeter),
              hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=float(n.mean_hu),
                                unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Mean)]
        lr = getattr(n, "lung_rads", None)
        if lr:
            ms.append(hd.sr.Measurement(name=codes.SCT.Diameter, value=float(lr["size_mm"]), unit=codes.UCUM.Millimeter,
                                        derivation=codes.SCT.Mean,
                                        method=_code("LRSIZE", "Lung-RADS v2022 mean diameter")))
        if getattr(n, "malignancy_probability", None) is not None:  # the reported, calibrated probability
            model = (run_model or {}).get("model", "calibrated")
            ms.append(hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer, value=float(n.malignancy_probability), unit=codes.UCUM.NoUnits,
                algorithm_id=hd.sr.AlgorithmIdentification(name=f"NoduleMTL {model} (calibrated)", version=__version__)))
        for nid, out in n.networks.items():
            if out.malignancy_probability is not None:
                ms.append(hd.sr.Measurement(
                    name=codes.DCM.ProbabilityOfCancer, value=float(out.malignancy_probability), unit=codes.UCUM.NoUnits,
                    algorithm_id=hd.sr.AlgorithmIdentification(name=f"NoduleMTL {nid} (raw network output)",
                                                               version=__version__)))
        br = getattr(n, "brock", None)
        if br and br.get("probability") is not None:
            ms.append(hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=float(br["probability"]),
                                        unit=codes.UCUM.NoUnits,
                                        method=_code("BROCK", "Brock (PanCan) full model with spiculation")))
        qs = []
        if n.type in TYPE_CODES:
            qs.append(hd.sr.QualitativeEvaluation(_code("COMPOSITION", "Nodule composition (HU estimate)"),
                                                  _code(*TYPE_CODES[n.type])))
        if lr:
            qs.append(hd.sr.QualitativeEvaluation(_code("LUNGRADS", "Lung-RADS v2022 assessment category"),
                                                  lung_rads_code(lr["category"])))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=_referenced_segment(hd, seg_ds, number, n.mask_box, sources),
            finding_type=codes.SCT.Nodule, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            measurements=ms, qualitative_evaluations=qs or None))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(), name="NoduleMTL", manufacturer_name="NoduleMTL", model_name=f"NoduleMTL {__version__}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)  # as the LIDC SRs
    try:
        with warnings.catch_warnings():  # the source's PatientName is copied as it is (often one component)
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
            sr = hd.sr.Comprehensive3DSR(
                evidence=[seg_ds] + sources, content=report, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="NoduleMTL", is_complete=True,
                is_final=False, is_verified=False, series_description=SR_SERIES_DESCRIPTION)
    except (ValueError, TypeError, AttributeError) as e:
        raise DicomSrError(f"Cannot build a DICOM SR on series {ct.dicom_series_uid}: {e}") from None
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "NoduleMTL private codes (research software, not for clinical use)"
    scheme.CodingSchemeResponsibleOrganization = "NoduleMTL"
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SoftwareVersions = f"NoduleMTL {__version__}"
    sr.ManufacturerModelName = "NoduleMTL"
    out = Path(out_path)
    sr.save_as(out)  # into the staged output folder (NoduleMTLLib.outputs.writer); its mode follows the umask
    return out


def write_sr_into_output_dir(result: AnalysisResult, ct: CTVolume, out_dir, dicom_folder=None) -> Path | None:
    """``--dicom-sr`` of the command line: ``out_dir/report.sr.dcm`` referencing ``out_dir/segmentation.dcm``.

    Call after :func:`NoduleMTLLib.outputs.dicom_seg.write_seg_into_output_dir`.  No nodule found
    (no SEG): no SR, an SR of an earlier run in that folder is removed, None returned.

    Raises:
        InputError: the CT was not read from a DICOM series.
        NoduleMTLLib.outputs.files.OutputError: the SR cannot be built or written.
    """
    from ..core.errors import OutputError
    from .dicom_seg import SEG_FILE

    path = Path(out_dir) / SR_FILE
    seg_path = Path(out_dir) / SEG_FILE
    if not any(n.found and n.mask_box is not None for n in result.nodules) or not seg_path.is_file():
        if path.is_file():
            path.unlink()
        return None
    try:
        return write_dicom_sr(result, ct, seg_path, path, dicom_folder)
    except DicomSrError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror or e}") from None

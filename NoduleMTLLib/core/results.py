"""Result records of an analysis, shared by the CLI, the Slicer logic and the tests.

Coordinates: world positions are stored in both LPS (SimpleITK / DICOM convention,
used internally) and RAS (3D Slicer convention) millimetres.  RAS = (-L, -P, S).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from .consensus import MaskBox

#: Version of the ``nodules.json`` record (``schema_version``); its JSON Schema is
#: ``Resources/Schema/nodules.schema.json`` (:func:`schema_path`).  Raise it when a field changes meaning.
SCHEMA_VERSION = 1

#: Nodule type labels (radiological composition estimate).
NODULE_TYPES = ("solid", "part-solid", "ground-glass")

#: Standard terminology of a nodule segment, as a 3D Slicer ``TerminologyEntry``
#: string: category "Morphologically Altered Structure" (SCT 49755003),
#: type "Nodule" (SCT 27925004), anatomic region "Lung" (SCT 39607008).
NODULE_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^27925004^Nodule"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^39607008^Lung"
    "~^^"
)


class _DetectionRecordKeys(TypedDict):
    """The keys every ``DetectionRecord`` has (the schema's ``required``)."""

    score: float
    box_ijk: list[int]


class DetectionRecord(_DetectionRecordKeys, total=False):
    """``NoduleResult.detection`` (whole-scan search; ``nodules.schema.json`` ``$defs/detection``),
    built by :func:`NoduleMTLLib.detection.infer.detection_record`.  Scores in [0, 1]; boxes
    half-open voxel (i0, j0, k0, i1, j1, k1); world positions LPS / RAS mm."""

    detector: str
    detector_score: float
    fp_reduction_score: float | None
    score_threshold: float
    box_xyxy_px: list[float]
    box_lps_min_mm: list[float] | None
    box_lps_max_mm: list[float] | None
    centre_ijk: list[float]
    centre_lps_mm: list[float] | None
    centre_ras_mm: list[float] | None
    centre_slice: int
    slices: list[int]
    n_slice_detections: int
    search_scale: float
    fragments_absorbed: int
    #: why it is reported: "score" (combined score at or above the operating point), "mass" (the size-aware
    #: mass rule) or "mass_shape" (a thick soft-tissue region the detector missed, judged by its click outline)
    accepted_as: str
    #: the outline's features the mass rule read (volume_ml, mean_hu, ...), None when not computed
    outline_features: dict[str, float] | None


class _LungRadsRecordKeys(TypedDict):
    """The keys every ``LungRadsRecord`` has (the schema's ``required``)."""

    category: str | None
    size_mm: float | None
    rule: str | None
    version: str


class LungRadsRecord(_LungRadsRecordKeys, total=False):
    """``NoduleResult.lung_rads`` (``$defs/lung_rads``), built by
    :func:`NoduleMTLLib.clinical.lung_rads.assess_nodule` (notes added by
    :mod:`NoduleMTLLib.clinical.thick_slices`).  ``category`` "1" .. "4X" or None (not categorised:
    ``rule`` says why); sizes in mm (one decimal, Lung-RADS rounding)."""

    long_axis_mm: float
    short_axis_mm: float
    type: str
    type_probability: float | None
    type_probabilities: dict[str, float] | None
    type_method: str
    solid_component: dict[str, Any]
    solid_component_mm: float | None
    calcification: dict[str, Any]
    notes: list[str]
    suggestions: list[str]


class _BrockRecordKeys(TypedDict):
    """The keys every ``BrockRecord`` has (the schema's ``required``)."""

    probability: float | None
    complete: bool
    inputs: dict[str, Any]
    sources: dict[str, Any]
    assumed: list[str]
    missing: list[str]


class BrockRecord(_BrockRecordKeys, total=False):
    """``NoduleResult.brock`` (``$defs/brock``), built by :func:`NoduleMTLLib.clinical.brock.assess_nodule`:
    the Brock (PanCan) probability in [0, 1] or None (inputs missing), whether every input was known,
    the inputs and where each came from, the assumed and missing ones."""

    model: str
    lower_bound: bool
    notes: list[str]


@dataclass
class NetworkOutput:
    """What one network says about one nodule.

    Attributes:
        network_id: a registry id (:mod:`NoduleMTLLib.models.registry`).
        malignancy_probability: P(malignant) in [0, 1].
        sign_probabilities: radiological sign name -> probability in [0, 1].
        dice_with_final: Dice of this network's own mask with the reported mask
            (1.0 when it is the only network).
    """

    network_id: str
    malignancy_probability: float
    sign_probabilities: dict[str, float] = field(default_factory=dict)
    dice_with_final: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``nodules.json``: ``networks.<id>``), without the id (the key)."""
        return {k: v for k, v in asdict(self).items() if k != "network_id"}

    @classmethod
    def from_dict(cls, network_id: str, d: dict[str, Any]) -> NetworkOutput:
        """The record of :meth:`to_dict` back."""
        return cls(network_id, d.get("malignancy_probability"), dict(d.get("sign_probabilities") or {}),
                   d.get("dice_with_final"))


@dataclass
class NoduleResult:
    """One analysed nodule.

    Attributes:
        id: 1-based nodule number (also the label value in ``labels.nrrd``).
        point_lps_mm / point_ras_mm: the clicked point, world mm.
        found: False when no nodule was segmented at the point (then the
            measurements are None and ``mask`` is empty).
        mask: the nodule's mask on the CT grid, numpy order (z, y, x) = (k, j, i).  Stored as
            a :class:`~NoduleMTLLib.core.consensus.MaskBox` (the mask's bounding box + offset on
            the grid: a few kB per nodule instead of one CT-sized array each), the canonical
            form everywhere; a full-grid array assigned is boxed once (an empty one gives None).
            Reading ``mask`` builds the full-grid bool (z, y, x) array on each read (for
            callers outside the library); the library's code reads :attr:`mask_box`, and the
            writers that need a full grid build it once (``AnalysisResult.label_array``,
            ``dicom_seg.segment_pixels``).
        diameter_mm: longest axial diameter (mm) over all axial slices.
        short_axis_mm: longest diameter perpendicular to it on the same slice (mm).
            Both axes are the mask's, times the network's measured size correction when
            ``size_correction`` is set (click path, first network's mask; see
            :func:`NoduleMTLLib.core.postprocess.measure_nodule`).
        size_correction: None (axes as measured on the mask), or the factors applied to them
            and the axes as measured (``long_axis_factor``, ``short_axis_factor``,
            ``measured_long_axis_mm``, ``measured_short_axis_mm``, ``network``, ``fitted_on``).
        volume_mm3: segmented volume (mm^3).
        mean_hu: mean CT value inside the mask (HU).
        solid_fraction: fraction of mask voxels >= -300 HU.
        type: one of :data:`NODULE_TYPES` (heuristic, see ``postprocess.nodule_type``).
        malignancy_probability: the reported P(malignant) in [0, 1]: the calibrated probability
            of the run's configuration (``NoduleMTLLib.models.calibration.apply_to_result``; which
            model made it is in ``AnalysisResult.run["malignancy_probability"]``); None when
            not found or when no calibrated model applies.
        centroid_lps_mm: mask centroid (world LPS mm).
        networks: network id -> :class:`NetworkOutput`.
        message: human-readable note (e.g. why nothing was found).
        network_masks: network id -> that network's own mask as a
            :class:`NoduleMTLLib.core.consensus.MaskBox` (bounding box on the CT grid), None when
            it found nothing.
        consensus: :class:`NoduleMTLLib.core.consensus.Consensus` of the networks (mask, mean
            probability, disagreement figures); None when not computed.
        reported_mask: which mask ``mask`` is: ``"first"`` (the first network's) or ``"consensus"``.
        detection: whole-scan search only (``NoduleMTLLib.detection.infer``): detector score,
            score threshold, 3D voxel box (i0, j0, k0, i1, j1, k1, half-open), world box
            (LPS mm), centre (ijk, LPS, RAS mm), slice range; None for clicked nodules.
        lung_rads: Lung-RADS v2022 baseline record (:func:`NoduleMTLLib.clinical.lung_rads.assess_nodule`);
            None when not assessed or not found.
        brock: Brock (PanCan) risk record (:func:`NoduleMTLLib.clinical.brock.assess_nodule`), a
            different model from the networks' probabilities; None when not assessed or not found.
    """

    id: int
    point_lps_mm: tuple[float, float, float]
    found: bool
    mask: np.ndarray | None = None
    diameter_mm: float | None = None
    short_axis_mm: float | None = None
    volume_mm3: float | None = None
    mean_hu: float | None = None
    solid_fraction: float | None = None
    type: str | None = None
    malignancy_probability: float | None = None
    centroid_lps_mm: tuple[float, float, float] | None = None
    networks: dict[str, NetworkOutput] = field(default_factory=dict)
    message: str = ""
    network_masks: dict[str, Any] = field(default_factory=dict)
    consensus: Any = None
    reported_mask: str = "first"
    detection: DetectionRecord | None = None
    lung_rads: LungRadsRecord | None = None
    brock: BrockRecord | None = None
    size_correction: dict[str, Any] | None = None

    @property
    def label_value(self) -> int:
        """Voxel value of this nodule in the label map (= ``id``)."""
        return self.id

    @property
    def point_ras_mm(self) -> tuple[float, float, float]:
        x, y, z = self.point_lps_mm
        return (-x, -y, z)

    @property
    def name(self) -> str:
        return f"Nodule {self.id}"

    @property
    def mask_box(self) -> MaskBox | None:
        """The mask as a :class:`~NoduleMTLLib.core.consensus.MaskBox` (tight bounding box, bool
        (dz, dy, dx) + offset (k, j, i) + grid shape); None when there is no mask or it is
        empty.  No full-grid array is built when a box is stored."""
        return self.__dict__.get("_mask")

    @property
    def mask_shape_zyx(self) -> tuple[int, int, int] | None:
        """Shape (z, y, x) of the grid the mask lives on (None without a mask)."""
        m = self.__dict__.get("_mask")
        return None if m is None else tuple(m.shape_zyx)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no mask)."""
        d = {
            "id": self.id,
            "label_value": self.label_value if self.found else None,
            "name": self.name,
            "found": self.found,
            "point_ras_mm": [round(float(v), 3) for v in self.point_ras_mm],
            "point_lps_mm": [round(float(v), 3) for v in self.point_lps_mm],
            "centroid_lps_mm": None if self.centroid_lps_mm is None else [round(float(v), 3) for v in self.centroid_lps_mm],
            "diameter_mm": _r(self.diameter_mm),
            "short_axis_mm": _r(self.short_axis_mm),
            "size_correction": self.size_correction,
            "volume_mm3": _r(self.volume_mm3),
            "mean_hu": _r(self.mean_hu),
            "solid_fraction": _r(self.solid_fraction, 3),
            "type": self.type,
            "malignancy_probability": self.malignancy_probability,
            "networks": {k: v.to_dict() for k, v in self.networks.items()},
            "message": self.message,
            "reported_mask": self.reported_mask,
            "consensus": None if self.consensus is None else self.consensus.to_dict(),
            "lung_rads": self.lung_rads,
            "brock": self.brock,
        }
        if self.detection is not None:
            d["detection"] = self.detection
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], mask: np.ndarray | None = None) -> NoduleResult:
        """The record of :meth:`to_dict` back (``mask``: the bool (z, y, x) mask, read
        separately; ``network_masks`` stay empty: they are not written)."""
        from .consensus import Consensus

        tup = lambda v: None if v is None else tuple(float(x) for x in v)  # noqa: E731
        return cls(id=int(d["id"]), point_lps_mm=tup(d["point_lps_mm"]), found=bool(d["found"]), mask=mask,
                   diameter_mm=d.get("diameter_mm"), short_axis_mm=d.get("short_axis_mm"),
                   size_correction=d.get("size_correction"), volume_mm3=d.get("volume_mm3"),
                   mean_hu=d.get("mean_hu"), solid_fraction=d.get("solid_fraction"), type=d.get("type"),
                   malignancy_probability=d.get("malignancy_probability"),
                   centroid_lps_mm=tup(d.get("centroid_lps_mm")),
                   networks={k: NetworkOutput.from_dict(k, v or {}) for k, v in (d.get("networks") or {}).items()},
                   message=d.get("message") or "", reported_mask=d.get("reported_mask") or "first",
                   consensus=None if d.get("consensus") is None else Consensus.from_dict(d["consensus"]),
                   detection=d.get("detection"), lung_rads=d.get("lung_rads"), brock=d.get("brock"))


def _get_mask(self) -> np.ndarray | None:
    m = self.__dict__.get("_mask")
    return m.to_full() if isinstance(m, MaskBox) else m


def _set_mask(self, value) -> None:
    if value is not None and not isinstance(value, MaskBox):
        value = MaskBox.from_full(np.asarray(value) != 0)  # canonical: the box (None when empty)
    self.__dict__["_mask"] = value


# ``mask`` is a dataclass field (constructor argument, ``fields()``) backed by this property:
# what is stored is always a MaskBox (a full-grid array assigned is boxed once); reading ``mask``
# builds the full-grid array (for callers outside the library); the library reads ``mask_box``.
NoduleResult.mask = property(_get_mask, _set_mask, doc="bool (z, y, x) mask on the CT grid, or None (see the class docstring).")


@dataclass
class RunRecord:
    """The fields every run record has, whatever the mode (``nodules.json``: ``run``).

    Attributes:
        software: "NoduleMTL <version>".
        mode: "click" (clicked points), "detect" (whole-scan search), "reclassify" (given masks)
            or "export" (the Slicer export of edited segments).
        networks: the click networks' registry ids (classification; the first one's mask is
            reported on the click path).
        device: the torch device the networks ran on.
        torch: torch version (None where torch was not used).
        reported_mask: which mask is reported: "first (<id>)", "consensus", "detector" or "given".
        timing_s: named durations in seconds (``total`` at least when timed).
    Mode-specific fields (thresholds, detector settings, calibration, Lung-RADS per scan, patient)
    follow in the same dict (:meth:`to_dict` ``extra``).
    """

    software: str
    mode: str
    networks: list
    device: str
    torch: str | None
    reported_mask: str
    timing_s: dict = field(default_factory=dict)

    def to_dict(self, **extra) -> dict[str, Any]:
        """The record as the ``run`` dict, with the mode-specific ``extra`` fields after the common ones."""
        return {**asdict(self), **extra}


def run_record(mode: str, networks, device, reported_mask: str, timing_s: dict | None = None, **extra) -> dict[str, Any]:
    """A ``run`` dict with every :class:`RunRecord` field (software version and torch version filled in)."""
    from .. import __version__

    try:
        import torch
        tv = torch.__version__
    except ImportError:  # pragma: no cover - the export in Slicer before torch is installed
        tv = None
    return RunRecord(f"NoduleMTL {__version__}", mode, list(networks), str(device), tv, reported_mask,
                     dict(timing_s or {})).to_dict(**extra)


def schema_path():
    """Path of ``nodules.schema.json`` (``Resources/Schema``, beside the library in a source
    checkout or an installed Slicer module).  Raises FileNotFoundError when absent."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]  # the NoduleMTLLib folder
    for cand in (here.parent / "Resources" / "Schema" / "nodules.schema.json",
                 here / "Resources" / "Schema" / "nodules.schema.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError("Resources/Schema/nodules.schema.json not found beside NoduleMTLLib")


def _r(v, nd=2):
    return None if v is None else round(float(v), nd)


@dataclass
class AnalysisResult:
    """All nodules of one run on one CT.

    Attributes:
        input: description of the input (path, size (i, j, k), spacing mm, origin LPS mm, direction).
        run: description of the run (networks, device, version, timings s).
        nodules: list of :class:`NoduleResult`, ``id`` 1..N in order.
        messages: notes about the whole run (e.g. thick slices in a whole-scan search);
            written to ``nodules.json`` when not empty.
    """

    input: dict[str, Any]
    run: dict[str, Any]
    nodules: list[NoduleResult]
    messages: list[str] = field(default_factory=list)

    def label_array(self, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        """uint16 label map (z, y, x): voxel value = nodule id; later nodules do not overwrite earlier ones."""
        lab = np.zeros(shape_zyx, dtype=np.uint16)
        for n in self.nodules:
            box = n.mask_box if n.found else None  # work on the mask's box, not the whole grid
            if box is not None:
                sub = lab[box.slices]
                sub[box.array & (sub == 0)] = n.id
        return lab

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``nodules.json``)."""
        # every RunRecord field is present (null where a hand-made result did not say)
        run = {**{f: None for f in RunRecord.__dataclass_fields__}, **(self.run or {})}
        d = {"schema_version": SCHEMA_VERSION, "input": self.input, "run": run,
             "nodules": [n.to_dict() for n in self.nodules]}
        if self.messages:
            d["messages"] = list(self.messages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], nodules: list[NoduleResult] | None = None) -> AnalysisResult:
        """The record of :meth:`to_dict` back; ``nodules`` (rebuilt with their masks by
        :func:`NoduleMTLLib.outputs.files.read_outputs`) replace ``d["nodules"]`` when given."""
        if nodules is None:
            nodules = [NoduleResult.from_dict(n) for n in d["nodules"]]
        return cls(input=d["input"], run=d["run"], nodules=nodules, messages=list(d.get("messages") or []))

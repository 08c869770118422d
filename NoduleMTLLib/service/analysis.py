"""The analysis service: one entry point for every way of running NoduleMTL.

:func:`analyze` takes a CT and either clicked points or "search the whole scan", the network
ids, the device, the mask choice, the score threshold and a progress callback; it loads the
networks (once per :class:`ModelCache`), runs the click path
(:func:`NoduleMTLLib.inference.pipeline.analyze_points`) or the whole-scan search
(:func:`NoduleMTLLib.detection.infer.detect_nodules`), retries on the CPU when the GPU runs out
of memory (:func:`NoduleMTLLib.core.device.with_cpu_fallback`), calibrates the networks' raw outputs into
the reported probability and assesses each nodule (Lung-RADS, Brock: :func:`complete_result`)
and returns the :class:`~NoduleMTLLib.core.results.AnalysisResult`.  :func:`reclassify` does the
same for given masks.  The engines return raw outputs only.  Its callers only read inputs and write
outputs: ``nodulemtl analyze`` (:mod:`NoduleMTLLib.apps.cli`), ``nodulemtl batch``
(:mod:`NoduleMTLLib.apps.batch`), the Slicer CLI module (``NoduleMTLCLI.run``), the module's Logic
(``NoduleMTLLogic.process``) and the background worker.

:func:`detector_status` is the one answer to "can the whole-scan search run here?", and
:func:`network_choices` the panel's list of registered networks with whether their weights
are installed.

torch, SimpleITK and the networks are imported inside the functions: the module imports in
Slicer's GUI process before torch is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..core.io import CTVolume
    from ..core.results import AnalysisResult

#: ``callback(fraction in [0, 1], message)``.
Progress = Callable[[float, str], None]
#: The mask choices of the click path (``pipeline.analyze_points``).
MASK_CHOICES = ("first", "consensus")


def split_networks(text: str | Iterable[str]) -> list[str]:
    """``"a, b,,a"`` (or a list) -> ``["a", "b"]``: stripped, empty and repeated ids removed,
    order kept; ``"none"`` (any case) alone -> ``[]`` (whole-scan search without classification)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return [] if [n.lower() for n in out] == ["none"] else out


class ModelCache:
    """Loaded networks, kept between analyses (batch cases, the Slicer worker's runs).

    Networks are loaded on first use per ``(id, device)`` through
    :func:`NoduleMTLLib.models.registry.load_network` (weights verified), the detector through
    :func:`NoduleMTLLib.detection.infer.load_detector`.

    Args:
        detector: an already loaded whole-scan detector used on every device (tests, benchmarks).
        networks: already loaded click networks ``{id: module}``, used as they are on every
            device (a caller's pre-loaded networks; others are loaded on first use).
    """

    def __init__(self, detector: torch.nn.Module | None = None, networks: dict | None = None):
        self._given_networks = dict(networks or {})
        self._networks: dict[tuple[str, str], torch.nn.Module] = {}
        self._detectors: dict[str, torch.nn.Module] = {}
        self._fp_reducers: dict[str, torch.nn.Module | None] = {}
        self._given_detector = detector

    def network(self, network_id: str, device) -> torch.nn.Module:
        """The click network ``network_id`` in eval mode on ``device`` (loaded once).

        Raises:
            KeyError: unknown id.  WeightsError: weights missing, unreadable or corrupt.
        """
        from ..models.registry import load_network

        if network_id in self._given_networks:
            return self._given_networks[network_id]
        key = (network_id, str(device))
        if key not in self._networks:
            self._networks[key] = load_network(network_id, device)
        return self._networks[key]

    def networks_on(self, device) -> _DeviceView:
        """A read-only mapping ``{id: network on device}`` that loads on access (what
        ``analyze_points(networks=)`` / ``detect_nodules(networks=)`` take)."""
        return _DeviceView(self, device)

    def detector(self, device) -> torch.nn.Module:
        """The whole-scan detector on ``device`` (loaded once; the one given to the constructor if any)."""
        if self._given_detector is not None:
            return self._given_detector
        from ..detection import infer

        key = str(device)
        if key not in self._detectors:
            self._detectors[key] = infer.load_detector(device)
        return self._detectors[key]

    def fp_reducer(self, device) -> torch.nn.Module | None:
        """The whole-scan search's false-positive reduction on ``device`` (loaded once), None
        when its weights are not installed (:func:`NoduleMTLLib.detection.infer.load_fpr`)."""
        from ..detection import infer

        key = str(device)
        if key not in self._fp_reducers:
            self._fp_reducers[key] = infer.load_fpr(device)
        return self._fp_reducers[key]

    def clear(self) -> None:
        """Forget every loaded network (frees their memory once nothing else holds them)."""
        self._networks.clear()
        self._detectors.clear()
        self._fp_reducers.clear()


class _DeviceView:
    def __init__(self, cache: ModelCache, device):
        self.cache, self.device = cache, device

    def get(self, network_id: str, default=None):
        return self.cache.network(network_id, self.device)

    def __getitem__(self, network_id: str):
        return self.cache.network(network_id, self.device)

    def __contains__(self, network_id: str) -> bool:
        from ..models.registry import NETWORKS

        return network_id in NETWORKS or network_id in self.cache._given_networks


def analyze(ct: CTVolume, points_lps: Sequence[Sequence[float]] | None = None, *, detect: bool = False,
            network_ids: Sequence[str] | None = None, device: str = "auto", mask: str = "first",
            threshold: float | str = "default", progress: Progress | None = None,
            notify: Callable[[str], None] | None = None, models: ModelCache | None = None,
            assess: bool = True, patient=None) -> AnalysisResult:
    """Analyse a CT: the nodule at each point, or every nodule the whole-scan search finds.

    Args:
        ct: the CT (HU, LPS geometry; :func:`NoduleMTLLib.core.io.read_ct` or the Slicer volume).
        points_lps: world LPS points (mm), one per nodule; empty/None with ``detect``.
        detect: search the whole scan (:data:`NoduleMTLLib.models.registry.DEFAULT_DETECTOR`)
            instead of analysing points.
        network_ids: click networks (registry ids).  Click path: the first one's mask is
            reported (default ``registry.DEFAULT_NETWORKS``, the measured default).  ``detect``:
            they classify each found nodule; ``()`` = detection only (default ``DEFAULT_NETWORKS``).
        device: "auto" | "cpu" | "cuda" | "mps".  CUDA out of memory -> the whole analysis
            runs again on the CPU (recorded in ``result.run["fallback"]``).
        mask: click path: "first" or "consensus" (``pipeline.analyze_points``).
        threshold: ``detect``: "default" (the two-stage search's operating point), "adaptive"
            (every candidate) or a minimum score in [0, 1] (``detection.infer.parse_threshold``).
        progress: ``callback(fraction, message)``.
        notify: ``callback(message)`` told about the CPU retry before it starts.
        models: networks loaded by earlier calls (default: a new :class:`ModelCache`).
        assess: add the report fields (Lung-RADS category, Brock risk:
            :func:`NoduleMTLLib.service.assessment.annotate_result`) to the result.
        patient: the Brock patient inputs: a :class:`NoduleMTLLib.clinical.brock.PatientInfo`, or a dict
            of options (``age``, ``sex``, ``family_history``, ``emphysema``) that override the
            CT's DICOM header (:func:`NoduleMTLLib.service.assessment.patient_for`); None: the header only.

    Returns:
        :class:`~NoduleMTLLib.core.results.AnalysisResult` (masks on the CT grid).

    Raises:
        InputError: both or neither of points / ``detect``, no network for the click path,
            unknown network, bad mask choice or threshold, a point outside the volume/body,
            too few slices (``detect``).
        NoLungError: ``detect`` on a CT without plausible lungs (an InputError).
        WeightsError: weights missing, unreadable or failing their checksum.
        DeviceError: an unavailable device was requested.
    """
    from ..core.device import with_cpu_fallback
    from ..core.io import InputError
    from ..models import registry

    points = [tuple(float(v) for v in p) for p in (points_lps or [])]
    if detect and points:
        raise InputError("Give either points or whole-scan detection, not both")
    if not detect and not points:
        raise InputError("No points given: click at least one nodule")
    ids = tuple(network_ids) if network_ids is not None else registry.DEFAULT_NETWORKS
    if not detect and not ids:
        raise InputError("No network given: choose at least one network")
    if mask not in MASK_CHOICES:
        raise InputError(f"Unknown mask choice {mask!r}: use {' or '.join(repr(m) for m in MASK_CHOICES)}")
    models = models if models is not None else ModelCache()

    if detect:
        from ..detection import infer

        try:
            infer.parse_threshold(threshold)
        except ValueError as e:
            raise InputError(str(e)) from None

        def run(dev):
            dev = _device(dev)
            return infer.detect_nodules(ct, device=dev, score_threshold=threshold, progress=progress, classify_with=ids,
                                        networks=models.networks_on(dev), loader=models.detector,
                                        fpr_model=models.fp_reducer(dev))
    else:
        from ..inference.pipeline import analyze_points

        def run(dev):
            dev = _device(dev)
            return analyze_points(ct, points, network_ids=ids, device=dev, progress=progress,
                                  networks=models.networks_on(dev), mask=mask)

    result = with_cpu_fallback(run, device, notify=notify)
    if not detect:
        from .duplicates import merge_duplicate_clicks
        from .mediastinum import refuse_mediastinal_clicks
        refuse_mediastinal_clicks(result, ct)  # a click on the heart / aorta / hilum: no nodule at this point
        merge_duplicate_clicks(result, ct)  # clicks on one nodule -> one nodule (before Brock counts them)
    complete_result(result, ct, patient, assess=assess)
    return result


def complete_result(result: AnalysisResult, ct: CTVolume, patient=None, *, assess: bool = True,
                    calibration=None) -> AnalysisResult:
    """The service's part of every answer, after the engine's raw outputs (in place; returns ``result``).

    1. Calibration: each found nodule's reported ``malignancy_probability`` and
       ``result.run["malignancy_probability"]`` (:func:`NoduleMTLLib.models.calibration.apply_to_result`;
       the engines - ``pipeline.analyze_points``, ``detection.infer.detect_nodules``,
       ``refine.reclassify_from_mask`` - give the networks' raw outputs only).  A whole-scan
       search without classifying networks has no probability to calibrate.
    2. Assessment (``assess``): Lung-RADS / Brock records (:func:`assess_result`).

    Args:
        result: the engine's :class:`~NoduleMTLLib.core.results.AnalysisResult` of ``ct``.
        ct: the CT (HU, LPS).
        patient: the Brock inputs (:func:`assess_result`).
        assess: add the Lung-RADS / Brock records.
        calibration: a loaded :class:`NoduleMTLLib.models.calibration.CalibrationSet` (default: the installed file).

    Raises:
        ValueError: an unreadable ``age`` or ``sex`` patient option.
    """
    from ..models.calibration import apply_to_result

    if (result.run or {}).get("networks"):
        apply_to_result(result, calibration)
    if assess:
        assess_result(result, ct, patient)
    return result


def assess_result(result: AnalysisResult, ct: CTVolume, patient=None) -> None:
    """Lung-RADS / Brock records on ``result`` (in place; :func:`NoduleMTLLib.service.assessment.annotate_result`).

    ``patient``: a :class:`NoduleMTLLib.clinical.brock.PatientInfo`, or a dict of options (``age``,
    ``sex``, ``family_history``, ``emphysema``) over the CT's DICOM header, or None (the header).
    Raises ValueError for an unreadable ``age`` or ``sex`` option.
    """
    from ..clinical.brock import PatientInfo
    from .assessment import annotate_result, patient_for

    info = patient if isinstance(patient, PatientInfo) else patient_for(ct, **(patient or {}))
    annotate_result(result, ct, info)


def reclassify(ct: CTVolume, masks: Sequence, *, nodule_ids: Sequence[int] | None = None,
               points_lps: Sequence[Sequence[float] | None] | None = None, network_ids: Sequence[str] | None = None,
               device: str = "auto", progress: Progress | None = None, notify: Callable[[str], None] | None = None,
               models: ModelCache | None = None, assess: bool = True, patient=None,
               size_corrections: Sequence[dict | None] | None = None) -> AnalysisResult:
    """Measure and classify given (e.g. user-edited) nodule masks without segmenting
    (:func:`NoduleMTLLib.inference.refine.reclassify_from_mask` for each), with the CPU fallback, then
    calibrate and assess as :func:`analyze` (:func:`complete_result`): the unchanged mask of an
    analysis gets the analysis' reported probability and Lung-RADS category back.

    Args:
        ct: the CT (HU, LPS).
        masks: bool (z, y, x) arrays of shape ``ct.shape_zyx``, one per nodule.
        nodule_ids: id of each nodule (default 1..N).
        points_lps: the original click of each nodule (world LPS mm) or None (mask centroid).
        size_corrections: the size correction each nodule was reported with (``NoduleResult.size_correction``)
            or None; kept while its mask is unchanged (``refine.reclassify_from_mask``).
        network_ids, device, progress, notify, models, assess, patient: as :func:`analyze`.

    Returns:
        :class:`~NoduleMTLLib.core.results.AnalysisResult` with one ``NoduleResult`` per mask
        (``run["mode"]`` = "reclassify"), calibrated and assessed.

    Raises:
        InputError: lengths differ, an empty mask or one off the CT grid, unknown network.
        WeightsError, DeviceError: as :func:`analyze`.
    """
    import time

    from ..core.device import with_cpu_fallback
    from ..core.io import InputError
    from ..core.results import AnalysisResult, run_record
    from ..inference.refine import reclassify_from_mask
    from ..models import registry

    ids = tuple(network_ids) if network_ids else registry.DEFAULT_NETWORKS
    nodule_ids = list(nodule_ids) if nodule_ids is not None else list(range(1, len(masks) + 1))
    points = list(points_lps) if points_lps is not None else [None] * len(masks)
    corrections = list(size_corrections) if size_corrections is not None else [None] * len(masks)
    if not masks or not len(masks) == len(nodule_ids) == len(points) == len(corrections):
        raise InputError(f"Give one mask per nodule: {len(masks)} masks, {len(nodule_ids)} ids, {len(points)} points, "
                         f"{len(corrections)} size corrections")
    models = models if models is not None else ModelCache()
    progress = progress or (lambda f, m: None)

    def run(dev):
        dev, t0 = _device(dev), time.perf_counter()
        out = []
        for k, (mask, nid, point, corr) in enumerate(zip(masks, nodule_ids, points, corrections)):
            progress(k / len(masks), f"re-classifying nodule {nid} ({k + 1}/{len(masks)})")
            out.append(reclassify_from_mask(ct, mask, ids, device=dev, networks=models.networks_on(dev), nodule_id=int(nid),
                                            point_lps=point, size_correction=corr))
        progress(1.0, "done")
        run_info = run_record("reclassify", ids, dev, "given", {"total": round(time.perf_counter() - t0, 3)})
        return AnalysisResult(input=ct.describe(), run=run_info, nodules=out)

    result = with_cpu_fallback(run, device, notify=notify)
    complete_result(result, ct, patient, assess=assess)
    return result


def _device(name):
    from ..core.device import resolve_device

    return resolve_device(name)


def detector_status() -> tuple[bool, str]:
    """Whether the whole-scan search (Find nodules, ``--detect``) can run: ``(ok, reason)``.

    It can when torch imports and the weights of
    :data:`~NoduleMTLLib.models.registry.DEFAULT_DETECTOR` are installed
    (:func:`~NoduleMTLLib.models.registry.find_weights`); ``reason`` is the panel's tooltip / the
    CLI's error text.
    """
    try:
        from ..models import registry
    except ImportError as e:
        return False, f"PyTorch is not installed yet ({e})"
    spec = registry.get_spec(registry.DEFAULT_DETECTOR)
    try:
        registry.find_weights(spec.network_id)
    except registry.WeightsError as e:
        return False, f"Whole-scan detection is not available yet: {e}"
    return True, f"Find nodules in the whole scan with {spec.title}"


@dataclass(frozen=True)
class NetworkChoice:
    """A registered network as the panel lists it.

    Attributes:
        network_id: registry id; title: human title; paper: citation;
        available: True when its weights file was found (see ``registry.find_weights``);
        reason: why it is not available ("" when it is);
        detection: True for a whole-scan detector (run by "Find nodules", not per click).
    """

    network_id: str
    title: str
    paper: str
    available: bool
    reason: str
    detection: bool


def network_choices() -> list[NetworkChoice]:
    """Every registered network, read from the registry at call time: the click networks of
    ``registry.NETWORKS`` in registry order, then the whole-scan detectors of
    ``registry.DETECTORS``, each with whether its weights file can be found.

    Raises:
        ImportError: torch (needed by the registry) is not installed.
    """
    from ..models import registry

    out = []
    for spec in [*registry.NETWORKS.values(), *registry.DETECTORS.values()]:
        try:
            registry.find_weights(spec.network_id)
            available, reason = True, ""
        except registry.WeightsError as e:
            available, reason = False, str(e)
        out.append(NetworkChoice(spec.network_id, spec.title, spec.paper, available, reason, spec.kind == "detector"))
    return out

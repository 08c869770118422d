"""Model registry: which networks exist, how to build them, where their weights are.

Weights are looked up, in order, in
1. the folder named by the ``NODULEMTL_WEIGHTS_DIR`` environment variable (override, e.g. a
   shared network folder at an offline site);
2. the extension's own ``Resources/Weights`` (shipped files);
3. the user cache ``~/.cache/NoduleMTL/weights`` (``$XDG_CACHE_HOME`` respected).

``Resources/Weights/models.json`` (the manifest) lists each file with its size and
sha256, checked before loading.  Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import DEFAULT_NETWORKS as _DEFAULT_NETWORKS

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the NoduleMTLLib folder (this file is NoduleMTLLib/models/registry.py)


from ..core.errors import UnknownNetworkError, WeightsError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks). Raises OSError if it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: id, human title, paper, builder, weights file and the module
    that declares its input.

    Attributes:
        network_id: the id used everywhere (CLI, JSON keys, weights file names).
        title / paper: human title and citation (panel, manifest, model card).
        builder: ``() -> nn.Module``, untrained instance satisfying the contract of its kind
            (:class:`NoduleMTLLib.models.contract.ClickNetwork` or :class:`~NoduleMTLLib.models.contract.WholeScanDetector`).
        weights_file: file name looked up in :func:`weights_search_path`.
        module: dotted name of the network file, which declares ``INPUT_SPEC``.
        kind: "click" (segments/classifies around a point; :data:`NETWORKS`), "detector"
            (whole-scan search; :data:`DETECTORS`) or "fp_reduction" (second stage of the
            whole-scan search; :data:`FP_REDUCERS`).
    """

    network_id: str
    title: str
    paper: str
    builder: Callable[[], torch.nn.Module]
    weights_file: str
    module: str
    kind: str = "click"

    @property
    def input_spec(self) -> dict:
        """The input the shipped weights expect: the ``input_spec`` of their manifest entry
        (``Resources/Weights/models.json``, read at call time), else (a network without a
        manifest entry, e.g. one registered by a test) the network file's :attr:`declared_input_spec`."""
        entry = manifest_entry(self.network_id)
        if entry.get("file") == self.weights_file and isinstance(entry.get("input_spec"), dict):
            return dict(entry["input_spec"])
        return self.declared_input_spec

    @property
    def declared_input_spec(self) -> dict:
        """The network file's ``INPUT_SPEC`` (a copy; imports the file on first use): what an
        export writes into the manifest; ``Testing/Python/test_registry_metadata.py`` checks
        that the two agree."""
        return dict(importlib.import_module(self.module).INPUT_SPEC)


#: Click networks of the default configuration when none are chosen (CLI, batch, Slicer CLI
#: module, panel): :data:`NoduleMTLLib.DEFAULT_NETWORKS`, the measured default.
DEFAULT_NETWORKS: tuple[str, ...] = _DEFAULT_NETWORKS
#: Its first network (reported mask; re-classification when a segment names no network).
DEFAULT_NETWORK = DEFAULT_NETWORKS[0]
#: Whole-scan detector of "Find nodules" / ``--detect``.
DEFAULT_DETECTOR = "maskrcnn25d"
#: False-positive reduction of the whole-scan search's candidates (its second stage).
DEFAULT_FP_REDUCER = "fpr25d"
#: Click network whose trained encoder initialises the detector's ResNet-18 body
#: (``training.detection_phases.init_backbone_from_lnmsnet``).
BACKBONE_SOURCE = "lnmsnet"

#: Click networks, in the order the panel lists them (:func:`register` adds more).
NETWORKS: dict[str, NetworkSpec] = {}
#: Whole-scan detectors (kind "detector"): never in :data:`NETWORKS` (the click list).
DETECTORS: dict[str, NetworkSpec] = {}
#: False-positive reduction of whole-scan candidates (kind "fp_reduction"; second stage of Find nodules).
FP_REDUCERS: dict[str, NetworkSpec] = {}


def register(spec: NetworkSpec) -> NetworkSpec:
    """Add a network to :data:`NETWORKS` (kind "click"), :data:`DETECTORS` (kind "detector") or
    :data:`FP_REDUCERS` (kind "fp_reduction").

    Raises:
        ValueError: unknown kind, or the id is registered already.
    """
    table = {"click": NETWORKS, "detector": DETECTORS, "fp_reduction": FP_REDUCERS}.get(spec.kind)
    if table is None:
        raise ValueError(f"unknown network kind {spec.kind!r}: 'click', 'detector' or 'fp_reduction'")
    if spec.network_id in NETWORKS or spec.network_id in DETECTORS or spec.network_id in FP_REDUCERS:
        raise ValueError(f"network {spec.network_id!r} is registered already")
    table[spec.network_id] = spec
    return spec


def unregister(network_id: str) -> None:
    """Remove a network registered with :func:`register` (tests)."""
    for table in (NETWORKS, DETECTORS, FP_REDUCERS):
        table.pop(network_id, None)


def _lnmsnet():
    from .networks.lnmsnet import LNMSNet
    return LNMSNet()


def _detguided():
    from .networks.detguided import build_detguided
    return build_detguided("narrow")


def _dsmtnet():
    from .networks.dsmtnet import build_dsmtnet_click
    return build_dsmtnet_click("narrow")


def _mtnet():
    from .networks.mtnet import build_mtnet
    return build_mtnet("narrow")


def _maskrcnn25d():
    from .networks.maskrcnn25d import build_maskrcnn25d
    return build_maskrcnn25d(backbone="resnet18")


register(NetworkSpec("lnmsnet", "LNMSNet", "Li Y. et al., Front. Med. 2026, doi:10.3389/fmed.2026.1773338", _lnmsnet,
                     "lnmsnet.safetensors", "NoduleMTLLib.models.networks.lnmsnet"))
register(NetworkSpec("detguided", "Detection-guided seg/cls model (narrow variant)",
                     "Zhang J. et al., QIMS 2024 / arXiv 2410.20154", _detguided, "detguided.safetensors",
                     "NoduleMTLLib.models.networks.detguided"))
register(NetworkSpec("dsmtnet", "DSMT-Net (2D, narrow variant)", "DSMT-Net (seed 003): dual-scale multi-task network",
                     _dsmtnet, "dsmtnet.safetensors", "NoduleMTLLib.models.networks.dsmtnet"))
register(NetworkSpec("mtnet", "MT-Net (narrow variant)", "MT-Net (seed 004): coarse-to-fine segmentation + Class-net",
                     _mtnet, "mtnet.safetensors", "NoduleMTLLib.models.networks.mtnet"))
register(NetworkSpec("maskrcnn25d", "2.5D Mask R-CNN nodule search (narrow variant, ResNet-18-FPN)",
                     "Li R., Honarvar Shakibaei Asli B., Electronics 2026, 15(4), 736", _maskrcnn25d,
                     "maskrcnn25d.safetensors", "NoduleMTLLib.models.networks.maskrcnn25d", kind="detector"))


def _fpr25d():
    from .networks.fpr25d import FPR25D
    return FPR25D()


register(NetworkSpec("fpr25d", "2.5D false-positive reduction of Find nodules candidates",
                     "ours, after Setio A.A.A. et al., IEEE TMI 2016 (multi-view ConvNets), the LUNA16 FP-reduction track and "
                     "Dou Q. et al., IEEE TBME 2017 (multilevel context)",
                     _fpr25d, "fpr25d.safetensors", "NoduleMTLLib.models.networks.fpr25d", kind="fp_reduction"))


def available_networks() -> list[str]:
    """Ids of the click networks (:data:`NETWORKS`); detectors excluded."""
    return list(NETWORKS)


def available_detectors() -> list[str]:
    """Ids of whole-scan detectors (:data:`DETECTORS`)."""
    return list(DETECTORS)


def all_ids() -> list[str]:
    """Every registered id: click networks, then detectors (training CLI choices, results table)."""
    return [*NETWORKS, *DETECTORS]


def check_network_ids(network_ids, *, extra=(), allow_empty: bool = True, error: type[Exception] | None = None) -> tuple[str, ...]:
    """The one check of click network ids given by a user (CLI, batch, service, engines).

    Args:
        network_ids: ids (any iterable of str).
        extra: ids the caller provides networks for itself (a mapping or collection; ``in`` is used).
        allow_empty: False refuses an empty list.
        error: exception class raised (default :class:`NoduleMTLLib.core.io.InputError`).

    Returns:
        The ids as a tuple, in their order.

    Raises:
        ``error``: an id that is not a registered click network (:data:`NETWORKS`; detectors
        and FP reducers are not click networks) nor in ``extra``, or an empty list when not
        ``allow_empty``; the message names them and the registered ids.
    """
    ids = tuple(network_ids)
    unknown = [n for n in ids if n not in NETWORKS and n not in extra]
    if unknown or (not ids and not allow_empty):
        if error is None:
            from ..core.io import InputError as error
        what = f"Unknown click network(s): {', '.join(map(str, unknown))}" if unknown else "No click network given"
        raise error(f"{what}; available: {', '.join(NETWORKS)}")
    return ids


def get_spec(network_id: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of a click network or detector. Raises UnknownNetworkError
    (an InputError and a KeyError) listing the known ids."""
    spec = NETWORKS.get(network_id) or DETECTORS.get(network_id) or FP_REDUCERS.get(network_id)
    if spec is None:
        raise UnknownNetworkError(f"Unknown network {network_id!r}; available: {', '.join([*all_ids(), *FP_REDUCERS])}")
    return spec


def resources_dir() -> Path:
    """``Resources`` folder: beside the package (installed Slicer layout) or at the repo root."""
    for cand in (PACKAGE_DIR / "Resources", PACKAGE_DIR.parent / "Resources"):
        if cand.is_dir():
            return cand
    return PACKAGE_DIR.parent / "Resources"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "NoduleMTL" / "weights"


def weights_search_path() -> list[Path]:
    dirs = []
    if os.environ.get("NODULEMTL_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["NODULEMTL_WEIGHTS_DIR"]))
    dirs += [resources_dir() / "Weights", cache_dir()]
    return dirs


MANIFEST_FILE = "models.json"


def check_manifest(man, path) -> dict:
    """Schema check of a models.json: ``format`` 1, ``networks`` {id: {file, size_bytes, sha256, ...}},
    an optional ``calibration`` {file, size_bytes, sha256}.  Returns ``man``.

    Raises:
        WeightsError: the first violation, naming the file.
    """
    def bad(why):
        return WeightsError(f"{path} is not a valid models.json: {why}")

    if not isinstance(man, dict) or man.get("format") != 1:
        raise bad(f"format {man.get('format') if isinstance(man, dict) else type(man).__name__}, expected 1")
    nets = man.get("networks")
    if not isinstance(nets, dict):
        raise bad("no 'networks' object")
    entries = [(f"networks.{k}", v) for k, v in nets.items()]
    if "calibration" in man:
        entries.append(("calibration", man["calibration"]))
    for where, e in entries:
        if not isinstance(e, dict):
            raise bad(f"{where} is not an object")
        if not isinstance(e.get("file"), str) or not e["file"]:
            raise bad(f"{where}.file is missing")
        if not isinstance(e.get("size_bytes"), int) or isinstance(e.get("size_bytes"), bool) or e["size_bytes"] < 0:
            raise bad(f"{where}.size_bytes is not a byte count")
        sha = e.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise bad(f"{where}.sha256 is not 64 hex digits")
    return man


def read_manifest(path: str | os.PathLike) -> dict:
    """A models.json, parsed strictly (no NaN / Infinity) and schema-checked (:func:`check_manifest`).

    Raises:
        WeightsError: unreadable, not JSON (e.g. truncated) or not a valid manifest; one line naming the file.
    """
    from ..core.strict_json import read

    try:
        man = read(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path} is not a valid models.json: {' '.join(str(e).split())}") from None
    return check_manifest(man, path)


def manifest() -> dict:
    """The shipped manifest (``Resources/Weights/models.json``), schema-checked; {} if absent.

    Raises:
        WeightsError: the file is corrupt or not a valid manifest (:func:`read_manifest`).
    """
    p = resources_dir() / "Weights" / MANIFEST_FILE
    return read_manifest(p) if p.exists() else {}


def manifest_for(path: str | os.PathLike) -> tuple[dict, Path]:
    """The manifest that vouches for a file found in a weights folder: that folder's own
    ``models.json`` when it has one (e.g. a ``NODULEMTL_WEIGHTS_DIR`` site folder), else the
    shipped one.  Returns ``(manifest, its path)``.  Raises WeightsError for a bad manifest."""
    local = Path(path).parent / MANIFEST_FILE
    if local.is_file():
        return read_manifest(local), local
    shipped = resources_dir() / "Weights" / MANIFEST_FILE
    return manifest(), shipped


def write_manifest(path: str | os.PathLike, man: dict) -> None:
    """Write a models.json whole or not at all (schema-checked, no NaN; temporary file, then rename)."""
    path = Path(path)
    check_manifest(man, path)
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(man, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def manifest_entry(network_id: str) -> dict:
    """The manifest entry of ``network_id`` (size, sha256, input spec, metrics, operating
    points...; a copy), {} when the manifest has none."""
    return dict((manifest().get("networks") or {}).get(network_id) or {})


#: Manifest keys (entry ``fpr25d`` of ``Resources/Weights/models.json``) of the operating points,
#: which belong to the shipped weights and are read at run time (:func:`operating_points`).
OPERATING_POINT_KEYS = {"default": "operating_threshold", "high_sensitivity": "high_sensitivity_threshold"}


def operating_points(network_id: str = DEFAULT_FP_REDUCER) -> dict[str, float]:
    """The shipped false-positive reducer's (``fpr25d``) operating points, read from its weights'
    manifest entry now (no copy in code).

    ``"default"``: the combined-score threshold for <= 2 false positives per scan on six
    non-test scans (the validation scans LIDC-IDRI-0004 / -0007 and the four training scans
    scored out of fold: ``python -m training.fp_reduction cv``, then ``select``; model card);
    ``"high_sensitivity"``: <= 8 false positives per scan on the same scans.

    Raises:
        WeightsError: the manifest has no entry for ``network_id`` or no number in (0, 1) for a point.
    """
    entry = manifest_entry(network_id)
    out = {}
    for name, key in OPERATING_POINT_KEYS.items():
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise WeightsError(f"Resources/Weights/models.json: entry {network_id!r} has no valid {key!r} (got {value!r})")
        out[name] = float(value)
    return out


def find_weights(network_id: str) -> Path:
    """Path of a network's weights file. Raises WeightsError naming the file and the folders searched."""
    spec = get_spec(network_id)
    for d in weights_search_path():
        p = d / spec.weights_file
        if p.is_file():
            return p
    raise WeightsError(f"Weights for {network_id} not found: no {spec.weights_file} in "
                       + ", ".join(str(d) for d in weights_search_path()))


def verify_weights(network_id: str, path: Path) -> None:
    """Check size and sha256 against the manifest (:func:`manifest_for`: the weights folder's
    own ``models.json``, else the shipped one).

    Raises:
        WeightsError: the network is not listed (unverified weights are refused, not loaded),
            the size or sha256 differs, or the manifest is corrupt.
    """
    man, mpath = manifest_for(path)
    entry = man.get("networks", {}).get(network_id)
    if not entry:
        raise WeightsError(f"Weights file {path} for {network_id} is not listed in {mpath}: refused, as it cannot be "
                           "verified (list it with its size and sha256)")
    if path.stat().st_size != entry["size_bytes"]:
        raise WeightsError(f"Weights file {path} has {path.stat().st_size} bytes, the manifest says {entry['size_bytes']}: "
                           "incomplete or wrong file")
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise WeightsError(f"Weights file {path} fails its sha256 check (corrupt or a different version)")


def build_network(network_id: str) -> torch.nn.Module:
    """Untrained network instance (click network or detector). Raises KeyError with the known ids for an unknown id."""
    return get_spec(network_id).builder()


def numpy_safe_globals() -> list:
    """Numpy's scalar constructor and dtype classes, allowed by ``torch.load(weights_only=True)``
    for checkpoints holding numpy scalars (they only build numbers; nothing else is allowed)."""
    import numpy as np
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]


#: Int8 storage (:func:`quantize_int8`): float tensors with at least this many elements.
INT8_MIN_ELEMENTS = 65536
#: Key suffix of the per-output-channel scales of an int8-stored tensor.
INT8_SCALE_SUFFIX = ".int8_scale"


def quantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Storage form of a state dict: weight-only symmetric int8, one scale per output channel.

    Float tensors of >= :data:`INT8_MIN_ELEMENTS` elements and >= 2 dimensions become int8
    ``round(w / s)`` in [-127, 127] with s = max |w| over each output channel (dim 0) / 127,
    stored as float32 under ``KEY`` + :data:`INT8_SCALE_SUFFIX` (shape (C, 1, ...)); other
    float tensors become float16; integer buffers are kept.  :func:`read_state_dict` restores
    float32 ``q * s``: a relative error of at most 1/254 of each channel's largest weight.
    Used to ship the large networks under 30 MB (their model cards give the measured effect).
    """
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.ndim >= 2 and v.numel() >= INT8_MIN_ELEMENTS:
            w = v.float()
            s = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / 127.0
            out[k] = torch.round(w / s).clamp(-127, 127).to(torch.int8).contiguous()
            out[k + INT8_SCALE_SUFFIX] = s.contiguous()
        else:
            out[k] = (v.half() if v.is_floating_point() else v).contiguous()
    return out


def _dequantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_int8` (float32 ``q * s``); other tensors unchanged."""
    scales = {k[:-len(INT8_SCALE_SUFFIX)]: v for k, v in sd.items() if k.endswith(INT8_SCALE_SUFFIX)}
    return {k: (v.float() * scales[k] if k in scales else v) for k, v in sd.items() if not k.endswith(INT8_SCALE_SUFFIX)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` (fp32, fp16 or :func:`quantize_int8` storage) or a
    torch checkpoint (``weights_only=True``); floating tensors come back as float32."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            with torch.serialization.safe_globals(numpy_safe_globals()):  # checkpoints with numpy scalars
                ck = torch.load(path, map_location="cpu", weights_only=True)
            sd = ck.get("model", ck) if isinstance(ck, dict) else ck
    except Exception as e:  # corrupt/truncated files raise various errors
        raise WeightsError(f"Cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    sd = _dequantize_int8(sd)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_weights_into(model: torch.nn.Module, path: Path | None, network_id: str | None = None) -> Path:
    """Load weights into ``model`` (shipped/cached weights if ``path`` is None). Returns the path used."""
    if path is None:
        if network_id is None:
            raise ValueError("network_id needed to locate shipped weights")
        path = find_weights(network_id)
        verify_weights(network_id, path)
    sd = read_state_dict(Path(path))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"Weights file {path} does not match the network: {str(e).splitlines()[0]}") from None
    return Path(path)


def load_network(network_id: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build, load (verified) shipped weights, eval mode, move to device."""
    model = build_network(network_id)
    load_weights_into(model, None, network_id)
    return model.eval().to(device)


def export_weights(network_id: str, checkpoint: Path | str, out: Path | str, int8: bool = False) -> None:
    """Write a checkpoint's state dict as fp16 safetensors (integer buffers kept as they are),
    or with ``int8`` in :func:`quantize_int8` storage.  ``checkpoint``: a torch checkpoint or a
    safetensors file (e.g. a shipped fp16 file, to convert it); both paths may be ``str`` or
    :class:`~pathlib.Path`.  Only ``out`` is written (atomically); no manifest is touched."""
    from safetensors.torch import save_file
    checkpoint, out = Path(checkpoint), Path(out)
    sd = read_state_dict(checkpoint)  # weights_only=True: a crafted checkpoint cannot run code
    model = build_network(network_id)
    model.load_state_dict(sd)
    if int8:
        half = quantize_int8(model.state_dict())
    else:
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    save_file(half, str(tmp), metadata={"network_id": network_id, "source_checkpoint": checkpoint.name,
                                        "storage": "int8 per output channel" if int8 else "float16"})
    os.chmod(tmp, 0o644)  # shipped with the extension: readable by every user (safetensors writes 0600)
    os.replace(tmp, out)

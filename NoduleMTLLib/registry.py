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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .model_import import sha256_of  # noqa: F401  (re-exported: registry.sha256_of)

PACKAGE_DIR = Path(__file__).resolve().parent


class WeightsError(RuntimeError):
    """Weights missing, unreadable, or failing their checksum."""


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: id, human title, paper, builder and input description.

    ``kind``: "click" (segments/classifies around a point; :data:`NETWORKS`,
    :func:`available_networks`) or "detector" (whole-scan search; :data:`DETECTORS`).
    """

    network_id: str
    title: str
    paper: str
    builder: Callable[[], torch.nn.Module]
    weights_file: str
    input_spec: dict
    kind: str = "click"


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


def _specs() -> dict[str, NetworkSpec]:
    from .networks import lnmsnet as L
    return {
        "lnmsnet": NetworkSpec(
            "lnmsnet", "LNMSNet", "Li Y. et al., Front. Med. 2026, doi:10.3389/fmed.2026.1773338", _lnmsnet,
            "lnmsnet.safetensors",
            {"dims": 2, "channels": 1, "size_px": L.INPUT_SIZE_PX, "spacing_mm": L.INPUT_SPACING_MM,
             "intensity": "per-slice robust (p1-p99) normalisation of HU"},
        ),
        "detguided": NetworkSpec(
            "detguided", "Detection-guided seg/cls model (narrow variant)",
            "Zhang J. et al., QIMS 2024 / arXiv 2410.20154", _detguided, "detguided.safetensors",
            {"dims": 2, "channels": 1, "size_px": L.INPUT_SIZE_PX, "spacing_mm": L.INPUT_SPACING_MM,
             "intensity": "per-slice robust (p1-p99) normalisation of HU", "variant": "narrow"},
        ),
        "dsmtnet": NetworkSpec(
            "dsmtnet", "DSMT-Net (2D, narrow variant)", "DSMT-Net (seed 003): dual-scale multi-task network", _dsmtnet,
            "dsmtnet.safetensors",
            {"dims": 2, "channels": 1, "size_px": L.INPUT_SIZE_PX, "spacing_mm": L.INPUT_SPACING_MM,
             "intensity": "per-slice robust (p1-p99) normalisation of HU", "variant": "narrow",
             "dual_scale": "local: central 48 px at 0.8 mm; context: whole patch at 1.6 mm (48 px)",
             "heads": ["malignancy", "spiculation", "lobulation", "calcification", "subsolid", "bubble_lucency"]},
        ),
        "mtnet": NetworkSpec(
            "mtnet", "MT-Net (narrow variant)", "MT-Net (seed 004): coarse-to-fine segmentation + Class-net", _mtnet,
            "mtnet.safetensors",
            {"dims": 2, "channels": 1, "size_px": L.INPUT_SIZE_PX, "spacing_mm": L.INPUT_SPACING_MM,
             "intensity": "per-slice robust (p1-p99) normalisation of HU", "variant": "narrow"},
        ),
    }


NETWORKS = _specs()


def _maskrcnn25d():
    from .detection.model import build_maskrcnn25d
    return build_maskrcnn25d(backbone="resnet18")


#: Whole-scan detectors (kind "detector"): never in :data:`NETWORKS` (the click list).
DETECTORS = {
    "maskrcnn25d": NetworkSpec(
        "maskrcnn25d", "2.5D Mask R-CNN nodule search (narrow variant, ResNet-18-FPN)",
        "Li R., Honarvar Shakibaei Asli B., Electronics 2026, 15(4), 736", _maskrcnn25d, "maskrcnn25d.safetensors",
        {"dims": 2.5, "channels": 5, "stack": "axial slices k-2..k+2 (edge slices repeated), channel 0 most inferior",
         "spacing_mm": "native (no resampling, no resizing)",
         "intensity": "HU window [-1000, 400] -> [0, 1], slice-wise CLAHE, times the lung mask "
                      "(NoduleMTLLib.detection.preprocess)", "variant": "narrow"},
        kind="detector",
    ),
}


def _fpr25d():
    from .detection.fp_reduction import FPR25D
    return FPR25D()


#: False-positive reduction of whole-scan candidates (kind "fp_reduction"; second stage of Find nodules).
FP_REDUCERS = {
    "fpr25d": NetworkSpec(
        "fpr25d", "2.5D false-positive reduction of Find nodules candidates",
        "ours, after Setio A.A.A. et al., IEEE TMI 2016 (multi-view ConvNets) and the LUNA16 FP-reduction track",
        _fpr25d, "fpr25d.safetensors",
        {"dims": 2.5, "channels": 3, "size_px": 32, "field_mm": 24.0,
         "channels_are": "centre slice, mean and max over the candidate's slice range",
         "scalar": "slice-range extent (mm) / 10", "intensity": "HU window [-1000, 400] -> [0, 1]"},
        kind="fp_reduction",
    ),
}


def available_networks() -> list[str]:
    """Ids of networks that can run a click analysis (registered in this version); detectors excluded."""
    return list(NETWORKS)


def available_detectors() -> list[str]:
    """Ids of whole-scan detectors (:data:`DETECTORS`)."""
    return list(DETECTORS)


def get_spec(network_id: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of a click network or detector. Raises KeyError listing the known ids."""
    spec = NETWORKS.get(network_id) or DETECTORS.get(network_id) or FP_REDUCERS.get(network_id)
    if spec is None:
        raise KeyError(f"unknown network {network_id!r}; available: {', '.join([*NETWORKS, *DETECTORS, *FP_REDUCERS])}")
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


def manifest() -> dict:
    """The shipped manifest (``Resources/Weights/models.json``), {} if absent."""
    p = resources_dir() / "Weights" / "models.json"
    return json.loads(p.read_text()) if p.exists() else {}


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
    """Check size and sha256 against the manifest (when the manifest lists the network)."""
    entry = manifest().get("networks", {}).get(network_id)
    if not entry:
        return
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``)."""
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


def export_weights(network_id: str, checkpoint: Path, out: Path) -> None:
    """Write a checkpoint's state dict as fp16 safetensors (integer buffers kept as they are)."""
    from safetensors.torch import save_file
    sd = read_state_dict(Path(checkpoint))  # weights_only=True: a crafted checkpoint cannot run code
    model = build_network(network_id)
    model.load_state_dict(sd)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    save_file(half, str(tmp), metadata={"network_id": network_id, "source_checkpoint": checkpoint.name})
    os.chmod(tmp, 0o644)  # shipped with the extension: readable by every user (safetensors writes 0600)
    os.replace(tmp, out)

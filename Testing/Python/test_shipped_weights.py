"""Every shipped weights file is in the manifest (size, sha256), loads into its network, and
has a model card; every manifest entry points at a file that is shipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from NoduleMTLLib.models import registry

WEIGHTS = Path(__file__).resolve().parents[2] / "Resources" / "Weights"
MANIFEST = json.loads((WEIGHTS / "models.json").read_text())["networks"]
SHIPPED = sorted(p.stem for p in WEIGHTS.glob("*.safetensors"))


def test_manifest_and_files_agree():
    assert sorted(MANIFEST) == SHIPPED
    for nid in SHIPPED:
        assert nid in registry.NETWORKS or nid in registry.DETECTORS or nid in registry.FP_REDUCERS, nid


@pytest.mark.slow
@pytest.mark.parametrize("network_id", SHIPPED)
def test_shipped_file_verifies_loads_and_has_a_card(network_id):
    entry = MANIFEST[network_id]
    path = WEIGHTS / entry["file"]
    registry.verify_weights(network_id, path)  # size + sha256
    model = registry.build_network(network_id)
    registry.load_weights_into(model, path, network_id)  # strict: every tensor has its place
    card = WEIGHTS / entry["model_card"]
    assert card.is_file(), f"{network_id}: model card {card.name} missing"
    text = card.read_text(encoding="utf-8")
    for section in ("Data", "Training", "Measured"):
        assert section in text, f"{network_id}: model card has no '{section}' section"
    # measured metrics recorded for held-out patients only
    assert set(entry["metrics"]) <= {"val", "test", "val_click3d_hu", "test_click3d_hu", "whole_ct"}


def test_shipped_files_stay_under_30_mb():
    """The repository ships small weights (fp16, or int8 storage for the large networks)."""
    for nid in SHIPPED:
        assert (WEIGHTS / MANIFEST[nid]["file"]).stat().st_size < 30e6, nid


def test_int8_storage_round_trip(tmp_path):
    """``quantize_int8`` keeps every weight within half a step of its channel's scale, leaves
    small tensors in fp16, and ``read_state_dict`` restores the network's exact keys."""
    from safetensors.torch import save_file

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = registry.build_network("lnmsnet")
    sd = model.state_dict()
    q = registry.quantize_int8(sd)
    big = [k for k, v in sd.items() if v.is_floating_point() and v.ndim >= 2 and v.numel() >= registry.INT8_MIN_ELEMENTS]
    assert big and all(q[k].dtype == torch.int8 for k in big)
    assert all(q[k].dtype == torch.float16 for k, v in sd.items() if v.is_floating_point() and k not in big)
    f = tmp_path / "w.safetensors"
    save_file(q, str(f))
    back = registry.read_state_dict(f)
    assert sorted(back) == sorted(sd)
    for k in big:
        step = q[k + registry.INT8_SCALE_SUFFIX]
        assert back[k].dtype == torch.float32
        assert ((back[k] - sd[k].float()).abs() <= step / 2 + 1e-7).all(), k
    model.load_state_dict(back, strict=True)


def test_export_weights_takes_str_paths_and_writes_only_its_file(tmp_path):
    """``export_weights`` accepts ``str`` paths (as from a shell script) and writes the one
    safetensors file, never a manifest: exporting a candidate cannot change what is shipped."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ck = tmp_path / "run" / "last.pt"
    ck.parent.mkdir()
    torch.save({"model": registry.build_network("lnmsnet").state_dict(), "iteration": 1}, ck)
    out = tmp_path / "cand" / "lnmsnet_int8.safetensors"
    registry.export_weights("lnmsnet", str(ck), str(out), int8=True)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    back = registry.read_state_dict(out)
    assert sorted(back) == sorted(registry.build_network("lnmsnet").state_dict())

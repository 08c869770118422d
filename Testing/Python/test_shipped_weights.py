"""Every shipped weights file is in the manifest (size, sha256), loads into its network, and
has a model card; every manifest entry points at a file that is shipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from NoduleMTLLib import registry

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
    text = card.read_text()
    for section in ("Data", "Training", "Measured"):
        assert section in text, f"{network_id}: model card has no '{section}' section"
    # measured metrics recorded for held-out patients only
    assert set(entry["metrics"]) <= {"val", "test", "val_click3d_hu", "test_click3d_hu", "whole_ct"}

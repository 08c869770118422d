"""The network contract (``NoduleMTLLib.models.contract``) and the registry as the one list of ids.

A sixth network is added the way the contract says - one network file (here this test module,
which declares the class and its ``INPUT_SPEC``) plus one registry entry - and runs through
the analysis service (``NoduleMTLLib.service.analysis.analyze``) on the real sample CT, without an
edit anywhere else.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from NoduleMTLLib.core.io import ras_to_lps, read_ct
from NoduleMTLLib.models import registry
from NoduleMTLLib.models.contract import ClickNetwork, ClickNetworkBase, WholeScanDetector
from NoduleMTLLib.service import analysis

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
NODULE_RAS = (-72.5, -77.2, -190.4)  # the ~30 mm nodule of the README's sample
TINY_ID = "tinynet"

#: The sixth network's input: 32 x 32 px at 1.6 mm (51 mm field of view).
INPUT_SPEC = {"dims": 2, "channels": 1, "size_px": 32, "spacing_mm": 1.6,
              "intensity": "per-slice robust (p1-p99) normalisation of HU"}


class TinyClickNet(ClickNetworkBase, nn.Module):
    """A 1x1 convolution that segments bright (normalised > 0.6) pixels and a linear
    malignancy head on the mean intensity, with one sign head ("brightness")."""

    sign_heads = ("brightness",)

    def __init__(self):
        super().__init__()
        self.seg = nn.Conv2d(1, 1, 1)
        self.cls = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seg(x), self.cls(x.mean(dim=(1, 2, 3))[:, None])[:, 0]

    def forward_click(self, x: torch.Tensor):
        seg, cls = self(x)
        return seg, cls, {"brightness": x.mean(dim=(1, 2, 3)) * 4.0 - 2.0}


def _tiny():
    net = TinyClickNet()
    with torch.no_grad():
        net.seg.weight.fill_(20.0)
        net.seg.bias.fill_(-12.0)
        net.cls.weight.fill_(1.0)
        net.cls.bias.fill_(-0.25)
    return net


@pytest.fixture
def tiny_registered(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file(_tiny().state_dict(), str(tmp_path / "tinynet.safetensors"))
    w = tmp_path / "tinynet.safetensors"  # a site folder vouches for its weights in its own models.json
    registry.write_manifest(tmp_path / "models.json", {"format": 1, "networks": {TINY_ID: {
        "file": w.name, "size_bytes": w.stat().st_size, "sha256": registry.sha256_of(w)}}})
    monkeypatch.setenv("NODULEMTL_WEIGHTS_DIR", str(tmp_path))
    spec = registry.register(registry.NetworkSpec(TINY_ID, "Tiny test network", "none (test)", TinyClickNet,
                                                   "tinynet.safetensors", __name__))
    try:
        yield spec
    finally:
        registry.unregister(TINY_ID)


@pytest.mark.slow
def test_shipped_networks_satisfy_the_contract():
    for nid in registry.NETWORKS:
        net = registry.build_network(nid)
        assert isinstance(net, ClickNetwork), nid
        x = torch.zeros(2, 1, net_size(nid), net_size(nid))
        with torch.inference_mode():
            seg, cls, signs = net.eval().forward_click(x)
        assert seg.shape == (2, 1, *x.shape[2:]) and cls.shape == (2,) and tuple(signs) == tuple(net.sign_heads), nid
    for nid in registry.DETECTORS:
        assert isinstance(registry.build_network(nid), WholeScanDetector), nid


def net_size(nid: str) -> int:
    return int(registry.get_spec(nid).input_spec["size_px"])


def test_each_network_file_declares_its_input_spec_and_the_manifest_agrees():
    manifest = json.loads((REPO / "Resources" / "Weights" / "models.json").read_text())["networks"]
    for nid in registry.all_ids():
        spec = registry.get_spec(nid)
        assert spec.input_spec == importlib.import_module(spec.module).INPUT_SPEC
        if nid in manifest:
            assert manifest[nid]["input_spec"] == spec.input_spec, nid
    assert registry.DEFAULT_NETWORK in registry.NETWORKS and registry.DEFAULT_DETECTOR in registry.DETECTORS
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.get_spec(registry.DEFAULT_NETWORK))


def test_a_sixth_network_runs_through_the_analysis_service(tiny_registered):
    assert TINY_ID in registry.all_ids() and TINY_ID in registry.available_networks()
    choice = {c.network_id: c for c in analysis.network_choices()}[TINY_ID]
    assert choice.available and not choice.detection
    ct = read_ct(SAMPLE_CT)
    res = analysis.analyze(ct, [ras_to_lps(NODULE_RAS)], network_ids=(TINY_ID,), device="cpu")
    (nodule,) = res.nodules
    assert res.run["networks"] == [TINY_ID] and nodule.found, nodule.message
    assert nodule.mask.shape == ct.shape_zyx and 5.0 < nodule.diameter_mm < 80.0
    out = nodule.networks[TINY_ID]
    assert 0.0 <= out.malignancy_probability <= 1.0 and set(out.sign_probabilities) == {"brightness"}
    # the training CLI offers it too (choices come from the registry)
    from training import cli as train_cli

    with pytest.raises(SystemExit) as e:
        train_cli.main(["export", TINY_ID, "--help"])
    assert e.value.code == 0


def test_analyze_checks_its_inputs():
    from NoduleMTLLib.core.io import InputError

    ct = read_ct(SAMPLE_CT)
    with pytest.raises(InputError, match="No points"):
        analysis.analyze(ct, [], device="cpu")
    with pytest.raises(InputError, match="not both"):
        analysis.analyze(ct, [ras_to_lps(NODULE_RAS)], detect=True, device="cpu")
    with pytest.raises(InputError, match="mask"):
        analysis.analyze(ct, [ras_to_lps(NODULE_RAS)], mask="largest", device="cpu")
    with pytest.raises(InputError, match="threshold"):
        analysis.analyze(ct, detect=True, threshold=1.5, device="cpu")
    assert analysis.split_networks("None") == [] and analysis.split_networks("a,b,a") == ["a", "b"]

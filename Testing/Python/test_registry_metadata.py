"""Metadata kept in one place: network-id validation (``registry.check_network_ids``), the
weights' manifest as the source of the input specs and the ``fpr25d`` operating points (read
at run time; the README, docs and model cards must quote the same numbers), and the training
loss each click network declares (``contract.TRAINING_LOSSES``, ``training.click2d.LOSSES``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from NoduleMTLLib.core.io import InputError
from NoduleMTLLib.models import contract, registry

REPO = Path(__file__).resolve().parents[2]
#: Documents that quote the operating points: the README, docs/, the model cards and the training results.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "Resources" / "Weights").glob("*.md")),
        *sorted((REPO / "training").glob("*.md"))]


# ---------------------------------------------------------------------------
# network ids
# ---------------------------------------------------------------------------

def test_check_network_ids():
    ids = list(registry.NETWORKS)
    assert registry.check_network_ids(iter(ids)) == tuple(ids)
    assert registry.check_network_ids([]) == ()
    for bad in ("nonet", registry.DEFAULT_DETECTOR, registry.DEFAULT_FP_REDUCER):  # detectors are not click networks
        with pytest.raises(InputError, match=f"Unknown click network.*{bad}.*available: {ids[0]}"):
            registry.check_network_ids([ids[0], bad])
    assert registry.check_network_ids(["mine"], extra={"mine": object()}) == ("mine",)
    with pytest.raises(InputError, match="No click network given"):
        registry.check_network_ids([], allow_empty=False)

    class MyError(Exception):
        pass

    with pytest.raises(MyError, match="nonet"):
        registry.check_network_ids(["nonet"], error=MyError)


def test_network_ids_are_validated_only_in_the_registry():
    """The former copies (pipeline, detection.infer twice, refine, batch - now the batch command in cli -, pacs) call
    ``registry.check_network_ids``; no library module filters ids against NETWORKS by hand."""
    copies = [p.relative_to(REPO).as_posix() for p in (REPO / "NoduleMTLLib").rglob("*.py")
              if p.name != "registry.py" and re.search(r"if \w+ not in NETWORKS", p.read_text(encoding="utf-8"))]
    assert copies == []
    for rel in ("inference/pipeline.py", "detection/infer.py", "inference/refine.py", "apps/cli.py", "apps/pacs.py"):
        assert "check_network_ids(" in (REPO / "NoduleMTLLib" / rel).read_text(encoding="utf-8"), rel


# ---------------------------------------------------------------------------
# the manifest: input specs and operating points
# ---------------------------------------------------------------------------

def test_input_specs_come_from_the_manifest_and_match_the_network_files():
    entries = registry.manifest()["networks"]
    for table in (registry.NETWORKS, registry.DETECTORS, registry.FP_REDUCERS):
        for nid, spec in table.items():
            declared = json.loads(json.dumps(spec.declared_input_spec))
            assert entries[nid]["input_spec"] == declared, f"{nid}: re-export its weights (manifest input_spec is stale)"
            assert spec.input_spec == entries[nid]["input_spec"]


def test_operating_points_are_read_from_the_manifest(monkeypatch):
    entry = registry.manifest_entry("fpr25d")
    points = registry.operating_points()
    assert points == {"default": entry["operating_threshold"], "high_sensitivity": entry["high_sensitivity_threshold"]}
    assert 0 < points["high_sensitivity"] < points["default"] < 1
    shipped = registry.manifest()
    changed = json.loads(json.dumps(shipped))
    changed["networks"]["fpr25d"]["operating_threshold"] = 0.9123
    monkeypatch.setattr(registry, "manifest", lambda: changed)
    assert registry.operating_points()["default"] == 0.9123  # read at call time, no copy in code
    del changed["networks"]["fpr25d"]["high_sensitivity_threshold"]
    with pytest.raises(registry.WeightsError, match="high_sensitivity_threshold"):
        registry.operating_points()


def _sentences(path: Path) -> list[str]:
    """The document's sentences: paragraphs joined, split where a period (or ! ? ;) is followed
    by a space, so decimal numbers stay whole; each table row is one sentence; markup removed."""
    out = []
    for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = para.splitlines()
        if lines and all(ln.lstrip().startswith("|") for ln in lines):
            out += [re.sub(r"[*`|]", " ", ln) for ln in lines]
            continue
        text = " ".join(re.sub(r"[*`|]", " ", para).split())
        out += [s for s in re.split(r"(?<=[.!?;])\s+", text) if s]
    return out


def operating_point_problems(paths, root: Path = REPO) -> list[str]:
    """Quotes of the operating points in ``paths`` that differ from the manifest: a sentence
    naming the high-sensitivity setting with a score in it must contain the manifest's value; a
    score right after "default" / "operating point" must be the default; a 4-decimal
    ``--threshold`` value must be one of the two."""
    points = registry.operating_points()
    default, high = f"{points['default']:.4f}", f"{points['high_sensitivity']:.4f}"
    problems = []
    for path in paths:
        for s in _sentences(path):
            if re.search(r"first (fpr25d|version)|previous detector", s, re.I):
                continue  # a retired file's own operating point (the first fpr25d, the previous detector), quoted as history
            where = f"{path.relative_to(root)}: {s[:160]}"
            if re.search(r"high[- ]sensitivity", s, re.I):
                scores = re.findall(r"(?<![\d.])0\.\d+", s)
                if scores and high not in scores:
                    problems.append(f"high sensitivity is {high}, not {scores}: {where}")
            for m in re.finditer(r"(?:\bdefault\b|operating point)\W{0,6}(?:=\s*the operating point\s*)?\(?(0\.\d{3,})", s, re.I):
                if m.group(1) != default:
                    problems.append(f"the default operating point is {default}, not {m.group(1)}: {where}")
            for m in re.finditer(r"--threshold\s+(0\.\d{4})", s):
                if m.group(1) not in (default, high):
                    problems.append(f"--threshold {m.group(1)} is neither operating point ({default}, {high}): {where}")
    return problems


def test_docs_quote_the_manifests_operating_points():
    """Every operating point quoted in the README, docs/*.md and the model cards is the manifest's."""
    assert len(DOCS) >= 7
    problems = operating_point_problems(DOCS)
    assert not problems, "\n".join(problems)


def test_docs_check_catches_a_drifted_quote(tmp_path):
    """The check fails on the drift it exists for (the README called 0.5 the high-sensitivity setting)."""
    bad = tmp_path / "README.md"
    bad.write_text("Find nodules threshold: 0 = the default operating point 0.8992, or a minimum score up to 0.99\n"
                   "(0.5 is the high-sensitivity setting measured in the fpr25d model card). Use `--threshold 0.7172`.\n")
    problems = operating_point_problems([bad], tmp_path)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "high sensitivity is" in text and "not 0.8992" in text and "--threshold 0.7172" in text


# ---------------------------------------------------------------------------
# the training loss is part of the network contract
# ---------------------------------------------------------------------------

def test_every_click_network_declares_a_known_training_loss():
    import torch

    from training.click2d import LOSSES, joint_loss

    assert tuple(LOSSES) == contract.TRAINING_LOSSES
    declared = {}
    for nid in registry.NETWORKS:
        model = registry.build_network(nid)
        assert model.training_loss in LOSSES, nid
        declared[nid] = model.training_loss
    # the shipped networks each keep their own loss (detguided / mtnet / dsmtnet are not the default)
    assert declared == {"lnmsnet": "seg_cls", "detguided": "seg_cls_size", "mtnet": "mtnet", "dsmtnet": "multi_head"}

    class Undeclared(torch.nn.Module):
        def forward(self, x):
            return x, x[:, 0, 0, 0]

    with pytest.raises(ValueError, match="declares training_loss None"):
        joint_loss(Undeclared(), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1), {"cls_loss_weight": 0.5})

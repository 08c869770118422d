"""Inserted small-nodule evaluation (training/small_insertion.py, issue 27): the guard that keeps
test / reserved scans and non-validation VOIs out, and the LUNA16 hit rule.  Reads only the split
files (no image is read)."""

from __future__ import annotations

import pytest

from training import small_insertion as si
from training.insertion import VOI


def _voi(patient):
    import numpy as np

    return VOI(patient, 1, np.zeros((3, 3, 3), np.float32), np.ones((3, 3, 3), bool), (1.0, 1.0, 1.0), 5.0)


def test_hosts_guard_refuses_test_and_reserved_scans():
    si.check_hosts(si.HOSTS)  # the six non-test whole scans pass
    for bad in ("LIDC-IDRI-0003", "LIDC-IDRI-0005", "LIDC-IDRI-0001", "LIDC-IDRI-0009"):
        with pytest.raises(ValueError, match="test / reserved"):
            si.check_hosts(["LIDC-IDRI-0002", bad])


def test_voi_guard_accepts_only_validation_patients():
    from training.data import load_split as click_split
    from training.wholescan import load_split as scan_split

    val = si.validation_patients()
    split, ws = click_split(), scan_split()
    assert val and val <= set(split["val"])
    assert not val & (set(split["train"]) | set(split["test"]))
    assert not val & (set(ws["val"]) | set(ws["test"]) | {"LIDC-IDRI-0001", "LIDC-IDRI-0009"})
    si.check_vois([_voi(sorted(val)[0])])
    for bad in (sorted(split["train"])[0], sorted(split["test"])[0], "LIDC-IDRI-0004", "LIDC-IDRI-0001"):
        with pytest.raises(ValueError, match="not validation patients"):
            si.check_vois([_voi(sorted(val)[0]), _voi(bad)])
        with pytest.raises(ValueError, match="not validation patients"):
            si.load_validation_vois(patients=[bad])  # refused before any file is read


def test_hit_rule_is_centre_within_radius_in_mm():
    sp = (0.7, 0.7, 2.5)  # (x, y, z) mm
    centres = [(10, 10, 4), (10 + 3 / 0.7, 10, 4), (10, 10, 5), (10, 10 + 2.4 / 0.7, 4), (50, 50, 4)]
    # 0 mm, 3 mm in x, 2.5 mm in z (one slice), 2.4 mm in y, far
    assert si.hit_index(centres, sp, (10, 10, 4), 2.5) == [0, 2, 3]
    assert si.hit_index(centres, sp, (10, 10, 4), 3.0) == [0, 1, 2, 3]
    assert si.hit_index([], sp, (10, 10, 4), 5.0) == []


def test_another_detector_needs_its_own_candidates(tmp_path):
    """Scoring another detector against the shipped one's false positives would mix two score
    distributions: refused before anything is read."""
    with pytest.raises(ValueError, match="candidates"):
        si.evaluate(si.HOSTS[:1], per_scan=1, weights=tmp_path / "other.pt")

"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the repository (override with the
``NODULEMTL_DATA`` environment variable).  Tests that need it skip with a clear
reason when it is absent, so the suite still runs on a machine without the data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The Slicer module folder (NoduleMTLMRML.py etc.) is importable in plain Python too.
sys.path.insert(0, str(REPO / "NoduleMTL"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("NODULEMTL_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "README.md").exists():
        pytest.skip(f"real data folder not found at {d} (set NODULEMTL_DATA)")
    return d

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


def validate_nodules_json(data: dict) -> None:
    """Validate a ``nodules.json`` record against ``Resources/Schema/nodules.schema.json``
    (raises ``jsonschema.ValidationError``)."""
    import json

    import jsonschema

    from NoduleMTLLib.core.results import schema_path

    jsonschema.validate(data, json.loads(schema_path().read_text()))


@pytest.fixture(scope="session", autouse=True)
def every_written_nodules_json_follows_the_schema(tmp_path_factory):
    """After the session: every ``nodules.json`` the tests wrote under pytest's temporary folder
    validates against the JSON Schema (whatever test, entry point or mode wrote it)."""
    yield
    import json

    base = tmp_path_factory.getbasetemp()
    bad = []
    for p in base.rglob("nodules.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # a test's deliberately broken file
        if not isinstance(data, dict) or "schema_version" not in data:
            continue  # a hand-made file of a test (no schema_version: not written by NoduleMTL)
        try:
            validate_nodules_json(data)
        except Exception as e:  # noqa: BLE001 - collect them all
            bad.append(f"{p.relative_to(base)}: {str(e).splitlines()[0]}")
    assert not bad, "nodules.json not following Resources/Schema/nodules.schema.json:\n" + "\n".join(bad[:20])

"""The typed records of the result model (``NoduleMTLLib.core.results``: ``DetectionRecord``,
``LungRadsRecord``, ``BrockRecord``, ``RunRecord``) against ``Resources/Schema/nodules.schema.json``
and against the code that builds them (issue 24 item 2)."""

from __future__ import annotations

import ast
import json
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from NoduleMTLLib.core.results import BrockRecord, DetectionRecord, LungRadsRecord, RunRecord

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "Resources" / "Schema" / "nodules.schema.json").read_text(encoding="utf-8"))
RECORDS = {"detection": DetectionRecord, "lung_rads": LungRadsRecord, "brock": BrockRecord}


def _keys(record) -> set[str]:
    return set(typing.get_type_hints(record))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_typed_record_matches_the_schema(name):
    record, schema = RECORDS[name], SCHEMA["$defs"][name]
    assert set(record.__required_keys__) == set(schema["required"]), name
    assert set(schema["properties"]) <= _keys(record), name
    assert set(record.__optional_keys__) == _keys(record) - set(schema["required"])


def test_run_record_fields_are_the_schemas_required_run_keys():
    run = SCHEMA["properties"]["run"]
    assert {f.name for f in fields(RunRecord)} >= set(run.get("required", []))


def _returned_dict_keys(path: Path, function: str) -> set[str]:
    """Keys of the dict literal(s) the named function returns last (its normal result)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    ret = [n for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict)][-1]
    return {k.value for k in ret.value.keys if isinstance(k, ast.Constant)}


def test_builders_return_the_typed_keys():
    """detection_record and brock.assess_nodule return exactly the record's keys."""
    lib = REPO / "NoduleMTLLib"
    assert _returned_dict_keys(lib / "detection" / "infer.py", "detection_record") == _keys(DetectionRecord)
    assert _returned_dict_keys(lib / "clinical" / "brock.py", "assess_nodule") == _keys(BrockRecord)


def test_detection_phrase_says_how_find_nodules_found_it():
    """A mass found by its shape carries score 0: no "score 0.00" may reach the radiologist."""
    from NoduleMTLLib.outputs.fields import detection_phrase

    assert detection_phrase(None) == "" and detection_phrase({}) == ""
    assert detection_phrase({"score": 0.9512, "accepted_as": "score", "score_threshold": 0.8891}) == "detection score 0.95"
    mass = detection_phrase({"score": 0.844, "accepted_as": "mass", "score_threshold": 0.8891,
                             "outline_features": {"volume_ml": 236.4}})
    assert mass == "detection score 0.84, below the operating point 0.89: reported as a mass (236 mL outline)"
    shape = detection_phrase({"score": 0.0, "accepted_as": "mass_shape", "score_threshold": 0.8891,
                              "outline_features": {"volume_ml": 91.5}})
    assert shape == "found as a mass by its shape (no detector score; 92 mL outline)" and "0.00" not in shape

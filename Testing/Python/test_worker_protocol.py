"""The worker protocol (``NoduleMTLLib.apps.protocol``), the worker's request handling
(``NoduleMTLLib.apps.worker``) and the public runner API (``NoduleMTLLib.apps.runner.Runner``).

The process test starts a real worker (``python -m NoduleMTLLib.apps.worker``) and sends it real
requests on the sample CT shipped in ``Resources/SampleData`` (LIDC-IDRI-0003, cropped).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from pathlib import Path

import pytest

from NoduleMTLLib.apps import protocol
from NoduleMTLLib.apps.protocol import AnalysisRequest, Error, Message, Progress, ProtocolError, Result
from NoduleMTLLib.apps.runner import Runner
from NoduleMTLLib.apps.worker import handle
from NoduleMTLLib.core.errors import InputError
from NoduleMTLLib.core.io import ras_to_lps
from NoduleMTLLib.service import analysis

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
#: The README's second sample point (RAS mm): a ~13 mm nodule.
POINT_LPS = list(ras_to_lps((-23.5, 47.6, -172.3)))
TIMEOUT_S = 300


def test_request_and_events_round_trip():
    req = AnalysisRequest(mode="analyze", ct=SAMPLE_CT, out="out", points_lps=[(1, 2.5, -3)], networks=("lnmsnet",),
                          threshold=0.5, patient={"age": 61.0, "sex": "F"}, pictures=False, request_id="r1")
    line = req.to_json()
    assert "\n" not in line and json.loads(line)["version"] == protocol.PROTOCOL_VERSION
    back = AnalysisRequest.from_json(line)
    assert back == req and back.ct == str(SAMPLE_CT) and back.points_lps == [[1.0, 2.5, -3.0]]
    for event in (Progress(0.25, "loading lnmsnet", "r1"), Message("The GPU ran out of memory", "warning", "r1"),
                  Result("out", ["labels.nrrd", "nodules.json"], 2, 1, "cpu", 3.5, "r1"),
                  Error("Point lies outside the volume", "InputError", 1, "r1")):
        encoded = protocol.encode_event(event)
        assert json.loads(encoded)["event"] == event.kind
        assert protocol.decode_event(encoded) == event


@pytest.mark.parametrize("line, match", [
    ("not json", "not JSON"),
    ('["analyze"]', "JSON object"),
    ('{"mode": "analyze", "ct": "a.nrrd"}', "missing: out"),
    ('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "argv": ["--point"]}', "unknown request field.*argv"),
    ('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "device": "tpu"}', "'device'.*tpu.*not one of"),
    ('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "detect": "yes"}', "'detect'"),
    ('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "points_lps": [[1, 2]]}', "three finite numbers"),
    ('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "version": 99}', "version 99"),
    ('{"mode": "reclassify", "ct": "a.nrrd", "out": "o"}', "needs 'masks'"),
])
def test_bad_requests_are_refused(line, match):
    with pytest.raises(ProtocolError, match=match):
        AnalysisRequest.from_json(line)


def test_bad_events_are_refused():
    for line, match in [('{"version": 1, "event": "progress"}', "bad progress"),
                        ('{"version": 2, "event": "progress", "fraction": 0.5}', "version"),
                        ('{"version": 1, "event": "shrug"}', "unknown event"),
                        ('{"version": 1, "event": "progress", "fraction": "half"}', "fraction"),
                        ("<filter-progress>0.5</filter-progress>", "not JSON")]:
        with pytest.raises(ProtocolError, match=match):
            protocol.decode_event(line)


def test_every_service_field_reaches_the_service():
    """A new option is one request field: the field's ``service`` name must be a parameter of
    ``analysis.analyze`` or ``analysis.reclassify`` (``service_kwargs`` hands it over), and a
    field that does not apply to the mode is refused rather than dropped."""
    params = set(inspect.signature(analysis.analyze).parameters) | set(inspect.signature(analysis.reclassify).parameters)
    service_fields = {f.name: f.metadata["service"] for f in dataclasses.fields(AnalysisRequest) if "service" in f.metadata}
    assert {"points_lps", "detect", "networks", "device", "mask", "threshold", "patient", "nodule_ids"} <= set(service_fields)
    assert set(service_fields.values()) <= params
    req = AnalysisRequest(mode="analyze", ct="a", out="o", detect=True, networks=[], threshold="adaptive", device="cpu")
    kw = req.service_kwargs(analysis.analyze)
    assert kw["detect"] is True and kw["network_ids"] == [] and kw["threshold"] == "adaptive" and kw["points_lps"] is None
    recl = AnalysisRequest(mode="reclassify", ct="a", out="o", masks=["m.nrrd"], nodule_ids=[3], mask="consensus")
    with pytest.raises(ProtocolError, match="'mask' does not apply to a 'reclassify'"):
        recl.service_kwargs(analysis.reclassify)


def test_handle_answers_bad_requests_with_error_events(tmp_path):
    events = []
    end = handle('{"mode": "analyze", "ct": "a.nrrd", "out": "o", "request_id": "x7", "colour": "red"}', events.append)
    assert events == [end] and end.kind == "error" and end.exit_code == 2 and end.request_id == "x7"
    assert "colour" in end.message
    missing = tmp_path / "missing.nrrd"
    end = handle(AnalysisRequest(mode="analyze", ct=str(missing), out=str(tmp_path / "out"), points_lps=[POINT_LPS],
                                 request_id="x8").to_json(), events.append)
    assert end.kind == "error" and end.exit_code == InputError.exit_code and str(missing) in end.message and "\n" not in end.message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_worker_answers_requests_and_cancels(tmp_path):
    """One worker process: a real analysis (progress, then a result whose outputs are complete),
    a bad request and a failing one (error events, the worker lives on), then a cancel."""
    with Runner() as runner:
        out = tmp_path / "run1"
        job = runner.submit(AnalysisRequest(mode="analyze", ct=str(SAMPLE_CT), out=str(out), points_lps=[POINT_LPS],
                                            networks=["lnmsnet"], device="cpu", pictures=False))
        assert job.request.request_id and job.running
        with pytest.raises(RuntimeError, match="busy"):
            runner.submit(AnalysisRequest(mode="analyze", ct=str(SAMPLE_CT), out=str(tmp_path / "x"), points_lps=[POINT_LPS]))
        events = list(job)  # blocks until the terminal event
        assert job.state == "succeeded", (events, job.stderr_lines[-20:])
        *steps, end = events
        fractions = [e.fraction for e in steps if e.kind == "progress"]
        assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
        assert isinstance(end, Result) and end.out == str(out) and end.n_nodules == end.n_found == 1 and end.device == "cpu"
        assert {"labels.nrrd", "nodules.json", "nodules.csv", "segmentation.seg.nrrd"} <= set(end.files)
        record = json.loads((out / "nodules.json").read_text())
        assert record["run"]["networks"] == ["lnmsnet"] and record["nodules"][0]["found"]
        assert record["nodules"][0]["point_lps_mm"] == pytest.approx(POINT_LPS, abs=1e-3)
        (nodule,) = job.load_result().nodules
        assert nodule.mask.sum() > 0 and nodule.volume_mm3 == pytest.approx(record["nodules"][0]["volume_mm3"])
        assert all(e.request_id == job.request.request_id for e in events)
        pid = runner.worker.pid

        bad = runner.submit(AnalysisRequest(mode="reclassify", ct=str(SAMPLE_CT), out=str(tmp_path / "r"),
                                            masks=[str(tmp_path / "m.nrrd")], detect=True))
        end = bad.wait(timeout=60)
        assert isinstance(end, Error) and end.exit_code == 2 and "'detect' does not apply" in end.message
        with pytest.raises(RuntimeError, match="does not apply"):
            bad.load_result()

        outside = runner.submit(AnalysisRequest(mode="analyze", ct=str(SAMPLE_CT), out=str(tmp_path / "o"),
                                                points_lps=[[0.0, 0.0, 500.0]], networks=["lnmsnet"], device="cpu"))
        end = outside.wait(timeout=TIMEOUT_S)
        assert isinstance(end, Error) and end.exit_code == InputError.exit_code and end.error_type == "InputError" \
            and "outside" in end.message
        assert not (tmp_path / "o").exists() and runner.worker.pid == pid and runner.worker.starts == 1

        cancelled = runner.submit(AnalysisRequest(mode="analyze", ct=str(SAMPLE_CT), out=str(tmp_path / "c"),
                                                  points_lps=[POINT_LPS], networks=["lnmsnet"], device="cpu"))
        while not any(e.kind == "progress" for e in cancelled.poll()):
            assert cancelled.running
            time.sleep(0.01)
        t0 = time.monotonic()
        cancelled.cancel()
        assert time.monotonic() - t0 < 6.0 and cancelled.state == "cancelled" and cancelled.terminal is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not (tmp_path / "c").exists()
        # no staging folder left; the folder lock's file may stay (an OS lock: a killed run never holds it)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c")] in ([], [".c.nodulemtl-lock"])

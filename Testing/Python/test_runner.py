"""Background runner of the Slicer module (``NoduleMTLLib.apps.runner``), the progress protocol
(``NoduleMTLLib.core.progress``), device probing and CPU fallback (``NoduleMTLLib.core.device``), the
output reader (``NoduleMTLLib.outputs.files.read_outputs``), the panel's text (``NoduleMTLText``)
and model import (``NoduleMTLLib.models.model_import``), without Qt or Slicer.

The process tests start real child processes (``python -m NoduleMTLLib.apps.cli analyze``) on the
real sample CT shipped in ``Resources/SampleData`` (LIDC-IDRI-0003, cropped) with the sample
points of the README, and compare with a direct ``pipeline.analyze_points`` call.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import NoduleMTLText as panel_text
from NoduleMTLLib.apps import runner
from NoduleMTLLib.apps.runner import AnalysisProcess
from NoduleMTLLib.apps.worker import Worker
from NoduleMTLLib.core import device, progress
from NoduleMTLLib.core.io import InputError, ras_to_lps, read_ct
from NoduleMTLLib.core.progress import ProgressEvent
from NoduleMTLLib.inference.pipeline import analyze_points
from NoduleMTLLib.models import registry
from NoduleMTLLib.models.model_import import ModelImportError, identify_weights_file, import_weights_file
from NoduleMTLLib.outputs.files import OutputsError
from NoduleMTLLib.outputs.files import read_outputs as load_outputs
from NoduleMTLLib.outputs.writer import write_outputs
from NoduleMTLLib.service import analysis

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "LIDC-IDRI-0003_crop.nrrd"
#: Sample points of the README (RAS mm): a ~30 mm nodule and a ~13 mm nodule.
SAMPLE_POINTS_RAS = [(-72.5, -77.2, -190.4), (-23.5, 47.6, -172.3)]
SAMPLE_POINTS_LPS = [ras_to_lps(p) for p in SAMPLE_POINTS_RAS]
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def sample_ct():
    return read_ct(SAMPLE_CT)


@pytest.fixture(scope="module")
def direct_result(sample_ct):
    from NoduleMTLLib.service.analysis import analyze  # the service, as the background run: raw outputs, calibrated, assessed

    return analyze(sample_ct, SAMPLE_POINTS_LPS, network_ids=("lnmsnet",), device="cpu")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    if os.name != "posix":
        return True
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------
# real runs through the child process
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_background_run_matches_direct_analysis(sample_ct, direct_result, tmp_path):
    events: list[ProgressEvent] = []
    proc = AnalysisProcess(sample_ct, SAMPLE_POINTS_LPS, networks=["lnmsnet"], device="cpu", temp_root=tmp_path)
    proc.start()
    assert proc.running and proc.work_dir.is_dir() and (proc.work_dir / "input.nrrd").is_file()
    assert proc.command[1:4] == ["-m", "NoduleMTLLib.apps.cli", "analyze"] and "--progress-format" in proc.command
    state = proc.wait(timeout=RUN_TIMEOUT_S, callback=events.append)
    assert state == "succeeded", proc.details

    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert len(set(fractions)) >= 3, fractions
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), f"progress went backwards: {fractions}"
    assert fractions[0] < 0.1 and fractions[-1] == 1.0
    messages = [e.text for e in events if e.kind == "message"]
    assert any("nodule 2/2" in m for m in messages), messages
    assert proc.progress == 1.0 and proc.returncode == 0 and proc.seconds > 0

    res = proc.result()
    assert res.input["path"] == str(SAMPLE_CT)  # the original CT, not the temporary copy
    assert res.run["device"] == "cpu" and res.run["networks"] == ["lnmsnet"]
    assert len(res.nodules) == len(direct_result.nodules) == 2
    for got, want in zip(res.nodules, direct_result.nodules):
        assert got.found and want.found
        assert got.mask.shape == sample_ct.shape_zyx and got.mask.dtype == bool
        assert np.array_equal(got.mask, want.mask), f"nodule {got.id}: masks differ"
        assert got.diameter_mm == pytest.approx(want.diameter_mm, abs=0.01)
        assert got.volume_mm3 == pytest.approx(want.volume_mm3, abs=0.1)
        assert got.type == want.type
        assert got.point_lps_mm == pytest.approx(want.point_lps_mm, abs=1e-3)
        assert got.networks["lnmsnet"].malignancy_probability == pytest.approx(
            want.networks["lnmsnet"].malignancy_probability, abs=1e-4)
    # the summary and status lines read the loaded result
    assert "Nodule 2" in panel_text.summary_html(res) and "lnmsnet: P(malignant)" in panel_text.summary_html(res)
    assert panel_text.status_text(res, proc.seconds).startswith("Done: 2 of 2 nodule(s) segmented on cpu in ")

    work_dir = proc.work_dir
    proc.cleanup()
    assert not work_dir.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cancel_right_after_start(tmp_path):
    proc = AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, device="cpu", temp_root=tmp_path).start()
    pid, work_dir = proc.pid, proc.work_dir
    t0 = time.monotonic()
    proc.cancel(timeout=5)
    assert time.monotonic() - t0 < 10
    assert proc.state == "cancelled" and proc.finished
    assert _process_gone(pid) and _group_gone(pid)
    assert not work_dir.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="cancelled"):
        proc.result()


@pytest.mark.slow
def test_per_run_child_reclassify_keeps_the_size_correction(sample_ct, direct_result, tmp_path):
    """The one-off child (no persistent worker) gets ``size_corrections`` as ``nodulemtl reclassify
    --result`` and answers as the service with the same corrections: the unchanged mask keeps the
    correction it was reported with (the worker request's field; test_one_answer checks the worker)."""
    from NoduleMTLLib.clinical.lung_rads import size_correction
    from NoduleMTLLib.core.postprocess import measure_nodule
    from NoduleMTLLib.service.analysis import reclassify

    mask = direct_result.nodules[1].mask
    # lnmsnet ships no correction: DSMT-Net's shipped factors with this mask's own axes stand in for
    # "the correction the nodule was reported with" (what the Slicer module reads from the segment tags)
    corr = measure_nodule(mask, sample_ct, size_correction("dsmtnet"))["size_correction"]
    assert corr is not None and corr["long_axis_factor"] != 1.0
    proc = AnalysisProcess(sample_ct, [SAMPLE_POINTS_LPS[1]], networks=["lnmsnet"], device="cpu", temp_root=tmp_path,
                           masks=[mask], nodule_ids=[2], options={"size_corrections": [corr]}).start()
    i = proc.command.index("--result")
    assert proc.command[3] == "reclassify" and proc.command[i + 1] == str(proc.work_dir / runner.SIZE_CORRECTIONS_FILE)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == "succeeded", proc.details
    (got,) = proc.result().nodules
    want = reclassify(sample_ct, [mask], nodule_ids=[2], points_lps=[SAMPLE_POINTS_LPS[1]], network_ids=["lnmsnet"],
                      device="cpu", size_corrections=[corr]).nodules[0]
    assert got.size_correction is not None and got.size_correction["long_axis_factor"] == corr["long_axis_factor"]
    assert got.diameter_mm == pytest.approx(corr["measured_long_axis_mm"] * corr["long_axis_factor"], abs=0.01)
    assert got.to_dict() == want.to_dict()
    proc.cleanup()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cancel_while_the_network_runs(tmp_path):
    """Cancel once the child reports progress (torch imported, weights loading / running)."""
    proc = AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, device="cpu", temp_root=tmp_path).start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.progress == 0.0 and not proc.finished and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.02)
    assert proc.running, f"finished before it could be cancelled: {proc.state} {proc.details}"
    pid, work_dir = proc.pid, proc.work_dir
    proc.cancel(timeout=5)
    assert proc.state == "cancelled"
    assert _process_gone(pid) and _group_gone(pid)
    assert not work_dir.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_point_outside_the_volume_gives_a_readable_error(tmp_path):
    proc = AnalysisProcess(str(SAMPLE_CT), [(0.0, 0.0, 500.0)], device="cpu", temp_root=tmp_path).start()
    assert proc.wait(timeout=RUN_TIMEOUT_S) == "failed"
    assert proc.returncode == InputError.exit_code
    assert "outside" in proc.error_text and "Traceback" not in proc.error_text
    assert not proc.error_text.startswith("nodulemtl:")
    assert "\n" not in proc.error_text
    assert list(tmp_path.iterdir()) == []  # no outputs, no work folder
    with pytest.raises(RuntimeError, match="outside"):
        proc.result()


@pytest.mark.slow
def test_usage_error_is_reported(tmp_path):
    proc = AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, device="tpu", temp_root=tmp_path).start()
    assert proc.wait(timeout=RUN_TIMEOUT_S) == "failed"
    assert proc.returncode == 2
    assert "invalid choice: 'tpu'" in proc.error_text
    assert list(tmp_path.iterdir()) == []


def test_missing_python_executable_leaves_nothing(tmp_path):
    proc = AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, python_executable=str(tmp_path / "no-python"),
                           temp_root=tmp_path)
    with pytest.raises(OSError):
        proc.start()
    assert proc.state == "failed" and list(tmp_path.iterdir()) == []


def test_constructor_checks_arguments():
    with pytest.raises(ValueError, match="No points"):
        AnalysisProcess(str(SAMPLE_CT), [])
    with pytest.raises(ValueError, match="network"):
        AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, networks=" , ")
    with pytest.raises(ValueError, match="finite"):
        AnalysisProcess(str(SAMPLE_CT), [(1.0, float("nan"), 2.0)])
    with pytest.raises(ValueError, match="worker"):  # request fields the per-run child has no argument for
        AnalysisProcess(str(SAMPLE_CT), SAMPLE_POINTS_LPS, options={"pictures": False})
    with pytest.raises(ValueError, match="one per mask"):
        AnalysisProcess(str(SAMPLE_CT), None, masks=[np.ones((1, 1, 1), bool)], options={"size_corrections": [None, None]})
    cmd = runner.build_command("ct.nrrd", "out", masks=["m1.nrrd"], nodule_ids=[3], result_json="sizes.json")
    assert cmd[3] == "reclassify" and cmd[cmd.index("--result") + 1] == "sizes.json"
    with pytest.raises(ValueError, match="re-classification"):
        runner.build_command("ct.nrrd", "out", [(1.5, -2.0, 3.25)], result_json="sizes.json")
    cmd = runner.build_command("ct.nrrd", "out", detect=True, networks="lnmsnet,detguided", device="cuda",
                               python_executable="PythonSlicer")
    assert cmd[:5] == ["PythonSlicer", "-m", "NoduleMTLLib.apps.cli", "analyze", "ct.nrrd"]
    assert "--detect" in cmd and "--point" not in cmd and cmd[cmd.index("--networks") + 1] == "lnmsnet,detguided"
    cmd = runner.build_command("ct.nrrd", "out", [(1.5, -2.0, 3.25)])
    i = cmd.index("--point")
    assert "--lps" in cmd and [float(v) for v in cmd[i + 1:i + 4]] == [1.5, -2.0, 3.25]


@pytest.mark.slow
def test_persistent_worker_runs_again_at_once_cancels_and_restarts(sample_ct, direct_result, tmp_path):
    """One worker for several runs (what the Slicer module keeps): the second run starts
    computing within 1 s of the request, cancel stops it at once and leaves nothing, a
    worker that died is reported clearly and started again at the next run."""
    worker = Worker()

    def job():
        return AnalysisProcess(sample_ct, SAMPLE_POINTS_LPS, networks=["lnmsnet"], device="cpu", temp_root=tmp_path,
                               worker=worker)

    try:
        first = job().start()
        assert first.command[1:3] == ["-m", "NoduleMTLLib.apps.worker"] and first.request.mode == "analyze"
        assert first.wait(timeout=RUN_TIMEOUT_S) == "succeeded", first.details
        for got, want in zip(first.result().nodules, direct_result.nodules):
            assert np.array_equal(got.mask, want.mask)
        first.cleanup()
        pid = worker.pid

        t0 = time.monotonic()  # the request: Apply again on the same volume
        second = job().start()
        first_progress = None
        while not second.finished and time.monotonic() - t0 < RUN_TIMEOUT_S:
            events = second.poll()
            if first_progress is None and any(e.kind == "progress" for e in events):
                first_progress = time.monotonic() - t0
            time.sleep(0.01)
        assert second.state == "succeeded", second.details
        assert worker.pid == pid and worker.starts == 1  # the same process, networks still loaded
        assert first_progress is not None and first_progress < 1.0, first_progress
        second.cleanup()

        # Re-classify from an (edited) mask runs in the same worker too (never in Slicer's GUI thread)

        mask = direct_result.nodules[1].mask
        recl = AnalysisProcess(sample_ct, [SAMPLE_POINTS_LPS[1]], networks=["lnmsnet"], device="cpu", temp_root=tmp_path,
                               worker=worker, masks=[mask], nodule_ids=[2]).start()
        assert recl.request.mode == "reclassify" and recl.wait(timeout=RUN_TIMEOUT_S) == "succeeded", recl.details
        (got,) = recl.result().nodules
        from NoduleMTLLib.service.analysis import reclassify  # the service: raw outputs, calibrated, assessed
        want = reclassify(sample_ct, [mask], nodule_ids=[2], points_lps=[SAMPLE_POINTS_LPS[1]], network_ids=["lnmsnet"],
                          device="cpu").nodules[0]
        assert worker.pid == pid and got.to_dict() == want.to_dict() and np.array_equal(got.mask, mask)
        recl.cleanup()

        third = job().start()  # cancel while the worker computes
        while not any(e.kind == "progress" for e in third.poll()):
            time.sleep(0.01)
        t = time.monotonic()
        third.cancel()
        assert time.monotonic() - t < 6.0 and third.state == "cancelled"
        assert _process_gone(pid) and not third.work_dir.exists()

        fourth = job().start()  # a new worker, no message (a cancel is not a crash)
        assert worker.starts == 2 and fourth.message == ""
        os.kill(worker.pid, signal.SIGKILL)  # the worker crashes (e.g. out of memory)
        assert fourth.wait(timeout=60) == "failed"
        assert "background worker stopped unexpectedly" in fourth.error_text and "SIGKILL" in fourth.error_text
        assert not fourth.work_dir.exists()

        fifth = job().start()  # restarted, with the reason
        events = fifth.poll()
        assert worker.starts == 3 and any("SIGKILL" in e.text and "started again" in e.text for e in events)
        fifth.cancel()
    finally:
        worker.close()


# ---------------------------------------------------------------------------
# load_outputs
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_load_outputs_keeps_overlapping_masks(sample_ct, tmp_path):
    """Two clicks on the same nodule give two overlapping masks: labels.nrrd can hold only
    one of them per voxel, segmentation.seg.nrrd holds both (layers); both come back."""
    nodule_lps = SAMPLE_POINTS_LPS[0]
    second = (nodule_lps[0] + 1.0, nodule_lps[1] - 1.0, nodule_lps[2])
    res = analyze_points(sample_ct, [nodule_lps, second], network_ids=("lnmsnet",), device="cpu")
    assert res.nodules[0].found and res.nodules[1].found
    overlap = res.nodules[0].mask & res.nodules[1].mask
    assert overlap.sum() > 0.5 * res.nodules[1].mask.sum()
    write_outputs(res, sample_ct, tmp_path / "out")
    loaded = load_outputs(tmp_path / "out")
    for got, want in zip(loaded.nodules, res.nodules):
        assert np.array_equal(got.mask, want.mask)
    # without the .seg.nrrd the label map is used: the overlap belongs to nodule 1
    (tmp_path / "out" / "segmentation.seg.nrrd").unlink()
    from_labels = load_outputs(tmp_path / "out")
    assert np.array_equal(from_labels.nodules[0].mask, res.nodules[0].mask)
    assert np.array_equal(from_labels.nodules[1].mask, res.nodules[1].mask & ~res.nodules[0].mask)


@pytest.mark.slow
def test_load_outputs_round_trips_records(direct_result, sample_ct, tmp_path):
    write_outputs(direct_result, sample_ct, tmp_path)
    loaded = load_outputs(tmp_path)
    assert loaded.to_dict()["nodules"] == direct_result.to_dict()["nodules"]
    assert loaded.run == direct_result.run and loaded.input == direct_result.input
    assert np.array_equal(loaded.label_array(sample_ct.shape_zyx), direct_result.label_array(sample_ct.shape_zyx))
    if direct_result.nodules[0].consensus is not None:  # rebuilt as a read-only record of the JSON
        assert loaded.nodules[0].consensus.n_networks == direct_result.nodules[0].consensus.n_networks
    # optional fields of whole-scan results (detection record, run notes) survive too
    import copy
    import dataclasses

    if "detection" in {f.name for f in dataclasses.fields(direct_result.nodules[0])}:
        res = copy.deepcopy(direct_result)
        det = {"detector": "maskrcnn25d", "score": 0.87, "box_ijk": [60, 90, 10, 85, 118, 20]}
        res.nodules[0].detection = det
        res.messages = ["slices are 2.5 mm thick"]
        write_outputs(res, sample_ct, tmp_path / "det")
        loaded = load_outputs(tmp_path / "det")
        assert loaded.nodules[0].detection == det
        assert loaded.messages == ["slices are 2.5 mm thick"]
        text = panel_text.summary_html(loaded)
        assert "detection score 0.87" in text and "slices are 2.5 mm thick" in text


@pytest.mark.slow
def test_load_outputs_errors(direct_result, sample_ct, tmp_path):
    with pytest.raises(OutputsError, match="nodules.json"):
        load_outputs(tmp_path)
    write_outputs(direct_result, sample_ct, tmp_path)
    data = (tmp_path / "nodules.json").read_text()
    (tmp_path / "nodules.json").write_text(data.replace('"size_ijk": [\n      176', '"size_ijk": [\n      177'))
    with pytest.raises(OutputsError, match="size"):
        load_outputs(tmp_path)
    (tmp_path / "nodules.json").write_text("{}")
    with pytest.raises(OutputsError, match="not a NoduleMTL result"):
        load_outputs(tmp_path)


# ---------------------------------------------------------------------------
# CUDA out of memory -> CPU
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cuda_out_of_memory_falls_back_to_cpu(sample_ct, direct_result):
    calls, notes = [], []

    def run(device):
        calls.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return analyze_points(sample_ct, SAMPLE_POINTS_LPS, network_ids=("lnmsnet",), device=device)

    res = device.with_cpu_fallback(run, "cuda", notify=notes.append)
    assert calls == ["cuda", "cpu"]
    assert len(notes) == 1 and "out of memory" in notes[0] and "CPU" in notes[0]
    assert res.run["device"] == "cpu" and res.run["device_requested"] == "cuda" and res.run["fallback"] == notes[0]
    assert np.array_equal(res.nodules[0].mask, direct_result.nodules[0].mask)
    assert "out of memory" in panel_text.status_text(res)


def test_fallback_only_for_out_of_memory():
    def fails(exc):
        def run(device):
            raise exc
        return run

    with pytest.raises(InputError):
        device.with_cpu_fallback(fails(InputError("point outside")), "cuda")
    with pytest.raises(torch.OutOfMemoryError):  # the CPU itself: nothing to fall back to
        device.with_cpu_fallback(fails(torch.OutOfMemoryError("out of memory")), "cpu")
    assert device.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not device.is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------
# protocol lines, error text, panel helpers
# ---------------------------------------------------------------------------

def test_progress_lines_round_trip(capsys):
    cb = progress.LineProgress()
    cb(0.25, "loading lnmsnet")
    cb(0.5, "loading lnmsnet")  # same message: not repeated
    cb(1.7, "done")
    lines = capsys.readouterr().out.splitlines()
    events = [progress.parse_stdout_line(ln) for ln in lines]
    assert [(e.kind, e.fraction, e.text) for e in events] == [
        ("progress", 0.25, ""), ("message", None, "loading lnmsnet"), ("progress", 0.5, ""),
        ("progress", 1.0, ""), ("message", None, "done")]
    assert progress.parse_stdout_line("Nodule 1: 21.3 x 19.7 mm").kind == "output"
    assert progress.parse_stdout_line("<filter-progress>nan</filter-progress>").kind == "output"
    assert progress.parse_stderr_line("nodulemtl: warning: The GPU ran out of memory").text == "The GPU ran out of memory"
    assert progress.parse_stderr_line("UserWarning: something").kind == "log"


def test_error_text_from_stderr():
    assert progress.error_text_from_stderr(["usage: nodulemtl ...", "nodulemtl: error: Point RAS (0, 0, 500) mm lies outside"], 1) \
        == "Point RAS (0, 0, 500) mm lies outside"
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1', "ZeroDivisionError: division by zero"]
    assert progress.error_text_from_stderr(tb, 1) == "ZeroDivisionError: division by zero"
    assert "SIGKILL" in progress.error_text_from_stderr([], -signal.SIGKILL)
    assert "out of memory" in progress.error_text_from_stderr([], -signal.SIGKILL)
    assert "exit code 3" in progress.error_text_from_stderr(["", "  "], 3)


def test_summary_shows_networks_signs_and_consensus():
    result = {"run": {"device": "cuda:0", "timing_s": {"load": 0.5, "total": 2.0}, "fallback": ""},
              "nodules": [
                  {"id": 1, "name": "Nodule 1", "found": True, "diameter_mm": 12.34, "volume_mm3": 500.2, "type": "solid",
                   "networks": {"lnmsnet": {"malignancy_probability": 0.8, "sign_probabilities": {}},
                                "dsmtnet": {"malignancy_probability": 0.4,
                                            "sign_probabilities": {"spiculation": 0.25, "lobulation": 0.6}}},
                   "consensus": {"n_networks": 2, "n_found": 2, "malignancy_probability": 0.6, "probability_spread": 0.4,
                                 "disagreement": "high", "dice_pairwise_min": 0.71, "reasons": ["probability spread 0.40 > 0.3"],
                                 "sign_probabilities": {}}},
                  {"id": 2, "name": "Nodule 2", "found": False, "message": "no nodule <here>", "networks": {}}]}
    text = panel_text.summary_html(result)
    assert "12.3 mm" in text and "solid" in text
    assert "lnmsnet: P(malignant) 80%" in text and "dsmtnet: P(malignant) 40%" in text
    assert "spiculation 25%" in text and "lobulation 60%" in text
    assert "consensus: P(malignant) 60%" in text and "disagreement <b>high</b>" in text and "probability spread 0.40" in text
    assert "no nodule &lt;here&gt;" in text  # escaped
    assert text.rstrip().endswith("</i>")  # disclaimer last
    # a single network: no consensus line
    single = {"nodules": [dict(result["nodules"][0], consensus={"n_networks": 1, "n_found": 1, "malignancy_probability": 0.8})]}
    assert "consensus" not in panel_text.summary_html(single)
    status = panel_text.status_text(result, seconds=3.0)
    assert status == "Done: 1 of 2 nodule(s) segmented on cuda:0 in 3.0 s (analysis 2.0 s, weights 0.5 s)"


def test_parse_ras_text():
    assert panel_text.parse_ras_text("-72.50, -77.20, -190.40") == (-72.5, -77.2, -190.4)
    assert panel_text.parse_ras_text("1 2 3") == (1.0, 2.0, 3.0)
    for bad in ("", "1, 2", "a, b, c", "1, 2, inf"):
        with pytest.raises(ValueError):
            panel_text.parse_ras_text(bad)


def test_device_choices():
    names = device.device_choices()
    assert names[:3] == ["auto", "cpu", "cuda"]
    assert ("mps" in names) == bool(torch.backends.mps.is_available())

    class FakeMps:  # what torch reports on Apple Silicon
        @staticmethod
        def is_available():
            return True

    class FakeTorch:
        class backends:
            mps = FakeMps

    assert device.device_choices(FakeTorch) == ["auto", "cpu", "cuda", "mps"]
    assert "auto" in device.device_tooltip()


def test_network_choices_follow_the_registry():
    choices = analysis.network_choices()
    detectors = dict(getattr(registry, "DETECTORS", {}))
    assert [c.network_id for c in choices] == list(registry.NETWORKS) + [d for d in detectors if d not in registry.NETWORKS]
    by_id = {c.network_id: c for c in choices}
    assert by_id["lnmsnet"].available and not by_id["lnmsnet"].detection
    assert all(by_id[d].detection for d in detectors)
    assert not any(by_id[n].detection for n in registry.NETWORKS)
    for c in choices:
        weights_file = (registry.NETWORKS.get(c.network_id) or detectors[c.network_id]).weights_file
        expected = any((d / weights_file).is_file() for d in registry.weights_search_path())
        assert c.available == expected, c
        if not c.available:
            assert weights_file in c.reason
    ok, reason = analysis.detector_status()
    detector = [c for c in choices if c.detection]
    assert ok == bool(detector and any(c.available for c in detector)), reason
    assert reason
    assert analysis.split_networks(" lnmsnet, ,detguided,lnmsnet ") == ["lnmsnet", "detguided"]


# ---------------------------------------------------------------------------
# model import (real shipped weights copied to a temporary cache)
# ---------------------------------------------------------------------------

@pytest.fixture()
def temp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "NoduleMTL" / "weights"


def test_import_real_weights_into_the_cache(tmp_path, temp_cache):
    shipped = registry.resources_dir() / "Weights" / "detguided.safetensors"
    picked = tmp_path / "downloads" / "my copy.safetensors"
    picked.parent.mkdir()
    shutil.copyfile(shipped, picked)
    assert registry.cache_dir() == temp_cache

    network_id, dest = import_weights_file(picked)
    assert network_id == "detguided"
    assert dest == temp_cache / "detguided.safetensors"
    assert dest.read_bytes() == shipped.read_bytes()
    assert [p.name for p in temp_cache.iterdir()] == ["detguided.safetensors"]  # no temporary file left
    registry.verify_weights("detguided", dest)
    model = registry.build_network("detguided")
    assert registry.load_weights_into(model, dest) == dest  # the imported file loads into the network
    # importing again is a no-op
    mtime = dest.stat().st_mtime_ns
    assert import_weights_file(picked) == ("detguided", dest)
    assert dest.stat().st_mtime_ns == mtime


def test_import_refuses_files_not_in_the_manifest(tmp_path, temp_cache):
    shipped = registry.resources_dir() / "Weights" / "detguided.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    data = bytearray(shipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ModelImportError, match="different sha256"):
        import_weights_file(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[:1000]))
    with pytest.raises(ModelImportError, match="matches no network.*lnmsnet"):
        import_weights_file(truncated)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(ModelImportError, match="not a weights file"):
        import_weights_file(other)
    with pytest.raises(ModelImportError, match="not found"):
        import_weights_file(tmp_path / "missing.safetensors")
    with pytest.raises(ModelImportError, match="manifest"):
        identify_weights_file(corrupt, manifest={})
    assert not temp_cache.exists() or list(temp_cache.iterdir()) == []


def test_import_into_an_unwritable_cache(tmp_path):
    shipped = registry.resources_dir() / "Weights" / "detguided.safetensors"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelImportError, match="Cannot write"):
        import_weights_file(shipped, cache=blocker / "weights")


# ---------------------------------------------------------------------------
# The module's Logic (NoduleMTL/NoduleMTL.py) on a real slicer-core scene
# ---------------------------------------------------------------------------

@pytest.fixture()
def module_under_test(monkeypatch, tmp_path):
    """NoduleMTL.py imported in plain Python: only the GUI base classes it inherits
    (ScriptedLoadableModule*, parameterNodeWrapper, the ``qt`` module, absent from the
    slicer-core wheel) are replaced by empty stand-ins; the Logic runs against the real
    MRML scene.  ``slicer.app`` gives the temporary folder; the child runs in this Python."""
    import importlib.util
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *args, **kwargs: None}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path), slicerHome=str(tmp_path)),
                        raising=False)
    spec = importlib.util.spec_from_file_location("NoduleMTL_under_test", REPO / "NoduleMTL" / "NoduleMTL.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.NoduleMTLLogic, "pythonExecutable", staticmethod(lambda: sys.executable))
    yield module
    module.NoduleMTLLogic.stopBackgroundWorker()


@pytest.mark.slow
def test_module_logic_background_run_on_a_real_scene(module_under_test, tmp_path):
    import vtk
    from test_mrml import _write_share_folder, build_app_scene, load_volume_from_file

    import NoduleMTLMRML

    errors = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(errors)
    app = build_app_scene(_write_share_folder(tmp_path / "share"))
    scene = app.scene
    volume = load_volume_from_file(scene, SAMPLE_CT, "CT")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule points")
    for ras in SAMPLE_POINTS_RAS:
        points.AddControlPoint(vtk.vtkVector3d(*ras))
    logic = module_under_test.NoduleMTLLogic()

    def segmentation_nodes():
        return scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()

    # cancel right after the start: nothing added to the scene, no folder left
    nodes_before = scene.GetNumberOfNodes()
    job = logic.startAnalysis(volume, points, networks="lnmsnet", device="cpu")
    assert job.running and job.command[0] == sys.executable
    job.cancel()
    assert job.state == "cancelled" and _process_gone(job.pid) and not job.work_dir.exists()
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finishAnalysis(job, volume)
    assert scene.GetNumberOfNodes() == nodes_before
    # Find nodules with a fixed score threshold (the panel's spin box; 0 = adaptive): passed to the child
    job = logic.startAnalysis(volume, None, networks="lnmsnet", device="cpu", detect=True, detectionThreshold=0.5)
    try:
        assert job.request.detect and job.request.threshold == 0.5 and not job.request.pictures
    finally:
        job.cancel()
    job = logic.startAnalysis(volume, None, networks="lnmsnet", device="cpu", detect=True, detectionThreshold=0.0)
    try:
        assert job.request.detect and job.request.threshold == "default"  # 0: the service's default
    finally:
        job.cancel()
    with pytest.raises(ValueError, match="threshold"):
        logic.startAnalysis(volume, None, networks="lnmsnet", device="cpu", detect=True, detectionThreshold=1.5)
    assert scene.GetNumberOfNodes() == nodes_before

    # background run (what Apply does), then the synchronous path (scripts, the self-test)
    job = logic.process(volume, points, networks=("lnmsnet",), device="cpu", waitForCompletion=False)
    assert scene.GetNumberOfNodes() == nodes_before  # nothing added while it runs
    assert job.wait(timeout=RUN_TIMEOUT_S) == "succeeded", job.details
    segmentation, table, result = logic.finishAnalysis(job, volume)
    assert not job.work_dir.exists() and logic.lastRunSeconds > 0
    assert segmentation_nodes() == 1 and table.GetNumberOfRows() == 2
    _, _, direct = logic.process(volume, points, networks="lnmsnet", device="cpu")
    assert segmentation_nodes() == 2  # a new segmentation each run, never an existing one changed
    for nodule, want in zip(result.nodules, direct.nodules):
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(nodule.name)
        on_grid = NoduleMTLMRML.label_array_from_segmentation(segmentation, segment_id, volume)
        assert np.array_equal(on_grid, want.mask) and np.array_equal(nodule.mask, want.mask)

    # results table: row -> nodule centre, row -> segment
    Logic = module_under_test.NoduleMTLLogic
    assert Logic.tableRowFromViewRow(table, 0) == 0 and Logic.tableRowFromViewRow(table, 2) is None
    for row, ras in enumerate(SAMPLE_POINTS_RAS):
        center = Logic.noduleCenterRAS(table, row)
        assert np.linalg.norm(np.subtract(center, ras)) < 10.0, (row, center, ras)
    ids = Logic.noduleSegmentIds(segmentation, table, 1)
    assert ids == [segmentation.GetSegmentation().GetSegmentIdBySegmentName("Nodule 2")]
    assert len(Logic.noduleSegmentIds(segmentation)) == 2
    assert "Nodule 2" in Logic.summaryHtml(result) and Logic.statusText(result, 1.0).startswith("Done: 2 of 2")
    assert [c.network_id for c in Logic.networkChoices()][:1] == ["lnmsnet"]
    assert Logic.deviceChoices()[:3] == ["auto", "cpu", "cuda"]
    assert "ERROR:" not in errors.GetOutput(), errors.GetOutput()
    scene.Clear(1)

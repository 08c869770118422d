"""``nodulemtl review`` in a real headless Chromium (Playwright for Python, Debian's /usr/bin/chromium).

The test starts the server itself on a free 127.0.0.1 port (a child process, stopped at the end)
and drives the page as a reviewer would, on the sample CT (LIDC-IDRI-0003 crop, see below):

1. go to the ~30 mm nodule, pick the click tool and click it in the axial view at the page
   position computed from the axial slice node's XY-to-RAS matrix (no hard-coded pixels);
   its row appears, and its long axis is within 5 % of ``nodulemtl analyze`` at the same point
   (run beside the server while it starts);
2. click the ~13 mm nodule the same way;
3. keyboard: ``p`` back to the first finding, ``a`` accepts it, ``n`` ``r`` rejects the second;
4. erase part of the first outline with the erase effect (mouse clicks), re-classify: the volume drops;
5. export: the DICOM SEG and SR, the seg.nrrd, CSV and report hold only the accepted
   finding; nodules.json holds both with their statuses, labels.nrrd both (to reopen the review);
6. a file outside the allowed folders and a bad file give a message in the page, the server goes on;
7. Find nodules shows a progress bar and is cancelled.

The CT is the sample written as a CT DICOM series (voxel-identical, ``test_review_state.write_sample_dicom``)
so that the export's DICOM SEG / SR are exercised on a clean clone.

Screenshots are written to ``Testing/artifacts/review/`` (test artefacts).  Skips only when
Chromium, Playwright or trame-slicer are absent.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "Testing" / "artifacts" / "review"
NODULE_30MM_RAS = (-72.5, -77.2, -190.4)
NODULE_13MM_RAS = (-23.5, 47.6, -172.3)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium not installed at {CHROMIUM}")]
sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright not installed")
pytest.importorskip("trame_slicer", reason="trame-slicer not installed (review dependency group)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("review")
    from test_review_state import write_sample_dicom

    ct_folder = write_sample_dicom(work / "ct_dicom")  # the sample as a DICOM series: the export writes SEG and SR
    reference = _start_reference(ct_folder, work)
    port = _free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "NoduleMTLLib.apps.cli", "review", str(ct_folder), "--port", str(port),
                             "--allow", str(work), "--device", "cpu"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("review server did not start:\n" + (work / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "work": work, "log": work / "server.log", "ct": ct_folder, "reference": reference}
    finally:
        if reference[0].poll() is None:
            reference[0].kill()
            reference[0].wait()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _state(page, key):
    return page.evaluate(f"window.trame.state.get({json.dumps(key)})")


def _wait(page, predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        err = _state(page, "error")
        if err:
            pytest.fail(f"page error while waiting for {what}: {err}")
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}; message: {_state(page, 'message')!r}")


def _axial_page_position(page, ras) -> tuple[float, float]:
    """Page (CSS pixel) position of a RAS point in the axial view, from the slice node's XY-to-RAS."""
    info = page.evaluate("window.trame.trigger('nodulemtl_view_info', ['Red'])")
    xy_to_ras = np.array(info["xy_to_ras"], float).reshape(4, 4)
    x, y, z, _ = np.linalg.solve(xy_to_ras, np.array([*ras, 1.0]))
    assert abs(z) < 0.5, f"the axial slice does not hold {ras} (slice offset z = {z:.2f})"
    w, h = info["size"]
    box = page.locator("img.image-display-area").first.bounding_box()  # the axial view comes first in the layout
    assert 0 <= x < w and 0 <= y < h, (x, y, w, h)
    return box["x"] + x * box["width"] / w, box["y"] + (h - y) * box["height"] / h  # XY origin is bottom-left


def _go_to(page, ras):
    page.locator("#nm-goto").fill(" ".join(str(v) for v in ras))
    page.locator("#nm-goto-btn").click()
    time.sleep(0.8)


def _rows(page):
    return _state(page, "findings") or []


def _start_reference(ct, tmp) -> tuple[subprocess.Popen, Path]:
    """``nodulemtl analyze`` at the 30 mm nodule with the app's default network (runs beside the server)."""
    from NoduleMTLLib.models.registry import DEFAULT_NETWORK

    out = tmp / "reference"
    cmd = [sys.executable, "-m", "NoduleMTLLib.apps.cli", "analyze", str(ct), "--point", *[repr(v) for v in NODULE_30MM_RAS],
           "--networks", DEFAULT_NETWORK, "--device", "cpu", "--out", str(out), "--quiet", "--no-pictures"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def _reference_long_axis(server) -> float:
    proc, out = server["reference"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    [nodule] = json.loads((out / "nodules.json").read_text())["nodules"]
    return float(nodule["diameter_mm"])


def test_review_in_chromium(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lap = lambda what: print(f"{time.monotonic() - t0:6.1f} s  {what}")  # timings with pytest -s
    work = server["work"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(server["url"])
            page.wait_for_selector("img.image-display-area", timeout=60_000)
            _wait(page, lambda: _state(page, "ct_name"), "the CT to be shown")

            # 1. the ~30 mm nodule, clicked in the axial view
            _go_to(page, NODULE_30MM_RAS)
            page.locator("#nm-tool-click").click()
            page.mouse.click(*_axial_page_position(page, NODULE_30MM_RAS))
            rows = _wait(page, lambda: _rows(page) if len(_rows(page)) == 1 else None, "the first finding's row", 240)
            first = rows[0]
            assert page.locator("#nm-findings tbody tr").count() == 1
            lap("first finding")
            # the click lands on the page position of NODULE_30MM_RAS: the same point within a pixel
            assert np.linalg.norm(np.subtract(first["point_ras"][:2], NODULE_30MM_RAS[:2])) < 0.5, first["point_ras"]
            reference = _reference_long_axis(server)
            assert abs(first["long_mm"] - reference) <= 0.05 * reference, (first["long_mm"], reference)

            lap("first finding + reference")
            # 2. the ~13 mm nodule
            _go_to(page, NODULE_13MM_RAS)
            page.mouse.click(*_axial_page_position(page, NODULE_13MM_RAS))
            rows = _wait(page, lambda: _rows(page) if len(_rows(page)) == 2 else None, "the second finding's row")
            assert rows[1]["long_mm"] < rows[0]["long_mm"]
            page.screenshot(path=str(ARTIFACTS / "01_two_findings.png"))

            lap("second finding")
            # 3. keyboard review (the page's focus must not be in a text field)
            page.locator("#nm-tool-navigate").click()
            page.locator("#nm-ct-name").click()
            page.keyboard.press("p")  # back to finding 1 (finding 2 was selected when it was added)
            _wait(page, lambda: _state(page, "current") == 1, "finding 1 to be selected")
            page.keyboard.press("a")
            page.keyboard.press("n")
            page.keyboard.press("r")
            _wait(page, lambda: [r["status"] for r in _rows(page)] == ["accepted", "rejected"], "statuses from the keyboard")
            page.keyboard.press("z")
            _wait(page, lambda: [r["status"] for r in _rows(page)] == ["accepted", "undecided"], "undo")
            page.keyboard.press("y")
            _wait(page, lambda: [r["status"] for r in _rows(page)] == ["accepted", "rejected"], "redo")
            page.keyboard.press("?")
            page.wait_for_selector("#nm-help-card", timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "02_help.png"))
            page.keyboard.press("Escape")

            lap("keyboard")
            # 4. erase part of the first outline, then re-classify
            page.locator("#nm-findings tbody tr").first.click()
            _wait(page, lambda: _state(page, "current") == 1, "finding 1 selected by its row")
            time.sleep(0.8)
            centre = np.array(_rows(page)[0]["point_ras"], float)
            _go_to(page, centre)
            volume_before = _rows(page)[0]["volume_mm3"]
            page.locator("#nm-tool-erase").click()
            time.sleep(0.5)
            for offset in ((0.0, 0.0, 0.0), (-3.0, 0.0, 0.0), (3.0, 0.0, 0.0)):  # three 8 mm brush dabs in its core
                page.mouse.click(*_axial_page_position(page, centre + offset))
                time.sleep(0.4)
            time.sleep(0.5)
            page.locator("#nm-reclassify").click()
            _wait(page, lambda: "re-classified" in (_state(page, "message") or ""), "the re-classification", 180)
            volume_after = _rows(page)[0]["volume_mm3"]
            assert volume_after < volume_before, (volume_before, volume_after)
            page.screenshot(path=str(ARTIFACTS / "03_erased_reclassified.png"))

            lap("erase + re-classify")
            # 5. export
            out = work / "export"
            page.locator("#nm-export-path").fill(str(out))
            page.locator("#nm-export").click()
            _wait(page, lambda: _state(page, "exported"), "the export", 120)
            page.screenshot(path=str(ARTIFACTS / "04_exported.png"))

            lap("export")
            # 6. safety: files outside the allowed folders and bad files give a message; the server keeps running
            (work / "not_a_ct.nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n")
            for path, expected in (("/etc/passwd", "outside the folders"), ("../../etc/passwd", "outside the folders"),
                                   (str(work / "not_a_ct.nrrd"), "Cannot open")):
                page.evaluate("window.trame.state.set('error', '')")
                page.locator("#nm-open-path").fill(path)
                page.locator("#nm-open").click()
                deadline = time.monotonic() + 30
                while expected not in (_state(page, "error") or "") and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert expected in (_state(page, "error") or ""), (path, _state(page, "error"))
                assert page.locator("#nm-error").is_visible()
            assert len(_rows(page)) == 2 and _state(page, "ct_name").startswith("ct_dicom")  # still the open CT

            # 7. Find nodules shows its progress and can be cancelled
            page.evaluate("window.trame.state.set('error', '')")
            page.locator("#nm-find").click()
            _wait(page, lambda: _state(page, "busy") and page.locator("#nm-progress").is_visible(), "Find nodules to run", 60)
            page.locator("#nm-cancel").click()
            _wait(page, lambda: not _state(page, "busy") and _state(page, "message") == "Cancelled", "the cancel", 60)
            assert len(_rows(page)) == 2
        finally:
            browser.close()

    rows = list(csv.DictReader((out / "nodules.csv").open()))
    assert [r["id"] for r in rows] == ["1"]
    assert float(rows[0]["volume_mm3"]) == pytest.approx(volume_after, rel=0.01)
    data = json.loads((out / "nodules.json").read_text())
    assert [(d["id"], d["review_status"]) for d in data["nodules"]] == [(1, "accepted"), (2, "rejected")]
    import SimpleITK as sitk
    import slicerio

    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["Nodule 1"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))  # every finding (reopens the review)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    report = (out / "report.html").read_text()
    assert "Nodule 1" in report and "Nodule 2" not in report
    import highdicom as hd

    dicom_seg = hd.seg.segread(out / "segmentation.dcm")
    assert [s.SegmentLabel for s in dicom_seg.SegmentSequence] == ["Nodule 1"]
    sr = hd.sr.srread(out / "report.sr.dcm")
    groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1

"""``nodulemtl pacs`` against a real Orthanc with its DICOMweb plugin (Debian packages ``orthanc``,
``orthanc-dicomweb``; installed by ``.ci/run``): query / retrieve the A0002 DICOM series, analyse,
store the DICOM SEG + SR back, read them back with highdicom; a second run adds nothing; a study
holding only an MR series is skipped; the archive stopped in the middle of a run gives a one-line
error and the next run completes.  The tests skip only when Orthanc or its plugin is not installed."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from NoduleMTLLib.apps import cli, pacs

USER, PASSWORD = "nodulemtl", "test-password-1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)


def _dicomweb_plugin() -> str | None:
    for pattern in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*", "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A real Orthanc on 127.0.0.1 (free HTTP port, DICOM server off, DICOMweb plugin, HTTP basic
    login ``USER``/``PASSWORD``, storage in ``folder``); :meth:`stop` and :meth:`start` again keep the data."""

    def __init__(self, binary: str, plugin: str, folder: Path):
        self.binary, self.folder = binary, folder
        self.port = _free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "NoduleMTL test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.port, "RemoteAccessAllowed": False, "DicomServerEnabled": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }))
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.proc = None

    def rest(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        req.add_header("Authorization", "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def start(self):
        self.log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if "dicom-web" in self.rest("/plugins"):
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                time.sleep(0.2)
        tail = (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"Orthanc did not start on port {self.port}: {tail}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def count_instances(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary, plugin = _orthanc_binary(), _dicomweb_plugin()
    if binary is None or plugin is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc(binary, plugin, tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch):
    for k in (pacs.ENV_TOKEN, pacs.ENV_AUTH_FILE):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(pacs.ENV_USER, USER)
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)


def _client(orthanc):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(orthanc.url, session=pacs.make_session(("basic", (USER, PASSWORD))))


def _a0002_files(shared_data) -> list[str]:
    return sorted(glob.glob(str(shared_data / "whole_ct" / "lung_pet_ct_dx_A0002_dicom" / "*.dcm")))


def _copy_series(files, modality: str | None = None) -> list:
    """The instances of ``files`` as a new study / series (new UIDs); ``modality="MR"`` rewrites
    them as MR images (Modality and SOP class)."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
            ds.SeriesDescription = "T1 rewritten from CT for a test"
        out.append(ds)
    return out


def _tumour_lps(shared_data, files) -> tuple[float, float, float]:
    """LPS centre of A0002's reference tumour box on its middle boxed slice (as test_batch.py)."""
    import SimpleITK as sitk

    boxes = {int(r["slice_index_k"]): tuple(int(r[c]) for c in ("xmin_i", "ymin_j", "xmax_i", "ymax_j"))
             for r in csv.DictReader(open(shared_data / "whole_ct" / "lung_pet_ct_dx_boxes.csv"))
             if r["volume"] == "lung_pet_ct_dx_A0002_dicom"}
    k = sorted(boxes)[len(boxes) // 2]
    x0, y0, x1, y1 = boxes[k]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(Path(files[0]).parent)))
    img = reader.Execute()
    return img.TransformContinuousIndexToPhysicalPoint(((x0 + x1) / 2, (y0 + y1) / 2, k))


def _summary(out: Path) -> dict[str, dict]:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert list(rows[0]) == list(pacs.SUMMARY_COLUMNS)
    return {r["study"]: r for r in rows}


def _series_by_modality(client, study) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in client.search_for_series(study):
        out.setdefault(s["00080060"]["Value"][0], []).append(s["0020000E"]["Value"][0])
    return out


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("nodulemtl: error:")]


# ---------------------------------------------------------------- round trip


@pytest.mark.slow
def test_store_round_trip_rerun_and_non_ct_study(orthanc, credentials, shared_data, tmp_path, capsys):
    import highdicom as hd
    import pydicom

    files = _a0002_files(shared_data)
    client = _client(orthanc)
    ct = [pydicom.dcmread(f) for f in files]
    study, ct_series = ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID
    client.store_instances(ct)
    mr = _copy_series(files[:3], modality="MR")
    client.store_instances(mr)
    mr_study = mr[0].StudyInstanceUID
    p = _tumour_lps(shared_data, files)
    points = tmp_path / "points.csv"
    points.write_text(f"case,x,y,z,frame\n{study},{p[0]},{p[1]},{p[2]},LPS\n")
    before = orthanc.count_instances()

    out = tmp_path / "out"
    args = ["pacs", "--url", orthanc.url, "--study", study, mr_study, "1.2.3.4.5.6.7.999", "--points", str(points),
            "--out", str(out), "--store", "--device", "cpu"]
    assert cli.main(args) == 1  # the unknown study fails; the others do not
    err = capsys.readouterr().err
    assert "series #3 " in err and ct_series in err and "the only CT series that fits the rule" in err  # says why
    s = _summary(out)
    assert list(s) == [study, mr_study, "1.2.3.4.5.6.7.999"]
    a = s[study]
    assert (a["status"], a["series"], a["n_nodules"], a["n_found"], a["stored"]) == ("ok", ct_series, "1", "1", "SEG+SR")
    assert a["lung_rads"] == json.loads((out / study / "nodules.json").read_text())["run"]["lung_rads"]["category"] != ""
    assert s[mr_study]["status"] == "skipped" and s[mr_study]["message"] == "no CT series (modalities MR)"
    assert s["1.2.3.4.5.6.7.999"]["status"] == "failed" and "not found in the archive" in s["1.2.3.4.5.6.7.999"]["message"]
    assert _error_lines(err) == ["nodulemtl: error: study 1.2.3.4.5.6.7.999: not found in the archive (no series)"]

    # the archive holds the SEG and the SR, referencing the CT; highdicom reads them back
    assert orthanc.count_instances() == before + 2
    by_mod = _series_by_modality(client, study)
    assert sorted(by_mod) == ["CT", "SEG", "SR"] and len(by_mod["SEG"]) == len(by_mod["SR"]) == 1
    seg_ds = client.retrieve_series(study, by_mod["SEG"][0])[0]
    sr_ds = client.retrieve_series(study, by_mod["SR"][0])[0]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series
    assert [str(x.SegmentLabel) for x in seg.SegmentSequence] == ["Nodule 1"]
    assert seg.SOPInstanceUID == pydicom.dcmread(out / study / "segmentation.dcm").SOPInstanceUID
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    evidence = {r.SeriesInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence for r in e.ReferencedSeriesSequence}
    assert evidence == {ct_series, seg.SeriesInstanceUID}
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert pacs.Archive(orthanc.url, pacs.make_session(("basic", (USER, PASSWORD)))).find_own_sr(study, ct_series) \
        == sr.SOPInstanceUID

    # a second run (by date, into a new folder) finds its SR in the archive and adds nothing
    out2 = tmp_path / "out2"
    assert cli.main(["pacs", "--url", orthanc.url, "--since", "1900-01-01", "--points", str(points), "--out", str(out2),
                     "--store", "--device", "cpu", "--quiet"]) == 0
    s2 = _summary(out2)
    assert set(s2) == {study, mr_study}
    assert s2[study]["status"] == "done-before" and sr.SOPInstanceUID in s2[study]["message"]
    assert s2[mr_study]["status"] == "skipped"
    assert orthanc.count_instances() == before + 2
    assert not (out2 / study).exists()  # nothing retrieved or analysed


# ---------------------------------------------------------------- interruption


@pytest.mark.slow
def test_archive_stopped_mid_run_then_next_run_completes(orthanc, credentials, shared_data, tmp_path, capsys):
    """Whole-scan search (--detect, the only such test) on a copy of A0002 under new UIDs; the archive
    is stopped after the analysis, before the store: one-line error naming the study; restarted,
    the same command resumes from the study's outputs and stores the SEG + SR."""
    copy = _copy_series(_a0002_files(shared_data))
    client = _client(orthanc)
    client.store_instances(copy)
    study, series = copy[0].StudyInstanceUID, copy[0].SeriesInstanceUID
    before = orthanc.count_instances()
    out = tmp_path / "out"
    argv = ["pacs", "--url", orthanc.url, "--study", study, "--detect", "--out", str(out), "--store", "--device", "cpu",
            "--quiet", "--no-pictures"]
    stages = []

    def stop_after_analysis(st, stage):
        stages.append(stage)
        if stage == "analysed":
            orthanc.stop()

    try:
        rc = pacs.main(cli.build_parser().parse_args(argv), on_stage=stop_after_analysis)
        err = capsys.readouterr().err
        assert rc == pacs.PacsError.exit_code and stages == ["selected", "retrieved", "analysed"]
        (line,) = _error_lines(err)
        assert line.startswith(f"nodulemtl: error: study {study}: cannot reach {orthanc.url}") and "refused" in line
        assert _summary(out)[study]["status"] == "failed"
        assert (out / study / "segmentation.dcm").is_file()  # the analysis is kept for the next run
    finally:
        orthanc.start()
    assert orthanc.count_instances() == before  # nothing stored
    assert cli.main(argv) == 0
    row = _summary(out)[study]
    assert (row["status"], row["stored"]) == ("ok", "SEG+SR") and "reused" in row["message"]
    assert int(row["n_found"]) >= 1
    assert orthanc.count_instances() == before + 2
    assert pacs.Archive(orthanc.url, pacs.make_session(("basic", (USER, PASSWORD)))).find_own_sr(study, series)


# ---------------------------------------------------------------- credentials, transport, selection


def test_refused_login_and_insecure_warning(orthanc, tmp_path, monkeypatch, capsys):
    for k in (pacs.ENV_TOKEN, pacs.ENV_USER, pacs.ENV_PASSWORD, pacs.ENV_AUTH_FILE):
        monkeypatch.delenv(k, raising=False)
    auth = tmp_path / "auth.txt"
    auth.write_text(f"{USER}:wrong\n")
    auth.chmod(0o600)
    rc = cli.main(["pacs", "--url", orthanc.url, "--study", "1.2.3", "--detect", "--out", str(tmp_path / "o"),
                   "--auth-file", str(auth), "--insecure"])
    err = capsys.readouterr().err
    assert rc == pacs.PacsError.exit_code and "--insecure" in err and "not verified" in err
    assert _error_lines(err) == [f"nodulemtl: error: study 1.2.3: {orthanc.url} refused the credentials (query series): HTTP 401"]
    # the right password from the file: the study is simply not there
    auth.write_text(f"# test\n{USER}:{PASSWORD}\n")
    assert cli.main(["pacs", "--url", orthanc.url, "--study", "1.2.3", "--detect", "--out", str(tmp_path / "o"),
                     "--auth-file", str(auth), "--quiet"]) == 1
    assert _summary(tmp_path / "o")["1.2.3"]["message"] == "not found in the archive (no series)"


def test_credentials_never_on_the_command_line(tmp_path, monkeypatch, capsys):
    rc = cli.main(["pacs", "--url", "http://user:pw@127.0.0.1:1/dicom-web", "--study", "1.2", "--detect",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "must not hold credentials" in capsys.readouterr().err
    env = {pacs.ENV_TOKEN: "abc"}
    assert pacs.load_credentials(env=env) == ("bearer", "abc")
    assert pacs.load_credentials(env={pacs.ENV_USER: "u", pacs.ENV_PASSWORD: "p:q"}) == ("basic", ("u", "p:q"))
    f = tmp_path / "token"
    f.write_text("Bearer xyz\n")
    f.chmod(0o644)
    assert pacs.load_credentials(f, env={}) == ("bearer", "xyz")
    assert "readable by other users" in capsys.readouterr().err
    with pytest.raises(pacs.UsageError, match="first line"):
        f.write_text("nothing\n")
        pacs.load_credentials(f, env={})


def test_unreachable_archive_is_one_line(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    rc = cli.main(["pacs", "--url", f"http://127.0.0.1:{port}/dicom-web", "--study", "1.2.3", "--detect",
                   "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == pacs.PacsError.exit_code
    assert _error_lines(err) == [f"nodulemtl: error: study 1.2.3: cannot reach http://127.0.0.1:{port}/dicom-web "
                                 "(query series): connection refused"]


def test_series_selection_rule():
    S = pacs.SeriesInfo
    scout = S("1", "CT", 1, "scout", 3, 1.0, "B30f", localizer=True, rejected="localizer")
    thick = S("2", "CT", 2, "5 mm", 60, 5.0, "B30f")
    thin_bone = S("3", "CT", 3, "1 mm bone", 300, 1.0, "BONEPLUS")
    thin_lung = S("4", "CT", 4, "1.25 mm lung", 240, 1.25, "LUNG")
    pet = S("5", "PT", 5, "PET")
    chosen, why = pacs.select_series([scout, thick, thin_bone, thin_lung, pet])
    assert chosen is thin_lung and "1 (localizer)" in why and "5 (PT)" in why
    chosen, why = pacs.select_series([scout, thin_bone, pet])
    assert chosen is thin_bone and "bone kernel" in why
    assert pacs.select_series([pet]) == (None, "no CT series (modalities PT)")
    assert pacs.select_series([scout])[0] is None

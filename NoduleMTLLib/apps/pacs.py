"""``nodulemtl pacs``: the batch from and to a PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

    nodulemtl pacs --url URL (--study UID [UID ...] | --since YYYY-MM-DD) [--points CSV] [--detect]
                   --out DIR [--store] [--force] [--auth-file FILE] [--insecure] [--ca-bundle FILE]
                   [--min-slices 20] [--networks dsmtnet] [--device auto] [--threshold default]

Per study (in the order given, or by study date for ``--since``):

1. **Query** (QIDO-RS): the study's series; for each CT series, its instances' metadata (WADO-RS).
2. **Select** one CT series by :data:`SELECTION_RULE` (:func:`select_series`); the choice and its
   reason are printed.  A study without a usable CT series is ``skipped`` with the reason.
3. **Idempotence**: the study is ``done-before`` when the archive already holds a NoduleMTL SR
   (series description :data:`NoduleMTLLib.outputs.dicom_sr.SR_SERIES_DESCRIPTION`, manufacturer
   ``NoduleMTL``) whose evidence references the selected series (:meth:`Archive.find_own_sr`);
   ``--force`` analyses it again (and stores a new SEG + SR).
4. **Retrieve** the series (WADO-RS) into a temporary folder (removed afterwards) and run the
   **same per-case code as** ``nodulemtl batch`` (:meth:`NoduleMTLLib.apps.batch.BatchRun.run_case`, the
   analysis service :func:`NoduleMTLLib.service.analysis.analyze`) into ``DIR/<StudyInstanceUID>/``, with the
   DICOM SEG and SR (:mod:`NoduleMTLLib.outputs.dicom_seg`, :mod:`NoduleMTLLib.outputs.dicom_sr`) referencing the
   source series.  Points come from ``--points`` (the batch CSV ``case,x,y,z[,frame]`` with the
   StudyInstanceUID as ``case``); with ``--detect`` a study without points is searched with the
   whole-scan detector, without it such a study is ``skipped``.  When ``DIR/<study>/`` already holds
   the outputs of an earlier (e.g. interrupted) run for the same series, they are reused.
5. With ``--store``: the SEG and the SR are sent in ONE STOW-RS request (so the archive never holds
   one without the other from a run).  A study with no nodule found has no SEG/SR: nothing is stored.

``DIR/summary.csv`` (:data:`SUMMARY_COLUMNS`; one row per study) is rewritten atomically after
every study: ``ok``, ``done-before``, ``skipped`` or ``failed`` with the one-line reason; studies
not reached yet are ``pending``.  A study that fails for its own reason (bad series, analysis
error) does not stop the run; an unreachable archive, a refused login (HTTP 401/403) or a TLS
failure stops it with a one-line error naming the study; the next run resumes.

Credentials never go on the command line (:func:`load_credentials`): ``NODULEMTL_PACS_TOKEN``
(bearer token), or ``NODULEMTL_PACS_USER`` + ``NODULEMTL_PACS_PASSWORD`` (HTTP basic), or a file
(``--auth-file`` or ``NODULEMTL_PACS_AUTH_FILE``) whose first line is ``Bearer TOKEN`` or
``user:password``.  TLS certificates are verified unless ``--insecure`` (a warning is printed).

Exit code: 0 when no study failed, 1 when one failed or the run stopped, 2 usage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Columns of DIR/summary.csv (one row per study).
SUMMARY_COLUMNS = ("study", "series", "status", "n_nodules", "n_found", "lung_rads", "stored", "seconds", "message")
SUMMARY_FILE = "summary.csv"
#: Default minimum number of slices (instances) of a series to analyse.
MIN_SLICES = 20
#: Largest angle (degrees) between the slice normal and the patient's head-foot axis of an "axial" series.
AXIAL_TOLERANCE_DEG = 10.0
#: Convolution kernel names taken as bone kernels (vendor names: GE BONE, BONEPLUS, EDGE; Canon/Toshiba FC30/FC31
#: bone; Philips D/E/Y-sharp are not recognised and count as soft tissue / lung).
BONE_KERNEL = re.compile(r"BONE|EDGE|^FC3[01]$", re.IGNORECASE)
SELECTION_RULE = (f"a CT series that is not a localizer, axial (slice normal within "
                  f"{AXIAL_TOLERANCE_DEG:g} deg of head-foot), with at least --min-slices slices; among these a "
                  "soft-tissue or lung kernel before a bone kernel, then the thinnest slices, then the most slices, "
                  "then the lowest series number")

#: Attempts per DICOMweb request (connection errors and HTTP 408/429/503/504), with 1 s, 2 s, ... between them.
RETRIES = 3

ENV_TOKEN = "NODULEMTL_PACS_TOKEN"
ENV_USER = "NODULEMTL_PACS_USER"
ENV_PASSWORD = "NODULEMTL_PACS_PASSWORD"
ENV_AUTH_FILE = "NODULEMTL_PACS_AUTH_FILE"

# DICOM JSON tags
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _SERIES_DESC, _SERIES_NUMBER = "00080060", "0008103E", "00200011"
_IMAGE_TYPE, _SLICE_THICKNESS, _KERNEL, _IOP, _IPP = "00080008", "00180050", "00181210", "00200037", "00200032"
_MANUFACTURER, _EVIDENCE, _REF_SERIES, _STUDY_DATE = "00080070", "0040A375", "00081115", "00080020"


from ..core.errors import NoduleMTLError, PacsError, StudyError, UsageError  # noqa: E402,F401 - defined in errors.py


def _one_line(e: BaseException | str) -> str:
    s = " ".join(str(e).split())
    return s or type(e).__name__


def _value(item: dict, tag: str, default=None):
    """First value of a DICOM JSON attribute (PN as its Alphabetic string), or ``default``."""
    v = (item.get(tag) or {}).get("Value")
    if not v:
        return default
    x = v[0]
    return x.get("Alphabetic", default) if isinstance(x, dict) and "Alphabetic" in x else x


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


# ---------------------------------------------------------------- credentials and transport


def load_credentials(auth_file: str | os.PathLike | None = None, env=None) -> tuple[str, object] | None:
    """The archive credentials: ``("bearer", token)``, ``("basic", (user, password))`` or None.

    Order: ``auth_file`` (else ``$NODULEMTL_PACS_AUTH_FILE``), then ``$NODULEMTL_PACS_TOKEN``, then
    ``$NODULEMTL_PACS_USER`` + ``$NODULEMTL_PACS_PASSWORD``.  The file's first non-blank line not
    starting with ``#`` is ``Bearer TOKEN`` or ``user:password``; a file readable by group or others
    gets a warning.

    Raises:
        UsageError: unreadable or malformed file, a user without a password.
    """
    env = os.environ if env is None else env
    path = auth_file or env.get(ENV_AUTH_FILE)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
            mode = Path(path).stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"Cannot read the credentials file {path}: {getattr(e, 'strerror', None) or e}") from None
        if os.name == "posix" and mode & 0o077:
            print(f"nodulemtl: warning: credentials file {path} is readable by other users (chmod 600 it)",
                  file=sys.stderr)
        line = next((s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")), "")
        if line.lower().startswith("bearer "):
            return "bearer", line[7:].strip()
        if ":" in line and line.split(":", 1)[0]:
            user, pw = line.split(":", 1)
            return "basic", (user, pw)
        raise UsageError(f"Credentials file {path}: the first line must be 'Bearer TOKEN' or 'user:password'")
    if env.get(ENV_TOKEN):
        return "bearer", env[ENV_TOKEN].strip()
    if env.get(ENV_USER):
        if ENV_PASSWORD not in env:
            raise UsageError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
        return "basic", (env[ENV_USER], env[ENV_PASSWORD])
    return None


def make_session(credentials=None, insecure: bool = False, ca_bundle: str | None = None):
    """A ``requests.Session`` with the credentials and TLS settings (verification on unless ``insecure``)."""
    import requests

    s = requests.Session()
    if credentials:
        kind, value = credentials
        if kind == "bearer":
            s.headers["Authorization"] = f"Bearer {value}"
        else:
            s.auth = tuple(value)
    s.verify = False if insecure else (ca_bundle or True)
    if insecure:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # warned once, by main()
    return s


def check_url(url: str) -> str:
    """``url`` without a trailing slash.  Raises UsageError for a non-http(s) URL or one with credentials."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"--url must be an http:// or https:// DICOMweb root, not {url!r}")
    if u.username or u.password:
        raise UsageError(f"--url must not hold credentials (they would show in the process list); use "
                         f"{ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --auth-file")
    return url.rstrip("/")


class Archive:
    """A DICOMweb archive (``dicomweb_client.DICOMwebClient``) whose errors become one-line
    :class:`PacsError` (stop the run) or :class:`StudyError` (this study only)."""

    def __init__(self, url: str, session=None, timeout: float = 60.0):
        from dicomweb_client.api import DICOMwebClient

        self.url = url
        self.client = DICOMwebClient(url, session=session, timeout=timeout)
        # a failed request (connection error, HTTP 429/408/503/504) is tried RETRIES times in all, waiting 1 s, 2 s, ...
        self.client.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=500)

    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as e:
            raise PacsError(f"TLS failure with {self.url} ({what}): {_one_line(e)[:200]} "
                            "(give --ca-bundle, or --insecure to skip verification)") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            reason = "timed out" if isinstance(e, requests.exceptions.Timeout) else "connection failed"
            inner = str(e)
            if "Connection refused" in inner:
                reason = "connection refused"
            elif "Name or service not known" in inner or "nodename nor servname" in inner:
                reason = "unknown host"
            raise PacsError(f"cannot reach {self.url} ({what}): {reason}") from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code in (401, 403):
                raise PacsError(f"{self.url} refused the credentials ({what}): HTTP {code}") from None
            if code == 404:
                raise StudyError(f"not found in the archive ({what}: HTTP 404)") from None
            raise StudyError(f"the archive answered HTTP {code} ({what})") from None

    def studies_since(self, date: str) -> list[str]:
        """StudyInstanceUIDs of studies with StudyDate >= ``date`` (``YYYYMMDD``), by date then UID."""
        found = self._call("query studies", self.client.search_for_studies,
                           search_filters={"StudyDate": f"{date}-"}, get_remaining=True)
        rows = sorted((str(_value(s, _STUDY_DATE, "")), str(_value(s, _STUDY_UID, ""))) for s in found)
        return [uid for _, uid in rows if uid]

    def series(self, study: str) -> list[dict]:
        """QIDO-RS series of a study (DICOM JSON).  Raises StudyError when the study is not in the archive."""
        found = self._call("query series", self.client.search_for_series, study, get_remaining=True,
                           fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "Manufacturer"])
        if not found:
            raise StudyError("not found in the archive (no series)")
        return found

    def series_metadata(self, study: str, series: str) -> list[dict]:
        return self._call("read series metadata", self.client.retrieve_series_metadata, study, series)

    def retrieve_series(self, study: str, series: str, folder: Path) -> int:
        """WADO-RS: write every instance of the series to ``folder`` (``0001.dcm`` ...); returns the count."""
        folder.mkdir(parents=True, exist_ok=True)

        def fetch():
            n = 0
            for n, ds in enumerate(self.client.iter_series(study, series), start=1):
                ds.save_as(str(folder / f"{n:05d}.dcm"), enforce_file_format=True)
            return n

        return self._call("retrieve series", fetch)

    def find_own_sr(self, study: str, source_series: str) -> str | None:
        """SOPInstanceUID of a NoduleMTL SR in ``study`` whose evidence holds ``source_series``, or None.

        Own SR: series description :data:`NoduleMTLLib.outputs.dicom_sr.SR_SERIES_DESCRIPTION`, modality SR,
        manufacturer ``NoduleMTL``; its Current Requested Procedure Evidence Sequence names the series.
        """
        from ..outputs.dicom_sr import SR_SERIES_DESCRIPTION

        for s in self.series(study):
            if _value(s, _MODALITY) != "SR" or str(_value(s, _SERIES_DESC, "")).strip() != SR_SERIES_DESCRIPTION:
                continue
            for inst in self.series_metadata(study, str(_value(s, _SERIES_UID))):
                if str(_value(inst, _MANUFACTURER, "")) != "NoduleMTL":
                    continue
                refs = {str(_value(r, _SERIES_UID)) for ev in _values(inst, _EVIDENCE)
                        for r in _values(ev, _REF_SERIES)}
                if source_series in refs:
                    return str(_value(inst, _SOP_UID))
        return None

    def store(self, datasets: list) -> None:
        """STOW-RS of ``datasets`` in one request.  Raises StudyError when the archive refuses any of them."""
        resp = self._call("store SEG and SR", self.client.store_instances, datasets)
        failed = getattr(resp, "FailedSOPSequence", None) if resp is not None else None
        if failed:
            reasons = ", ".join(f"{getattr(f, 'ReferencedSOPInstanceUID', '?')} reason {getattr(f, 'FailureReason', '?')}"
                                for f in failed)
            raise StudyError(f"the archive refused {len(failed)} instance(s): {reasons}")


# ---------------------------------------------------------------- series selection


@dataclass
class SeriesInfo:
    """What the selection rule looks at for one series (from QIDO-RS and, for CT, WADO-RS metadata)."""

    uid: str
    modality: str
    number: int | None = None
    description: str = ""
    n_slices: int = 0
    thickness_mm: float | None = None
    kernel: str = ""
    localizer: bool = False
    axial: bool | None = None
    #: why the series is not usable ("" when it is)
    rejected: str = ""

    @property
    def bone(self) -> bool:
        return bool(self.kernel and BONE_KERNEL.search(self.kernel.strip()))

    def label(self) -> str:
        num = f"#{self.number} " if self.number is not None else ""
        desc = f'"{self.description}" ' if self.description else ""
        thick = f", {self.thickness_mm:g} mm" if self.thickness_mm is not None else ""
        kern = f", kernel {self.kernel}" if self.kernel else ""
        return f"series {num}{desc}{self.uid} ({self.modality}, {self.n_slices} slices{thick}{kern})"


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def describe_ct_series(qido: dict, metadata: list[dict], min_slices: int = MIN_SLICES) -> SeriesInfo:
    """A CT series' :class:`SeriesInfo` from its QIDO-RS record and its instances' metadata (DICOM JSON)."""
    import numpy as np

    num = _value(qido, _SERIES_NUMBER)
    info = SeriesInfo(uid=str(_value(qido, _SERIES_UID)), modality="CT", number=int(num) if num is not None else None,
                      description=str(_value(qido, _SERIES_DESC, "") or "").strip())
    images = [m for m in metadata if _values(m, _IOP) and _values(m, _IPP)]
    types = {str(t).upper() for m in metadata for t in _values(m, _IMAGE_TYPE)}
    info.localizer = "LOCALIZER" in types or (bool(metadata) and not images)
    info.n_slices = len(images)
    th = sorted(t for t in (_float(_value(m, _SLICE_THICKNESS)) for m in images) if t is not None and t > 0)
    info.thickness_mm = th[len(th) // 2] if th else None
    kernels = [str(_value(m, _KERNEL, "") or "").strip() for m in images]
    info.kernel = max(set(kernels), key=kernels.count) if kernels else ""
    if info.localizer:
        info.rejected = "localizer"
        return info
    normals = []
    for m in images:
        iop = [_float(v) for v in _values(m, _IOP)]
        if len(iop) == 6 and None not in iop:
            n = np.cross(iop[:3], iop[3:])
            if np.linalg.norm(n) > 0:
                normals.append(n / np.linalg.norm(n))
    if not normals:
        info.rejected = "no image orientation"
        return info
    cos_tol = math.cos(math.radians(AXIAL_TOLERANCE_DEG))
    info.axial = all(abs(n[2]) >= cos_tol for n in normals)
    if not info.axial:
        info.rejected = "not axial"
    elif info.n_slices < min_slices:
        info.rejected = f"{info.n_slices} slices (< {min_slices})"
    if info.thickness_mm is None and len(images) > 1:  # no SliceThickness: the median spacing of the positions
        z = sorted(float(np.dot(normals[0], [_float(v) or 0.0 for v in _values(m, _IPP)])) for m in images)
        gaps = [b - a for a, b in zip(z, z[1:]) if b - a > 1e-3]
        info.thickness_mm = float(np.median(gaps)) if gaps else None
    return info


def select_series(infos: list[SeriesInfo]) -> tuple[SeriesInfo | None, str]:
    """The series to analyse by :data:`SELECTION_RULE`, and the reason (printed, and the summary's
    message of a skipped study).  Returns ``(None, reason)`` when no series qualifies."""
    usable = [s for s in infos if s.modality == "CT" and not s.rejected]
    others = [s for s in infos if s not in usable]
    why_not = ", ".join(f"{s.uid} ({s.rejected or s.modality})" for s in others)
    if not usable:
        mods = sorted({s.modality for s in infos})
        if "CT" not in mods:
            return None, f"no CT series (modalities {', '.join(mods) or 'none'})"
        return None, "no CT series fits the selection rule (" + why_not + ")"

    def key(s: SeriesInfo):
        return (s.bone, s.thickness_mm if s.thickness_mm is not None else math.inf, -s.n_slices,
                s.number if s.number is not None else 1 << 30, s.uid)

    best = min(usable, key=key)
    why = ("the only CT series that fits the rule" if len(usable) == 1 else
           f"the first by the rule of {len(usable)} axial CT series with enough slices")
    if best.bone:
        why += " (a bone kernel: no soft-tissue/lung kernel series fits)"
    if others:
        why += f"; not used: {why_not}"
    return best, why


# ---------------------------------------------------------------- the run


@dataclass
class StudyResult:
    """One row of summary.csv."""

    study: str
    series: str = ""
    status: str = "pending"
    n_nodules: int | str = ""
    n_found: int | str = ""
    lung_rads: str = ""
    stored: str = ""
    seconds: float | str = ""
    message: str = ""

    def row(self) -> dict:
        from .batch import summary_row

        return summary_row(self, SUMMARY_COLUMNS)


def write_summary(path: Path, rows: list[StudyResult]) -> None:
    """Write the per-study summary.csv atomically (:func:`NoduleMTLLib.apps.batch.write_summary`)."""
    from .batch import write_summary as write_rows

    write_rows(path, rows, SUMMARY_COLUMNS)


def _read_local(folder: Path, r: StudyResult) -> None:
    """Nodule counts and per-scan Lung-RADS of ``folder/nodules.json`` into ``r`` (when readable)."""
    from ..core.filenames import JSON_FILE

    try:
        js = json.loads((folder / JSON_FILE).read_text())
        nods = js["nodules"]
        r.n_nodules, r.n_found = len(nods), sum(bool(n.get("found")) for n in nods)
        r.lung_rads = str(((js.get("run") or {}).get("lung_rads") or {}).get("category") or "")
    except (OSError, ValueError, KeyError, TypeError):
        pass


def _seg_source_series(seg_path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(str(seg_path), stop_before_pixels=True)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:  # noqa: BLE001 - unreadable: treated as absent
        return None


@dataclass
class PacsRun:
    """``nodulemtl pacs`` over ``studies`` (see module docstring); :meth:`run` returns one
    :class:`StudyResult` per study.  ``batch``: the :class:`NoduleMTLLib.apps.batch.BatchRun` whose
    ``run_case`` analyses each retrieved series (its ``out_dir`` is ``out_dir``)."""

    archive: Archive
    studies: list[str]
    out_dir: Path
    batch: object
    store: bool = False
    force: bool = False
    detect: bool = False
    min_slices: int = MIN_SLICES
    say: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    #: called with (study, stage) at "selected", "retrieved", "analysed", "stored" (tests stop the archive there)
    on_stage: Callable[[str, str], None] | None = None

    def _stage(self, study, stage):
        if self.on_stage:
            self.on_stage(study, stage)

    def select(self, study: str) -> tuple[SeriesInfo | None, str]:
        infos = []
        for s in self.archive.series(study):
            mod = str(_value(s, _MODALITY, "") or "")
            if mod == "CT":
                infos.append(describe_ct_series(s, self.archive.series_metadata(study, str(_value(s, _SERIES_UID))),
                                                self.min_slices))
            else:
                n = _value(s, _SERIES_NUMBER)
                infos.append(SeriesInfo(uid=str(_value(s, _SERIES_UID)), modality=mod or "?",
                                        number=int(n) if n is not None else None,
                                        description=str(_value(s, _SERIES_DESC, "") or "")))
        return select_series(infos)

    def run_study(self, study: str) -> StudyResult:
        """One study (module docstring, steps 1-5).  StudyError -> failed/skipped row; PacsError propagates."""
        from ..core.device import DeviceError
        from ..core.safe_output import case_dir, safe_case_name
        from ..models.registry import WeightsError
        from ..outputs.dicom_seg import SEG_FILE
        from ..outputs.dicom_sr import SR_FILE
        from ..outputs.files import OutputError
        from .batch import Case, case_done

        r = StudyResult(study)
        t0 = time.perf_counter()
        try:
            chosen, why = self.select(study)
            if chosen is None:
                r.status, r.message = "skipped", why
                return r
            r.series = chosen.uid
            self.say(f"study {study}: {chosen.label()}: {why}")
            self._stage(study, "selected")
            if not self.force:
                sr = self.archive.find_own_sr(study, chosen.uid)
                if sr:
                    r.status, r.message = "done-before", f"NoduleMTL SR {sr} already in the archive (--force to redo)"
                    _read_local(self.out_dir / safe_case_name(study), r)
                    return r
            name = safe_case_name(study)
            folder = case_dir(self.out_dir, name)
            pts = self.batch.points.get(name) or self.batch.points.get(study) or []
            reuse = (case_done(folder) and not self.force and
                     (not (folder / SEG_FILE).is_file() or _seg_source_series(folder / SEG_FILE) == chosen.uid))
            if not pts and not self.detect and not reuse:
                r.status, r.message = "skipped", "no points for this study in --points (add --detect to search the whole scan)"
                return r
            if reuse:
                _read_local(folder, r)
                notes = [f"outputs of an earlier run in {folder} reused"]
            else:
                with tempfile.TemporaryDirectory(prefix="nodulemtl-pacs-") as tmp:
                    src = Path(tmp) / name
                    n = self.archive.retrieve_series(study, chosen.uid, src)
                    self._stage(study, "retrieved")
                    self.say(f"study {study}: retrieved {n} instances; analysing")
                    self.batch.overwrite = self.force or case_done(folder)  # a stale folder (other series) is redone
                    cr = self.batch.run_case(Case(name, src, study))
                if cr.status != "ok":
                    r.status, r.message = cr.status, cr.message
                    r.seconds = time.perf_counter() - t0
                    return r
                _read_local(folder, r)
                notes = [cr.message] if cr.message else []
            self._stage(study, "analysed")
            seg, sr = folder / SEG_FILE, folder / SR_FILE
            if self.store:
                if seg.is_file() and sr.is_file():
                    import pydicom

                    self.archive.store([pydicom.dcmread(str(seg)), pydicom.dcmread(str(sr))])
                    r.stored = "SEG+SR"
                    self._stage(study, "stored")
                else:
                    notes.append("no nodule found: no SEG/SR to store")
            r.status = "ok"
            r.message = " ".join("; ".join(notes).split())
        except PacsError:
            raise  # not a problem of this study: stops the run
        except (WeightsError, DeviceError):
            raise  # as in batch: stops the run
        except (StudyError, OutputError) as e:
            r.status, r.message = "failed", _one_line(e)
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable instance; a bad study must not stop the run
            log.warning("study %s: unexpected error", study, exc_info=True)
            r.status, r.message = "failed", _one_line(e)
        r.seconds = time.perf_counter() - t0
        return r

    def run(self, on_study: Callable[[StudyResult], None] | None = None) -> tuple[list[StudyResult], PacsError | None]:
        """Every study in order, rewriting summary.csv after each, under the output folder's lock.
        Returns the rows and the error that stopped the run (None when it ran to the end)."""
        from ..core.safe_output import locked_output_root

        summary = self.out_dir / SUMMARY_FILE
        rows = [StudyResult(s) for s in self.studies]
        with locked_output_root(self.out_dir, stale=(f".{SUMMARY_FILE}.*.tmp",)):
            write_summary(summary, rows)
            for i, study in enumerate(self.studies):
                try:
                    rows[i] = self.run_study(study)
                except PacsError as e:
                    rows[i] = StudyResult(study, status="failed", message=_one_line(e))
                    write_summary(summary, rows)
                    e.study = study
                    return rows, e
                write_summary(summary, rows)
                if on_study:
                    on_study(rows[i])
        return rows, None


# ---------------------------------------------------------------- command line


def add_parser(sub) -> None:
    """Register ``nodulemtl pacs`` on the subparsers of :func:`NoduleMTLLib.apps.cli.build_parser`."""
    from ..core.device import DEVICE_CHOICES
    from ..core.safe_output import out_dir_arg
    from ..models.registry import DEFAULT_NETWORKS

    p = sub.add_parser("pacs", help="query/retrieve CT studies from a DICOMweb archive, analyse them as batch, store SEG+SR",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://localhost:8042/dicom-web (no credentials "
                                                f"in it: use {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --auth-file)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", nargs="+", action="extend", metavar="UID", help="StudyInstanceUID(s) to analyse")
    which.add_argument("--since", metavar="YYYY-MM-DD", help="every study with a StudyDate on or after this day")
    p.add_argument("--points", help="CSV case,x,y,z[,frame] with the StudyInstanceUID as case (mm, RAS unless LPS)")
    p.add_argument("--lps", action="store_true", help="points without a frame are LPS (DICOM/ITK) instead of RAS")
    p.add_argument("--detect", action="store_true", help="search the whole scan of studies without points")
    p.add_argument("--out", required=True, type=out_dir_arg, help="output folder: <StudyInstanceUID>/ per study and summary.csv")
    p.add_argument("--store", action="store_true", help="store the DICOM SEG and SR in the archive (STOW-RS)")
    p.add_argument("--force", action="store_true", help="analyse (and store) again studies with an earlier NoduleMTL SR")
    p.add_argument("--auth-file", help=f"file whose first line is 'Bearer TOKEN' or 'user:password' (else ${ENV_TOKEN}, "
                                       f"${ENV_USER} + ${ENV_PASSWORD})")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate (warns)")
    p.add_argument("--ca-bundle", help="CA certificates (PEM) to verify the server with")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the archive per request (default 60)")
    p.add_argument("--min-slices", type=int, default=MIN_SLICES, help=f"fewest slices of a series to analyse (default {MIN_SLICES})")
    p.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                   help=f"comma-separated network ids (default {','.join(DEFAULT_NETWORKS)})")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto: CUDA if present)")
    from .options import threshold_arg
    p.add_argument("--threshold", default="default", type=threshold_arg,
                   help="--detect: 'default' (operating point), 'adaptive' or a minimum score in [0, 1]")
    p.add_argument("--no-pictures", action="store_true", help="no pictures/nodule_<id>.png in the study folders")
    p.add_argument("--quiet", action="store_true", help="no per-study messages")


def _since(text: str) -> str:
    import datetime

    try:
        return datetime.date.fromisoformat(text).strftime("%Y%m%d")
    except ValueError:
        raise UsageError(f"--since must be a date YYYY-MM-DD, not {text!r}") from None


def main(args, on_stage=None) -> int:
    """Handler of ``nodulemtl pacs``; returns the exit code.  ``on_stage``: see :attr:`PacsRun.on_stage`."""
    from types import SimpleNamespace

    from ..core.safe_output import check_out_dir
    from ..models.registry import check_network_ids
    from ..service.analysis import split_networks
    from .batch import BatchError, BatchRun, read_points_csv

    def err(msg):
        print(f"nodulemtl: error: {_one_line(msg)}", file=sys.stderr)

    try:
        url = check_url(args.url)
        since = _since(args.since) if args.since else None
        if not args.points and not args.detect:
            raise UsageError("give --points CSV and/or --detect (whole-scan search)")
        creds = load_credentials(args.auth_file)
    except UsageError as e:
        err(e)
        return e.exit_code
    if args.insecure:
        print(f"nodulemtl: warning: --insecure: the TLS certificate of {url} is not verified", file=sys.stderr)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.out)
    try:
        check_out_dir(out, [], overwrite=True)
        points = read_points_csv(args.points, lps=args.lps) if args.points else {}
        nets = tuple(split_networks(args.networks))
        check_network_ids(nets, allow_empty=False, error=BatchError)
        archive = Archive(url, make_session(creds, args.insecure, args.ca_bundle), timeout=args.timeout)
        studies = list(dict.fromkeys(args.study)) if args.study else archive.studies_since(since)
        if since:
            say(f"{len(studies)} studies since {args.since}")
        unused = [k for k in points if k not in studies]
        if unused:
            print(f"nodulemtl: warning: points for studies not in this run ignored: {', '.join(unused)}", file=sys.stderr)
        options = SimpleNamespace(dicom_sr=True, no_pictures=args.no_pictures)
        batch = BatchRun([], out, points, nets, args.device, overwrite=False, dicom_seg=True,
                         threshold=args.threshold, report_options=options)
        say(f"series selection: {SELECTION_RULE}")
        run = PacsRun(archive, studies, out, batch, store=args.store, force=args.force, detect=args.detect,
                      min_slices=args.min_slices, say=say, on_stage=on_stage)

        def on_study(r):
            say(f"study {r.study}: {r.status}" + (f": {r.message}" if r.message else ""))

        rows, stopped = run.run(on_study)
    except NoduleMTLError as e:  # PacsError before any study (--since query), bad points/networks/output folder...
        err(e)
        return e.exit_code
    if stopped is not None:
        err(f"study {stopped.study}: {stopped}")  # a PacsError part-way: exit code 17
        print(f"nodulemtl: the run stopped; {sum(r.status == 'pending' for r in rows)} studies not reached; "
              f"run the same command again to resume -> {out / SUMMARY_FILE}", file=sys.stderr)
        return stopped.exit_code
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "done-before", "skipped", "failed")}
    for r in rows:
        if r.status == "failed":
            print(f"nodulemtl: error: study {r.study}: {r.message}", file=sys.stderr)
    stored = sum(r.stored == "SEG+SR" for r in rows)
    print(f"{len(rows)} studies: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f"; SEG+SR stored for {stored}" if args.store else "") + f" -> {out / SUMMARY_FILE}")
    return 1 if counts["failed"] else 0

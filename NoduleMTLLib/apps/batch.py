"""``nodulemtl batch``: the click path over many CTs, one output folder per case.

    nodulemtl batch INPUT_DIR_OR_LIST --out DIR [--points POINTS_CSV] [--lps]
                    [--networks dsmtnet] [--device auto] [--overwrite] [--quiet]
                    [--workers N | --scheduler tcp://HOST:8786]

Cases
    * INPUT is a folder: every CT file in it or below it (``.nrrd``, ``.nii``, ``.nii.gz``,
      ``.mha``, ``.mhd``) is one case, and every sub-folder that holds a DICOM series is one
      case (a folder without a series is searched further).  Hidden entries are ignored, and so
      are label maps / segmentations recognised by their name (``*_labels.nrrd``,
      ``*.seg.nrrd``, ``*_mask.nii.gz``; see :data:`ANNOTATION_WORDS`).
    * INPUT is any other file: a text list, one path per line (file or DICOM folder);
      blank lines and lines starting with ``#`` are ignored; relative paths are relative
      to the list file's folder.  A listed path that does not exist is a failed case.

Case names (the output sub-folder and the ``case`` key of the points CSV)
    The file name without its CT extension (``LIDC-IDRI-0003_crop.nrrd`` ->
    ``LIDC-IDRI-0003_crop``), or the DICOM folder's name.  When several inputs give the
    same name (e.g. ``a/ct.nrrd`` and ``b/ct.nrrd``) each is prefixed with its parent
    folder's name (``a_ct``, ``b_ct``); names that still clash get ``_2``, ``_3``, ... in
    input order.  Inputs are sorted by path, so names are stable between runs.

Points CSV
    Header ``case,x,y,z`` and optionally ``frame`` (``RAS`` or ``LPS``) or ``lps``
    (1/true/yes); world millimetres, RAS (as 3D Slicer shows them) unless the row says
    LPS or ``--lps`` is given.  One row per nodule.  ``case`` is the case name or the input
    path as listed.  A case without points is searched with the whole-scan detector
    (:func:`NoduleMTLLib.service.analysis.analyze` with ``detect=True``: the default operating point of the
    two-stage search - detector and false-positive reduction - or ``--threshold``) and each found
    nodule is classified with ``--networks``; when the detector's weights are not installed such
    a case is recorded ``skipped`` (:func:`NoduleMTLLib.service.analysis.detector_status`).

Outputs
    ``DIR/<case>/`` holds the four files of ``nodulemtl analyze``
    (:data:`NoduleMTLLib.outputs.files.OUTPUT_FILES`, written all-or-nothing).
    ``DIR/summary.csv`` (:data:`SUMMARY_COLUMNS`) is rewritten atomically after every
    case: status ``ok`` (message: the run's notes, e.g. "120 nodules above the score
    threshold ...; the 100 highest-scoring are reported", and nodules not found), ``failed``
    (message = the one-line reason), ``skipped`` or
    ``done-before`` (the case folder already held all four outputs; recomputed only with
    ``--overwrite``); while the run goes on, cases not reached yet are listed as ``pending``.
    A failed case never stops the run.

Cluster
    ``--workers N`` (N > 1) or ``--scheduler ADDRESS`` runs each case as one Dask task on a local or
    remote cluster, with the same outputs, summary and resume rule (:mod:`NoduleMTLLib.apps.cluster`,
    ``docs/cluster.md``).  Progress: a bar over cases and one status line per finished case.

Exit code: 0 when no case failed, 1 when at least one failed or the run could not start
(unwritable output folder, bad points CSV, missing weights, unavailable device), 2 usage.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import DEFAULT_NETWORKS
from ..core.filenames import JSON_FILE
from ..core.safe_output import safe_case_name

log = logging.getLogger(__name__)

#: File name endings read as one CT each (lower case).
CT_EXTENSIONS = (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd")
#: Columns of DIR/summary.csv.
SUMMARY_COLUMNS = ("case", "input", "status", "n_nodules", "n_found", "seconds", "message")
SUMMARY_FILE = "summary.csv"
#: Suffixes of files that are never part of a DICOM series (a folder of only these is not scanned by GDCM).
NOT_DICOM = (".csv", ".txt", ".json", ".md", ".raw", ".zraw", ".png", ".jpg", ".xml", ".py")
#: A CT-extension file whose name (without extension) ends in one of these words, after
#: "_", "-" or ".", is an annotation, not a case (e.g. ``nodules_labels.nrrd``, ``ct.seg.nrrd``).
ANNOTATION_WORDS = ("label", "labels", "labelmap", "mask", "masks", "seg", "segmentation")


from ..core.errors import BatchError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


@dataclass
class Case:
    """One input of a batch: ``name`` (output sub-folder), ``path`` (file or DICOM folder),
    ``listed`` (the path as written in the list file, or the path)."""

    name: str
    path: Path
    listed: str = ""


@dataclass
class CaseResult:
    """One row of summary.csv."""

    case: str
    input: str
    status: str
    n_nodules: int | str = ""
    n_found: int | str = ""
    seconds: float | str = ""
    message: str = ""

    def row(self) -> dict:
        return summary_row(self, SUMMARY_COLUMNS)


def summary_row(record, columns) -> dict:
    """``record``'s attributes named by ``columns`` as one summary.csv row (seconds to 2 decimals);
    shared by ``nodulemtl batch`` and ``nodulemtl pacs``."""
    d = {k: getattr(record, k) for k in columns}
    if isinstance(d.get("seconds"), float):
        d["seconds"] = f"{d['seconds']:.2f}"
    return d


# ---------------------------------------------------------------- finding cases


def ct_stem(path: Path) -> str | None:
    """File name without its CT extension, or None if the name has none of :data:`CT_EXTENSIONS`."""
    low = path.name.lower()
    for ext in CT_EXTENSIONS:
        if low.endswith(ext) and len(low) > len(ext):
            return path.name[: -len(ext)]
    return None


def is_annotation(path: Path) -> bool:
    """True for a label map / segmentation file by its name (see :data:`ANNOTATION_WORDS`)."""
    import re

    stem = (ct_stem(path) or path.name).lower()
    return bool(re.search(r"(^|[_\-.])(" + "|".join(ANNOTATION_WORDS) + r")$", stem))


def _hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__pycache__"


def holds_dicom_series(folder: Path) -> bool:
    """True if GDCM finds at least one DICOM series directly in ``folder``."""
    import SimpleITK as sitk

    if not any(f.is_file() and ct_stem(f) is None and f.suffix.lower() not in NOT_DICOM for f in folder.iterdir()):
        return False
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns "No Series were found" otherwise
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)


def scan_folder(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """CT files and DICOM series folders in or below ``folder`` (sorted, hidden entries and
    the folders in ``exclude`` skipped).  Each real path is visited once: a symbolic link loop
    (``loop/a -> .``) or several links to the same file or folder give one case."""
    excl = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    seen = {Path(folder).resolve()}

    def walk(d: Path):
        for p in sorted(d.iterdir(), key=lambda q: q.name):
            real = p.resolve()
            if _hidden(p) or real in excl or real in seen:
                continue
            seen.add(real)
            if p.is_dir():
                if holds_dicom_series(p):
                    found.append(p)
                else:
                    walk(p)
            elif p.is_file() and ct_stem(p) is not None and not is_annotation(p):
                found.append(p)

    walk(folder)
    return found


def read_list(list_file: Path) -> list[tuple[str, Path]]:
    """(line as written, path) for each entry of a list file; relative paths are taken
    from the list file's folder.  Raises BatchError if the file cannot be read."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"Cannot read input list {list_file}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        p = Path(os.path.expanduser(s))
        out.append((s, p if p.is_absolute() else list_file.parent / p))
    return out


def _base_name(p: Path) -> str:
    p = Path(os.path.normpath(p))  # "sub/.." names the folder it means
    stem = ct_stem(p)
    return safe_case_name(stem if stem is not None else (p.name or "case"))


def name_cases(entries: list[tuple[str, Path]]) -> list[Case]:
    """Distinct case names (see module docstring): base name, then ``<parent>_<base>``,
    then a numbered suffix; each sanitised (:func:`NoduleMTLLib.core.safe_output.safe_case_name`:
    never ``.``, ``..``, a path separator or a hidden name)."""
    bases = [_base_name(p) for _, p in entries]
    names = []
    for (_, p), b in zip(entries, bases):
        parent = Path(os.path.normpath(p)).parent.name
        if bases.count(b) > 1 and parent not in ("", ".", ".."):
            b = safe_case_name(f"{parent}_{b}")
        names.append(b)
    seen: dict[str, int] = {}
    final = []
    for n in names:
        if names.count(n) > 1:
            seen[n] = seen.get(n, 0) + 1
            n = n if seen[n] == 1 else f"{n}_{seen[n]}"
        final.append(n)
    return [Case(n, p, listed) for n, (listed, p) in zip(final, entries)]


def find_cases(input_path: str | os.PathLike, exclude: Iterable[Path] = ()) -> list[Case]:
    """The cases of a batch input (folder or list file; see module docstring).

    Raises:
        BatchError: the input does not exist, or a folder holds no CT.
    """
    p = Path(input_path)
    if not p.exists():
        raise BatchError(f"Input not found: {p}")
    if p.is_dir():
        entries = [(str(q), q) for q in scan_folder(p, exclude)]
        if not entries:
            raise BatchError(f"No CT files ({', '.join(CT_EXTENSIONS)}) or DICOM series folders found in {p}")
    else:
        entries = read_list(p)
        if not entries:
            raise BatchError(f"Input list {p} names no files")
    return name_cases(entries)


# ---------------------------------------------------------------- points


def read_points_csv(path: str | os.PathLike, lps: bool = False) -> dict[str, list[tuple[float, float, float]]]:
    """Points per case key from a CSV ``case,x,y,z[,frame|lps]`` as LPS mm.

    Args:
        path: the CSV file.
        lps: default frame LPS instead of RAS (rows with a ``frame`` or ``lps`` value override it).

    Raises:
        BatchError: unreadable file, missing columns, a non-numeric coordinate or an unknown frame
            (the message names the line).
    """
    from ..core.io import ras_to_lps

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"Cannot read points file {path}: {getattr(e, 'strerror', None) or e}") from None
    rd = csv.DictReader(_io.StringIO(text))
    cols = {c.strip().lower(): c for c in (rd.fieldnames or [])}
    missing = [c for c in ("case", "x", "y", "z") if c not in cols]
    if missing:
        semi = " (the file seems separated by ';': use ',' between fields and '.' for decimals)" \
            if ";" in "".join(rd.fieldnames or []) else ""
        raise BatchError(f"Points file {path} lacks column(s) {', '.join(missing)} (header case,x,y,z[,frame]){semi}")
    out: dict[str, list] = {}
    n_head = len(rd.fieldnames or [])
    for row in rd:
        lineno = rd.line_num
        # more fields than the header (restkey None), or fewer than case,x,y,z
        if row.get(None) or any(row.get(cols[c]) is None for c in ("case", "x", "y", "z")):
            fields = [v for k, v in row.items() if k is not None and v is not None] + list(row.get(None) or [])
            hint = ""
            if row.get(None) and all(re.fullmatch(r"\s*-?\d+\s*", v or "") for v in fields[1:]):
                hint = " - decimal commas? write -72.5, not -72,5 (or quote the values)"
            raise BatchError(f"Points file {path}, line {lineno}: {len(fields)} fields, the header has {n_head}{hint}")
        case = (row.get(cols["case"]) or "").strip()
        if not case:
            continue
        try:
            xyz = tuple(float(row[cols[c]]) for c in ("x", "y", "z"))
        except (TypeError, ValueError):
            raise BatchError(f"Points file {path}, line {lineno}: x, y, z must be numbers") from None
        is_lps = lps
        if "frame" in cols and (row.get(cols["frame"]) or "").strip():
            f = row[cols["frame"]].strip().upper()
            if f not in ("RAS", "LPS"):
                raise BatchError(f"Points file {path}, line {lineno}: frame must be RAS or LPS, not {f!r}")
            is_lps = f == "LPS"
        elif "lps" in cols and (row.get(cols["lps"]) or "").strip():
            is_lps = row[cols["lps"]].strip().lower() in ("1", "true", "yes", "y", "lps")
        out.setdefault(case, []).append(xyz if is_lps else ras_to_lps(xyz))
    return out


def points_for(case: Case, points: dict[str, list]) -> list:
    """Points of a case: by case name, else by the input path as listed, else by resolved path."""
    for key in (case.name, case.listed, str(case.path)):
        if key in points:
            return points[key]
    res = str(case.path.resolve())
    for k, v in points.items():
        if os.path.isabs(k) and str(Path(k).resolve()) == res:
            return v
    return []


# ---------------------------------------------------------------- summary


def write_summary(path: Path, results: list, columns=SUMMARY_COLUMNS) -> None:
    """Write summary.csv atomically (temporary file in the same folder, then replace).

    Args:
        path: the CSV file; results: rows with a ``row() -> dict`` method (``CaseResult``,
            ``pacs.StudyResult``); columns: the header (batch's by default).
    """
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(r.row() for r in results)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # plain open: permissions follow the umask
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def case_done(folder: Path) -> bool:
    """True if ``folder`` holds all four outputs of an analysis."""
    from ..outputs.files import OUTPUT_FILES

    return all((folder / f).is_file() for f in OUTPUT_FILES)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s or type(e).__name__


# ---------------------------------------------------------------- run


@dataclass
class BatchRun:
    """A batch over ``cases`` into ``out_dir`` (see module docstring).

    ``points``: {case key: [LPS points]}.  Each case goes through the analysis service
    (:func:`NoduleMTLLib.service.analysis.analyze`: CPU fallback included); the networks are loaded once
    for the whole batch (:class:`~NoduleMTLLib.service.analysis.ModelCache`).  :meth:`run` returns the
    per-case results in input order.
    """

    cases: list[Case]
    out_dir: Path
    points: dict = field(default_factory=dict)
    network_ids: tuple = DEFAULT_NETWORKS
    device: str = "auto"
    overwrite: bool = False
    #: also write ``<case>/segmentation.dcm`` (DICOM SEG) for cases read from a DICOM series
    dicom_seg: bool = False
    #: score threshold of the whole-scan search (cases without points): "default", "adaptive" or a float in [0, 1]
    threshold: float | str = "default"

    #: an already loaded whole-scan detector (tests); None: loaded at the first case without points
    _detector_model: object = None
    #: report options (``NoduleMTLLib.apps.reporting.add_arguments``: dicom_sr, no_pictures, age, sex, ...); None: defaults
    report_options: object = None
    _models: object = None

    def __post_init__(self):
        from ..models.registry import DEFAULT_NETWORKS
        from ..service.analysis import ModelCache

        self.network_ids = tuple(self.network_ids) or DEFAULT_NETWORKS
        self._models = ModelCache(detector=self._detector_model)

    def precheck(self, case: Case) -> CaseResult | None:
        """The result of a case that needs no analysis, else None: ``failed`` when its name gives no
        folder inside the output folder, ``done-before`` when the folder holds all four outputs and
        not ``overwrite`` (the resume rule; counts read back from nodules.json)."""
        from ..core.safe_output import case_dir
        from ..outputs.files import OutputError

        base = CaseResult(case.name, case.listed or str(case.path), "")
        try:
            folder = case_dir(self.out_dir, case.name)
        except OutputError as e:
            base.status, base.message = "failed", _one_line(e)
            return base
        if case_done(folder) and not self.overwrite:
            base.status, base.message = "done-before", "outputs present (use --overwrite to recompute)"
            try:
                nods = json.loads((folder / JSON_FILE).read_text())["nodules"]
                base.n_nodules, base.n_found = len(nods), sum(bool(n.get("found")) for n in nods)
            except (OSError, ValueError, KeyError, TypeError):
                pass
            return base
        return None

    def run_case(self, case: Case) -> CaseResult:
        """Analyse one case; input problems become a ``failed`` result, weights/device/calibration errors propagate."""
        from ..core.device import DeviceError
        from ..core.io import InputError, read_ct
        from ..core.safe_output import OutputSet, case_dir
        from ..models.calibration import CalibrationError
        from ..models.registry import WeightsError
        from ..outputs.files import OutputError
        from ..outputs.writer import options_from_args, write_result_set
        from ..service.analysis import analyze, detector_status

        pre = self.precheck(case)
        if pre is not None:
            return pre
        base = CaseResult(case.name, case.listed or str(case.path), "")
        folder = case_dir(self.out_dir, case.name)
        t0 = time.perf_counter()
        pts = points_for(case, self.points)
        try:
            if not case.path.exists():
                raise InputError(f"Input not found: {case.path}")
            if not pts and self._detector_model is None and not detector_status()[0]:
                base.status, base.message = "skipped", "no points (whole-scan detector weights not installed)"
                base.n_nodules, base.n_found = 0, 0
                return base
            # the case folder: not the input, no stray outputs unless --overwrite, all-or-nothing
            # (the batch's lock covers it)
            with OutputSet(folder, inputs=[case.path], overwrite=self.overwrite, lock=False) as outset:
                ct = read_ct(case.path, allow_non_ct=bool(getattr(self.report_options, "allow_non_ct", False)))
                from . import reporting
                res = analyze(ct, pts, detect=not pts, network_ids=self.network_ids, device=self.device,
                              threshold=self.threshold, models=self._models,
                              patient=reporting.patient_options(self.report_options),  # Lung-RADS, Brock
                              notify=lambda m: log.warning("case %s: %s", case.name, m))
                dicom = ct.dicom_series_uid is not None  # SEG / SR only for cases read from DICOM
                opts = options_from_args(self.report_options, dicom_seg=self.dicom_seg and dicom,
                                         dicom_sr=bool(getattr(self.report_options, "dicom_sr", False)) and dicom)
                write_result_set(res, ct, outset, opts, warn=lambda m: log.warning("case %s: %s", case.name, m))
        except (WeightsError, DeviceError, CalibrationError):
            raise  # not a problem of this case: stop the run
        except Exception as e:  # noqa: BLE001 - a bad case must not stop the batch
            if not isinstance(e, (InputError, OutputError)):
                log.warning("case %s: unexpected error", case.name, exc_info=True)
            base.status, base.message = "failed", _one_line(e)
            if self.points and not pts:  # say why the whole-scan search ran at all
                base.message = f"no row for this case in the points file, so the whole scan was searched: {base.message}"
            base.seconds = time.perf_counter() - t0
            return base
        base.status = "ok"
        base.n_nodules, base.n_found = len(res.nodules), sum(n.found for n in res.nodules)
        base.seconds = time.perf_counter() - t0
        notfound = [f"{n.id}: {n.message}" for n in res.nodules if not n.found]
        notes = list(res.messages) + (["not found: " + "; ".join(notfound)] if notfound else [])
        base.message = " ".join("; ".join(notes).split())  # e.g. the nodule cap of a whole-scan search
        return base

    def run(self, on_case: Callable[[int, Case, CaseResult], None] | None = None) -> list[CaseResult]:
        """Run every case in order, rewriting summary.csv after each; returns the results.  Holds the
        output folder's lock meanwhile (OutputLocked when another run holds it)."""
        from ..core.safe_output import locked_output_root

        with locked_output_root(self.out_dir, stale=(f".{SUMMARY_FILE}.*.tmp",)):  # one batch at a time per folder
            return self._run_cases(on_case)

    def _run_cases(self, on_case) -> list[CaseResult]:
        summary = self.out_dir / SUMMARY_FILE
        pending = [CaseResult(c.name, c.listed or str(c.path), "pending") for c in self.cases]
        results: list[CaseResult] = []
        write_summary(summary, pending)
        for i, case in enumerate(self.cases):
            r = self.run_case(case)
            results.append(r)
            write_summary(summary, results + pending[i + 1:])
            if on_case:
                on_case(i, case, r)
        return results

"""Output folders that never lose or corrupt a user's data.

The rules (``nodulemtl analyze`` and ``nodulemtl batch``):

* ``--out`` must not be empty (a usage error, :func:`out_dir_arg`), must not be a file, and
  must not be, or contain, the input (:func:`check_out_dir`).
* An output folder that already holds any of NoduleMTL's output files
  (:data:`MANAGED_FILES`) is refused unless ``overwrite`` (``--overwrite``).
* Batch case names are sanitised (:func:`safe_case_name`) and every case folder is checked
  to lie directly inside ``--out`` (:func:`case_dir`).
* Writing is all-or-nothing, also when replacing an earlier result: the new set is written
  into a temporary folder beside the output folder (``.nodulemtl-tmp-<name>-XXXXXXXX``) and
  moved into place only when complete (:meth:`OutputSet.commit`).  A new output folder
  appears by one rename, so it exists only once the results are ready; an existing one has
  its old output files moved into a backup folder inside it (``.nodulemtl-old-XXXXXXXX``)
  first, and any failure puts them back.  A run killed half-way is repaired by the next run
  into the same folder (the backup is restored or removed, temporary folders are deleted).
* Only one run at a time writes into a folder: a lock file beside it
  (``.<name>.nodulemtl-lock``, an OS file lock, released by the OS even when a run is killed)
  makes a second run stop with a one-line error (:class:`OutputLocked`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

#: The four outputs of an analysis (:func:`NoduleMTLLib.outputs.write_output_files`).
OUTPUT_FILES = ("labels.nrrd", "segmentation.seg.nrrd", "nodules.json", "nodules.csv")


class OutputError(OSError):
    """The output folder cannot be created or written."""


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check it is writable (before any computation).

    Raises OutputError with the reason.
    """
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"Output path {p} exists and is not a folder")
    created = not p.exists()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nodulemtl-probe-", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if created:
            shutil.rmtree(p, ignore_errors=True)
        raise OutputError(f"Cannot write to output folder {p}: {e.strerror or e}") from None
    return p


#: Every file or folder NoduleMTL writes into an output folder (the four outputs, the optional DICOM SEG
#: and SR, the report page and its pictures).
MANAGED_FILES = tuple(OUTPUT_FILES) + ("segmentation.dcm", "report.sr.dcm", "report.html", "pictures")
TMP_PREFIX = ".nodulemtl-tmp-"
OLD_PREFIX = ".nodulemtl-old-"
LOCK_SUFFIX = ".nodulemtl-lock"
_SWAP_STATE = ".nodulemtl-swap.json"
#: ``tempfile.mkdtemp`` random part: 8 characters of this alphabet.
_RANDOM = r"[a-z0-9_]{8}"


class OutputLocked(OutputError):
    """Another run holds the lock of the output folder."""


def out_dir_arg(text: str) -> str:
    """argparse ``type`` of ``--out``: refuses an empty or blank value (a usage error, exit 2)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (give an output folder)")
    return text


def existing_outputs(folder: str | os.PathLike) -> list[str]:
    """Names of :data:`MANAGED_FILES` present in ``folder`` (empty when it does not exist)."""
    p = Path(folder)
    return [f for f in MANAGED_FILES if os.path.lexists(p / f)]


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Check the output folder rules before any computation (nothing is created).

    Args:
        out_dir: the output folder (need not exist).
        inputs: input paths (CT files, DICOM folders, list files) the folder must not be or contain.
        overwrite: allow replacing NoduleMTL output files already in the folder.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        OutputError: empty path, a file in its place, the folder is or contains an input, or it
            already holds output files and ``overwrite`` is False.
    """
    if not str(out_dir).strip():
        raise OutputError("The output folder (--out) is empty")
    p = Path(out_dir)
    if os.path.lexists(p) and not p.is_dir():
        raise OutputError(f"Output path {p} exists and is not a folder")
    rp = p.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if _same_or_inside(ri, rp):
            what = "is" if ri == rp else "contains"
            raise OutputError(f"Output folder {p} {what} the input {inp}; choose a separate output folder")
    if p.is_dir() and not overwrite:
        present = existing_outputs(p)
        if present:
            raise OutputError(f"Output folder {p} already holds {', '.join(present)}; "
                              "use --overwrite to replace them, or choose another folder")
    return p


def safe_case_name(name: str) -> str:
    """A case name usable as one folder name inside ``--out``: path separators, control and
    reserved characters become ``_``, a leading ``.`` becomes ``_`` (so ``.``, ``..`` and hidden
    names cannot occur), surrounding blanks are dropped; an empty result is ``case``."""
    s = re.sub(r'[\x00-\x1f\x7f/\\<>:"|?*]', "_", str(name)).strip()
    s = re.sub(r"^\.", "_", s)
    s = s.rstrip(" .")  # Windows drops trailing dots / blanks
    return s or "case"


def case_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir / name`` after checking that it is a folder directly inside ``out_dir``.

    Raises:
        OutputError: the name would leave ``out_dir`` (``..``, a separator, a link to elsewhere).
    """
    out = Path(out_dir)
    folder = out / name
    if name in ("", ".", "..") or Path(name).name != name or folder.resolve().parent != out.resolve():
        raise OutputError(f"Case name {name!r} does not give a folder inside {out}")
    return folder


# ---------------------------------------------------------------- lock


def _lock_fd(fd: int) -> bool:
    """Try to take an exclusive lock on an open file without waiting."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class FolderLock:
    """Exclusive lock of an output folder: the file ``<parent>/.<name>.nodulemtl-lock``, locked
    with the OS (``flock`` / ``msvcrt.locking``), so a killed run never leaves a lock held.
    The file holds the owner's pid and is removed on release."""

    def __init__(self, folder: str | os.PathLike):
        f = Path(os.path.abspath(folder))  # "." and ".." resolved: one lock per folder
        self.folder = Path(folder)
        self.path = f.parent / f".{f.name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            OutputLocked: another run holds it (the message names its pid).
            OutputError: the lock file cannot be created (folder not writable).
        """
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"Cannot write to output folder {self.folder}: cannot create {self.path} "
                                  f"({e.strerror or e})") from None
            if not _lock_fd(fd):
                try:
                    pid = os.read(fd, 32).decode(errors="replace").strip()
                except OSError:  # Windows: the locked byte cannot be read
                    pid = ""
                finally:
                    os.close(fd)
                raise OutputLocked(f"Another nodulemtl run{f' (pid {pid})' if pid else ''} is writing into "
                                   f"{self.folder}; wait for it to finish or choose another --out")
            try:  # the holder before us may have removed the file: lock the file that is there now
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return
            os.close(fd)
        raise OutputLocked(f"Cannot lock {self.folder}: its lock file {self.path} keeps changing")

    def release(self) -> None:
        """Remove the lock file and unlock (no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- stale state of killed runs


def _write_state(backup: Path, state: str, new: list[str]) -> None:
    tmp = backup / (_SWAP_STATE + ".tmp")
    tmp.write_text(json.dumps({"state": state, "new": new}))
    os.replace(tmp, backup / _SWAP_STATE)


def _roll_back(folder: Path, backup: Path) -> None:
    """Undo an interrupted swap: the old files in ``backup`` go back into ``folder`` (the new
    files already moved in are removed first); a finished swap only loses its backup."""
    try:
        st = json.loads((backup / _SWAP_STATE).read_text())
    except (OSError, ValueError):
        st = {"state": "moving-old", "new": []}
    if st.get("state") != "done":
        if st.get("state") == "moving-new":
            for name in st.get("new", []):
                if name in MANAGED_FILES and os.path.lexists(folder / name):
                    os.remove(folder / name)
        for q in backup.iterdir():
            if q.name in MANAGED_FILES:
                os.replace(q, folder / q.name)
    shutil.rmtree(backup, ignore_errors=True)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Repair what killed runs left for ``folder`` (call while holding its :class:`FolderLock`):
    an interrupted swap is rolled back (the old set is restored) and temporary folders
    (``.nodulemtl-tmp-<name>-*`` beside it, ``.nodulemtl-tmp-*`` inside it) are removed.
    Returns the paths removed or restored."""
    f = Path(os.path.abspath(folder))
    done = []
    if f.is_dir():
        for q in sorted(f.iterdir()):
            if q.name.startswith(OLD_PREFIX) and q.is_dir():
                _roll_back(f, q)
                done.append(q)
            elif q.name.startswith(TMP_PREFIX) and q.is_dir():
                shutil.rmtree(q, ignore_errors=True)
                done.append(q)
    pat = re.compile(re.escape(TMP_PREFIX + f.name) + "-" + _RANDOM + r"$")
    if f.parent.is_dir():
        for q in f.parent.iterdir():
            if pat.match(q.name) and q.is_dir():
                shutil.rmtree(q, ignore_errors=True)
                done.append(q)
    return done


@contextmanager
def locked_output_root(out_dir: str | os.PathLike, stale: Iterable[str] = ()):
    """A batch's output folder for the duration of the block: created (with its parents) and
    checked writable, locked (:class:`FolderLock`), what a killed run left cleaned
    (:func:`clean_stale`, plus files matching the glob patterns ``stale``).

    Raises:
        OutputError / OutputLocked: the folder cannot be created or written, or another run holds it.
    """

    out = Path(out_dir)
    try:
        Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)  # the lock file lies beside it
    except OSError as e:
        raise OutputError(f"Cannot write to output folder {out}: {e.strerror or e}") from None
    with FolderLock(out):
        prepare_output_dir(out)
        clean_stale(out)
        for pattern in stale:
            for q in out.glob(pattern):
                q.unlink()
        yield out


# ---------------------------------------------------------------- all-or-nothing set


class OutputSet:
    """All-or-nothing writing of one output folder (see module docstring).

    Usage::

        with OutputSet(out, inputs=[ct_path], overwrite=False) as s:   # checks, lock, cleanup
            ...compute...
            stage = s.staging_dir()        # empty temporary folder beside ``out``
            ...write the files into stage...
            s.commit()                     # the new set replaces the old one, or nothing changes

    Leaving the block without :meth:`commit` (an exception) removes the staging folder and any
    parent folders this object created; ``out`` itself is never created before :meth:`commit`.

    Args:
        out_dir: the output folder.
        inputs: input paths ``out_dir`` must not be or contain.
        overwrite: replace NoduleMTL output files already there (else :func:`check_out_dir` refuses).
        lock: take the folder's :class:`FolderLock` (False when a caller already holds a lock
            over it, e.g. a batch's case folders under the batch's own lock).

    Raises (on entering):
        OutputError / OutputLocked: see :func:`check_out_dir` and :meth:`FolderLock.acquire`.
    """

    def __init__(self, out_dir: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False, lock: bool = True):
        self.out = Path(out_dir)
        self._abs = Path(os.path.abspath(out_dir))  # name and parent also for "." or "x/.."
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self._lock = FolderLock(self.out) if lock else None
        self._created: list[Path] = []
        self._stage: Path | None = None
        self.committed = False

    def __enter__(self):
        check_out_dir(self.out, self.inputs, overwrite=True)  # earlier outputs: checked after repairing a killed run
        self._make_parents()
        try:
            if self._lock is not None:
                self._lock.acquire()
            if self.out.is_dir():
                _probe_writable(self.out)
            clean_stale(self.out)
            check_out_dir(self.out, self.inputs, self.overwrite)  # again: a rolled-back swap restores files
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            self._remove_created()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._stage is not None:
                shutil.rmtree(self._stage, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.release()
            if not self.committed:
                self._remove_created()  # after the lock file is gone

    def _make_parents(self) -> None:
        missing = []
        q = self._abs.parent
        while not q.exists():
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                self._remove_created()
                raise OutputError(f"Cannot write to output folder {self.out}: {e.strerror or e}") from None
            self._created.append(d)

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if still empty
            except OSError:
                pass
        self._created = []

    def staging_dir(self) -> Path:
        """An empty temporary folder beside the output folder, for the new set (created once).

        Raises:
            OutputError: it cannot be created.
        """
        if self._stage is None:
            try:
                self._stage = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self._abs.name}-", dir=self._abs.parent))
                umask = os.umask(0o022); os.umask(umask)
                os.chmod(self._stage, 0o777 & ~umask)  # it becomes the output folder: mkdir's permissions, not 0700
            except OSError as e:
                raise OutputError(f"Cannot write to output folder {self.out}: {e.strerror or e}") from None
        return self._stage

    def commit(self) -> list[Path]:
        """Move the staged set into the output folder, replacing the NoduleMTL files there.

        A new folder appears by a single rename.  In an existing folder, every managed file
        already there is first moved into a backup folder inside it, then the new files are
        moved in; if anything fails the new files are removed and the old ones restored, and
        OutputError is raised.  Files that are not NoduleMTL's are never touched.

        Returns:
            The paths of the new files.
        """
        stage = self.staging_dir()
        new = sorted(q.name for q in stage.iterdir())
        if any(n not in MANAGED_FILES for n in new):
            raise OutputError(f"Unexpected files staged for {self.out}: {', '.join(n for n in new if n not in MANAGED_FILES)}")
        try:
            if not os.path.lexists(self.out):
                os.rename(stage, self.out)
                self._stage = None
            else:
                self._swap_into_existing(stage, new)
        except OSError as e:
            raise OutputError(f"Cannot write outputs to {self.out}: {e.strerror or e}") from None
        self.committed = True
        return [self.out / n for n in new]

    def _swap_into_existing(self, stage: Path, new: list[str]) -> None:
        old = existing_outputs(self.out)
        backup = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=self.out))
        try:
            _write_state(backup, "moving-old", new)
            for name in old:
                os.replace(self.out / name, backup / name)
            _write_state(backup, "moving-new", new)
            for name in new:
                _move_in(stage / name, self.out / name)
            _write_state(backup, "done", new)
        except BaseException:
            _roll_back(self.out, backup)
            raise
        shutil.rmtree(backup, ignore_errors=True)


def _move_in(src: Path, dst: Path) -> None:
    """Hook for tests (a failure half-way through a swap): ``os.replace``."""
    os.replace(src, dst)


def _probe_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".nodulemtl-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"Cannot write to output folder {folder}: {e.strerror or e}") from None

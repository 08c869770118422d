"""Output folders that never lose or corrupt a user's data.

The rules (``nodulemtl analyze`` and ``nodulemtl batch``; what a reader sees: ``docs/outputs.md``):

* ``--out`` must not be empty (a usage error, :func:`out_dir_arg`), must not be a file, and
  must not be, or contain, the input (:func:`check_out_dir`).
* An output folder that already holds any of NoduleMTL's output files
  (:data:`MANAGED_FILES`) is refused unless ``overwrite`` (``--overwrite``).
* Batch case names are sanitised (:func:`safe_case_name`) and every case folder is checked
  to lie directly inside ``--out`` (:func:`case_dir`).
* **Never half-visible.**  Each result set is written into its own hidden folder
  (``.nodulemtl-set-XXXXXXXX``) and published by switching ONE entry atomically: the link
  ``.nodulemtl-current`` -> that folder (a new link renamed over the old one).  The documented
  names (``labels.nrrd``, ``nodules.json``, ...) are relative links
  ``labels.nrrd -> .nodulemtl-current/labels.nrrd``, so a reader of ``--out`` sees, at any
  moment and after a kill at any moment, the previous complete set or the new complete set,
  never a mix or nothing.  Of the optional files (``segmentation.dcm``, ``report.sr.dcm``,
  ``report.html``, ``pictures``) one that the new set drops disappears just before the switch,
  one that it adds appears just after it.  The previous set's folder is deleted after the switch.
* A new output folder is staged beside its final place (``.nodulemtl-tmp-<name>-XXXXXXXX``,
  the parent's filesystem, where the folder will live) and appears by one rename, so it
  exists only once the results are ready.  An existing folder is staged INSIDE itself, on its
  own filesystem, so a mount point (Docker ``-v host:/out``, a bind mount) works.
* Where links cannot be made (Windows without the privilege, FAT), the files are plain and
  an existing folder's set is replaced file by file, the old files first moved into a backup
  folder inside it (``.nodulemtl-old-XXXXXXXX``) and put back on any failure; a folder written
  by an older NoduleMTL (plain files) is converted to the linked layout the same way, once.
* A run killed half-way is repaired by the next run into the same folder
  (:func:`clean_stale`: unpublished sets, temporary folders and links are removed, an
  interrupted file-by-file swap is rolled back).
* Only one run at a time writes into a folder: a lock file beside it
  (``.<name>.nodulemtl-lock``, an OS file lock, released by the OS even when a run is killed)
  makes a second run stop with a one-line error (:class:`OutputLocked`).  A lock file that
  cannot be written (disk full) is removed again and reported as :class:`OutputError`.
* Any failure to write (disk full, read-only, quota) is one :class:`OutputError` naming
  ``--out``, never the hidden staging folder.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, OutputLocked  # noqa: E402,F401 - defined in errors.py (the one root), importable here

#: The four outputs of an analysis and every managed name: defined in :mod:`NoduleMTLLib.core.filenames`.
from .filenames import MANAGED_FILES, OUTPUT_FILES  # noqa: E402,F401

log = logging.getLogger(__name__)


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


TMP_PREFIX = ".nodulemtl-tmp-"
OLD_PREFIX = ".nodulemtl-old-"
#: Hidden folder of one complete result set inside an output folder.
SET_PREFIX = ".nodulemtl-set-"
#: The one link whose atomic replacement publishes a result set (-> ``.nodulemtl-set-XXXXXXXX``).
CURRENT_LINK = ".nodulemtl-current"
LOCK_SUFFIX = ".nodulemtl-lock"
_SWAP_STATE = ".nodulemtl-swap.json"
#: ``tempfile.mkdtemp`` random part: 8 characters of this alphabet.
_RANDOM = r"[a-z0-9_]{8}"


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
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, str(os.getpid()).encode())
                except OSError as e:  # e.g. disk full: no empty lock file is left behind
                    try:
                        os.remove(self.path)
                    except OSError:
                        pass
                    os.close(fd)
                    raise OutputError(f"Cannot write to output folder {self.folder}: {e.strerror or e}") from None
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


def _write_state(backup: Path, state: str, new: list[str], current: bool = False) -> None:
    tmp = backup / (_SWAP_STATE + ".tmp")
    tmp.write_text(json.dumps({"state": state, "new": new, **({"current": True} if current else {})}, allow_nan=False))
    os.replace(tmp, backup / _SWAP_STATE)


def _remove_entry(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _roll_back(folder: Path, backup: Path) -> None:
    """Undo an interrupted file-by-file swap: the old files in ``backup`` go back into ``folder``
    (the new entries already moved in are removed first); a finished swap only loses its backup."""
    try:
        st = json.loads((backup / _SWAP_STATE).read_text())
    except (OSError, ValueError):
        st = {"state": "moving-old", "new": []}
    if st.get("state") != "done":
        if st.get("state") == "moving-new":
            for name in st.get("new", []):
                if name in MANAGED_FILES:
                    _remove_entry(folder / name)
            if "current" in st:  # a conversion to the linked layout: its link and set go too
                _remove_entry(folder / CURRENT_LINK)
        for q in backup.iterdir():
            if q.name in MANAGED_FILES:
                os.replace(q, folder / q.name)
    shutil.rmtree(backup, ignore_errors=True)


def _link_target(name: str) -> str:
    """What a published name links to (relative: the folder can be moved or mounted elsewhere)."""
    return f"{CURRENT_LINK}/{name}"


def _is_our_link(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == _link_target(path.name)


def current_set(folder: str | os.PathLike) -> Path | None:
    """The published set folder of an output folder in the linked layout (``.nodulemtl-current``
    resolved), None when the folder has no such link."""
    link = Path(folder) / CURRENT_LINK
    if not link.is_symlink():
        return None
    return Path(folder) / os.readlink(link)


def visible_entries(folder: str | os.PathLike) -> list[str]:
    """Sorted names in ``folder`` without the published set's two hidden entries
    (``.nodulemtl-current`` and the set folder it points to): the documented files, the user's
    own files, and any debris of a killed run."""
    f = Path(folder)
    cur = current_set(f)
    hidden = {CURRENT_LINK} | ({cur.name} if cur is not None else set())
    return sorted(q.name for q in f.iterdir() if q.name not in hidden)


def _symlink_replace(target: str, path: Path) -> None:
    """Make ``path`` a link to ``target`` atomically (a new link renamed over whatever is there)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _remove_entry(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _sync_links(folder: Path, names_now: Iterable[str]) -> None:
    """Published links of ``folder`` = the entries of its current set: missing links are made,
    links of names the set does not hold are removed (only our own links)."""
    names_now = set(names_now)
    for name in MANAGED_FILES:
        p = folder / name
        if name in names_now and not _is_our_link(p):
            if not os.path.lexists(p):
                _symlink_replace(_link_target(name), p)
        elif name not in names_now and _is_our_link(p):
            os.remove(p)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Repair what killed runs left for ``folder`` (call while holding its :class:`FolderLock`):
    an interrupted file-by-file swap is rolled back (the old set is restored); set folders that
    are not the published one, half-made links and temporary folders
    (``.nodulemtl-tmp-<name>-*`` beside it, ``.nodulemtl-tmp-*`` inside it) are removed; the
    published links are made to match the published set.  Returns the paths removed or restored."""
    f = Path(os.path.abspath(folder))
    done = []
    if f.is_dir():
        for q in sorted(f.iterdir()):
            if q.name.startswith(OLD_PREFIX) and q.is_dir():
                _roll_back(f, q)
                done.append(q)
        cur = current_set(f)
        if cur is not None and not cur.is_dir():  # a dangling current link (cannot happen by our order; repair)
            _remove_entry(f / CURRENT_LINK)
            cur = None
        for q in sorted(f.iterdir()):
            if q.name.startswith(".nodulemtl-probe-") and (q.is_symlink() or q.is_file()):  # a killed write probe
                os.remove(q)
                done.append(q)
            elif q.name.startswith(TMP_PREFIX) and q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
                done.append(q)
            elif q.name.startswith(SET_PREFIX) and (cur is None or q.name != cur.name):
                _remove_entry(q)
                done.append(q)
            elif ".tmp-" in q.name and q.is_symlink() and q.name.split(".tmp-")[0] in (*MANAGED_FILES, CURRENT_LINK):
                os.remove(q)
                done.append(q)
        if cur is not None:
            _sync_links(f, [q.name for q in cur.iterdir()])
        else:
            for name in MANAGED_FILES:  # links into a set that no longer exists
                if _is_our_link(f / name):
                    os.remove(f / name)
                    done.append(f / name)
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
            stage = s.staging_dir()        # empty hidden folder (see staging_dir)
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
        self._stage: Path | None = None  # where the files are written
        self._container: Path | None = None  # a new folder's staging folder beside it (renamed at commit)
        self._linked = False
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
        from .errors import NoduleMTLError

        failed_writing = None
        if (exc is not None and self._stage is not None and not isinstance(exc, NoduleMTLError)
                and isinstance(exc, (OSError, RuntimeError))):
            failed_writing = OutputError(f"Cannot write outputs to {self.out}: {self._write_failure(exc)}")
        try:
            if self._stage is not None:
                _remove_entry(self._container if self._container is not None else self._stage)
        finally:
            if self._lock is not None:
                self._lock.release()
            if not self.committed:
                self._remove_created()  # after the lock file is gone
        if failed_writing is not None:
            raise failed_writing from None

    def _write_failure(self, e: BaseException) -> str:
        """One line saying why writing failed, naming ``--out`` rather than the hidden staging folder."""
        try:
            st = os.statvfs(self._stage.parent if self._stage.parent.exists() else self._abs.parent)
            full = st.f_bavail * st.f_frsize < (1 << 20)
        except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
            full = False
        if full or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return "No space left on device"
        text = (e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())) or type(e).__name__
        for q in (self._stage, self._container):
            if q is not None:
                text = text.replace(str(q), str(self.out))
        return text[-300:]

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
        """An empty hidden folder for the new set's files (created once; see the module docstring):
        a ``.nodulemtl-set-*`` folder inside the output folder (or inside the new folder's staging
        folder beside it), or, without links, a ``.nodulemtl-tmp-*`` folder there.

        Raises:
            OutputError: it cannot be created.
        """
        if self._stage is None:
            umask = os.umask(0o022); os.umask(umask)
            try:
                if os.path.isdir(self.out):  # inside: the output folder's own filesystem (mount points)
                    self._container = None
                    parent = self.out
                else:  # a new folder: staged where it will be, renamed at commit
                    self._container = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self._abs.name}-", dir=self._abs.parent))
                    os.chmod(self._container, 0o777 & ~umask)  # it becomes the output folder: mkdir's permissions
                    parent = self._container
                self._linked = _links_work(parent)
                if self._linked:
                    self._stage = Path(tempfile.mkdtemp(prefix=SET_PREFIX, dir=parent))
                elif self._container is not None:
                    self._stage = self._container
                else:
                    self._stage = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
                os.chmod(self._stage, 0o777 & ~umask)
            except OSError as e:
                if self._container is not None:
                    _remove_entry(self._container)
                    self._container = None
                raise OutputError(f"Cannot write to output folder {self.out}: {e.strerror or e}") from None
        return self._stage

    def commit(self) -> list[Path]:
        """Publish the staged set in the output folder, replacing the NoduleMTL files there
        (see the module docstring: one atomic switch of ``.nodulemtl-current``; without links,
        a file-by-file swap with a backup).  If anything fails the previous set stays published
        and OutputError is raised.  Files that are not NoduleMTL's are never touched.

        Returns:
            The paths of the new files (as published: ``out/<name>``).
        """
        stage = self.staging_dir()
        new = sorted(q.name for q in stage.iterdir())
        if any(n not in MANAGED_FILES for n in new):
            raise OutputError(f"Unexpected files staged for {self.out}: {', '.join(n for n in new if n not in MANAGED_FILES)}")
        try:
            if self._container is not None:  # a new folder: complete, then one rename
                if self._linked:
                    os.symlink(stage.name, self._container / CURRENT_LINK)
                    for name in new:
                        os.symlink(_link_target(name), self._container / name)
                os.rename(self._container, self.out)
                self._stage = self._container = None
            elif not self._linked:
                self._swap_into_existing(stage, new)
            elif any(os.path.lexists(self.out / n) and not _is_our_link(self.out / n) for n in MANAGED_FILES):
                self._convert_to_linked(stage, new)  # plain files of an older version: once
                self._stage = None
            else:
                self._switch(stage, new)
        except OSError as e:
            raise OutputError(f"Cannot write outputs to {self.out}: {self._write_failure(e)}") from None
        self.committed = True
        return [self.out / n for n in new]

    def _switch(self, stage: Path, new: list[str]) -> None:
        """Linked layout: publish ``stage`` by replacing the ``.nodulemtl-current`` link (atomic)."""
        old = current_set(self.out)
        old_names = [q.name for q in old.iterdir()] if old is not None and old.is_dir() else []
        try:
            for name in old_names:  # optional files the new set drops: gone just before the switch
                if name not in new and _is_our_link(self.out / name):
                    os.remove(self.out / name)
            _symlink_replace(stage.name, self.out / CURRENT_LINK)  # THE switch
        except BaseException:
            _sync_links(self.out, old_names)
            raise
        self._stage = None  # published: never removed as a failed stage
        try:  # best effort: what fails here is completed by the next run's clean_stale
            _sync_links(self.out, new)  # files the new set adds: appear just after it
            if old is not None and old.name != stage.name:
                _remove_entry(old)
        except OSError as e:
            log.warning("%s: published, but could not tidy up (%s); the next run will", self.out, e.strerror or e)

    def _convert_to_linked(self, stage: Path, new: list[str]) -> None:
        """A folder with plain output files (older NoduleMTL): move them into a backup, publish the
        linked set; any failure puts them back (the next run rolls back a killed conversion)."""
        old = [n for n in MANAGED_FILES if os.path.lexists(self.out / n) and not _is_our_link(self.out / n)]
        backup = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=self.out))
        try:
            _write_state(backup, "moving-old", new, current=True)
            for name in old:
                _move_in(self.out / name, backup / name)
            _write_state(backup, "moving-new", new, current=True)
            _symlink_replace(stage.name, self.out / CURRENT_LINK)
            _sync_links(self.out, new)
            _write_state(backup, "done", new, current=True)
        except BaseException:
            _roll_back(self.out, backup)
            raise
        shutil.rmtree(backup, ignore_errors=True)

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


def _links_work(folder: Path) -> bool:
    """Whether relative symbolic links can be made in ``folder`` (not on Windows without the
    privilege, nor on FAT)."""
    probe = folder / f".nodulemtl-probe-link-{os.getpid()}"
    try:
        os.symlink(CURRENT_LINK, probe)
    except (OSError, NotImplementedError, AttributeError):
        return False
    try:
        os.remove(probe)
    except OSError:
        pass
    return True


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

"""Import a network weights file for offline sites ("Import model..." in the module).

Weights are never downloaded (README, "Weights").  A site that received a weights file by
other means (USB stick, shared drive) imports it once: the file is identified by its size
and sha256 against the shipped manifest (``Resources/Weights/models.json``, read through
``registry.manifest()``) and copied into the user cache folder (``registry.cache_dir()``,
``~/.cache/NoduleMTL/weights``), where ``registry.find_weights`` looks for it.  A file that
matches no manifest entry is refused with a message saying why: only the exact files
released with this version of the extension are accepted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import registry

#: File name extensions accepted by :func:`import_weights_file`.
WEIGHTS_SUFFIXES = (".safetensors",)


from ..core.errors import ModelImportError  # noqa: E402,F401 - defined in errors.py (the one root), importable here


def identify_weights_file(path: str | os.PathLike, manifest: dict | None = None) -> tuple[str, dict]:
    """Which manifest entry a weights file is: ``(network_id, entry)``.

    The size is compared first (cheap), then the sha256 of the entries of that size.

    Args:
        path: the weights file.
        manifest: the manifest dict (default ``registry.manifest()``).

    Raises:
        ModelImportError: the file does not exist, is not a ``.safetensors`` file, or its
            size / sha256 matches no entry (the message lists the known networks).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelImportError(f"Weights file not found: {p}")
    if not p.name.lower().endswith(WEIGHTS_SUFFIXES):
        raise ModelImportError(f"{p.name} is not a weights file: choose a {' or '.join(WEIGHTS_SUFFIXES)} file")
    if manifest is None:
        manifest = registry.manifest()
    entries = (manifest or {}).get("networks", {})
    if not entries:
        raise ModelImportError("The extension's weights manifest (Resources/Weights/models.json) is missing or empty")
    size = p.stat().st_size
    known = ", ".join(f"{nid} ({e.get('file')}, {e.get('size_bytes')} bytes)" for nid, e in entries.items())
    candidates = {nid: e for nid, e in entries.items() if e.get("size_bytes") == size}
    if not candidates:
        raise ModelImportError(f"{p.name} ({size} bytes) matches no network of this version's manifest; "
                               f"known weights: {known}")
    digest = registry.sha256_of(p)
    for nid, e in candidates.items():
        if str(e.get("sha256", "")).lower() == digest:
            return nid, e
    names = ", ".join(candidates)
    raise ModelImportError(f"{p.name} has the size of the {names} weights but a different sha256 ({digest[:12]}...): "
                           "a corrupt copy or weights of another version")


def import_weights_file(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Verify a weights file against the manifest and copy it into the user cache folder.

    The copy is written to a temporary file in the cache folder, checked again (size and
    sha256 of the copy) and renamed into place, so the cache never holds a partial file.
    Importing a file that is already in the cache is a no-op.  The destination name is the
    registry's ``weights_file`` of the network (the manifest's ``file`` for a network this
    version does not register), whatever the picked file was called.

    Note: a file of the same name in ``$NODULEMTL_WEIGHTS_DIR`` or the extension's own
    ``Resources/Weights`` is found before the cache (see ``registry.weights_search_path``).

    Args:
        path: the ``.safetensors`` file to import.
        cache: destination folder (default ``registry.cache_dir()``).

    Returns:
        ``(network_id, destination path)``.

    Raises:
        ModelImportError: as :func:`identify_weights_file`, or the cache folder cannot be
            written (nothing is left behind).
    """
    network_id, entry = identify_weights_file(path)
    try:
        name = registry.get_spec(network_id).weights_file
    except KeyError:  # a network this version does not register
        name = entry.get("file") or f"{network_id}.safetensors"
    dest_dir = Path(cache) if cache is not None else registry.cache_dir()
    dest = dest_dir / name
    if dest.is_file() and dest.stat().st_size == entry["size_bytes"] and registry.sha256_of(dest) == entry["sha256"]:
        return network_id, dest
    tmp = None
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".import-", suffix=".part", dir=dest_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        shutil.copyfile(path, tmp)
        if tmp.stat().st_size != entry["size_bytes"] or registry.sha256_of(tmp) != entry["sha256"]:
            raise ModelImportError(f"The copy of {Path(path).name} in {dest_dir} does not match the manifest "
                                   "(disk full or the file changed while copying)")
        os.replace(tmp, dest)
        tmp = None
    except OSError as e:
        raise ModelImportError(f"Cannot write the weights into {dest_dir}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return network_id, dest

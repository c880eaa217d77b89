"""Which export folders pwfn may replace, and replacing one without touching anything else.

An export replaces its folder as a whole (staging folder, then a rename), so before it does, the
folder must be provably pwfn's: its ``model.json`` is a pwfn export description that lists every
other file of the folder with its SHA-256, and every file there still has the bytes listed. A
folder holding anything else (a user's ``model.json``, a file pwfn did not write, one edited since,
a sub-folder, a link, a FIFO) is refused with the list of what is in the way, and nothing is
deleted. A link at the folder itself is refused too: pwfn replaces folders, never link targets.

Files are only ever created inside a staging folder that ``tempfile.mkdtemp`` made (a new
folder, mode 0700, never an existing path), so no link planted at a file name can redirect a
write. Nothing here needs ``bayes``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..common.files import parse_json
from ..common.io import atomic_write_bytes, atomic_write_json
from ..errors import PwfnError
from ..run.manifest import validate_description
from .artefact import EXPORT_DIR, MODEL_JSON, STAGE_SUFFIX, ExportError

__all__ = ["check_replaceable", "owned_files", "write_export_folder"]

log = logging.getLogger(__name__)

#: the largest model.json read back (descriptions are a few kB; tensor lists of large models more)
_MAX_DESCRIPTION = 64 << 20
_BLOCK = 1 << 20


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd of ``path`` when it is a regular file that is not a link (never blocks on a FIFO)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd, st


def _sha256(path: Path, limit: int) -> tuple[str, bytes | None]:
    """SHA-256 of a regular file; its bytes too when it is at most ``limit`` bytes (else None)."""
    fd, st = _open_regular(path)
    h = hashlib.sha256()
    keep = st.st_size <= limit
    chunks: list[bytes] = []
    with os.fdopen(fd, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            h.update(block)
            if keep:
                chunks.append(block)
    return h.hexdigest(), (b"".join(chunks) if keep else None)


def _what(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return f"{entry.name} (a link)"
    if entry.is_dir(follow_symlinks=False):
        return f"{entry.name}/"
    if not entry.is_file(follow_symlinks=False):
        return f"{entry.name} (not a regular file)"
    return entry.name


def _read_description(path: Path) -> dict[str, Any] | None:
    """The folder's model.json when it is a pwfn export description (a regular file), else None."""
    try:
        fd, st = _open_regular(path)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > _MAX_DESCRIPTION:
            return None
        data = fh.read(_MAX_DESCRIPTION + 1)
    try:
        meta = parse_json(data, str(path))
        return validate_description(meta, str(path), ("pwfn-export",))
    except PwfnError:
        return None


def check_replaceable(out: Path, *, read_limit: int = 0) -> dict[str, bytes]:
    """Refuse (``ExportError``) unless ``out`` is absent, empty, or provably a pwfn export.

    Provably: a regular ``model.json`` describing a pwfn export lists every other entry of the
    folder as a regular file with the SHA-256 it still has. Returns the bytes of the listed files
    of at most ``read_limit`` bytes (for an export that keeps them); ``{}`` for a new folder.
    """
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ExportError(f"cannot use the export folder {str(out)!r}: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise ExportError(f"the export folder {str(out)!r} is a symbolic link: an export replaces its folder as a "
                          "whole and never writes through a link; pass the folder it points to, or a new one")
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"the export folder {str(out)!r} is a file, not a folder: choose another --out")
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError as exc:
        raise ExportError(f"cannot use the export folder {str(out)!r}: {exc}") from exc
    if not entries:
        return {}
    advice = ("an export replaces its folder as a whole, so pwfn touches only a folder it can prove it wrote; "
              "choose a new or empty --out, or move those files away")
    meta = _read_description(out / MODEL_JSON)
    if meta is None:
        names = ", ".join(_what(e) for e in entries[:5]) + (" ..." if len(entries) > 5 else "")
        mj = " (its model.json is not a pwfn export description)" if (out / MODEL_JSON).exists() else ""
        raise ExportError(f"the export folder {str(out)!r} is not a pwfn export{mj}: it holds {names}; {advice}")
    listed = meta.get("files") or {}
    foreign: list[str] = []
    edited: list[str] = []
    kept: dict[str, bytes] = {}
    for e in entries:
        if e.name == MODEL_JSON:
            continue
        if e.name not in listed or e.is_symlink() or not e.is_file(follow_symlinks=False):
            foreign.append(_what(e))
            continue
        try:
            digest, data = _sha256(out / e.name, read_limit)
        except OSError:
            foreign.append(_what(e))
            continue
        if digest != listed[e.name].get("sha256"):
            edited.append(e.name)
        elif data is not None:
            kept[e.name] = data
    if foreign or edited:
        parts = []
        if foreign:
            parts.append("files pwfn did not write: " + ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else ""))
        if edited:
            parts.append("files changed since pwfn wrote them: " + ", ".join(edited[:5]))
        raise ExportError(f"the export folder {str(out)!r} holds " + "; ".join(parts) + f"; {advice}")
    return kept


def owned_files(out: Path) -> dict[str, bytes]:
    """Every file of an existing pwfn export folder, verified against its ``model.json``
    (``ExportError`` when the folder is not provably pwfn's)."""
    return check_replaceable(out, read_limit=1 << 40)


def _remove_stale_stages(out: Path) -> None:
    """Staging folders an interrupted export left beside ``out`` (real folders, never links)."""
    for stale in out.parent.glob(f".{out.name}.*{STAGE_SUFFIX}"):
        try:
            if stat.S_ISDIR(os.lstat(stale).st_mode):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def write_export_folder(out: Path, files: Mapping[str, bytes], description: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``files`` and ``model.json`` (last) into a new staging folder and rename it to ``out``.

    ``model.json`` is ``description`` with ``files`` set to every file's size and SHA-256 (what
    proves the folder is pwfn's next time); it is returned. ``out`` is checked first
    (:func:`check_replaceable`); the previous folder is renamed aside and deleted only once the
    new one is in place (and only if it still holds nothing but pwfn's files), and put back on
    any failure (full disk, Ctrl-C). The caller holds the run's lock.
    """
    check_replaceable(out)
    description = dict(description)
    description["files"] = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                            for name, data in files.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=STAGE_SUFFIX, dir=out.parent))
    new = stage / EXPORT_DIR
    old: Path | None = None
    try:
        new.mkdir()
        for name, data in files.items():
            if not name or name != os.path.basename(name) or name in (".", "..", MODEL_JSON):
                raise ExportError(f"internal error: bad export file name {name!r}")
            atomic_write_bytes(new / name, data)
        atomic_write_json(new / MODEL_JSON, description)
        if os.path.lexists(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=STAGE_SUFFIX, dir=out.parent))
            os.replace(out, old / EXPORT_DIR)
        os.replace(new, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not os.path.lexists(out):
            os.replace(old / EXPORT_DIR, out)  # put the previous export back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    if old is not None:
        try:  # a file added to the old folder after the check is never deleted with it
            check_replaceable(old / EXPORT_DIR)
        except ExportError as exc:
            log.warning("kept the previous export folder at %s: %s", old / EXPORT_DIR, exc)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return description

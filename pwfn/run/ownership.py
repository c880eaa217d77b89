"""Which folders are pwfn's, and what in them pwfn may replace or delete.

pwfn writes, replaces and deletes only what it can prove it made. A folder a run writes into
carries a marker file, ``.pwfn-folder`` (JSON naming its kind):

* ``run``: the folder of ``pwfn run`` / ``pwfn compare`` (``<out_dir>/<name>``: the float
  baseline, one folder per method, the comparison);
* ``method``: one method's folder (``<run>/pwfn``, or the ``run_dir`` of ``pwfn.compress``).

Folders written before the marker existed are recognised by what only pwfn writes there: a
checksummed baseline checkpoint, or a method folder next to the run's own ``config.yaml``
(run); a run manifest or a run checkpoint (method). An export folder is recognised by its
``model.json`` (``"format": "pwfn-export"``).

* :func:`claim`, before a run writes into a folder: the folder must be new, empty, or a pwfn
  folder of that kind. Anything else (your own files, another kind of pwfn folder) is refused
  with :class:`ForeignFolderError` and left as it was. :func:`mark` writes the marker once the
  run holds the folder's lock.
* :func:`clear_run_folder` (``--fresh``) deletes, inside a proven run folder, only the files
  and folders pwfn writes there, by name and type: regular files and real folders, opened
  relative to their parent without following symbolic links, so a link planted anywhere in
  the tree is never followed (the link itself is kept, as anything else pwfn did not write,
  and listed in the log). A symlinked run name is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..common.files import parse_json
from ..common.io import TEMP_RE, atomic_write_json, checkpoint_kind
from ..errors import ConfigError, PwfnError
from ..methods import method_names
from .lock import LOCK_FILE
from .manifest import MANIFEST_FILE, POINT_MODEL_FILE, POINT_MODEL_JSON, load_manifest

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

MARKER_FILE = ".pwfn-folder"
MARKER_FORMAT = "pwfn-folder"
RUN = "run"
METHOD = "method"
EXPORT = "export"
#: what each kind of folder is, in messages
KINDS = {
    RUN: "a pwfn run folder (of `pwfn run` / `pwfn compare`: float baseline and method folders)",
    METHOD: "a pwfn method folder (one method's checkpoint, manifest and report)",
    EXPORT: "a pwfn export folder",
}

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRFLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_MARKER_BYTES = 4096

#: files a run folder holds (besides the lock, the marker and temp files of interrupted writes)
RUN_FILES = frozenset({"config.yaml", "baseline.pt", "compare.json", "compare.md"})
#: files a method folder holds
METHOD_FILES = frozenset({"checkpoint.pt", "config.yaml", MANIFEST_FILE, "metrics.jsonl", "metrics.csv",
                          POINT_MODEL_FILE, POINT_MODEL_JSON, "report.json"})
#: files ``pwfn export`` (and its ``--to`` targets) writes into an export folder
EXPORT_FILES = frozenset({"model.json", "model.safetensors", "model.pwfn", "model.onnx", "size.json",
                          "targets.json", "model.tflite", "model_uncompressed.tflite", "hls4ml_prj.tar.gz"})
_PLOT_RE = re.compile(r"^(rounds|compare|weights_.+|layers_.+)\.png$")
_TENSORBOARD_RE = re.compile(r"^events\.out\.tfevents\.")
_STAGE_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp-export$")  # an export's staging folder (mkdtemp)


class ForeignFolderError(ConfigError):
    """A folder pwfn would write into (or clear) is not one pwfn made."""


# --------------------------------------------------------------------------------------------
# recognising pwfn's folders


def _read_small(path: Path, limit: int = _MARKER_BYTES) -> Optional[bytes]:
    """The bytes of a small regular file (not through a symlink, never blocking on a FIFO), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return os.read(fd, limit + 1)[:limit]
    except OSError:
        return None
    finally:
        os.close(fd)


def _json_small(path: Path, limit: int = _MARKER_BYTES) -> Optional[dict]:
    data = _read_small(path, limit)
    if data is None:
        return None
    try:
        obj = parse_json(data, str(path))
    except PwfnError:
        return None
    return obj if isinstance(obj, dict) else None


def marker_kind(folder: PathLike) -> Optional[str]:
    """The kind the folder's marker file names, or None (no marker, or not one pwfn wrote)."""
    obj = _json_small(Path(folder) / MARKER_FILE)
    if obj is None or obj.get("format") != MARKER_FORMAT or obj.get("kind") not in KINDS:
        return None
    return str(obj["kind"])


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _is_method_folder(folder: Path) -> bool:
    if marker_kind(folder) == METHOD:
        return True
    kind = checkpoint_kind(folder / "checkpoint.pt")
    if kind is not None and kind.startswith("run-"):
        return True
    if (folder / MANIFEST_FILE).is_file() and not (folder / MANIFEST_FILE).is_symlink():
        try:
            return load_manifest(folder) is not None
        except PwfnError:
            return False
    return False


def _is_export_folder(folder: Path) -> bool:
    obj = _json_small(folder / "model.json", 64 << 20)
    return obj is not None and obj.get("format") == "pwfn-export"


def _config_name(folder: Path) -> Optional[str]:
    """The ``name:`` a pwfn-written ``config.yaml`` starts with (its first line), or None."""
    data = _read_small(folder / "config.yaml", 1 << 20)
    if data is None:
        return None
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    return first[len("name: "):].strip().strip("'\"") if first.startswith("name: ") else None


def folder_kind(folder: PathLike) -> Optional[str]:
    """What pwfn folder ``folder`` is (``run``, ``method``, ``export``), or None when it is none
    (or does not exist). The marker decides; without one, what only pwfn writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    kind = marker_kind(folder)
    if kind is not None:
        return kind
    if checkpoint_kind(folder / "baseline.pt") == "baseline":
        return RUN
    if _is_method_folder(folder):
        return METHOD
    if _is_export_folder(folder):
        return EXPORT
    # a run that started from model.checkpoint has no baseline.pt: its own config.yaml (which
    # names the run) next to a method folder
    if _config_name(folder) == folder.name and any(
            _is_real_dir(folder / m) and _is_method_folder(folder / m) for m in method_names()):
        return RUN
    return None


def _foreign_entries(folder: Path, limit: int = 6) -> list[str]:
    """Up to ``limit`` names in ``folder`` other than pwfn's lock, marker and temp files."""
    out: list[str] = []
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            if name in (LOCK_FILE, MARKER_FILE) or (TEMP_RE.match(name) and entry.is_file(follow_symlinks=False)):
                continue
            out.append(name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            if len(out) >= limit:
                break
    return out


def claim(folder: PathLike, kind: str, *, what: str = "run folder", fresh: bool = False,
          advice: str = "choose another name (--set name=...) or another --out") -> None:
    """Refuse, changing nothing, unless ``folder`` is new, empty, or a pwfn folder of ``kind``.

    ``fresh`` (it is about to be cleared): a symbolic link is refused too, whatever it points to.
    Raises :class:`ForeignFolderError` naming the folder, what it is and ``advice``.
    """
    folder = Path(folder)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ForeignFolderError(f"the {what} {str(folder)!r} cannot be used: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(folder)
        if fresh:
            raise ForeignFolderError(
                f"the {what} {str(folder)!r} is a symbolic link (to {target!r}): --fresh deletes files only inside a "
                "real run folder, never through a link. Remove the link, or run with the folder's own path")
        if not os.path.exists(folder):
            raise ForeignFolderError(f"the {what} {str(folder)!r} is a symbolic link to {target!r}, which does not "
                                     f"exist: remove the link, or {advice}")
    if not folder.is_dir():
        raise ForeignFolderError(f"the {what} {str(folder)!r} is a file, not a folder: {advice}")
    found = folder_kind(folder)
    if found == kind:
        return
    if found is not None:
        raise ForeignFolderError(f"the {what} {str(folder)!r} is {KINDS[found]}, not {KINDS[kind]}: pwfn will not "
                                 f"write one kind of folder into another. {advice[0].upper() + advice[1:]}")
    try:
        foreign = _foreign_entries(folder)
    except OSError as exc:
        raise ForeignFolderError(f"the {what} {str(folder)!r} cannot be read: {exc}") from exc
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ForeignFolderError(
            f"the {what} {str(folder)!r} exists and is not a pwfn folder (it holds {shown}): pwfn writes only into a "
            f"new or empty folder, or one it made, and never replaces or deletes files it did not write. {advice[0].upper() + advice[1:]}")


def mark(folder: PathLike, kind: str) -> None:
    """Record that ``folder`` is pwfn's ``kind`` folder (call under its lock, after :func:`claim`)."""
    folder = Path(folder)
    if marker_kind(folder) != kind:
        atomic_write_json(folder / MARKER_FILE, {"format": MARKER_FORMAT, "kind": kind,
                                                 "about": "pwfn made this folder and writes into it; "
                                                          "pwfn run --fresh deletes only the files it wrote"})


# --------------------------------------------------------------------------------------------
# --fresh: deleting what pwfn wrote, and nothing else


@dataclass
class _Rule:
    """What pwfn writes in one kind of folder: regular files by name, sub-folders by name (with their rule)."""

    files: Callable[[str], bool]
    folders: Callable[[str, Path], Optional[_Rule]] = lambda name, path: None
    own: frozenset = field(default_factory=lambda: frozenset({MARKER_FILE}))  # deleted only with the folder


def _temp(name: str) -> bool:
    return bool(TEMP_RE.match(name))


def _export_rule(path: Path, staged: bool = False) -> Optional[_Rule]:
    """An export folder's rule: only a pwfn export (or an export staging folder pwfn made) is cleared."""
    if not staged and not _is_export_folder(path):
        return None
    listed = set(EXPORT_FILES)
    meta = _json_small(path / "model.json", 64 << 20) or {}
    if isinstance(meta.get("files"), dict):
        listed.update(n for n in meta["files"] if isinstance(n, str) and "/" not in n)
    return _Rule(files=lambda n: n in listed or _temp(n))


_STAGING = _Rule(files=_temp, folders=lambda name, path: _export_rule(path, staged=True) if name == "export" else None)
_PLOTS = _Rule(files=lambda n: bool(_PLOT_RE.match(n)) or _temp(n))
_TENSORBOARD = _Rule(files=lambda n: bool(_TENSORBOARD_RE.match(n)))


def _common_folders(name: str, path: Path) -> Optional[_Rule]:
    if name == "plots":
        return _PLOTS
    if name == "tensorboard":
        return _TENSORBOARD
    if name == "export":
        return _export_rule(path)
    if _STAGE_RE.match(name):
        return _STAGING
    return None


_METHOD = _Rule(files=lambda n: n in METHOD_FILES or _temp(n), folders=_common_folders,
                own=frozenset({MARKER_FILE, LOCK_FILE}))


def _run_folders(name: str, path: Path) -> Optional[_Rule]:
    rule = _common_folders(name, path)
    if rule is not None:
        return rule
    return _METHOD if _is_method_folder(path) else None


_RUN = _Rule(files=lambda n: n in RUN_FILES or _temp(n), folders=_run_folders, own=frozenset({MARKER_FILE, LOCK_FILE}))


def _entries(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    for name in os.listdir(dir_fd):
        try:
            yield name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue


def _clear(dir_fd: int, path: Path, rule: _Rule, kept: list[str], top: bool, rel: str = "") -> bool:
    """Delete what ``rule`` says pwfn wrote under the open folder ``dir_fd`` (``path``; ``rel`` relative to
    the folder being cleared); True when it is left empty (but for the folder's own marker and lock,
    which go with the folder unless ``top``). What is kept is added to ``kept``."""
    left: list[str] = []
    for name, st in _entries(dir_fd):
        if stat.S_ISREG(st.st_mode) and rule.files(name):
            os.unlink(name, dir_fd=dir_fd)
        elif stat.S_ISDIR(st.st_mode) and (sub := rule.folders(name, path / name)) is not None:
            try:
                fd = os.open(name, _DIRFLAGS, dir_fd=dir_fd)
            except OSError as exc:  # replaced by a link between the listing and the open: keep it
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    raise
                kept.append(rel + name)
                continue
            try:
                empty = _clear(fd, path / name, sub, kept, top=False, rel=f"{rel}{name}/")
            finally:
                os.close(fd)
            if empty:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                left.append(name)
        elif name in rule.own and stat.S_ISREG(st.st_mode):
            left.append(name)
        else:
            kept.append(rel + name + ("/" if stat.S_ISDIR(st.st_mode) else ""))
            left.append(name)
    if top or any(n not in rule.own for n in left):
        return False
    for name in left:  # only the folder's own marker and lock are left: they go with it
        os.unlink(name, dir_fd=dir_fd)
    return True


#: the calls relative to an open folder that keep a swapped-in link from being followed
_FD_OPS = all(f in os.supports_dir_fd for f in (os.open, os.stat, os.unlink, os.rmdir)) and os.listdir in \
    os.supports_fd


def _clear_by_path(path: Path, rule: _Rule, kept: list[str], top: bool, rel: str = "") -> bool:
    """:func:`_clear` by path, for platforms without relative calls: links are still never followed."""
    left: list[str] = []
    for name in os.listdir(path):
        st = os.lstat(path / name)
        if stat.S_ISREG(st.st_mode) and rule.files(name):
            os.unlink(path / name)
        elif stat.S_ISDIR(st.st_mode) and (sub := rule.folders(name, path / name)) is not None:
            if _clear_by_path(path / name, sub, kept, top=False, rel=f"{rel}{name}/"):
                os.rmdir(path / name)
            else:
                left.append(name)
        elif name in rule.own and stat.S_ISREG(st.st_mode):
            left.append(name)
        else:
            kept.append(rel + name + ("/" if stat.S_ISDIR(st.st_mode) else ""))
            left.append(name)
    if top or any(n not in rule.own for n in left):
        return False
    for name in left:
        os.unlink(path / name)
    return True


def clear_run_folder(folder: PathLike) -> list[str]:
    """``--fresh``: delete what pwfn wrote in the run folder ``folder`` (its lock and marker stay);
    returns the entries kept because pwfn did not write them (logged as a warning).

    Refuses (changing nothing) a symbolic link and a folder that is not a pwfn run folder.
    """
    folder = Path(folder)
    claim(folder, RUN, fresh=True, advice="choose another name (--set name=...) or another --out")
    if not folder.exists():
        return []
    kept: list[str] = []
    if _FD_OPS:
        fd = os.open(folder, _DIRFLAGS)
        try:
            _clear(fd, folder, _RUN, kept, top=True)
        finally:
            os.close(fd)
    else:  # platforms without *at() calls (Windows): by path, every entry lstat'ed
        _clear_by_path(folder, _RUN, kept, top=True)
    if kept:
        shown = ", ".join(kept[:8]) + (f" (+{len(kept) - 8} more)" if len(kept) > 8 else "")
        log.warning("--fresh kept %d entr%s in %s that pwfn did not write: %s", len(kept),
                    "y" if len(kept) == 1 else "ies", folder, shown)
    return kept


__all__ = ["EXPORT", "KINDS", "MARKER_FILE", "METHOD", "RUN", "ForeignFolderError", "claim", "clear_run_folder",
           "folder_kind", "mark", "marker_kind"]

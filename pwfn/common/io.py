"""Crash-safe file writing and versioned checkpoints.

Every file a run writes goes through :func:`atomic_write_bytes`: a temp file in the same folder,
flushed and fsync'd, then renamed over the target, so a reader (or a resumed run) sees either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import CheckpointError, StorageError, storage_error
from .files import regular_file_problem

CHECKPOINT_FORMAT = 1
_CHECKPOINT_MAGIC = "pwfn-checkpoint"

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)

#: every temp file :func:`atomic_write_bytes` creates matches this pattern (``.<name>.<random>.tmp``)
TEMP_GLOB = ".*.tmp"
#: ... and this one exactly (``mkstemp``'s 8 random characters): nothing else is ever taken for one
TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished files get the usual 0666 & ~umask, like open() would give
_FILE_MODE = 0o666 & ~_umask()


#: signals held back while a file is written: Ctrl-C, and SIGTERM when the CLI handles it like Ctrl-C
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (and a handled SIGTERM) back until the block is done, then deliver it (a write
    is never cut in half).

    Only signals with a Python-level handler are held (a SIGTERM left at its default still kills
    at once, as the user asked). Only the main thread can handle signals; elsewhere the block
    runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    received: list[tuple[int, Any]] = []
    try:
        for sig in _DEFERRED_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is None or (sig != signal.SIGINT and not callable(handler)):
                continue
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signum, frame = received[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # default_int_handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename.

    A reader sees the old file or the new one, never half of one; a Ctrl-C that arrives during
    the write is delivered once the file is complete, and any failure removes the temp file.
    """
    path = Path(path)
    try:
        _write_replace(path, data)
    except StorageError:
        raise
    except OSError as exc:  # a full disk, a read-only filesystem, a name too long ...: say which file
        if exc.filename is None:
            exc.filename = str(path)
        raise storage_error(exc, "cannot write") from exc
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sigint_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def stale_temp_files(folder: PathLike) -> list[Path]:
    """Temp files that an interrupted :func:`atomic_write_bytes` (SIGKILL, power loss) left in ``folder``:
    regular files (never a link) named as it names them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.glob(TEMP_GLOB):
        try:
            if TEMP_RE.match(p.name) and stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p)
        except OSError:
            continue
    return sorted(out)


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete :func:`stale_temp_files` (call only when no other process writes into ``folder``)."""
    removed = []
    for p in stale_temp_files(folder):
        try:
            p.unlink()
            removed.append(p)
        except OSError as exc:  # pragma: no cover - permissions
            log.warning("cannot remove stale temp file %s: %s", p, exc)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _json_default_lenient(obj: Any) -> Any:
    try:
        return _json_default(obj)
    except TypeError:
        return str(obj)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from ``obj`` (tensors, numpy scalars, dataclasses; anything else as text)."""
    return json.loads(json.dumps(obj, default=_json_default_lenient))


def write_jsonl(path: PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file in full (atomically): it always matches the checkpointed history."""
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def save_checkpoint(path: PathLike, payload: dict, *, kind: str) -> None:
    """Save ``payload`` with a header (format version, kind, SHA-256 of the body)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = json.dumps(
        {"magic": _CHECKPOINT_MAGIC, "format": CHECKPOINT_FORMAT, "kind": kind,
         "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    ).encode()
    atomic_write_bytes(path, len(header).to_bytes(4, "little") + header + body)


def checkpoint_kind(path: PathLike) -> Optional[str]:
    """The ``kind`` in the header of a checkpoint :func:`save_checkpoint` wrote (``baseline``, ``run-pwfn``
    ...), or None for anything else (no file, a link, a FIFO, another file). Reads the header only."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, 4 + 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    n = int.from_bytes(raw[:4], "little")
    if len(raw) < 4 + n or not 0 < n <= 4096:
        return None
    try:
        header = json.loads(raw[4 : 4 + n].decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(header, dict) or header.get("magic") != _CHECKPOINT_MAGIC or not isinstance(header.get("kind"), str):
        return None
    return header["kind"]


def load_checkpoint(path: PathLike, *, kind: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; any damage raises ``CheckpointError``."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:  # a FIFO or a device would block or never end
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it {problem}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    try:
        n = int.from_bytes(raw[:4], "little")
        if len(raw) < 4 or n <= 0 or n > 4096:
            raise ValueError("bad header length")
        header = json.loads(raw[4 : 4 + n].decode())
        if not isinstance(header, dict):
            raise ValueError("header is not a mapping")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a pwfn checkpoint (unreadable header: {exc})") from exc
    if header.get("magic") != _CHECKPOINT_MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a pwfn checkpoint")
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {header.get('format')!r}; this pwfn reads format {CHECKPOINT_FORMAT}"
        )
    if header.get("kind") != kind:
        raise CheckpointError(f"{str(path)!r} is a {header.get('kind')!r} checkpoint, expected {kind!r}")
    body = raw[4 + n :]
    if len(body) != header.get("size") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{str(path)!r} is truncated or corrupted (checksum mismatch)")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings, the numpy RNG state),
        # so loading one can never run code, whoever wrote the file
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # a checksummed body that still fails to load: wrong torch, tampering
        raise CheckpointError(f"{str(path)!r} could not be loaded: {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a checkpoint mapping")
    return payload


def _numpy_globals() -> list:
    """What a pickled numpy RNG state (``np.random.get_state()``) needs: arrays and dtypes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    out: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                 (reconstruct, "numpy.core.multiarray._reconstruct"),
                 (reconstruct, "numpy._core.multiarray._reconstruct")]
    return out


def load_state_dict_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """``load_state_dict`` whose mismatch errors name the checkpoint and say what to do."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit this model (was it written for another model or config?): {exc}"
        ) from exc

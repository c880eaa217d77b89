"""Crash-safe file writing and versioned checkpoints.

Every file a run writes goes through :func:`atomic_write_bytes`: a temp file in the same folder,
flushed and fsync'd, then renamed over the target, so a reader (or a resumed run) sees either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError

CHECKPOINT_FORMAT = 1
_CHECKPOINT_MAGIC = "pwfn-checkpoint"

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


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


def load_checkpoint(path: PathLike, *, kind: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; any damage raises ``CheckpointError``."""
    path = Path(path)
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
    except (ValueError, UnicodeDecodeError) as exc:
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
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    except Exception as exc:  # a checksummed body that still fails to load: wrong torch, tampering
        raise CheckpointError(f"{str(path)!r} could not be loaded: {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a checkpoint mapping")
    return payload


def load_state_dict_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """``load_state_dict`` whose mismatch errors name the checkpoint and say what to do."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit this model (was it written for another model or config?): {exc}"
        ) from exc

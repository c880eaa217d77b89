"""The packed format's codecs (:mod:`pwfn.export.packing` lays out the file): little-endian tensor
bytes, CRC32, varints, symbol tables, and the two codings of index streams, constriction's ANS
coder and fixed-width bit packing. Every malformed input raises ``ArtefactError``, never an
IndexError or a decoder's own exception.

A symbol table is varints: n, first symbol, n-1 gaps minus one, then n counts minus one. The
categorical model is ``counts / counts.sum()`` in float64, ``perfect=False``, over the table's
symbols in ascending order, so encoder and decoder build the identical model.
"""

from __future__ import annotations

import math
import sys
import zlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pwfn.errors import ArtefactError

try:  # constriction is a hard dependency; the message says what is missing if it is not there
    import constriction
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError("pwfn.export.codec needs the 'constriction' package") from exc


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def _le_bytes(t: Tensor) -> bytes:
    """A tensor's elements as little-endian bytes of its own dtype (row-major)."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return b""
    raw = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and flat.element_size() > 1:  # pragma: no cover - LE hosts
        raw = raw.reshape(-1, flat.element_size())[:, ::-1]
    return raw.tobytes()


def _from_le_bytes(buf: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    """Inverse of ``_le_bytes``; the caller has checked the length."""
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = np.frombuffer(buf, dtype=np.uint8)
    if sys.byteorder == "big" and size > 1:  # pragma: no cover - LE hosts
        raw = raw.reshape(-1, size)[:, ::-1]
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


class _Reader:
    """Bounds-checked varint reader: malformed input raises ``ArtefactError``, never IndexError."""

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def varint(self) -> int:
        result = shift = 0
        while True:
            if self.pos >= len(self.buf):
                raise ArtefactError(f"{self.what}: truncated varint")
            byte = self.buf[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ArtefactError(f"{self.what}: varint too long")

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ArtefactError(f"{self.what}: {len(self.buf) - self.pos} unexpected bytes")


def _encode_table(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    """Symbols (ascending, unique) and their positive counts as varints."""
    out = bytearray()
    _put_varint(out, len(symbols))
    prev = -1
    for s in symbols.tolist():
        _put_varint(out, s - prev - 1 if prev >= 0 else s)
        prev = s
    for c in counts.tolist():
        _put_varint(out, c - 1)
    return bytes(out)


def _decode_table(buf: bytes, alphabet: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    r = _Reader(buf, what)
    n = r.varint()
    if not 2 <= n <= alphabet:
        raise ArtefactError(f"{what}: {n} symbols for an alphabet of {alphabet}")
    symbols = np.empty(n, dtype=np.int64)
    prev = -1
    for i in range(n):
        gap = r.varint()
        prev = gap if prev < 0 else prev + gap + 1
        if prev >= alphabet:
            raise ArtefactError(f"{what}: symbol {prev} outside the alphabet of {alphabet}")
        symbols[i] = prev
    counts = np.array([r.varint() + 1 for _ in range(n)], dtype=np.float64)
    r.done()
    return symbols, counts


def _model(counts: np.ndarray) -> Any:
    """The categorical model both sides build from the same integer counts."""
    counts = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def _ans_encode(local: np.ndarray, counts: np.ndarray) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(local.astype(np.int32, copy=False), _model(counts))
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decode(buf: bytes, counts: np.ndarray, n: int, what: str) -> np.ndarray:
    if len(buf) % 4:
        raise ArtefactError(f"{what}: ANS payload of {len(buf)} bytes is not whole 32-bit words")
    try:
        words = np.frombuffer(buf, dtype="<u4").astype(np.uint32)
        coder = constriction.stream.stack.AnsCoder(words)
        local = coder.decode(_model(counts), n)
        empty = coder.is_empty()
    except Exception as exc:  # the decoder's own errors become ours
        raise ArtefactError(f"{what}: ANS decoding failed ({exc})") from exc
    if not empty:
        raise ArtefactError(f"{what}: ANS stream has data left after {n} symbols")
    local = np.asarray(local, dtype=np.int64)
    if local.size and (local.min() < 0 or local.max() >= len(counts)):
        raise ArtefactError(f"{what}: ANS decoded a symbol outside its table")
    return local


def _fixed_width(alphabet: int) -> int:
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 0


def _fixed_encode(idx: np.ndarray, width: int) -> bytes:
    bits = ((idx[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _fixed_decode(buf: bytes, n: int, width: int, alphabet: int, what: str) -> np.ndarray:
    if len(buf) != (n * width + 7) // 8:
        raise ArtefactError(
            f"{what}: fixed-width payload has {len(buf)} bytes, expected {(n * width + 7) // 8}"
        )
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: n * width]
    idx = (bits.reshape(n, width).astype(np.int64) << np.arange(width, dtype=np.int64)).sum(1)
    if idx.size and idx.max() >= alphabet:
        raise ArtefactError(f"{what}: fixed-width index outside the alphabet of {alphabet}")
    return idx

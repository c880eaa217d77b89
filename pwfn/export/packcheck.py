"""What a packed artefact may claim, checked before anything is decoded or allocated.

A ``.pwfn`` file's manifest declares every tensor's shape; a few bytes can declare a tensor of
billions of values (a constant tensor is one symbol, an ANS stream of a very skewed table a few
words). Decoding allocates what the manifest declares, so the declaration is bounded first by
what the file can justify (:func:`check_declared_sizes`): the decoded tensors may hold at most
:data:`MAX_EXPANSION` times the file's own bytes, or :data:`MIN_DECODED_CAP` for a small file.
Honest files stay far below it: even a network of one value in two (~0.5 bits per weight) expands
64-fold. The codebook must hold distinct finite values, its extra symbols only the other signed
zero, and its stored power-of-two terms must sum to its values (:func:`check_codebook`).

The artefact's file is read as a regular file of bounded size (:func:`read_artefact_bytes`):
a FIFO, a device or a folder is refused by name instead of blocking or filling memory.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..common.files import read_limited, regular_file_problem
from ..errors import ArtefactError

__all__ = ["MAX_EXPANSION", "MAX_PACKED_BYTES", "MIN_DECODED_CAP", "check_codebook", "check_declared_sizes",
           "decoded_cap", "read_artefact_bytes"]

#: decoded tensors may hold at most this many times the file's bytes ...
MAX_EXPANSION = 1024
#: ... or this many bytes, whichever is larger
MIN_DECODED_CAP = 64 << 20
#: the largest artefact file read (the file's own size is checked before reading)
MAX_PACKED_BYTES = 1 << 40

_ELEMENT_BYTES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16, "int8": 1,
    "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}
#: decoding a quantised value holds its index (int64) and its float32 bits besides the result
_QUANTISED_OVERHEAD = 12


def read_artefact_bytes(path: str | os.PathLike, what: str = "packed artefact") -> bytes:
    """The bytes of a ``.pwfn`` file: a regular file of at most :data:`MAX_PACKED_BYTES`, else ``ArtefactError``."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise ArtefactError(f"cannot read {what} {str(path)!r}: it {problem}")
    return read_limited(path, what, MAX_PACKED_BYTES, error=ArtefactError)


def decoded_cap(file_bytes: int) -> int:
    """Most bytes the decoded tensors of a ``file_bytes``-byte artefact may hold."""
    return max(MIN_DECODED_CAP, MAX_EXPANSION * int(file_bytes))


def check_declared_sizes(manifest: dict[str, Any], file_bytes: int, max_decoded_bytes: int | None = None) -> int:
    """Refuse a manifest whose tensors would decode to more than the file can justify.

    Returns the bytes the decoded tensors (and their decoding) take. Runs on the parsed manifest,
    before any tensor is decoded; malformed entries are left to the decoder's own checks.
    """
    cap = decoded_cap(file_bytes) if max_decoded_bytes is None else int(max_decoded_bytes)
    total = 0
    tensors = manifest.get("tensors")
    if not isinstance(tensors, list):
        raise ArtefactError("malformed manifest: 'tensors' is not a list")
    for e in tensors:
        if not isinstance(e, dict):
            raise ArtefactError("malformed manifest: a tensor entry is not an object")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ArtefactError(f"malformed manifest: tensor {e.get('name')!r} has a bad shape {shape!r}")
        n = math.prod(shape)
        size = _ELEMENT_BYTES.get(e.get("dtype"), 8)  # unknown dtypes are refused by the decoder
        per = size + (_QUANTISED_OVERHEAD if e.get("kind") == "quantised" else 0)
        total += n * per
        if total > cap:
            raise ArtefactError(
                f"the manifest declares tensors (tensor {e.get('name')!r}: {n:,} values) that would decode to more "
                f"than {cap:,} bytes from a file of {file_bytes:,} bytes (more than {MAX_EXPANSION} times its size): "
                "it is not an artefact pwfn wrote; nothing was decoded"
            )
    return total


def check_codebook(cb_bits: np.ndarray, extra_bits: np.ndarray, terms: Any) -> None:
    """The codebook holds distinct finite float32 values, the extra symbols are the signed zero the
    codebook lacks, and stored terms (``[[sign, exponent], ...]`` per value) sum to the values exactly."""
    values = cb_bits.view(np.float32)
    if values.size and not bool(np.isfinite(values).all()):
        bad = [f"{int(b):08x}" for b, v in zip(cb_bits.tolist(), values.tolist()) if not math.isfinite(v)][:3]
        raise ArtefactError(f"the codebook holds non-finite values (float32 bits {', '.join(bad)}): "
                            "it is not an artefact pwfn wrote")
    if np.unique(values).size != values.size:  # by value: +0.0 and -0.0 count as one
        raise ArtefactError("the codebook holds a value twice: it is not an artefact pwfn wrote")
    zeros = {0x00000000, 0x80000000}
    extras = extra_bits.tolist()
    if len(set(extras)) != len(extras) or not set(extras) <= zeros or set(extras) & set(cb_bits.tolist()):
        raise ArtefactError("malformed manifest: the extra symbols must be the signed zero the codebook lacks")
    if extras and not zeros & set(cb_bits.tolist()):
        raise ArtefactError("malformed manifest: extra symbols without a zero in the codebook")
    if terms is None:
        return
    if not isinstance(terms, list) or len(terms) != values.size:
        raise ArtefactError("malformed manifest: terms do not match the codebook")
    for value, entry in zip(values.astype(np.float64).tolist(), terms):
        ok = isinstance(entry, list) and all(
            isinstance(p, list) and len(p) == 2 and p[0] in (1, -1) and not isinstance(p[0], bool)
            and isinstance(p[1], int)
            and not isinstance(p[1], bool) and abs(p[1]) <= 1000 for p in entry)
        if not ok or math.fsum(math.ldexp(s, x) for s, x in entry) != value:
            raise ArtefactError(f"malformed manifest: the stored terms {entry!r} do not sum to the codebook value "
                                f"{value!r}")

"""The packed artefact: a fixed network's weights as entropy-coded codebook indices, in one file.

Why a custom format: a weight-fixed network holds few distinct values, so its honest size
is the entropy of its codebook indices, not 32 bits per weight. This module turns a dict
of tensors into bytes that get close to that bound and back, bit for bit.

File layout (all integers little-endian)::

    header   magic b"PWFNPACK" | u32 format version | u64 stored manifest length
             | u64 manifest JSON length | sha256(stored manifest)
    manifest UTF-8 JSON (compact), zlib-compressed (format version 2; version 1 stored it
             uncompressed and is no longer read)
    data     sections, back to back; offsets in the manifest are relative to the data start
    trailer  sha256 of every byte before it

Why the manifest is compressed: it names every tensor with its shape, dtype, offsets and
CRCs; for a full ResNet-20 state_dict that was ~16 KB of JSON, as much as a fifth of the
coded weights. zlib brings it to ~2 KB. The header's SHA-256 covers the stored (compressed)
bytes, so a damaged manifest is rejected before it is decompressed, and decompression is
capped at the announced JSON length (no zip bombs).

The manifest holds the format version, the coder, the shared codebook (exact float32 bits as
8-hex-digit big-endian words), optional power-of-two terms per codebook value, the shared
symbol tables, and per tensor (in the order given): name, dtype, shape, kind and coding,
each section as ``[offset, length, crc32]``, and for quantised tensors a CRC32 of the
decoded tensor's bytes (for raw tensors the data section's CRC32 already is that).

Quantised tensors are codebook indices. Each is coded in whichever mode is smallest:

- ``empty``  no elements, no section;
- ``const``  one symbol only (including K = 1), the symbol is in the manifest;
- ``ans``    constriction's ANS coder with a categorical model built from exact symbol
  counts, either the tensor's own table (``table: "own"``, a section of varints over only
  the symbols it uses) or a shared table (``table: i``, an index into ``tables``);
- ``fixed``  ceil(log2 A)-bit little-endian bit-packed indices (A = alphabet size).

A symbol table is varints: n, first symbol, n-1 gaps minus one, then n counts minus one.
The categorical model is ``counts / counts.sum()`` in float64, ``perfect=False``, over the
table's symbols in ascending order, so encoder and decoder build the identical model.

Unquantised tensors are their raw little-endian bytes (``mode: "raw"``), any dtype.

Signed zero: codebook matching is by exact float32 bits, so values round-trip bit for bit.
A derived codebook holds one zero, +0.0 (values are unique by value, as in
``pwfn.core.metrics``). When a tensor holds the other zero than the codebook, that bit pattern
is appended to the coding alphabet as an "extra symbol" (manifest ``extra_symbols_hex``);
the codebook returned by ``unpack`` stays exactly the one that was packed.

Reading validates before decoding: magic, version, manifest SHA-256, file length, every
section's CRC32, the whole-file SHA-256, then the manifest's structure; decoded tensors are
checked against their CRC32. Every problem raises ``ArtefactError`` naming it.

One idea, so one module above the usual length: the ``.pwfn`` byte layout, its writer (:func:`pack`)
beside its reader (:func:`unpack`, :func:`size_breakdown`), so that a change to the header, the
manifest or a section is made on both sides at once. The codecs (bytes, varints, tables, ANS and
fixed-width coding) are :mod:`pwfn.export.codec`; what a file may claim is :mod:`pwfn.export.packcheck`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pwfn.common.io import atomic_write_bytes  # the one place every pwfn file is written
from pwfn.errors import ArtefactError, PackError

from .codec import (
    _ans_decode,
    _ans_encode,
    _crc,
    _decode_table,
    _encode_table,
    _fixed_decode,
    _fixed_encode,
    _fixed_width,
    _from_le_bytes,
    _le_bytes,
)
from .packcheck import check_codebook, check_declared_sizes, read_artefact_bytes

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PackError",
    "PackedModel",
    "pack",
    "read_packed",
    "size_breakdown",
    "unpack",
    "write_packed",
]

logger = logging.getLogger(__name__)

MAGIC = b"PWFNPACK"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<8sIQQ32s")
_MAX_MANIFEST = 1 << 30  # refuse to inflate a manifest announced larger than 1 GiB
_TRAILER_LEN = 32
_CODER = "constriction.stream.stack.AnsCoder/Categorical(perfect=False)"

_DTYPES: dict[str, torch.dtype] = {
    str(d).replace("torch.", ""): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    )
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_QUANTISABLE = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
_BITS_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


@dataclass(frozen=True)
class PackedModel:
    """What ``unpack`` returns: the tensors in their packed order plus the codebook facts."""

    tensors: dict[str, Tensor]
    codebook: Tensor
    terms: list[list[tuple[int, int]]] | None
    metadata: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)


# --------------------------------------------------------------------------- codebook handling


def _bits_of(t: Tensor) -> Tensor:
    """Integer view of a float tensor's bits (same element size), for exact comparison."""
    return t.view(_BITS_VIEW[t.element_size()])


def _to_float32_exact(t: Tensor, what: str) -> Tensor:
    """The tensor as float32, refusing values float32 cannot hold exactly."""
    flat = t.detach().reshape(-1).cpu()
    f = flat.to(torch.float32)
    if flat.dtype != torch.float32 and not torch.equal(_bits_of(f.to(flat.dtype)), _bits_of(flat)):
        raise PackError(f"{what} has values that float32 cannot represent exactly")
    return f


def _prepare_codebook(
    codebook: Tensor | None, q_flat: dict[str, Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """Codebook and extra-symbol bit patterns (uint32), validated against the quantised values."""
    if codebook is None:
        if q_flat:
            allv = torch.cat(list(q_flat.values()))
            if bool(torch.isnan(allv).any()):
                raise PackError("quantised tensors contain NaN")
            cb = torch.unique(allv + 0.0, sorted=True)  # + 0.0 folds -0.0 into +0.0
        else:
            cb = torch.empty(0, dtype=torch.float32)
    else:
        if not isinstance(codebook, Tensor) or codebook.dim() != 1:
            raise PackError("codebook must be a 1-D tensor")
        if not codebook.is_floating_point():
            raise PackError("codebook must be a floating-point tensor")
        cb = _to_float32_exact(codebook, "codebook")
        if not bool(torch.isfinite(cb).all()):
            raise PackError("codebook values must be finite")
    cb_bits = cb.view(torch.int32).numpy().view(np.uint32).copy()
    if len(np.unique(cb_bits)) != len(cb_bits):
        raise PackError("codebook has repeated values")

    extras: list[int] = []
    zeros = {0x00000000, 0x80000000}
    present = zeros & set(cb_bits.tolist())
    if present:
        for f in q_flat.values():
            used = set(np.unique(f[f == 0].view(torch.int32).numpy().view(np.uint32)).tolist())
            extras.extend(sorted((used - present) - set(extras)))
    return cb_bits, np.array(extras, dtype=np.uint32)


def _check_terms(terms: Any, cb_bits: np.ndarray) -> list[list[list[int]]] | None:
    """Terms as JSON-ready lists, each summing exactly to its codebook value."""
    if terms is None:
        return None
    if hasattr(terms, "signs") and hasattr(terms, "exponents"):
        # A padded (signs, exponents) decomposition such as pwfn.core.centres.decompose returns:
        # sign 0 marks padding.
        terms = [
            [(s, e) for s, e in zip(srow, erow) if s != 0]
            for srow, erow in zip(terms.signs.tolist(), terms.exponents.tolist())
        ]
    values = cb_bits.view(np.float32).astype(np.float64).tolist()
    try:
        out = [[[int(s), int(e)] for s, e in entry] for entry in terms]
    except (TypeError, ValueError) as exc:
        raise PackError(
            "terms must be a list (one per codebook value) of [sign, exponent] pairs"
        ) from exc
    if len(out) != len(values):
        raise PackError(f"terms has {len(out)} entries for a codebook of {len(values)}")
    for value, entry in zip(values, out):
        if any(s not in (1, -1) or abs(e) > 1000 for s, e in entry):
            raise PackError(
                f"terms of {value!r}: signs must be +-1 and exponents moderate: {entry}"
            )
        if math.fsum(math.ldexp(s, e) for s, e in entry) != value:
            raise PackError(f"terms {entry} do not sum to codebook value {value!r}")
    return out


# --------------------------------------------------------------------------- pack


@dataclass
class _Choice:
    """One quantised tensor's candidate coding (mode, sections and their size)."""

    mode: str
    cost: int
    table: Any = None
    table_bytes: bytes = b""
    data: bytes = b""


def _choose_codings(
    idx: dict[str, np.ndarray], alphabet: int
) -> tuple[dict[str, _Choice], list[bytes]]:
    """Per tensor, the smallest of own-table ANS, shared-table ANS and fixed width.

    The shared table starts as the pooled counts of every tensor; it is then re-pooled over
    only the tensors that chose it (a better fit for them) for a few rounds, keeping the
    cheapest configuration seen, shared table bytes included.
    """
    width = _fixed_width(alphabet)
    counts = {n: np.bincount(i, minlength=alphabet) for n, i in idx.items()}
    own: dict[str, _Choice] = {}
    fixed_cost: dict[str, int] = {}
    for name, i in idx.items():
        used = np.flatnonzero(counts[name])
        remap = np.zeros(alphabet, dtype=np.int64)
        remap[used] = np.arange(len(used))
        tb = _encode_table(used, counts[name][used])
        data = _ans_encode(remap[i], counts[name][used])
        own[name] = _Choice("ans", len(tb) + len(data), "own", tb, data)
        fixed_cost[name] = (i.size * width + 7) // 8

    best: tuple[int, dict[str, _Choice], list[bytes]] | None = None
    pool = set(idx)
    for _ in range(3):
        if not pool:
            break
        pooled = sum(counts[n] for n in pool)
        used = np.flatnonzero(pooled)
        shared_tb = _encode_table(used, pooled[used])
        remap = np.full(alphabet, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        choice: dict[str, _Choice] = {}
        for name, i in idx.items():
            options = [own[name]]
            if (remap[np.flatnonzero(counts[name])] >= 0).all():
                data = _ans_encode(remap[i], pooled[used])
                options.insert(0, _Choice("ans", len(data), 0, b"", data))
            if fixed_cost[name] < min(o.cost for o in options):
                options = [_Choice("fixed", fixed_cost[name], None, b"", _fixed_encode(i, width))]
            choice[name] = min(options, key=lambda o: o.cost)
        users = {n for n, c in choice.items() if c.table == 0}
        total = sum(c.cost for c in choice.values()) + (len(shared_tb) if users else 0)
        if best is None or total < best[0]:
            best = (total, choice, [shared_tb] if users else [])
        if users == pool:
            break
        pool = users
    if best is None:
        return {}, []
    return best[1], best[2]


def pack(
    tensors: Mapping[str, Tensor],
    quantised: Iterable[str],
    codebook: Tensor | None = None,
    terms: Any = None,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
) -> bytes:
    """Pack tensors into the artefact format; quantised ones as entropy-coded codebook indices.

    ``codebook`` defaults to the distinct values of the quantised tensors; when given, every
    quantised value must be in it (by exact bits, see the module note on signed zero).
    ``terms`` gives each codebook value's power-of-two terms as ``[sign, exponent]`` pairs
    (value = sum of sign * 2**exponent), checked exactly; an object with padded ``signs`` and
    ``exponents`` tensors (``pwfn.core.centres.Decomposition``) is accepted too. ``metadata`` must be
    JSON-serialisable. With ``verify`` the result is unpacked and compared bit for bit
    before it is returned, so a coder bug can never yield a silently wrong file.
    Raises ``PackError`` (a ``ValueError``) on unusable input.
    """
    q_names = set(quantised)
    unknown = q_names - set(tensors)
    if unknown:
        raise PackError(f"quantised names not among the tensors: {sorted(unknown)}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise PackError(
                f"tensors must map str to Tensor, got {type(name).__name__} -> {type(t).__name__}"
            )
        if str(t.dtype).replace("torch.", "") not in _DTYPES:
            raise PackError(f"tensor {name!r}: dtype {t.dtype} is not supported")
        if t.layout != torch.strided:
            raise PackError(f"tensor {name!r}: only dense tensors can be packed")
        if name in q_names and t.dtype not in _QUANTISABLE:
            raise PackError(f"quantised tensor {name!r} must be floating point, got {t.dtype}")
        if name in q_names and bool(torch.isnan(t).any()):
            raise PackError(f"quantised tensor {name!r} contains NaN")

    q_flat = {
        n: _to_float32_exact(t, f"quantised tensor {n!r}")
        for n, t in tensors.items()
        if n in q_names
    }
    cb_bits, extra_bits = _prepare_codebook(codebook, q_flat)
    terms_json = _check_terms(terms, cb_bits)
    alpha_bits = np.concatenate([cb_bits, extra_bits])
    alphabet = len(alpha_bits)
    order = np.argsort(alpha_bits, kind="stable")
    sorted_bits = alpha_bits[order]

    # Codebook index of every quantised weight; degenerate tensors are settled here.
    coded: dict[str, np.ndarray] = {}
    q_entries: dict[str, dict[str, Any]] = {}
    for name, f in q_flat.items():
        bits = f.view(torch.int32).numpy().view(np.uint32)
        if alphabet == 0:
            if bits.size:
                raise PackError(f"quantised tensor {name!r} has values but the codebook is empty")
            q_entries[name] = {"mode": "empty"}
            continue
        pos = np.minimum(np.searchsorted(sorted_bits, bits), alphabet - 1)
        missing = sorted_bits[pos] != bits
        if missing.any():
            bad = bits[missing][:5].view(np.float32).tolist()
            raise PackError(f"quantised tensor {name!r} has values not in the codebook, e.g. {bad}")
        i = order[pos].astype(np.int64)
        if i.size == 0:
            q_entries[name] = {"mode": "empty"}
        elif (i == i[0]).all():
            q_entries[name] = {"mode": "const", "symbol": int(i[0])}
        else:
            coded[name] = i
    choices, shared_tables = _choose_codings(coded, alphabet)

    sections: list[bytes] = []

    def section(b: bytes) -> list[int]:
        offset = sum(len(s) for s in sections)
        sections.append(b)
        return [offset, len(b), _crc(b)]

    tables_json = [section(tb) for tb in shared_tables]
    entries = []
    for name, t in tensors.items():
        raw = _le_bytes(t)
        entry: dict[str, Any] = {
            "name": name,
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
        }
        if name in q_names:
            entry["kind"] = "quantised"
            if name in choices:
                c = choices[name]
                entry["mode"] = c.mode
                if c.mode == "fixed":
                    entry["width"] = _fixed_width(alphabet)
                else:
                    entry["table"] = c.table
                    if c.table == "own":
                        entry["table_section"] = section(c.table_bytes)
                entry["data"] = section(c.data)
            else:
                entry.update(q_entries[name])
        else:
            entry["kind"] = "raw"
            entry["mode"] = "raw"
            entry["data"] = section(raw)  # its section CRC is the value checksum
        if name in q_names:
            entry["value_crc32"] = _crc(raw)
        entries.append(entry)

    manifest: dict[str, Any] = {
        "format": "pwfn-pack",
        "format_version": FORMAT_VERSION,
        "byteorder": "little",
        "coder": _CODER,
        "codebook": {
            "dtype": "float32",
            "size": int(len(cb_bits)),
            "bits_hex": "".join(f"{v:08x}" for v in cb_bits.tolist()),
            "terms": terms_json,
        },
        "extra_symbols_hex": "".join(f"{v:08x}" for v in extra_bits.tolist()),
        "tables": tables_json,
        "tensors": entries,
        "data_length": sum(len(s) for s in sections),
        "metadata": metadata if metadata is not None else {},
    }
    if not isinstance(manifest["metadata"], dict):
        raise PackError("metadata must be a dict")
    try:
        mbytes = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PackError(f"metadata is not JSON-serialisable: {exc}") from exc

    stored = zlib.compress(mbytes, 9)
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, len(stored), len(mbytes), hashlib.sha256(stored).digest()
    )
    body = b"".join([head, stored, *sections])
    out = body + hashlib.sha256(body).digest()
    logger.debug(
        "packed %d tensors (%d quantised, K=%d) into %d bytes (manifest %d, %d as JSON; "
        "shared tables %d)",
        len(entries),
        len(q_names),
        len(cb_bits),
        len(out),
        len(stored),
        len(mbytes),
        sum(len(t) for t in shared_tables),
    )
    if verify:
        _verify_round_trip(out, tensors)
    return out


def _verify_round_trip(data: bytes, tensors: Mapping[str, Tensor]) -> None:
    """Unpack what was just packed and insist on identical bytes for every tensor."""
    back = unpack(data).tensors
    for name, t in tensors.items():
        r = back.get(name)
        if r is None or r.dtype != t.dtype or r.shape != t.shape or _le_bytes(r) != _le_bytes(t):
            raise ArtefactError(f"internal error: tensor {name!r} did not survive the round trip")


def write_packed(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    quantised: Iterable[str],
    codebook: Tensor | None = None,
    terms: Any = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Pack and write atomically (temp file in the same folder, fsync, rename); returns bytes.

    Readers never see a half-written artefact: either the old file or the complete new one.
    """
    data = pack(tensors, quantised, codebook=codebook, terms=terms, metadata=metadata)
    atomic_write_bytes(path, data)
    return len(data)


# --------------------------------------------------------------------------- unpack


def _parse_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Check magic, version, manifest checksum and length; return the manifest and data start."""
    if len(data) < len(MAGIC):
        if MAGIC.startswith(bytes(data)):
            raise ArtefactError(f"truncated: {len(data)} bytes is shorter than the header")
        raise ArtefactError("bad magic: not a pwfn packed artefact")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise ArtefactError("bad magic: not a pwfn packed artefact")
    if len(data) >= len(MAGIC) + 4:  # the version first, so an old file says what it is
        (version,) = struct.unpack_from("<I", data, len(MAGIC))
        if version != FORMAT_VERSION:
            raise ArtefactError(
                f"unsupported version {version}: this pwfn reads format version {FORMAT_VERSION}"
            )
    if len(data) < _HEADER.size:
        raise ArtefactError(f"truncated: {len(data)} bytes is shorter than the header")
    _, version, slen, mlen, mdigest = _HEADER.unpack_from(data, 0)
    start = _HEADER.size
    if start + slen + _TRAILER_LEN > len(data):
        raise ArtefactError(
            f"truncated: the header announces a {slen}-byte manifest, the file has {len(data)} bytes"
        )
    stored = bytes(data[start : start + slen])
    if hashlib.sha256(stored).digest() != mdigest:
        raise ArtefactError("checksum mismatch in section manifest")
    if mlen > _MAX_MANIFEST:
        raise ArtefactError(f"malformed manifest: announced JSON length {mlen} is implausible")
    try:
        inflater = zlib.decompressobj()
        mbytes = inflater.decompress(stored, mlen + 1)
        complete = inflater.eof and not inflater.unused_data and not inflater.unconsumed_tail
    except zlib.error as exc:
        raise ArtefactError(f"malformed manifest: zlib: {exc}") from exc
    if not complete or len(mbytes) != mlen:
        raise ArtefactError(
            f"malformed manifest: compressed manifest does not inflate to the announced {mlen} bytes"
        )
    try:
        manifest = json.loads(mbytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtefactError(f"malformed manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtefactError("malformed manifest: not a JSON object")
    if manifest.get("format_version") != version:
        raise ArtefactError(
            f"unsupported version {manifest.get('format_version')!r} in manifest "
            f"(header says {version})"
        )
    return manifest, start + slen


def _sections_of(manifest: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """Every section the manifest names, with a human-readable label for error messages."""
    out = [(f"shared table {i}", s) for i, s in enumerate(manifest["tables"])]
    for e in manifest["tensors"]:
        if "table_section" in e:
            out.append((f"table of tensor {e['name']!r}", e["table_section"]))
        if "data" in e:
            out.append((f"data of tensor {e['name']!r}", e["data"]))
    return out


def _check_layout(data: bytes, manifest: dict[str, Any], start: int) -> list[tuple[str, list[int]]]:
    """File length, section bounds and section CRCs, then the whole-file checksum."""
    length = manifest["data_length"]
    if not isinstance(length, int) or length < 0:
        raise ArtefactError("malformed manifest: bad data_length")
    expected = start + length + _TRAILER_LEN
    if len(data) < expected:
        raise ArtefactError(f"truncated: expected {expected} bytes, the file has {len(data)}")
    if len(data) > expected:
        raise ArtefactError(
            f"{len(data) - expected} unexpected bytes after the end of the artefact"
        )
    sections = _sections_of(manifest)
    pos = 0
    for label, sec in sorted(sections, key=lambda x: x[1][0]):
        if (
            not isinstance(sec, list)
            or len(sec) != 3
            or not all(isinstance(v, int) and v >= 0 for v in sec)
            or sec[0] != pos
        ):
            raise ArtefactError(f"malformed manifest: section {label} has a bad layout {sec!r}")
        pos += sec[1]
    if pos != length:
        raise ArtefactError(f"malformed manifest: sections cover {pos} of {length} data bytes")
    for label, (off, n, crc) in sections:
        if _crc(bytes(data[start + off : start + off + n])) != crc:
            raise ArtefactError(f"checksum mismatch in section {label}")
    if hashlib.sha256(bytes(data[:-_TRAILER_LEN])).digest() != bytes(data[-_TRAILER_LEN:]):
        raise ArtefactError("checksum mismatch in section file (whole-file SHA-256)")
    return sections


def _hex_words(s: Any, what: str) -> np.ndarray:
    if not isinstance(s, str) or len(s) % 8:
        raise ArtefactError(f"malformed manifest: {what} is not 8-digit hex words")
    try:
        return np.array([int(s[i : i + 8], 16) for i in range(0, len(s), 8)], dtype=np.uint32)
    except ValueError as exc:
        raise ArtefactError(f"malformed manifest: {what} is not hex") from exc


def _shape_numel(shape: Any, name: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArtefactError(f"malformed manifest: tensor {name!r} has a bad shape {shape!r}")
    numel = math.prod(shape)
    if numel >= 2**62:
        raise ArtefactError(f"malformed manifest: tensor {name!r} is impossibly large")
    return numel


def _decode_tensor(
    e: dict[str, Any],
    data: bytes,
    start: int,
    alpha_bits: np.ndarray,
    shared: list[tuple[np.ndarray, np.ndarray]],
) -> Tensor:
    name = e["name"]
    what = f"tensor {name!r}"
    if e["dtype"] not in _DTYPES:
        raise ArtefactError(f"{what}: unknown dtype {e['dtype']!r}")
    dtype = _DTYPES[e["dtype"]]
    shape = e["shape"]
    n = _shape_numel(shape, name)

    def payload(key: str) -> bytes:
        off, length, _ = e[key]
        return bytes(data[start + off : start + off + length])

    mode, kind = e["mode"], e["kind"]
    if kind == "raw" and mode == "raw":
        buf = payload("data")
        if len(buf) != n * torch.empty(0, dtype=dtype).element_size():
            raise ArtefactError(f"{what}: raw data has {len(buf)} bytes for shape {shape} {dtype}")
        return _from_le_bytes(buf, dtype, shape)
    if kind != "quantised" or dtype not in _QUANTISABLE:
        raise ArtefactError(f"{what}: unknown kind/mode {kind!r}/{mode!r} for {dtype}")
    alphabet = len(alpha_bits)
    if mode == "empty":
        if n:
            raise ArtefactError(f"{what}: 'empty' coding for {n} elements")
        idx = np.zeros(0, dtype=np.int64)
    elif mode == "const":
        sym = e["symbol"]
        if not isinstance(sym, int) or not 0 <= sym < alphabet:
            raise ArtefactError(f"{what}: constant symbol {sym!r} outside the alphabet")
        value = torch.tensor(alpha_bits[sym : sym + 1].view(np.int32).copy()).view(torch.float32)
        return value.to(dtype).expand(n).clone().reshape(shape)  # no index array for one symbol
    elif mode == "fixed":
        if e["width"] != _fixed_width(alphabet):
            raise ArtefactError(f"{what}: bad fixed width {e['width']!r}")
        idx = _fixed_decode(payload("data"), n, e["width"], alphabet, what)
    elif mode == "ans":
        table = e["table"]
        if table == "own":
            symbols, counts = _decode_table(payload("table_section"), alphabet, f"table of {what}")
            if counts.sum() != n:
                raise ArtefactError(f"table of {what}: counts sum to {counts.sum():.0f}, not {n}")
        elif isinstance(table, int) and not isinstance(table, bool) and 0 <= table < len(shared):
            symbols, counts = shared[table]
        else:
            raise ArtefactError(f"{what}: unknown symbol table {table!r}")
        idx = symbols[_ans_decode(payload("data"), counts, n, what)]
    else:
        raise ArtefactError(f"{what}: unknown coding mode {mode!r}")
    f32 = torch.from_numpy(alpha_bits[idx].view(np.int32).copy()).view(torch.float32)
    return f32.to(dtype).reshape(shape)


def unpack(data: bytes | bytearray | memoryview, *, max_decoded_bytes: int | None = None) -> PackedModel:
    """Decode an artefact after validating all of it; any problem raises ``ArtefactError``.

    Before anything is decoded, the tensors the manifest declares are bounded by what the file
    can justify (``pwfn.export.packcheck``: at most 1024 times the file's bytes, at least 64 MiB;
    ``max_decoded_bytes`` sets another bound) and the codebook must be distinct finite values.
    """
    data = bytes(data)
    manifest, start = _parse_header(data)
    try:
        _check_layout(data, manifest, start)
        check_declared_sizes(manifest, len(data), max_decoded_bytes)
        cbm = manifest["codebook"]
        cb_bits = _hex_words(cbm["bits_hex"], "codebook")
        if cbm["size"] != len(cb_bits):
            raise ArtefactError("malformed manifest: codebook size does not match its values")
        extra = _hex_words(manifest["extra_symbols_hex"], "extra symbols")
        check_codebook(cb_bits, extra, cbm["terms"])
        alpha_bits = np.concatenate([cb_bits, extra])
        shared = [
            _decode_table(
                bytes(data[start + off : start + off + n]), len(alpha_bits), f"shared table {i}"
            )
            for i, (off, n, _) in enumerate(manifest["tables"])
        ]
        tensors: dict[str, Tensor] = {}
        for e in manifest["tensors"]:
            name = e["name"]
            if not isinstance(name, str) or name in tensors:
                raise ArtefactError(f"malformed manifest: bad or repeated tensor name {name!r}")
            t = _decode_tensor(e, data, start, alpha_bits, shared)
            if e["kind"] == "quantised" and _crc(_le_bytes(t)) != e["value_crc32"]:
                raise ArtefactError(f"tensor {name!r}: decoded values fail their checksum")
            tensors[name] = t
        raw_terms = cbm["terms"]
        terms = None
        if raw_terms is not None:
            terms = [[(int(s), int(x)) for s, x in entry] for entry in raw_terms]
            if len(terms) != len(cb_bits):
                raise ArtefactError("malformed manifest: terms do not match the codebook")
        metadata = manifest["metadata"]
        if not isinstance(metadata, dict):
            raise ArtefactError("malformed manifest: metadata is not an object")
    except ArtefactError:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
        OverflowError,
        RuntimeError,
        RecursionError,
    ) as exc:
        raise ArtefactError(f"malformed manifest: {type(exc).__name__}: {exc}") from exc
    except MemoryError as exc:  # a manifest announcing a tensor far larger than memory
        raise ArtefactError(f"malformed manifest: a tensor is too large to decode ({exc})") from exc
    codebook = torch.from_numpy(cb_bits.view(np.int32).copy()).view(torch.float32)
    return PackedModel(
        tensors=tensors, codebook=codebook, terms=terms, metadata=metadata, manifest=manifest
    )


def read_packed(path: str | os.PathLike) -> PackedModel:
    """Read and unpack an artefact file (a regular file of bounded size; ``ArtefactError`` otherwise)."""
    return unpack(read_artefact_bytes(path))


def size_breakdown(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Where an artefact's bytes go: header, manifest, shared tables, each tensor, trailer.

    Per-tensor bytes are its own sections (own table + data); shared tables are listed
    separately, so the parts add up to the file size. Validates like ``unpack`` first
    (without decoding), so the numbers describe an intact file.
    """
    data = bytes(data)
    manifest, start = _parse_header(data)
    try:
        _check_layout(data, manifest, start)
        per = {
            e["name"]: sum(e[k][1] for k in ("table_section", "data") if k in e)
            for e in manifest["tensors"]
        }
        tables = sum(t[1] for t in manifest["tables"])
    except ArtefactError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise ArtefactError(f"malformed manifest: {type(exc).__name__}: {exc}") from exc
    return {
        "total": len(data),
        "header": _HEADER.size,
        "manifest": start - _HEADER.size,
        "shared_tables": tables,
        "trailer": _TRAILER_LEN,
        "tensors": per,
        "quantised": {
            e["name"]: per[e["name"]] for e in manifest["tensors"] if e["kind"] == "quantised"
        },
    }

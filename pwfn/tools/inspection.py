"""``pwfn inspect FILE.pwfn``: what a packed artefact holds, checked and decoded.

The file is validated exactly as :func:`pwfn.export.packing.unpack` does (magic, version, manifest
SHA-256, every section's CRC32, the whole-file SHA-256, each decoded tensor's CRC32), so a
damaged file raises ``ArtefactError`` instead of being described. Then it reports:

- the header: format version, coder, file size and where the bytes go (header, manifest,
  shared tables, coded tensors, trailer), the metadata stored with the model;
- the codebook: every value, its power-of-two terms (as stored, or derived from the value),
  and how many weights of the whole file use it;
- per tensor: shape, dtype, kind (quantised or raw), coding mode, bytes, bits per weight,
  the entropy of its symbols, the number of distinct symbols, and its checksums;
- the checksums of the file (SHA-256 of everything before the trailer, and of the manifest).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Any, Union

from ..run.report import format_terms, power_of_two_terms


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0


def inspect_file(path: Union[str, Path]) -> dict[str, Any]:
    """Validate and decode ``path``; return a JSON-ready description (see the module docstring)."""
    # numpy and torch load when a file is inspected, not with the CLI
    import numpy as np

    from ..export import packing
    from ..export.packcheck import read_artefact_bytes

    path = Path(path)
    data = read_artefact_bytes(path, "file")  # a regular file of bounded size: never a FIFO or a device
    packed = packing.unpack(data)  # full validation and decoding first
    manifest = packed.manifest
    sizes = packing.size_breakdown(data)
    codebook = packed.codebook.numpy()
    cb_bits = codebook.view(np.uint32)
    index_of = {int(b): i for i, b in enumerate(cb_bits.tolist())}
    total_counts = [0] * len(codebook)
    tensors = []
    for entry in manifest["tensors"]:
        name = entry["name"]
        t = packed.tensors[name]
        numel = int(t.numel())
        nbytes = int(sizes["tensors"].get(name, 0))
        info: dict[str, Any] = {
            "name": name, "shape": list(entry["shape"]), "dtype": entry["dtype"], "kind": entry["kind"],
            "mode": entry.get("mode"), "numel": numel, "bytes": nbytes,
            "bits_per_weight": 8.0 * nbytes / numel if numel else 0.0,
        }
        if "data" in entry:
            info["data_crc32"] = f"{entry['data'][2]:08x}"
        if entry["kind"] == "quantised":
            info["table"] = entry.get("table")
            info["value_crc32"] = f"{entry['value_crc32']:08x}"
            bits = t.detach().to(dtype=packed.codebook.dtype).contiguous().numpy().view(np.uint32).ravel()
            counts = Counter(bits.tolist())
            symbols = {}
            for b, c in counts.items():
                i = index_of.get(int(b))
                if i is not None:
                    total_counts[i] += c
                    symbols[i] = c
                else:  # the other signed zero: an extra symbol of the coding alphabet
                    symbols[f"extra:{int(b):08x}"] = c
            info["symbols"] = len(counts)
            info["symbol_counts"] = {str(k): v for k, v in sorted(symbols.items(), key=lambda kv: str(kv[0]))}
            info["entropy_bits"] = _entropy(list(counts.values()))
        tensors.append(info)
    terms = packed.terms
    book = []
    for i, v in enumerate(codebook.tolist()):
        t = terms[i] if terms is not None else power_of_two_terms(float(v))
        book.append({"index": i, "value": float(v), "bits_hex": f"{int(cb_bits[i]):08x}",
                     "terms": [list(x) for x in t] if t is not None else None,
                     "terms_text": format_terms([tuple(x) for x in t] if t is not None else None),
                     "terms_stored": terms is not None, "weights": total_counts[i]})
    return {
        "file": str(path),
        "header": {"format": manifest.get("format"), "format_version": manifest.get("format_version"),
                   "coder": manifest.get("coder"), "byteorder": manifest.get("byteorder"), "bytes": len(data)},
        "layout": {k: sizes[k] for k in ("total", "header", "manifest", "shared_tables", "trailer")}
        | {"tensors": sum(sizes["tensors"].values()), "shared_table_count": len(manifest.get("tables", []))},
        "metadata": packed.metadata,
        "codebook": book,
        "codebook_entropy_bits": _entropy(total_counts),
        "tensors": tensors,
        "checksums": {
            "file_sha256": data[-32:].hex(),
            "file_sha256_verified": hashlib.sha256(data[:-32]).digest() == data[-32:],
            "manifest_sha256": hashlib.sha256(data[sizes["header"]:sizes["header"] + sizes["manifest"]]).hexdigest(),
        },
        "totals": {"tensors": len(tensors), "quantised_tensors": sum(t["kind"] == "quantised" for t in tensors),
                   "weights": sum(t["numel"] for t in tensors),
                   "quantised_weights": sum(t["numel"] for t in tensors if t["kind"] == "quantised")},
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_file`'s result."""
    h, lay, tot = info["header"], info["layout"], info["totals"]
    lines = [
        f"{info['file']}: pwfn packed artefact, format {h['format']} version {h['format_version']}, {h['bytes']:,} bytes",
        f"coder: {h['coder']}",
        f"layout: header {lay['header']} B, manifest {lay['manifest']:,} B, shared tables {lay['shared_tables']:,} B "
        f"({lay['shared_table_count']}), tensors {lay['tensors']:,} B, trailer {lay['trailer']} B",
        f"tensors: {tot['tensors']} ({tot['quantised_tensors']} quantised), weights {tot['weights']:,} "
        f"({tot['quantised_weights']:,} quantised)",
    ]
    if info["metadata"]:
        meta = ", ".join(f"{k}={v}" for k, v in info["metadata"].items() if not isinstance(v, (dict, list)))
        if meta:
            lines.append(f"metadata: {meta}")
    lines += ["", f"codebook: {len(info['codebook'])} values, entropy {info['codebook_entropy_bits']:.3f} bits "
              f"per quantised weight" + ("" if not info["codebook"] or info["codebook"][0]["terms_stored"]
                                         else " (terms derived from the values)"),
              "| # | value | float32 bits | power-of-two terms | weights |", "|---|---|---|---|---|"]
    for c in info["codebook"]:
        lines.append(f"| {c['index']} | {c['value']:.8g} | {c['bits_hex']} | {c['terms_text']} | {c['weights']:,} |")
    lines += ["", "| tensor | shape | dtype | kind | mode | bytes | bits/weight | symbols | entropy bits | crc32 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"]) or "scalar"
        ent = f"{t['entropy_bits']:.3f}" if "entropy_bits" in t else "-"
        crc = t.get("value_crc32") or t.get("data_crc32") or "-"
        lines.append(f"| {t['name']} | {shape} | {t['dtype']} | {t['kind']} | {t['mode']} | {t['bytes']:,} | "
                     f"{t['bits_per_weight']:.3f} | {t.get('symbols', '-')} | {ent} | {crc} |")
    c = info["checksums"]
    lines += ["", f"file SHA-256: {c['file_sha256']} ({'verified' if c['file_sha256_verified'] else 'MISMATCH'})",
              f"manifest SHA-256: {c['manifest_sha256']} (verified)"]
    return "\n".join(lines)

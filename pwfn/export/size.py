"""The size report of an export (``size.json``): a real packed file against every other encoding.

Each number comes from the artefact itself: ``metrics.size_report`` gives fp32, fp16,
fixed-width indices, the global and per-tensor entropy bounds and the shift/add counts,
``packing.size_breakdown`` the bytes the packed file actually spends per tensor. The same
report is merged into the run's ``report.json`` by the export.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from ..core import metrics as M
from . import packing
from .artefact import EXPORT_FORMAT, stored_owner

__all__ = ["onnx_size", "size_summary"]


def size_summary(
    state: Mapping[str, Tensor],
    quantised: Iterable[str],
    packed: bytes,
    *,
    b: int = 7,
    signed_terms: bool = False,
    unfixed: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sizes of the point model under every encoding the project reports, from a real artefact.

    Built on ``metrics.size_report`` (fp32, fp16, fixed-width, global and per-tensor entropy
    bounds, shift/add counts) and ``packing.size_breakdown`` (bytes actually used per tensor).
    A split (partly unfixed) tensor is charged its raw side tensors too. ``total`` is the
    whole state_dict with ``packed_bytes`` the whole file; ``quantised`` compares the coded
    quantised tensors (plus shared symbol tables) with the entropy bound; ``packed_file``
    breaks the file into coded weights, raw tensors and fixed overhead.
    """
    q = [n for n in state if n in set(quantised)]
    parts = packing.size_breakdown(packed)
    per_packed: dict[str, int] = {}
    for name, n in parts["tensors"].items():
        base = stored_owner(name)
        per_packed[base] = per_packed.get(base, 0) + int(n)
    rep = M.size_report(state, q, per_packed, b=b, signed_terms=signed_terms)

    coded = sum(per_packed.get(n, 0) for n in q)
    raw = sum(per_packed.get(n, 0) for n in state if n not in set(q))
    overhead = parts["header"] + parts["manifest"] + parts["trailer"]
    bound = rep.quantised_total.entropy_bound_bytes
    quant = _size_fields(rep.quantised_total)
    quant["packed_bytes"] = coded + parts["shared_tables"]
    total = _size_fields(rep.total)
    total["packed_bytes"] = parts["total"]

    # Share of quantised weights per number of power-of-two terms (-1: not representable).
    orders: dict[str, float] = {}
    n_q = rep.quantised_total.numel
    if n_q:
        vals, counts = M.codebook([state[n] for n in q])
        terms = M.term_counts(vals, b=b, signed_terms=signed_terms, strict=False)
        for k in sorted(set(terms.tolist())):
            key = "unrepresentable" if k < 0 else str(k)
            orders[key] = int(counts[terms == k].sum()) / n_q
    qt = rep.quantised_total
    return {
        "format": EXPORT_FORMAT,
        "weights": n_q,
        "tensors": len(state),
        "quantised_tensors": len(q),
        "codebook_size": rep.codebook_size,
        "bits_per_index": rep.bits_per_index,
        "global_entropy_bits": rep.global_entropy_bits,
        "b": b,
        "signed_terms": signed_terms,
        "total": total,
        "quantised": quant,
        "packed_file": {
            "total": parts["total"],
            "quantised_coded": coded,
            "shared_tables": parts["shared_tables"],
            "raw_tensors": raw,
            "header": parts["header"],
            "manifest": parts["manifest"],
            "trailer": parts["trailer"],
            "overhead": overhead,
        },
        "ratio_packed_to_bound": (quant["packed_bytes"] / bound) if bound > 0 else None,
        # the headline: the whole model (float leftovers and buffers at their real size) vs the whole file
        "ratio_fp32_to_packed": (rep.total.fp32_bytes / parts["total"]) if parts["total"] else None,
        "ratio_fp32_to_packed_quantised": (qt.fp32_bytes / quant["packed_bytes"])
        if quant["packed_bytes"]
        else None,
        "coverage": {
            "values": rep.total.numel,
            "quantised_values": n_q,
            # of every stored value, buffers (e.g. BatchNorm statistics) included
            "share": (n_q / rep.total.numel) if rep.total.numel else 1.0,
            "float_tensors": [n for n in state if n not in set(q)],
        },
        "order_shares": orders,
        "arithmetic": {
            "weights": n_q,
            "multiplications_replaced": qt.multiplications_replaced,
            "shifts": qt.shifts,
            "adds": qt.adds,
            "zeros_skipped": qt.zeros_skipped,
            "multiplications_kept": rep.total.multiplications_kept,
            "multiplications_kept_quantised": qt.multiplications_kept,
            "model": rep.notes.get("arithmetic", ""),
        },
        "unfixed": {
            "weights": sum(int(v.get("count", 0)) for v in (unfixed or {}).values()),
            "tensors": {k: dict(v) for k, v in (unfixed or {}).items()},
        },
        "per_tensor": {name: _size_fields(s) for name, s in rep.per_tensor.items()},
    }


def _size_fields(s: M.TensorSize) -> dict[str, Any]:
    return {
        "numel": s.numel,
        "quantised": s.quantised,
        "fp32_bytes": s.fp32_bytes,
        "fp16_bytes": s.fp16_bytes,
        "raw_bytes": s.raw_bytes,
        "fixed_width_bytes": s.fixed_width_bytes,
        "entropy_bound_bytes": s.entropy_bound_bytes,
        "per_tensor_entropy_bound_bytes": s.per_tensor_entropy_bound_bytes,
        "packed_bytes": s.packed_bytes,
    }


def onnx_size(info: Mapping[str, Any], size: Mapping[str, Any]) -> dict[str, Any]:
    """The codebook ONNX's bytes against fp32 and an int8 copy of the same weights (``size.json``'s
    ``onnx``): its packed index bits and value table, the weights kept float, and the file."""
    total = size["total"]
    numel = int(total["numel"])
    tensors = int(size["tensors"])
    int8 = numel + 4 * tensors  # one byte a value plus one float32 scale per tensor
    data = int(info.get("bytes") or 0)
    weights = int(info.get("index_bytes", 0)) + int(info.get("table_bytes", 0)) + int(info.get("float_bytes", 0))
    return {
        "bytes": data,
        "index_bits": info.get("index_bits"),
        "index_bytes": info.get("index_bytes"),
        "table_bytes": info.get("table_bytes"),
        "float_bytes": info.get("float_bytes"),
        "weight_bytes": weights,
        "fp32_bytes": int(total["fp32_bytes"]),
        "int8_bytes": int8,
        "weight_bytes_vs_int8": (weights / int8) if int8 else None,
        "file_vs_int8": (data / int8) if int8 else None,
        "fp32_onnx_bytes": info.get("fp32_onnx_bytes"),
    }

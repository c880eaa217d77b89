"""Export a fixed network: a plain point-estimate model, a packed artefact, and their sizes.

Why a separate step: a fixing run leaves a Bayesian (or masked) training model behind. What
a user ships is (1) plain torch layers holding mu, loadable without ``bayes``; (2) the
compressed form whose size the metrics promise, i.e. the shared power-of-two codebook plus
entropy-coded indices (``pwfn.packing``); and (3) optionally ONNX for other runtimes.

An export folder (``<run_dir>/export/`` unless told otherwise) holds:

- ``model.safetensors`` the point-estimate state_dict, bit for bit what the run produced;
- ``model.pwfn``        the packed artefact (codebook with power-of-two terms, indices,
                        raw BatchNorm statistics and unquantised tensors, metadata);
- ``model.onnx``        with ``onnx=True`` and the ``onnx`` extra installed;
- ``size.json``         the size report (also merged into the run's ``report.json``);
- ``model.json``        recipe, method, file checksums; written last, so its presence
                        means the files it lists are complete.

Everything is computed and verified in memory first (the packed artefact is decoded again
and compared bit for bit with the state_dict) and only then written, each file atomically,
so a failure leaves the previous export untouched.

A run must be 100 % fixed: every quantised value a codebook value that is a sum of powers of
two down to 2^-b. With ``allow_unfixed`` the remaining values are kept as raw floats (the
quantised tensor stores a placeholder codebook value there, plus raw positions and values),
and the manifest metadata, ``model.json`` and the returned summary say so.

Loading needs only torch, safetensors, numpy and constriction: this module imports ``bayes``
(through ``pwfn.pipeline``) lazily and only to export a run that never finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import metrics as M
from . import packing
from .errors import ArtefactError, CheckpointError, ModelError, PwfnError
from .io import atomic_write_bytes, atomic_write_json
from .manifest import (
    MANIFEST_FILE,
    POINT_FORMAT,
    POINT_MODEL_FILE,
    POINT_MODEL_JSON,
    DamagedPointModelError,
    RunFileError,
    load_json,
    load_manifest,
    parse_json,
    read_limited,
    read_point_model,
    read_report,
    validate_description,
)

__all__ = [
    "EXPORT_FORMAT",
    "ExportError",
    "export_model",
    "export_run",
    "format_export_summary",
    "load_exported_model",
    "load_packed_model",
    "size_summary",
]

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Version of the export folder layout and of the packed artefact's metadata block
#: (the packed file's own byte format is ``pwfn.packing.FORMAT_VERSION``).
EXPORT_FORMAT = 1
EXPORT_DIR = "export"
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
PACKED_FILE = "model.pwfn"
ONNX_FILE = "model.onnx"
SIZE_FILE = "size.json"
# Side tensors of a partly fixed tensor; ':' never occurs in a state_dict key torch builds.
_POS = "::unfixed_positions"
_VAL = "::unfixed_values"
from .config import METHODS as _METHODS  # noqa: E402  (one list of methods)


class ExportError(PwfnError, ValueError):
    """A run or model cannot be exported as asked (not fully fixed, missing or foreign files)."""


# --------------------------------------------------------------------------------------------
# small helpers


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (dtype, shape and every byte; -0.0 != 0.0, NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    fa = a.detach().reshape(-1).contiguous().cpu()
    fb = b.detach().reshape(-1).contiguous().cpu()
    return torch.equal(fa.view(torch.uint8), fb.view(torch.uint8))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def shared_keys(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Alias -> canonical key for state entries that are one tensor (tied weights, a module used twice).

    Two entries are one tensor when they view the same storage at the same offset with the same
    shape and strides; the canonical key is the first in ``state`` order.
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _check_sharing(model: nn.Module, shared: Mapping[str, str], where: str) -> None:
    """The model must share exactly the tensors the artefact recorded as shared."""
    have = shared_keys(model.state_dict())
    if dict(have) == dict(shared):
        return
    lost = {a: c for a, c in shared.items() if have.get(a) != c}
    extra = {a: c for a, c in have.items() if shared.get(a) != c}
    parts = []
    if lost:
        parts.append("the artefact has " + ", ".join(f"{a} tied to {c}" for a, c in list(lost.items())[:3])
                     + " but the model holds them as separate tensors (tie them, e.g. "
                     "`model.lm_head.weight = model.embed.weight`, before loading)")
    if extra:
        parts.append("the model ties " + ", ".join(f"{a} to {c}" for a, c in list(extra.items())[:3])
                     + " but the artefact holds them as separate tensors (untie them in the model, or export "
                     "from a model with the same sharing)")
    raise ArtefactError(f"{where}: weight sharing differs: " + "; ".join(parts))


def _with_aliases(state: Mapping[str, Tensor], shared: Mapping[str, str], order: Any) -> dict[str, Tensor]:
    """The state with every alias entry pointing at its canonical tensor, in the recorded key order."""
    out = dict(state)
    for alias, canon in shared.items():
        if canon not in out:
            raise ArtefactError(f"the artefact records {alias} as shared with {canon}, which it does not hold")
        out[alias] = out[canon]
    if isinstance(order, list) and set(order) == set(out):
        out = {k: out[k] for k in order}
    return out


def _read_shared(meta: Mapping[str, Any], where: str) -> dict[str, str]:
    shared = meta.get("shared") or {}
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise ArtefactError(f"{where}: malformed 'shared' entry in the export metadata")
    return dict(shared)


def _clean_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: safetensors refuses shared storage (tied weights)."""
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise ExportError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        if _POS in name or _VAL in name:
            raise ExportError(f"tensor name {name!r} uses a reserved suffix")
        out[name] = t.detach().cpu().contiguous().clone()
    return out


def _infer_b(state: Mapping[str, Tensor], names: Iterable[str]) -> int:
    """The smallest b in 7..24 at which all quantised values are multiples of 2^-b (7 when none is)."""
    tensors = [state[n].detach().reshape(-1) for n in names if n in state and state[n].is_floating_point()]
    if not tensors:
        return 7
    values = torch.cat([t.to(torch.float64) for t in tensors]).unique()
    for bb in range(7, 25):
        if bool(_decomposable(values, bb).all()):
            return bb
    return 7


def _decomposable(values: Tensor, b: int) -> Tensor:
    """Which float values are sums of powers of two down to 2^-b (i.e. multiples of 2^-b)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    v = values.detach().to(torch.float64)
    return M.term_counts(v, b=b, strict=False) >= 0


# --------------------------------------------------------------------------------------------
# which quantised values are fixed


@dataclass
class _Fixedness:
    """Per quantised tensor, the boolean map of entries that hold a (decomposable) codebook value."""

    fixed: dict[str, Tensor]
    codebook: Tensor  # float32, sorted, distinct (+0.0 for zero)
    unfixed: dict[str, int] = field(default_factory=dict)

    @property
    def unfixed_total(self) -> int:
        return sum(self.unfixed.values())


def _fixedness(
    state: Mapping[str, Tensor],
    quantised: list[str],
    b: int,
    codebook: Tensor | None,
    masks: Mapping[str, Tensor] | None,
) -> _Fixedness:
    """A value is fixed when its mask says so (if given), it is in ``codebook`` (if given),
    float32 holds it exactly and it is a multiple of 2^-b (so it has power-of-two terms)."""
    if not quantised:
        return _Fixedness({}, torch.empty(0, dtype=torch.float32), {})
    # One sort over all quantised values (float64 holds every float dtype exactly): the
    # checks run once per distinct value, not once per weight.
    flats = [state[n].reshape(-1).to(torch.float64) for n in quantised]
    vals, inverse = torch.unique(torch.cat(flats), return_inverse=True)
    ok = torch.isfinite(vals)
    safe = torch.where(ok, vals, torch.zeros_like(vals))
    ok &= safe.to(torch.float32).to(torch.float64) == safe  # packing stores float32
    ok &= _decomposable(safe, b)
    if codebook is not None:
        cb_ref = torch.as_tensor(codebook).detach().reshape(-1).to(torch.float64)
        ok &= torch.isin(vals, cb_ref)
    f_all = ok[inverse]
    fixed: dict[str, Tensor] = {}
    unfixed: dict[str, int] = {}
    for name, f in zip(quantised, torch.split(f_all, [t.numel() for t in flats])):
        if masks is not None and name in masks:
            m = masks[name].detach().reshape(-1).cpu().to(torch.bool)
            if m.numel() != f.numel():
                raise ExportError(f"mask of {name!r} has {m.numel()} entries, the tensor {f.numel()}")
            f = f & m
        fixed[name] = f
        n_unfixed = int(f.numel() - int(f.sum()))
        if n_unfixed:
            unfixed[name] = n_unfixed
    used = torch.cat(flats)[torch.cat(list(fixed.values()))]
    cb = torch.unique(used.to(torch.float32) + 0.0, sorted=True)  # + 0.0 folds -0.0 into +0.0
    return _Fixedness(fixed, cb, unfixed)


def _unfixed_message(fx: _Fixedness, state: Mapping[str, Tensor], where: str) -> str:
    total = sum(state[n].numel() for n in fx.fixed)
    worst = sorted(fx.unfixed.items(), key=lambda kv: -kv[1])[:3]
    detail = ", ".join(f"{n}: {c}" for n, c in worst)
    return (
        f"{where} is not 100% fixed: {fx.unfixed_total} of {total} quantised weights "
        f"({100.0 * fx.unfixed_total / max(total, 1):.2f}%) are not power-of-two codebook values "
        f"(e.g. {detail}); finish the run, or pass --allow-unfixed (allow_unfixed=True) to export "
        "them as raw floats"
    )


# --------------------------------------------------------------------------------------------
# building the stored tensors, the artefact and verifying it


def _stored_tensors(
    state: Mapping[str, Tensor], quantised: list[str], fx: _Fixedness
) -> tuple[dict[str, Tensor], list[str], dict[str, dict[str, Any]]]:
    """The tensors to pack, which of them are coded as indices, and how unfixed ones are kept."""
    stored: dict[str, Tensor] = {}
    coded: list[str] = []
    notes: dict[str, dict[str, Any]] = {}
    qset = set(quantised)
    for name, t in state.items():
        if name not in qset:
            stored[name] = t
            continue
        f = fx.fixed[name]
        if bool(f.all()):
            stored[name] = t
            coded.append(name)
            continue
        n_unfixed = int((~f).sum())
        if not bool(f.any()):  # nothing fixed: the tensor is simply raw
            stored[name] = t
            notes[name] = {"count": n_unfixed, "storage": "raw"}
            continue
        flat = t.reshape(-1)
        # The placeholder is this tensor's most common fixed value: the cheapest symbol.
        vals, counts = torch.unique(flat[f].to(torch.float32) + 0.0, return_counts=True)
        filler = vals[int(counts.argmax())].to(t.dtype)
        placeholder = flat.clone()
        placeholder[~f] = filler
        pos = torch.nonzero(~f).reshape(-1)
        pos = pos.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
        stored[name] = placeholder.reshape(t.shape)
        stored[name + _POS] = pos
        stored[name + _VAL] = flat[~f].clone()
        coded.append(name)
        notes[name] = {"count": n_unfixed, "storage": "split"}
    return stored, coded, notes


def _reassemble(tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> dict[str, Tensor]:
    """Undo ``_stored_tensors``: put each split tensor's raw unfixed values back in place."""
    unfixed = metadata.get("unfixed") or {}
    notes = (unfixed.get("tensors") if isinstance(unfixed, dict) else None) or {}
    if not isinstance(unfixed, dict) or not isinstance(notes, dict):
        raise ArtefactError("malformed export metadata: 'unfixed.tensors' is not an object")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_POS) or name.endswith(_VAL):
            base = name[: -len(_POS)] if name.endswith(_POS) else name[: -len(_VAL)]
            if not isinstance(notes.get(base), dict) or notes[base].get("storage") != "split":
                raise ArtefactError(f"artefact holds {name!r} but no split tensor {base!r}")
            continue
        note = notes.get(name)
        if isinstance(note, dict) and note.get("storage") == "split":
            pos, val = tensors.get(name + _POS), tensors.get(name + _VAL)
            if pos is None or val is None:
                raise ArtefactError(f"unfixed values of tensor {name!r} are missing")
            if (
                pos.dim() != 1
                or pos.dtype not in (torch.int32, torch.int64)
                or val.dim() != 1
                or val.numel() != pos.numel()
                or val.dtype != t.dtype
                or (pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= t.numel()))
            ):
                raise ArtefactError(f"unfixed values of tensor {name!r} are malformed")
            flat = t.reshape(-1).clone()
            flat[pos.to(torch.int64)] = val
            t = flat.reshape(t.shape)
        out[name] = t
    return out


def _terms_for(codebook: Tensor, b: int, signed_terms: bool) -> Any:
    """Power-of-two terms of every codebook value (``pwfn.centres.decompose``)."""
    if codebook.numel() == 0:
        return None
    from .centres import decompose

    try:
        return decompose(codebook, b=b, signed_terms=signed_terms)
    except PwfnError as exc:  # cannot happen for values _fixedness accepted; say so if it does
        raise ExportError(f"codebook cannot be decomposed into powers of two: {exc}") from exc


# --------------------------------------------------------------------------------------------
# size report


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
        base = name
        for suffix in (_POS, _VAL):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
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


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n:,.0f}"


def format_export_summary(result: Mapping[str, Any]) -> str:
    """Human-readable lines for one export (what ``pwfn export`` prints)."""
    lines = [f"exported {result.get('source')} -> {result['out_dir']}"]
    files = result.get("files", {})
    lines.append("  files: " + ", ".join(f"{k} ({_fmt_bytes(v)} B)" for k, v in files.items()))
    s = result["size"]
    if not result.get("fixed", True):
        why = f" ({result['not_finished']})" if result.get("not_finished") else ""
        lines.append(
            f"  WARNING: not 100% fixed{why}: {result.get('unfixed_weights', 0)} quantised weights "
            "exported as raw float (--allow-unfixed); the artefact's metadata says so"
        )
    q = s["quantised"]
    n = max(s["weights"], 1)
    lines.append(
        f"  quantised: {s['weights']:,} weights in {s['quantised_tensors']} tensors, "
        f"codebook K={s['codebook_size']}, entropy {s['global_entropy_bits']:.3f} bits/weight"
    )
    rows = [
        ("fp32", q["fp32_bytes"]),
        ("fp16", q["fp16_bytes"]),
        (f"fixed width ({s['bits_per_index']} bits)", q["fixed_width_bytes"]),
        ("entropy bound (global)", q["entropy_bound_bytes"]),
        ("entropy bound (per tensor)", q["per_tensor_entropy_bound_bytes"]),
        ("packed (coded + tables)", q["packed_bytes"]),
    ]
    lines.append("  | quantised weights as | bytes | bits/weight |")
    lines.append("  |---|---|---|")
    for label, v in rows:
        lines.append(f"  | {label} | {_fmt_bytes(v)} | {8.0 * v / n:.3f} |")
    pf, t = s["packed_file"], s["total"]
    ratio = s.get("ratio_packed_to_bound")
    lines.append(
        f"  whole state_dict: fp32 {_fmt_bytes(t['fp32_bytes'])} B, fp16 {_fmt_bytes(t['fp16_bytes'])} B, "
        f"packed file {_fmt_bytes(pf['total'])} B (coded weights {_fmt_bytes(pf['quantised_coded'])}, "
        f"shared tables {_fmt_bytes(pf['shared_tables'])}, raw tensors {_fmt_bytes(pf['raw_tensors'])}, "
        f"overhead {_fmt_bytes(pf['overhead'])} of which manifest {_fmt_bytes(pf['manifest'])})"
    )
    if ratio is not None:
        lines.append(f"  packed / global entropy bound: {ratio:.4f}")
    if s.get("order_shares"):
        shares = ", ".join(f"order {k}: {100 * v:.1f}%" for k, v in s["order_shares"].items())
        lines.append(f"  power-of-two terms per weight: {shares}")
    a = s["arithmetic"]
    lines.append(
        f"  multiplications: {a['multiplications_replaced']:,} of {a['weights']:,} replaced by "
        f"{a['shifts']:,} shifts + {a['adds']:,} adds; {a['zeros_skipped']:,} zero weights skipped; "
        f"{a['multiplications_kept']:,} kept"
    )
    o = result.get("onnx")
    if o:
        if o.get("skipped"):
            lines.append(f"  onnx: skipped: {o['skipped']}")
        else:
            lines.append(f"  onnx: written and checked with onnxruntime (max |diff| {o['max_abs_diff']:.2e}); "
                         f"{o.get('coded_tensors', 0)} tensors as codebook indices + Gather, "
                         f"{o.get('bytes', 0):,} B (fp32 ONNX {o.get('fp32_onnx_bytes', 0):,} B)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# ONNX (optional)


def _example_input(model: nn.Module, recipe: Mapping[str, Any] | None, image_size: int | None) -> Tensor:
    """A small input batch the model accepts, from its first layer and its recipe."""
    kwargs = dict((recipe or {}).get("kwargs") or {})
    name = str((recipe or {}).get("name") or "")
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None
    )
    g = torch.Generator().manual_seed(0)
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, generator=g)
    size = kwargs.get("input_size") or image_size or (224 if name.startswith(("tv_", "deit")) else 32)
    if isinstance(first, nn.Conv1d):
        return torch.randn(2, first.in_channels, int(size), generator=g)
    if isinstance(first, nn.Conv3d):
        return torch.randn(2, first.in_channels, 16, 16, 16, generator=g)
    if isinstance(first, nn.Conv2d):
        return torch.randn(2, first.in_channels, int(size), int(size), generator=g)
    raise ExportError("cannot guess an input shape for ONNX export; pass example_input")


def _onnx_export(
    model: nn.Module, example: Tensor, codebook: Tensor | None = None
) -> tuple[bytes | None, dict[str, Any]]:
    """Codebook ONNX (value tables + packed indices + Gather, ``pwfn.targets.onnx``) checked
    against torch and the fp32 ONNX with onnxruntime, or a note on why it was skipped."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        msg = (
            f"ONNX export needs the 'onnx' extra ({exc.name or exc} is not installed): "
            "pip install 'pwfn-compress[onnx]'"
        )
        log.warning("%s", msg)
        return None, {"skipped": msg}
    from .targets.onnx import export_onnx

    try:
        return export_onnx(model, example, codebook)
    except PwfnError as exc:
        raise ExportError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# preparing an export in memory


@dataclass
class _Prepared:
    """An export computed and verified in memory, ready to be written."""

    source: str
    out_dir: Path
    files: dict[str, bytes]
    model_json: dict[str, Any]
    result: dict[str, Any]
    report_path: Path | None = None
    report: dict[str, Any] | None = None


def _prepare(
    state: Mapping[str, Tensor],
    quantised: Iterable[str],
    out_dir: Path,
    recipe: Mapping[str, Any] | None,
    *,
    method: str,
    b: int,
    codebook: Tensor | None,
    masks: Mapping[str, Tensor] | None,
    allow_unfixed: bool,
    onnx: bool,
    model: nn.Module | None,
    example_input: Tensor | None,
    image_size: int | None,
    source: str,
    extra_metadata: Mapping[str, Any] | None,
    not_finished: str | None = None,
) -> _Prepared:
    t0 = time.perf_counter()
    if method not in _METHODS:
        raise ExportError(f"method must be one of {_METHODS}, got {method!r}")
    signed_terms = method == "wfn"
    full_order = list(state)
    shared = shared_keys(state)  # tied tensors are stored once, under their first name
    aliased_quantised = [n for n in quantised if n in shared]
    if aliased_quantised:
        raise ExportError(f"quantised names {aliased_quantised[:3]} are aliases of other tensors; list each shared "
                          "tensor once, under its first state_dict name")
    state = _clean_state({k: v for k, v in state.items() if k not in shared})
    q = list(dict.fromkeys(quantised))
    missing = [n for n in q if n not in state]
    if missing:
        raise ExportError(f"quantised tensors not in the model's state_dict: {missing[:5]}")
    bad = [n for n in q if not state[n].is_floating_point()]
    if bad:
        raise ExportError(f"quantised tensors must be floating point: {bad[:5]}")

    fx = _fixedness(state, q, b, codebook, masks)
    if fx.unfixed and not allow_unfixed:
        raise ExportError(_unfixed_message(fx, state, source))
    if fx.unfixed:
        log.warning("%s", _unfixed_message(fx, state, source).split(";")[0] + "; exporting them as raw floats")

    stored, coded, notes = _stored_tensors(state, q, fx)
    terms = _terms_for(fx.codebook, b, signed_terms)
    fixed_all = not fx.unfixed and not not_finished
    metadata: dict[str, Any] = {
        "pwfn_export": EXPORT_FORMAT,
        "recipe": dict(recipe) if recipe else None,
        "method": method,
        "b": b,
        "signed_terms": signed_terms,
        "quantised_tensors": q,
        "fixed": fixed_all,
        "unfixed": {"weights": fx.unfixed_total, "tensors": notes},
        "shared": shared,
        "tensor_order": full_order,
    }
    if not_finished:
        metadata["not_finished"] = not_finished
    try:
        from . import __version__

        metadata["pwfn_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    if extra_metadata:
        metadata["extra"] = dict(extra_metadata)
    try:
        packed = packing.pack(stored, coded, codebook=fx.codebook, terms=terms, metadata=metadata)
    except packing.PackError as exc:
        raise ExportError(f"cannot pack {source}: {exc}") from exc

    # What a reader gets back must be the state_dict, bit for bit.
    back = _reassemble(packing.unpack(packed).tensors, metadata)
    if list(back) != list(state) or not all(_bits_equal(back[n], state[n]) for n in state):
        raise ArtefactError(f"internal error: the packed artefact of {source} does not reproduce the model")

    from safetensors.torch import save as st_save

    st_bytes = st_save(state)
    files: dict[str, bytes] = {MODEL_FILE: st_bytes, PACKED_FILE: packed}
    onnx_info: dict[str, Any] | None = None
    if onnx:
        if model is None:
            onnx_info = {"skipped": "no model recipe: the model cannot be rebuilt for ONNX export"}
        else:
            x = example_input if example_input is not None else _example_input(model, recipe, image_size)
            data, onnx_info = _onnx_export(model, x, fx.codebook)
            if data is not None:
                files[ONNX_FILE] = data

    size = size_summary(state, q, packed, b=b, signed_terms=signed_terms, unfixed=notes)
    size_bytes = (json.dumps(size, indent=2) + "\n").encode("utf-8")
    files[SIZE_FILE] = size_bytes
    model_json = {
        "format": "pwfn-export",
        "format_version": EXPORT_FORMAT,
        "packed_format_version": packing.FORMAT_VERSION,
        "recipe": metadata["recipe"],
        "method": method,
        "b": b,
        "signed_terms": signed_terms,
        "fixed": fixed_all,
        "unfixed": metadata["unfixed"],
        "not_finished": not_finished,
        "tensors": list(state),
        "shared": shared,
        "tensor_order": full_order,
        "quantised_tensors": q,
        "codebook": [float(v) for v in fx.codebook.tolist()],
        "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()},
        "source": source,
        "pwfn_version": metadata.get("pwfn_version"),
    }
    result: dict[str, Any] = {
        "source": source,
        "out_dir": str(out_dir),
        "method": method,
        "fixed": fixed_all,
        "unfixed_weights": fx.unfixed_total,
        "not_finished": not_finished,
        "files": {name: len(data) for name, data in files.items()},
        "size": size,
        "onnx": onnx_info,
        "seconds": 0.0,
    }
    result["seconds"] = time.perf_counter() - t0
    return _Prepared(source, out_dir, files, model_json, result)


def _check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or an earlier pwfn export (which is replaced as a whole)."""
    try:
        if not out.exists():
            return
        if not out.is_dir():
            raise ExportError(f"the export folder {str(out)!r} is a file, not a folder: choose another --out")
        if any(out.iterdir()) and not (out / MODEL_JSON).is_file():
            raise ExportError(f"the export folder {str(out)!r} exists and is not a pwfn export (no {MODEL_JSON}): "
                              "choose a new or empty folder (an export replaces its folder as a whole)")
    except OSError as exc:
        raise ExportError(f"cannot use the export folder {str(out)!r}: {exc}") from exc


_STAGE_SUFFIX = ".tmp-export"


def _write(p: _Prepared) -> dict[str, Any]:
    """Write the export into a temporary folder next to ``out_dir`` and rename it into place.

    A failure (full disk, read-only filesystem, Ctrl-C) removes the temporary folder and leaves
    the previous export as it was; ``model.json`` is written last inside it. Then the size is
    merged into the run's report.json.
    """
    import shutil
    import tempfile

    out = p.out_dir
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*{_STAGE_SUFFIX}"):  # left by a killed export (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_STAGE_SUFFIX, dir=out.parent))
    old: Path | None = None
    try:
        from .io import _umask

        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; an export folder is an ordinary folder
        for name, data in p.files.items():
            atomic_write_bytes(stage / name, data)
        atomic_write_json(stage / MODEL_JSON, p.model_json)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=_STAGE_SUFFIX, dir=out.parent))
            os.replace(out, old / "export")
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / "export", out)  # put the previous export back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if p.report_path is not None and p.report is not None:
        report = dict(p.report)
        report["size"] = p.result["size"]
        report["export"] = {
            "folder": str(p.out_dir),
            "files": p.result["files"],
            "fixed": p.result["fixed"],
            "unfixed_weights": p.result["unfixed_weights"],
        }
        atomic_write_json(p.report_path, report)
    log.info("exported %s to %s", p.source, p.out_dir)
    return p.result


# --------------------------------------------------------------------------------------------
# Python API: export a model


def _plain_state(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """The point-estimate model, its state_dict and (no longer stored on models) empty masks.

    A Bayesian model (Gaussian parameters from ``bayes``) is turned into its point estimate first.
    """
    import bayes  # the check itself needs no torch import beyond what is loaded already

    if bayes.is_bayesian(model):
        model = bayes.to_point_estimate(model)
    return model, dict(model.state_dict()), {}


def export_model(
    model: nn.Module,
    quantised_names: Iterable[str],
    out_dir: PathLike,
    recipe: Mapping[str, Any] | None = None,
    *,
    method: str = "pwfn",
    b: int | None = None,
    codebook: Tensor | None = None,
    allow_unfixed: bool = False,
    onnx: bool = False,
    example_input: Tensor | None = None,
    metadata: Mapping[str, Any] | None = None,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Export a fixed (point or Bayesian) model to ``out_dir``; returns the export summary.

    ``quantised_names`` are state_dict keys of the point model (``QuantView(...).names()``).
    ``recipe`` (``{"name": registered model, "kwargs": {...}}``) lets the loaders rebuild the
    model; without it they need ``model=``. ``method`` picks the terms: PWFN positive, WFN
    signed. ``codebook`` (optional) restricts which values count as fixed; ``masks`` (name ->
    bool tensor, e.g. ``Fixer``/``QuantView.masks()``) do the same. Unfixed values raise ``ExportError`` unless
    ``allow_unfixed``. ``model`` itself is not modified. ``b`` (smallest term 2^-b) defaults to the
    smallest of 7..24 at which every quantised value is a sum of powers of two (7 when none is):
    PWFN's tensor-scaled grid gives small tensors terms finer than 2^-7.
    """
    point, state, _ = _plain_state(model)
    quantised_names = list(quantised_names)
    if b is None:
        b = _infer_b(state, quantised_names)
    if recipe:  # check now that the loaders will be able to rebuild it
        point = _build(recipe, _clean_state(state), "the given model")
    prepared = _prepare(
        state,
        quantised_names,
        Path(out_dir),
        recipe,
        method=method,
        b=b,
        codebook=codebook,
        masks=masks or None,
        allow_unfixed=allow_unfixed,
        onnx=onnx,
        model=point,
        example_input=example_input,
        image_size=None,
        source=f"model {type(model).__name__}",
        extra_metadata=metadata,
    )
    return _write(prepared)


# --------------------------------------------------------------------------------------------
# Python API: export a run folder


def _build(recipe: Mapping[str, Any], state: Mapping[str, Tensor], where: str) -> nn.Module:
    """Construct the recipe's model and load ``state`` into it, strictly."""
    from .models import create_model

    if not isinstance(recipe, Mapping) or not isinstance(recipe.get("name"), str):
        raise ModelError(f"{where}: malformed model recipe {recipe!r}")
    kwargs = recipe.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"{where}: malformed model recipe kwargs {kwargs!r}")
    try:
        model = create_model(recipe["name"], **dict(kwargs))
    except PwfnError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise ModelError(f"{where}: the model recipe {dict(recipe)!r} cannot be built: "
                         f"{type(exc).__name__}: {exc}") from exc
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ArtefactError(
            f"{where} does not fit the model built from its recipe {dict(recipe)!r}: {exc}"
        ) from exc
    return model.eval()


def _rounds_done(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return "no round completed"
    try:  # only a count and the last fixed fraction are needed: bounded, checked reads of each line
        text = read_limited(path, "round log", 64 << 20).decode("utf-8")
        rows = [parse_json(line, f"round log {str(path)!r}") for line in text.splitlines() if line.strip()]
    except (PwfnError, UnicodeDecodeError):
        return "its round log is unreadable"
    if not rows:
        return "no round completed"
    last = rows[-1] if isinstance(rows[-1], dict) else {}
    frac = last.get("fixed_fraction")
    frac = float(frac) if isinstance(frac, (int, float)) and not isinstance(frac, bool) else 0.0
    return f"{len(rows)} round(s) completed, {100.0 * frac:.1f}% fixed"


def _recipe_for_unfinished(run_dir: Path, state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Recipe of a run that never finished and has no manifest (written by an older pwfn).

    A sibling method's checksummed ``point_model.json`` (a comparison fixes one model with both
    methods) is used when its recipe accepts the state_dict; nothing is re-derived from the
    config or the dataset.
    """
    for path in [run_dir / POINT_MODEL_JSON, *sorted(run_dir.parent.glob(f"*/{POINT_MODEL_JSON}"))]:
        if not path.exists():
            continue
        try:
            desc = validate_description(load_json(path, "point-model description"),
                                        f"point-model description {str(path)!r}", (POINT_FORMAT,))
            recipe = desc.get("recipe")
            if recipe:
                _build(recipe, state, str(path))
                return recipe
        except (PwfnError, TypeError):
            continue
    log.warning("no model recipe for %s; loaders will need model=", run_dir)
    return None


def _state_from_checkpoint(run_dir: Path, method: str | None = None) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
    """Method, point-estimate state and fixed masks from an unfinished run's checkpoint."""
    from .io import load_checkpoint

    path = run_dir / "checkpoint.pt"
    methods = [method] if method in _METHODS else [run_dir.name] if run_dir.name in _METHODS else []
    methods += [m for m in _METHODS if m not in methods]
    last: Exception | None = None
    for method in methods:
        try:
            ckpt = load_checkpoint(path, kind=f"run-{method}")
            break
        except CheckpointError as exc:
            last = exc
    else:
        raise ExportError(f"cannot read the run's checkpoint: {last}")
    import bayes

    state = bayes.point_state_dict(ckpt["model"])
    masks = ckpt.get("masks")
    if not isinstance(masks, dict) or any(k not in state for k in masks):
        raise ExportError(f"{path} holds no fixed masks that fit its model: it was written by an older pwfn; "
                          "rerun the method with --fresh")
    return method, state, dict(masks)


def _prepare_run(
    run_dir: Path, out_dir: Path | None, allow_unfixed: bool, onnx: bool
) -> _Prepared:
    """Everything export needs, read through the run's manifest (method, b, signed terms, recipe,
    quantised tensors, codebook, input shape) and validated: nothing is re-derived from
    ``config.yaml`` or the dataset. A point model that does not match the manifest is damaged
    and refused."""
    if not run_dir.is_dir():
        raise ExportError(f"run folder {str(run_dir)!r} does not exist")
    out = out_dir if out_dir is not None else run_dir / EXPORT_DIR
    report_path = run_dir / "report.json"
    report: dict[str, Any] | None = None
    masks: dict[str, Tensor] | None = None
    codebook: Tensor | None = None
    not_finished: str | None = None
    manifest = load_manifest(run_dir)
    b = int(manifest["engine"]["b"]) if manifest else 7
    shape = ((manifest["inputs"].get("data") or {}).get("input_shape") if manifest else None) or []
    image_size = int(shape[1]) if len(shape) == 3 and isinstance(shape[1], int) else None

    if report_path.exists():
        report = read_report(report_path)
        method = report["method"]
        if manifest is not None and manifest["method"] != method:
            raise ExportError(f"{report_path} is a {method} report but {MANIFEST_FILE} describes a "
                              f"{manifest['method']} run: the folder mixes two runs; rerun its command")
        final = report["final"]
        fractions = report["fractions"]
        if final.get("fixed_fraction") != 1.0 or (fractions and fractions[-1] != 1.0):
            not_finished = (
                f"its final round reached {100.0 * float(final.get('fixed_fraction') or 0.0):.2f}% fixed, not 100%"
            )
        elif manifest is not None and manifest["status"] != "finished":
            not_finished = "it has not finished writing its point model (rerun its command to finish it)"
        st_path, meta_path = run_dir / POINT_MODEL_FILE, run_dir / POINT_MODEL_JSON
        if not st_path.exists() or not meta_path.exists():
            raise ExportError(f"{run_dir} has report.json but no {POINT_MODEL_FILE}/{POINT_MODEL_JSON}")
        try:
            meta, state = read_point_model(run_dir, manifest if manifest and manifest["status"] == "finished" else None)
        except DamagedPointModelError as exc:
            raise ExportError(f"{exc}. A damaged point model is never exported") from exc
        except RunFileError as exc:
            raise ExportError(f"{exc}. If the run was written by an older pwfn, rerun its command to rewrite "
                              "the point model with a checksum") from exc
        recipe = meta.get("recipe")
        if manifest is None and isinstance(meta.get("b"), int) and 0 <= meta["b"] <= 24:
            b = meta["b"]  # no manifest: the point model's own checksummed description says b
        if manifest is not None:
            quantised = [q["name"] for q in manifest["quantised"]]
        else:
            quantised = list(report["quantised_tensors"])
        if not quantised:
            raise ExportError(f"{report_path} lists no quantised_tensors")
        cb = manifest.get("codebook") if manifest and manifest.get("codebook") is not None else final.get("codebook")
        if isinstance(cb, list):
            codebook = torch.tensor(cb, dtype=torch.float64)
    else:
        if not (run_dir / "checkpoint.pt").exists():
            if (run_dir / "compare.json").exists():
                raise ExportError(f"{run_dir} is a comparison folder; export_run handles it, not _prepare_run")
            raise ExportError(
                f"{str(run_dir)!r} holds no report.json or checkpoint.pt: is it a pwfn method folder "
                "(runs/<name>/pwfn or runs/<name>/wfn)?"
            )
        not_finished = f"it has no report.json ({_rounds_done(run_dir)})"
        if not allow_unfixed:
            raise ExportError(
                f"run {str(run_dir)!r} is not 100% fixed: {not_finished}; finish it (rerun the same "
                "command to resume) or pass --allow-unfixed to export the unfixed weights as raw floats"
            )
        method, state, masks = _state_from_checkpoint(run_dir, manifest["method"] if manifest else None)
        quantised = [q["name"] for q in manifest["quantised"]] if manifest else list(masks)
        recipe = manifest["recipe"] if manifest else _recipe_for_unfinished(run_dir, state)
        if recipe:  # the recipe model's key order is the state_dict order users expect
            from .models import create_model

            ref = create_model(recipe["name"], **dict(recipe.get("kwargs") or {})).state_dict()
            if set(ref) == set(state):
                state = {k: state[k] for k in ref}

    if not_finished and not allow_unfixed:
        raise ExportError(
            f"run {str(run_dir)!r} is not 100% fixed: {not_finished}; pass --allow-unfixed to export "
            "the unfixed weights as raw floats"
        )
    model = None
    if recipe:  # the artefact must load: its recipe has to build a model that takes these tensors
        try:
            model = _build(recipe, _clean_state(state), str(run_dir))
        except (ModelError, ArtefactError) as exc:
            raise ExportError(f"{exc}. The run's recipe and weights do not match: rerun its command to rewrite "
                              "the point model") from exc
    prepared = _prepare(
        state,
        quantised,
        out,
        recipe,
        method=method,
        b=b,
        codebook=codebook,
        masks=masks,
        allow_unfixed=allow_unfixed,
        onnx=onnx,
        model=model,
        example_input=None,
        image_size=image_size,
        source=str(run_dir),
        extra_metadata={"run": run_dir.name, "run_name": run_dir.parent.name},
        not_finished=not_finished,
    )
    prepared.report_path = report_path if report is not None else None
    prepared.report = report
    return prepared


def export_run(
    run_dir: PathLike,
    out_dir: PathLike | None = None,
    *,
    allow_unfixed: bool = False,
    onnx: bool = False,
) -> dict[str, Any]:
    """Export a method run folder (``runs/<name>/pwfn``) into ``<run_dir>/export/``.

    Given a comparison folder (``runs/<name>`` with ``compare.json``) every method subfolder
    is exported (into ``<out_dir>/<method>`` when ``out_dir`` is given) and the result is
    ``{"runs": {method: summary}}``. All of them are prepared and verified before any file is
    written, so one refusal exports nothing. Raises ``ExportError`` for a run that is not
    100 % fixed unless ``allow_unfixed``.
    """
    from .lock import acquire

    folder = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else None
    if not folder.is_dir():
        what = "is a file, not a run folder" if folder.exists() else "does not exist"
        raise ExportError(f"run folder {str(folder)!r} {what}")
    if out is not None:
        _check_out_dir(out)
    if (folder / "compare.json").exists() and not (folder / "report.json").exists():
        methods = [m for m in _METHODS if (folder / m).is_dir()]
        try:
            listed = load_json(folder / "compare.json", "comparison")
        except PwfnError as exc:
            raise ExportError(f"{exc}; rerun the comparison to rewrite it, or export each method folder") from exc
        if isinstance(listed, dict) and isinstance(listed.get("methods"), dict):
            methods = [m for m in listed["methods"] if m in _METHODS and (folder / m).is_dir()] or methods
        if not methods:
            raise ExportError(f"comparison folder {str(folder)!r} has no method subfolders")
        if out is not None:
            for m in methods:
                _check_out_dir(out / m)
        with acquire(folder, "comparison folder"):  # no run writes into it while we read and write
            prepared = [
                _prepare_run(folder / m, (out / m) if out is not None else None, allow_unfixed, onnx)
                for m in methods
            ]
            return {"source": str(folder), "runs": {m: _write(p) for m, p in zip(methods, prepared)}}
    with acquire(folder):
        return _write(_prepare_run(folder, out, allow_unfixed, onnx))


# --------------------------------------------------------------------------------------------
# loading (no bayes needed)


def load_packed_model(path: PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the point-estimate model from a packed artefact alone, bit for bit (eval mode).

    The recipe in the artefact's metadata builds the model; pass ``model`` to load into your
    own instance instead (needed when the export had no recipe). A damaged, truncated or
    foreign-version file raises ``ArtefactError`` naming the problem.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtefactError(f"cannot read packed artefact {str(path)!r}: {exc}") from exc
    pm = packing.unpack(data)
    meta = pm.metadata
    if meta.get("pwfn_export") is not None and meta.get("pwfn_export") != EXPORT_FORMAT:
        raise ArtefactError(
            f"unsupported version {meta.get('pwfn_export')!r} of the export metadata in {path}: "
            f"this pwfn reads export format {EXPORT_FORMAT}"
        )
    state = _reassemble(pm.tensors, meta)
    shared = _read_shared(meta, str(path))
    return _into_model(_with_aliases(state, shared, meta.get("tensor_order")), meta.get("recipe"), model, str(path),
                       shared)


def _into_model(
    state: Mapping[str, Tensor], recipe: Any, model: nn.Module | None, where: str,
    shared: Mapping[str, str] | None = None,
) -> nn.Module:
    shared = dict(shared or {})
    if model is not None:
        _check_sharing(model, shared, where)
        try:
            model.load_state_dict(dict(state), strict=True)
        except RuntimeError as exc:
            raise ArtefactError(f"{where} does not fit the given model: {exc}") from exc
        return model.eval()
    if not recipe:
        raise ModelError(
            f"{where} holds no model recipe (the model was exported from Python without one); "
            "pass model= to load the weights into your own instance"
        )
    built = _build(recipe, state, where)
    _check_sharing(built, shared, where)
    return built


def load_exported_model(folder: PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the point-estimate model from an export folder's safetensors and model.json.

    The safetensors file is checked against the SHA-256 that ``model.json`` recorded.
    """
    from safetensors.torch import load as st_load

    folder = Path(folder)
    meta_path, st_path = folder / MODEL_JSON, folder / MODEL_FILE
    for path in (meta_path, st_path):
        if not path.exists():
            raise ArtefactError(f"{folder} is not a complete pwfn export: {path.name} is missing")
    try:
        # the same checked reader as a run's point model: validated description, size limits
        meta = load_json(meta_path, "export description")
        if not isinstance(meta, dict) or meta.get("format") != "pwfn-export":
            raise ArtefactError(f"{meta_path} is not a pwfn export description")
        validate_description(meta, f"export description {str(meta_path)!r}", ("pwfn-export",))
        data = read_limited(st_path, "exported model", 1 << 40)
    except RunFileError as exc:
        raise ArtefactError(f"malformed export: {exc}") from exc
    if meta.get("format_version") != EXPORT_FORMAT:
        raise ArtefactError(
            f"unsupported version {meta.get('format_version')!r} in {meta_path}: this pwfn reads "
            f"export format {EXPORT_FORMAT}"
        )
    want = ((meta.get("files") or {}).get(MODEL_FILE) or {}).get("sha256")
    if want is not None and _sha256(data) != want:
        raise ArtefactError(f"checksum mismatch in {st_path} (it is not the file model.json describes)")
    try:
        loaded = st_load(data)
    except Exception as exc:  # safetensors' own error types
        raise ArtefactError(f"cannot read {st_path}: {exc}") from exc
    order = meta.get("tensors")
    state = {k: loaded[k] for k in order} if isinstance(order, list) and set(order) == set(loaded) else loaded
    shared = _read_shared(meta, str(meta_path))
    return _into_model(_with_aliases(state, shared, meta.get("tensor_order")), meta.get("recipe"), model,
                       str(st_path), shared)

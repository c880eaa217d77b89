"""Numbers a weight-fixing run reports (ALGORITHM.md section 4), as pure functions on tensors.

Every function takes tensors on any device, never moves them to the CPU in bulk (only
scalars come back as Python numbers) and never modifies its inputs. Weight statistics
treat values by *value*: ``-0.0`` and ``0.0`` are the same weight value (the zero centre),
so a tensor holding both has one zero in its codebook. NaN weights are rejected because a
codebook or an entropy over them has no meaning.

Conventions for the weight statistics (the published tables differ, so both are offered):

- ``include_zero=True`` counts the zero value like any other;
- ``include_zero=False`` drops every zero weight first, i.e. unique values and entropy are
  computed over the *non-zero weights only* (entropy of the conditional distribution).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

import torch
from torch import Tensor

from .centres import term_counts as _centre_term_counts

__all__ = [
    "SizeReport",
    "TensorSize",
    "codebook",
    "entropy_bits",
    "expected_calibration_error",
    "fixing_metrics",
    "nll",
    "order_shares",
    "size_report",
    "term_counts",
    "topk_accuracy",
    "unique_count",
    "weight_histogram",
]

TensorOrTensors = Union[Tensor, Sequence[Tensor]]


# --------------------------------------------------------------------------- helpers


def _flat(values: TensorOrTensors) -> Tensor:
    """One 1-D view of a tensor or of a whole network's tensors, so callers can pass either."""
    if isinstance(values, Tensor):
        return values.detach().reshape(-1)
    parts = [v.detach().reshape(-1) for v in values]
    if not parts:
        return torch.empty(0)
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    device = parts[0].device
    return torch.cat([p.to(device=device, dtype=dtype) for p in parts])


def _weights(values: TensorOrTensors, include_zero: bool) -> Tensor:
    """Flattened weights, NaN-checked, with zeros dropped when asked."""
    flat = _flat(values)
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("weight statistics are undefined for NaN values")
    if not include_zero:
        flat = flat[flat != 0]
    return flat


def _counts(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values and their counts; -0.0 folds into 0.0 (``x + 0`` clears its sign)."""
    if flat.is_floating_point():
        flat = flat + 0.0
    return torch.unique(flat, sorted=True, return_counts=True)


def _entropy_from_counts(counts: Tensor) -> float:
    """Shannon entropy in bits of an empirical distribution given by its counts."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    p = counts.to(torch.float64) / total
    h = float(-(p * torch.log2(p)).sum())
    return h if h > 0.0 else 0.0  # a single symbol gives -0.0 (printed '-0.000'), round-off a tiny negative


# --------------------------------------------------------------------------- codebook stats


def unique_count(values: TensorOrTensors, include_zero: bool = True) -> int:
    """Number of distinct weight values (the paper's "unique weights")."""
    return int(_counts(_weights(values, include_zero))[0].numel())


def entropy_bits(values: TensorOrTensors, include_zero: bool = True) -> float:
    """Shannon entropy (bits per weight) of the empirical distribution of weight values.

    It is the lower bound on bits per weight for any coder that codes weights independently
    with one shared table, which is why the size report multiplies it by the weight count.
    """
    return _entropy_from_counts(_counts(_weights(values, include_zero))[1])


def weight_histogram(values: TensorOrTensors, bins: int = 120) -> dict[str, list]:
    """``{"edges": bins + 1 floats, "counts": bins ints}``: an equal-width histogram of the weights over
    their range (a single value gets a bin of width 1 around it); small enough for a report, so the
    float model's distribution can be drawn under the fixed one without the float model."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    flat = _weights(values, include_zero=True).detach().to(torch.float64)
    if flat.numel() == 0:
        return {"edges": [], "counts": []}
    lo, hi = float(flat.min()), float(flat.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("a histogram of non-finite weights is undefined")
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(flat, bins=bins, min=lo, max=hi)  # the last bin includes hi
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": [float(e) for e in edges.tolist()], "counts": [int(c) for c in counts.round().tolist()]}


def codebook(values: TensorOrTensors, include_zero: bool = True) -> tuple[Tensor, Tensor]:
    """The sorted distinct values and how many weights hold each (counts are int64)."""
    return _counts(_weights(values, include_zero))


# --------------------------------------------------------------------------- power-of-two orders


def order_shares(orders: Tensor) -> dict[int, float]:
    """Share of weights per number of power-of-two terms (key 0 = zero weights).

    Shares sum to 1 over the keys present; an empty input gives an empty dict.
    """
    flat = orders.detach().reshape(-1)
    if flat.numel() == 0:
        return {}
    if flat.is_floating_point() or flat.is_complex():
        raise ValueError("orders must be an integer tensor")
    if bool((flat < 0).any()):
        raise ValueError("orders must be non-negative")
    keys, counts = torch.unique(flat, sorted=True, return_counts=True)
    total = flat.numel()
    return {int(k): int(c) / total for k, c in zip(keys.tolist(), counts.tolist())}


def term_counts(
    values: Tensor, b: int = 7, signed_terms: bool = False, strict: bool = True
) -> Tensor:
    """Number of power-of-two terms needed to write each value, smallest term 2^-b.

    A value v is representable when |v| * 2^b is an integer n. With ``signed_terms=False``
    (PWFN's positive terms) the count is popcount(n); with ``signed_terms=True`` (WFN's signed
    terms) it is the minimal number of signed digits, i.e. the non-adjacent-form weight,
    which equals popcount(n XOR 3n). Zero needs 0 terms. Values that are not representable
    (or NaN/inf, or too large for exact float64 arithmetic) raise ``ValueError`` when
    ``strict`` and are reported as -1 otherwise.

    The digit arithmetic is ``pwfn.core.centres.term_counts`` (the one the engine's centres use);
    this wrapper adds the float -> integer check and the strict/lenient reporting.
    """
    if b < 0:
        raise ValueError("b must be non-negative")
    v = values.detach()
    if not v.is_floating_point():
        v = v.to(torch.float64)
    scaled = v.to(torch.float64).abs() * (2.0**b)
    finite = torch.isfinite(scaled) & (scaled < 2.0**53)
    rounded = torch.where(finite, torch.round(scaled), torch.zeros_like(scaled))
    ok = finite & (rounded == scaled)
    if strict and not bool(ok.all()):
        bad = v[~ok].reshape(-1)[:5].tolist()
        raise ValueError(f"values are not sums of powers of two down to 2^-{b}: e.g. {bad}")
    counts = _centre_term_counts(rounded.to(torch.int64), signed_terms)
    return torch.where(ok, counts, torch.full_like(counts, -1)).reshape(values.shape)


# --------------------------------------------------------------------------- size report


@dataclass(frozen=True)
class TensorSize:
    """Storage and arithmetic cost of one tensor (or a sum of tensors) under several encodings.

    Byte counts are floats where they come from an entropy (fractional bytes are meaningful
    when summed). For unquantised tensors the fixed-width and entropy-bound fields equal the
    tensor's raw bytes in its own dtype, since that is how they are stored; this keeps the
    totals comparable with a packed file.

    Arithmetic model (per *stored* weight, i.e. one use of each weight; a later version can
    scale by the spatial positions a convolution weight is applied at): a zero weight is
    skipped; a weight whose value has n >= 1 power-of-two terms replaces its multiplication
    by n shifts and n - 1 additions; a value that is not a sum of powers of two down to
    2^-b keeps its multiplication.
    """

    numel: int  # real values stored (a complex entry counts two)
    quantised: bool
    fp32_bytes: int
    fp16_bytes: int
    raw_bytes: int
    fixed_width_bytes: float
    entropy_bound_bytes: float
    per_tensor_entropy_bound_bytes: float
    packed_bytes: int | None = None
    multiplications_replaced: int = 0
    shifts: int = 0
    adds: int = 0
    zeros_skipped: int = 0
    multiplications_kept: int = 0


@dataclass(frozen=True)
class SizeReport:
    """Per-tensor sizes, their totals (all tensors, and quantised tensors only) and codebook facts."""

    per_tensor: dict[str, TensorSize]
    total: TensorSize
    quantised_total: TensorSize
    codebook_size: int
    bits_per_index: int
    global_entropy_bits: float
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form, for run logs."""
        return asdict(self)


def _sum_sizes(items: Iterable[TensorSize], quantised: bool) -> TensorSize:
    """Field-wise total; packed bytes only when every summed tensor has them."""
    items = list(items)
    packed = [t.packed_bytes for t in items]
    return TensorSize(
        numel=sum(t.numel for t in items),
        quantised=quantised,
        fp32_bytes=sum(t.fp32_bytes for t in items),
        fp16_bytes=sum(t.fp16_bytes for t in items),
        raw_bytes=sum(t.raw_bytes for t in items),
        fixed_width_bytes=sum(t.fixed_width_bytes for t in items),
        entropy_bound_bytes=sum(t.entropy_bound_bytes for t in items),
        per_tensor_entropy_bound_bytes=sum(t.per_tensor_entropy_bound_bytes for t in items),
        packed_bytes=sum(packed) if items and all(p is not None for p in packed) else None,  # type: ignore[misc]
        multiplications_replaced=sum(t.multiplications_replaced for t in items),
        shifts=sum(t.shifts for t in items),
        adds=sum(t.adds for t in items),
        zeros_skipped=sum(t.zeros_skipped for t in items),
        multiplications_kept=sum(t.multiplications_kept for t in items),
    )


def size_report(
    tensors: Mapping[str, Tensor],
    quantised: Iterable[str],
    packed_bytes_per_tensor: Mapping[str, int] | None = None,
    b: int = 7,
    signed_terms: bool = False,
) -> SizeReport:
    """Sizes of a model under fp32, fp16, fixed-width indices, entropy bounds and a real packing.

    K is the size of the *global* codebook (distinct values over all quantised tensors, zero
    included); fixed-width indices take ceil(log2 K) bits (0 when K <= 1). The global entropy
    bound is H(all quantised weights) * count / 8; the per-tensor bound sums each tensor's own
    empirical entropy times its count / 8 and is never larger. ``b`` and ``signed_terms``
    choose how shift/add terms are counted (see ``term_counts``).
    """
    q = set(quantised)
    missing = q - set(tensors)
    if missing:
        raise ValueError(f"quantised names not among the tensors: {sorted(missing)}")
    packed = dict(packed_bytes_per_tensor or {})
    complex_q = sorted(n for n in q if tensors[n].is_complex())
    if complex_q:
        raise ValueError(f"quantised tensors hold real codebook values, but {complex_q[:3]} are complex")

    q_values = [tensors[n] for n in tensors if n in q]
    if q_values:
        g_vals, g_counts = codebook(q_values)
    else:
        g_vals, g_counts = torch.empty(0), torch.empty(0, dtype=torch.int64)
    k = int(g_vals.numel())
    bits_per_index = math.ceil(math.log2(k)) if k > 1 else 0
    h_global = _entropy_from_counts(g_counts)
    if k:
        terms = term_counts(g_vals, b=b, signed_terms=signed_terms, strict=False)
    else:
        terms = torch.empty(0, dtype=torch.int64)

    per: dict[str, TensorSize] = {}
    for name, t in tensors.items():
        numel = t.numel() * (2 if t.is_complex() else 1)  # real values: a complex entry is two
        raw = t.numel() * t.element_size()
        common = dict(
            numel=numel,
            fp32_bytes=numel * 4,
            fp16_bytes=numel * 2,
            raw_bytes=raw,
            packed_bytes=packed.get(name),
        )
        if name not in q:
            if t.is_complex():
                kept = 2 * numel  # a complex entry is one complex product: 4 real multiplications
            else:
                kept = numel if t.is_floating_point() else 0  # a float value stays a real multiplication
            per[name] = TensorSize(
                quantised=False,
                fixed_width_bytes=float(raw),
                entropy_bound_bytes=float(raw),
                per_tensor_entropy_bound_bytes=float(raw),
                multiplications_kept=kept,
                **common,
            )
            continue
        vals, counts = codebook(t)
        own_h = _entropy_from_counts(counts)
        # Term count of each of this tensor's values, looked up in the global codebook.
        idx = torch.searchsorted(g_vals.to(vals.device, torch.float64), vals.to(torch.float64))
        n_terms = terms.to(vals.device)[idx] if vals.numel() else terms[:0]
        counts = counts.to(torch.int64)
        zero = n_terms == 0
        dyadic = n_terms > 0
        kept = n_terms < 0
        per[name] = TensorSize(
            quantised=True,
            fixed_width_bytes=numel * bits_per_index / 8,
            entropy_bound_bytes=h_global * numel / 8,
            per_tensor_entropy_bound_bytes=own_h * numel / 8,
            multiplications_replaced=int(counts[dyadic].sum()),
            shifts=int((counts * n_terms)[dyadic].sum()),
            adds=int((counts * (n_terms - 1))[dyadic].sum()),
            zeros_skipped=int(counts[zero].sum()),
            multiplications_kept=int(counts[kept].sum()),
            **common,
        )

    return SizeReport(
        per_tensor=per,
        total=_sum_sizes(per.values(), quantised=False),
        quantised_total=_sum_sizes((s for s in per.values() if s.quantised), quantised=True),
        codebook_size=k,
        bits_per_index=bits_per_index,
        global_entropy_bits=h_global,
        notes={
            "arithmetic": "per stored value: zero skipped; n terms -> n shifts + n-1 adds; every value of a "
                          "float (unquantised) tensor keeps its multiplication (a complex entry its 4 real ones)",
            "unquantised": "fixed-width and entropy-bound fields are the raw bytes",
            "values": "numel counts real values: a complex entry is two (fp32/fp16 bytes: 8/4 per complex64 entry)",
        },
    )


# --------------------------------------------------------------------------- predictions


def _check_probs(probs: Tensor, labels: Tensor) -> None:
    """Shape checks shared by the calibration metrics."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (N,) matching probs (N, C); got {tuple(labels.shape)} "
            f"for {tuple(probs.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("calibration metrics need at least one sample")


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE of (MC-averaged) predictive probabilities with equal-width confidence bins.

    Confidence is the top probability, bins are (i/n, (i+1)/n] (the first also holds 0), and
    ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|.
    """
    _check_probs(probs, labels)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    p = probs.detach().to(torch.float64)
    conf, pred = p.max(dim=1)
    correct = (pred == labels.to(pred.device)).to(torch.float64)
    bins = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).to(torch.int64)
    n_per = torch.zeros(n_bins, dtype=torch.float64, device=p.device)
    n_per.scatter_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros_like(n_per).scatter_add_(0, bins, conf)
    acc_sum = torch.zeros_like(n_per).scatter_add_(0, bins, correct)
    # |sum acc - sum conf| / N per bin == |B|/N * |mean acc - mean conf|.
    return float((acc_sum - conf_sum).abs().sum() / conf.numel())


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (nats) of the true labels under predictive probabilities.

    Probabilities are clamped at ``eps`` so a confidently wrong sample gives a large but
    finite loss, as is usual for MC-averaged predictions.
    """
    _check_probs(probs, labels)
    p = probs.detach().to(torch.float64)
    picked = p.gather(1, labels.to(p.device, torch.int64).unsqueeze(1)).squeeze(1)
    return float(-torch.log(picked.clamp_min(eps)).mean())


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest scores (ties broken by topk)."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"need logits (N, C) and labels (N,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in 1..{logits.shape[1]}, got {k}")
    if logits.shape[0] == 0:
        raise ValueError("accuracy needs at least one sample")
    top = logits.detach().topk(k, dim=1).indices
    hit = (top == labels.to(top.device).unsqueeze(1)).any(dim=1)
    return float(hit.to(torch.float64).mean())


def fixing_metrics(values: Tensor, fixed: Tensor, b: int, signed_terms: bool) -> dict:
    """What a (partly) fixed network's report shows of its fixed weights: fixed fraction, unique values and
    entropy (with and without zero), shares of 0-, 1-, 2-... term values, codebook and counts.

    ``values`` and ``fixed`` are the flat values of every quantised tensor and their fixed mask; ``b`` and
    ``signed_terms`` are the engine's (they decide how many power-of-two terms a value takes).
    """
    fv = values[fixed]
    out: dict = {"fixed_fraction": float(fixed.float().mean()), "n_weights": int(values.numel())}
    if fv.numel() == 0:
        return out
    out.update(
        unique=unique_count(fv, include_zero=True),
        unique_nonzero=unique_count(fv, include_zero=False),
        entropy=entropy_bits(fv, include_zero=True),
        entropy_nonzero=entropy_bits(fv, include_zero=False),
        order_shares={str(k): v for k, v in order_shares(term_counts(fv, b=b, signed_terms=signed_terms)).items()},
    )
    cb, counts = codebook(fv)
    out["codebook"] = [float(v) for v in cb.tolist()]
    out["codebook_counts"] = [int(c) for c in counts.tolist()]
    return out


def fixing_metrics_from_codebook(codebook_values: Tensor, counts: Tensor, n_weights: int, b: int,
                                 signed_terms: bool) -> dict:
    """:func:`fixing_metrics` from the fixed weights' codebook (sorted distinct values, -0.0 folded into
    0.0, and their counts) instead of the weights themselves: what a sharded model's processes can
    merge without gathering its weights. ``fixed_fraction`` is the exact ratio."""
    n_fixed = int(counts.sum())
    out: dict = {"fixed_fraction": n_fixed / n_weights if n_weights else 0.0, "n_weights": int(n_weights)}
    if n_fixed == 0:
        return out
    nonzero = codebook_values != 0
    orders = term_counts(codebook_values, b=b, signed_terms=signed_terms)
    per_order: dict[int, int] = {}
    for k, c in zip(orders.tolist(), counts.tolist()):
        per_order[int(k)] = per_order.get(int(k), 0) + int(c)
    out.update(
        unique=int(codebook_values.numel()),
        unique_nonzero=int(nonzero.sum()),
        entropy=_entropy_from_counts(counts),
        entropy_nonzero=_entropy_from_counts(counts[nonzero]),
        order_shares={str(k): c / n_fixed for k, c in sorted(per_order.items())},
    )
    out["codebook"] = [float(v) for v in codebook_values.tolist()]
    out["codebook_counts"] = [int(c) for c in counts.tolist()]
    return out

"""Candidate centres: the shared power-of-two codebook the fixing engine chooses from.

Every centre is a dyadic rational ``n * 2**-b`` with an integer ``n``.  We enumerate the
integers (exactly, as int64) and scale at the end, so every value is exact in float32 (and
float64) as long as ``|n| < 2**24``, which the size limit below guarantees.

Two families, one function:

* PWFN (``signed_terms=False``): ``±(sum of at most `order` distinct powers of two)``, i.e.
  ``±n * 2**-b`` with ``popcount(n) <= order``.  Hardware: ``order`` shifts and adds.
* WFN  (``signed_terms=True``): terms may be subtracted too ("additive powers of two"), i.e.
  ``±n * 2**-b`` whose non-adjacent form (NAF, the minimal signed-digit representation)
  has at most ``order`` non-zero digits.  ``7 = 8 - 1`` is order 2 here, order 3 in PWFN.

Zero is always a centre (order 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pwfn.errors import ConfigError, EngineInputError

__all__ = [
    "MAX_GRID",
    "CentreSet",
    "Decomposition",
    "candidate_centres",
    "decompose",
    "grid_limit",
    "lookup_centres",
    "term_counts",
]

#: Largest ``n`` (i.e. ``max_abs * 2**b``) we enumerate: keeps the enumeration bounded and
#: every centre exact in float32 (24-bit significand).
MAX_GRID = 2**24

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_LOOKUP_CHUNK = 1 << 16  # values per chunk of lookup_centres (cache-sized temporaries)
_LOOKUP_TABLE_MIN = 1 << 16  # grid table when its 2G+3 entries are <= max(this, #values)


class Decomposition(NamedTuple):
    """Power-of-two terms of codebook values: ``value == sum(signs * 2.0**exponents)``.

    ``signs`` (int8) and ``exponents`` (int16) have shape ``values.shape + (width,)``, most
    significant term first, padded with sign 0 / exponent 0; ``orders`` (int64, shape
    ``values.shape``) counts the non-zero terms (0 for the value zero).
    """

    signs: torch.Tensor
    exponents: torch.Tensor
    orders: torch.Tensor


@dataclass(frozen=True)
class CentreSet:
    """A sorted candidate codebook with each value's hardware cost.

    ``values``: sorted ascending, exact dyadic values.  ``orders``: number of power-of-two
    terms per value (0 for zero).  ``signs``/``exponents``: the minimal decomposition,
    padded to ``max_order`` columns (see :class:`Decomposition`).  Kept together so that a
    centre's cost can be reported or exported without recomputation.
    """

    values: torch.Tensor
    orders: torch.Tensor
    signs: torch.Tensor
    exponents: torch.Tensor
    b: int
    max_order: int
    signed_terms: bool

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def zero_index(self) -> int:
        """Position of the zero centre, looked up by value (never assumed)."""
        idx = int(torch.searchsorted(self.values, torch.zeros((), dtype=self.values.dtype,
                                                              device=self.values.device)))
        if idx >= len(self) or float(self.values[idx]) != 0.0:  # pragma: no cover - invariant
            raise EngineInputError("centre set has no zero centre")
        return idx

    def grid(self) -> torch.Tensor:
        """The integers ``n`` with ``value == n * 2**-b`` (int64), for exact arithmetic."""
        return torch.round(self.values.double() * (2.0**self.b)).to(torch.int64)

    @property
    def grid_span(self) -> int:
        """``G``: the largest ``|n|``, so every value lies in ``[-G, G] * 2**-b``.

        (A cut-down set, e.g. budget mode's allowed values, need not be symmetric.)
        """
        if not len(self):
            return 0
        ends = self.values[[0, -1]].double().abs().max()
        return int(torch.round(ends * 2.0**self.b))

    def subset(self, order: int) -> torch.Tensor:
        """Indices (int64, ascending) of the centres with at most ``order`` terms."""
        return torch.nonzero(self.orders <= order).squeeze(1)


def _check_params(order: int, b: int, dtype: torch.dtype) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ConfigError(f"order must be a non-negative int, got {order!r}")
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 60:
        raise ConfigError(f"b (smallest term 2**-b) must be an int in [0, 60], got {b!r}")
    if dtype not in _SUPPORTED_DTYPES:
        raise ConfigError(f"centre dtype must be float32 or float64, got {dtype}")


def grid_limit(max_abs: float, b: int) -> int:
    """Largest ``n`` with ``n * 2**-b <= max_abs`` (exact: scaling by 2**b is exact)."""
    max_abs = float(max_abs)
    if not math.isfinite(max_abs) or max_abs < 0:
        raise EngineInputError(f"max_abs must be finite and >= 0, got {max_abs!r}")
    scaled = math.ldexp(max_abs, b)
    if scaled > MAX_GRID:
        raise EngineInputError(
            f"max_abs={max_abs!r} with b={b} needs {scaled:.3g} grid points (> 2**24): "
            "refusing to enumerate an absurd codebook (are the weights diverged?)"
        )
    return int(math.floor(scaled))


def _naf_digits(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-adjacent form of non-negative ints as two bit masks (positive, negative digits).

    Why: NAF is the unique signed-digit representation with no two adjacent non-zero
    digits and has the minimal number of non-zero digits, so its weight is the true term
    count of an "additive powers of two" value.  Textbook right-to-left algorithm,
    vectorised over ``n`` (at most ~64 iterations).
    """
    e = n.clone()
    pos = torch.zeros_like(n)
    neg = torch.zeros_like(n)
    bit = 0
    while bool((e > 0).any()):
        odd = (e & 1) == 1
        # digit = 2 - (e mod 4) for odd e: +1 when e = 1 (mod 4), -1 when e = 3 (mod 4)
        minus = odd & ((e & 3) == 3)
        plus = odd & ~minus
        pos |= plus.to(n.dtype) << bit
        neg |= minus.to(n.dtype) << bit
        e = (e - plus.to(n.dtype) + minus.to(n.dtype)) >> 1
        bit += 1
    return pos, neg


def _popcount(n: torch.Tensor) -> torch.Tensor:
    """Number of set bits of non-negative int64s (loop over bits, vectorised over n)."""
    count = torch.zeros_like(n)
    e = n.clone()
    while bool((e > 0).any()):
        count += e & 1
        e >>= 1
    return count


def term_counts(n: torch.Tensor, signed_terms: bool) -> torch.Tensor:
    """Minimal number of power-of-two terms of the non-negative int64s ``n``."""
    if signed_terms:
        pos, neg = _naf_digits(n)
        return _popcount(pos) + _popcount(neg)
    return _popcount(n)


def _terms_from_masks(pos: torch.Tensor, neg: torch.Tensor, width: int, b: int,
                      sign_of_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn digit bit masks into padded (signs, exponents), most significant term first."""
    c = pos.numel()
    signs = torch.zeros((c, max(width, 0)), dtype=torch.int8, device=pos.device)
    exps = torch.zeros((c, max(width, 0)), dtype=torch.int16, device=pos.device)
    if width == 0 or c == 0:
        return signs, exps
    filled = torch.zeros(c, dtype=torch.int64, device=pos.device)
    rows = torch.arange(c, device=pos.device)
    top = int(torch.maximum(pos, neg).max().item()).bit_length()
    for bit in range(top - 1, -1, -1):  # loop over bit positions, vectorised over values
        p = ((pos >> bit) & 1) == 1
        m = ((neg >> bit) & 1) == 1
        hit = p | m
        if not bool(hit.any()):
            continue
        r = rows[hit]
        col = filled[hit]
        digit = torch.where(p[hit], 1, -1).to(torch.int8) * sign_of_value[hit]
        signs[r, col] = digit
        exps[r, col] = bit - b
        filled[hit] += 1
    return signs, exps


def decompose(values: torch.Tensor, b: int = 7, signed_terms: bool = False,
              width: int | None = None) -> Decomposition:
    """Minimal power-of-two decomposition of arbitrary codebook values (for export/cost).

    Why: a codebook value's hardware cost is its number of shift-add terms; export needs
    the terms themselves.  ``values`` must be multiples of ``2**-b``; PWFN uses the binary
    digits (positive terms), WFN the NAF (signed terms).  ``width`` pads the term columns
    (default: the largest term count present).
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise EngineInputError("values: expected a floating-point tensor")
    flat = values.detach().reshape(-1).double()
    if not bool(torch.isfinite(flat).all()):
        raise EngineInputError("values: contains NaN or inf")
    scaled = flat * (2.0**b)
    n = torch.round(scaled)
    if not bool((n == scaled).all()):
        raise EngineInputError(f"values: not all multiples of 2**-{b}, cannot decompose")
    if flat.numel() and float(n.abs().max()) >= 2.0**62:
        raise EngineInputError("values: too large to decompose")
    n = n.to(torch.int64)
    mag = n.abs()
    sign = torch.sign(n).to(torch.int8)
    if signed_terms:
        pos, neg = _naf_digits(mag)
    else:
        pos, neg = mag, torch.zeros_like(mag)
    orders = _popcount(pos) + _popcount(neg)
    needed = int(orders.max()) if orders.numel() else 0
    w = needed if width is None else int(width)
    if w < needed:
        raise EngineInputError(f"values: need {needed} terms but width={w}")
    signs, exps = _terms_from_masks(pos, neg, w, b, sign)
    shape = tuple(values.shape)
    return Decomposition(signs.reshape(*shape, w), exps.reshape(*shape, w), orders.reshape(shape))


def candidate_centres(max_abs: float, order: int, b: int = 7, signed_terms: bool = False,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> CentreSet:
    """All centres ``|c| <= max_abs`` with at most ``order`` power-of-two terms (and zero).

    Why: this is the codebook the engine searches; enumerating integers ``n`` up to
    ``floor(max_abs * 2**b)`` and scaling keeps the values exact.  Raises
    :class:`EngineInputError` when that would exceed 2**24 grid points.
    """
    _check_params(order, b, dtype)
    g = grid_limit(max_abs, b)
    n = torch.arange(1, g + 1, dtype=torch.int64)
    counts = term_counts(n, signed_terms)
    keep = counts <= order
    n = n[keep]
    counts = counts[keep]
    grid = torch.cat([-n.flip(0), torch.zeros(1, dtype=torch.int64), n])
    orders = torch.cat([counts.flip(0), torch.zeros(1, dtype=torch.int64), counts])
    values = (grid.double() * (2.0**-b)).to(dtype)
    dec = decompose(values, b=b, signed_terms=signed_terms, width=order)
    return CentreSet(
        values=values.to(device) if device is not None else values,
        orders=orders.to(device) if device is not None else orders,
        signs=dec.signs.to(device) if device is not None else dec.signs,
        exponents=dec.exponents.to(device) if device is not None else dec.exponents,
        b=b,
        max_order=order,
        signed_terms=signed_terms,
    )


def lookup_centres(values: torch.Tensor, centres: CentreSet,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """int32 index of each value in ``centres`` (exact match), -1 where absent or masked out.

    Why: reporting and export need the centre of fixed weights from their values.  Exact either
    way it runs: a table indexed by ``n = value * 2**b`` (when its ``2G+3`` entries are not much
    more than the values), else a binary search per value.
    """
    flat = values.reshape(-1)
    keep = (torch.ones(flat.shape, dtype=torch.bool, device=flat.device) if mask is None
            else mask.reshape(-1))
    span = centres.grid_span
    scale = 2.0**centres.b
    table = None
    if 2 * span + 3 <= max(_LOOKUP_TABLE_MIN, int(flat.numel())):
        table = torch.full((2 * span + 3,), -1, dtype=torch.int32, device=flat.device)
        table[centres.grid() + span + 1] = torch.arange(len(centres), dtype=torch.int32,
                                                        device=flat.device)
    out = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    for s in range(0, int(flat.numel()), _LOOKUP_CHUNK):
        v = flat[s:s + _LOOKUP_CHUNK]
        if table is not None:
            scaled = v * scale
            n = scaled.clamp(-span - 1, span + 1).to(torch.int32)
            exact = (n.to(v.dtype) == scaled) & keep[s:s + _LOOKUP_CHUNK]
            index = table.index_select(0, n.add_(span + 1))
        else:
            cv = centres.values
            pos = torch.searchsorted(cv, v).clamp_(max=len(cv) - 1)
            exact = (cv.index_select(0, pos) == v) & keep[s:s + _LOOKUP_CHUNK]
            index = pos.to(torch.int32)
        out[s:s + _LOOKUP_CHUNK] = index.masked_fill_(~exact, -1)
    return out.reshape(values.shape)

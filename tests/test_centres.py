"""Candidate centres against independent brute force (itertools over exponent sets)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pwfn.core.centres import (
    MAX_GRID,
    CentreSet,
    candidate_centres,
    decompose,
    lookup_centres,
    term_counts,
)
from pwfn.errors import ConfigError, EngineInputError


def brute_force(max_abs: float, order: int, b: int, signed: bool) -> dict:
    """value (Fraction) -> minimal number of power-of-two terms, by enumeration.

    Minimal representations never repeat an exponent (2^e + 2^e = 2^(e+1), 2^e - 2^e = 0),
    so distinct exponents from 2^-b up to one above max_abs suffice.
    """
    limit = Fraction(max_abs)
    top = max(-b, math.ceil(math.log2(max_abs)) + 1) if max_abs > 0 else -b
    exps = range(-b, top + 1)
    best = {Fraction(0): 0}
    for k in range(1, order + 1):
        for combo in itertools.combinations(exps, k):
            for signs in itertools.product((1, -1) if signed else (1,), repeat=k):
                v = sum(s * Fraction(2) ** e for s, e in zip(signs, combo))
                if v <= 0 or v > limit:
                    continue
                for val in (v, -v):
                    if val not in best or best[val] > k:
                        best[val] = k
    return best


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("max_abs, order, b", [
    (0.5, 1, 7), (0.5, 2, 7), (0.36, 4, 7), (0.45, 3, 7), (1.0, 4, 4), (3.0, 2, 3),
    (0.0, 3, 7), (0.005, 2, 7), (2.0**-7, 1, 7), (1.75, 4, 2), (5.0, 1, 0),
])
def test_matches_brute_force(max_abs, order, b, signed):
    cs = candidate_centres(max_abs, order, b=b, signed_terms=signed)
    expected = brute_force(max_abs, order, b, signed)
    got = [Fraction(float(x)) for x in cs.values]
    assert got == sorted(expected)
    assert cs.orders.tolist() == [expected[v] for v in got]
    assert cs.values.dtype == torch.float32
    # exact: the float32 values are exactly the dyadic rationals
    assert all(Fraction(float(x)) * 2**b == int(Fraction(float(x)) * 2**b) for x in cs.values)


def test_inclusive_bound_zero_and_symmetry():
    cs = candidate_centres(0.25, 1)
    assert float(cs.values.max()) == 0.25  # |c| <= max_abs is inclusive
    assert torch.equal(cs.values, -cs.values.flip(0))
    assert float(cs.values[cs.zero_index]) == 0.0
    assert int(cs.orders[cs.zero_index]) == 0
    assert bool((cs.values[1:] > cs.values[:-1]).all())  # strictly sorted
    cs = candidate_centres(0.2499, 1)
    assert float(cs.values.max()) == 0.125


def test_signed_terms_reduce_order():
    pw = candidate_centres(0.5, 4, signed_terms=False)
    wf = candidate_centres(0.5, 4, signed_terms=True)
    assert pw.orders[pw.values == 7 / 128].item() == 3  # 4 + 2 + 1
    assert wf.orders[wf.values == 7 / 128].item() == 2  # 8 - 1
    assert wf.orders[wf.values == 63 / 128].item() == 2  # 64 - 1
    # with the same order limit the signed set is a superset
    small_pw = candidate_centres(0.5, 2, signed_terms=False)
    small_wf = candidate_centres(0.5, 2, signed_terms=True)
    assert set(small_pw.values.tolist()) < set(small_wf.values.tolist())


@pytest.mark.parametrize("signed", [False, True])
def test_decomposition_round_trip(signed):
    cs = candidate_centres(2.0, 4, signed_terms=signed)
    total = (cs.signs.double() * torch.pow(2.0, cs.exponents.double())).sum(1)
    assert torch.equal(total, cs.values.double())
    assert torch.equal((cs.signs != 0).sum(1), cs.orders)
    assert cs.signs.shape == (len(cs), 4) and cs.exponents.shape == (len(cs), 4)
    assert int(cs.exponents[cs.signs != 0].min()) >= -7
    if signed:  # non-adjacent form: no two neighbouring exponents are both used
        for row_s, row_e in zip(cs.signs.tolist(), cs.exponents.tolist()):
            used = [e for s, e in zip(row_s, row_e) if s]
            assert all(a - b >= 2 for a, b in zip(used, used[1:]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=20), st.booleans(),
       st.integers(0, 10))
def test_decompose_arbitrary_values(ns, signed, b):
    vals = torch.tensor(ns, dtype=torch.float64) * 2.0**-b
    dec = decompose(vals, b=b, signed_terms=signed)
    total = (dec.signs.double() * torch.pow(2.0, dec.exponents.double())).sum(-1)
    assert torch.equal(total, vals)
    expected = [_min_terms(abs(n), signed) for n in ns]
    assert dec.orders.tolist() == expected


def _min_terms(n: int, signed: bool) -> int:
    """Independent minimal term count: binary popcount, or the NAF weight by recursion."""
    if not signed:
        return bin(n).count("1")
    weight = 0
    while n:
        if n & 1:
            n -= 2 - (n & 3)  # digit +1 or -1
            weight += 1
        n >>= 1
    return weight


def test_term_counts_small_exhaustive():
    n = torch.arange(0, 4096)
    assert term_counts(n, False).tolist() == [bin(i).count("1") for i in range(4096)]
    # NAF weight of 9-bit numbers is at most 5: brute force over <= 5 signed terms is complete
    bf = brute_force(511 / 128, 5, 7, True)
    assert term_counts(n[1:512], True).tolist() == [bf[Fraction(i, 128)] for i in range(1, 512)]
    assert term_counts(n, True).tolist() == [_min_terms(i, True) for i in range(4096)]


def test_float64_and_device_arguments():
    cs = candidate_centres(0.3, 2, dtype=torch.float64, device="cpu")
    assert cs.values.dtype == torch.float64 and cs.values.device.type == "cpu"


def test_errors():
    with pytest.raises(EngineInputError, match="2\\*\\*24"):
        candidate_centres(float(MAX_GRID), 2, b=7)
    with pytest.raises(EngineInputError):
        candidate_centres(float("nan"), 2)
    with pytest.raises(EngineInputError):
        candidate_centres(-1.0, 2)
    with pytest.raises(ConfigError):
        candidate_centres(1.0, -1)
    with pytest.raises(ConfigError):
        candidate_centres(1.0, 2, b=-1)
    with pytest.raises(ConfigError):
        candidate_centres(1.0, 2, dtype=torch.float16)
    with pytest.raises(EngineInputError, match="multiples"):
        decompose(torch.tensor([0.1]), b=7)
    with pytest.raises(EngineInputError, match="NaN"):
        decompose(torch.tensor([float("nan")]))
    with pytest.raises(EngineInputError, match="width"):
        decompose(torch.tensor([7 / 128]), width=2)


@pytest.mark.parametrize("max_abs, b", [(1.0, 7), (256.0, 10)])  # table, then binary search
def test_lookup_centres_exact_match_only(max_abs, b):
    cs = candidate_centres(max_abs, 2, b)
    n = 0.25 * max_abs
    v = torch.tensor([[n, n + 2.0**-(b + 2)], [0.0, -0.75 * max_abs]])
    idx = lookup_centres(v, cs)
    assert idx.shape == (2, 2) and idx.dtype == torch.int32
    assert idx[0, 1] == -1
    assert cs.values[idx[[0, 1, 1], [0, 0, 1]].long()].tolist() == [n, 0.0, -0.75 * max_abs]
    masked = lookup_centres(v, cs, torch.tensor([[False, True], [True, True]]))
    assert masked[0, 0] == -1 and masked[1, 0] == idx[1, 0]


def test_lookup_centres_one_sided_set():
    """A cut-down set whose largest |value| is negative (budget mode) is found in full."""
    cs = candidate_centres(1.0, 1)
    keep = (cs.values == -1.0) | (cs.values == 0.0) | (cs.values == 0.5)
    sub = CentreSet(values=cs.values[keep], orders=cs.orders[keep], signs=cs.signs[keep],
                    exponents=cs.exponents[keep], b=cs.b, max_order=cs.max_order,
                    signed_terms=cs.signed_terms)
    assert sub.grid_span == 128
    assert lookup_centres(torch.tensor([-1.0, 0.5, 0.25, 0.0]), sub).tolist() == [0, 2, -1, 1]

"""Known answers for the reported numbers: entropy, unique values, orders, calibration, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from pwfn.core import metrics as M


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# --------------------------------------------------------------------------- unique / entropy


def test_entropy_two_equal_halves_is_one_bit() -> None:
    v = t(0, 0, 1, 1)
    assert M.entropy_bits(v) == pytest.approx(1.0)
    assert M.unique_count(v) == 2
    # Without zero only the 1s remain: one value, no uncertainty.
    assert M.entropy_bits(v, include_zero=False) == 0.0
    assert M.unique_count(v, include_zero=False) == 1


def test_entropy_of_one_value_is_plus_zero() -> None:
    """-0.0 would print as '-0.000 bits'."""
    for v in (t(0.5, 0.5, 0.5), t(0, 0, 0.25)):
        h = M.entropy_bits(v, include_zero=False)
        assert h == 0.0 and math.copysign(1.0, h) == 1.0 and f"{h:.3f}" == "0.000"


def test_entropy_hand_computed_with_and_without_zero() -> None:
    v = t(0, 0, 0, 0.5, -0.25, 1)
    h = -(0.5 * math.log2(0.5) + 3 * (1 / 6) * math.log2(1 / 6))
    assert M.entropy_bits(v) == pytest.approx(h)
    assert M.entropy_bits(v, include_zero=False) == pytest.approx(math.log2(3))
    assert M.unique_count(v) == 4
    assert M.unique_count(v, include_zero=False) == 3


def test_signed_zero_is_one_value_and_list_input_concatenates() -> None:
    a, b = t(-0.0, 0.0, 1.0), t(1.0, 2.0).reshape(2, 1)
    assert M.unique_count(a) == 2
    assert M.unique_count([a, b]) == M.unique_count(torch.cat([a, b.reshape(-1)])) == 3
    assert M.entropy_bits([a, b]) == pytest.approx(M.entropy_bits(t(0, 0, 1, 1, 2)))
    vals, counts = M.codebook([a, b])
    assert vals.tolist() == [0.0, 1.0, 2.0] and counts.tolist() == [2, 2, 1]
    assert not torch.signbit(vals[0])  # the zero of a codebook is +0.0


def test_codebook_sorted_with_counts_and_without_zero() -> None:
    vals, counts = M.codebook(t(0.5, -1, 0.5, 0, 2, -1, -1))
    assert vals.tolist() == [-1, 0, 0.5, 2] and counts.tolist() == [3, 1, 2, 1]
    vals, counts = M.codebook(t(0.5, 0, 0), include_zero=False)
    assert vals.tolist() == [0.5] and counts.tolist() == [1]


def test_empty_and_nan_inputs() -> None:
    assert M.entropy_bits(torch.empty(0)) == 0.0
    assert M.unique_count(torch.empty(0)) == 0
    assert M.entropy_bits(t(0, 0), include_zero=False) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        M.entropy_bits(t(1.0, float("nan")))


def test_entropy_matches_reference_on_random_values() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randint(-4, 5, (1000,), generator=g).float() / 8
    counts = torch.bincount((v * 8 + 4).long()).double()
    p = counts[counts > 0] / counts.sum()
    assert M.entropy_bits(v) == pytest.approx(float(-(p * p.log2()).sum()))


# --------------------------------------------------------------------------- orders


def _popcount_ref(n: int) -> int:
    return bin(n).count("1")


def _signed_min_terms_ref(limit_bits: int = 10) -> dict[int, int]:
    """Brute force: fewest signed powers of two (2^0..2^limit) summing to each small integer."""
    powers = [s * (1 << j) for j in range(limit_bits + 1) for s in (1, -1)]
    best = {0: 0}
    frontier = {0}
    for k in range(1, 6):
        nxt = {a + p for a in frontier for p in powers if abs(a + p) < (1 << (limit_bits + 1))}
        for v in nxt:
            best.setdefault(v, k)
        frontier = nxt
    return best


def test_term_counts_against_brute_force() -> None:
    b = 7
    ns = torch.arange(0, 256)
    values = torch.cat([ns, -ns]).double() / 2**b
    pos = M.term_counts(values.float(), b=b)
    signed = M.term_counts(values.float(), b=b, signed_terms=True)
    ref_signed = _signed_min_terms_ref()
    for n, p, s in zip(torch.cat([ns, ns]).tolist(), pos.tolist(), signed.tolist()):
        assert p == _popcount_ref(n)
        assert s == ref_signed[n]
    assert signed.le(pos).all()


def test_term_counts_examples_and_non_dyadic() -> None:
    # 0.875 = 0.5 + 0.25 + 0.125 (3 positive terms) = 1 - 0.125 (2 signed terms)
    assert M.term_counts(t(0.875)).item() == 3
    assert M.term_counts(t(0.875), signed_terms=True).item() == 2
    assert M.term_counts(t(0.0, -0.0, 4.0)).tolist() == [0, 0, 1]
    assert M.term_counts(t(2.0**-8), b=8).item() == 1
    with pytest.raises(ValueError, match="powers of two"):
        M.term_counts(t(2.0**-8))  # below the smallest term 2^-7
    assert M.term_counts(t(0.3, 0.5, float("inf")), strict=False).tolist() == [-1, 1, -1]
    shaped = M.term_counts(torch.full((2, 3), 0.75))
    assert shaped.shape == (2, 3) and shaped.eq(2).all()


def test_order_shares() -> None:
    assert M.order_shares(torch.tensor([0, 1, 1, 2])) == {0: 0.25, 1: 0.5, 2: 0.25}
    assert M.order_shares(torch.tensor([], dtype=torch.long)) == {}
    v = t(0, 0.5, 0.75, 0.875, 0.25, 0)
    shares = M.order_shares(M.term_counts(v))
    assert shares == pytest.approx({0: 2 / 6, 1: 2 / 6, 2: 1 / 6, 3: 1 / 6})
    with pytest.raises(ValueError):
        M.order_shares(torch.tensor([0.5]))


# --------------------------------------------------------------------------- calibration


def test_ece_known_answer() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    labels = torch.tensor([0, 1])
    # bin of 0.8: correct, |1 - 0.8| ; bin of 0.6: wrong, |0 - 0.6|; each half the samples.
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    perfect = torch.eye(3)
    assert M.expected_calibration_error(perfect, torch.arange(3)) == pytest.approx(0.0)


def _ece_reference(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    conf, pred = probs.double().max(1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        m = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        if m.any():
            acc = (pred[m] == labels[m]).double().mean()
            total += m.double().mean().item() * abs(acc.item() - conf[m].mean().item())
    return total


def test_ece_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 7, generator=g) * 2, dim=1)
    labels = torch.randint(0, 7, (500,), generator=g)
    for n_bins in (1, 5, 15):
        assert M.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
            _ece_reference(probs, labels, n_bins), abs=1e-12
        )


def test_nll_known_answer_and_clamp() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert M.nll(probs, torch.tensor([0, 1])) == pytest.approx(
        -(math.log(0.5) + math.log(0.75)) / 2
    )
    assert math.isfinite(M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))
    with pytest.raises(ValueError):
        M.nll(probs, torch.tensor([0]))


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert M.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert M.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert M.topk_accuracy(logits, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.topk_accuracy(logits, labels, 4)


# --------------------------------------------------------------------------- size report


def test_size_report_arithmetic() -> None:
    tensors = {
        "a": t(0, 0.5, 0.5, 0.875),
        "b": t(0.5, 0.5, 0.5, 0.5),
        "c": torch.ones(3, dtype=torch.float16),  # unquantised: stored raw
    }
    rep = M.size_report(tensors, {"a", "b"}, packed_bytes_per_tensor={"a": 3, "b": 1, "c": 6})
    # Global codebook {0, 0.5, 0.875}: K = 3 -> 2 bits; counts 1, 6, 1 of 8.
    h = -(2 * (1 / 8) * math.log2(1 / 8) + (6 / 8) * math.log2(6 / 8))
    assert rep.codebook_size == 3 and rep.bits_per_index == 2
    assert rep.global_entropy_bits == pytest.approx(h)
    a, b, c = rep.per_tensor["a"], rep.per_tensor["b"], rep.per_tensor["c"]
    assert (a.fp32_bytes, a.fp16_bytes, a.raw_bytes) == (16, 8, 16)
    assert a.fixed_width_bytes == pytest.approx(1.0)
    assert a.entropy_bound_bytes == pytest.approx(h * 4 / 8)
    assert a.per_tensor_entropy_bound_bytes == pytest.approx(1.5 * 4 / 8)  # H(1/4,1/2,1/4) = 1.5
    assert b.per_tensor_entropy_bound_bytes == 0.0
    # 0 skipped; 0.5 one shift; 0.875 three shifts + two adds (positive terms).
    assert (a.zeros_skipped, a.multiplications_replaced, a.shifts, a.adds) == (1, 3, 5, 2)
    assert (b.multiplications_replaced, b.shifts, b.adds) == (4, 4, 0)
    assert (c.raw_bytes, c.fixed_width_bytes, c.entropy_bound_bytes, c.shifts) == (6, 6.0, 6.0, 0)
    q = rep.quantised_total
    assert q.numel == 8 and q.entropy_bound_bytes == pytest.approx(h * 8 / 8)
    assert q.per_tensor_entropy_bound_bytes == pytest.approx(0.75)
    assert q.per_tensor_entropy_bound_bytes <= q.entropy_bound_bytes
    assert q.packed_bytes == 4 and rep.total.packed_bytes == 10
    assert rep.total.fp32_bytes == 44 and rep.total.raw_bytes == 38
    assert rep.total.fixed_width_bytes == pytest.approx(2 + 6)
    # Signed terms: 0.875 = 1 - 1/8 -> two shifts, one add.
    signed = M.size_report(tensors, {"a", "b"}, signed_terms=True).per_tensor["a"]
    assert (signed.shifts, signed.adds) == (4, 1)
    assert isinstance(rep.to_dict()["per_tensor"]["a"]["shifts"], int)


def test_size_report_non_dyadic_and_edge_cases() -> None:
    rep = M.size_report({"w": t(0.3, 0.3, 0.5)}, ["w"])
    w = rep.per_tensor["w"]
    assert (w.multiplications_kept, w.multiplications_replaced) == (2, 1)
    assert rep.total.packed_bytes is None
    one = M.size_report({"w": t(0.5, 0.5)}, ["w"])
    assert one.codebook_size == 1 and one.bits_per_index == 0
    assert one.quantised_total.fixed_width_bytes == 0 and one.global_entropy_bits == 0
    none = M.size_report({"w": t(0.5)}, [])
    assert none.codebook_size == 0 and none.quantised_total.numel == 0
    with pytest.raises(ValueError, match="not among"):
        M.size_report({"w": t(0.5)}, ["x"])

"""sigma initialisers of ``bayes`` against a direct numpy evaluation of the formulas.

Reference (ALGORITHM.md §1): for each mu, p_up/p_down are the powers of two just above/below
|mu| carrying mu's sign, r = |(mu - p_up)/mu| * |(mu - p_down)/mu| (r = 0 at mu == 0), and
sigma = clamp(0.0025 * r / quantile_0.75(r), floor, 0.05) with numpy's default (linear)
quantile. The reference below finds the binade with ``np.frexp`` (no logarithms), so it does not
share the implementation's log2-based search.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bayes
from bayes.init import quantile

FLOOR = 2.0**-30


# ---------------------------------------------------------------------------------------------
# independent reference
def ref_distance(mu) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float64)
    r = np.zeros_like(mu)
    nz = mu != 0
    m = mu[nz]
    _, e = np.frexp(np.abs(m))  # |m| = f * 2**e with f in [0.5, 1)
    p_down = np.sign(m) * np.ldexp(1.0, e - 1)  # largest power of two <= |m|, with m's sign
    p_up = np.sign(m) * np.ldexp(1.0, e)  # smallest power of two > |m|, with m's sign
    r[nz] = np.abs((m - p_up) / m) * np.abs((m - p_down) / m)
    return r


def ref_sigma(mu, floor: float = FLOOR, scale: float = 0.0025, ceiling: float = 0.05) -> np.ndarray:
    r = ref_distance(mu)
    q = np.quantile(r, 0.75)
    assert q > 0, "reference formula only defined when the 0.75-quantile of r is positive"
    return np.clip(scale * r / q, floor, ceiling)


def _powers_and_neighbours(dtype) -> np.ndarray:
    vals = []
    for k in range(-12, 6):
        p = dtype(2.0**k)
        for v in (p, np.nextafter(p, dtype(0)), np.nextafter(p, dtype(np.inf))):
            vals += [v, -v]
    return np.array(vals, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# r = power_of_two_distance
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_distance_matches_reference_on_edge_values(dtype):
    rng = np.random.default_rng(0)
    vals = np.concatenate(
        [
            _powers_and_neighbours(dtype),
            np.array([0.0, -0.0, 0.0, 4 / 3, -4 / 3, 3.0, -0.75, 1.5 * 2**-20], dtype=dtype),
            (rng.standard_normal(500) * 0.2).astype(dtype),
        ]
    )
    r = bayes.power_of_two_distance(torch.from_numpy(vals))
    assert r.dtype == torch.from_numpy(vals).dtype
    got = r.numpy().astype(np.float64)
    want = ref_distance(vals.astype(np.float64)).astype(dtype).astype(np.float64)
    assert not np.isnan(got).any()
    rtol = 1e-12 if dtype == np.float64 else 2e-7
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    # zero exactly where mu is zero or an exact power of two; > 0 next to one
    exact = (vals == 0) | (np.abs(vals) == np.exp2(np.round(np.log2(np.abs(vals) + (vals == 0)))))
    assert (got[exact] == 0).all()
    assert (got[~exact] > 0).all()
    assert got.max() <= 1 / 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distance_closed_form_points(dtype):
    mu = torch.tensor([1.0, -2.0, 0.25, 0.0, 4 / 3, -4 / 3 * 2**-5, 1.5, 3.0, 0.75], dtype=dtype)
    # t = |mu| / p_down -> r = (2 - t)(t - 1) / t^2: 1/8 at t = 4/3, 1/9 at t = 3/2
    want = [0, 0, 0, 0, 1 / 8, 1 / 8, 1 / 9, 1 / 9, 1 / 9]
    np.testing.assert_allclose(bayes.power_of_two_distance(mu).double().numpy(), want, rtol=1e-6, atol=1e-15)


def test_distance_next_to_powers_of_two_is_tiny_but_positive():
    one = 1.0
    above = np.nextafter(one, 2.0)  # 1 + 2^-52: p_down = 1
    below = np.nextafter(one, 0.0)  # 1 - 2^-53: p_down = 1/2, p_up = 1
    r = bayes.power_of_two_distance(torch.tensor([above, below], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(r, ref_distance([above, below]), rtol=1e-12)
    assert (r > 0).all() and (r < 1e-15).all()


def test_distance_float64_extremes_do_not_overflow():
    # |mu| >= 2^1023: p_up = 2^1024 is not representable; r must still be finite and right.
    big = 2.0**1023
    mu = torch.tensor([big, -big, 1.5 * big, np.finfo(np.float64).max, 2.0**-1074, 3 * 2.0**-1074],
                      dtype=torch.float64)
    r = bayes.power_of_two_distance(mu).numpy()
    assert np.isfinite(r).all()
    np.testing.assert_allclose(r[:3], [0, 0, 1 / 9], rtol=1e-12, atol=0)
    t = np.finfo(np.float64).max / big  # just below 2
    assert r[3] == pytest.approx((2 - t) * (t - 1) / t**2, rel=1e-9)
    assert r[4] == 0  # smallest subnormal is 2^-1074
    np.testing.assert_allclose(r[5], 1 / 9, rtol=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_subnormal=True),
                min_size=1, max_size=40))
def test_distance_property_matches_reference(values):
    mu = np.array(values, dtype=np.float64)
    r = bayes.power_of_two_distance(torch.from_numpy(mu)).numpy()
    np.testing.assert_allclose(r, ref_distance(mu), rtol=1e-12, atol=0)
    assert (r >= 0).all() and (r <= 1 / 8 + 1e-15).all()


# ---------------------------------------------------------------------------------------------
# quantile helper (numpy's default linear interpolation)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 1002])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0, 0.33])
def test_quantile_matches_numpy(n, q):
    x = np.random.default_rng(n).standard_normal(n)
    got = float(quantile(torch.from_numpy(x), q))
    assert got == pytest.approx(float(np.quantile(x, q)), rel=1e-12, abs=1e-15)


def test_quantile_of_empty_raises():
    with pytest.raises(bayes.BayesError):
        quantile(torch.empty(0), 0.5)


# ---------------------------------------------------------------------------------------------
# sigma = power_of_two_sigma
def _mixed_weights(n=1002, seed=0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n) * 0.1
    special = [0.0, 0.0, 0.5, -0.25, 2.0**-7, -(2.0**-3),
               np.nextafter(0.5, 1), np.nextafter(0.5, 0), -np.nextafter(0.125, 0), 4 / 3 * 0.1]
    k = min(n, len(special))
    w[:k] = special[:k]
    return w.astype(dtype)


@pytest.mark.parametrize("n", [1002, 1001, 15])  # quantile index fractional, exact, fractional
def test_power_of_two_sigma_float64_matches_reference(n):
    w = _mixed_weights(n)
    got = bayes.power_of_two_sigma(torch.from_numpy(w))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_sigma(w), rtol=1e-12, atol=0)
    assert not torch.isnan(got).any()
    assert (got[torch.from_numpy(w) == 0] == FLOOR).all()  # mu == 0 -> r = 0 -> floor


def test_power_of_two_sigma_float32_matches_reference():
    w = _mixed_weights(999, seed=1, dtype=np.float32)
    w[10:14] = [np.nextafter(np.float32(0.25), np.float32(1)), np.nextafter(np.float32(0.25), np.float32(0)),
                np.float32(-0.0), np.float32(2.0**-20)]
    got = bayes.power_of_two_sigma(torch.from_numpy(w))
    assert got.dtype == torch.float32
    want = ref_sigma(w.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-7, atol=0)


def test_power_of_two_sigma_hits_floor_and_ceiling():
    # 80 % of weights just off a power of two (tiny r), 20 % at 4/3 (r = 1/8): the quantile is
    # small, so the far weights hit the 0.05 ceiling; exact powers and zeros hit the floor.
    near = np.full(80, 1.0 + 1e-3)
    far = np.full(16, 4 / 3)
    exact = np.array([1.0, -0.5, 0.0, 0.0])
    w = np.concatenate([near, far, exact])
    floor = 1e-6
    got = bayes.power_of_two_sigma(torch.from_numpy(w), floor=floor).numpy()
    np.testing.assert_allclose(got, ref_sigma(w, floor=floor), rtol=1e-12)
    assert (got[80:96] == 0.05).all()
    assert (got[96:] == floor).all()
    assert (got[:80] > floor).all() and (got[:80] < 0.05).all()


def test_power_of_two_sigma_zero_quantile_falls_back_without_nan():
    # every weight on a power of two (or zero): r == 0 everywhere -> floor, never NaN
    w = torch.tensor([0.0, 1.0, -0.5, 0.25, 0.0, 2.0])
    got = bayes.power_of_two_sigma(w)
    assert not torch.isnan(got).any()
    assert (got == torch.tensor(FLOOR, dtype=torch.float32)).all()
    # all zeros
    z = bayes.power_of_two_sigma(torch.zeros(3, 4))
    assert z.shape == (3, 4) and (z == torch.tensor(FLOOR)).all()
    # q75 == 0 but some r > 0: documented fallback normalises by max(r)
    w = np.array([1.0] * 9 + [1.5, 4 / 3])
    r = ref_distance(w)
    got = bayes.power_of_two_sigma(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, np.clip(0.0025 * r / r.max(), FLOOR, 0.05), rtol=1e-12)


def test_power_of_two_sigma_keeps_shape_and_empty():
    w = torch.from_numpy(_mixed_weights(60)).reshape(3, 4, 5)
    got = bayes.power_of_two_sigma(w)
    assert got.shape == w.shape
    np.testing.assert_allclose(got.reshape(-1).numpy(), ref_sigma(w.reshape(-1).numpy()), rtol=1e-12)
    assert bayes.power_of_two_sigma(torch.empty(0, 3)).shape == (0, 3)


def test_power_of_two_sigma_ignores_autograd():
    w = torch.from_numpy(_mixed_weights(40)).requires_grad_()
    got = bayes.power_of_two_sigma(w)
    assert not got.requires_grad


# ---------------------------------------------------------------------------------------------
# constant and MOPED
def test_constant_sigma():
    mu = torch.randn(3, 4, dtype=torch.float64)
    got = bayes.constant_sigma(mu, 0.01)
    assert got.dtype == torch.float64 and got.shape == mu.shape
    assert (got == 0.01).all()
    # below the floor -> the floor
    assert (bayes.constant_sigma(mu, 1e-9, floor=1e-6) == 1e-6).all()
    # a number as sigma_init means "constant"
    assert (bayes.resolve_sigma_init(0.02)(mu) == 0.02).all()
    assert (bayes.resolve_sigma_init(3)(mu) == 3.0).all()
    assert (bayes.resolve_sigma_init("constant", value=0.125)(mu) == 0.125).all()


def test_moped_sigma():
    w = np.array([0.0, -0.0, 0.3, -2.0, 1e-12, -1e-3])
    got = bayes.moped_sigma(torch.from_numpy(w), delta=0.1, floor=1e-9).numpy()
    np.testing.assert_allclose(got, np.maximum(0.1 * np.abs(w), 1e-9), rtol=1e-15)
    got = bayes.resolve_sigma_init("moped", delta=0.25)(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, np.maximum(0.25 * np.abs(w), FLOOR), rtol=1e-15)
    # default delta is 0.1
    np.testing.assert_allclose(bayes.resolve_sigma_init("moped")(torch.from_numpy(w)).numpy(),
                               np.maximum(0.1 * np.abs(w), FLOOR), rtol=1e-15)


def test_callable_sigma_init_passes_through():
    fn = lambda mu: mu.abs() + 1  # noqa: E731
    assert bayes.resolve_sigma_init(fn) is fn


def test_named_power_of_two_via_resolve():
    w = torch.from_numpy(_mixed_weights(50))
    np.testing.assert_allclose(bayes.resolve_sigma_init("power_of_two")(w).numpy(),
                               ref_sigma(w.numpy()), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad arguments
@pytest.mark.parametrize("floor", [0.0, -1e-3, float("nan")])
def test_non_positive_floor_raises(floor):
    mu = torch.randn(5)
    for fn in (bayes.power_of_two_sigma, bayes.constant_sigma, bayes.moped_sigma):
        with pytest.raises(bayes.BayesError):
            fn(mu, floor=floor)
    with pytest.raises(bayes.BayesError):
        bayes.resolve_sigma_init("moped", floor=floor)(mu)
    with pytest.raises(bayes.BayesError):
        bayes.bayesianize(nn.Linear(3, 2), sigma_floor=floor)
    with pytest.raises(bayes.BayesError):
        bayes.GaussianParameter(torch.ones(2), sigma_floor=floor)


def test_bad_initialiser_arguments_raise():
    mu = torch.randn(5)
    with pytest.raises(bayes.BayesError, match="unknown sigma initialiser"):
        bayes.resolve_sigma_init("gaussian")
    for bad in ([0.1], None, True, object()):
        with pytest.raises(bayes.BayesError):
            bayes.resolve_sigma_init(bad)
    for value in (0.0, -0.1, float("nan")):
        with pytest.raises(bayes.BayesError):
            bayes.constant_sigma(mu, value)
    for delta in (0.0, -1.0):
        with pytest.raises(bayes.BayesError):
            bayes.moped_sigma(mu, delta)
    with pytest.raises(bayes.BayesError):
        bayes.bayesianize(nn.Linear(3, 2), sigma_init="nope")
    with pytest.raises(bayes.ConversionError, match="shape"):
        bayes.bayesianize(nn.Linear(3, 2), sigma_init=lambda mu: mu.reshape(-1))
    with pytest.raises(bayes.BayesError):
        bayes.bayesianize(nn.Sequential(nn.Linear(3, 2)), sigma_init="nope")
    assert issubclass(bayes.BayesError, ValueError)
    assert issubclass(bayes.ConversionError, bayes.BayesError)


# ---------------------------------------------------------------------------------------------
# initialisers wired into the conversion
def _entries(model):
    return bayes.gaussian_parameters(model)


def test_bayesianize_uses_power_of_two_rule_per_tensor():
    torch.manual_seed(0)
    lin = nn.Linear(37, 29).double()
    layer = bayes.bayesianize(lin)
    for e in _entries(layer):
        mu = getattr(lin, e.name).detach().numpy()
        assert torch.equal(e.mu, getattr(lin, e.name))
        np.testing.assert_allclose(e.sigma.detach().numpy(), ref_sigma(mu.reshape(-1)).reshape(mu.shape),
                                   rtol=1e-12)
    assert [e.name for e in _entries(layer)] == ["weight", "bias"]


def test_bayesianize_sigma_init_options():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    m = bayes.bayesianize(model, sigma_init=0.003)
    for e in _entries(m):
        assert torch.equal(e.sigma, torch.full_like(e.mu, 0.003))
    m = bayes.bayesianize(model, sigma_init="moped")
    for e in _entries(m):
        mu = e.mu.detach().numpy()
        np.testing.assert_allclose(e.sigma.detach().numpy(), np.maximum(0.1 * np.abs(mu), FLOOR), rtol=1e-6)
    m = bayes.bayesianize(model, sigma_init=lambda mu: torch.full_like(mu, 0.5))
    assert all((e.sigma == 0.5).all() for e in _entries(m))
    # the (larger) sigma floor applies on top of the initialiser
    m = bayes.bayesianize(model, sigma_init=1e-9, sigma_floor=1e-4)
    assert all((e.sigma == torch.tensor(1e-4)).all() for e in _entries(m))


def test_bayesianize_sigma_init_with_initialiser_arguments():
    torch.manual_seed(2)
    lin = nn.Linear(10, 4)
    m = bayes.bayesianize(lin, sigma_init=0.01)
    assert all((e.sigma == 0.01).all() for e in _entries(m))
    m = bayes.bayesianize(lin, sigma_init=bayes.resolve_sigma_init("moped", delta=0.5))
    for e in _entries(m):
        np.testing.assert_allclose(e.sigma.detach().numpy(), np.maximum(0.5 * np.abs(e.mu.detach().numpy()), FLOOR),
                                   rtol=1e-6)
        assert torch.equal(e.mu, getattr(lin, e.name))  # mu is the trained value, untouched

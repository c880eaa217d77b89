"""Sample and local (reparameterisation) modes against analytic Gaussian moments.

For fixed x, a pre-activation of a mean-field Gaussian layer is Gaussian with
mean = f(x, mu) + b_mu and variance = f(x**2, sigma**2) + sigma_b**2. The expected moments are
computed with numpy (explicit loops over conv windows, numpy padding), and sample moments are
accepted within 5 standard errors: SE(mean) = sqrt(var / N), SE(var) = var * sqrt(2 / (N - 1)).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import bayes
from bayes import bayesianize, gaussian_parameters, set_forward_mode

Z = 5.0  # standard errors


@contextlib.contextmanager
def _one_thread():
    """Thousands of tiny forwards: intra-op threads only add overhead (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _mu(layer, name="weight"):
    return bayes.mu_of(layer, name) if name in bayes.gaussians_of(layer) else None


def _sigma(layer, name="weight"):
    gps = bayes.gaussians_of(layer)
    return gps[name].sigma if name in gps else None


def _set(layer, seed, sigma_lo=0.05, sigma_hi=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in bayes.gaussian_parameters(layer):  # weight, then bias
            mu, sigma = e.mu, e.sigma
            mu.copy_(torch.randn(mu.shape, generator=g, dtype=mu.dtype) * 0.5)
            sigma.copy_(torch.rand(sigma.shape, generator=g, dtype=sigma.dtype) * (sigma_hi - sigma_lo) + sigma_lo)


def _np(t):
    return None if t is None else t.detach().cpu().numpy().astype(np.float64)


def _check_moments(samples: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    """samples: (N, *shape) draws; mean/var: analytic, shape ``shape``."""
    n = samples.shape[0]
    m = samples.mean(0)
    v = samples.var(0, ddof=1)
    assert np.all(np.abs(m - mean) <= Z * np.sqrt(var / n)), np.max(np.abs(m - mean) / np.sqrt(var / n))
    assert np.all(np.abs(v - var) <= Z * var * np.sqrt(2 / (n - 1))), np.max(np.abs(v / var - 1))


# ---------------------------------------------------------------------------------------------
# Linear
def _linear_moments(layer, x):
    mu, sigma, b, sb = (_np(_mu(layer)), _np(_sigma(layer)), _np(_mu(layer, "bias")), _np(_sigma(layer, "bias")))
    x = _np(x)[0]
    mean = mu @ x + b
    var = (sigma**2) @ (x**2) + sb**2
    return mean, var


def test_linear_sample_mode_moments():
    torch.manual_seed(0)
    layer = bayesianize(nn.Linear(6, 3, dtype=torch.float64), mode="sample")
    _set(layer, 1)
    x = torch.randn(1, 6, dtype=torch.float64)
    n = 8000
    with torch.no_grad(), _one_thread():
        draws = torch.cat([layer(x) for _ in range(n)]).numpy()
    mean, var = _linear_moments(layer, x)
    _check_moments(draws, mean, var)
    # mean-field: the output units are independent
    corr = np.corrcoef(draws.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < Z / np.sqrt(n))


def test_linear_sample_mode_one_weight_per_forward():
    torch.manual_seed(2)
    layer = bayesianize(nn.Linear(4, 2), mode="sample", sigma_init=0.3)
    x = torch.randn(1, 4).expand(5, 4)
    out = layer(x)
    assert torch.equal(out, out[:1].expand(5, 2))  # every row saw the same sampled weight
    set_forward_mode(layer, "local")
    out = layer(x)
    assert not torch.equal(out[0], out[1])  # local: one noise draw per output


def test_linear_local_mode_moments():
    torch.manual_seed(3)
    layer = bayesianize(nn.Linear(7, 4, dtype=torch.float64), mode="local")
    _set(layer, 4)
    x = torch.randn(1, 7, dtype=torch.float64)
    n = 20000
    with torch.no_grad():
        draws = layer(x.expand(n, 7)).numpy()
    mean, var = _linear_moments(layer, x)
    _check_moments(draws, mean, var)


def test_linear_local_mode_moments_bias_free():
    torch.manual_seed(5)
    layer = bayesianize(nn.Linear(5, 2, bias=False, dtype=torch.float64), mode="local")
    _set(layer, 6)
    x = torch.randn(1, 5, dtype=torch.float64)
    n = 20000
    with torch.no_grad():
        draws = layer(x.expand(n, 5)).numpy()
    mu, sigma = _np(_mu(layer)), _np(_sigma(layer))
    xx = _np(x)[0]
    _check_moments(draws, mu @ xx, (sigma**2) @ (xx**2))


def test_moment_check_can_fail():
    # guard against a vacuous tolerance: a 10 % error in the variance is detected
    torch.manual_seed(7)
    layer = bayesianize(nn.Linear(7, 4, dtype=torch.float64), mode="local")
    _set(layer, 8)
    x = torch.randn(1, 7, dtype=torch.float64)
    with torch.no_grad():
        draws = layer(x.expand(20000, 7)).numpy()
    mean, var = _linear_moments(layer, x)
    with pytest.raises(AssertionError):
        _check_moments(draws, mean, var * 1.1)
    with pytest.raises(AssertionError):
        _check_moments(draws, mean + 0.1 * np.sqrt(var), var)


# ---------------------------------------------------------------------------------------------
# Conv2d, with an independent numpy convolution
_NP_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def np_conv2d(x, w, b, stride, padding, dilation, groups, padding_mode):
    """x: (C, H, W) one image; w: (O, C/groups, kh, kw); explicit loops over windows."""
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)), mode=_NP_PAD[padding_mode])
    out_c, cin_g, kh, kw = w.shape
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    per_group = out_c // groups
    out = np.zeros((out_c, ho, wo))
    for o in range(out_c):
        g = o // per_group
        for i in range(ho):
            for j in range(wo):
                patch = xp[g * cin_g:(g + 1) * cin_g,
                           i * sh:i * sh + dh * (kh - 1) + 1:dh,
                           j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[o, i, j] = np.sum(patch * w[o]) + (b[o] if b is not None else 0.0)
    return out


CONV_CASES = [
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=1, padding=1, dilation=1, groups=1,
         bias=True, padding_mode="zeros"),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=1, groups=2,
         bias=True, padding_mode="reflect"),
    dict(in_channels=2, out_channels=2, kernel_size=3, stride=1, padding=2, dilation=2, groups=1,
         bias=False, padding_mode="circular"),
    dict(in_channels=3, out_channels=3, kernel_size=2, stride=1, padding=1, dilation=1, groups=3,
         bias=True, padding_mode="replicate"),
]


def _conv_moments(layer, x):
    args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                padding_mode=layer.padding_mode)
    xx = _np(x)[0]
    sb = _np(_sigma(layer, "bias"))
    mean = np_conv2d(xx, _np(_mu(layer)), _np(_mu(layer, "bias")), **args)
    var = np_conv2d(xx**2, _np(_sigma(layer)) ** 2, None if sb is None else sb**2, **args)
    return mean, var


def test_numpy_reference_conv_matches_torch_mean_mode():
    # the numpy reference itself agrees with torch's nn.Conv2d (every case, all padding modes)
    for i, case in enumerate(CONV_CASES):
        torch.manual_seed(10 + i)
        conv = torch.nn.Conv2d(**case).double()
        x = torch.randn(1, case["in_channels"], 6, 5, dtype=torch.float64)
        layer = bayesianize(conv, mode="mean")
        mean, _ = _conv_moments(layer, x)
        np.testing.assert_allclose(conv(x).detach().numpy()[0], mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_local_mode_moments(case):
    torch.manual_seed(20 + case)
    kw = CONV_CASES[case]
    # float32: float64 convolutions take a slow path on CPU; sampling error dominates anyway
    layer = bayesianize(nn.Conv2d(**kw), mode="local")
    _set(layer, 30 + case)
    x = torch.randn(1, kw["in_channels"], 6, 5)
    n = 4000
    with torch.no_grad():
        draws = layer(x.expand(n, *x.shape[1:])).numpy()
    mean, var = _conv_moments(layer, x)
    assert draws.shape[1:] == mean.shape
    _check_moments(draws, mean, var)


def test_conv2d_sample_mode_moments():
    torch.manual_seed(40)
    kw = CONV_CASES[1]
    # float32 here: float64 convolutions take a slow path on CPU; sampling error dominates anyway
    layer = bayesianize(nn.Conv2d(**kw), mode="sample")
    _set(layer, 41)
    x = torch.randn(1, kw["in_channels"], 6, 5)
    n = 3000
    with torch.no_grad(), _one_thread():
        draws = torch.cat([layer(x) for _ in range(n)]).numpy()
    mean, var = _conv_moments(layer, x)
    _check_moments(draws, mean, var)


# ---------------------------------------------------------------------------------------------
# draw windows
class _TwoReads(nn.Module):
    """Reads its weight twice in one forward (as an LSTM does)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.weight.T - 2 * (x @ self.weight.T)


def test_one_draw_per_forward_however_often_a_weight_is_read():
    torch.manual_seed(50)
    m = bayesianize(_TwoReads(), sigma_init=0.3)
    x = torch.randn(5, 4)
    out = m(x)
    gp = bayes.gaussians_of(m)["weight"]
    w = bayes.mu_of(m, "weight") + gp.sigma * gp.last_eps
    torch.testing.assert_close(out, -(x @ w.T))  # both reads saw the same draw
    # a fresh draw at the next forward, of the module itself or of a parent
    eps = gp.last_eps
    m(x)
    assert not torch.equal(gp.last_eps, eps)
    eps = gp.last_eps
    nn.Sequential(m)(x)
    assert not torch.equal(gp.last_eps, eps)


def test_rnn_sample_mode_moments_of_one_step():
    # an RNN has no local rule: both modes sample its weights (and a one-step, zero-state tanh RNN's
    # pre-activation is Gaussian: mean W_ih x + b_ih + b_hh, variance sigma_ih^2 x^2 + sigma_b^2's)
    torch.manual_seed(51)
    rnn = bayesianize(nn.RNN(3, 2, nonlinearity="relu", batch_first=True, dtype=torch.float64), mode="local")
    assert not any(bayes.local_mode_coverage(rnn).values())
    _set(rnn, 52)
    with torch.no_grad():
        bayes.mu_of(rnn, "bias_ih_l0").fill_(5.0)  # keep the pre-activation positive: relu is the identity
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    n = 4000
    with torch.no_grad(), _one_thread():
        draws = torch.cat([rnn(x)[0].reshape(1, 2) for _ in range(n)]).numpy()
    w, sw = _np(_mu(rnn, "weight_ih_l0")), _np(_sigma(rnn, "weight_ih_l0"))
    bi, sbi = _np(_mu(rnn, "bias_ih_l0")), _np(_sigma(rnn, "bias_ih_l0"))
    bh, sbh = _np(_mu(rnn, "bias_hh_l0")), _np(_sigma(rnn, "bias_hh_l0"))
    xx = _np(x).reshape(3)
    assert (draws > 0).all()
    _check_moments(draws, w @ xx + bi + bh, (sw**2) @ (xx**2) + sbi**2 + sbh**2)


def test_one_draw_per_network_forward_for_tied_weights_and_fresh_draws_for_direct_calls():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight
            self.seen = []

        def forward(self, ids):
            h = self.emb(ids)
            self.seen.append(self.emb.weight)
            y = self.out(h)
            self.seen.append(self.out.weight)
            return y

    torch.manual_seed(0)
    b = bayesianize(Tied(), sigma_init=0.1)
    ids = torch.tensor([[1, 2, 3]])
    b(ids)
    first, second = b.seen
    assert first is second, "a tied weight is one draw within one forward of the network"
    eps1 = gaussian_parameters(b)[0].gaussian.last_eps.clone()
    b(ids)
    assert not torch.equal(b.seen[2], first), "the next forward draws again"
    assert not torch.equal(gaussian_parameters(b)[0].gaussian.last_eps, eps1)
    # a module called on its own, outside a forward of the root, draws afresh every call
    lin = b.out
    w1 = lin(torch.ones(1, 4))
    w2 = lin(torch.ones(1, 4))
    assert not torch.equal(w1, w2)
    # an exception inside the root's forward does not leave later direct calls without fresh draws
    with pytest.raises(IndexError):
        b(torch.tensor([[99]]))
    assert not torch.equal(lin(torch.ones(1, 4)), lin(torch.ones(1, 4)))

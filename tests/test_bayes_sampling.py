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

from bayes import BayesConv2d, BayesLinear

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


def _set(layer, seed, sigma_lo=0.05, sigma_hi=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in layer.present_params():
            mu, sigma = layer.mu(name), layer.sigma(name)
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
    mu, sigma, b, sb = (_np(layer.weight_mu), _np(layer.weight_sigma), _np(layer.bias_mu), _np(layer.bias_sigma))
    x = _np(x)[0]
    mean = mu @ x + b
    var = (sigma**2) @ (x**2) + sb**2
    return mean, var


def test_linear_sample_mode_moments():
    torch.manual_seed(0)
    layer = BayesLinear(6, 3, mode="sample", dtype=torch.float64)
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
    layer = BayesLinear(4, 2, mode="sample", sigma_init=0.3)
    x = torch.randn(1, 4).expand(5, 4)
    out = layer(x)
    assert torch.equal(out, out[:1].expand(5, 2))  # every row saw the same sampled weight
    layer.mode = "local"
    out = layer(x)
    assert not torch.equal(out[0], out[1])  # local: one noise draw per output


def test_linear_local_mode_moments():
    torch.manual_seed(3)
    layer = BayesLinear(7, 4, mode="local", dtype=torch.float64)
    _set(layer, 4)
    x = torch.randn(1, 7, dtype=torch.float64)
    n = 20000
    with torch.no_grad():
        draws = layer(x.expand(n, 7)).numpy()
    mean, var = _linear_moments(layer, x)
    _check_moments(draws, mean, var)


def test_linear_local_mode_moments_bias_free():
    torch.manual_seed(5)
    layer = BayesLinear(5, 2, bias=False, mode="local", dtype=torch.float64)
    _set(layer, 6)
    x = torch.randn(1, 5, dtype=torch.float64)
    n = 20000
    with torch.no_grad():
        draws = layer(x.expand(n, 5)).numpy()
    mu, sigma = _np(layer.weight_mu), _np(layer.weight_sigma)
    xx = _np(x)[0]
    _check_moments(draws, mu @ xx, (sigma**2) @ (xx**2))


def test_moment_check_can_fail():
    # guard against a vacuous tolerance: a 10 % error in the variance is detected
    torch.manual_seed(7)
    layer = BayesLinear(7, 4, mode="local", dtype=torch.float64)
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
    sb = _np(layer.bias_sigma)
    mean = np_conv2d(xx, _np(layer.weight_mu), _np(layer.bias_mu), **args)
    var = np_conv2d(xx**2, _np(layer.weight_sigma) ** 2, None if sb is None else sb**2, **args)
    return mean, var


def test_numpy_reference_conv_matches_torch_mean_mode():
    # the numpy reference itself agrees with torch's nn.Conv2d (every case, all padding modes)
    for i, case in enumerate(CONV_CASES):
        torch.manual_seed(10 + i)
        conv = torch.nn.Conv2d(**case).double()
        x = torch.randn(1, case["in_channels"], 6, 5, dtype=torch.float64)
        layer = BayesConv2d.from_module(conv, mode="mean")
        mean, _ = _conv_moments(layer, x)
        np.testing.assert_allclose(conv(x).detach().numpy()[0], mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv2d_local_mode_moments(case):
    torch.manual_seed(20 + case)
    kw = CONV_CASES[case]
    # float32: float64 convolutions take a slow path on CPU; sampling error dominates anyway
    layer = BayesConv2d(**kw, mode="local")
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
    layer = BayesConv2d(**kw, mode="sample")
    _set(layer, 41)
    x = torch.randn(1, kw["in_channels"], 6, 5)
    n = 3000
    with torch.no_grad(), _one_thread():
        draws = torch.cat([layer(x) for _ in range(n)]).numpy()
    mean, var = _conv_moments(layer, x)
    _check_moments(draws, mean, var)

"""sigma regulariser, KL divergence and sigma statistics against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bayes
from bayes import (
    bayesianize,
    forward_mode,
    kl_divergence,
    sigma_regularizer,
    sigma_stats,
    summarize_sigma,
)

TAU, LAM = 0.05, 2.0**-11


class _Net(nn.Sequential):
    def forward(self, x):  # (N, 6) -> (N, 2 * 3)
        return self[3](self[2](self[1](self[0](x)).unsqueeze(1)))


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = _Net(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Conv1d(1, 2, 3, bias=False)), nn.Flatten())
    bm = bayesianize(model).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for e in bayes.gaussian_parameters(bm):
            s = e.sigma
            # below tau, above tau, zero and negative entries
            s.copy_(torch.rand(s.shape, generator=g, dtype=dtype) * 0.12 - 0.02)
    return bm


def _sigmas(bm):
    """{mask key (the qualified parameter name): GaussianEntry} for every Gaussian tensor."""
    return {e.name: e for e in bayes.gaussian_parameters(bm)}


def _eps(e):
    return e.gaussian.last_eps


def _floor(e):
    return e.gaussian.sigma_floor


def _np(t):
    return t.detach().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# sigma regulariser
def test_regularizer_gradient_matches_formula_with_drawn_eps():
    bm = _model()
    x = torch.randn(4, 6, dtype=torch.float64)
    bm(x)
    bm(x)  # the regulariser uses the eps of the *last* forward
    pairs = _sigmas(bm)
    assert sorted(pairs) == ["0.bias", "0.weight", "2.0.weight"]
    reg = sigma_regularizer(bm, tau=TAU, lam=LAM)
    grads = torch.autograd.grad(reg, [e.sigma for e in pairs.values()])
    total = 0.0
    for e, g in zip(pairs.values(), grads):
        eps = _np(_eps(e))
        sigma = _np(e.sigma)
        want = -LAM * np.maximum(TAU - sigma, 0.0) * np.abs(eps)
        np.testing.assert_allclose(_np(g), want, rtol=1e-12, atol=1e-300)
        assert (want != 0).any() and (want == 0).any()  # both regimes exercised
        total += LAM / 2 * np.sum(np.abs(eps) * np.maximum(TAU - sigma, 0.0) ** 2)
    assert reg.item() == pytest.approx(total, rel=1e-12)


def test_regularizer_frozen_mask_gives_exactly_zero_gradient():
    bm = _model(1)
    bm(torch.randn(3, 6, dtype=torch.float64))
    pairs = _sigmas(bm)
    g = torch.Generator().manual_seed(5)
    frozen = {
        "0.weight": torch.rand(5, 6, generator=g) < 0.5,
        "2.0.weight": torch.ones(2, 1, 3, dtype=torch.bool),  # a whole tensor frozen
        # (no entry for 0.bias: unfrozen)
    }
    reg = sigma_regularizer(bm, tau=TAU, lam=LAM, frozen=frozen)
    grads = dict(zip(pairs, torch.autograd.grad(reg, [e.sigma for e in pairs.values()])))
    for key, e in pairs.items():
        want = -LAM * np.maximum(TAU - _np(e.sigma), 0.0) * np.abs(_np(_eps(e)))
        mask = frozen.get(key, torch.zeros(e.sigma.shape, dtype=torch.bool)).numpy()
        got = _np(grads[key])
        assert (got[mask] == 0).all()
        np.testing.assert_allclose(got[~mask], want[~mask], rtol=1e-12, atol=1e-300)
    # float/int masks are accepted the same way
    reg2 = sigma_regularizer(bm, tau=TAU, lam=LAM, frozen={k: v.to(torch.float32) for k, v in frozen.items()})
    assert reg2.item() == pytest.approx(reg.item(), rel=1e-12)


def test_regularizer_sigma_above_tau_has_zero_gradient():
    bm = _model(2)
    for e in _sigmas(bm).values():
        with torch.no_grad():
            e.sigma.uniform_(TAU, 0.3)
    bm(torch.randn(2, 6, dtype=torch.float64))
    reg = sigma_regularizer(bm)
    assert reg.item() == 0.0
    reg_grads = torch.autograd.grad(reg, [e.sigma for e in _sigmas(bm).values()])
    assert all((g == 0).all() for g in reg_grads)


@pytest.mark.parametrize("mode", ["local", "mean"])
def test_regularizer_uses_expected_abs_eps_without_drawn_eps(mode):
    bm = _model(3)
    bm(torch.randn(2, 6, dtype=torch.float64))  # sample-mode eps exist ...
    with forward_mode(bm, mode):
        bm(torch.randn(2, 6, dtype=torch.float64))  # ... and are dropped by this forward
        reg = sigma_regularizer(bm, tau=0.07, lam=0.5)
    pairs = _sigmas(bm)
    grads = torch.autograd.grad(reg, [e.sigma for e in pairs.values()])
    for e, g in zip(pairs.values(), grads):
        assert _eps(e) is None
        want = -0.5 * np.maximum(0.07 - _np(e.sigma), 0.0) * math.sqrt(2 / math.pi)
        np.testing.assert_allclose(_np(g), want, rtol=1e-12, atol=1e-300)


def test_regularizer_defaults_and_bare_layer():
    layer = bayesianize(nn.Linear(3, 2, dtype=torch.float64))
    (w, b) = bayes.gaussian_parameters(layer)
    with torch.no_grad():
        w.sigma.fill_(0.01)
        b.sigma.fill_(-0.01)
    layer(torch.randn(1, 3, dtype=torch.float64))
    frozen = {"weight": torch.tensor([[True, False, False], [False, False, True]])}
    reg = sigma_regularizer(layer, frozen=frozen)
    gw, gb = torch.autograd.grad(reg, [w.sigma, b.sigma])
    eps_w, eps_b = _np(_eps(w)), _np(_eps(b))
    want_w = -(2.0**-11) * (0.05 - 0.01) * np.abs(eps_w) * ~frozen["weight"].numpy()
    np.testing.assert_allclose(_np(gw), want_w, rtol=1e-12)
    np.testing.assert_allclose(_np(gb), -(2.0**-11) * 0.06 * np.abs(eps_b), rtol=1e-12)


def test_regularizer_step_raises_unfrozen_small_sigmas_only():
    bm = _model(4)
    bm(torch.randn(2, 6, dtype=torch.float64))
    frozen = {"0.weight": torch.rand(5, 6) < 0.5}
    sigma = _sigmas(bm)["0.weight"].sigma
    before = sigma.detach().clone()
    opt = torch.optim.SGD(bayes.sigma_parameters(bm), lr=10.0)
    sigma_regularizer(bm, frozen=frozen).backward()
    opt.step()
    after = sigma.detach()
    m = frozen["0.weight"]
    assert torch.equal(after[m], before[m])
    moved = (~m) & (before < TAU)
    assert (after[moved] > before[moved]).all()
    assert torch.equal(after[(~m) & (before >= TAU)], before[(~m) & (before >= TAU)])


def test_regularizer_bad_arguments():
    bm = _model(5)
    with pytest.raises(bayes.BayesError):
        sigma_regularizer(bm, tau=-0.1)
    with pytest.raises(bayes.BayesError):
        sigma_regularizer(bm, lam=-1.0)
    with pytest.raises(bayes.BayesError, match="shape"):
        sigma_regularizer(bm, frozen={"0.weight": torch.zeros(6, 5, dtype=torch.bool)})
    with pytest.raises(bayes.BayesError):
        sigma_regularizer(nn.Sequential(nn.Linear(2, 2)))


def test_tied_tensor_regularised_once_under_either_name():
    torch.manual_seed(11)
    a, b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    b.weight = a.weight
    bm = bayesianize(nn.Sequential(a, b), sigma_init=0.01)
    (e,) = bayes.gaussian_parameters(bm)
    assert e.name == "0.weight" and e.aliases == ["1.weight"]
    bm[1](torch.randn(2, 3))
    eps = _np(_eps(e))
    mask = torch.eye(3, dtype=torch.bool)
    for key in ("0.weight", "1.weight"):  # a mask under the alias freezes the one tensor too
        reg = sigma_regularizer(bm, frozen={key: mask})
        (g,) = torch.autograd.grad(reg, [e.sigma])
        want = -LAM * (TAU - 0.01) * np.abs(eps) * ~mask.numpy()
        np.testing.assert_allclose(_np(g), want, rtol=1e-6)
    kl = kl_divergence(bm)
    want = _kl_closed_form(_np(e.mu), np.full((3, 3), 0.01), 0.0, 1.0).sum()  # counted once
    assert kl.item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# KL divergence
def _kl_closed_form(mu_q, s_q, mu_p, s_p):
    return np.log(s_p / s_q) + (s_q**2 + (mu_q - mu_p) ** 2) / (2 * s_p**2) - 0.5


def test_kl_matches_closed_form_and_gradients():
    bm = _model(6)
    pairs = _sigmas(bm)
    floor = _floor(pairs["0.weight"])
    n_data, p_mu, p_s = 1000, 0.1, 0.5
    kl = kl_divergence(bm, prior_sigma=p_s, prior_mu=p_mu, dataset_size=n_data)
    want = 0.0
    for e in pairs.values():
        s = np.maximum(_np(e.sigma), floor)  # floored, as in the forward
        want += _kl_closed_form(_np(e.mu), s, p_mu, p_s).sum()
    assert kl.item() == pytest.approx(want / n_data, rel=1e-10)
    # not divided without a dataset size; default prior N(0, 1)
    kl_all = kl_divergence(bm)
    want_all = sum(_kl_closed_form(_np(e.mu), np.maximum(_np(e.sigma), floor), 0.0, 1.0).sum()
                   for e in pairs.values())
    assert kl_all.item() == pytest.approx(want_all, rel=1e-10)
    # gradients: dKL/dmu = (mu - mu_p)/s_p^2, dKL/dsigma = -1/s + s/s_p^2 (where s > floor)
    e = pairs["0.weight"]
    gm, gs = torch.autograd.grad(kl, [e.mu, e.sigma])
    mu, s = _np(e.mu), _np(e.sigma)
    np.testing.assert_allclose(_np(gm), (mu - p_mu) / p_s**2 / n_data, rtol=1e-10)
    ok = s > floor
    np.testing.assert_allclose(_np(gs)[ok], (-1 / s[ok] + s[ok] / p_s**2) / n_data, rtol=1e-10)


def test_kl_frozen_mask():
    bm = _model(7)
    pairs = _sigmas(bm)
    floor = _floor(pairs["0.weight"])
    with torch.no_grad():
        for e in pairs.values():
            e.sigma.uniform_(0.01, 0.2)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    frozen = {"0.weight": mask}
    kl = kl_divergence(bm, frozen=frozen, dataset_size=10)
    want = 0.0
    for key, e in pairs.items():
        term = _kl_closed_form(_np(e.mu), np.maximum(_np(e.sigma), floor), 0.0, 1.0)
        if key in frozen:
            term = term[~frozen[key].numpy()]
        want += term.sum()
    assert kl.item() == pytest.approx(want / 10, rel=1e-10)
    e = pairs["0.weight"]
    gm, gs = torch.autograd.grad(kl, [e.mu, e.sigma])
    assert (gm[mask] == 0).all() and (gs[mask] == 0).all()
    assert (gm[~mask] != 0).all() and (gs[~mask] != 0).all()


def test_kl_bad_arguments():
    bm = _model(8)
    for bad in (0.0, -1.0):
        with pytest.raises(bayes.BayesError):
            kl_divergence(bm, prior_sigma=bad)
    for bad in (0, -5):
        with pytest.raises(bayes.BayesError):
            kl_divergence(bm, dataset_size=bad)
    with pytest.raises(bayes.BayesError):
        kl_divergence(nn.Sequential(nn.ReLU()))
    with pytest.raises(bayes.BayesError, match="shape"):
        kl_divergence(bm, frozen={"2.0.weight": torch.zeros(3, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------------
# sigma statistics
def test_sigma_stats_match_direct_computation():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(7, 4), nn.Linear(4, 3, bias=False), nn.Conv2d(1, 3, 3))
    bm = bayesianize(model, sigma_floor=1e-4)
    pairs = _sigmas(bm)
    with torch.no_grad():
        pairs["0.weight"].mu[0, :3] = 0.0  # excluded from the relative statistics
        pairs["0.weight"].sigma[1, :2] = -0.5  # floored
        pairs["0.weight"].sigma[2, 0] = 0.0
        pairs["1.weight"].sigma.uniform_(0.001, 0.1)
        pairs["2.bias"].mu.zero_()  # no entry with mu != 0
    stats = sigma_stats(bm)
    assert sorted(stats) == ["0.bias", "0.weight", "1.weight", "2.bias", "2.weight"]
    for key, st in stats.items():
        e = pairs[key]
        sig = np.maximum(_np(e.sigma).reshape(-1), 1e-4)
        mu = _np(e.mu).reshape(-1)
        assert st["count"] == sig.size
        assert st["mean"] == pytest.approx(sig.mean(), rel=1e-6)
        assert st["min"] == pytest.approx(sig.min(), rel=1e-6)
        assert st["max"] == pytest.approx(sig.max(), rel=1e-6)
        nz = mu != 0
        if nz.any():
            rel = sig[nz] / np.abs(mu[nz])
            assert st["rel_mean"] == pytest.approx(rel.mean(), rel=1e-5)
            assert st["rel_median"] == pytest.approx(np.median(rel), rel=1e-5)
        else:
            assert math.isnan(st["rel_mean"]) and math.isnan(st["rel_median"])
    assert stats["0.weight"]["min"] == pytest.approx(1e-4)
    # an even number of non-zero entries: the median is the mean of the middle two
    assert (pairs["1.weight"].mu != 0).sum() % 2 == 0


def test_sigma_stats_median_even_count():
    layer = bayesianize(nn.Linear(4, 1, bias=False))
    (e,) = bayes.gaussian_parameters(layer)
    with torch.no_grad():
        e.mu.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
        e.sigma.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    st = sigma_stats(layer)["weight"]
    assert st["rel_median"] == pytest.approx(0.25)
    assert st["rel_mean"] == pytest.approx(0.25)


def test_summarize_sigma_weighted_by_count():
    torch.manual_seed(10)
    bm = bayesianize(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2, bias=False)))
    stats = sigma_stats(bm)
    allsig = np.concatenate([np.maximum(_np(e.sigma).reshape(-1), _floor(e)) for e in bayes.gaussian_parameters(bm)])
    summary = summarize_sigma(bm)
    assert summary["count"] == allsig.size == sum(s["count"] for s in stats.values())
    assert summary["mean"] == pytest.approx(allsig.mean(), rel=1e-6)
    assert summary["min"] == pytest.approx(allsig.min(), rel=1e-6)
    assert summary["max"] == pytest.approx(allsig.max(), rel=1e-6)
    assert summarize_sigma(nn.Sequential(nn.ReLU())) == {"count": 0}
    assert sigma_stats(nn.Sequential(nn.ReLU())) == {}


def test_unknown_frozen_keys_are_rejected():
    model = bayesianize(nn.Sequential(nn.Linear(3, 2)))
    model(torch.randn(4, 3))
    good = {"0.weight": torch.zeros(2, 3, dtype=torch.bool)}
    sigma_regularizer(model, frozen=good)
    kl_divergence(model, frozen=good)
    with pytest.raises(bayes.BayesError, match="module.0.weight"):
        sigma_regularizer(model, frozen={"module.0.weight": good["0.weight"]})
    with pytest.raises(bayes.BayesError, match="name no Gaussian parameter"):
        kl_divergence(model, frozen={"0.wieght": good["0.weight"]})
    # the old key form (the sigma tensor's name) is refused, not silently ignored
    with pytest.raises(bayes.BayesError, match="0.weight_sigma"):
        sigma_regularizer(model, frozen={"0.weight_sigma": good["0.weight"]})


def test_requires_grad_false_survives_both_conversions():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    bnn = bayesianize(model)
    p = _sigmas(bnn)
    assert not p["0.weight"].mu.requires_grad and not p["0.weight"].sigma.requires_grad
    assert p["0.bias"].mu.requires_grad and p["0.bias"].sigma.requires_grad and p["1.weight"].mu.requires_grad
    # a frozen tensor still runs in every mode, and only the trainable ones get gradients
    for mode in bayes.MODES:
        with forward_mode(bnn, mode):
            bnn(torch.randn(2, 3)).sum().backward()
    assert p["0.weight"].mu.grad is None and p["0.weight"].sigma.grad is None
    assert p["0.bias"].sigma.grad is not None
    back = bayes.to_point_estimate(bnn)
    assert not back[0].weight.requires_grad and back[0].bias.requires_grad

"""Gaussian parameters on plain nn.Modules: state, copies, forward modes, the sigma floor."""

from __future__ import annotations

import copy
import io
import pickle
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes
from bayes import GaussianParameter, bayesianize, forward_mode, set_forward_mode
from pwfn.model.zoo import create_model


def _gp(module: nn.Module, name: str = "weight") -> GaussianParameter:
    return bayes.gaussians_of(module)[name]


def _mu(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return bayes.mu_of(module, name)


def _sigma(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return _gp(module, name).sigma


def _modes(model: nn.Module) -> list[str]:
    return [e.gaussian.mode for e in bayes.gaussian_parameters(model)]


def _layers():
    torch.manual_seed(0)
    return [
        (bayesianize(nn.Linear(5, 3)), torch.randn(4, 5)),
        (bayesianize(nn.Linear(5, 3, bias=False)), torch.randn(4, 5)),
        (bayesianize(nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect")), torch.randn(2, 2, 7)),
        (bayesianize(nn.Conv2d(2, 4, 3, groups=2, bias=False)), torch.randn(2, 2, 6, 6)),
        (bayesianize(nn.Conv3d(1, 2, 2, stride=2)), torch.randn(2, 1, 4, 4, 4)),
    ]


# ---------------------------------------------------------------------------------------------
# state_dict, dtype, copies, parameters
def test_state_dict_keys_and_bias_free():
    for layer, _ in _layers():
        has_bias = "bias" in bayes.gaussians_of(layer)
        want = {"parametrizations.weight.original", "parametrizations.weight.0.sigma"} | (
            {"parametrizations.bias.original", "parametrizations.bias.0.sigma"} if has_bias else set())
        assert set(layer.state_dict()) == want
        assert {n for n, _ in layer.named_parameters()} == want
        assert list(layer.buffers()) == []
        if not has_bias:
            assert layer.bias is None
            assert list(bayes.gaussians_of(layer)) == ["weight"]
        with forward_mode(layer, "mean"):
            assert layer.weight is _mu(layer)  # mean mode reads mu itself
        assert _sigma(layer).shape == _mu(layer).shape
    conv = bayesianize(nn.Conv2d(4, 6, (3, 5), groups=2))
    assert isinstance(conv, nn.Conv2d)  # the module keeps its class
    assert _mu(conv).shape == nn.Conv2d(4, 6, (3, 5), groups=2).weight.shape
    assert _sigma(conv, "bias").shape == (6,)


def test_nested_state_dict_keys():
    bm = bayesianize(create_model("mlp", in_features=8, hidden=(4,), num_classes=2))
    keys = []
    for m in ("net.1", "net.3"):
        for p in ("weight", "bias"):
            keys += [f"{m}.parametrizations.{p}.original", f"{m}.parametrizations.{p}.0.sigma"]
    assert list(bm.state_dict()) == keys
    assert list(bayes.point_state_dict(bm.state_dict())) == ["net.1.weight", "net.1.bias", "net.3.weight",
                                                             "net.3.bias"]


def test_state_dict_load_round_trip():
    for layer, x in _layers():
        with torch.no_grad():
            _sigma(layer).uniform_(0.01, 0.1)
        sd = layer.state_dict()
        fresh = copy.deepcopy(layer)
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)
        fresh.load_state_dict(sd)
        for k, v in layer.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v)
        for mode in bayes.MODES:
            set_forward_mode(layer, mode)
            set_forward_mode(fresh, mode)
            torch.manual_seed(1)
            a = layer(x)
            torch.manual_seed(1)
            assert torch.equal(fresh(x), a)
        # through torch.save / torch.load
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_to_float64():
    for layer, x in _layers():
        layer = layer.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        x = x.double()
        for mode in bayes.MODES:
            set_forward_mode(layer, mode)
            out = layer(x)
            assert out.dtype == torch.float64 and torch.isfinite(out).all()
    lin = bayesianize(nn.Linear(5, 3), mode="mean").double()
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(lin(x), F.linear(x, _mu(lin), _mu(lin, "bias")))


def _same_values(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and sa[k].data_ptr() != sb[k].data_ptr()


def test_deepcopy_after_sample_forward():
    for layer, x in _layers():
        set_forward_mode(layer, "sample")
        layer(x).sum().backward()
        assert _gp(layer).last_eps is not None
        c = copy.deepcopy(layer)
        _same_values(layer, c)
        assert isinstance(c, type(layer).__mro__[1])  # still the user's class (nn.Linear, nn.Conv2d ...)
        assert _gp(c).mode == "sample" and _gp(c).sigma_floor == _gp(layer).sigma_floor
        assert _gp(c).last_eps is None  # scratch state is not copied
        assert _gp(layer).last_eps is not None  # ... nor dropped from the original
        set_forward_mode(c, "mean")
        set_forward_mode(layer, "mean")
        assert torch.equal(c(x), layer(x))
        # the copy is independent: removing its Gaussians leaves the original Bayesian and working
        plain = bayes.to_point_estimate(c, inplace=True)
        assert not bayes.is_bayesian(plain) and bayes.is_bayesian(layer)
        assert torch.equal(plain(x), layer(x))
        set_forward_mode(layer, "sample")
        layer(x).sum().backward()


def test_deepcopy_whole_model_and_state_dict_save():
    torch.manual_seed(2)
    bm = bayesianize(create_model("lenet5", input_size=12))
    x = torch.randn(2, 1, 12, 12)
    bm(x)
    c = copy.deepcopy(bm)
    _same_values(bm, c)
    with forward_mode(bm, "mean"), forward_mode(c, "mean"):
        assert torch.equal(c(x), bm(x))
    # torch.save of the state_dict (pickling a parametrized module is not supported by torch)
    buf = io.BytesIO()
    torch.save(bm.state_dict(), buf)
    buf.seek(0)
    fresh = bayesianize(create_model("lenet5", input_size=12))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _same_values(bm, fresh)


def test_gaussian_parameter_pickles_without_scratch_or_compile_wrapper():
    # the parametrization module on its own is picklable; its __getstate__ drops the eps scratch
    # and must keep dropping what nn.Module.__getstate__ drops (the ``compile()`` wrapper in
    # _compiled_call_impl; a lambda stands in for it: both are unpicklable).
    layer = bayesianize(nn.Linear(3, 2))
    layer(torch.randn(2, 3))
    gp = _gp(layer)
    assert gp.last_eps is not None
    gp._compiled_call_impl = lambda *a, **k: None
    c = pickle.loads(pickle.dumps(gp))
    assert type(c) is GaussianParameter and c.mode == gp.mode and c.last_eps is None
    assert torch.equal(c.sigma, gp.sigma)


def test_parameters_carry_no_extra_attributes():
    reference = vars(nn.Parameter(torch.zeros(1)))
    bm = bayesianize(create_model("mlp", in_features=8, hidden=(4,), num_classes=2))
    x = torch.randn(3, 8)
    for mode in bayes.MODES:
        with forward_mode(bm, mode):
            (bm(x).sum() + bayes.sigma_regularizer(bm) + bayes.kl_divergence(bm, dataset_size=10)).backward()
    bayes.sigma_stats(bm)
    for name, p in bm.named_parameters():
        assert type(p) is nn.Parameter, name
        d = {k: v for k, v in vars(p).items()}
        assert d == reference, (name, d)
    for layer, _ in _layers():
        for p in layer.parameters():
            assert vars(p) == reference


def test_repr_mentions_hyper_parameters_and_mode():
    r = repr(bayesianize(nn.Conv2d(2, 4, 3, stride=2, padding="valid", bias=False, padding_mode="circular"),
                         mode="local"))
    for piece in ("kernel_size=(3, 3)", "stride=(2, 2)", "padding=valid", "bias=False", "padding_mode=circular",
                  "mode=local"):
        assert piece in r
    r = repr(bayesianize(nn.Linear(5, 3)))
    assert "in_features=5, out_features=3, bias=True" in r and "mode=sample" in r


def test_argument_checks():
    with pytest.raises(bayes.BayesError):
        bayesianize(nn.Linear(4, 4), mode="mc")
    with pytest.raises(bayes.BayesError):
        GaussianParameter(torch.ones(2), mode="mc")
    for floor in (0.0, -1.0, float("nan")):
        with pytest.raises(bayes.BayesError):
            GaussianParameter(torch.ones(2), sigma_floor=floor)
    with pytest.raises(bayes.BayesError):
        set_forward_mode(bayesianize(nn.Linear(4, 4)), "mc")


# ---------------------------------------------------------------------------------------------
# DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_single_process_gloo(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=(tmp_path / "ddp_init").as_uri(), rank=0, world_size=1)
    try:
        torch.manual_seed(3)
        model = bayesianize(create_model("lenet5", input_size=12))
        ddp = DDP(model)
        x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
        for _ in range(2):
            ddp.zero_grad()
            loss = F.cross_entropy(ddp(x), y) + bayes.sigma_regularizer(model)
            loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        with forward_mode(ddp, "mean"), torch.no_grad():
            assert torch.equal(ddp(x), to_point(model)(x))
    finally:
        dist.destroy_process_group()


def to_point(model):
    return bayes.to_point_estimate(model)


# ---------------------------------------------------------------------------------------------
# forward modes
def test_mode_semantics_per_layer():
    torch.manual_seed(4)
    layer = bayesianize(nn.Linear(6, 3), sigma_init=0.1)
    x = torch.randn(5, 6)
    w_mu, b_mu, w_s, b_s = _mu(layer), _mu(layer, "bias"), _sigma(layer), _sigma(layer, "bias")
    set_forward_mode(layer, "mean")
    a, b = layer(x), layer(x)
    assert torch.equal(a, b) and torch.equal(a, F.linear(x, w_mu, b_mu))
    assert _gp(layer).last_eps is None
    set_forward_mode(layer, "sample")
    s1 = layer(x)
    eps_w, eps_b = _gp(layer).last_eps, _gp(layer, "bias").last_eps
    assert eps_w.shape == w_mu.shape and eps_b.shape == b_mu.shape
    # the output is exactly the linear map with the drawn weight
    want = F.linear(x, w_mu + w_s * eps_w, b_mu + b_s * eps_b)
    assert torch.allclose(s1, want, rtol=1e-6, atol=1e-7)
    s2 = layer(x)
    assert not torch.equal(s1, s2) and not torch.equal(_gp(layer).last_eps, eps_w)
    set_forward_mode(layer, "local")
    l1 = layer(x)
    assert _gp(layer).last_eps is None  # local/mean draw no per-weight eps
    assert not torch.equal(l1, layer(x)) and not torch.equal(l1, a)


def test_set_forward_mode_whole_model():
    bm = bayesianize(create_model("lenet5", input_size=12))
    assert set(_modes(bm)) == {"sample"}
    set_forward_mode(bm, "local")
    assert set(_modes(bm)) == {"local"}
    set_forward_mode(bm.features, "mean")
    assert _modes(bm) == ["mean"] * 4 + ["local"] * 6
    set_forward_mode(bm.features[0], "sample")  # a layer itself
    assert _gp(bm.features[0]).mode == _gp(bm.features[0], "bias").mode == "sample"
    with pytest.raises(bayes.BayesError):
        set_forward_mode(bm, "bogus")
    assert _modes(bm) == ["sample"] * 2 + ["mean"] * 2 + ["local"] * 6


def test_forward_mode_restores_each_parameter():
    bm = bayesianize(create_model("lenet5", input_size=12))
    initial = ["sample", "mean", "local", "local", "sample", "mean", "local", "sample", "sample", "mean"]
    for e, m in zip(bayes.gaussian_parameters(bm), initial):
        e.gaussian.mode = m
    with forward_mode(bm, "mean") as got:
        assert got is bm
        assert _modes(bm) == ["mean"] * 10
        with forward_mode(bm.classifier, "local"):
            assert _modes(bm) == ["mean"] * 4 + ["local"] * 6
        assert _modes(bm) == ["mean"] * 10
    assert _modes(bm) == initial
    with pytest.raises(RuntimeError, match="boom"):
        with forward_mode(bm, "local"):
            assert _modes(bm) == ["local"] * 10
            raise RuntimeError("boom")
    assert _modes(bm) == initial
    with pytest.raises(bayes.BayesError):
        with forward_mode(bm, "bogus"):
            pass  # pragma: no cover
    assert _modes(bm) == initial
    with forward_mode(bm.features[0], "mean"):  # a bare layer
        assert _gp(bm.features[0]).mode == "mean"
    assert _modes(bm) == initial


def test_forward_mode_mean_is_deterministic_for_a_model():
    torch.manual_seed(5)
    model = create_model("lenet5", input_size=12).eval()
    bm = bayesianize(model, sigma_init=0.05)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        with forward_mode(bm, "mean"):
            assert torch.equal(bm(x), model(x))
        assert not torch.equal(bm(x), model(x))


def test_local_mode_coverage_and_registered_rule():
    class Scale(nn.Module):  # y = x * w: linear in w, so a variance rule exists
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.full((3,), 0.5))

        def forward(self, x):
            return x * self.w

    model = nn.Sequential(nn.Linear(3, 3), nn.Embedding(4, 3), Scale())
    bm = bayesianize(model, sigma_init=0.3, mode="local")
    cov = bayes.local_mode_coverage(bm)
    assert cov == {"0.weight": True, "0.bias": True, "1.weight": False, "2.w": False}
    # an owner without a rule is sampled in local mode (and so draws an eps)
    bm[1](torch.tensor([0, 1]))
    assert _gp(bm[1]).last_eps is not None
    bayes.register_local_rule(Scale, lambda m, args, kwargs, var: args[0] ** 2 * var["w"])
    try:
        bm = bayesianize(model, sigma_init=0.3, mode="local")
        assert bayes.local_mode_coverage(bm)["2.w"] is True
        x = torch.ones(20000, 3)
        with torch.no_grad():
            out = bm[2](x)
        assert _gp(bm[2], "w").last_eps is None
        assert not torch.equal(out[0], out[1])  # one noise draw per output
        assert torch.allclose(out.std(0), torch.full((3,), 0.3), rtol=0.05)
    finally:
        bayes.layers._LOCAL_RULES.pop(Scale, None)


# ---------------------------------------------------------------------------------------------
# sigma floor
@pytest.mark.parametrize("bad", [0.0, -0.3, -5.0])
def test_floored_sigma_gives_positive_std_in_sample_mode(bad):
    torch.manual_seed(6)
    floor = 0.25
    layer = bayesianize(nn.Linear(4, 3), sigma_floor=floor)
    with torch.no_grad():
        _mu(layer).zero_()
        _mu(layer, "bias").zero_()
        _sigma(layer).fill_(bad)
        _sigma(layer, "bias").fill_(bad)
    x = torch.randn(5, 4)
    out = layer(x)
    eps_w, eps_b = _gp(layer).last_eps, _gp(layer, "bias").last_eps
    assert torch.allclose(out, F.linear(x, floor * eps_w, floor * eps_b), rtol=1e-6, atol=1e-7)
    assert (out != 0).all()
    # the floor passes gradients straight through (a clamp would give zero)
    out.sum().backward()
    want_w = eps_w * x.sum(0)[None, :]
    want_b = eps_b * x.shape[0]
    assert torch.allclose(_sigma(layer).grad, want_w, rtol=1e-6, atol=1e-6)
    assert torch.allclose(_sigma(layer, "bias").grad, want_b, rtol=1e-6, atol=1e-6)
    assert (_sigma(layer).grad != 0).all()


def test_floored_sigma_in_local_mode():
    torch.manual_seed(7)
    floor = 0.5
    layer = bayesianize(nn.Linear(3, 2), sigma_floor=floor, mode="local")
    with torch.no_grad():
        _sigma(layer).fill_(-1.0)
        _sigma(layer, "bias").zero_()
    x = torch.randn(1, 3).expand(4000, 3)
    out = layer(x)
    mean = F.linear(x[:1], _mu(layer), _mu(layer, "bias"))
    std = floor * (x[0].pow(2).sum() + 1).sqrt()
    z = (out - mean) / std
    # standardised with the floored std, the draws are N(0, 1)
    assert abs(z.mean()) < 5 / 4000**0.5 * 1.5
    assert abs(z.var() - 1) < 5 * (2 / 4000) ** 0.5
    out.sum().backward()
    assert torch.isfinite(_sigma(layer).grad).all() and (_sigma(layer).grad != 0).all()


def test_sigma_floor_default_is_tiny_and_positive():
    layer = bayesianize(nn.Linear(2, 2))
    assert _gp(layer).sigma_floor == bayes.DEFAULT_SIGMA_FLOOR == 2.0**-30
    with torch.no_grad():
        _sigma(layer).fill_(-1)
    assert (_gp(layer).floored_sigma() == 2.0**-30).all()


def test_local_mode_zero_variance_has_finite_gradients():
    # an all-zero input patch and no bias give variance exactly 0: sqrt must not make NaN
    torch.manual_seed(8)
    lin = bayesianize(nn.Linear(4, 3, bias=False), mode="local", sigma_init=0.01)
    x = torch.zeros(3, 4)
    x[1] = 1.0
    out = lin(x)
    assert torch.equal(out[0], torch.zeros(3))  # zero mean, zero variance
    out.sum().backward()
    for p in lin.parameters():
        assert torch.isfinite(p.grad).all()
    conv = bayesianize(nn.Conv2d(2, 2, 3, bias=False), mode="local", sigma_init=0.01)
    x = torch.relu(torch.randn(2, 2, 8, 8))
    x[:, :, :4] = 0  # dead region larger than the kernel
    conv(x).pow(2).sum().backward()
    for p in conv.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

"""Bayesian layers behave as plain nn.Modules; forward modes; the sigma floor."""

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
from bayes import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    bayesianize,
    forward_mode,
    set_forward_mode,
)
from pwfn.models import create_model


def _layers():
    torch.manual_seed(0)
    return [
        (BayesLinear(5, 3), torch.randn(4, 5)),
        (BayesLinear(5, 3, bias=False), torch.randn(4, 5)),
        (BayesConv1d(2, 4, 3, padding=1, padding_mode="reflect"), torch.randn(2, 2, 7)),
        (BayesConv2d(2, 4, 3, groups=2, bias=False), torch.randn(2, 2, 6, 6)),
        (BayesConv3d(1, 2, 2, stride=2), torch.randn(2, 1, 4, 4, 4)),
    ]


# ---------------------------------------------------------------------------------------------
# state_dict, dtype, copies, pickling, parameters
def test_state_dict_keys_and_bias_free():
    for layer, _ in _layers():
        has_bias = layer.bias_mu is not None
        want = {"weight_mu", "weight_sigma"} | ({"bias_mu", "bias_sigma"} if has_bias else set())
        assert set(layer.state_dict()) == want
        assert {n for n, _ in layer.named_parameters()} == want
        assert list(layer.buffers()) == []
        if not has_bias:
            assert layer.bias_mu is None and layer.bias_sigma is None and layer.bias is None
            assert layer.present_params() == ["weight"]
        assert layer.weight is layer.weight_mu
        assert layer.weight_sigma.shape == layer.weight_mu.shape
    conv = BayesConv2d(4, 6, (3, 5), groups=2)
    assert conv.weight_mu.shape == nn.Conv2d(4, 6, (3, 5), groups=2).weight.shape
    assert conv.bias_sigma.shape == (6,)


def test_nested_state_dict_keys():
    bm = bayesianize(create_model("mlp", in_features=8, hidden=(4,), num_classes=2))
    assert list(bm.state_dict()) == [
        "net.1.weight_mu", "net.1.weight_sigma", "net.1.bias_mu", "net.1.bias_sigma",
        "net.3.weight_mu", "net.3.weight_sigma", "net.3.bias_mu", "net.3.bias_sigma",
    ]


def test_state_dict_load_round_trip():
    for layer, x in _layers():
        with torch.no_grad():
            layer.weight_sigma.uniform_(0.01, 0.1)
        sd = layer.state_dict()
        fresh = copy.deepcopy(layer)
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)
        fresh.load_state_dict(sd)
        for k, v in layer.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v)
        for mode in bayes.MODES:
            layer.mode = fresh.mode = mode
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
            layer.mode = mode
            out = layer(x)
            assert out.dtype == torch.float64 and torch.isfinite(out).all()
    lin = BayesLinear(5, 3, mode="mean").double()
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(lin(x), F.linear(x, lin.weight_mu, lin.bias_mu))


def _same_values(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) and sa[k].data_ptr() != sb[k].data_ptr()


def test_deepcopy_after_sample_forward():
    for layer, x in _layers():
        layer.mode = "sample"
        layer(x).sum().backward()
        assert layer.last_eps("weight") is not None
        c = copy.deepcopy(layer)
        _same_values(layer, c)
        assert c.mode == "sample" and c.sigma_floor == layer.sigma_floor
        assert c.last_eps("weight") is None  # scratch state is not copied
        assert layer.last_eps("weight") is not None  # ... nor dropped from the original
        c.mode = "mean"
        layer.mode = "mean"
        assert torch.equal(c(x), layer(x))


def test_pickle_round_trip_after_sample_forward():
    for layer, x in _layers():
        layer.mode = "sample"
        layer(x).sum().backward()
        c = pickle.loads(pickle.dumps(layer))
        _same_values(layer, c)
        assert type(c) is type(layer) and c.mode == "sample"
        assert c.last_eps("weight") is None
        c.mode = layer.mode = "mean"
        assert torch.equal(c(x), layer(x))
        c.mode = "sample"
        c(x).sum().backward()  # still a working module
        assert c.weight_sigma.grad is not None


def test_pickle_whole_model_and_torch_save():
    torch.manual_seed(2)
    bm = bayesianize(create_model("lenet5", input_size=12))
    x = torch.randn(2, 1, 12, 12)
    bm(x)
    for c in (pickle.loads(pickle.dumps(bm)), copy.deepcopy(bm)):
        _same_values(bm, c)
        with forward_mode(bm, "mean"), forward_mode(c, "mean"):
            assert torch.equal(c(x), bm(x))
    buf = io.BytesIO()
    torch.save(bm, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    _same_values(bm, c)


def test_pickle_after_compile_call_wrapper():
    # nn.Module.__getstate__ drops the wrapper that ``compile()`` stores in _compiled_call_impl;
    # an override must keep doing so. (A lambda stands in for the torch.compile wrapper: both are
    # unpicklable, and importing dynamo would cost seconds.)
    layer = BayesLinear(3, 2)
    layer._compiled_call_impl = lambda *a, **k: None
    c = pickle.loads(pickle.dumps(layer))
    _same_values(layer, c)


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
    r = repr(BayesConv2d(2, 4, 3, stride=2, padding="valid", bias=False, padding_mode="circular", mode="local"))
    for piece in ("kernel_size=(3, 3)", "stride=(2, 2)", "padding=valid", "bias=False", "padding_mode=circular",
                  "mode=local"):
        assert piece in r
    assert "in_features=5, out_features=3, bias=True, mode=sample" in repr(BayesLinear(5, 3))


def test_constructor_argument_checks():
    with pytest.raises(bayes.BayesError):
        BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(bayes.BayesError):
        BayesConv2d(4, 4, 3, groups=0)
    with pytest.raises(bayes.BayesError):
        BayesConv2d(4, 4, (3, 3, 3))
    with pytest.raises(bayes.BayesError):
        BayesConv2d(4, 4, 3, padding="full")
    with pytest.raises(bayes.BayesError):
        BayesConv2d(4, 4, 3, padding="same", stride=2)
    with pytest.raises(bayes.BayesError):
        BayesConv1d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(bayes.BayesError):
        BayesLinear(4, 4, mode="mc")


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
    layer = BayesLinear(6, 3, sigma_init=0.1)
    x = torch.randn(5, 6)
    layer.mode = "mean"
    a, b = layer(x), layer(x)
    assert torch.equal(a, b) and torch.equal(a, F.linear(x, layer.weight_mu, layer.bias_mu))
    assert layer.last_eps("weight") is None
    layer.mode = "sample"
    s1 = layer(x)
    eps_w, eps_b = layer.last_eps("weight"), layer.last_eps("bias")
    assert eps_w.shape == layer.weight_mu.shape and eps_b.shape == layer.bias_mu.shape
    # the output is exactly the linear map with the drawn weight
    want = F.linear(x, layer.weight_mu + layer.weight_sigma * eps_w, layer.bias_mu + layer.bias_sigma * eps_b)
    assert torch.allclose(s1, want, rtol=1e-6, atol=1e-7)
    s2 = layer(x)
    assert not torch.equal(s1, s2) and not torch.equal(layer.last_eps("weight"), eps_w)
    layer.mode = "local"
    l1 = layer(x)
    assert layer.last_eps("weight") is None  # local/mean draw no per-weight eps
    assert not torch.equal(l1, layer(x)) and not torch.equal(l1, a)


def test_set_forward_mode_whole_model():
    bm = bayesianize(create_model("lenet5", input_size=12))
    assert {lay.mode for _, lay in bayes.bayesian_layers(bm)} == {"sample"}
    set_forward_mode(bm, "local")
    assert {lay.mode for _, lay in bayes.bayesian_layers(bm)} == {"local"}
    set_forward_mode(bm.features, "mean")
    assert [lay.mode for _, lay in bayes.bayesian_layers(bm)] == ["mean", "mean", "local", "local", "local"]
    set_forward_mode(bm.features[0], "sample")  # a layer itself
    assert bm.features[0].mode == "sample"
    with pytest.raises(bayes.BayesError):
        set_forward_mode(bm, "bogus")
    assert [lay.mode for _, lay in bayes.bayesian_layers(bm)] == ["sample", "mean", "local", "local", "local"]


def test_forward_mode_restores_each_layer():
    bm = bayesianize(create_model("lenet5", input_size=12))
    initial = ["sample", "mean", "local", "local", "sample"]
    for (_, lay), m in zip(bayes.bayesian_layers(bm), initial):
        lay.mode = m
    modes = lambda: [lay.mode for _, lay in bayes.bayesian_layers(bm)]  # noqa: E731
    with forward_mode(bm, "mean") as got:
        assert got is bm
        assert modes() == ["mean"] * 5
        with forward_mode(bm.classifier, "local"):
            assert modes() == ["mean", "mean", "local", "local", "local"]
        assert modes() == ["mean"] * 5
    assert modes() == initial
    with pytest.raises(RuntimeError, match="boom"):
        with forward_mode(bm, "local"):
            assert modes() == ["local"] * 5
            raise RuntimeError("boom")
    assert modes() == initial
    with pytest.raises(bayes.BayesError):
        with forward_mode(bm, "bogus"):
            pass  # pragma: no cover
    assert modes() == initial
    with forward_mode(bm.features[0], "mean"):  # a bare layer
        assert bm.features[0].mode == "mean"
    assert modes() == initial


def test_forward_mode_mean_is_deterministic_for_a_model():
    torch.manual_seed(5)
    model = create_model("lenet5", input_size=12).eval()
    bm = bayesianize(model, sigma_init=0.05)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        with forward_mode(bm, "mean"):
            assert torch.equal(bm(x), model(x))
        assert not torch.equal(bm(x), model(x))


# ---------------------------------------------------------------------------------------------
# sigma floor
@pytest.mark.parametrize("bad", [0.0, -0.3, -5.0])
def test_floored_sigma_gives_positive_std_in_sample_mode(bad):
    torch.manual_seed(6)
    floor = 0.25
    layer = BayesLinear(4, 3, sigma_floor=floor)
    with torch.no_grad():
        layer.weight_mu.zero_()
        layer.bias_mu.zero_()
        layer.weight_sigma.fill_(bad)
        layer.bias_sigma.fill_(bad)
    x = torch.randn(5, 4)
    out = layer(x)
    eps_w, eps_b = layer.last_eps("weight"), layer.last_eps("bias")
    assert torch.allclose(out, F.linear(x, floor * eps_w, floor * eps_b), rtol=1e-6, atol=1e-7)
    assert (out != 0).all()
    # the floor passes gradients straight through (a clamp would give zero)
    out.sum().backward()
    want_w = eps_w * x.sum(0)[None, :]
    want_b = eps_b * x.shape[0]
    assert torch.allclose(layer.weight_sigma.grad, want_w, rtol=1e-6, atol=1e-6)
    assert torch.allclose(layer.bias_sigma.grad, want_b, rtol=1e-6, atol=1e-6)
    assert (layer.weight_sigma.grad != 0).all()


def test_floored_sigma_in_local_mode():
    torch.manual_seed(7)
    floor = 0.5
    layer = BayesLinear(3, 2, sigma_floor=floor, mode="local")
    with torch.no_grad():
        layer.weight_sigma.fill_(-1.0)
        layer.bias_sigma.zero_()
    x = torch.randn(1, 3).expand(4000, 3)
    out = layer(x)
    mean = F.linear(x[:1], layer.weight_mu, layer.bias_mu)
    std = floor * (x[0].pow(2).sum() + 1).sqrt()
    z = (out - mean) / std
    # standardised with the floored std, the draws are N(0, 1)
    assert abs(z.mean()) < 5 / 4000**0.5 * 1.5
    assert abs(z.var() - 1) < 5 * (2 / 4000) ** 0.5
    out.sum().backward()
    assert torch.isfinite(layer.weight_sigma.grad).all() and (layer.weight_sigma.grad != 0).all()


def test_sigma_floor_default_is_tiny_and_positive():
    layer = BayesLinear(2, 2)
    assert layer.sigma_floor == bayes.DEFAULT_SIGMA_FLOOR == 2.0**-30
    with torch.no_grad():
        layer.weight_sigma.fill_(-1)
    assert (layer.floored_sigma("weight") == 2.0**-30).all()


def test_local_mode_zero_variance_has_finite_gradients():
    # an all-zero input patch and no bias give variance exactly 0: sqrt must not make NaN
    torch.manual_seed(8)
    lin = BayesLinear(4, 3, bias=False, mode="local", sigma_init=0.01)
    x = torch.zeros(3, 4)
    x[1] = 1.0
    out = lin(x)
    assert torch.equal(out[0], torch.zeros(3))  # zero mean, zero variance
    out.sum().backward()
    for p in lin.parameters():
        assert torch.isfinite(p.grad).all()
    conv = BayesConv2d(2, 2, 3, bias=False, mode="local", sigma_init=0.01)
    x = torch.relu(torch.randn(2, 2, 8, 8))
    x[:, :, :4] = 0  # dead region larger than the kernel
    conv(x).pow(2).sum().backward()
    for p in conv.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

"""Conversion to and from Bayesian layers: bit-exact mean mode and point estimates, semantics."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import bayes
from bayes import BayesianLayer, ConversionError, bayesianize, forward_mode, to_point_estimate
from pwfn.models import create_model

CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode", "output_padding", "transposed", "_reversed_padding_repeated_twice")
LINEAR_ATTRS = ("in_features", "out_features")


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _assert_plain_copy(point: nn.Module, original: nn.Module) -> None:
    """``point`` has the same module tree as ``original``, plain torch layers only, same weights."""
    assert not any(isinstance(m, BayesianLayer) for m in point.modules())
    assert repr(point) == repr(original)
    pm, om = dict(point.named_modules()), dict(original.named_modules())
    assert pm.keys() == om.keys()
    for name, o in om.items():
        p = pm[name]
        assert type(p) is type(o), name
        attrs = CONV_ATTRS if isinstance(o, nn.modules.conv._ConvNd) else LINEAR_ATTRS if isinstance(o, nn.Linear) else ()
        for a in attrs:
            assert getattr(p, a) == getattr(o, a), (name, a)
        assert p.training == o.training
    psd, osd = point.state_dict(), original.state_dict()
    assert psd.keys() == osd.keys()
    for k in osd:
        assert psd[k].dtype == osd[k].dtype and torch.equal(psd[k], osd[k]), k


def _check_roundtrip(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        for mode in ("mean", "sample", "local"):
            bm = bayesianize(model, mode=mode)
            bm.eval()
            assert sum(1 for _ in bayes.bayesian_layers(bm)) > 0
            with forward_mode(bm, "mean"):
                assert torch.equal(bm(x), ref)
        bm = bayesianize(model, mode="mean").eval()
        out = bm(x)
        assert torch.equal(out, ref)
        point = to_point_estimate(bm)
        assert torch.equal(point(x), out)
        _assert_plain_copy(point, model)
        # to_point_estimate copies by default: the Bayesian model is untouched
        assert sum(1 for _ in bayes.bayesian_layers(bm)) > 0


def test_mlp_roundtrip_bit_exact():
    torch.manual_seed(0)
    model = create_model("mlp", in_features=64, hidden=(32, 16), num_classes=10)
    _check_roundtrip(model, torch.randn(7, 64))


def test_lenet5_roundtrip_bit_exact():
    torch.manual_seed(1)
    model = create_model("lenet5", in_channels=1, num_classes=10, input_size=28)
    _check_roundtrip(model, torch.randn(3, 1, 28, 28))


def test_resnet20_eval_roundtrip_bit_exact_with_batchnorm():
    torch.manual_seed(2)
    model = create_model("resnet20", num_classes=10)
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 16, 16)
    _check_roundtrip(model, x)
    bm = bayesianize(model)
    # BatchNorm layers are kept, and are the same kind of module in the same places
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bm.modules()) == 19
    assert sum(isinstance(m, bayes.BayesConv2d) for m in bm.modules()) == 19
    assert isinstance(bm.fc, bayes.BayesLinear)


# ---------------------------------------------------------------------------------------------
# every convolution flavour, one layer at a time
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SIZE = {1: (2, 4, 19), 2: (2, 4, 11, 9), 3: (2, 4, 7, 6, 8)}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [2, "same", "valid", "tuple"])
def test_single_conv_roundtrip(dims, padding_mode, padding):
    torch.manual_seed(dims * 100 + len(padding_mode))
    kernel = (3, 2, 3)[:dims] if padding != "tuple" else 3
    if padding == "tuple":
        padding = (1, 2, 0)[:dims]
    stride = 1 if padding == "same" else (2, 1, 3)[:dims]
    conv = _CONV[dims](4, 6, kernel, stride=stride, padding=padding, dilation=(2, 1, 1)[:dims], groups=2,
                       bias=(padding_mode in ("zeros", "circular")), padding_mode=padding_mode)
    x = torch.randn(*_SIZE[dims])
    _check_roundtrip(conv, x)
    b = bayesianize(conv)
    assert type(b) is {1: bayes.BayesConv1d, 2: bayes.BayesConv2d, 3: bayes.BayesConv3d}[dims]
    assert (b.bias_mu is None) == (conv.bias is None)
    # a layer rebuilt from the Bayesian one keeps every hyper-parameter
    back = b.to_module()
    for a in CONV_ATTRS:
        assert getattr(back, a) == getattr(conv, a), a


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = nn.ModuleList([nn.Conv2d(6, 6, 3, padding="same", padding_mode="reflect", groups=3, bias=False),
                                   nn.Conv2d(6, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1,
                                             padding_mode="circular")])
        self.heads = nn.ModuleDict({
            "a": nn.Sequential(nn.Flatten(), nn.Linear(6 * 3 * 7, 5)),
            "b": nn.Linear(6 * 3 * 7, 5, bias=False),
        })

    def forward(self, x):
        for conv in self.pair:
            x = torch.tanh(conv(x))
        return self.heads["a"](x) + self.heads["b"](x.flatten(1))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding="valid", bias=False)
        self.c1b = nn.Conv1d(4, 4, 4, padding="same", padding_mode="replicate", groups=4)
        self.c3 = nn.Conv3d(1, 3, (2, 3, 3), stride=(1, 2, 2), padding=(1, 1, 2), dilation=(1, 2, 1),
                            padding_mode="replicate")
        self.to2d = nn.Conv2d(3, 6, 3, padding=1, padding_mode="zeros")
        self.inner = _Inner()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x1, x3):
        a = self.bn(self.c1b(torch.relu(self.c1(x1)))).mean()
        y = self.c3(x3).mean(2)  # (N, 3, H, W)
        y = torch.relu(self.to2d(y))
        return self.inner(y) + a


def test_custom_nested_model_roundtrip_bit_exact():
    torch.manual_seed(3)
    model = _Custom().eval()
    _randomise_batchnorm(model)
    x1, x3 = torch.randn(3, 2, 30), torch.randn(3, 1, 4, 11, 11)
    with torch.no_grad():
        ref = model(x1, x3)
        bm = bayesianize(model, mode="mean")
        names = [n for n, _ in bayes.bayesian_layers(bm)]
        assert names == ["c1", "c1b", "c3", "to2d", "inner.pair.0", "inner.pair.1", "inner.heads.a.1",
                         "inner.heads.b"]
        assert torch.equal(bm(x1, x3), ref)
        point = to_point_estimate(bm)
        assert torch.equal(point(x1, x3), ref)
        _assert_plain_copy(point, model)
        with forward_mode(bm, "sample"):
            assert not torch.equal(bm(x1, x3), ref)


def test_to_point_estimate_inplace_and_bare_layers():
    lin = nn.Linear(4, 3)
    b = bayesianize(lin)
    assert isinstance(b, bayes.BayesLinear) and isinstance(lin, nn.Linear) and type(lin) is nn.Linear
    back = to_point_estimate(b)
    assert type(back) is nn.Linear and torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    model = bayesianize(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    same = to_point_estimate(model, inplace=True)
    assert same is model and type(model[0]) is nn.Linear
    # nothing Bayesian: a plain copy
    plain = nn.Sequential(nn.ReLU())
    assert isinstance(to_point_estimate(plain)[0], nn.ReLU)



def test_bare_layer_draw_is_the_draw_of_the_same_layer_in_a_container():
    """One draw per weight: a bare layer consumes the generator exactly as it does inside a model."""
    torch.manual_seed(0)
    layer = bayesianize(nn.Linear(4, 3))
    bare = bayes.sample_point_estimate(layer, torch.Generator().manual_seed(7))
    wrapped = bayes.sample_point_estimate(nn.Sequential(layer), torch.Generator().manual_seed(7))[0]
    assert torch.equal(bare.weight, wrapped.weight) and torch.equal(bare.bias, wrapped.bias)


# ---------------------------------------------------------------------------------------------
# conversion semantics
def _model():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten()),
        nn.Linear(2 * 4 * 4, 5),
    )


def test_copy_by_default_leaves_original_untouched():
    torch.manual_seed(4)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bm = bayesianize(model)
    assert bm is not model
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Conv2d, nn.ReLU, nn.Sequential, nn.Conv2d,
                                                 nn.Flatten, nn.Linear]
    with torch.no_grad():
        bm[0].weight_mu.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert bm[0].weight_mu.data_ptr() != model[0].weight.data_ptr()


def test_inplace_conversion():
    model = _model()
    w = model[3].weight.detach().clone()
    out = bayesianize(model, inplace=True)
    assert out is model
    assert isinstance(model[0], bayes.BayesConv2d) and isinstance(model[2][0], bayes.BayesConv2d)
    assert isinstance(model[3], bayes.BayesLinear) and torch.equal(model[3].weight_mu, w)


def test_train_eval_flag_and_dtype_preserved():
    model = _model().double()
    model[0].eval()
    bm = bayesianize(model)
    assert not bm[0].training and bm[3].training
    assert bm[3].weight_mu.dtype == torch.float64 and bm[3].weight_sigma.dtype == torch.float64
    point = to_point_estimate(bm)
    assert not point[0].training and point[3].training and point[3].weight.dtype == torch.float64


def _types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n}


def test_include_exclude_by_name_pattern():
    bm = bayesianize(_model(), include="2.*")
    assert _types(bm)["2.0"] == "BayesConv2d" and _types(bm)["0"] == "Conv2d" and _types(bm)["3"] == "Linear"
    bm = bayesianize(_model(), exclude=["2.*", "3"])
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["0"]
    bm = bayesianize(_model(), include=["0", "3"], exclude="3")
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["0"]
    lenet = create_model("lenet5")
    bm = bayesianize(lenet, include="features.*")
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["features.0", "features.3"]
    bm = bayesianize(lenet, exclude="classifier.[15]")
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["features.0", "features.3", "classifier.3"]


def test_include_exclude_by_type():
    bm = bayesianize(_model(), include=nn.Conv2d)
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["0", "2.0"]
    bm = bayesianize(_model(), exclude=[nn.Conv2d])
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["3"]
    bm = bayesianize(_model(), include=[nn.Linear, "0"])
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["0", "3"]
    with pytest.raises(ConversionError):
        bayesianize(_model(), include=[3])


def test_nothing_to_convert_raises():
    with pytest.raises(ConversionError, match="nothing to convert"):
        bayesianize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ConversionError):
        bayesianize(_model(), include="no.such.layer")
    with pytest.raises(ConversionError):
        bayesianize(_model(), exclude=[nn.Conv2d, nn.Linear])
    # a bare layer obeys include/exclude too
    with pytest.raises(ConversionError):
        bayesianize(nn.Linear(3, 2), exclude=nn.Linear)
    with pytest.raises(ConversionError):
        bayesianize(nn.Conv2d(3, 2, 1), include="features.*")


def test_bad_arguments_raise():
    for floor in (0.0, -1.0):
        with pytest.raises(ConversionError):
            bayesianize(_model(), sigma_floor=floor)
    with pytest.raises(bayes.BayesError, match="unknown forward mode"):
        bayesianize(_model(), mode="mc")
    # an error leaves an inplace target untouched
    model = _model()
    with pytest.raises(bayes.BayesError):
        bayesianize(model, inplace=True, sigma_init="nope")
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear


class _TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.a = shared  # same parent, two names
        self.b = shared
        self.seq1 = nn.Sequential(shared, nn.ReLU())  # other parents
        self.seq2 = nn.ModuleList([nn.Identity(), shared])
        self.other = nn.Linear(4, 2)

    def forward(self, x):
        return self.other(self.seq2[1](self.seq1(self.b(self.a(x)))))


def test_shared_module_converted_once_and_stays_shared():
    torch.manual_seed(5)
    model = _TwoNames()
    x = torch.randn(3, 4)
    ref = model(x)
    bm = bayesianize(model, mode="mean")
    refs = [bm.a, bm.b, bm.seq1[0], bm.seq2[1]]
    assert isinstance(bm.a, bayes.BayesLinear)
    assert all(r is bm.a for r in refs)
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["a", "other"]
    assert torch.equal(bm(x), ref)
    # parameters are not duplicated
    assert len(list(bm.parameters())) == 8
    point = to_point_estimate(bm)
    prefs = [point.a, point.b, point.seq1[0], point.seq2[1]]
    assert type(point.a) is nn.Linear and all(r is point.a for r in prefs)
    assert torch.equal(point(x), ref)
    # the shared module in a sample-mode forward draws one weight per call
    with forward_mode(bm, "sample"):
        bm(x)
    # inplace too
    model2 = _TwoNames()
    bayesianize(model2, inplace=True)
    assert all(r is model2.a for r in (model2.b, model2.seq1[0], model2.seq2[1]))
    assert isinstance(model2.b, bayes.BayesLinear)


def test_shared_in_modulelist_twice():
    shared = nn.Linear(3, 3)
    model = nn.ModuleList([shared, shared, nn.Linear(3, 1)])
    bm = bayesianize(model)
    assert bm[0] is bm[1] and isinstance(bm[1], bayes.BayesLinear)
    point = to_point_estimate(bm)
    assert point[0] is point[1] and type(point[1]) is nn.Linear


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight  # two distinct modules, one parameter
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # LM-style tying with a non-convertible module
        self.free = nn.Linear(4, 4)


def test_tied_parameters_between_modules_raise():
    with pytest.raises(ConversionError, match="tied"):
        bayesianize(_Tied())
    with pytest.raises(ConversionError):
        bayesianize(_Tied(), include="dec")
    with pytest.raises(ConversionError):
        bayesianize(_Tied(), include="head")
    # excluding every tied layer is fine
    bm = bayesianize(_Tied(), exclude=["enc", "dec", "head"])
    assert [n for n, _ in bayes.bayesian_layers(bm)] == ["free"]
    assert bm.dec.weight is bm.enc.weight


class _MyLinear(nn.Linear):
    pass


def test_exact_type_policy_leaves_subclasses_alone():
    model = nn.Sequential(_MyLinear(4, 4), nn.Linear(4, 4))
    bm = bayesianize(model)
    assert type(bm[0]) is _MyLinear and isinstance(bm[1], bayes.BayesLinear)
    with pytest.raises(ConversionError):
        bayesianize(nn.Sequential(_MyLinear(4, 4)))
    with pytest.raises(ConversionError):
        bayesianize(_MyLinear(4, 4))
    # MultiheadAttention's out_proj (a Linear subclass) is left alone; the MHA still runs
    torch.manual_seed(6)
    mha = nn.Sequential(nn.Linear(8, 8))
    mha.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    bm = bayesianize(mha, mode="mean")
    assert type(bm.attn.out_proj) is type(mha.attn.out_proj)
    x = torch.randn(2, 3, 8)
    out, _ = bm.attn(x, x, x)
    ref, _ = mha.attn(x, x, x)
    assert torch.equal(out, ref)


def test_converted_layers_are_independent_between_calls():
    model = _model()
    a, b = bayesianize(model), bayesianize(model)
    assert a[0] is not b[0]
    assert a[0].weight_mu.data_ptr() != b[0].weight_mu.data_ptr()


def test_all_combinations_of_padding_mode_and_string_padding_in_local_and_sample_run():
    # not a value check: every conv flavour runs in all three modes with the right shape
    torch.manual_seed(7)
    for dims, pm, pad in itertools.product((1, 2, 3), ("zeros", "reflect", "replicate", "circular"),
                                           ("same", "valid", 1)):
        conv = _CONV[dims](4, 2, 3, padding=pad, padding_mode=pm, groups=2, dilation=2 if pad == "same" else 1)
        b = bayesianize(conv)
        x = torch.randn(*_SIZE[dims])
        want = conv(x).shape
        for mode in bayes.MODES:
            b.mode = mode
            assert b(x).shape == want
    copy.deepcopy(b)

"""Conversion to and from Gaussian parameters: bit-exact mean mode and point estimates, semantics."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import bayes
from bayes import ConversionError, bayesianize, forward_mode, set_forward_mode, to_point_estimate
from pwfn.model.zoo import create_model

CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode", "output_padding", "transposed", "_reversed_padding_repeated_twice")
LINEAR_ATTRS = ("in_features", "out_features")


def _mu(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return bayes.mu_of(module, name)


def _sigma(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return bayes.gaussians_of(module)[name].sigma


def _bayesian_names(model: nn.Module) -> list[str]:
    return [n for n, _ in bayes.bayesian_modules(model)]


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
    """``point`` has the same module tree as ``original``, plain torch modules only, same weights."""
    assert not bayes.is_bayesian(point)
    assert not any(parametrize.is_parametrized(m) for m in point.modules())
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
        # the draw-window and local-reparameterisation hooks are gone too
        assert len(p._forward_pre_hooks) == len(o._forward_pre_hooks), name
        assert len(p._forward_hooks) == len(o._forward_hooks), name
    psd, osd = point.state_dict(), original.state_dict()
    assert list(psd) == list(osd)
    for k in osd:
        assert psd[k].dtype == osd[k].dtype and torch.equal(psd[k], osd[k]), k


def _check_roundtrip(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        for mode in ("mean", "sample", "local"):
            bm = bayesianize(model, mode=mode)
            bm.eval()
            assert bayes.is_bayesian(bm)
            with forward_mode(bm, "mean"):
                assert torch.equal(bm(x), ref)
        bm = bayesianize(model, mode="mean").eval()
        # the distinct parameters of the Bayesian model are the original's, under the same names
        # (mu stands for a Gaussian tensor; sigmas and parametrization internals are not listed)
        assert [s.name for s in bayes.parameter_sites(bm)] == [n for n, _ in model.named_parameters()]
        with pytest.raises(ConversionError, match="nothing to convert"):
            bayesianize(bm)  # converting again finds nothing left (never a sigma)
        out = bm(x)
        assert torch.equal(out, ref)
        point = to_point_estimate(bm)
        assert torch.equal(point(x), out)
        _assert_plain_copy(point, model)
        # to_point_estimate copies by default: the Bayesian model is untouched
        assert bayes.is_bayesian(bm)
        assert torch.equal(bm(x), ref)
        # the point state_dict computed from the Bayesian one is the original's
        psd = bayes.point_state_dict(bm.state_dict())
        osd = model.state_dict()
        assert list(psd) == list(osd) and all(torch.equal(psd[k], osd[k]) for k in osd)


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
    # BatchNorm layers are kept and not made Gaussian by default; every conv and the fc are
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bm.modules()) == 19
    assert not any(bayes.is_bayesian(m) for m in bm.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.Conv2d) and bayes.is_bayesian(m) for m in bm.modules()) == 19
    assert isinstance(bm.fc, nn.Linear) and set(bayes.gaussians_of(bm.fc)) == {"weight", "bias"}
    # norms=True makes the BatchNorm affine parameters Gaussian too, still bit-exact in mean mode
    with torch.no_grad():
        bn = bayesianize(model.eval(), norms=True, mode="mean")
        assert sum(isinstance(m, nn.BatchNorm2d) and bayes.is_bayesian(m) for m in bn.modules()) == 19
        assert torch.equal(bn(x), model(x))


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
    assert isinstance(b, _CONV[dims])
    assert ("bias" in bayes.gaussians_of(b)) == (conv.bias is not None)
    # the Bayesian module and the point estimate keep every hyper-parameter
    back = to_point_estimate(b)
    assert type(back) is _CONV[dims]
    for a in CONV_ATTRS:
        assert getattr(b, a) == getattr(conv, a), a
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
        assert _bayesian_names(bm) == ["c1", "c1b", "c3", "to2d", "inner.pair.0", "inner.pair.1",
                                       "inner.heads.a.1", "inner.heads.b"]
        assert torch.equal(bm(x1, x3), ref)
        point = to_point_estimate(bm)
        assert torch.equal(point(x1, x3), ref)
        _assert_plain_copy(point, model)
        with forward_mode(bm, "sample"):
            assert not torch.equal(bm(x1, x3), ref)


def test_to_point_estimate_inplace_and_bare_layers():
    lin = nn.Linear(4, 3)
    b = bayesianize(lin)
    assert isinstance(b, nn.Linear) and bayes.is_bayesian(b)
    assert type(lin) is nn.Linear and not bayes.is_bayesian(lin)  # the original is untouched
    back = to_point_estimate(b)
    assert type(back) is nn.Linear and torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert bayes.is_bayesian(b)
    model = bayesianize(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    same = to_point_estimate(model, inplace=True)
    assert same is model and type(model[0]) is nn.Linear and not bayes.is_bayesian(model)
    assert len(model._forward_pre_hooks) == 0 and len(model[0]._forward_pre_hooks) == 0
    # nothing Bayesian: a plain copy
    plain = nn.Sequential(nn.ReLU())
    assert isinstance(to_point_estimate(plain)[0], nn.ReLU)


def test_point_state_dict_loads_into_the_plain_model():
    torch.manual_seed(9)
    model = create_model("lenet5", input_size=12)
    bm = bayesianize(model, sigma_init=0.01)
    with torch.no_grad():
        for e in bayes.gaussian_parameters(bm):
            e.mu.add_(0.5)
    fresh = create_model("lenet5", input_size=12)
    fresh.load_state_dict(bayes.point_state_dict(bm.state_dict()))
    point = to_point_estimate(bm)
    want, got = fresh.state_dict(), point.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_bare_layer_draw_is_the_draw_of_the_same_layer_in_a_container():
    """One draw per weight: a bare layer consumes the generator exactly as it does inside a model."""
    torch.manual_seed(0)
    layer = bayesianize(nn.Linear(4, 3))
    bare = bayes.sample_point_estimate(layer, torch.Generator().manual_seed(7))
    wrapped = bayes.sample_point_estimate(nn.Sequential(layer), torch.Generator().manual_seed(7))[0]
    assert torch.equal(bare.weight, wrapped.weight) and torch.equal(bare.bias, wrapped.bias)
    assert type(bare) is nn.Linear and not bayes.is_bayesian(bare)


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
    assert not bayes.is_bayesian(model) and len(model._forward_pre_hooks) == 0
    with torch.no_grad():
        _mu(bm[0]).add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert _mu(bm[0]).data_ptr() != model[0].weight.data_ptr()


def test_inplace_conversion():
    model = _model()
    w = model[3].weight.detach().clone()
    out = bayesianize(model, inplace=True)
    assert out is model
    assert isinstance(model[0], nn.Conv2d) and bayes.is_bayesian(model[0]) and bayes.is_bayesian(model[2][0])
    assert isinstance(model[3], nn.Linear) and torch.equal(_mu(model[3]), w)


def test_train_eval_flag_and_dtype_preserved():
    model = _model().double()
    model[0].eval()
    bm = bayesianize(model)
    assert not bm[0].training and bm[3].training
    assert _mu(bm[3]).dtype == torch.float64 and _sigma(bm[3]).dtype == torch.float64
    point = to_point_estimate(bm)
    assert not point[0].training and point[3].training and point[3].weight.dtype == torch.float64


def test_include_exclude_by_name_pattern():
    bm = bayesianize(_model(), include="2.*")
    assert _bayesian_names(bm) == ["2.0"]
    bm = bayesianize(_model(), exclude=["2.*", "3"])
    assert _bayesian_names(bm) == ["0"]
    bm = bayesianize(_model(), include=["0", "3"], exclude="3")
    assert _bayesian_names(bm) == ["0"]
    lenet = create_model("lenet5")
    bm = bayesianize(lenet, include="features.*")
    assert _bayesian_names(bm) == ["features.0", "features.3"]
    bm = bayesianize(lenet, exclude="classifier.[15]")
    assert _bayesian_names(bm) == ["features.0", "features.3", "classifier.3"]
    # patterns on parameter names, and an explicit list of parameters
    bm = bayesianize(_model(), include="*.weight")
    assert [e.name for e in bayes.gaussian_parameters(bm)] == ["0.weight", "2.0.weight", "3.weight"]
    bm = bayesianize(_model(), exclude="*.bias")
    assert [e.name for e in bayes.gaussian_parameters(bm)] == ["0.weight", "2.0.weight", "3.weight"]
    bm = bayesianize(_model(), params=["3.bias", "0.weight"])
    assert [e.name for e in bayes.gaussian_parameters(bm)] == ["0.weight", "3.bias"]
    with pytest.raises(ConversionError, match="params"):
        bayesianize(_model(), params=["3.wieght"])


def test_include_exclude_by_type():
    bm = bayesianize(_model(), include=nn.Conv2d)
    assert _bayesian_names(bm) == ["0", "2.0"]
    bm = bayesianize(_model(), exclude=[nn.Conv2d])
    assert _bayesian_names(bm) == ["3"]
    bm = bayesianize(_model(), include=[nn.Linear, "0"])
    assert _bayesian_names(bm) == ["0", "3"]
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
    # a norm layer is converted when asked for
    bn = bayesianize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), norms=True)
    assert [e.name for e in bayes.gaussian_parameters(bn)] == ["1.weight", "1.bias"]


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
    assert not bayes.is_bayesian(model) and len(model._forward_pre_hooks) == 0


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
    assert isinstance(bm.a, nn.Linear) and bayes.is_bayesian(bm.a)
    assert all(r is bm.a for r in refs)
    assert _bayesian_names(bm) == ["a", "other"]
    entries = bayes.gaussian_parameters(bm)
    assert [e.name for e in entries] == ["a.weight", "a.bias", "other.weight", "other.bias"]
    assert entries[0].aliases == ["b.weight", "seq1.0.weight", "seq2.1.weight"]
    # one hook per module, not one per name
    assert len(bm.a._forward_pre_hooks) == 1
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
    assert bayes.is_bayesian(model2.b)


def test_shared_in_modulelist_twice():
    shared = nn.Linear(3, 3)
    model = nn.ModuleList([shared, shared, nn.Linear(3, 1)])
    bm = bayesianize(model)
    assert bm[0] is bm[1] and bayes.is_bayesian(bm[1])
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
        self.head.weight = self.emb.weight  # LM-style tying
        self.free = nn.Linear(4, 4)

    def forward(self, ids):
        return self.head(self.free(self.dec(self.enc(self.emb(ids)))))


def test_tied_parameters_stay_tied_and_share_one_sigma():
    torch.manual_seed(6)
    model = _Tied()
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    ref = model(ids)
    bm = bayesianize(model, mode="mean")
    g = bayes.gaussians_of
    # one mu, one sigma, one parametrization per tied tensor
    assert g(bm.enc)["weight"] is g(bm.dec)["weight"] and g(bm.emb)["weight"] is g(bm.head)["weight"]
    assert _mu(bm.enc) is _mu(bm.dec) and _mu(bm.emb) is _mu(bm.head)
    assert bm.enc.weight is bm.dec.weight  # mean mode: both read mu itself
    entries = {e.name: e.aliases for e in bayes.gaussian_parameters(bm)}
    assert entries == {"emb.weight": ["head.weight"], "enc.weight": ["dec.weight"], "enc.bias": [],
                       "dec.bias": [], "free.weight": [], "free.bias": []}
    assert len(bayes.sigma_parameters(bm)) == 6
    assert len(list(bm.parameters())) == 12
    assert torch.equal(bm(ids), ref)
    # the sigma is shared: a change through one owner is seen by the other
    with torch.no_grad():
        _sigma(bm.enc).fill_(0.125)
    assert (_sigma(bm.dec) == 0.125).all()
    # a sample-mode step trains the one sigma through both reads
    set_forward_mode(bm, "sample")
    bm(ids).sum().backward()
    assert _sigma(bm.enc).grad is not None and (_sigma(bm.enc).grad != 0).any()
    set_forward_mode(bm, "mean")
    # back to a point estimate: still tied, holding mu, same outputs and state_dict keys
    for point in (to_point_estimate(bm), to_point_estimate(copy.deepcopy(bm), inplace=True)):
        assert point.dec.weight is point.enc.weight and point.head.weight is point.emb.weight
        assert type(point.enc) is nn.Linear and type(point.emb) is nn.Embedding
        assert list(point.state_dict()) == list(model.state_dict())
        assert torch.equal(point(ids), ref)
    # sample_point_estimate draws once per tied tensor
    s = bayes.sample_point_estimate(bm, torch.Generator().manual_seed(0))
    assert s.dec.weight is s.enc.weight and not torch.equal(s.enc.weight, model.enc.weight)
    # selecting a tied tensor under either name converts it for both owners
    for sel in ("dec", "dec.weight"):
        part = bayesianize(_Tied(), include=sel)
        assert g(part.dec)["weight"] is g(part.enc)["weight"]
    bm = bayesianize(_Tied(), exclude=["enc", "dec", "head", "emb"])
    assert _bayesian_names(bm) == ["free"]
    assert bm.dec.weight is bm.enc.weight


class _MyLinear(nn.Linear):
    pass


def test_subclasses_and_attention_keep_their_class():
    model = nn.Sequential(_MyLinear(4, 4), nn.Linear(4, 4))
    bm = bayesianize(model)
    assert isinstance(bm[0], _MyLinear) and bayes.is_bayesian(bm[0]) and bayes.is_bayesian(bm[1])
    assert type(to_point_estimate(bm)[0]) is _MyLinear
    # MultiheadAttention's packed in_proj_weight and its out_proj (a Linear subclass) are converted;
    # the MHA still runs, bit-exact in mean mode
    torch.manual_seed(6)
    mha = nn.Sequential(nn.Linear(8, 8))
    mha.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    bm = bayesianize(mha, mode="mean")
    names = [e.name for e in bayes.gaussian_parameters(bm)]
    assert "attn.in_proj_weight" in names and "attn.out_proj.weight" in names
    assert isinstance(bm.attn.out_proj, type(mha.attn.out_proj))
    x = torch.randn(2, 3, 8)
    out, _ = bm.attn(x, x, x)
    ref, _ = mha.attn(x, x, x)
    assert torch.equal(out, ref)
    with forward_mode(bm, "sample"):
        assert not torch.equal(bm.attn(x, x, x)[0], ref)


def test_foreign_parametrizations_refused_unless_folded():
    torch.manual_seed(7)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)), nn.ReLU(),
                          nn.utils.weight_norm(nn.Linear(3, 2)))
    x = torch.randn(5, 4)
    with torch.no_grad():  # (a grad-mode forward leaves the legacy weight_norm model un-deep-copyable)
        ref = model(x)
    with pytest.raises(ConversionError, match="fold=True"):
        bayesianize(model)
    # excluding the computed tensors is fine
    bm = bayesianize(model, include="*.bias")
    assert [e.name for e in bayes.gaussian_parameters(bm)] == ["0.bias", "2.bias"]
    bm = bayesianize(model, fold=True, mode="mean")
    assert [e.name for e in bayes.gaussian_parameters(bm)] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.allclose(bm(x), ref, rtol=1e-6, atol=1e-7)
    point = to_point_estimate(bm)
    assert type(point[0]) is nn.Linear and set(point.state_dict()) == {"0.weight", "0.bias", "2.weight",
                                                                        "2.bias"}
    assert parametrize.is_parametrized(model[0])  # the original is untouched


def test_converted_layers_are_independent_between_calls():
    model = _model()
    a, b = bayesianize(model), bayesianize(model)
    assert a[0] is not b[0]
    assert _mu(a[0]).data_ptr() != _mu(b[0]).data_ptr()
    assert _sigma(a[0]) is not _sigma(b[0])


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
            set_forward_mode(b, mode)
            assert b(x).shape == want
    c = copy.deepcopy(b)
    assert torch.equal(c(x), b(x))  # b is in mean mode

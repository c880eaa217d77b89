"""Model plumbing: flat layout, scatter/gather, masks held in the view, shared parameters, FixedGuard."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

import bayes
from pwfn.errors import ModelError
from pwfn.model.plumbing import FixedGuard, QuantView, fold_norm_biases
from pwfn.model.zoo import create_model
from pwfn.training.fixer import Fixer


def _bnn():
    torch.manual_seed(0)
    return bayes.bayesianize(create_model("lenet5", input_size=8))


def _names(model):
    return [e.name for e in bayes.gaussian_parameters(model)]


def test_layout_covers_every_mu_once_in_the_given_order():
    model = _bnn()
    names = _names(model)
    view = QuantView(model, names)
    assert view.names() == [s.name for s in view.slots] == names
    entries = bayes.gaussian_parameters(model)
    assert view.numel == sum(e.mu.numel() for e in entries)
    assert torch.equal(view.values(), torch.cat([e.mu.detach().reshape(-1) for e in entries]))
    assert torch.equal(view.sigmas(), torch.cat([e.sigma.detach().reshape(-1) for e in entries]))
    assert view.has_sigma
    assert all(s.value is e.mu and s.sigma is e.sigma for s, e in zip(view.slots, entries))
    # the layout follows the order of the names it is given
    rev = QuantView(model, names[::-1])
    assert rev.names() == names[::-1]
    assert torch.equal(rev.values()[:10], entries[-1].mu.detach())  # classifier.5.bias comes first


def test_write_then_read_round_trip_and_masks_kept_in_the_view():
    model = _bnn()
    keys = list(model.state_dict())
    buffers = list(model.buffers())
    view = QuantView(model, _names(model))
    v = torch.randn(view.numel)
    f = torch.rand(view.numel) < 0.3
    s = torch.rand(view.numel)
    view.write(v, f, s)
    assert torch.equal(view.values(), v) and torch.equal(view.fixed(), f) and torch.equal(view.sigmas(), s)
    assert view.fraction_fixed() == pytest.approx(float(f.sum()) / view.numel)
    # nothing is added to the user's model: same state_dict keys, same buffers
    assert list(model.state_dict()) == keys and list(model.buffers()) == buffers
    assert not any("fixed" in k for k in bayes.to_point_estimate(model).state_dict())
    masks = view.masks()
    assert list(masks) == view.names() and all(m.dtype == torch.bool for m in masks.values())
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks.values()]), f)
    # the masks travel as their own state (a checkpoint), and load into a fresh view of a fresh model
    state = view.mask_state()
    assert all(m.device.type == "cpu" for m in state.values())
    state[view.names()[0]][...] = ~state[view.names()[0]]  # a copy: the view is unchanged
    assert torch.equal(view.fixed(), f)
    state = view.mask_state()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "masks": state}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = _bnn()
    fresh.load_state_dict(ckpt["model"])
    fview = QuantView(fresh, _names(fresh))
    assert not fview.fixed().any()
    fview.load_mask_state(ckpt["masks"])
    assert torch.equal(fview.fixed(), f) and torch.equal(fview.values(), v) and torch.equal(fview.sigmas(), s)
    # a deep copy of the model gets its own view; the masks are carried over by the state
    m2 = copy.deepcopy(model)
    v2 = QuantView(m2, _names(m2))
    v2.load_mask_state(view.mask_state())
    assert torch.equal(v2.fixed(), f) and torch.equal(v2.values(), v)
    # .to() keeps the leaves the view holds
    model.double()
    assert view.values().dtype == torch.float64 and torch.equal(view.values(), v.double())


def test_load_mask_state_checks_names_and_shapes():
    model = _bnn()
    view = QuantView(model, _names(model))
    state = view.mask_state()
    missing = dict(state)
    missing.pop("features.0.bias")
    with pytest.raises(ModelError, match="missing"):
        view.load_mask_state(missing)
    with pytest.raises(ModelError, match="unexpected"):
        view.load_mask_state({**state, "extra.weight": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(ModelError, match="shape"):
        view.load_mask_state({**state, "features.0.bias": torch.zeros(7, dtype=torch.bool)})
    with pytest.raises(ModelError, match="bool"):
        view.load_mask_state({**state, "features.0.bias": torch.zeros(6)})


def test_frozen_sigma_masks_fit_the_bayes_losses():
    model = _bnn()
    view = QuantView(model, _names(model))
    f = torch.rand(view.numel, generator=torch.Generator().manual_seed(1)) < 0.5
    view.write(view.values(), f, torch.full((view.numel,), 0.01))
    model(torch.randn(2, 1, 8, 8))
    frozen = view.frozen_sigma_masks()
    reg = bayes.sigma_regularizer(model, frozen=frozen)
    grads = torch.autograd.grad(reg, [s.sigma for s in view.slots])
    g = torch.cat([x.reshape(-1) for x in grads])
    assert (g[f] == 0).all() and (g[~f] != 0).all()


def test_plain_and_batchnorm_views():
    model = create_model("resnet20")
    conv = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p, _ in m.named_parameters(recurse=False)]
    bn = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
          for p, _ in m.named_parameters(recurse=False)]
    plain = QuantView(model, conv)
    with_bn = QuantView(model, conv + bn)
    n_conv = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_bn = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert plain.numel == n_conv
    assert with_bn.numel == n_conv + n_bn
    assert not plain.has_sigma and plain.frozen_sigma_masks() == {}
    with pytest.raises(ModelError, match="sigma"):
        plain.sigmas()
    # a partly Bayesian model: sigma where there is one
    bm = bayes.bayesianize(model, include="fc")
    mixed = QuantView(bm, conv)
    assert not mixed.has_sigma and list(mixed.frozen_sigma_masks()) == ["fc.weight", "fc.bias"]


def test_shared_parameter_counted_once():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    view = QuantView(model, ["0.weight", "0.bias", "2.weight", "2.bias"])
    assert view.numel == 16 + 4 + 4
    assert view.names() == ["0.weight", "0.bias", "2.bias"] and view.shared() == {"0.weight": ["2.weight"]}
    # an alias alone names the tensor too
    assert QuantView(model, ["2.weight"]).numel == 16
    shared_module = nn.Linear(3, 3)
    model2 = nn.Sequential(shared_module, shared_module)
    assert QuantView(model2, ["0.weight", "0.bias", "1.weight", "1.bias"]).numel == 12
    # tied and Gaussian: one slot, one mu, one sigma
    bm = bayes.bayesianize(model)
    bview = QuantView(bm, ["0.weight", "0.bias", "2.weight", "2.bias"])
    assert bview.numel == 24 and bview.has_sigma
    assert bview.slots[0].value is bayes.mu_of(bm[2], "weight")
    assert bview.slots[0].sigma is bayes.gaussians_of(bm[2])["weight"].sigma


def test_no_quantisable_tensor_and_unknown_names_are_clear_errors():
    with pytest.raises(ModelError, match="no quantisable tensor"):
        QuantView(nn.Sequential(nn.ReLU()), [])
    with pytest.raises(ModelError, match="no parameter named"):
        QuantView(_bnn(), ["features.0.weight_mu"])
    with pytest.raises(ModelError, match="no parameter named"):
        QuantView(_bnn(), ["features.0.parametrizations.weight.0.sigma"])  # a sigma is not a weight
    with pytest.raises(ModelError, match="float32"):
        QuantView(nn.Linear(2, 2).half(), ["weight"])


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_fixed_guard_keeps_fixed_entries_bit_exact(opt_name):
    torch.manual_seed(1)
    model = _bnn()
    view = QuantView(model, _names(model))
    fixed = torch.rand(view.numel) < 0.5
    view.write(view.values(), fixed)
    before = view.values().clone()
    before_sigma = view.sigmas().clone()
    opts = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        "adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    }
    opt = opts[opt_name](model.parameters())
    guard = FixedGuard(view.parameters_with_masks())
    x = torch.randn(8, 1, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        guard.before_step()
        opt.step()
        guard.after_step()
    after = view.values()
    assert torch.equal(after[fixed], before[fixed])
    assert torch.equal(view.sigmas()[fixed], before_sigma[fixed])
    assert not torch.equal(after[~fixed], before[~fixed])  # the rest trained


def test_without_guard_weight_decay_moves_fixed_entries():
    """The reason FixedGuard exists: masking gradients alone does not stop decay/momentum."""
    torch.manual_seed(1)
    model = _bnn()
    view = QuantView(model, _names(model))
    fixed = torch.ones(view.numel, dtype=torch.bool)
    view.write(view.values(), fixed)
    before = view.values().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.zero_grad()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    for p in model.parameters():
        p.grad.zero_()
    opt.step()
    assert not torch.equal(view.values(), before)


# ------------------------------------------------------------------ biases in front of BatchNorm


def _with_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.normal_()
    return model


def test_fold_norm_biases_keeps_the_function_in_eval_and_training_mode():
    torch.manual_seed(0)
    model = _with_stats(nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 7 * 7, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 5)))  # the last bias feeds no norm: it stays
    folded = copy.deepcopy(model)
    assert fold_norm_biases(folded) == ["0.bias -> 1", "3.bias -> 4", "7.bias -> 8"]
    for i in (0, 3, 7):
        assert not folded[i].bias.any()
        assert torch.allclose(folded[i + 1].running_mean, model[i + 1].running_mean - model[i].bias)
    assert torch.equal(folded[10].bias, model[10].bias)
    x = torch.randn(6, 2, 8, 8)
    model.eval(), folded.eval()
    assert torch.allclose(model(x), folded(x), atol=1e-5)
    model.train(), folded.train()
    out_a, out_b = model(x), folded(x)  # batch statistics; the running means move in step
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(folded[1].running_mean, model[1].running_mean - model[0].bias.detach(), atol=1e-6)


class _Branches(nn.Module):
    """A conv whose output also feeds a second consumer, a conv called twice, a norm after an add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.na = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.shared, self.ns = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c, self.nc = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.a(x)
        y = self.na(h) + h  # the bias reaches the output through the skip: not foldable
        y = self.ns(self.shared(self.shared(y)))  # called twice: not foldable
        return self.nc(self.c(y) + 1.0)  # an add between conv and norm: left alone


def test_fold_norm_biases_leaves_every_bias_that_is_not_only_feeding_a_norm():
    model = _with_stats(_Branches())
    before = copy.deepcopy(model.state_dict())
    assert fold_norm_biases(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_an_untraceable_model_is_left_as_it_is_and_said_so(caplog):
    model = _with_stats(_Untraceable())
    bias = model.conv.bias.detach().clone()
    with caplog.at_level(logging.INFO, logger="pwfn"):
        assert fold_norm_biases(model) == []
    assert torch.equal(model.conv.bias, bias)
    assert "cannot trace _Untraceable" in caplog.text


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_methods_fold_by_default_and_report_it(method):
    torch.manual_seed(0)
    model = _with_stats(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 36, 3)))
    bias = model[0].bias.detach().clone()
    fx = Fixer(model, method)
    assert fx.report()["coverage"]["folded_norm_biases"] == ["0.bias -> 1"]
    assert torch.equal(model[0].bias, bias)  # the user's model is not touched (a copy is fixed)
    assert not next(sl.value for sl in fx.view.slots if sl.name == "0.bias").any()
    kept = Fixer(model, method, overrides=["quantise.fold_norm_biases=false"])
    assert kept.report()["coverage"]["folded_norm_biases"] == []

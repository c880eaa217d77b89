"""Model plumbing: flat layout, scatter/gather, mask buffers, shared parameters, FixedGuard."""

import copy
import io

import pytest
import torch
from torch import nn

import bayes
from pwfn.errors import ModelError
from pwfn.models import create_model
from pwfn.plumbing import FixedGuard, QuantView, strip_masks


def _bnn():
    torch.manual_seed(0)
    return bayes.bayesianize(create_model("lenet5", input_size=8))


def test_layout_covers_every_mu_once_in_module_order():
    model = _bnn()
    view = QuantView(model)
    expected = [n for n, _ in model.named_parameters() if n.endswith("_mu")]
    assert [s.name + "_mu" for s in view.slots] == [n.replace("_mu", "") + "_mu" for n in expected]
    assert view.numel == sum(p.numel() for n, p in model.named_parameters() if n.endswith("_mu"))
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("_mu")])
    assert torch.equal(view.values(), flat)
    sig = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("_sigma")])
    assert torch.equal(view.sigmas(), sig)


def test_write_then_read_round_trip_and_masks_in_state_dict():
    model = _bnn()
    view = QuantView(model)
    v = torch.randn(view.numel)
    f = torch.rand(view.numel) < 0.3
    s = torch.rand(view.numel)
    view.write(v, f, s)
    assert torch.equal(view.values(), v) and torch.equal(view.fixed(), f) and torch.equal(view.sigmas(), s)
    sd = model.state_dict()
    assert any(k.endswith("weight_fixed") for k in sd)
    # masks survive .to(), deepcopy and a state_dict round trip into a fresh model
    m2 = copy.deepcopy(model).to(torch.float64)
    assert torch.equal(QuantView(m2).fixed(), f)
    fresh = _bnn()
    QuantView(fresh)  # attaches mask buffers so the state_dict fits
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(QuantView(fresh).fixed(), f)


def test_plain_and_batchnorm_views():
    model = create_model("resnet20")
    plain = QuantView(model, plain=True)
    with_bn = QuantView(model, plain=True, batchnorm=True)
    n_conv = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_bn = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert plain.numel == n_conv
    assert with_bn.numel == n_conv + n_bn
    with pytest.raises(ModelError, match="sigma"):
        plain.sigmas()


def test_shared_parameter_counted_once():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    view = QuantView(model, plain=True)
    assert view.numel == 16 + 4 + 4
    shared_module = nn.Linear(3, 3)
    model2 = nn.Sequential(shared_module, shared_module)
    assert QuantView(model2, plain=True).numel == 12


def test_no_quantisable_tensor_is_a_clear_error():
    with pytest.raises(ModelError, match="no quantisable tensor"):
        QuantView(nn.Sequential(nn.ReLU()))
    with pytest.raises(ModelError, match="no quantisable tensor"):
        QuantView(create_model("mlp"))  # plain layers, but only Bayesian ones were asked for


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_fixed_guard_keeps_fixed_entries_bit_exact(opt_name):
    torch.manual_seed(1)
    model = _bnn()
    view = QuantView(model)
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
    view = QuantView(model)
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


def test_strip_masks():
    model = _bnn()
    QuantView(model)
    plain = strip_masks(bayes.to_point_estimate(model))
    assert not any(k.endswith("_fixed") for k in plain.state_dict())
    strip_masks(model)
    assert not any(k.endswith("_fixed") for k in model.state_dict())

"""One owner per model (issue 23): a model a live Fixer holds cannot be taken by a second one, and an
optimizer (or trainer) that would train another model than the one being fixed is refused at once."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from pwfn.errors import ConfigError, ModelError
from pwfn.training.fixer import Fixer

CFG = {"pwfn": {"fractions": [0.5, 1.0]}, "wfn": {"fractions": [0.5, 1.0]},
       "contract": {"enforce": False}}  # ownership mechanics; the contract has its own tests


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _step(fixer_or_model, optimizer) -> None:
    model = fixer_or_model.model if isinstance(fixer_or_model, Fixer) else fixer_or_model
    torch.manual_seed(1)
    loss = model(torch.randn(8, 6)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("first,second", [("pwfn", "pwfn"), ("wfn", "wfn"), ("wfn", "pwfn"), ("pwfn", "wfn")])
def test_a_second_fixer_cannot_take_a_held_model_and_moves_nothing(first, second):
    model = _net()
    a = Fixer(model, method=first, config=CFG, inplace=True)
    a.fix_next()
    values, fixed = a.view.values().clone(), a.view.fixed().clone()
    with pytest.raises(ModelError, match="held by a live pwfn.Fixer") as err:
        Fixer(model, method=second, config=CFG, inplace=True)
    assert "fixer.close()" in str(err.value) and "inplace=False" in str(err.value)
    assert torch.equal(a.view.values(), values) and torch.equal(a.view.fixed(), fixed)
    if first == "wfn":  # a copy is its own model: allowed (a PWFN-held model is Bayesian: not a float model)
        Fixer(model, method=second, config=CFG).close()
    a.close()  # released: the model can be taken again
    Fixer(model, method="wfn", config=CFG, inplace=True).close()


def test_finalize_releases_the_model_and_a_forgotten_fixer_does_not_hold_it():
    model = _net()
    a = Fixer(model, method="wfn", config=CFG, inplace=True)
    while not a.done:
        a.fix_next()
    a.finalize()
    b = Fixer(model, method="wfn", config=CFG, inplace=True)
    del b
    gc.collect()
    Fixer(model, method="wfn", config=CFG, inplace=True).close()


def test_two_fixers_on_tied_weights_or_a_part_of_a_held_model_are_refused():
    a_model, b_model = _net(0), _net(1)
    b_model[2].weight = a_model[2].weight  # a tensor shared by two models
    a = Fixer(a_model, method="wfn", config=CFG, inplace=True)
    with pytest.raises(ModelError, match=r"'2.weight' is held"):
        Fixer(b_model, method="wfn", config=CFG, inplace=True)
    a.close()
    outer = nn.Sequential(_net(2), nn.Linear(3, 2))
    inner = Fixer(outer[0], method="pwfn", config=CFG, inplace=True)
    with pytest.raises(ModelError, match="held by a live"):
        Fixer(outer, method="wfn", config=CFG, inplace=True)
    inner.close()


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_an_optimizer_built_before_a_copying_fixer_is_refused_at_its_first_step(method):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fixer = Fixer(model, method=method, config=CFG)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="none of fixer.model's") as err:
        _step(model, opt)
    assert "fixer.model.parameters()" in str(err.value) and "inplace=True" in str(err.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "the refused step changed weights"
    fixer.close()
    _step(model, opt)  # a closed Fixer checks nothing


def test_an_optimizer_on_the_fixers_model_or_another_model_is_fine_and_a_mixed_one_is_refused():
    model = _net()
    fixer = Fixer(model, method="wfn", config=CFG)
    fixer.fix_next()
    own = torch.optim.AdamW(fixer.model.parameters(), lr=0.1, weight_decay=0.5)
    values, fixed = fixer.view.values().clone(), fixer.view.fixed().clone()
    _step(fixer, own)
    assert torch.equal(fixer.view.values()[fixed], values[fixed])
    other = _net(3)
    _step(other, torch.optim.SGD(other.parameters(), lr=0.1))  # another model's optimizer: not ours to judge
    mixed = torch.optim.SGD(list(fixer.model.parameters()) + list(model[0].parameters()), lr=0.1)
    with pytest.raises(ConfigError, match=r"and 4 of fixer.model's"):
        _step(fixer, mixed)
    fixer.close()


def test_an_optimizer_holding_only_some_tensors_keeps_their_fixed_values_and_a_later_group_is_checked():
    model = _net()
    fixer = Fixer(model, method="pwfn", config=CFG)
    fixer.fix_next()
    head = fixer.model[2]
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    values, fixed = fixer.view.values().clone(), fixer.view.fixed().clone()
    for _ in range(3):
        _step(fixer, opt)
    assert torch.equal(fixer.view.values()[fixed], values[fixed])
    assert not torch.equal(fixer.view.values()[~fixed], values[~fixed])  # the free head weights did train
    opt.add_param_group({"params": list(model[0].parameters())})  # the original's: refused at the next step
    with pytest.raises(ConfigError, match="copied"):
        _step(fixer, opt)
    fixer.close()


def test_the_step_hook_does_its_bookkeeping_once_per_optimizer(monkeypatch):
    fixer = Fixer(_net(), method="wfn", config=CFG)
    fixer.fix_next()
    opt = torch.optim.SGD(fixer.model.parameters(), lr=0.1)
    calls = []
    original = Fixer._check_optimizer
    monkeypatch.setattr(Fixer, "_check_optimizer", lambda self, o, ids: calls.append(1) or original(self, o, ids))
    for _ in range(5):
        _step(fixer, opt)
    assert calls == [1]
    fixer.close()


def test_huggingface_callback_refuses_a_fixer_that_is_not_the_trainers_model():
    pytest.importorskip("transformers")
    from pwfn.integrations.huggingface import FixingTrainerCallback

    model = _net()
    import types

    state, batches = types.SimpleNamespace(global_step=0), [None] * 4  # what on_train_begin reads of them
    copying = FixingTrainerCallback(Fixer(model, method="wfn", config=CFG))
    with pytest.raises(ConfigError, match="inplace=True"):
        copying.on_train_begin(None, state, None, model=model, train_dataloader=batches)
    assert copying.fixer.round == 0  # nothing was fixed
    copying.fixer.close()
    fixer = Fixer(model, method="wfn", config=CFG, inplace=True)
    FixingTrainerCallback(fixer).on_train_begin(None, state, None, model=model, train_dataloader=batches)
    assert fixer.round == 1
    fixer.close()

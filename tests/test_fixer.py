"""The Fixer object: fixing rounds inside a user's own training loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes
import pwfn
from pwfn.data import make_loaders
from pwfn.errors import CheckpointError, ConfigError, ModelError
from pwfn.training.fixer import Fixer


@pytest.fixture(scope="module")
def loaders():
    return make_loaders("digits", batch_size=64, seed=0, train_subset=256)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


# the Fixer's mechanics (tests/test_contract.py checks the accuracy contract, which these runs turn off)
CFG = {"pwfn": {"fractions": [0.5, 0.8, 1.0]}, "wfn": {"fractions": [0.5, 0.8, 1.0]}, "contract": {"enforce": False}}


class SignSGD(torch.optim.Optimizer):
    """A user's own optimizer: steps by the gradient's sign, with decoupled weight decay."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    "own": lambda ps: SignSGD(ps, lr=1e-2),
}


def my_train(model, loader, optimizer, extra, steps=3, clip=None):
    model.train()
    batches = loader if isinstance(loader, list) else [b for _, b in zip(range(steps), loader)]
    for x, y in batches:
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss = loss + extra(loss)
        optimizer.zero_grad()
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_own_loop_keeps_fixed_values_bit_exact_under_any_optimizer(method, opt, loaders):
    fixer = Fixer(_model(), method=method, config=CFG)
    optimizer = OPTIMIZERS[opt](fixer.model.parameters())  # created once, before any round
    snapshots = []
    for rnd in fixer.rounds():
        values, fixed = fixer.view.values().clone(), fixer.view.fixed().clone()
        sig = fixer.view.sigmas().clone() if method == "pwfn" else None
        if rnd.trains:
            my_train(fixer.model, loaders.train, optimizer, fixer.loss_term, clip=0.5)
        after = fixer.view.values()
        assert torch.equal(after[fixed], values[fixed]), "fixed values moved during the user's training"
        assert not torch.equal(after[~fixed], values[~fixed]) or not rnd.trains, "free weights must train"
        if sig is not None:
            assert torch.equal(fixer.view.sigmas()[fixed], sig[fixed]), "fixed sigmas moved"
        snapshots.append((values, fixed))
        fixer.record(after_train={"steps": 3})
    final = fixer.view.values()
    for values, fixed in snapshots:
        assert torch.equal(final[fixed], values[fixed])
    point = fixer.finalize()
    assert type(point[1]) is nn.Linear and not bayes.is_bayesian(point)
    codebook = torch.tensor(fixer.history[-1]["codebook"], dtype=torch.float64)
    for name in fixer.report()["quantised_tensors"]:
        assert torch.isin(point.get_parameter(name).double(), codebook).all()
    assert len(fixer.history) == 3 and fixer.history[0]["after_train"] == {"steps": 3}
    # hooks are gone: the optimizer moves everything again
    w = point[1].weight
    w.grad = torch.ones_like(w)
    torch.optim.SGD([w], lr=1.0).step()
    assert not torch.equal(w.detach(), fixer.view.slots[0].value.detach()) or method == "wfn"


def test_gradient_clipping_sees_the_fixed_entries_zeroed(loaders):
    fixer = Fixer(_model(), method="wfn", config=CFG)
    fixer.fix_next()
    x, y = next(iter(loaders.train))
    fixer.model.train()
    loss = F.cross_entropy(fixer.model(x), y)
    loss.backward()
    for slot in fixer.view.slots:
        assert torch.all(slot.value.grad[fixer.view.masks()[slot.name]] == 0)
    fixer.close()


def test_state_dict_resumes_to_the_same_weights(loaders, tmp_path):
    batches = [b for _, b in zip(range(3), loaders.train)]  # fixed batches: the loader's own state is not ours
    def run(stop_after=None, state=None):
        torch.manual_seed(5)
        fixer = Fixer(_model(), method="pwfn", config=CFG)
        opt = torch.optim.AdamW(fixer.model.parameters(), lr=1e-2)
        if state is not None:
            fixer.load_state_dict(state["fixer"])
            opt.load_state_dict(state["opt"])
            torch.set_rng_state(state["rng"])
        for rnd in fixer.rounds():
            if rnd.trains:
                my_train(fixer.model, batches, opt, fixer.loss_term)
            if stop_after is not None and rnd.index == stop_after:
                path = tmp_path / "state.pt"
                torch.save({"fixer": fixer.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, path)
                return torch.load(path, weights_only=True)
        return fixer.finalize().state_dict()

    full = run()
    resumed = run(state=run(stop_after=0))
    assert list(full) == list(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


def test_state_of_another_method_or_setting_is_refused():
    a = Fixer(_model(), method="pwfn", config=CFG)
    a.fix_next()
    state = a.state_dict()
    with pytest.raises(CheckpointError, match="'pwfn' state; this Fixer runs 'wfn'"):
        Fixer(_model(), method="wfn", config=CFG).load_state_dict(state)
    with pytest.raises(CheckpointError, match="other fixing settings.*pwfn.k"):
        Fixer(_model(), method="pwfn", config={**CFG, "pwfn": {**CFG["pwfn"], "k": 3.0}}).load_state_dict(state)


def test_finalize_before_the_last_round_and_rounds_after_it_are_errors():
    fixer = Fixer(_model(), method="wfn", config=CFG)
    fixer.fix_next()
    with pytest.raises(ModelError, match="not fixed yet"):
        fixer.finalize()
    while not fixer.done:
        fixer.fix_next()
    with pytest.raises(ConfigError, match="all 3 rounds are done"):
        fixer.fix_next()
    fixer.finalize()


def test_wfn_loss_term_needs_the_task_loss():
    fixer = Fixer(_model(), method="wfn", config=CFG)
    assert float(fixer.loss_term()) == 0.0  # nothing fixed yet: no centres to attract to
    fixer.fix_next()
    with pytest.raises(ConfigError, match="pass|task loss"):
        fixer.loss_term()
    assert fixer.loss_term(torch.tensor(2.0)).item() > 0


def test_batchnorm_policy_frozen_keeps_statistics(loaders):
    fixer = Fixer(_model(), method="wfn", config={**CFG, "batchnorm": "frozen"})
    bn = fixer.model[2]
    before = bn.running_mean.clone()
    fixer.train()
    assert fixer.model.training and not bn.training
    fixer.model(next(iter(loaders.train))[0])
    assert torch.equal(bn.running_mean, before)
    fixer.close()
    with pytest.raises(ConfigError, match="batchnorm"):
        Fixer(_model(), method="wfn", config={"batchnorm": "sometimes"})


def test_inplace_keeps_the_users_module_object():
    model = _model()
    holder = nn.ModuleDict({"net": model})
    fixer = Fixer(model, method="pwfn", config=CFG, inplace=True)
    assert fixer.model is model and holder["net"] is model and bayes.is_bayesian(holder)
    fixer.close()


def test_fixer_is_public():
    assert pwfn.Fixer is Fixer
    with pytest.raises(ConfigError, match="unknown method"):
        Fixer(_model(), method="kmeans")



@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_compress_and_a_hand_written_fixer_loop_give_bit_identical_weights(method, loaders):
    """compress() runs its rounds on the Fixer: the same loop written by hand gives the same bits."""
    from pwfn.training.fixer import resolve_config
    from pwfn.training.train import (
        EpochCounter,
        evaluate,
        seed_everything,
        train_epochs,
    )

    cfg = {"progress": False, "seed": 3, "pwfn": {"fractions": [0.5, 0.8, 1.0], "round_epochs": 0.5,
                                                  "first_round_epochs": 0.25, "mc_samples": 1},
           "wfn": {"fractions": [0.5, 0.8, 1.0], "round_epochs": 0.5}, "contract": {"max_drop": 1.0}}
    res = pwfn.compress(_model(), loaders.train, loaders.val, method=method, config=cfg)
    assert res.report["contract"]["held"] is True
    ref = res.point_model.state_dict()

    model = _model()
    seed_everything(3)  # what compress does with config seed 3
    fixer = Fixer(model, method=method, config=resolve_config(cfg))
    # the contract's guard data as compress picks it (validation, topped up with training examples)
    fixer.set_evaluation(loaders.val, top_up=loaders.train)
    s = fixer.method_impl
    opt = s.optimizer(fixer.model, fixer.view, None)
    counter = EpochCounter()
    kw = dict(counter=counter, extra_loss=lambda m, ce: fixer.loss_term(ce), grad_clip=s.grad_clip(), progress=False,
              clip_parameters=fixer.clip_parameters())
    steps = len(loaders.train)  # PWFN's regulariser is scaled to each phase's steps (pwfn.sigma_steps_reference)

    def check():  # the built-in loop evaluates at these points (iterating a DataLoader draws its base seed)
        with fixer.evaluating():
            return evaluate(fixer.model, loaders.val, torch.device("cpu"))

    check()
    if fixer.warmup_epochs:
        fixer.set_training_steps(math.ceil(fixer.warmup_epochs * steps))
        train_epochs(fixer.model, loaders.train, opt, fixer.warmup_epochs, torch.device("cpu"), **kw)
        check()
    while not fixer.done:
        rnd = fixer.fix_next()
        check()
        if rnd.trains:
            opt = s.optimizer(fixer.model, fixer.view, opt)
            fixer.set_training_steps(math.ceil(fixer.round_epochs * steps))
            train_epochs(fixer.model, loaders.train, opt, fixer.round_epochs, torch.device("cpu"), **kw)
            check()
        fixer.settle()  # compress judges the training right after it
    mine = fixer.finalize().state_dict()
    assert list(mine) == list(ref) and all(torch.equal(mine[k], ref[k]) for k in ref)

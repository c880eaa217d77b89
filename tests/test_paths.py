"""One result on every path: compress(), an own loop on the Fixer as docs/howto/own-loop.md writes it, the
Lightning callback and the Hugging Face callback take the same contract and evaluation, learn the steps per
round from the loop or trainer, and end with the same number of values within the seed spread of compress
(their batch order and evaluation points differ, so their bits cannot be the same)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pwfn
from pwfn.data import make_loaders

CFG = {"progress": False, "pwfn": {"fractions": [0.5, 0.8, 0.95, 1.0], "round_epochs": 1.0,
                                   "first_round_epochs": 0.2, "mc_samples": 1}}


class _Loaders:
    """Plain DataLoaders over the digits splits (Lightning and the Trainer take nothing else)."""

    def __init__(self):
        src = make_loaders("digits", batch_size=64, seed=0, train_subset=640)

        def plain(loader, shuffle):
            batches = list(loader)  # one pass: a shuffling loader orders each pass differently
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            return DataLoader(TensorDataset(x, y), batch_size=64 if shuffle else 256, shuffle=shuffle,
                              generator=torch.Generator().manual_seed(0) if shuffle else None)

        self.train, self.val = plain(src.train, True), plain(src.val, False)


@pytest.fixture(scope="module")
def setup():
    loaders = _Loaders()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(25):
        for xb, yb in loaders.train:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    spread = []
    for seed in (0, 1, 2):
        loaders.train.generator.manual_seed(seed)
        res = pwfn.compress(model, loaders.train, loaders.val, config={**CFG, "seed": seed})
        assert res.report["contract"]["held"] is True
        spread.append(res.report["final"]["unique"])
    return model, loaders, spread


def _within(unique: int, spread: list[int]) -> bool:
    lo, hi = min(spread), max(spread)
    slack = max(3, (hi - lo) // 2, round(0.2 * sum(spread) / len(spread)))  # the seeds' spread, widened a little
    return lo - slack <= unique <= hi + slack


def test_compress_keeps_the_contract_and_learns_nothing_it_was_not_told(setup):
    _, _, spread = setup
    assert all(u >= 2 for u in spread)


def test_an_own_loop_as_documented(setup):
    """The how-to's loop: Fixer with evaluate= and steps_per_round=, the method's optimizer, the loss term."""
    model, loaders, spread = setup
    torch.manual_seed(0)
    fixer = pwfn.Fixer(model, "pwfn", config=CFG, evaluate=loaders.val, top_up=loaders.train,
                       steps_per_round=len(loaders.train))
    optimizer = fixer.optimizer()
    for rnd in fixer.rounds():
        if not rnd.trains:
            break
        fixer.train()
        for x, y in loaders.train:
            loss = F.cross_entropy(fixer.model(x), y)
            loss = loss + fixer.loss_term(loss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fixer.clip_parameters() or fixer.model.parameters(), fixer.grad_clip)
            optimizer.step()
    report = fixer.report()
    assert report["contract"]["held"] is True
    assert _within(report["final"]["unique"], spread), (report["final"]["unique"], spread)


def test_an_own_loop_without_steps_per_round_learns_them(setup):
    model, loaders, _ = setup
    fixer = pwfn.Fixer(model, "pwfn", config=CFG, evaluate=loaders.val, top_up=loaders.train)
    optimizer = fixer.optimizer()
    phases = []
    for rnd in fixer.rounds():
        phases.append(fixer.method_impl.phase_steps)
        if not rnd.trains:
            break
        for x, y in loaders.train:
            loss = F.cross_entropy(fixer.model(x), y)
            optimizer.zero_grad()
            (loss + fixer.loss_term(loss)).backward()
            optimizer.step()
    # unknown before the first training phase, then the loop's own count (len(train) steps a round)
    assert phases[0] is None and all(p == len(loaders.train) for p in phases[1:]), phases


def test_lightning_callback(setup, tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from pwfn.integrations.lightning import FixingCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model, loaders, spread = setup
    fixer = pwfn.Fixer(model, "pwfn", config=CFG, inplace=False)
    net = fixer.model

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return fixer.optimizer()

    cb = FixingCallback(fixer)  # the method's schedule; the trainer's validation loader judges the contract
    trainer = L.Trainer(max_epochs=cb.epochs_needed() + 2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[cb],
                        num_sanity_val_steps=0)
    trainer.fit(Module(), loaders.train, loaders.val)
    report = fixer.report()
    assert fixer.done and report["contract"]["held"] is True
    assert fixer.method_impl.phase_steps == len(loaders.train)  # one epoch a round, learned from the trainer
    assert _within(report["final"]["unique"], spread), (report["final"]["unique"], spread)


class _DictSet(Dataset):
    def __init__(self, loader):
        batches = list(loader)  # one pass (a shuffling loader orders each pass differently)
        self.x = torch.cat([x for x, _ in batches])
        self.y = torch.cat([y for _, y in batches])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _Wrapped(nn.Module):
    """The Trainer hands dict batches to forward as keywords."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        return self.net(x)


def test_huggingface_callback(setup, tmp_path):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from pwfn.integrations.huggingface import FixingTrainerCallback, fixing_loss

    tr.logging.set_verbosity_error()
    model, loaders, spread = setup
    import copy

    wrapped = _Wrapped(copy.deepcopy(model))
    fixer = pwfn.Fixer(wrapped, "pwfn", config=CFG, inplace=True,
                       evaluate=DataLoader(_DictSet(loaders.val), batch_size=256))
    cb = FixingTrainerCallback(fixer)
    optimizer = fixer.optimizer()
    args = tr.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=cb.epochs_needed() + 2,
                                per_device_train_batch_size=64, max_grad_norm=0, report_to=[],
                                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = tr.Trainer(model=wrapped, args=args, train_dataset=_DictSet(loaders.train), callbacks=[cb],
                         compute_loss_func=fixing_loss(fixer),
                         optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)))
    trainer.train()
    report = fixer.report()
    assert fixer.done and report["contract"]["held"] is True
    assert _within(report["final"]["unique"], spread), (report["final"]["unique"], spread)


def test_the_callbacks_clip_as_compress_does_and_say_when_the_trainer_clips_too(caplog):
    """The trainers' own clipping takes every parameter, PWFN's sigmas included; the callbacks' schedule clips
    the method's parameters only (sigma left out), as compress and the own-loop how-to do."""
    import bayes
    from pwfn.integrations._schedule import RoundSchedule

    torch.manual_seed(0)
    fixer = pwfn.Fixer(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), "pwfn", config=CFG,
                       contract=False)
    schedule = RoundSchedule(fixer)
    sigmas = {id(p) for p in bayes.sigma_parameters(fixer.model)}
    assert sigmas and fixer.grad_clip
    for p in fixer.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    schedule.clip()
    others = [p.grad for p in fixer.model.parameters() if id(p) not in sigmas]
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in others]))) \
        == pytest.approx(fixer.grad_clip, rel=1e-4)
    assert all(torch.equal(p.grad, torch.full_like(p, 10.0)) for p in fixer.model.parameters() if id(p) in sigmas)
    with caplog.at_level(logging.WARNING, logger="pwfn"):
        schedule.check_trainer_clipping(1.0, "max_grad_norm")
    assert "max_grad_norm=0" in caplog.text and "sigmas included" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pwfn"):
        schedule.check_trainer_clipping(0, "max_grad_norm")
        schedule.check_trainer_clipping(None, "gradient_clip_val")
    assert caplog.text == ""
    with pytest.raises(pwfn.errors.ConfigError, match="clip_gradients"):
        RoundSchedule(fixer, clip_gradients="yes")

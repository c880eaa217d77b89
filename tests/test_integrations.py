"""Fixing rounds inside PyTorch Lightning and the Hugging Face Trainer (tiny models, CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_tasks_e2e import _Dicts
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pwfn.training.fixer import Fixer

# the callbacks' mechanics on tiny, barely trained models: a contract wide enough for them (tests/test_paths.py
# checks the default contract and the same result as compress on a trained model)
CFG = {"pwfn": {"fractions": [0.5, 0.8, 1.0]}, "wfn": {"fractions": [0.5, 0.8, 1.0]}, "contract": {"max_drop": 40.0}}


def _check_fixed_history(fixer, snapshots):
    final = fixer.view.values()
    for values, fixed in snapshots:
        assert torch.equal(final[fixed], values[fixed]), "a fixed value moved inside the trainer"


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_lightning_callback_runs_every_round(method, tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from pwfn.integrations.lightning import FixingCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, _):
            xb, yb = batch
            loss = F.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, _):
            xb, yb = batch
            self.log("val_acc", (self.net(xb).argmax(1) == yb).float().mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.3)

    module = Module()
    fixer = Fixer(module.net, method=method, config=CFG, inplace=True)
    snapshots = []

    class Capture(FixingCallback):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            snapshots.append((self.fixer.view.values().clone(), self.fixer.view.fixed().clone()))

    cb = Capture(fixer, epochs_per_round=1, warmup_epochs=0)  # the contract judged on the trainer's validation loader
    assert cb.epochs_needed() == 2
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(module, loader, loader)
    assert fixer.done and trainer.current_epoch == 2, (fixer.round, trainer.current_epoch, len(snapshots))
    assert len(snapshots) == 2
    _check_fixed_history(fixer, snapshots)
    assert "train_loss" in fixer.history[0]["after_train"]
    point = fixer.finalize()
    codebook = torch.tensor(fixer.history[-1]["codebook"], dtype=torch.float64)
    assert all(torch.isin(p.detach().double(), codebook).all() for p in point.parameters())
    # the callback's state goes into Lightning checkpoints and comes back
    state = cb.state_dict()
    other = Fixer(Module().net, method=method, config=CFG, inplace=True)
    FixingCallback(other).load_state_dict(state)
    assert other.round == 3 and torch.equal(other.view.fixed(), fixer.view.fixed())
    assert other.reference == fixer.reference and fixer.report()["contract"]["held"]


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_huggingface_trainer_callback_runs_every_round(method, tmp_path):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from pwfn.integrations.huggingface import FixingTrainerCallback, fixing_loss

    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2))
    fixer = Fixer(model, method=method, config=CFG, inplace=True)
    cb = FixingTrainerCallback(fixer, epochs_per_round=1, warmup_epochs=0,
                               evaluate=DataLoader(_Dicts(n=64, vocab=20), batch_size=32))
    args = tr.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=cb.epochs_needed() + 2,
                                per_device_train_batch_size=16, learning_rate=1e-3, weight_decay=0.1,
                                report_to=[], save_strategy="no", logging_strategy="epoch", use_cpu=True,
                                disable_tqdm=True)
    snapshots = []

    class Capture(tr.TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            snapshots.append((fixer.view.values().clone(), fixer.view.fixed().clone()))

    trainer = tr.Trainer(model=model, args=args, train_dataset=_Dicts(n=64, vocab=20), callbacks=[cb, Capture()],
                         compute_loss_func=fixing_loss(fixer))
    trainer.train()
    assert fixer.done and len(snapshots) == 2, "training stops once every weight is fixed"
    _check_fixed_history(fixer, snapshots)
    point = fixer.finalize()
    codebook = torch.tensor(fixer.history[-1]["codebook"], dtype=torch.float64)
    for name in fixer.report()["quantised_tensors"]:
        assert torch.isin(point.get_parameter(name).detach().double(), codebook).all()
    assert fixer.report()["coverage"]["share"] < 1.0 if method == "pwfn" else True  # LayerNorms stay float
    assert fixer.report()["contract"]["held"]


def test_callbacks_need_an_evaluation_and_take_only_epoch_counts(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from pwfn.errors import ConfigError
    from pwfn.integrations._schedule import RoundSchedule

    fixer = Fixer(nn.Linear(4, 2), method="pwfn", config=CFG)
    for bad in ("2", True, -1, float("nan")):
        with pytest.raises(ConfigError, match="epochs_per_round"):
            RoundSchedule(fixer, epochs_per_round=bad)
    schedule = RoundSchedule(fixer)  # the method's own: 0.05 epochs of warm-up, 3 between rounds
    assert (schedule.warmup_epochs, schedule.epochs_per_round) == (fixer.warmup_epochs, fixer.round_epochs)
    with pytest.raises(ConfigError, match="has no evaluation"):
        schedule.begin(10, 0)

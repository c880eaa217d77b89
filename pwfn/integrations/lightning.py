"""PyTorch Lightning: fixing rounds as a ``Callback`` (extra ``lightning``).

::

    fixer = pwfn.Fixer(module.net, method="pwfn", inplace=True)   # the network inside your LightningModule
    cb = FixingCallback(fixer)                                    # validation data: the trainer's
    L.Trainer(max_epochs=cb.epochs_needed(), callbacks=[cb]).fit(module, train_loader, val_loader)
    point = fixer.finalize()

The rounds follow the method's own schedule (``fixer.warmup_epochs``, then one round every
``fixer.round_epochs`` epochs, counted in the trainer's optimizer steps as ``pwfn.compress`` counts
them), so the callback trains as much as ``compress``; ``epochs_per_round`` / ``warmup_epochs`` change
it. The accuracy contract judges every round on ``evaluate=`` (a DataLoader or a callable), else on the
Fixer's own evaluation, else on the trainer's validation loader; the float model is measured when
training starts. The method's loss term is added for you (its gradient is accumulated just before
Lightning's backward pass), validation runs PWFN in mean mode, the BatchNorm policy is applied at
every training epoch, gradients are clipped as ``compress`` clips them (leave the trainer's
``gradient_clip_val`` unset: it would clip PWFN's sigmas too), and the fixing state (masks, rounds, contract) is saved in Lightning checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the extra
    from ..common.hints import install_hint

    raise ImportError(f"pwfn.integrations.lightning needs PyTorch Lightning: {install_hint('lightning')}") from exc

from ..errors import ConfigError
from ..training.contract import ContractSpec
from ..training.fixer import Evaluation, Fixer
from ._schedule import RoundSchedule


class FixingCallback(pl.Callback):
    """Runs a :class:`pwfn.Fixer`'s rounds inside ``Trainer.fit`` (see the module docstring)."""

    def __init__(self, fixer: Fixer, epochs_per_round: Optional[float] = None, warmup_epochs: Optional[float] = None,
                 add_loss_term: bool = True, evaluate: Optional[Evaluation] = None,
                 contract: ContractSpec = None, clip_gradients: bool = True) -> None:
        if not isinstance(add_loss_term, bool):
            raise ConfigError(f"add_loss_term must be True or False, got {add_loss_term!r}")
        self.schedule = RoundSchedule(fixer, epochs_per_round, warmup_epochs, evaluate, contract, clip_gradients)
        self.fixer = fixer
        self.add_loss_term = add_loss_term

    def epochs_needed(self) -> int:
        return self.schedule.epochs_needed()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not any(m is self.fixer.model for m in pl_module.modules()):
            raise ConfigError("the LightningModule does not hold the Fixer's model: create the Fixer with "
                              "inplace=True on the module's own network (or put fixer.model into the module)")
        self.schedule.check_trainer_clipping(getattr(trainer, "gradient_clip_val", None), "gradient_clip_val")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        val = trainer.val_dataloaders
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        batches = trainer.num_training_batches
        accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        try:
            steps = -(-int(batches) // accumulate)
        except (TypeError, ValueError, OverflowError):  # an iterable without a length: inf batches
            steps = None
        train = getattr(trainer, "train_dataloader", None)
        self.schedule.begin(steps, int(trainer.global_step), fallback=val,
                            train_loader=train if hasattr(train, "dataset") else None)
        if self.fixer.done:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.train_mode()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.add_loss_term and not self.fixer.done:
            term = self.fixer.loss_term(loss.detach())
            if term.requires_grad:
                term.backward()  # its gradient adds to the task loss's (same as backward of the sum)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.schedule.clip()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule.step_end(int(trainer.global_step)):
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        self.schedule.epoch_end(metrics)
        if self.fixer.done:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.end()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.eval_begin()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.eval_end()

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)

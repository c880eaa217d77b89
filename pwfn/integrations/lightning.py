"""PyTorch Lightning: fixing rounds as a ``Callback`` (extra ``lightning``).

::

    fixer = pwfn.Fixer(model, method="pwfn", config=cfg, inplace=True)   # model lives in your LightningModule
    cb = FixingCallback(fixer, epochs_per_round=1)
    L.Trainer(max_epochs=cb.epochs_needed(), callbacks=[cb]).fit(module, train_loader, val_loader)
    point = fixer.finalize()

The method's loss term is added for you (its gradient is accumulated just before Lightning's
backward pass), validation runs PWFN in mean mode, the BatchNorm policy is applied at every
training epoch, and the fixing state (masks, rounds, history) is saved in Lightning checkpoints.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the extra
    from ..hints import install_hint

    raise ImportError(f"pwfn.integrations.lightning needs PyTorch Lightning: {install_hint('lightning')}") from exc

from ..errors import ConfigError
from ..fixer import Fixer
from ._schedule import RoundSchedule


class FixingCallback(pl.Callback):
    """Runs a :class:`pwfn.Fixer`'s rounds inside ``Trainer.fit`` (see the module docstring)."""

    def __init__(self, fixer: Fixer, epochs_per_round: int = 1, warmup_epochs: int = 0, add_loss_term: bool = True) -> None:
        self.schedule = RoundSchedule(fixer, epochs_per_round, warmup_epochs)
        if not isinstance(add_loss_term, bool):
            raise ConfigError(f"add_loss_term must be True or False, got {add_loss_term!r}")
        self.fixer = fixer
        self.add_loss_term = add_loss_term

    def epochs_needed(self) -> int:
        return self.schedule.epochs_needed()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not any(m is self.fixer.model for m in pl_module.modules()):
            raise ConfigError("the LightningModule does not hold the Fixer's model: create the Fixer with "
                              "inplace=True on the module's own network (or put fixer.model into the module)")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.start()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.train_mode()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.add_loss_term and not self.fixer.done:
            term = self.fixer.loss_term(loss.detach())
            if term.requires_grad:
                term.backward()  # its gradient adds to the task loss's (same as backward of the sum)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        if self.schedule.epoch_end(metrics):
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

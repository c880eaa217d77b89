"""Hugging Face ``Trainer``: fixing rounds as a ``TrainerCallback`` (extra ``hf``).

::

    fixer = pwfn.Fixer(model, method="pwfn", inplace=True, evaluate=eval_loader)   # a DataLoader of the eval set
    cb = FixingTrainerCallback(fixer)
    trainer = Trainer(model=model, args=TrainingArguments(num_train_epochs=cb.epochs_needed(), max_grad_norm=0, ...),
                      train_dataset=..., callbacks=[cb], compute_loss_func=fixing_loss(fixer))
    trainer.train()
    point = fixer.finalize()

The rounds follow the method's own schedule (``fixer.warmup_epochs``, then one round every
``fixer.round_epochs`` epochs, counted in the Trainer's optimizer steps as ``pwfn.compress`` counts
them); ``epochs_per_round`` / ``warmup_epochs`` change it. The accuracy contract judges every round on
``evaluate=`` of the callback or the Fixer (a DataLoader, e.g. ``trainer.get_eval_dataloader()``, or a
callable); the float model is measured when training starts. ``fixing_loss`` adds the method's loss term
to the model's own loss (``outputs.loss``) or, when the model computes none, to the task's loss on
``outputs.logits`` and the labels. The Fixer must work on the Trainer's model (``inplace=True``). The callback clips gradients as
``compress`` does (PWFN leaves sigma out): turn the Trainer's own clipping off (``max_grad_norm=0``; its
default, 1.0, clips every parameter).
"""

from __future__ import annotations

from typing import Any, Optional

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the extra
    from ..common.hints import install_hint

    raise ImportError(f"pwfn.integrations.huggingface needs transformers: {install_hint('hf')}") from exc

from ..errors import ConfigError
from ..training.contract import ContractSpec
from ..training.fixer import Evaluation, Fixer
from ..training.tasks import Task, resolve_task
from ._schedule import RoundSchedule


class FixingTrainerCallback(TrainerCallback):
    """Runs a :class:`pwfn.Fixer`'s rounds inside ``Trainer.train`` (see the module docstring)."""

    def __init__(self, fixer: Fixer, epochs_per_round: Optional[float] = None, warmup_epochs: Optional[float] = None,
                 evaluate: Optional[Evaluation] = None, contract: ContractSpec = None,
                 clip_gradients: bool = True) -> None:
        self.schedule = RoundSchedule(fixer, epochs_per_round, warmup_epochs, evaluate, contract, clip_gradients)
        self.fixer = fixer

    def epochs_needed(self) -> int:
        return self.schedule.epochs_needed()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None,
                       **kwargs):
        if model is not None and not any(m is self.fixer.model for m in model.modules()):
            raise ConfigError("the Trainer's model does not hold the Fixer's model, so training would not reach the "
                              "weights being fixed: create the Fixer with inplace=True on the model you give the "
                              "Trainer (or give the Trainer fixer.model)")
        self.schedule.check_trainer_clipping(getattr(args, "max_grad_norm", None), "max_grad_norm")
        accumulate = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
        try:
            steps = -(-len(train_dataloader) // accumulate)
        except TypeError:
            steps = None
        self.schedule.begin(steps, int(state.global_step), fallback=eval_dataloader, train_loader=train_dataloader)
        if self.fixer.done:
            control.should_training_stop = True
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.schedule.train_mode()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.schedule.clip()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule.step_end(int(state.global_step)):
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        logs = {k: v for k, v in (state.log_history[-1] if state.log_history else {}).items()
                if isinstance(v, (int, float))}
        self.schedule.epoch_end(logs)
        if self.fixer.done:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.end()


def fixing_loss(fixer: Fixer, task: Optional[Any] = None):
    """A ``compute_loss_func`` for ``Trainer``: the model's (or the task's) loss plus the method's term."""
    task_obj: Task = resolve_task(task) if task is not None else fixer.task
    adapter = fixer.adapter

    def compute_loss(outputs, labels, num_items_in_batch=None):
        base = getattr(outputs, "loss", None)
        if base is None and isinstance(outputs, dict):
            base = outputs.get("loss")
        if base is None:
            base = task_obj.loss(adapter.unwrap(outputs), labels)
        return base + (fixer.loss_term(base) if not fixer.done else 0.0)

    return compute_loss

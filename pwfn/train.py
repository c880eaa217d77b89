"""Training and evaluation loops shared by the float baseline, PWFN and WFN.

The loops know nothing about fixing beyond two hooks: an extra loss term, and a
:class:`~pwfn.plumbing.FixedGuard` that keeps fixed entries bit-exact through each step.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import TrainingDivergedError
from .plumbing import FixedGuard

log = logging.getLogger(__name__)

ExtraLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device {spec!r} was requested but CUDA is not available; use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a run consumes, for exact resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Reseed a loader's shuffling for ``epoch`` (our loaders and DistributedSampler support it)."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


@dataclass
class EpochCounter:
    """How many passes over the training data a run has started (reseeds shuffling on resume)."""

    value: int = 0


def _check_finite(loss: torch.Tensor, model: nn.Module, where: str) -> None:
    if torch.isfinite(loss):
        return
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    detail = f" Non-finite parameters: {', '.join(bad[:5])}." if bad else ""
    raise TrainingDivergedError(
        f"{where}: the loss became {float(loss)}.{detail} Lower the learning rate"
        " (e.g. --set pwfn.lr=...) or raise the sigma floor (pwfn.sigma_floor)."
    )


def train_epochs(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    epochs: float,
    device: torch.device,
    *,
    counter: EpochCounter,
    extra_loss: Optional[ExtraLoss] = None,
    guard: Optional[FixedGuard] = None,
    grad_clip: Optional[float] = None,
    scheduler: Optional[Any] = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train for ``epochs`` passes (fractions allowed: 0.05 = the first 5 % of one pass).

    Returns mean loss and accuracy over the steps taken.
    """
    if epochs <= 0:
        return {"loss": float("nan"), "acc": float("nan"), "steps": 0}
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total_steps = math.ceil(epochs * per_epoch) if per_epoch else None
    if total_steps is not None:
        total_steps = max(total_steps, 1)
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    steps = 0
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        while total_steps is None or steps < total_steps:
            _set_epoch(loader, counter.value)
            counter.value += 1
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = model(x)
                ce = F.cross_entropy(logits, y)
                loss = ce + extra_loss(model, ce) if extra_loss is not None else ce
                _check_finite(loss, model, desc)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if guard is not None:
                    guard.before_step()
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                if guard is not None:
                    guard.after_step()
                if scheduler is not None:
                    scheduler.step()
                steps += 1
                with torch.no_grad():
                    loss_sum += float(loss.detach()) * y.numel()
                    correct += int((logits.argmax(1) == y).sum())
                    seen += y.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
                if total_steps is not None and steps >= total_steps:
                    break
            if total_steps is None:
                break
    finally:
        bar.close()
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "steps": steps}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a whole loader (eval mode)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1 (and top-5 when there are more than 5 classes) in percent, plus mean cross-entropy."""
    out = {"top1": 100.0 * float((logits.argmax(1) == labels).float().mean()),
           "loss": float(F.cross_entropy(logits, labels))}
    if logits.shape[1] > 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = 100.0 * float((top5 == labels[:, None]).any(1).float().mean())
    return out


def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    logits, labels = predict(model, loader, device)
    return accuracy_metrics(logits, labels)


@torch.no_grad()
def predict_mc(model: nn.Module, loader: Iterable, device: torch.device, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-averaged predictive probabilities of a Bayesian model (its layers in ``sample`` mode)."""
    import bayes

    was_training = model.training
    model.eval()
    probs_sum: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    with bayes.forward_mode(model, "sample"):
        for _ in range(samples):
            p, labels = predict(model, loader, device)
            p = p.softmax(1)
            probs_sum = p if probs_sum is None else probs_sum + p
    model.train(was_training)
    assert probs_sum is not None and labels is not None
    return probs_sum / samples, labels


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from .errors import ConfigError

    raise ConfigError(f"unknown optimizer {name!r}")

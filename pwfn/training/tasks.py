"""Tasks: how a batch feeds the model, what loss trains it and which metrics judge it.

Fixing is task-agnostic; the training between rounds and the evaluations are not. A
:class:`Task` bundles the loss ``(outputs, targets) -> scalar``, additive metric sums (so they
reduce across DDP ranks), the metrics computed from them, a check of the first batch, and
whether Monte-Carlo calibration means anything. A :class:`BatchAdapter` turns any batch —
``(x, y)`` tuples, Hugging Face dicts, nested structures — into model inputs and targets and
moves it to the device. Built in (by name, see :data:`TASKS`):

* ``classification`` — logits ``(N, C)`` and integer labels ``(N,)``: cross-entropy; top-1,
  top-5, loss; MC calibration (NLL, ECE);
* ``regression`` / ``regression_l1`` — outputs and float targets of one shape: MSE / L1; mse,
  mae, loss (lower is better);
* ``bce`` — multi-label or soft targets in [0, 1] against logits (``bce`` ) or probabilities
  (``bce_probs``, for a model that ends in a sigmoid): binary cross-entropy; loss, mae and
  accuracy at 0.5;
* ``language_model`` — per-token logits ``(N, T, V)`` and token ids ``(N, T)``, the next token
  predicted (``shift``), ``-100`` ignored: per-token cross-entropy; loss, perplexity, token
  accuracy.

Your own task: ``pwfn.CustomTask(loss=lambda outputs, targets: ..., metrics=...)``, or a
``Task`` subclass registered with :func:`register_task`.

Why one module of this length: it is one idea, what a task is. The task classes, their
registry and the evaluation that sums their metrics over batches share one protocol
(``loss``, ``metric_sums``, ``finish``); a user's own task is written against this one file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

Batch = Any


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """``batch`` with ``fn`` applied to every tensor, through dicts, lists, tuples and named tuples
    (container types kept); anything else is left as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(mapped)  # e.g. a Hugging Face BatchEncoding
        except Exception:  # a mapping type that cannot be rebuilt from a dict
            return mapped
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Batch, device: Union[str, torch.device], non_blocking: bool = False) -> Batch:
    """``batch`` with every tensor moved to ``device``, through dicts, lists, tuples and named tuples."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


@dataclass
class BatchAdapter:
    """Splits a batch into model inputs and targets, calls the model, unwraps its output.

    * a ``(inputs, targets, ...)`` tuple or list: ``model(inputs)``;
    * a mapping (Hugging Face style): ``model(**inputs)`` with every key but ``target_key``
      (``"labels"``, else ``"label"``) and the targets from that key;
    * ``output_key``: which part of a structured output is the prediction (default: ``logits``
      of a ``ModelOutput``, element 0 of a tuple, the tensor itself otherwise);
    * ``targets_are_batch``: the loss receives the whole batch as its targets
      (``loss(outputs, batch)``, e.g. to use an attention mask), for a :class:`CustomTask`.
    """

    target_key: Optional[str] = None
    output_key: Optional[Union[str, int]] = None
    targets_are_batch: bool = False

    def _target_key(self, batch: Mapping) -> Optional[str]:
        """The key of a dict batch that holds the targets: ``target_key``, else ``labels`` or ``label``."""
        return self.target_key or ("labels" if "labels" in batch else "label" if "label" in batch else None)

    def split(self, batch: Batch) -> tuple[Any, Any]:
        """(model inputs, targets) of a batch."""
        if self.targets_are_batch:
            if isinstance(batch, Mapping):
                key = self._target_key(batch)
                return {k: v for k, v in batch.items() if k != key}, batch
            if isinstance(batch, (list, tuple)) and batch:
                return batch[0], batch
            return batch, batch
        if isinstance(batch, Mapping):
            key = self._target_key(batch)
            if key is None or key not in batch:
                raise ConfigError(f"a dict batch needs its targets under {self.target_key or 'labels'!r}; it has "
                                  f"keys {sorted(batch)[:8]}. Set the batch adapter's target_key")
            return {k: v for k, v in batch.items() if k != key}, batch[key]
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise ConfigError(f"a batch must be (inputs, targets) or a dict with targets under 'labels', got "
                          f"{type(batch).__name__}")

    def call(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's predictions for ``inputs`` (keyword arguments for a dict)."""
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        return self.unwrap(out)

    def unwrap(self, out: Any) -> torch.Tensor:
        """The prediction tensor out of a model's output (tensor, ModelOutput, dict or tuple)."""
        key = self.output_key
        if key is not None:
            out = out[key] if isinstance(key, int) or isinstance(out, Mapping) else getattr(out, key)
        elif not isinstance(out, torch.Tensor):
            logits = getattr(out, "logits", None)
            if isinstance(logits, torch.Tensor):
                out = logits
            elif isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
                out = out["logits"]
            elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"the model's output is a {type(out).__name__}, not a tensor; set the batch adapter's "
                              "output_key to the field that holds the predictions")
        return out

    def size(self, targets: Any) -> int:
        """Number of examples in a batch (the first dimension of its first target tensor)."""
        if isinstance(targets, Mapping) and self.targets_are_batch:
            key = self._target_key(targets)
            if key is not None and isinstance(targets.get(key), torch.Tensor):
                targets = targets[key]
        t = _first_tensor(targets)
        return int(t.shape[0]) if t is not None and t.dim() else 1


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class MetricInfo:
    """What a metric's numbers mean: which way is better and on what scale.

    ``scale`` sets the accuracy contract's default tolerance (:mod:`pwfn.training.contract`): ``"percent"``
    (an accuracy in 0-100: a drop in points), ``"squared"`` (a mean squared error: relative, twice the
    share of an error's), ``"error"`` (a loss, an error, bits: relative) or ``"other"`` (unknown: relative).
    """

    higher_is_better: bool
    scale: str = "error"

    def __post_init__(self) -> None:
        _need(isinstance(self.higher_is_better, bool), "MetricInfo.higher_is_better must be True or False")
        _need(self.scale in METRIC_SCALES, f"MetricInfo.scale must be one of {METRIC_SCALES}, got {self.scale!r}")


METRIC_SCALES = ("percent", "squared", "error", "other")
_LOWER = MetricInfo(higher_is_better=False, scale="error")
_PERCENT = MetricInfo(higher_is_better=True, scale="percent")


class Task:
    """Base of a task; subclasses set the class attributes and implement the methods."""

    name: str = "task"
    #: the metric the accuracy contract judges by default, and tables and round summaries show first
    primary: str = "loss"
    higher_is_better: bool = False
    #: Monte-Carlo calibration (NLL, ECE) applies: class probabilities against integer labels
    calibrated: bool = False
    #: the metrics :meth:`finish` returns, with their direction and scale
    metrics: Mapping[str, MetricInfo] = {"loss": _LOWER}

    def metric_info(self, name: str) -> Optional[MetricInfo]:
        """Direction and scale of the metric ``name`` (None when this task does not know it)."""
        return self.metrics.get(name)

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The training loss: a scalar, the mean over the batch."""
        raise NotImplementedError

    def sums(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        """Additive sums over a batch (``count`` included); reduced across ranks, then :meth:`finish`."""
        n = float(_first_tensor(targets).shape[0]) if _first_tensor(targets) is not None else 1.0
        return {"loss": float(self.loss(outputs, targets)) * n, "count": n}

    def finish(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The metrics from the (reduced) sums of :meth:`sums`."""
        count = max(float(sums.get("count", 0.0)), 1.0)
        return {"loss": sums.get("loss", 0.0) / count}

    def validate(self, outputs: torch.Tensor, targets: Any, where: str) -> None:
        """Raise ``ConfigError`` naming the problem and the option to use when the batch cannot work."""
        loss = self.loss(outputs.float(), targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"the {self.name} loss on the {where}'s first batch is not a scalar tensor")

    def check_targets(self, outputs: torch.Tensor, targets: Any, where: str) -> None:
        """Raise ``DataError`` naming ``where`` (e.g. "the training data's batch 38 (...)") when a later batch's targets
        cannot fit the outputs (a label beyond the model's classes ...). The loops call it on every batch
        with targets still on the CPU (no device synchronisation), and on a loss that failed."""

    def describe(self) -> dict[str, Any]:
        """Name, primary metric and its direction, for reports."""
        return {"name": self.name, "primary": self.primary, "higher_is_better": self.higher_is_better}


def _label_range(targets: torch.Tensor, classes: int, where: str, what: str, outputs: str,
                 ignore: Optional[int] = None) -> None:
    """``DataError`` when integer ``targets`` (``ignore`` aside) fall outside ``[0, classes)``."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool or not targets.numel():
        return
    t = targets.detach()
    if ignore is not None:
        t = t[t != ignore]
        if not t.numel():
            return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= classes:
        raise DataError(f"{where}: its {what} range over [{lo}, {hi}], but the model outputs {classes} {outputs}, so "
                        f"every one must be in [0, {classes - 1}]"
                        + (f" (or {ignore}, ignored)" if ignore is not None else "")
                        + ". Check the dataset's labels (an unmapped class, a label off by one) and the model's "
                          "number of classes")


class ClassificationTask(Task):
    name = "classification"
    primary = "top1"
    higher_is_better = True
    calibrated = True
    metrics = {"top1": _PERCENT, "top5": _PERCENT, "loss": _LOWER}

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs.float(), targets)

    def sums(self, outputs, targets):
        n = targets.numel()
        out = {"count": float(n), "correct": float((outputs.argmax(1) == targets).sum()),
               "loss": float(F.cross_entropy(outputs.float(), targets, reduction="sum")) if n else 0.0}
        if outputs.shape[1] > 5:
            out["correct5"] = float((outputs.topk(5, dim=1).indices == targets[:, None]).any(1).sum())
        return out

    def finish(self, sums):
        count = max(sums.get("count", 0.0), 1.0)
        out = {"top1": 100.0 * sums.get("correct", 0.0) / count, "loss": sums.get("loss", 0.0) / count}
        if "correct5" in sums:
            out["top5"] = 100.0 * sums["correct5"] / count
        return out

    def validate(self, outputs, targets, where):
        _need(isinstance(targets, torch.Tensor), f"the {where}'s targets are a {type(targets).__name__}, not a tensor")
        _need(outputs.dim() == 2, f"classification needs (batch, classes) logits, but the model's output on the "
                                  f"{where}'s batch has shape {tuple(outputs.shape)}. For per-token outputs use "
                                  "task=language_model; for other outputs task=regression or your own loss")
        if targets.is_floating_point():
            raise ConfigError(
                f"the {where}'s targets are floating point (shape {tuple(targets.shape)}): classification needs "
                "integer class labels. For probability or multi-label targets use task=bce (task=bce_probs when "
                "the model ends in a sigmoid); for real-valued targets task=regression")
        _need(targets.dim() == 1 and targets.shape[0] == outputs.shape[0],
              f"classification needs one label per example: labels of shape {tuple(targets.shape)} for outputs of "
              f"shape {tuple(outputs.shape)}")
        if targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            _need(lo >= 0 and hi < outputs.shape[1],
                  f"the {where}'s labels range over [{lo}, {hi}] but the model outputs {outputs.shape[1]} classes: "
                  "the model's settings do not fit the data (check its number of classes)")

    def check_targets(self, outputs, targets, where):
        if isinstance(targets, torch.Tensor) and outputs.dim() == 2:
            _label_range(targets, int(outputs.shape[1]), where, "labels", "classes")


class RegressionTask(Task):
    primary = "mse"

    def __init__(self, kind: str = "mse") -> None:
        _need(kind in ("mse", "l1"), f"regression loss must be mse or l1, got {kind!r}")
        self.kind = kind
        self.name = "regression" if kind == "mse" else "regression_l1"
        self.primary = "mse" if kind == "mse" else "mae"
        squared = MetricInfo(higher_is_better=False, scale="squared")
        self.metrics = {"mse": squared, "mae": _LOWER, "rmse": _LOWER, "loss": squared if kind == "mse" else _LOWER}

    def loss(self, outputs, targets):
        o, t = outputs.float(), targets.float()
        return F.mse_loss(o, t) if self.kind == "mse" else F.l1_loss(o, t)

    def sums(self, outputs, targets):
        o, t = outputs.float(), targets.float().reshape(outputs.shape)
        n = float(t.shape[0]) if t.dim() else 1.0
        per = float(t[0].numel()) if t.dim() and t.shape[0] else 1.0
        return {"count": n, "values": n * per, "se": float((o - t).square().sum()), "ae": float((o - t).abs().sum())}

    def finish(self, sums):
        v = max(sums.get("values", 0.0), 1.0)
        mse, mae = sums.get("se", 0.0) / v, sums.get("ae", 0.0) / v
        return {"mse": mse, "mae": mae, "rmse": math.sqrt(mse), "loss": mse if self.kind == "mse" else mae}

    def validate(self, outputs, targets, where):
        _need(isinstance(targets, torch.Tensor), f"the {where}'s targets are a {type(targets).__name__}, not a tensor")
        _need(targets.is_floating_point(), f"regression needs float targets; the {where}'s are {targets.dtype} "
                                           "(integer class labels: use task=classification)")
        _need(outputs.numel() == targets.numel(),
              f"regression outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in size")


class BCETask(Task):
    #: the share of the targets on the right side of 0.5: what a multi-label or pitch model is judged by
    #: (the binary cross-entropy also moves with confidence where no decision changes)
    primary = "accuracy@0.5"
    higher_is_better = True
    metrics = {"accuracy@0.5": _PERCENT, "loss": _LOWER, "mae": _LOWER}

    def __init__(self, from_logits: bool = True) -> None:
        self.from_logits = from_logits
        self.name = "bce" if from_logits else "bce_probs"

    def loss(self, outputs, targets):
        o, t = outputs.float(), targets.float().reshape(outputs.shape)
        if self.from_logits:
            return F.binary_cross_entropy_with_logits(o, t)
        return F.binary_cross_entropy(o.clamp(0.0, 1.0), t)

    def _probs(self, outputs):
        return outputs.float().sigmoid() if self.from_logits else outputs.float().clamp(0.0, 1.0)

    def sums(self, outputs, targets):
        t = targets.float().reshape(outputs.shape)
        p = self._probs(outputs)
        values = float(t.numel())
        if self.from_logits:
            bce = float(F.binary_cross_entropy_with_logits(outputs.float(), t, reduction="sum"))
        else:
            bce = float(F.binary_cross_entropy(p, t, reduction="sum"))
        return {"count": float(t.shape[0]), "values": values, "bce": bce, "ae": float((p - t).abs().sum()),
                "agree": float(((p >= 0.5) == (t >= 0.5)).sum())}

    def finish(self, sums):
        v = max(sums.get("values", 0.0), 1.0)
        return {"loss": sums.get("bce", 0.0) / v, "mae": sums.get("ae", 0.0) / v,
                "accuracy@0.5": 100.0 * sums.get("agree", 0.0) / v}

    def validate(self, outputs, targets, where):
        _need(isinstance(targets, torch.Tensor), f"the {where}'s targets are a {type(targets).__name__}, not a tensor")
        _need(outputs.numel() == targets.numel(),
              f"{self.name}: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in size")
        t = targets.float()
        _need(bool(((t >= 0) & (t <= 1)).all()), f"{self.name} needs targets in [0, 1]; the {where}'s range over "
                                                f"[{float(t.min()):g}, {float(t.max()):g}]")
        if not self.from_logits:
            o = outputs.float()
            _need(bool(((o >= 0) & (o <= 1)).all()),
                  f"bce_probs needs probabilities in [0, 1] from the model, but its outputs range over "
                  f"[{float(o.min()):g}, {float(o.max()):g}]; if the model outputs logits use task=bce")

    def check_targets(self, outputs, targets, where):
        if isinstance(targets, torch.Tensor) and targets.numel() and not targets.is_complex():
            lo, hi = (float(v) for v in torch.aminmax(targets.detach().float()))
            if not (lo >= 0 and hi <= 1):
                raise DataError(f"{where}: {self.name} needs targets in [0, 1], but this batch's range over "
                                f"[{lo:g}, {hi:g}]. Check the dataset's targets")


class LanguageModelTask(Task):
    name = "language_model"
    #: the cross-entropy in bits per token (bits per character for a character-level model)
    primary = "bits_per_token"
    metrics = {"bits_per_token": _LOWER, "loss": _LOWER, "perplexity": _LOWER, "token_accuracy": _PERCENT}

    def __init__(self, shift: bool = True, ignore_index: int = -100) -> None:
        self.shift = shift
        self.ignore_index = ignore_index

    def _flat(self, outputs, targets):
        o, t = outputs, targets
        if self.shift:
            o, t = o[:, :-1], t[:, 1:]
        return o.reshape(-1, o.shape[-1]).float(), t.reshape(-1)

    def loss(self, outputs, targets):
        o, t = self._flat(outputs, targets)
        return F.cross_entropy(o, t, ignore_index=self.ignore_index)

    def sums(self, outputs, targets):
        o, t = self._flat(outputs, targets)
        keep = t != self.ignore_index
        return {"count": float(targets.shape[0]), "tokens": float(keep.sum()),
                "nll": float(F.cross_entropy(o, t, ignore_index=self.ignore_index, reduction="sum")),
                "correct": float(((o.argmax(1) == t) & keep).sum())}

    def finish(self, sums):
        n = max(sums.get("tokens", 0.0), 1.0)
        loss = sums.get("nll", 0.0) / n
        return {"loss": loss, "bits_per_token": loss / math.log(2.0), "perplexity": math.exp(min(loss, 700.0)),
                "token_accuracy": 100.0 * sums.get("correct", 0.0) / n}

    def validate(self, outputs, targets, where):
        _need(isinstance(targets, torch.Tensor) and not targets.is_floating_point(),
              f"language_model needs integer token ids as targets; the {where}'s are "
              f"{getattr(targets, 'dtype', type(targets).__name__)}")
        _need(outputs.dim() == 3 and tuple(outputs.shape[:2]) == tuple(targets.shape),
              f"language_model needs (batch, tokens, vocabulary) logits for (batch, tokens) ids; got outputs "
              f"{tuple(outputs.shape)} for targets {tuple(targets.shape)}")
        keep = targets[targets != self.ignore_index]
        if keep.numel():
            _need(int(keep.min()) >= 0 and int(keep.max()) < outputs.shape[-1],
                  f"token ids range over [{int(keep.min())}, {int(keep.max())}] but the model outputs "
                  f"{outputs.shape[-1]} logits per token")

    def check_targets(self, outputs, targets, where):
        if isinstance(targets, torch.Tensor) and outputs.dim() >= 2:
            _label_range(targets, int(outputs.shape[-1]), where, "token ids", "logits per token",
                         ignore=self.ignore_index)


def _user_metric_sums(metrics: Callable[[torch.Tensor, Any], Mapping[str, float]], outputs: torch.Tensor,
                      targets: Any, n: float) -> dict[str, float]:
    """Your ``metrics(outputs, targets)`` of one batch as additive sums (``m:name``, weighted by its examples)."""
    values = metrics(outputs, targets)
    if not isinstance(values, Mapping):
        raise ConfigError(f"metrics(outputs, targets) must return a dict of numbers, got {type(values).__name__}")
    out = {}
    for k, v in values.items():
        try:
            out[f"m:{k}"] = float(v) * n
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metrics(outputs, targets) returned {k!r} = {v!r}, not a number") from exc
    return out


def _user_metric_finish(sums: Mapping[str, float], count: float) -> dict[str, float]:
    return {k[2:]: v / count for k, v in sums.items() if k.startswith("m:")}


class CustomTask(Task):
    """A task from your own functions.

    ``loss(outputs, targets) -> scalar tensor`` trains; ``metrics(outputs, targets) -> {name: value}``
    (optional) is averaged over examples for evaluations (weighted by batch size). ``primary``
    names the metric the accuracy contract judges (and tables lead with): the loss or one of
    ``metrics``; ``higher_is_better`` says which way it is better.
    """

    def __init__(self, loss: Callable[[torch.Tensor, Any], torch.Tensor],
                 metrics: Optional[Callable[[torch.Tensor, Any], Mapping[str, float]]] = None, *,
                 name: str = "custom", primary: str = "loss", higher_is_better: bool = False) -> None:
        if not callable(loss):
            raise ConfigError("CustomTask needs a callable loss(outputs, targets)")
        if metrics is not None and not callable(metrics):
            raise ConfigError("CustomTask's metrics must be a callable metrics(outputs, targets) -> dict")
        if not isinstance(primary, str) or not primary:
            raise ConfigError(f"CustomTask's primary must be a metric name, got {primary!r}")
        if not isinstance(higher_is_better, bool):
            raise ConfigError(f"CustomTask's higher_is_better must be True or False, got {higher_is_better!r}")
        if primary == "loss" and higher_is_better:
            raise ConfigError("CustomTask: the loss is lower-is-better; higher_is_better=True needs primary= one of "
                              "your metrics")
        self._loss, self._metrics = loss, metrics
        self.name, self.primary, self.higher_is_better = name, primary, higher_is_better
        self.metrics = {"loss": _LOWER, primary: MetricInfo(higher_is_better, "error" if primary == "loss" else "other")}

    def loss(self, outputs, targets):
        return self._loss(outputs, targets)

    def sums(self, outputs, targets):
        t = _first_tensor(targets)
        n = float(t.shape[0]) if t is not None and t.dim() else 1.0
        out = {"count": n, "loss": float(self._loss(outputs, targets)) * n}
        if self._metrics is not None:
            out.update(_user_metric_sums(self._metrics, outputs, targets, n))
        return out

    def finish(self, sums):
        count = max(sums.get("count", 0.0), 1.0)
        out = {"loss": sums.get("loss", 0.0) / count}
        out.update(_user_metric_finish(sums, count))
        return out


class WithMetrics(Task):
    """A task with your own metrics beside its own: ``compress(task="bce", metrics=pitch_metrics)``.

    ``metrics(outputs, targets) -> {name: value}`` is averaged over examples like the task's own; a name
    the task already reports is refused at the first evaluation. The accuracy contract can name one of them
    (``contract={"metric": "pitch_accuracy", "higher_is_better": True, ...}``).
    """

    def __init__(self, base: Task, metrics: Callable[[torch.Tensor, Any], Mapping[str, float]]) -> None:
        if not isinstance(base, Task):
            raise ConfigError(f"WithMetrics needs a pwfn.Task, got {type(base).__name__}")
        if not callable(metrics):
            raise ConfigError("metrics must be a callable metrics(outputs, targets) -> dict")
        self.base, self._metrics = base, metrics
        self.name, self.primary, self.higher_is_better = base.name, base.primary, base.higher_is_better
        self.calibrated, self.metrics = base.calibrated, base.metrics

    def loss(self, outputs, targets):
        return self.base.loss(outputs, targets)

    def sums(self, outputs, targets):
        out = dict(self.base.sums(outputs, targets))
        out.update(_user_metric_sums(self._metrics, outputs, targets, float(out.get("count", 1.0))))
        return out

    def finish(self, sums):
        own = {k: v for k, v in sums.items() if not k.startswith("m:")}
        out = self.base.finish(own)
        extra = _user_metric_finish(sums, max(float(sums.get("count", 0.0)), 1.0))
        clash = sorted(set(extra) & set(out))
        if clash:
            raise ConfigError(f"metrics= returns {clash}, which the {self.name} task reports itself; give your "
                              "metrics other names")
        out.update(extra)
        return out

    def validate(self, outputs, targets, where):
        self.base.validate(outputs, targets, where)


TASKS: dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "regression": lambda: RegressionTask("mse"),
    "regression_l1": lambda: RegressionTask("l1"),
    "bce": lambda: BCETask(from_logits=True),
    "bce_probs": lambda: BCETask(from_logits=False),
    "language_model": LanguageModelTask,
    "language_model_unshifted": lambda: LanguageModelTask(shift=False),
}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``task=name`` (config, CLI, ``compress``) build ``factory()``."""
    TASKS[name] = factory


def resolve_task(task: Union[None, str, Task]) -> Task:
    """A Task from a name in :data:`TASKS`, a Task instance, or None (classification)."""
    if task is None:
        return ClassificationTask()
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASKS:
        return TASKS[task]()
    raise ConfigError(f"unknown task {task!r}; choose one of {sorted(TASKS)} or pass a pwfn.Task / pwfn.CustomTask")


def host_targets(adapter: BatchAdapter, batch: Batch) -> Optional[torch.Tensor]:
    """The batch's targets while they are still a CPU tensor (checking them then needs no device sync), else None."""
    try:
        targets = adapter.split(batch)[1]
    except ConfigError:
        return None  # the split on the device raises it again, in context
    return targets if isinstance(targets, torch.Tensor) and targets.device.type == "cpu" else None


def checked_sums(task: Task, outputs: torch.Tensor, targets: Any, host: Optional[torch.Tensor], where: str) -> dict:
    """``task.sums`` of a batch, its targets checked first (on the CPU copy ``host`` when there is one, else
    only when the sums fail): a bad label is a ``DataError`` naming ``where``, never torch's IndexError."""
    if host is not None:
        task.check_targets(outputs, host, where)
    try:
        return task.sums(outputs, targets)
    except (IndexError, RuntimeError):
        task.check_targets(outputs, targets, where)
        raise


def split_units(batches: Sequence[Batch], adapter: BatchAdapter, units: int = 32) -> list[Batch]:
    """``batches`` cut along the batch dimension into about ``units`` pieces of equal size (a batch smaller than
    a piece stays whole; a tensor without the batch's first dimension, e.g. a shared mask, is kept in every
    piece): the units over which the accuracy contract estimates the spread of a drop."""
    sizes = [int(adapter.size(adapter.split(b)[1])) for b in batches]
    total = sum(sizes)
    if total == 0:
        return list(batches)
    piece = max(1, math.ceil(total / units))
    out: list[Batch] = []
    for batch, n in zip(batches, sizes):
        if n <= piece:
            out.append(batch)
            continue
        for start in range(0, n, piece):
            out.append(map_tensors(batch, lambda t, a=start, m=n: t[a:a + piece] if t.dim() and t.shape[0] == m else t))
    return out


@torch.no_grad()
def evaluate_units(model: nn.Module, units: Sequence[Batch], device, task: Task,
                   adapter: Optional[BatchAdapter] = None, dist=None) -> list[dict[str, float]]:
    """The task's additive sums (:meth:`Task.sums`) of ``model`` on each unit, in eval mode; under DDP unit
    ``i``'s sums are reduced over every rank's unit ``i`` (a rank with fewer units adds zeros), so all ranks
    hold the same list."""
    adapter = adapter or BatchAdapter()
    was = model.training
    model.eval()
    out: list[dict[str, float]] = []
    try:
        for i, batch in enumerate(units, 1):
            host = host_targets(adapter, batch)
            inputs, targets = adapter.split(to_device(batch, device))
            out.append(dict(checked_sums(task, adapter.call(model, inputs), targets, host,
                                         f"the contract's guard data (unit {i})")))
    finally:
        model.train(was)
    if dist is not None and getattr(dist, "enabled", False):
        mine = torch.tensor(list(",".join(sorted({k for u in out for k in u})).encode()), dtype=torch.uint8)
        keys = sorted({k for t in dist.all_gather_tensors(mine) for k in bytes(t.tolist()).decode().split(",") if k})
        count = max(int(t.reshape(-1)[0]) for t in dist.all_gather_tensors(torch.tensor([len(out)])))
        flat = [u.get(k, 0.0) for u in out + [{}] * (count - len(out)) for k in keys]
        values = dist.all_reduce_sum(flat)
        out = [dict(zip(keys, values[j * len(keys):(j + 1) * len(keys)])) for j in range(count)]
    return out


def add_sums(units: Sequence[Mapping[str, float]], skip: Optional[int] = None) -> dict[str, float]:
    """The sums of every unit (``skip``: all but that one), for :meth:`Task.finish`."""
    total: dict[str, float] = {}
    for j, u in enumerate(units):
        if j != skip:
            for k, v in u.items():
                total[k] = total.get(k, 0.0) + v
    return total


@torch.no_grad()
def evaluate_task(model: nn.Module, loader, device, task: Task, adapter: Optional[BatchAdapter] = None,
                  dist=None) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode) over ``loader``; sums reduced across DDP ranks."""
    adapter = adapter or BatchAdapter()
    was = model.training
    model.eval()
    totals: dict[str, float] = {}
    ddp = dist is not None and getattr(dist, "enabled", False)
    problem: Optional[DataError] = None
    try:
        for i, batch in enumerate(loader, 1):
            host = host_targets(adapter, batch)
            inputs, targets = adapter.split(to_device(batch, device))
            outputs = adapter.call(model, inputs)
            try:
                sums = checked_sums(task, outputs, targets, host, f"the evaluation data's batch {i}")
            except DataError as exc:
                if not ddp:
                    raise
                problem, totals = exc, {"bad targets": 1.0}  # every rank learns of it in the reduction below
                break
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
    finally:
        model.train(was)
    if ddp:
        # ranks may hold different keys (a rank whose shard is empty has none, top-5 exists only for
        # more than 5 classes): reduce over the union of every rank's keys, 0 where a rank lacks one
        mine = torch.tensor(list(",".join(sorted(totals)).encode()), dtype=torch.uint8)
        keys = sorted({k for t in dist.all_gather_tensors(mine) for k in bytes(t.tolist()).decode().split(",") if k})
        values = dist.all_reduce_sum([totals.get(k, 0.0) for k in keys])
        totals = dict(zip(keys, values))
        if totals.get("bad targets"):
            raise problem or DataError("another rank's evaluation data holds targets the model cannot take (that "
                                       "rank's error names them)")
    return task.finish(totals)


def primary_value(metrics: Mapping[str, Any], task: Task) -> Optional[float]:
    """The task's primary metric out of an evaluation's metrics (None when absent)."""
    v = metrics.get(task.primary)
    return float(v) if isinstance(v, (int, float)) else None


__all__: Sequence[str] = [
    "BCETask", "BatchAdapter", "ClassificationTask", "CustomTask", "LanguageModelTask", "METRIC_SCALES", "MetricInfo",
    "RegressionTask", "TASKS", "Task", "WithMetrics", "add_sums", "checked_sums", "evaluate_task", "evaluate_units",
    "host_targets", "map_tensors", "split_units",
    "primary_value", "register_task", "resolve_task", "to_device",
]

"""Training and evaluation loops shared by the float baseline, PWFN and WFN.

The loops know nothing about fixing beyond an extra loss term: fixed entries stay bit-exact
through the hooks a :class:`~pwfn.training.fixer.Fixer` installs on the tensors and the optimizers.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import bayes

from ..common.console import progress_bar
from ..errors import ConfigError, DataError, TrainingDivergedError
from .distributed import DistContext
from .tasks import BatchAdapter, ClassificationTask, Task, evaluate_task, host_targets, to_device

log = logging.getLogger(__name__)

ExtraLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


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
    # RNG states are CPU byte tensors; a checkpoint loaded with map_location=<cuda device> holds them on
    # the GPU, which the generators refuse
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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


DEFAULT_DIVERGENCE_ADVICE = "Lower the learning rate or clip the gradients harder."


def _has_nonfinite(obj: Any) -> bool:
    """Whether a tensor (or a tuple/list/dict of them) holds a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        return bool(obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all())
    if isinstance(obj, (tuple, list)):
        return any(_has_nonfinite(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_nonfinite(o) for o in obj.values())
    return False


def first_nonfinite_weight(model: nn.Module) -> Optional[str]:
    """The first layer (module order) holding a NaN/inf parameter or a NaN buffer, described.

    Weights (parameters) must be finite. A buffer may hold infinities (an attention mask of -inf, as
    ``nn.Transformer.generate_square_subsequent_mask`` makes, or a clamp bound), never a NaN (diverged
    running statistics). Lazy tensors not yet materialized hold no values and are skipped.
    """
    for mname, module in model.named_modules():
        for kind, tensors in (("weights", module.named_parameters(recurse=False)),
                              ("buffer", module.named_buffers(recurse=False))):
            for pname, t in tensors:
                if is_lazy(t) or t.is_meta or not (t.is_floating_point() or t.is_complex()):
                    continue
                if kind == "weights" and _has_nonfinite(t):
                    bad = int((~torch.isfinite(t.detach())).sum())
                    return (f"layer {mname or '<model>'!r} ({type(module).__name__}) holds non-finite weights: "
                            f"{pname} has {bad} of {t.numel()} entries NaN/inf")
                if kind == "buffer" and bool(torch.isnan(t.detach()).any()):
                    bad = int(torch.isnan(t.detach()).sum())
                    return (f"layer {mname or '<model>'!r} ({type(module).__name__}) holds a NaN buffer: "
                            f"{pname} has {bad} of {t.numel()} entries NaN (infinities are allowed in buffers, "
                            "e.g. attention masks; a NaN is not)")
    return None


@torch.no_grad()
def first_nonfinite_output(model: nn.Module, x: torch.Tensor, bf16: bool = False) -> Optional[str]:
    """Run ``model`` on ``x`` with forward hooks; describe the first layer whose output is NaN/inf.

    A child's hook fires before its parent's, so the first hook to see a non-finite output is
    the innermost module that produced it.
    """
    if _has_nonfinite(x):
        return "the input batch itself contains NaN/inf values: check the dataset and its normalisation"
    found: list[str] = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            if found or not _has_nonfinite(output):
                return
            if _has_nonfinite(inputs):
                found.append(f"layer {name!r} ({type(module).__name__}) received non-finite input, made by the "
                             "operations just before it in its parent's forward")
            else:
                found.append(f"the first layer producing non-finite output is {name!r} ({type(module).__name__})")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        if not found and _has_nonfinite(out):
            found.append("the model's output is non-finite (made in its own forward, outside any layer)")
    except Exception as exc:  # diagnosis is best effort: the divergence itself is what gets reported
        log.debug("diagnostic forward pass failed: %s", exc)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _diverged(where: str, loss: torch.Tensor, ce: torch.Tensor, inner: nn.Module, x: Any, step: int,
              advice: Optional[str], bf16: bool) -> TrainingDivergedError:
    cause = first_nonfinite_weight(inner)
    if cause is None and not bool(torch.isfinite(ce.detach()).all()):
        found = first_nonfinite_output(inner, x, bf16) if isinstance(x, torch.Tensor) else None
        cause = found or (
            "every layer's output was finite in a diagnostic forward pass of the failing batch (the random "
            "weight noise of that step may have caused it)")
    elif cause is None:
        cause = "the task loss is finite, the extra loss term (regulariser) is not"
    return TrainingDivergedError(
        f"{where}: training diverged, the loss became {float(loss.detach())} at step {step}. "
        f"{cause[0].upper() + cause[1:]}. {advice or DEFAULT_DIVERGENCE_ADVICE}"
    )


def _target_problem(task: Task, outputs: torch.Tensor, host: Optional[torch.Tensor], where: str,
                    world: int) -> Optional[DataError]:
    """The batch's targets checked on their CPU copy: raises at once alone, returned under DDP (all ranks stop)."""
    if host is None:
        return None
    try:
        task.check_targets(outputs, host, where)
    except DataError as exc:
        if world == 1:
            raise
        return exc
    return None


def train_epochs(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    epochs: float,
    device: torch.device,
    *,
    counter: EpochCounter,
    extra_loss: Optional[ExtraLoss] = None,
    grad_clip: Optional[float] = None,
    clip_parameters: Optional[list] = None,
    scheduler: Optional[Any] = None,
    desc: str = "train",
    progress: bool = True,
    dist: Optional[DistContext] = None,
    inner: Optional[nn.Module] = None,
    bf16: bool = False,
    advice: Optional[str] = None,
    task: Optional[Task] = None,
    adapter: Optional[BatchAdapter] = None,
    batchnorm: str = "train",
) -> dict[str, float]:
    """Train for ``epochs`` passes (fractions allowed: 0.05 = the first 5 % of one pass).

    Under DDP (``dist.enabled``) ``model`` is the DDP wrapper and ``inner`` the wrapped model
    (extra loss terms see ``inner``, whose parameter names carry no ``module.`` prefix). Each
    rank's cross-entropy is ``sum * world / global_batch``, so DDP's average of the ranks'
    gradients is exactly the gradient of the global-batch mean. ``bf16`` runs forward passes
    under bfloat16 autocast. ``clip_parameters`` (default: all) are the tensors ``grad_clip`` applies to. ``task`` gives the loss (classification's cross-entropy by default)
    and ``adapter`` turns each batch (tuples, dicts, nested) into inputs and targets on the
    device. ``batchnorm="frozen"`` keeps BatchNorm layers in eval mode while the rest trains.
    Returns the mean loss (and, for classification, accuracy) over the steps taken.

    A NaN/inf loss, or weights left NaN/inf by the last step, raise ``TrainingDivergedError``
    naming the first layer that holds non-finite weights or produces non-finite output, plus
    ``advice`` (which settings to change).
    """

    inner = inner if inner is not None else model
    task = task or ClassificationTask()
    adapter = adapter or BatchAdapter()
    classify = isinstance(task, ClassificationTask)
    world = dist.world_size if dist is not None and dist.enabled else 1
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
    apply_batchnorm_policy(model, batchnorm)
    seen = correct = 0
    loss_sum = 0.0
    steps = 0
    bar = progress_bar(total_steps, desc, enabled=progress, unit="step")  # only on a terminal
    try:
        while total_steps is None or steps < total_steps:
            _set_epoch(loader, counter.value)
            counter.value += 1
            for batch_no, batch in enumerate(loader, 1):
                host_y = host_targets(adapter, batch)  # checked on the CPU: no device sync
                x, y = adapter.split(to_device(batch, device, non_blocking=True))
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = adapter.call(model, x)
                logits = logits.float()
                n = adapter.size(y)
                where = f"the training data's batch {batch_no} ({desc}, pass {counter.value})"
                problem = _target_problem(task, logits, host_y, where, world)
                if problem is None:
                    try:
                        local = task.loss(logits, y)
                    except (IndexError, RuntimeError):  # targets already on the device: checked now, in context
                        task.check_targets(logits, y, where)
                        raise
                else:  # under DDP every rank learns of it in the all-reduce below, and all stop together
                    local = logits.sum() * 0.0
                if world > 1:
                    # the task loss is a mean over this rank's n examples: as a share of the global batch
                    total, count, bad = dist.all_reduce_sum([float(local.detach()) * n, float(n),
                                                             float(problem is not None)])
                    if bad:
                        raise problem or DataError(f"{where}: another rank's share of this batch holds targets the "
                                                   "model cannot take (that rank's error names them)")
                    ce = local * (n * world / count)
                    ce_mean = torch.tensor(total / count, dtype=ce.dtype, device=ce.device)  # global mean
                else:
                    ce = ce_mean = local
                loss = ce + extra_loss(inner, ce_mean) if extra_loss is not None else ce
                # Under DDP ce_mean is the global mean, so a NaN/inf on any rank stops every rank here
                # together (a rank that went on would wait for ever in DDP's gradient all-reduce).
                if not bool(torch.isfinite(loss.detach())) or not bool(torch.isfinite(ce_mean.detach())):
                    if world > 1:
                        raise _diverged(desc, loss - ce + ce_mean, ce_mean, inner, x, steps + 1, advice, bf16)
                    raise _diverged(desc, loss, ce, inner, x, steps + 1, advice, bf16)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters() if clip_parameters is None else clip_parameters,
                                             grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                steps += 1
                with torch.no_grad():
                    loss_sum += float((loss - ce + ce_mean).detach()) * n
                    if classify:
                        correct += int((logits.argmax(1) == y).sum())
                    seen += n
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", refresh=False)
                if total_steps is not None and steps >= total_steps:
                    break
            if total_steps is None:
                break
    finally:
        bar.close()
    bad = first_nonfinite_weight(inner)  # the last step can break the weights with a finite loss
    if bad is not None:
        raise TrainingDivergedError(f"{desc}: training diverged, the weights became non-finite by step {steps}. "
                                    f"{bad[0].upper() + bad[1:]}. {advice or DEFAULT_DIVERGENCE_ADVICE}")
    if world > 1:  # every rank took the same steps: report the global batches, not this rank's share
        loss_sum, correct, seen = dist.all_reduce_sum([loss_sum, float(correct), float(seen)])
    out = {"loss": loss_sum / max(seen, 1), "steps": steps}
    if classify:
        out["acc"] = correct / max(seen, 1)
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device,
            adapter: Optional[BatchAdapter] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets over a whole loader (eval mode)."""
    adapter = adapter or BatchAdapter()
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for batch in loader:
        x, y = adapter.split(to_device(batch, device))
        outs.append(adapter.call(model, x).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             dist: Optional[DistContext] = None, task: Optional[Task] = None,
             adapter: Optional[BatchAdapter] = None) -> dict[str, float]:
    """The task's metrics over a loader (classification: top-1/top-5/loss); under DDP each rank
    holds a shard and the sums are reduced."""
    return evaluate_task(model, loader, device, task or ClassificationTask(), adapter, dist)


def take_examples(loader: Iterable, examples: int, adapter: Optional[BatchAdapter] = None) -> tuple[list, int]:
    """The first batches of ``loader`` holding at least ``examples`` examples (all of them when it holds
    fewer), and how many they hold. The global RNG is left as it was (iterating a DataLoader draws a seed),
    so taking them changes nothing else in the run."""
    adapter = adapter or BatchAdapter()
    state = rng_state()
    batches: list = []
    n = 0
    try:
        for batch in loader:
            if n >= examples:
                break
            batches.append(batch)
            n += int(adapter.size(adapter.split(batch)[1]))
    finally:
        set_rng_state(state)
    return batches, n


def draw_examples(loader: Iterable, count: int, seed: int, adapter: Optional[BatchAdapter] = None) -> tuple[list, int]:
    """``count`` examples of a (training) loader, drawn reproducibly from ``seed`` without touching the run's
    random state: from the loader's map-style dataset when it has one (indices from a generator of their own,
    batched with the loader's ``collate_fn``), else the loader's first batches (the global RNG and the loader's
    own generator restored afterwards). Returns the batches and how many examples they hold."""
    ds = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    try:
        size = len(ds) if ds is not None else 0
    except TypeError:
        size = 0
    state = rng_state()
    try:
        if size and collate is not None and not isinstance(ds, torch.utils.data.IterableDataset):
            g = torch.Generator().manual_seed(int(seed) % 2**63)
            idx = torch.randperm(size, generator=g)[:min(count, size)].tolist()
            step = int(getattr(loader, "batch_size", None) or 256)
            batches = [collate([ds[i] for i in idx[j:j + step]]) for j in range(0, len(idx), step)]
            return batches, len(idx)
        gen = getattr(loader, "generator", None)
        saved = gen.get_state() if isinstance(gen, torch.Generator) else None
        try:
            return take_examples(loader, count, adapter)
        finally:
            if saved is not None:
                gen.set_state(saved)
    finally:
        set_rng_state(state)


@torch.no_grad()
def predict_mc(model: nn.Module, loader: Iterable, device: torch.device, samples: int, seed: int = 0,
               dist: Optional[DistContext] = None,
               adapter: Optional[BatchAdapter] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MC predictive probabilities of a Bayesian model: the mean over ``samples`` drawn networks.

    Draw ``s`` uses a generator seeded by ``(seed, s)``: the same networks on every rank and in
    every run, and the global RNG (which training relies on) is left untouched. Under DDP the
    shards' probabilities are gathered in rank order, i.e. in dataset order.
    """
    probs_sum: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    state = rng_state()  # building the plain copies (torch layer constructors) draws from the global RNG
    try:
        for s in range(samples):
            # modulo 2^63: manual_seed takes a signed 64-bit seed, and any config seed is valid
            gen = torch.Generator().manual_seed((seed * 1_000_003 + s) % 2**63)
            net = bayes.sample_point_estimate(model, gen)
            logits, labels = predict(net, loader, device, adapter)
            p = logits.softmax(1)
            probs_sum = p if probs_sum is None else probs_sum + p
    finally:
        set_rng_state(state)
    assert probs_sum is not None and labels is not None
    probs = probs_sum / samples
    if dist is not None and dist.enabled:
        probs = torch.cat(dist.all_gather_tensors(probs))
        labels = torch.cat(dist.all_gather_tensors(labels))
    return probs, labels


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}")


BATCHNORM_POLICIES = ("train", "frozen")


def apply_batchnorm_policy(model: nn.Module, policy: str) -> None:
    """``frozen``: every BatchNorm layer in eval mode (running statistics used and kept) while the rest trains."""
    if policy not in BATCHNORM_POLICIES:
        raise ConfigError(f"batchnorm = {policy!r}: choose one of {list(BATCHNORM_POLICIES)}")
    if policy == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

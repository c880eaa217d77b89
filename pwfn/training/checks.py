"""Checks made before anything is written: the float model is finite, and the model takes the
loaders' batches and the task can use its outputs.

Both leave the model, the RNG state and the loader's epoch as they were, and raise errors that
name the problem and the option to change.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..errors import ConfigError, ModelError, PwfnError
from .tasks import BatchAdapter, ClassificationTask, Task, map_tensors, to_device
from .train import first_nonfinite_weight, rng_state, set_rng_state


def check_materialized(model: nn.Module, *, lazy_ok: bool) -> None:
    """Refuse a model whose tensors hold no values yet: on the meta device, or (unless ``lazy_ok``: the first
    batch will materialize them) lazy modules that never ran a forward pass. Raises ``ModelError`` saying how."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    meta = [name for name, t in tensors if t.is_meta and not is_lazy(t)]
    if meta:
        more = f" (and {len(meta) - 3} more)" if len(meta) > 3 else ""
        raise ModelError(
            f"the model's tensors {meta[:3]}{more} are on the meta device: they have shapes but no values, so there "
            "is nothing to fix. Materialize the model first: model.to_empty(device='cpu') (or your device), then "
            "load its trained weights (model.load_state_dict(...)); or build it outside torch.device('meta')")
    if lazy_ok:
        return
    lazy = [name for name, t in tensors if is_lazy(t)]
    if lazy:
        owners = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)})
        raise ModelError(
            f"the model's tensors {lazy[:3]} are not materialized yet (lazy modules {', '.join(owners) or '?'} that "
            "never ran a forward pass), so their shapes and values are unknown. Run one forward pass on a batch of "
            "your data first (with torch.no_grad(): model(x)); pwfn.compress does it with the first batch")


def check_float_model(float_model: nn.Module) -> None:
    """Refuse a model with a non-finite weight (naming it), or one on the meta device. Lazy modules not yet
    materialized are left to the first batch (see :func:`check_materialized`)."""
    check_materialized(float_model, lazy_ok=True)
    bad = first_nonfinite_weight(float_model)
    if bad is not None:
        raise ModelError(f"the model to fix is not finite: {bad}. Fix the float model (or its checkpoint) first")


def check_first_batch(model: nn.Module, loader, device, what: str, *, required: bool = True,
                      num_classes: Optional[int] = None, task: Optional[Task] = None,
                      adapter: Optional[BatchAdapter] = None) -> Optional[tuple]:
    """The loader's first batch, after checking that ``model`` accepts it and outputs enough classes.

    Raises ``ConfigError`` for an empty loader (when ``required``), a batch the model cannot take,
    or outputs and targets the ``task`` cannot work with (probability targets for the
    classification loss, labels beyond the model's outputs, per-token outputs for a classifier...),
    naming the problem and the option to use. ``adapter`` reads any batch layout (tuples, dicts).
    Leaves the RNG state, the loader's epoch and the model's mode and buffers as they were.
    """
    if loader is None:
        return None
    state = rng_state()
    epoch = getattr(loader, "epoch", None)
    try:
        try:
            batch = next(iter(loader), None)
        except PwfnError:
            raise
        except Exception as exc:  # a user loader can fail in any way
            raise ConfigError(f"the {what} fails to produce a batch: {type(exc).__name__}: {exc}") from exc
    finally:
        set_rng_state(state)
        if isinstance(epoch, int) and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
    if batch is None:
        if required:
            raise ConfigError(f"the {what} yields no batch (its dataset is empty): there is nothing to "
                              "train or evaluate on")
        return None
    task = task or ClassificationTask()
    adapter = adapter or BatchAdapter()
    head = batch_head(batch, 16)
    inputs, targets = adapter.split(head)
    was_training = model.training
    # (a lazy module's buffers have no values until this forward pass materializes them)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers() if not is_lazy(v)}
    try:
        model.eval()
        with torch.no_grad():
            out = adapter.call(model, to_device(inputs, device))
    except PwfnError:
        raise
    except Exception as exc:  # shape mismatches and the like: the model's settings do not fit the data
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ConfigError(f"the model cannot take the {what}'s batches (inputs: {shape}): "
                          f"{type(exc).__name__}: {exc}. Check the model's settings (model.kwargs) against the "
                          "data") from exc
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])
        set_rng_state(state)
    targets = to_device(targets, device)
    task.validate(out, targets, what)
    if isinstance(task, ClassificationTask) and num_classes and int(out.shape[1]) < num_classes:
        raise ConfigError(f"the model outputs {int(out.shape[1])} classes but the data has {num_classes}: the "
                          "model's settings do not fit the data; fix model.kwargs (e.g. num_classes) or leave "
                          "num_classes out to take it from the data")
    return batch if isinstance(batch, tuple) else tuple(batch) if isinstance(batch, list) else (inputs, targets)


def batch_head(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a (nested) batch: every tensor with a batch dimension is cut."""
    return map_tensors(batch, lambda t: t[:n] if t.dim() else t)

"""Model plumbing: every quantisable tensor of a model as one flat vector, and back.

The engine works on one flat vector for the whole network (one codebook for everything).
``QuantView`` fixes a stable layout (module order of ``named_modules``, weight before bias),
gathers values/sigmas into it and scatters results back. The fixed mask of each tensor lives
in a bool buffer ``<param>_fixed`` on the module that owns it, so it travels with the
state_dict, ``.to()``, DDP and checkpoints. A parameter shared by several modules is counted once.

What is quantised:
* Bayesian layers (``bayes.BayesianLayer``): ``weight_mu``/``bias_mu`` with their sigma;
* with ``plain=True``: plain Linear/Conv1d/2d/3d ``weight``/``bias`` (the WFN point network);
* with ``batchnorm=True``: BatchNorm affine ``weight``/``bias`` (WFN quantises them too).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from bayes import BayesianLayer

from .errors import ModelError

PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def mask_buffer_name(param: str) -> str:
    return f"{param}_fixed"


@dataclass
class QuantSlot:
    """One quantisable tensor: where it lives and where it sits in the flat vector."""

    name: str  # qualified, e.g. "features.0.weight"
    module: nn.Module
    param: str  # "weight" or "bias"
    value_attr: str  # "weight_mu" (Bayesian) or "weight" (plain)
    sigma_attr: Optional[str]
    offset: int
    numel: int

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.module, self.value_attr)

    @property
    def sigma(self) -> Optional[torch.Tensor]:
        return getattr(self.module, self.sigma_attr) if self.sigma_attr else None

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, mask_buffer_name(self.param))

    @property
    def sl(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def _candidate_tensors(model: nn.Module, plain: bool, batchnorm: bool) -> Iterator[tuple[str, nn.Module, str, str, Optional[str]]]:
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, BayesianLayer):
            for p in module.present_params():
                yield prefix + p, module, p, f"{p}_mu", f"{p}_sigma"
        elif (plain and isinstance(module, PLAIN_LAYERS)) or (batchnorm and isinstance(module, BATCHNORM_LAYERS)):
            for p in ("weight", "bias"):
                if getattr(module, p, None) is not None:
                    yield prefix + p, module, p, p, None


class QuantView:
    """The flat, stable layout of a model's quantisable tensors."""

    def __init__(self, model: nn.Module, *, plain: bool = False, batchnorm: bool = False) -> None:
        self.model = model
        self.slots: list[QuantSlot] = []
        seen: set[int] = set()
        offset = 0
        for name, module, param, vattr, sattr in _candidate_tensors(model, plain, batchnorm):
            tensor = getattr(module, vattr)
            if id(tensor) in seen:
                continue  # shared parameter: counted once, under its first name
            seen.add(id(tensor))
            if tensor.numel() == 0:
                continue
            self.slots.append(QuantSlot(name, module, param, vattr, sattr, offset, tensor.numel()))
            offset += tensor.numel()
        self.numel = offset
        if not self.slots:
            kinds = "Bayesian layers" + (", Linear/Conv layers" if plain else "") + (", BatchNorm layers" if batchnorm else "")
            raise ModelError(f"the model has no quantisable tensor (looked for {kinds}); nothing to fix")
        self.has_sigma = all(s.sigma_attr is not None for s in self.slots)
        self.attach_masks()

    # -- masks ------------------------------------------------------------------------------
    def attach_masks(self) -> None:
        """Give every quantised tensor's module a ``<param>_fixed`` bool buffer (all False if new)."""
        for s in self.slots:
            buf = mask_buffer_name(s.param)
            existing = getattr(s.module, buf, None)
            if existing is None or existing.shape != s.value.shape:
                s.module.register_buffer(buf, torch.zeros_like(s.value, dtype=torch.bool))

    def masks(self) -> dict[str, torch.Tensor]:
        return {s.name: s.mask for s in self.slots}

    def frozen_sigma_masks(self) -> dict[str, torch.Tensor]:
        """Masks keyed like ``bayes`` losses expect (``"<layer>.<param>_sigma"``)."""
        return {f"{s.name}_sigma": s.mask for s in self.slots if s.sigma_attr}

    # -- gather / scatter -------------------------------------------------------------------
    def _cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def values(self) -> torch.Tensor:
        return self._cat([s.value for s in self.slots])

    def sigmas(self) -> torch.Tensor:
        if not self.has_sigma:
            raise ModelError("this model has tensors without sigma (plain layers); convert it with bayes first")
        return self._cat([s.sigma for s in self.slots])

    def fixed(self) -> torch.Tensor:
        return self._cat([s.mask for s in self.slots])

    @torch.no_grad()
    def write(self, values: torch.Tensor, fixed: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> None:
        """Scatter flat ``values``/``fixed`` (and ``sigma``) back into the model's tensors."""
        if values.numel() != self.numel or fixed.numel() != self.numel:
            raise ModelError(f"flat vectors have {values.numel()} entries, the model has {self.numel}")
        for s in self.slots:
            s.value.copy_(values[s.sl].view_as(s.value))
            s.mask.copy_(fixed[s.sl].view_as(s.mask))
            if sigma is not None and s.sigma_attr:
                s.sigma.copy_(sigma[s.sl].view_as(s.sigma))

    def parameters_with_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, mask) pairs whose fixed entries must never move — mu *and* sigma."""
        out = []
        for s in self.slots:
            out.append((s.value, s.mask))
            if s.sigma_attr:
                out.append((s.sigma, s.mask))
        return out

    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def fraction_fixed(self) -> float:
        return float(self.fixed().sum()) / self.numel


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove every ``*_fixed`` buffer (for exporting a plain model)."""
    for module in model.modules():
        for name in [n for n in list(module._buffers) if n.endswith("_fixed")]:
            del module._buffers[name]
    return model


class FixedGuard:
    """Keeps fixed entries bit-exact through training.

    Zeroing gradients is not enough: weight decay and momentum still move a parameter whose
    gradient is zero. ``before_step`` zeroes the fixed entries' gradients and remembers their
    values; ``after_step`` writes those values back, so the optimizer's update is masked too.
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = [(p, m) for p, m in pairs if bool(m.any())]
        self._saved: list[torch.Tensor] = []

    @torch.no_grad()
    def before_step(self) -> None:
        self._saved = []
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.masked_fill_(m, 0)
            self._saved.append(p.detach()[m].clone())

    @torch.no_grad()
    def after_step(self) -> None:
        for (p, m), saved in zip(self.pairs, self._saved):
            p.data[m] = saved
        self._saved = []

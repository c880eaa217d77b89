"""Model plumbing: the quantised tensors of a model as one flat vector, and back.

The engine works on one flat vector for the whole network (one codebook for everything).
``QuantView`` takes the qualified parameter names chosen by :mod:`pwfn.model.coverage` (point-model
names, one per shared tensor), fixes a stable layout in that order, gathers values (mu for a
Gaussian tensor) and sigmas into it and scatters results back. The fixed mask of each tensor is
held here, keyed by the same names, never in the user's model: nothing is added to or removed
from the model's own buffers. ``mask_state``/``load_mask_state`` save and restore the masks
(for checkpoints).

A model wrapped with FSDP2 (``fully_shard``) holds its parameters as DTensor shards: the view then
works on this process's shards (the flat vector is their concatenation, masks have their shapes),
``shards`` tells the engine where they sit in the network-wide vector (:mod:`pwfn.core.sharding`), and
``mask_state`` gives the masks as DTensors sharded like their parameters (what
``torch.distributed.checkpoint`` saves and reshards).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

import bayes

from ..core.sharding import ShardGroup, is_sharded, local_part
from ..errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class QuantSlot:
    """One quantised tensor: its name(s), its leaf tensors and where it sits in the flat vector."""

    name: str  # qualified point-model name, e.g. "features.0.weight"
    value: torch.Tensor  # the leaf parameter holding the value (mu for a Gaussian tensor)
    sigma: Optional[torch.Tensor]
    offset: int
    numel: int
    mask: torch.Tensor
    aliases: list[str] = field(default_factory=list)

    @property
    def sl(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def resolve_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor], list[str]]]:
    """Every name (canonical and alias) of ``model``'s parameters -> (value leaf, sigma or None, aliases)."""
    sigma_of = {id(e.mu): e.sigma for e in bayes.gaussian_parameters(model)}
    out = {}
    for site in bayes.parameter_sites(model):
        entry = (site.tensor, sigma_of.get(id(site.tensor)), list(site.aliases))
        for n in (site.name, *site.aliases):
            out[n] = entry
    return out


class QuantView:
    """The flat, stable layout of a model's quantised tensors, with their fixed masks."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.slots: list[QuantSlot] = []
        table = resolve_tensors(model)
        missing = [n for n in names if n not in table]
        if missing:
            raise ModelError(f"the model has no parameter named {missing[:5]}")
        seen: set[int] = set()
        offset = global_offset = 0
        global_offsets: list[int] = []
        for name in names:
            value, sigma, aliases = table[name]
            if id(value) in seen:
                continue  # one tensor under two names: counted once, under its first name
            seen.add(id(value))
            if value.numel() == 0:
                continue
            if value.dtype not in (torch.float32, torch.float64):
                raise ModelError(
                    f"{name} is {str(value.dtype).replace('torch.', '')}: pwfn fixes float32 (or float64) master "
                    "weights. Cast the model with model.float() before fixing, and train in bfloat16 with "
                    "precision=bf16 (autocast) if you want the speed."
                )
            local = local_part(value)  # this process's shard of a DTensor (FSDP2), else the tensor
            mask = torch.zeros(local.shape, dtype=torch.bool, device=local.device)
            self.slots.append(QuantSlot(name, value, sigma, offset, local.numel(), mask, aliases))
            global_offsets.append(global_offset)
            offset += local.numel()
            global_offset += value.numel()
        self.numel = offset
        #: the network-wide number of quantised weights (``numel`` is this process's share when sharded)
        self.global_numel = global_offset
        if not self.slots:
            raise ModelError("the model has no quantisable tensor (no floating-point parameter was chosen); "
                             "nothing to fix")
        self.has_sigma = all(s.sigma is not None for s in self.slots)
        #: where this process's shards sit in the network-wide vector (None: the model is not sharded)
        self.shards: Optional[ShardGroup] = None
        if any(is_sharded(s.value) for s in self.slots):
            self.shards = ShardGroup.for_tensors([s.value for s in self.slots], global_offsets)

    # -- masks ------------------------------------------------------------------------------
    def _mask(self, s: QuantSlot) -> torch.Tensor:
        if s.mask.device != s.value.device:
            s.mask = s.mask.to(s.value.device)
        return s.mask

    def masks(self) -> dict[str, torch.Tensor]:
        return {s.name: self._mask(s) for s in self.slots}

    def mask_state(self) -> dict[str, torch.Tensor]:
        """Copies of the masks (CPU), for a checkpoint; sharded: DTensors placed like their parameters."""
        if self.shards is not None:
            from torch.distributed.tensor import DTensor

            return {s.name: DTensor.from_local(self._mask(s).clone(), s.value.device_mesh, s.value.placements,
                                               shape=s.value.shape, stride=_contiguous_stride(s.value.shape),
                                               run_check=False)
                    for s in self.slots}
        return {s.name: s.mask.detach().cpu().clone() for s in self.slots}

    def load_mask_state(self, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
        names = {s.name for s in self.slots}
        if set(state) != names:
            extra, missing = sorted(set(state) - names), sorted(names - set(state))
            raise ModelError(f"the {where}'s fixed masks do not fit this model's quantised tensors "
                             f"(unexpected {extra[:3]}, missing {missing[:3]})")
        for s in self.slots:
            m = state[s.name]
            if tuple(m.shape) != tuple(s.value.shape) or m.dtype != torch.bool:
                raise ModelError(f"the {where}'s fixed mask for {s.name} has shape {tuple(m.shape)} / {m.dtype}, "
                                 f"expected {tuple(s.value.shape)} / bool")
            if is_sharded(m) != is_sharded(s.value) or (is_sharded(m) and m.placements != s.value.placements):
                raise ModelError(f"the {where}'s fixed mask for {s.name} is not sharded like its parameter; "
                                 "load it with torch.distributed.checkpoint into this Fixer's state_dict()")
            s.mask = local_part(m).to(s.mask.device).clone()

    def frozen_sigma_masks(self) -> dict[str, torch.Tensor]:
        """Masks keyed by tensor name, as ``bayes`` losses expect (fixed entries get no sigma gradient)."""
        return {s.name: self._mask(s) for s in self.slots if s.sigma is not None}

    # -- gather / scatter -------------------------------------------------------------------
    def _cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def values(self) -> torch.Tensor:
        return self._cat([local_part(s.value) for s in self.slots])

    def sigmas(self) -> torch.Tensor:
        if not self.has_sigma:
            raise ModelError("this model has tensors without sigma (plain layers); convert it with bayes first")
        return self._cat([local_part(s.sigma) for s in self.slots])

    def fixed(self) -> torch.Tensor:
        return self._cat([self._mask(s) for s in self.slots])

    @torch.no_grad()
    def write(self, values: torch.Tensor, fixed: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> None:
        """Scatter flat ``values``/``fixed`` (and ``sigma``) back into the model's tensors."""
        if values.numel() != self.numel or fixed.numel() != self.numel:
            raise ModelError(f"flat vectors have {values.numel()} entries, the model has {self.numel}")
        for s in self.slots:
            value = local_part(s.value)
            value.copy_(values[s.sl].view_as(value))
            self._mask(s).copy_(fixed[s.sl].view_as(s.mask))
            if sigma is not None and s.sigma is not None:
                sig = local_part(s.sigma)
                sig.copy_(sigma[s.sl].view_as(sig))

    def parameters_with_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, mask) pairs whose fixed entries must never move — mu *and* sigma."""
        out = []
        for s in self.slots:
            out.append((s.value, self._mask(s)))
            if s.sigma is not None:
                out.append((s.sigma, self._mask(s)))
        return out

    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def shared(self) -> dict[str, list[str]]:
        return {s.name: list(s.aliases) for s in self.slots if s.aliases}

    def fixed_codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed weights' distinct values (sorted, -0.0 as 0.0) and counts, network-wide (a sharded
        model's processes merge their shards' codebooks, never the weights)."""
        values, fixed = self.values(), self.fixed()
        cb, counts = torch.unique(values[fixed] + 0.0, sorted=True, return_counts=True)
        if self.shards is None:
            return cb, counts
        return self.shards.merge_codebooks(cb.double().cpu(), counts.cpu())

    def n_fixed(self) -> int:
        """How many weights are fixed, network-wide."""
        n = int(self.fixed().sum())
        return self.shards.total(n) if self.shards is not None else n

    def fraction_fixed(self) -> float:
        return self.n_fixed() / self.global_numel


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
        for p, m in self.pairs:  # a DTensor (FSDP2) parameter: its local shard and local mask
            if p.grad is not None:
                local_part(p.grad).masked_fill_(m, 0)
            self._saved.append(local_part(p.detach())[m].clone())

    @torch.no_grad()
    def after_step(self) -> None:
        for (p, m), saved in zip(self.pairs, self._saved):
            local_part(p.data)[m] = saved
        self._saved = []


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def fold_norm_biases(model: nn.Module) -> list[str]:
    """Fold every Linear/Conv bias whose output goes only into a BatchNorm into that norm, in place.

    BatchNorm subtracts a per-channel mean, so a per-channel bias in front of it does nothing in
    training mode, and in eval mode it only offsets the running mean: ``running_mean -= bias``,
    ``bias = 0`` computes exactly the same function (up to float rounding) and keeps it through
    further training. A bias left there would cost codebook values of its own without changing
    anything. Found with ``torch.fx``: a model it cannot trace (data-dependent control flow) is
    left as it is and an empty list returned. Returns ``"producer.bias -> norm"`` per fold.
    """
    norm = nn.modules.batchnorm._BatchNorm
    producers = (nn.Linear, nn.modules.conv._ConvNd)
    mods = dict(model.named_modules())
    if not any(isinstance(m, norm) for m in mods.values()) or not any(
            isinstance(m, producers) and m.bias is not None for m in mods.values()):
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types on untraceable control flow
        log.info("biases in front of BatchNorm not folded: torch.fx cannot trace %s (%s)", type(model).__name__,
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        prod = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(prod, producers) or prod.bias is None or calls[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
            continue
        bn = mods[users[0].target]
        channels = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        if (not isinstance(bn, norm) or not users[0].args or users[0].args[0] is not node
                or bn.num_features != channels or prod.bias.shape != (channels,)
                or (isinstance(prod, nn.Linear) and not isinstance(bn, nn.BatchNorm1d))):
            continue
        with torch.no_grad():
            if bn.running_mean is not None:
                bn.running_mean.sub_(prod.bias.to(bn.running_mean.dtype))
            prod.bias.zero_()
        folded.append(f"{node.target}.bias -> {users[0].target}")
    return folded

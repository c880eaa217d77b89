"""Conversion between plain torch models and Bayesian ones, in both directions.

``bayesianize`` walks any ``nn.Module`` tree, however nested, and swaps the chosen
Linear/Conv layers for their Gaussian counterparts (mu = the trained weights).
``to_point_estimate`` swaps them back for plain torch layers holding mu. Modules that appear
under several names (shared/tied modules) are converted once and stay shared.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import nn

from .errors import ConversionError
from .init import DEFAULT_SIGMA_FLOOR, SigmaInit
from .layers import BAYESIAN_COUNTERPARTS, BayesianLayer, check_mode

log = logging.getLogger(__name__)

Selector = Union[str, type]


def _matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(sel, type) and isinstance(module, sel):
            return True
        elif not isinstance(sel, (str, type)):
            raise ConversionError(f"include/exclude entries must be name patterns or types, got {sel!r}")
    return False


def _as_list(value: Optional[Union[Selector, Iterable[Selector]]]) -> list[Selector]:
    if value is None:
        return []
    if isinstance(value, (str, type)):
        return [value]
    return list(value)


def _replace_children(root: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Replace every child whose id is in ``replacements``, wherever it occurs (shared once)."""
    for module in list(root.modules()):
        # ``_modules`` directly, not ``named_children()``: the latter yields a child registered
        # twice in the same parent only once, so the second name would keep the old layer.
        for child_name, child in list(module._modules.items()):
            new = replacements.get(id(child))
            if new is not None:
                setattr(module, child_name, new)


def _shared_parameter_owners(model: nn.Module) -> dict[int, set[int]]:
    """Parameter id -> ids of the distinct modules that hold it directly."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    return owners


def bayesianize(
    model: nn.Module,
    *,
    include: Optional[Union[Selector, Iterable[Selector]]] = None,
    exclude: Optional[Union[Selector, Iterable[Selector]]] = None,
    sigma_init: SigmaInit = "power_of_two",
    sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    mode: str = "sample",
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with its Linear/Conv1d/2d/3d layers replaced by Gaussian layers.

    ``include``/``exclude`` take ``fnmatch`` patterns on qualified module names (``"features.*"``)
    or layer types; by default every supported layer is converted. Only exact torch layer types
    are converted (a subclass such as MultiheadAttention's ``out_proj`` is left alone, because its
    owner reads ``.weight`` directly). The model is deep-copied unless ``inplace=True``; a bare
    layer passed as ``model`` is returned as a new Bayesian layer either way.
    """
    check_mode(mode)
    if not sigma_floor > 0:
        raise ConversionError(f"sigma_floor must be positive, got {sigma_floor}")
    inc, exc = _as_list(include), _as_list(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if id(module) in chosen or type(module) not in BAYESIAN_COUNTERPARTS:
            continue
        if inc and not _matches(name, module, inc):
            continue
        if exc and _matches(name, module, exc):
            continue
        chosen[id(module)] = (name, module)
    if not chosen:
        raise ConversionError(
            "nothing to convert: no Linear/Conv1d/Conv2d/Conv3d layer matched"
            + (f" include={inc!r}" if inc else "")
            + (f" exclude={exc!r}" if exc else "")
        )

    owners = _shared_parameter_owners(model)
    for name, module in chosen.values():
        for pname, p in module.named_parameters(recurse=False):
            if len(owners.get(id(p), ())) > 1:
                raise ConversionError(
                    f"layer {name!r} shares its parameter {pname!r} with another module (tied weights); "
                    "converting it would silently untie them. Exclude it, or untie the weights first."
                )

    replacements = {
        key: BAYESIAN_COUNTERPARTS[type(module)].from_module(
            module, mode=mode, sigma_floor=sigma_floor, sigma_init=sigma_init
        )
        for key, (name, module) in chosen.items()
    }
    if id(model) in replacements:
        # A bare layer (name ""): it is its own replacement. include/exclude applied as usual.
        return replacements[id(model)]
    _replace_children(model, replacements)
    log.debug("converted %d layers to Bayesian: %s", len(chosen), [n for n, _ in chosen.values()])
    return model


def to_point_estimate(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every Bayesian layer replaced by the plain torch layer holding mu."""
    if isinstance(model, BayesianLayer):
        return model.to_module()
    if not inplace:
        model = copy.deepcopy(model)
    replacements = {
        id(m): m.to_module() for m in model.modules() if isinstance(m, BayesianLayer)
    }
    _replace_children(model, replacements)
    return model


@torch.no_grad()
def sample_point_estimate(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """A plain copy of ``model`` whose Bayesian layers hold one weight draw ``mu + sigma * eps``.

    One draw is one network of the posterior: evaluating it on a whole dataset and averaging
    over draws is the usual MC predictive. ``eps`` comes from ``generator`` (a CPU generator),
    so the draw does not touch the global RNG and is reproducible on every device and rank.
    """
    plain = to_point_estimate(model)
    layers = dict(model.named_modules())
    # a bare layer is covered too: its name "" maps the plain layer to the Bayesian one (one draw each)
    for name, module in plain.named_modules():
        source = layers.get(name)
        if not isinstance(source, BayesianLayer):
            continue
        for pname in source.present_params():
            mu = source.mu(pname)
            eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(mu.device, mu.dtype)
            getattr(module, pname).copy_(mu + source.floored_sigma(pname) * eps)
    return plain

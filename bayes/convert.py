"""Conversion between plain torch models and Bayesian ones, in both directions.

``bayesianize`` gives chosen parameters of any ``nn.Module`` tree a learned Gaussian
(mu = the trained value, see :mod:`bayes.layers`); the modules keep their own classes.
``to_point_estimate`` removes the Gaussians again, leaving each parameter holding mu under its
own name. Modules used in several places and parameters tied between modules are converted
once and stay shared (one mu, one sigma, one draw per forward window).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConversionError
from .init import DEFAULT_SIGMA_FLOOR, SigmaInit, resolve_sigma_init
from .layers import (
    DrawWindow,
    GaussianParameter,
    _local_hook,
    check_mode,
    gaussian_parameters,
    gaussians_of,
    local_rule_for,
)

log = logging.getLogger(__name__)

Selector = Union[str, type]

#: Normalisation layers by type; a class whose name ends in "Norm" (e.g. ``LlamaRMSNorm``) counts too.
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_module(module: nn.Module) -> bool:
    """BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm, or any class named ``*Norm`` / ``*Norm2d``."""
    if isinstance(module, NORM_TYPES):
        return True
    for cls in type(module).__mro__:
        if cls is nn.Module:
            break
        if re.search(r"Norm(\d*d)?$", cls.__name__) and not cls.__name__.startswith("Parametrized"):
            return True
    return False


def _matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(sel, type):
            if isinstance(module, sel):
                return True
        else:
            raise ConversionError(f"include/exclude entries must be name patterns or types, got {sel!r}")
    return False


def _as_list(value: Optional[Union[Selector, Iterable[Selector]]]) -> list[Selector]:
    if value is None:
        return []
    if isinstance(value, (str, type)):
        return [value]
    return list(value)


class ParamSite:
    """One distinct parameter tensor of a model and every (module, attribute) that holds it."""

    __slots__ = ("name", "aliases", "owners", "tensor")

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self.aliases: list[str] = []
        self.owners: list[tuple[str, nn.Module, str]] = []  # (module name, module, attribute)
        self.tensor = tensor

    @property
    def module_name(self) -> str:
        return self.owners[0][0]

    @property
    def module(self) -> nn.Module:
        return self.owners[0][1]

    @property
    def attr(self) -> str:
        return self.owners[0][2]


def parameter_sites(model: nn.Module) -> list[ParamSite]:
    """Every distinct parameter of ``model`` (a Gaussian one counts as its mu) with all its owners.

    Names are those of the point-estimate model; a tensor held under several names (one module
    used twice, or weights tied across modules) appears once, under the name
    ``named_parameters`` gives it first, the others in ``aliases``.
    """
    sites: dict[int, ParamSite] = {}
    order: list[ParamSite] = []
    # the leaves of a parametrization (mu and sigma, weight_norm's g and v) are reached through the
    # tensor they compute, under its own name
    inner: set[int] = set()
    for m in model.modules():
        if isinstance(m, parametrize.ParametrizationList):
            inner.update(id(x) for x in m.modules())
    for mname, module in model.named_modules(remove_duplicate=False):
        if id(module) in inner:
            continue
        items: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in module._parameters.items() if p is not None]
        for hook in module._forward_pre_hooks.values():
            attr = getattr(hook, "name", None)
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm") and attr:
                # hook-based weight/spectral norm: the weight is computed from attr_g/attr_v (attr_orig)
                leaves = {f"{attr}_g", f"{attr}_v", f"{attr}_orig"}
                items = [(n, p) for n, p in items if n not in leaves]
                computed = module.__dict__.get(attr)
                if isinstance(computed, torch.Tensor):
                    items.append((attr, computed))
        gaussian = gaussians_of(module)
        for pname in gaussian:
            items.append((pname, module.parametrizations[pname].original))
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations:
                if pname not in gaussian:
                    with torch.no_grad():
                        items.append((pname, getattr(module, pname)))  # a computed tensor (weight_norm ...)
        for pname, p in items:
            qual = f"{mname}.{pname}" if mname else pname
            site = sites.get(id(p))
            if site is None:
                site = ParamSite(qual, p)
                sites[id(p)] = site
                order.append(site)
            elif qual != site.name and qual not in site.aliases:
                site.aliases.append(qual)
            if not any(m is module and a == pname for _, m, a in site.owners):
                site.owners.append((mname, module, pname))
    return order


def foreign_parametrization(module: nn.Module, attr: str) -> Optional[str]:
    """Name of a non-Gaussian parametrization or weight/spectral-norm hook computing ``module.<attr>``."""
    if parametrize.is_parametrized(module, attr):
        chain = module.parametrizations[attr]
        if not (len(chain) == 1 and isinstance(chain[0], GaussianParameter)):
            return "parametrization " + " -> ".join(type(p).__name__ for p in chain)
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == attr and type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            return f"{type(hook).__name__} hook (torch.nn.utils.{'weight_norm' if type(hook).__name__ == 'WeightNorm' else 'spectral_norm'})"
    return None


def fold_parametrizations(model: nn.Module) -> list[str]:
    """Bake every parametrization and weight/spectral-norm hook into a plain parameter holding its
    current value (the effective weight); Gaussian parametrizations are left alone.

    Returns what was folded (``"<module>.<attr>: <kind>"``), for the log.
    """
    folded: list[str] = []
    for mname, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            kind = type(hook).__name__
            attr = getattr(hook, "name", None)
            if kind == "WeightNorm" and attr:
                torch.nn.utils.remove_weight_norm(module, attr)
                folded.append(f"{mname}.{attr}: weight_norm")
            elif kind == "SpectralNorm" and attr:
                torch.nn.utils.remove_spectral_norm(module, attr)
                folded.append(f"{mname}.{attr}: spectral_norm")
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                chain = module.parametrizations[attr]
                if len(chain) == 1 and isinstance(chain[0], GaussianParameter):
                    continue
                kinds = " -> ".join(type(p).__name__ for p in chain)
                # (not under no_grad: torch keeps the folded tensor a Parameter only if it requires grad)
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                folded.append(f"{mname}.{attr}: {kinds}")
    return folded


def _own_class(cls: type) -> type:
    """A fresh copy of a parametrized module's generated class (same bases, same properties)."""
    return type(cls.__name__, cls.__bases__,
                {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})


def _deepcopy_with_own_class(self, memo):
    """``copy.deepcopy`` for a parametrized module whose copy gets its own class.

    torch gives each parametrized module a class of its own, but its default deepcopy shares
    that class with the copy, so removing a parametrization from the copy would break the
    original. Installed on the classes ``bayesianize`` creates.
    """
    found = memo.get(id(self))
    if found is not None:
        return found
    own = _own_class(type(self))
    replica = own.__new__(own)
    memo[id(self)] = replica
    state = dict(self.__dict__)
    if isinstance(state.get("_flat_weights"), list):
        # an RNN caches the weights its last forward read: sampled (non-leaf) tensors that cannot be
        # deep-copied; the copy refreshes them at its first forward
        state["_flat_weights"] = [w.detach() if isinstance(w, torch.Tensor) and not w.is_leaf else w
                                  for w in state["_flat_weights"]]
    replica.__dict__ = copy.deepcopy(state, memo)
    return replica


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copes with hook-based ``weight_norm``/``spectral_norm`` modules.

    Their computed ``weight`` attribute is a non-leaf tensor that torch refuses to deep-copy; it is
    recomputed at every forward, so the copy gets it detached.
    """
    stash = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            attr = getattr(hook, "name", None)
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm") and attr:
                value = module.__dict__.get(attr)
                if isinstance(value, torch.Tensor) and not value.is_leaf:
                    stash.append((module, attr, value))
                    module.__dict__[attr] = value.detach()
    try:
        copied = copy.deepcopy(model)
    finally:
        for module, attr, value in stash:
            module.__dict__[attr] = value
    # torch's deepcopy lets a parametrized module's copy share its generated class, so removing a
    # parametrization from the copy would break the original: give each copy a class of its own
    for module in copied.modules():
        if parametrize.is_parametrized(module) and type(module).__deepcopy__ is not _deepcopy_with_own_class:
            module.__class__ = _own_class(type(module))
    return copied


def _fast_getter(attr: str, slow):
    """The parametrized attribute's getter, minus two ``Module.__call__`` s per read (hot path).

    Equivalent to torch's getter for a single Gaussian parametrization; inside
    ``parametrize.cached()`` torch's own getter (with its cache) is used.
    """

    def get(self):
        if parametrize._cache_enabled:
            return slow(self)
        plist = self._modules["parametrizations"]._modules[attr]
        original = plist._parameters.get("original")
        if original is None:
            original = plist.original
        return plist._modules["0"].compute(original)

    return get


def _speed_up(module: nn.Module, attr: str) -> None:
    cls = type(module)
    prop = cls.__dict__.get(attr)
    if isinstance(prop, property) and prop.fget is not None and not getattr(prop.fget, "_bayes_fast", False):
        fget = _fast_getter(attr, prop.fget)
        fget._bayes_fast = True  # type: ignore[attr-defined]
        setattr(cls, attr, property(fget, prop.fset, prop.fdel, prop.__doc__))


def _window_of(module: nn.Module) -> Optional[DrawWindow]:
    for h in module._forward_pre_hooks.values():
        if isinstance(getattr(h, "__self__", None), DrawWindow):
            return h.__self__
    return None


def _hook_window(module: nn.Module, params, root: bool) -> None:
    """Give ``module`` a draw window over ``params`` (or update the one it has)."""
    window = _window_of(module)
    if window is not None:
        window.params = tuple(dict.fromkeys([*window.params, *params]))
        if root:  # the root's window opens first
            key = next(k for k, h in module._forward_pre_hooks.items() if getattr(h, "__self__", None) is window)
            module._forward_pre_hooks.move_to_end(key, last=False)
        return
    window = DrawWindow(params)
    # a root's window opens before any owner hook of the same module runs
    module.register_forward_pre_hook(window.open, prepend=root)
    module.register_forward_hook(window.close, always_call=True)


def _hook_owner(module: nn.Module, local: bool) -> None:
    _hook_window(module, gaussians_of(module).values(), root=False)
    if local and not any(h is _local_hook for h in module._forward_hooks.values()):
        module.register_forward_hook(_local_hook, with_kwargs=True)


def _hook_root(model: nn.Module) -> None:
    _hook_window(model, [e.gaussian for e in gaussian_parameters(model)], root=True)


def _unhook(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items()
                    if h is _local_hook or isinstance(getattr(h, "__self__", None), DrawWindow)]:
            del hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(key, None)


def _site_hit(site: ParamSite, selectors: Sequence[Selector]) -> bool:
    """A selector matches a parameter name of the site, an owner's module name, or an owner's type."""
    names = [site.name, *site.aliases]
    return any(_matches(n, m, selectors) for n in names for _, m, _ in site.owners) or any(
        _matches(mn, m, selectors) for mn, m, _ in site.owners)


def select_sites(
    model: nn.Module,
    *,
    include: Optional[Union[Selector, Iterable[Selector]]] = None,
    exclude: Optional[Union[Selector, Iterable[Selector]]] = None,
    norms: bool = False,
) -> list[ParamSite]:
    """The parameters ``bayesianize`` would convert with these selectors (see there)."""
    inc, exc = _as_list(include), _as_list(exclude)
    chosen = []
    for site in parameter_sites(model):
        if not site.tensor.is_floating_point() or site.tensor.numel() == 0:
            continue
        owners = site.owners
        if inc and not _site_hit(site, inc):
            continue
        if exc and _site_hit(site, exc):
            continue
        if not inc and not norms and any(is_norm_module(m) for _, m, _ in owners):
            continue
        chosen.append(site)
    return chosen


def bayesianize(
    model: nn.Module,
    *,
    include: Optional[Union[Selector, Iterable[Selector]]] = None,
    exclude: Optional[Union[Selector, Iterable[Selector]]] = None,
    params: Optional[Iterable[str]] = None,
    norms: bool = False,
    sigma_init: SigmaInit = "power_of_two",
    sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    mode: str = "sample",
    fold: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with a Gaussian (learned sigma) on each chosen parameter.

    By default every floating-point parameter of every module is converted — Linear, Conv,
    ConvTranspose, attention, RNN, embedding weights and a module's own ``nn.Parameter`` s —
    except normalisation-layer parameters (``norms=True`` converts those too). ``include`` /
    ``exclude`` take ``fnmatch`` patterns on qualified module or parameter names
    (``"encoder.*"``, ``"*.bias"``) or module types; an explicit ``include`` also admits norm
    layers it names. ``params`` (qualified parameter names) overrides all of that.

    A parameter computed by another parametrization (``weight_norm``, ``spectral_norm``, your
    own) is refused unless ``fold=True``, which first bakes its current effective value into a
    plain parameter. The model is deep-copied unless ``inplace=True``.
    """
    check_mode(mode)
    if not sigma_floor > 0:
        raise ConversionError(f"sigma_floor must be positive, got {sigma_floor}")
    init = resolve_sigma_init(sigma_init)
    if not inplace:
        model = copy_model(model)
    if params is not None:
        wanted = list(params)
        by_name = {}
        for site in parameter_sites(model):
            for n in (site.name, *site.aliases):
                by_name[n] = site
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ConversionError(f"params names no parameter of this model: {missing[:5]}")
        sites, seen = [], set()
        for n in wanted:
            if id(by_name[n]) not in seen:
                seen.add(id(by_name[n]))
                sites.append(by_name[n])
    else:
        sites = select_sites(model, include=include, exclude=exclude, norms=norms)
    sites = [s for s in sites if not all(s.attr in gaussians_of(m) for _, m, _ in s.owners)]
    foreign = [(s, f) for s in sites for _, m, a in s.owners if (f := foreign_parametrization(m, a))]
    if foreign:
        if not fold:
            shown = "; ".join(f"{s.name}: {f}" for s, f in foreign[:3])
            raise ConversionError(
                f"{shown}: the tensor is computed by another parametrization, so its value cannot be made "
                "Gaussian (or fixed) directly. Pass fold=True to bake the current effective weight into a plain "
                "parameter first, remove the parametrization yourself, or exclude the tensor."
            )
        for item in fold_parametrizations(model):
            log.warning("folded %s into a plain parameter (its effective value is kept)", item)
        names = [s.name for s in sites]
        by_name = {n: s for s in parameter_sites(model) for n in (s.name, *s.aliases)}
        sites = [by_name[n] for n in names]
    if not sites:
        raise ConversionError(
            "nothing to convert: no floating-point parameter matched"
            + (f" include={_as_list(include)!r}" if include else "")
            + (f" exclude={_as_list(exclude)!r}" if exclude else "")
        )
    owners: dict[int, tuple[nn.Module, bool]] = {}
    for site in sites:
        mu = site.tensor
        with torch.no_grad():
            sigma = init(mu.detach()).to(mu.dtype).clamp_min(sigma_floor)
        if sigma.shape != mu.shape:
            raise ConversionError(f"sigma_init returned shape {tuple(sigma.shape)} for {site.name} {tuple(mu.shape)}")
        local = all(local_rule_for(m) is not None for _, m, _ in site.owners)
        gp = GaussianParameter(sigma.detach().clone(), mode=mode, sigma_floor=sigma_floor, local_owner=local)
        gp.sigma.requires_grad_(mu.requires_grad)
        for _, module, attr in site.owners:
            parametrize.register_parametrization(module, attr, gp, unsafe=True)
            type(module).__deepcopy__ = _deepcopy_with_own_class
            _speed_up(module, attr)
            owners[id(module)] = (module, owners.get(id(module), (module, False))[1] or local)
    for module, local in owners.values():  # after every registration: a window covers all the owner's tensors
        _hook_owner(module, local)
    _hook_root(model)
    log.debug("made %d tensors Gaussian: %s", len(sites), [s.name for s in sites][:20])
    return model


def to_point_estimate(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every Gaussian removed: each parameter holds mu, under its own name.

    Module classes, state_dict keys and weight sharing are the original model's.
    """
    if not inplace:
        model = copy_model(model)
    for _, module in list(model.named_modules(remove_duplicate=True)):
        gps = gaussians_of(module)
        for attr, gp in gps.items():
            gp.retired = True  # a window of an enclosing converted model draws no more for it
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        _unhook(module)
    return model


@torch.no_grad()
def sample_point_estimate(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """A plain copy of ``model`` whose Gaussian tensors hold one draw ``mu + sigma * eps``.

    One draw is one network of the posterior: evaluating it on a whole dataset and averaging
    over draws is the usual MC predictive. ``eps`` comes from ``generator`` (a CPU generator),
    so the draw does not touch the global RNG and is reproducible on every device and rank.
    Tied tensors get one draw.
    """
    entries = gaussian_parameters(model)
    plain = to_point_estimate(model)
    for e in entries:
        mu = e.mu
        eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(mu.device, mu.dtype)
        plain.get_parameter(e.name).copy_(mu + e.gaussian.floored_sigma() * eps)
    return plain


def point_state_dict(state: dict) -> dict:
    """The state_dict a point-estimate model would have, from a Bayesian model's state_dict.

    ``<module>.parametrizations.<name>.original`` (mu) becomes ``<module>.<name>``; sigmas are
    dropped; everything else is kept. Works on saved checkpoints without building the model.
    """
    out = {}
    for key, value in state.items():
        head, sep, tail = key.rpartition("parametrizations.")
        if sep and (head == "" or head.endswith(".")):
            name, _, rest = tail.partition(".")
            if rest == "original":
                out[head + name] = value
            continue
        out[key] = value
    return out

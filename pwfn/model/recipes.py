"""Model recipes: what rebuilds a fixed network's model from a file, and where one comes from.

A recipe is JSON, recorded with a run (``manifest.json``, ``point_model.json``) and with every
export (``model.json``, the packed ``model.pwfn``):

- ``{"name": "resnet20", "kwargs": {...}}`` a model registered with :func:`pwfn.model.zoo.register_model`
  (pwfn's zoo; ``"module": "mypkg.models"`` names the module that registers a model of your own);
- ``{"factory": "mypkg.models:Net", "kwargs": {...}}`` an importable ``torch.nn.Module``
  subclass, or a function that returns the model.

Where a run made from Python gets its recipe (:func:`recipe_of`, in this order):

1. :func:`set_recipe` ``(model, "mypkg.models:make_net", hidden=32)``: said explicitly;
2. a class mixing in :class:`RecipeMixin` (or huggingface_hub's ``PyTorchModelHubMixin``): the
   constructor arguments bound at construction, as the Hugging Face mixin stores them;
3. a class whose constructor needs no argument.

Every candidate is checked before it is recorded: its factory must be importable (a class defined
in ``__main__`` or inside a function is not), its arguments JSON, and the recipe must build
(on the meta device, allocating nothing) a model with exactly the weights' names and shapes (a lazy
module's tensors, ``nn.LazyLinear`` ..., take their shapes from the weights loaded into them: only
their names are compared).
What cannot be encoded is not recorded, and the log says why and what would work.

Building from a file (:func:`build_recipe`) never calls an arbitrary function a file names:
a registered model or an ``nn.Module`` subclass is built; a function factory only when the
caller names it too (``model="mypkg.models:make_net"``, ``pwfn export --model``). The model is
first built on the meta device and compared with the weights, so a hand-edited recipe
(``hidden: [-5]``, ``hidden: [10**9]``) is refused with a clear message before anything is
allocated.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..errors import ConfigError, ModelError, PwfnError

if TYPE_CHECKING:  # torch loads when a model is built or checked, not with the manifest reader
    from torch import Tensor, nn

__all__ = ["RecipeMismatch", "RecipeMixin", "build_recipe", "check_recipe", "factory_spec", "parse_model_spec", "recipe_of",
           "resolve_factory", "same_recipe", "set_recipe", "validate_recipe"]

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: the attribute :func:`set_recipe` stores a recipe under
_ATTR = "_pwfn_recipe"
#: what :class:`RecipeMixin` records: bound constructor arguments, and the names it could not encode
_INIT = "_pwfn_init_kwargs"
_DROPPED = "_pwfn_init_dropped"
#: largest JSON a recipe's arguments may take (a recipe is a few names and numbers)
_MAX_KWARGS_JSON = 1 << 20

Recipe = dict


class RecipeMismatch(ModelError):
    """A recipe builds, but not the model of the weights at hand (other names or shapes)."""


# --------------------------------------------------------------------------------------------
# the format


def _is_json(value: Any) -> bool:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return len(text) <= _MAX_KWARGS_JSON


def validate_recipe(recipe: Any, where: str) -> Optional[Recipe]:
    """``None`` or a recipe in its canonical form; a malformed one raises ``ModelError`` naming ``where``."""
    if recipe is None:
        return None
    if not isinstance(recipe, Mapping):
        raise ModelError(f"{where}: 'recipe' should be an object, got {type(recipe).__name__}")
    kwargs = recipe.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"{where}: the model recipe's 'kwargs' must be an object with string keys")
    if not _is_json(dict(kwargs)):
        raise ModelError(f"{where}: the model recipe's 'kwargs' are not plain JSON (or too large)")
    name, factory = recipe.get("name"), recipe.get("factory")
    if (name is None) == (factory is None):
        raise ModelError(f"{where}: a model recipe names either a registered model ('name') or an importable "
                         f"factory ('factory': 'module:qualname'), got {dict(recipe)!r}")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where}: the model recipe's 'name' must be a non-empty string")
        out: Recipe = {"name": name, "kwargs": dict(kwargs)}
        module = recipe.get("module")
        if module is not None:
            if not isinstance(module, str) or not _MODULE.match(module):
                raise ModelError(f"{where}: the model recipe's 'module' {module!r} is not a module name")
            out["module"] = module
        return out
    if not isinstance(factory, str) or not _SPEC.match(factory):
        raise ModelError(f"{where}: the model recipe's 'factory' {factory!r} is not of the form "
                         "'package.module:Name'")
    return {"factory": factory, "kwargs": dict(kwargs)}


def same_recipe(a: Any, b: Any) -> bool:
    """Whether two recipes (or Nones) are the same after validation (kwargs compared as JSON)."""
    try:
        va, vb = validate_recipe(a, "recipe"), validate_recipe(b, "recipe")
    except ModelError:
        return False
    return json.dumps(va, sort_keys=True) == json.dumps(vb, sort_keys=True)


def describe(recipe: Mapping[str, Any]) -> str:
    """``mypkg.models:Net(hidden=32)`` or ``resnet20(num_classes=10)``, for messages."""
    what = recipe.get("factory") or recipe.get("name")
    args = ", ".join(f"{k}={v!r}" for k, v in (recipe.get("kwargs") or {}).items())
    text = f"{what}({args})"
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# factories


def factory_spec(obj: Any) -> str:
    """``"module:qualname"`` of an importable class or function; ``ModelError`` saying why not otherwise."""
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    what = getattr(obj, "__name__", repr(obj))
    if not isinstance(module, str) or not isinstance(qual, str):
        raise ModelError(f"{what} has no importable name (module and qualified name)")
    if "<locals>" in qual or "<lambda>" in qual:
        raise ModelError(f"{what} is defined inside a function ({qual}): a file cannot name it; define it at a "
                         "module's top level")
    if module == "__main__":
        raise ModelError(f"{what} is defined in the script being run (__main__), which another process cannot "
                         "import: move it into a module (mypkg/models.py) and import it from there")
    spec = f"{module}:{qual}"
    if not _SPEC.match(spec):
        raise ModelError(f"{what}: {spec!r} is not an importable name")
    return spec


def _import(module: str, where: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"{where}: cannot import {module!r} ({exc}); install it, or run from the folder that "
                         "holds it") from exc
    except Exception as exc:  # the module's own code failed
        raise ModelError(f"{where}: importing {module!r} failed: {type(exc).__name__}: {exc}") from exc


def resolve_factory(spec: str, where: str = "model", *, functions: bool = True) -> Callable[..., nn.Module]:
    """The class or function ``"module:qualname"`` names. With ``functions=False`` only an
    ``nn.Module`` subclass is accepted (what a file may name on its own)."""
    from torch import nn

    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ModelError(f"{where}: {spec!r} is not of the form 'package.module:Name'")
    module, qual = spec.split(":")
    obj: Any = _import(module, where)
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ModelError(f"{where}: {module!r} has no {qual!r}") from exc
    if isinstance(obj, type):
        if not issubclass(obj, nn.Module):
            raise ModelError(f"{where}: {spec} is a class but not a torch.nn.Module")
        return obj
    if not callable(obj) or not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        raise ModelError(f"{where}: {spec} is neither a torch.nn.Module class nor a function")
    if not functions:
        raise ModelError(
            f"{where}: the recipe names the function {spec}; pwfn calls a function that a file names only when "
            f"you name it too: pass model={spec!r} (Python) or --model {spec} (pwfn export)"
        )
    return obj


def _callable_of(recipe: Recipe, where: str, functions: bool) -> Callable[..., nn.Module]:
    from .zoo import create_model, model_factory

    if "factory" in recipe:
        return resolve_factory(recipe["factory"], where, functions=functions)
    if "module" in recipe and model_factory(recipe["name"]) is None:
        _import(recipe["module"], where)  # registers the model
    fn = model_factory(recipe["name"])
    if fn is None:
        try:
            create_model(recipe["name"])  # its error names close matches and the registered models
        except ConfigError as exc:
            raise ModelError(f"{where}: {exc}") from exc
    return fn  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# building


def _construct(fn: Callable[..., nn.Module], recipe: Recipe, where: str, device: Optional[str]) -> nn.Module:
    import torch
    from torch import nn

    kwargs = dict(recipe.get("kwargs") or {})
    try:
        if device is None:
            model = fn(**kwargs)
        else:
            with torch.device(device):
                model = fn(**kwargs)
    except PwfnError as exc:
        raise ModelError(f"{where}: the model recipe {describe(recipe)} cannot be built: {exc}") from exc
    except Exception as exc:  # the constructor's own errors (TypeError, RuntimeError: negative dimension ...)
        raise ModelError(f"{where}: the model recipe {describe(recipe)} cannot be built: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}: the model recipe {describe(recipe)} returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _shapes(state: Mapping[str, Any]) -> dict[str, Optional[tuple[int, ...]]]:
    """``{name: shape}``; ``None`` for a lazy module's tensor not materialized yet (``nn.LazyLinear`` ...):
    its shape is whatever the weights loaded into it say (torch materializes it from them)."""
    from torch.nn.parameter import is_lazy

    return {k: None if is_lazy(v) else tuple(v.shape) for k, v in state.items() if is_lazy(v) or hasattr(v, "shape")}


def _compare(built: Mapping[str, Optional[tuple]], want: Mapping[str, Optional[tuple]]) -> Optional[str]:
    """What differs between two {name: shape} maps (None when they agree; a ``None`` shape, a lazy
    module's tensor, fits any shape)."""
    want = _fold_compile_prefix(want, built)
    missing = [k for k in want if k not in built]
    extra = [k for k in built if k not in want]
    shapes = [k for k in want if k in built and built[k] is not None and want[k] is not None
              and tuple(built[k]) != tuple(want[k])]
    if not (missing or extra or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"the weights hold {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
                     + " which the recipe's model lacks")
    if extra:
        parts.append(f"the recipe's model has {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")
                     + " which the weights lack")
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {list(want[k])} in the weights but {list(built[k])} in the recipe's model"
                     + (f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    return "; ".join(parts)


def _fold_compile_prefix(state: Mapping[str, Any], reference: Mapping[str, Any]) -> dict:
    """``state`` with torch.compile's ``_orig_mod.`` prefix removed (or added) when that makes its keys
    those of ``reference``: a compiled model's weights load into the plain model and back."""
    keys, ref = list(state), set(reference)
    if set(keys) == ref:
        return dict(state)
    p = "_orig_mod."
    if keys and all(k.startswith(p) for k in keys) and {k[len(p):] for k in keys} == ref:
        return {k[len(p):]: v for k, v in state.items()}
    if ref and all(k.startswith(p) for k in ref) and {p + k for k in keys} == ref:
        return {p + k: v for k, v in state.items()}
    return dict(state)


def check_recipe(recipe: Any, state: Mapping[str, Any], where: str, *, functions: bool = True) -> Recipe:
    """Validate ``recipe`` and build it on the meta device (nothing allocated): its state_dict must have
    exactly the names and shapes of ``state`` (tensors, or anything with ``.shape``). Returns the
    canonical recipe; ``ModelError`` says what differs."""
    rec = validate_recipe(recipe, where)
    if rec is None:
        raise ModelError(f"{where}: no model recipe")
    fn = _callable_of(rec, where, functions)
    try:
        built = _construct(fn, rec, where, "meta")
    except ModelError:
        # a constructor that cannot run on the meta device (it reads values, loads a file ...):
        # built for real, which raises the same error when the recipe itself is bad
        built = _construct(fn, rec, where, None)
    want = {k: _shapes({k: v}).get(k, ()) for k, v in state.items()}
    diff = _compare(_shapes(built.state_dict()), want)
    if diff and _fold_parametrizations(built, want, where):  # weights exported as plain fixed values
        diff = _compare(_shapes(built.state_dict()), want)
    if diff:
        raise RecipeMismatch(f"{where} does not fit the model its recipe {describe(rec)} builds: {diff}")
    return rec


def build_recipe(recipe: Any, state: Optional[Mapping[str, Tensor]] = None, where: str = "model", *,
                 functions: bool = False) -> nn.Module:
    """The model of ``recipe``, with ``state`` loaded strictly when given (eval mode).

    With ``state`` the recipe is first checked on the meta device (:func:`check_recipe`), so a
    recipe that does not fit the weights is refused before anything is allocated.
    ``functions``: whether a function factory may be called (the caller named it); classes and
    registered models always may. Every failure is a ``ModelError`` naming ``where``.
    """
    rec = validate_recipe(recipe, where)
    if rec is None:
        raise ModelError(f"{where}: no model recipe")
    if state is not None:
        check_recipe(rec, state, where, functions=functions)
    model = _construct(_callable_of(rec, where, functions), rec, where, None)
    if state is not None:
        load_state_folded(model, state, where)
    return model.eval()


def load_state_folded(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)``, after folding torch.compile's ``_orig_mod.`` prefix;
    a mismatch raises ``ModelError`` with advice for the usual causes."""
    own = model.state_dict()
    state = _fold_compile_prefix(state, own)
    if set(state) != set(own) and _fold_parametrizations(model, state, where):
        own = model.state_dict()
        state = _fold_compile_prefix(state, own)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{where} does not fit the model: {_advice(own, state)}. torch says: "
                         f"{str(exc).splitlines()[0][:300]}") from exc


def _fold_parametrizations(model: nn.Module, state: Mapping[str, Any], where: str) -> bool:
    """Fold weight_norm/spectral_norm (parametrizations or the older hooks) of ``model`` into plain
    weights where ``state`` holds the plain weight: a fixed network's export holds the effective
    weight itself (re-deriving it from a norm and a direction would take it off the codebook).
    Returns whether anything was folded; each fold is logged."""
    from torch.nn.utils import parametrize

    plain = {k.removeprefix("_orig_mod.") for k in state}  # torch.compile's wrapper on either side
    folded = []
    for mname, m in list(model.named_modules()):
        key_base = f"{mname}.".removeprefix("_orig_mod.") if mname else ""
        base = f"{mname}." if mname else ""
        for pname in list(getattr(m, "parametrizations", {}) or {}):
            if parametrize.is_parametrized(m, pname) and f"{key_base}{pname}" in plain \
                    and f"{key_base}parametrizations.{pname}.original" not in plain \
                    and f"{key_base}parametrizations.{pname}.original0" not in plain:
                parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
                folded.append(f"{base}{pname}")
        for hook in list(m._forward_pre_hooks.values()):  # torch.nn.utils.weight_norm / spectral_norm (hooks)
            name = getattr(hook, "name", None)
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm") and isinstance(name, str) and f"{key_base}{name}" in plain \
                    and f"{key_base}{name}_g" not in plain and f"{key_base}{name}_orig" not in plain:
                from torch.nn import utils

                (utils.remove_weight_norm if kind == "WeightNorm" else utils.remove_spectral_norm)(m, name)
                folded.append(f"{base}{name}")
    if folded:
        log.info("%s: folded the weight_norm/spectral_norm of %s into plain weights (the export holds each "
                 "fixed weight itself)", where, ", ".join(folded[:5]) + (" ..." if len(folded) > 5 else ""))
    return bool(folded)


def _advice(own: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """Why a state_dict does not load, in words, with what to do for weight_norm/spectral_norm/compile."""
    diff = _compare(_shapes(own), _shapes(state)) or "the tensors differ"
    keys = " ".join(list(state) + list(own))
    hints = []
    if "parametrizations." in keys or "weight_g" in keys or "weight_orig" in keys or "weight_u" in keys:
        hints.append("one side uses weight_norm/spectral_norm parametrizations and the other does not: load into a "
                     "model built the same way (apply the same torch.nn.utils.parametrizations before loading), "
                     "or remove them on both sides (torch.nn.utils.parametrize.remove_parametrizations) before "
                     "fixing")
    if "_orig_mod." in keys:
        hints.append("one side is a torch.compile'd model: load into the uncompiled model (model._orig_mod) and "
                     "compile after loading")
    if "module." in keys and any(k.startswith("module.") for k in list(state)[:1] + list(own)[:1]):
        hints.append("one side is wrapped (DistributedDataParallel/DataParallel: keys start with 'module.'): load "
                     "into the unwrapped model (model.module)")
    return diff + ("; " + "; ".join(hints) if hints else "")


# --------------------------------------------------------------------------------------------
# recording


class RecipeMixin:
    """Mix into a ``torch.nn.Module`` subclass to record its constructor arguments at construction
    (as huggingface_hub's ``PyTorchModelHubMixin`` does), so a run of it exports and reloads anywhere::

        class Net(pwfn.RecipeMixin, nn.Module):
            def __init__(self, hidden: int = 32): ...

    Arguments that are not plain JSON (a module, a function) cannot be recorded: the recipe is
    then refused when a run records it, naming them.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        inst = super().__new__(cls)
        recorded: dict[str, Any] = {}
        dropped: list[str] = []
        try:
            sig = inspect.signature(cls.__init__)  # type: ignore[misc]
            bound = sig.bind(None, *args, **kwargs)
            bound.apply_defaults()
            params = list(sig.parameters.values())
            for p in params[1:]:
                if p.name not in bound.arguments:
                    continue
                value = bound.arguments[p.name]
                if p.kind is p.VAR_POSITIONAL:
                    if value:
                        dropped.append(f"*{p.name}")
                elif p.kind is p.VAR_KEYWORD:
                    for k, v in value.items():
                        (recorded.__setitem__(k, v) if _is_json(v) else dropped.append(k))
                elif _is_json(value):
                    recorded[p.name] = value
                else:
                    dropped.append(p.name)
        except (TypeError, ValueError):  # the constructor raises its own error for bad arguments
            dropped.append("(arguments that do not fit the constructor)")
        object.__setattr__(inst, _INIT, recorded)
        object.__setattr__(inst, _DROPPED, dropped)
        return inst


def set_recipe(model: nn.Module, factory: Union[str, Callable[..., nn.Module]], /, **kwargs: Any) -> Recipe:
    """Say how ``model`` is rebuilt: ``factory`` (a registered model name, ``"module:qualname"``, or the
    class/function itself) called with ``kwargs``. Checked at once (importable, JSON arguments,
    builds a model with ``model``'s weights' names and shapes, on the meta device); a run of ``model``
    then records it and its exports load anywhere. Returns the recipe."""
    from torch import nn

    from .zoo import model_factory

    if not isinstance(model, nn.Module):
        raise ModelError(f"set_recipe needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(factory, str) and ":" not in factory:
        recipe: Recipe = {"name": factory, "kwargs": kwargs}
        fn = model_factory(factory)
        mod = getattr(fn, "__module__", "") if fn is not None else ""
        if mod and not mod.startswith("pwfn.") and mod != "__main__":
            recipe["module"] = mod
    else:
        spec = factory if isinstance(factory, str) else factory_spec(factory)
        recipe = {"factory": spec, "kwargs": kwargs}
    if not _is_json(kwargs):
        bad = [k for k, v in kwargs.items() if not _is_json(v)]
        raise ModelError(f"set_recipe: the arguments {bad} are not plain JSON (numbers, strings, lists, dicts); "
                         "pass what builds them instead (e.g. a layer's name, not the layer)")
    rec = check_recipe(recipe, _unwrap(model).state_dict(), f"set_recipe({describe(recipe)})")
    object.__setattr__(model, _ATTR, rec)
    return rec


def _unwrap(model: nn.Module) -> nn.Module:
    """The model a torch.compile wrapper holds (its weights are the same tensors)."""
    from torch import nn

    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def recipe_of(model: nn.Module) -> tuple[Optional[Recipe], str]:
    """The checked recipe of ``model`` and where it came from, or ``(None, why not and what would work)``.

    See the module docstring for the sources, tried in order; nothing is constructed for real.
    """
    inner = _unwrap(model)
    state = inner.state_dict()
    cls = type(inner)
    candidates: list[tuple[str, Any]] = []
    explicit = getattr(model, _ATTR, None) or getattr(inner, _ATTR, None)
    if explicit is not None:
        candidates.append(("set_recipe", explicit))
    reasons: list[str] = []
    try:
        spec: Optional[str] = factory_spec(cls)
    except ModelError as exc:
        spec = None
        reasons.append(str(exc))
    if spec is not None:
        if _INIT in inner.__dict__:
            dropped = inner.__dict__.get(_DROPPED) or []
            if dropped:
                reasons.append(f"{cls.__name__}'s constructor arguments {dropped} are not plain JSON")
            else:
                candidates.append(("RecipeMixin", {"factory": spec, "kwargs": inner.__dict__[_INIT]}))
        hub = inner.__dict__.get("_hub_mixin_config")
        if hub is not None:
            missing = _unrecorded_params(cls, hub) if isinstance(hub, dict) else ["config"]
            if missing:
                reasons.append(f"huggingface_hub's mixin did not record {cls.__name__}'s arguments {missing} "
                               "(not JSON)")
            else:
                candidates.append(("PyTorchModelHubMixin", {"factory": spec, "kwargs": dict(hub)}))
        if not candidates and _no_required_args(cls):
            candidates.append(("a constructor without arguments", {"factory": spec, "kwargs": {}}))
    for source, rec in candidates:
        try:
            return check_recipe(rec, state, f"the recipe from {source}"), source
        except ModelError as exc:
            reasons.append(str(exc))
    if not candidates and spec is not None and not reasons:
        reasons.append(f"{cls.__name__}'s constructor needs arguments that were not recorded")
    why = "; ".join(reasons) or "no recipe"
    return None, (f"{why}. To export it anywhere, say how it is built: pwfn.set_recipe(model, "
                  "'mypkg.models:make_model', **kwargs), or mix pwfn.RecipeMixin into its class; or pass the "
                  "model when exporting (model=..., pwfn export --model module:factory)")


def _unrecorded_params(cls: type, recorded: Mapping[str, Any]) -> list[str]:
    try:
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    except (TypeError, ValueError):
        return []
    out = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "config":
            continue
        if p.name not in recorded:
            out.append(p.name)
    return out


def _no_required_args(cls: type) -> bool:
    from torch import nn

    if cls.__init__ is nn.Module.__init__:
        return cls is not nn.Module and cls.__module__.split(".")[0] != "torch"
    try:
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    except (TypeError, ValueError):
        return False
    if cls.__module__.split(".")[0] == "torch":  # nn.Sequential() & co build an empty model
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in list(sig.parameters.values())[1:])


# --------------------------------------------------------------------------------------------
# the CLI's --model


def parse_model_spec(spec: str, kwargs_json: Optional[str] = None, recorded: Optional[Mapping[str, Any]] = None
                     ) -> Recipe:
    """A recipe from ``--model SPEC [--model-kwargs JSON]``: ``SPEC`` is ``module:qualname`` or a
    registered model name. Without ``--model-kwargs``, the run's recorded kwargs are used when it
    recorded the same factory. ``ConfigError`` on malformed input."""
    kwargs: dict[str, Any] = {}
    if kwargs_json is not None:
        try:
            parsed = json.loads(kwargs_json)
        except ValueError as exc:
            raise ConfigError(f"--model-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ConfigError("--model-kwargs must be a JSON object, e.g. '{\"hidden\": 32}'")
        kwargs = parsed
    if ":" in spec:
        if not _SPEC.match(spec):
            raise ConfigError(f"--model {spec!r} is not of the form 'package.module:Name'")
        rec: Recipe = {"factory": spec, "kwargs": kwargs}
    else:
        rec = {"name": spec, "kwargs": kwargs}
    if kwargs_json is None and recorded:
        same = recorded.get("factory") == rec.get("factory") and recorded.get("name") == rec.get("name")
        if same:
            rec = dict(recorded)
    try:
        out = validate_recipe(rec, "--model")
    except ModelError as exc:
        raise ConfigError(str(exc)) from exc
    assert out is not None
    return out


def ensure_cwd_importable() -> None:
    """Let ``module:qualname`` name a module in the current folder (as ``python -m`` does)."""
    if "" not in sys.path and "." not in sys.path:
        import os

        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)

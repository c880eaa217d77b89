"""Fixing methods, registered by name.

A method is an object behind the small protocol of :class:`pwfn.methods.base.Method`: it
prepares the model, says how tolerant each weight is, runs its fixing round, and says how to
train between rounds. The round loop (:class:`pwfn.Fixer`, ``pwfn.compress``, the CLI) talks to
that protocol only, never to a method's name.

The built-in methods live one per module in this package (``pwfn``, ``wfn``,
``wfn_published``), each registering its class with :func:`register_method`; a new built-in
method is one new module here. They are listed from the package's files without importing them,
so the CLI names them without loading torch. A method defined anywhere else registers itself
the same way::

    from pwfn.methods import register_method
    from pwfn.methods.wfn import WFNMethod

    @register_method("wfn_wide")
    class WideWFN(WFNMethod):
        section = "wfn"          # the config section it reads
        def tolerance(self, view, round_index):
            return 2 * super().tolerance(view, round_index)

and is then usable by name (``pwfn.compress(..., method="wfn_wide")``, ``pwfn.Fixer(model,
"wfn_wide")``). This module is torch-free.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, TypeVar

from ..errors import ConfigError

__all__ = ["builtin_method_names", "check_method_name", "get_method", "method_names", "register_method"]

_REGISTRY: dict[str, type] = {}
#: modules of this package that hold no method
_NOT_METHODS = frozenset({"base"})

T = TypeVar("T", bound=type)


def builtin_method_names() -> tuple[str, ...]:
    """The methods shipped in this package (one module each), found without importing them."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_") and m.name not in _NOT_METHODS))


def method_names() -> tuple[str, ...]:
    """Every method usable by name: the built-in ones, then those registered from elsewhere."""
    builtin = builtin_method_names()
    return builtin + tuple(n for n in _REGISTRY if n not in builtin)


def register_method(name: str, *, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: make a :class:`~pwfn.methods.base.Method` subclass usable as ``method=name``.

    ``name`` must be a Python identifier (it names the method's run folder). Registering a name
    twice raises unless ``replace=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a method name must be an identifier (it names a run folder), got {name!r}")

    def decorate(cls: T) -> T:
        old = _REGISTRY.get(name)
        if old is not None and old is not cls and not replace:
            raise ConfigError(f"method {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                              "pass replace=True to replace it")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def check_method_name(name: Any) -> str:
    """``name`` if a method is usable by it (nothing imported); otherwise a ``ConfigError`` listing the
    methods and the closest match."""
    if not isinstance(name, str):
        raise ConfigError(f"method must be a method name or a Method class, got {type(name).__name__}")
    names = method_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}; choose one of {list(names)}.{hint}")
    return name


def get_method(name: Any) -> type:
    """The method class registered as ``name`` (a built-in one is imported on first use).

    An unknown name raises ``ConfigError`` listing the methods and the closest match.
    """
    check_method_name(name)
    if name not in _REGISTRY:  # a built-in method registers itself when its module is imported
        importlib.import_module(f"{__name__}.{name}")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"the module pwfn.methods.{name} registers no method named {name!r}")
    return cls

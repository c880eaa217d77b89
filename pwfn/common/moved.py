"""The module paths pwfn had before its layer folders (0.1), importable for one more release.

``import pwfn.fixer`` (or a pickle, a ``torch.save``'d object, a ``"pwfn.models:mlp"`` factory
recorded in a run folder, a config naming an old path) gets the module at its new place,
:mod:`pwfn.training.fixer`: the very same module object, so ``pwfn.fixer.Fixer is
pwfn.training.fixer.Fixer``. The first such import in a process warns once with a
``DeprecationWarning`` naming the new path. :func:`install` (called by ``pwfn/__init__.py``) puts
the finder on ``sys.meta_path``; it answers only for the names in :data:`MOVED`.

:func:`old_name` goes the other way: a run's model fingerprint names a class by its 0.1 module
path, so run folders made before the move still resume.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Optional

#: old module path -> new module path (the layer folders of 0.2)
MOVED: dict[str, str] = {
    **{f"pwfn.{m}": f"pwfn.common.{m}" for m in ("io", "files", "catalog", "hints", "console")},
    **{f"pwfn.{m}": f"pwfn.core.{m}" for m in (
        "centres", "engine", "_engine_fast", "engine_reference", "sharding", "wfn_published", "schedules",
        "metrics", "regularizers")},
    **{f"pwfn.{m}": f"pwfn.model.{m}" for m in ("coverage", "plumbing", "recipes", "config", "presets")},
    "pwfn.models": "pwfn.model.zoo",
    **{f"pwfn.{m}": f"pwfn.training.{m}" for m in (
        "fixer", "guard", "contract_rounds", "contract", "train", "budget", "checks", "distributed", "tasks")},
    **{f"pwfn.{m}": f"pwfn.run.{m}" for m in (
        "pipeline", "experiment", "manifest", "lock", "runlog", "rundata", "ownership", "report")},
    **{f"pwfn.{m}": f"pwfn.tools.{m}" for m in ("doctor", "inspection", "plot", "configdoc")},
}

_OLD_BY_NEW = {new: old for old, new in MOVED.items()}


def new_name(module: str) -> str:
    """``module``'s current path (itself when it did not move)."""
    return MOVED.get(module, module)


def old_name(module: str) -> str:
    """The path ``module`` had before the layer folders (itself when it did not move)."""
    return _OLD_BY_NEW.get(module, module)


def _warn(message: str) -> None:
    """A DeprecationWarning blamed on the line that imports (or unpickles), past the import machinery."""
    frame = sys._getframe(1)
    while frame.f_back is not None and ("importlib" in frame.f_code.co_filename
                                        or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(f"{spec.name} moved to {self.new}; import it from there ({spec.name} goes away in the next release)")
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has set __spec__ to the alias's spec: give the module back its own
        module.__spec__ = self._spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[object] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


_FINDER = _Finder()


def install() -> None:
    """Put the old paths' finder first on ``sys.meta_path`` (once): first, so that no other finder
    (a stale install's, an editable install's) answers for an old path with an old file."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)

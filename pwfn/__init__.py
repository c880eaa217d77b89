"""pwfn: probabilistic weight fixing networks.

Compress a trained network onto a handful of shared power-of-two weight values:
``pwfn.compress(model, train_loader, val_loader, method="pwfn")``.
"""

from __future__ import annotations

from typing import Any

from .common import moved as _moved

__version__ = "0.1.0"

# The module paths of 0.1 (pwfn.fixer, pwfn.models, ...) keep working for one release, with a warning.
_moved.install()

_LAZY = {
    "compress": ("pwfn.run.pipeline", "compress"),
    "FixingResult": ("pwfn.run.pipeline", "FixingResult"),
    "load_config": ("pwfn.model.config", "load_config"),
    "RunConfig": ("pwfn.model.config", "RunConfig"),
    "create_model": ("pwfn.model.zoo", "create_model"),
    "list_models": ("pwfn.model.zoo", "list_models"),
    "make_loaders": ("pwfn.data", "make_loaders"),
    "fix_round": ("pwfn.core.engine", "fix_round"),
    "EngineConfig": ("pwfn.core.engine", "EngineConfig"),
    "QuantView": ("pwfn.model.plumbing", "QuantView"),
    "register_layer": ("pwfn.model.coverage", "register_layer"),
    "Fixer": ("pwfn.training.fixer", "Fixer"),
    "Task": ("pwfn.training.tasks", "Task"),
    "CustomTask": ("pwfn.training.tasks", "CustomTask"),
    "BatchAdapter": ("pwfn.training.tasks", "BatchAdapter"),
    "register_task": ("pwfn.training.tasks", "register_task"),
    "plan_coverage": ("pwfn.model.coverage", "plan"),
    "enable_logging": ("pwfn.common.console", "enable_logging"),
    "AccuracyContract": ("pwfn.training.contract", "AccuracyContract"),
    "ContractError": ("pwfn.errors", "ContractError"),
    "RecipeMixin": ("pwfn.model.recipes", "RecipeMixin"),
    "set_recipe": ("pwfn.model.recipes", "set_recipe"),
    "export_run": ("pwfn.export", "export_run"),
    "export_targets": ("pwfn.export.targets", "export_targets"),
    "load_packed_model": ("pwfn.export", "load_packed_model"),
    "load_exported_model": ("pwfn.export", "load_exported_model"),
    "save_pretrained": ("pwfn.export.share", "save_pretrained"),
    "from_pretrained": ("pwfn.export.hub", "from_pretrained"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    # Lazy so that `import pwfn` stays cheap and optional parts load only when used.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if f"{__name__}.{name}" in _moved.MOVED:  # pwfn.fixer without importing it: the moved module, warned
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pwfn' has no attribute {name!r}")

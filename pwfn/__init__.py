"""pwfn: probabilistic weight fixing networks.

Compress a trained network onto a handful of shared power-of-two weight values:
``pwfn.compress(model, train_loader, val_loader, method="pwfn")``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compress": ("pwfn.pipeline", "compress"),
    "FixingResult": ("pwfn.pipeline", "FixingResult"),
    "load_config": ("pwfn.config", "load_config"),
    "RunConfig": ("pwfn.config", "RunConfig"),
    "create_model": ("pwfn.models", "create_model"),
    "list_models": ("pwfn.models", "list_models"),
    "make_loaders": ("pwfn.data", "make_loaders"),
    "fix_round": ("pwfn.engine", "fix_round"),
    "EngineConfig": ("pwfn.engine", "EngineConfig"),
    "QuantView": ("pwfn.plumbing", "QuantView"),
    "register_layer": ("pwfn.coverage", "register_layer"),
    "Fixer": ("pwfn.fixer", "Fixer"),
    "Task": ("pwfn.tasks", "Task"),
    "CustomTask": ("pwfn.tasks", "CustomTask"),
    "BatchAdapter": ("pwfn.tasks", "BatchAdapter"),
    "register_task": ("pwfn.tasks", "register_task"),
    "plan_coverage": ("pwfn.coverage", "plan"),
    "enable_logging": ("pwfn.console", "enable_logging"),
    "AccuracyContract": ("pwfn.contract", "AccuracyContract"),
    "ContractError": ("pwfn.errors", "ContractError"),
    "RecipeMixin": ("pwfn.recipes", "RecipeMixin"),
    "set_recipe": ("pwfn.recipes", "set_recipe"),
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
    raise AttributeError(f"module 'pwfn' has no attribute {name!r}")

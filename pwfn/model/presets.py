"""The shipped run configs, usable by name: ``pwfn compare digits_mlp``.

The repository keeps them in its top-level ``configs/`` folder; a wheel carries a copy as
``pwfn/_configs`` (see ``setup.py``). :func:`config_dir` finds whichever is there: the repository
folder first (an editable install or a checkout, so edits to ``configs/`` take effect at once),
then the packaged copy. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent.parent  # pwfn/ (this module is pwfn/model/presets.py)


def _candidates() -> list[Path]:
    return [_PACKAGE.parent / "configs", _PACKAGE / "_configs"]


def config_dir() -> Optional[Path]:
    """The folder that holds the shipped ``*.yaml`` configs, or None when none is found."""
    for folder in _candidates():
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def list_configs() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    folder = config_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def config_path(name: str) -> Path:
    """The file of the shipped config ``name`` (``digits_mlp`` or ``digits_mlp.yaml``).

    Raises ``ConfigError`` with the list of shipped names (and a close match) when there is none.
    """
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    folder = config_dir()
    if folder is not None and stem and "/" not in stem and "\\" not in stem:
        path = folder / f"{stem}.yaml"
        if path.is_file():
            return path
    names = list_configs()
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config.{hint} "
                      f"Shipped configs: {', '.join(names) or '(none found)'}")


def resolve_config(arg: Optional[str]) -> Optional[str]:
    """What a command's CONFIG argument means: an existing path as given, else a shipped config's path.

    ``None`` (no argument) stays ``None`` (the built-in defaults). A path-like argument that does
    not exist (it has a folder part, or ends in .yaml and names no shipped config) is returned
    unchanged, so ``load_config`` reports the missing file as before.
    """
    if arg is None:
        return None
    p = Path(arg)
    try:
        if p.exists():
            return arg
    except (OSError, ValueError):
        return arg
    looks_like_path = any(sep in arg for sep in ("/", "\\"))
    if looks_like_path:
        return arg
    try:
        return str(config_path(arg))
    except ConfigError:
        if arg.endswith((".yaml", ".yml")):
            return arg  # a missing file: load_config says "does not exist"
        raise

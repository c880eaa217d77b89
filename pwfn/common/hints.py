"""What a message tells the user to do, in the caller's own language, and install commands that work.

A message that suggests a setting names it the way the caller writes it. The ``pwfn`` command runs
its commands inside :func:`command_line`, where :func:`setting` reads ``--set pwfn.k_min=0.0625``
and :func:`start_over` ``--fresh``; from Python (``pwfn.compress``, ``pwfn.Fixer``,
``pwfn.load_config``) the same hints read ``overrides=["pwfn.k_min=0.0625"]`` and
``resume=False``. Every site formats its advice through these functions, so there is one spelling
per language and no site decides it.

:func:`install_hint` names a missing optional extra with a command that works today: the extra's
own requirements as the installed distribution declares them, and ``pip install '.[extra]'`` for
a clone of the repository. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import shlex
from collections.abc import Iterator, Mapping
from typing import Any

#: the distribution's name on a package index (``pwfn`` there is an unrelated project)
DISTRIBUTION = "pwfn-compress"

_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("pwfn_command_line", default=False)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within this block messages speak the command line's language (``--set``, ``--fresh``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def in_command_line() -> bool:
    """Whether the ``pwfn`` command (not Python code) is the caller."""
    return _COMMAND_LINE.get()


def _value(value: Any) -> str:
    """A value as both ``--set`` (YAML) and ``overrides`` read it: null/true/false, numbers as %g."""
    if value is ...:
        return "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def settings(values: Mapping[str, Any]) -> str:
    """Config keys to set, e.g. ``{"pwfn.k_min": 0.0625}``: ``--set pwfn.k_min=0.0625`` on the command
    line, ``overrides=["pwfn.k_min=0.0625"]`` from Python. ``...`` stands for a value to choose."""
    pairs = [f"{key}={_value(value)}" for key, value in values.items()]
    if in_command_line():
        return " ".join(f"--set {pair}" for pair in pairs)
    return "overrides=[" + ", ".join(f'"{pair}"' for pair in pairs) + "]"


def setting(key: str, value: Any = ...) -> str:
    """One config key to set (see :func:`settings`)."""
    return settings({key: value})


def start_over() -> str:
    """How to start a run over instead of resuming it: ``--fresh``, or ``resume=False`` from Python."""
    return "--fresh" if in_command_line() else "resume=False"


def other_run_folder() -> str:
    """How to keep an existing run folder and write a new one beside it."""
    if in_command_line():
        return f"another name ({setting('name')})"
    return "another run_dir (or, for pwfn.run.experiment, another config name)"


def shipped_config(name: str) -> str:
    """How to use a shipped config: ``pwfn run NAME`` on the command line, ``config="NAME"`` from Python."""
    return f"the shipped config {name} (pwfn run {name})" if in_command_line() else f'config="{name}"'


_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def extra_requirements(extra: str) -> list[str]:
    """The requirements of ``extra`` as the installed distribution declares them (empty when pwfn
    runs from a source tree that was never installed, or the extra does not exist)."""
    from importlib import metadata

    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if any(m == extra for m in _EXTRA_MARKER.findall(marker)):
            out.append(spec.strip())
    return out


def install_hint(extra: str, *, reinstall: bool = False) -> str:
    """A pip command that installs the optional extra ``extra``, e.g. for ``plot``:
    ``pip install 'matplotlib>=3.5' (the 'plot' extra; in a clone of pwfn: pip install '.[plot]')``."""
    flag = "--force-reinstall " if reinstall else ""
    from_clone = f"pip install {flag}'.[{extra}]'"
    reqs = extra_requirements(extra)
    if not reqs:
        return f"{from_clone} in a clone of pwfn (the '{extra}' extra)"
    return f"pip install {flag}{' '.join(shlex.quote(r) for r in reqs)} (the '{extra}' extra; in a clone of pwfn: {from_clone})"


__all__ = ["DISTRIBUTION", "command_line", "in_command_line", "settings", "setting", "start_over",
           "other_run_folder", "shipped_config", "extra_requirements", "install_hint"]

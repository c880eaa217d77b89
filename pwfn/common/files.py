"""Reading files safely: regular files only, bounded sizes, bounded nesting.

Everything pwfn reads back (configs, run-folder JSON, checkpoints named by users) goes through
these checks first, so a FIFO, a device, a folder, a huge or deeply nested file is refused with
a message naming it instead of blocking, exhausting memory or recursing. Torch-free.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Optional, Union

from ..errors import PwfnError, RunFileError

PathLike = Union[str, "os.PathLike[str]"]

#: deepest nesting of JSON/YAML data read back
MAX_JSON_DEPTH = 64




def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file_problem(path: PathLike) -> Optional[str]:
    """None when ``path`` is a regular file (after symlinks), else what it is instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file)"
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return f"cannot be accessed ({exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    return f"is {_kind(st.st_mode)}, not a file"


def read_limited(path: PathLike, what: str, max_bytes: int, error: type[PwfnError] = RunFileError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else raises ``error``."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise error(f"{what} {str(path)!r} {problem}")
    try:
        # O_NONBLOCK: a FIFO swapped in after the check above must not block the open; fstat then
        # checks the file actually opened
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{what} {str(path)!r} is {_kind(st.st_mode)}, not a file")
            size = st.st_size
            data = b"" if size > max_bytes else fh.read(min(size, max_bytes) + 1)
            if size <= max_bytes and len(data) > size:  # a file that grew while read: read the rest, bounded
                data += fh.read(max_bytes + 1 - len(data))
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {exc}") from exc
    except MemoryError as exc:
        raise error(f"{what} {str(path)!r} is too large to read into memory") from exc
    if size > max_bytes or len(data) > max_bytes:
        raise error(f"{what} {str(path)!r} is larger than {max_bytes:,} bytes: it is not a file pwfn wrote")
    return data


def json_depth_exceeds(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests deeper than ``max_depth`` (iterative: never recurses itself)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(text: Union[str, bytes], where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` whose every failure (syntax, encoding, nesting, NaN-free limits) is a RunFileError."""
    try:
        obj = json.loads(text)
    except RecursionError as exc:
        raise RunFileError(f"{where} nests deeper than {max_depth} levels: it is not a file pwfn wrote") from exc
    except (ValueError, UnicodeDecodeError, MemoryError) as exc:
        raise RunFileError(f"{where} is not valid JSON: {exc}") from exc
    if json_depth_exceeds(obj, max_depth):
        raise RunFileError(f"{where} nests deeper than {max_depth} levels: it is not a file pwfn wrote")
    return obj


# --------------------------------------------------------------------------------------------
# config size (alias bombs)

#: most values a config may expand to (YAML aliases are counted once per use)
MAX_CONFIG_VALUES = 100_000
#: largest config file read
MAX_CONFIG_BYTES = 1 << 20


def count_values(obj: Any, limit: int = MAX_CONFIG_VALUES, max_depth: int = MAX_JSON_DEPTH) -> Optional[str]:
    """None when ``obj`` expands to at most ``limit`` values nested at most ``max_depth`` deep;
    else what is wrong. Shared (aliased) sub-trees are counted every time they are reached, and
    the walk stops as soon as a limit is passed, so an alias bomb costs nothing to refuse."""
    count = 0
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > limit:
            return f"expands to more than {limit:,} values (nested YAML aliases?)"
        if isinstance(node, dict):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            stack.extend((v, depth + 1) for v in node)
    return None

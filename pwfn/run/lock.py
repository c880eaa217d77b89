"""An advisory lock per run folder: one writer at a time.

``pwfn run``/``compare``, ``pwfn.compress(run_dir=...)`` and ``pwfn export`` hold
``<folder>/.pwfn.lock`` while they write. The lock is an ``flock`` (POSIX) or ``msvcrt``
(Windows) lock on that file, so the operating system releases it when the holder exits in any
way, SIGKILL included: a dead holder's lock is simply taken over by the next writer. The file
itself stays; it records who holds it (pid, host, start time, command) for the error message
of a second writer, which fails at once with :class:`RunFolderBusyError` and changes nothing.

Locks are re-entrant within a process: a comparison holds its folder's lock and the method
runs inside it lock the same folder again (by :func:`lock_target`) without blocking.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..common.hints import other_run_folder
from ..errors import PwfnError, RunFileError
from ..methods import method_names

LOCK_FILE = ".pwfn.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


class RunFolderBusyError(PwfnError):
    """Another process is writing into this run folder."""


#: the lock file is opened without following a symbolic link, and without blocking on a FIFO
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_lock(path: Path, flags: int) -> int:
    """An fd of the lock file at ``path``, only when it is a plain file of its own (not a link, folder,
    FIFO or device, not a hard link to another file): writing holder info into anything else could
    change a file pwfn did not make. Raises RunFileError saying what is in its place."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            what = f"a symbolic link (to {os.readlink(path)!r})"
        elif os.path.isdir(path):
            what = "a folder"
        else:
            raise
        raise RunFileError(_not_a_lock(path, what)) from exc
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        elif st.st_nlink != 1:
            problem = f"a hard link to another file ({st.st_nlink} names)"
        if problem is not None:
            raise RunFileError(_not_a_lock(path, problem))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_a_lock(path: Path, what: str) -> str:
    return (f"the lock file {str(path)!r} is {what}: pwfn's lock is a plain file it creates itself, and it never "
            "writes through anything else. Remove it (it is not pwfn's) and run again")


_held: dict[str, tuple[int, int]] = {}  # resolved folder -> (fd, depth)
_guard = threading.Lock()


def lock_target(folder: Union[str, os.PathLike]) -> Path:
    """The folder whose lock guards writes into ``folder``.

    A method folder of a config run (``runs/<name>/pwfn`` next to ``runs/<name>/config.yaml``
    or a lock file) is guarded by its run folder, which ``pwfn run``/``compare`` lock; any
    other folder by itself.
    """
    folder = Path(folder)
    parent = folder.parent
    if folder.name in method_names() and ((parent / "config.yaml").exists() or (parent / LOCK_FILE).exists()
                                   or (parent / "baseline.pt").exists()):
        return parent
    return folder


def _key(folder: Path) -> str:
    return str(folder.resolve())


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. a filesystem without locks
            if exc.errno in (37, 38, 95):  # ENOLCK, ENOSYS, EOPNOTSUPP
                return True
            raise
    try:  # pragma: no cover - Windows
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:  # pragma: no cover
        return False


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)


def holder_info(folder: Union[str, os.PathLike]) -> Optional[dict]:
    """What the lock file says about its (last) holder, or None."""
    try:
        fd = _open_lock(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except (OSError, PwfnError):
        return None
    try:
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)


def describe_holder(info: Optional[dict]) -> str:
    if not info:
        return "another process"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    cmd = info.get("command")
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {when}"
            + (f", running {cmd!r}" if isinstance(cmd, str) and cmd else "") + ")")


def is_locked(folder: Union[str, os.PathLike]) -> Optional[dict]:
    """The holder's info when another process holds the folder's lock now, else None (changes nothing)."""
    folder = lock_target(folder)
    path = folder / LOCK_FILE
    if not folder.is_dir() or _key(folder) in _held:
        return None
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, PwfnError):  # no lock file, or not one pwfn made (acquire() refuses it, saying so)
        return None
    try:
        if _try_lock(fd):
            return None
        return holder_info(folder) or {}
    finally:
        os.close(fd)  # closing drops a lock we may just have taken


class RunLock:
    """The lock of one run folder, held by this process (see :func:`acquire`)."""

    def __init__(self, folder: Path, owned: bool) -> None:
        self.folder = folder
        self.owned = owned
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _guard:
            key = _key(self.folder)
            fd, depth = _held.get(key, (-1, 0))
            if depth <= 1:
                _held.pop(key, None)
                if fd >= 0:
                    _unlock(fd)
            else:
                _held[key] = (fd, depth - 1)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_free(folder: Union[str, os.PathLike], what: str = "run folder") -> None:
    """Fail at once, changing nothing, when another process holds ``folder``'s lock."""
    info = is_locked(folder)
    if info is not None:
        raise RunFolderBusyError(_busy_message(lock_target(folder), info, what))


def _busy_message(folder: Path, info: Optional[dict], what: str) -> str:
    return (f"{what} {str(folder)!r} is in use by {describe_holder(info)}: two writers would mix their files. "
            f"Wait for it to finish (or stop it), or use {other_run_folder()}")


def acquire(folder: Union[str, os.PathLike], what: str = "run folder") -> RunLock:
    """Take ``folder``'s lock (creating the folder and the lock file if needed), or raise
    :class:`RunFolderBusyError` at once. Re-entrant within this process."""
    folder = lock_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(folder)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return RunLock(folder, owned=False)
        fd = _open_lock(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            if not _try_lock(fd):
                raise RunFolderBusyError(_busy_message(folder, holder_info(folder), what))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                    "command": " ".join(sys.argv)[:500]}
            data = (json.dumps(info) + "\n").encode()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = (fd, 1)
        return RunLock(folder, owned=True)

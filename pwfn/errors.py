"""The project's own error types: every failure a user can act on raises one of these."""

from __future__ import annotations


class PwfnError(Exception):
    """Base class of every error pwfn raises on purpose."""


class ConfigError(PwfnError, ValueError):
    """A configuration file, key, value or override is invalid."""


class DataError(PwfnError, ValueError):
    """A dataset is missing, malformed or inconsistent."""


class EngineInputError(PwfnError, ValueError):
    """The fixing engine was given values, tolerances or fractions it cannot use."""


class ModelError(PwfnError, ValueError):
    """A model cannot be handled (no quantisable layer, unsupported layer, tied weights ...)."""


class RunFileError(PwfnError, ValueError):
    """A file of a run folder is unreadable, malformed, too large or too deep."""


class CheckpointError(PwfnError):
    """A checkpoint is corrupt, truncated, from another model or from another format version."""


class ArtefactError(PwfnError):
    """A packed artefact is corrupt, truncated or from an unsupported format version."""


class ContractError(PwfnError):
    """The accuracy contract cannot be kept: fixing would take the model further from the float model
    than the contract allows, even at the most cautious setting (the model is left at its last state
    within the contract)."""


class TrainingDivergedError(PwfnError):
    """The loss or a weight became NaN/inf during training."""


class PackError(PwfnError, ValueError):
    """The tensors, codebook, terms or metadata given to ``pwfn.export.packing.pack`` cannot be packed.

    A ``ValueError`` too, so callers that catch bad input generically still work.
    """


class StorageError(PwfnError, OSError):
    """Writing or reading a file failed at the operating-system level (full disk, read-only
    filesystem, a name too long, no permission ...); the message names the file and what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


_OS_HINTS = {
    "ENOSPC": "the disk is full: free some space, or write elsewhere with --out",
    "EDQUOT": "the disk quota is exhausted: free some space, or write elsewhere with --out",
    "EROFS": "the filesystem is read-only: write elsewhere with --out",
    "EACCES": "permission denied: fix the folder's permissions, or write elsewhere with --out",
    "EPERM": "operation not permitted: fix the folder's permissions, or write elsewhere with --out",
    "ENAMETOOLONG": "a file or folder name is too long (at most 255 bytes): use a shorter run name or path",
    "EEXIST": "something is already there under that name: remove it, or choose another name",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another path",
    "EISDIR": "a folder is where a file should be: remove it, or choose another path",
    "EMFILE": "too many open files: raise the limit (ulimit -n)",
    "EIO": "an input/output error: the disk may be failing",
}


def os_error_message(exc: OSError, action: str = "") -> str:
    """``exc`` as one line: what failed, on which file, and a hint for the common causes."""
    import errno as _errno

    name = _errno.errorcode.get(exc.errno or -1, "")
    what = exc.strerror or str(exc)
    target = exc.filename
    where = f" {str(target)!r}" if target is not None else ""
    if getattr(exc, "filename2", None) is not None:
        where += f" -> {str(exc.filename2)!r}"
    hint = _OS_HINTS.get(name)
    head = f"{action}{where}" if action else (f"cannot access{where}" if where else "an operating-system error")
    return f"{head}: {what}" + (f" ({name})" if name else "") + (f"; {hint}" if hint else "")


def storage_error(exc: OSError, action: str = "") -> StorageError:
    """A :class:`StorageError` carrying ``exc``'s errno and a clear message."""
    err = StorageError(exc.errno, os_error_message(exc, action))
    err.filename = exc.filename
    return err

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


class CheckpointError(PwfnError):
    """A checkpoint is corrupt, truncated, from another model or from another format version."""


class ArtefactError(PwfnError):
    """A packed artefact is corrupt, truncated or from an unsupported format version."""


class TrainingDivergedError(PwfnError):
    """The loss or a weight became NaN/inf during training."""


class PackError(PwfnError, ValueError):
    """The tensors, codebook, terms or metadata given to ``pwfn.packing.pack`` cannot be packed.

    A ``ValueError`` too, so callers that catch bad input generically still work.
    """

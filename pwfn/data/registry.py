"""The dataset registry: sources by name, and what loading one returns.

Why a registry: a config names its dataset with a string, and each source module registers
itself (:func:`register_dataset`) with what it needs (a root folder or not), the options its
loader takes and the folder layout it expects, so :func:`load_dataset` can check a request and
say what is wrong before any file is read. Users register their own sources the same way.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pwfn.errors import ConfigError, DataError

from .augment import Augmentation
from .datasets import ImageDataset
from .images import PathLike

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """What a source loader returns: the dataset's own train (and maybe test) part.

    ``test`` is None when the dataset has no official test split (a seeded stratified split is
    carved from ``train`` instead). ``standard_mean``/``standard_std`` are the dataset's
    well-known normalisation constants, when it has some; ``augmentation`` is its usual
    training recipe and ``augment_by_default`` says whether ``augment="auto"`` turns it on.
    """

    name: str
    train: ImageDataset
    test: ImageDataset | None
    class_names: tuple[str, ...]
    standard_mean: tuple[float, ...] | None = None
    standard_std: tuple[float, ...] | None = None
    augmentation: Augmentation = Augmentation()
    augment_by_default: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry: how to load a source and what it needs."""

    name: str
    loader: Callable[..., DataSource]
    needs_root: bool
    description: str
    options: tuple[str, ...] = ()
    expected: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def canonical_name(name: str) -> str:
    """The registry key of a dataset name: case, spaces, '-' and '_' do not matter."""
    return name.strip().lower().replace("-", "").replace("_", "")


def register_dataset(spec: DatasetSpec) -> None:
    """Add a source to :data:`DATASETS` (names are matched case- and '-'/'_'-insensitively)."""
    key = canonical_name(spec.name)
    if key in DATASETS:
        raise ConfigError(f"dataset {spec.name!r} is already registered")
    DATASETS[key] = spec


def load_dataset(name: str, root: PathLike | None = None, **options: Any) -> DataSource:
    """Load a registered source by name; ``options`` go to its loader (see DATASETS[name])."""
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    spec = DATASETS.get(canonical_name(name))
    if spec is None:
        known = sorted(DATASETS)
        close = difflib.get_close_matches(canonical_name(name), known, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint} (known: {', '.join(known)})")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ConfigError(
            f"dataset {spec.name!r} does not take option(s) {', '.join(unknown)} "
            f"(allowed: {allowed})"
        )
    root_path = Path(root).expanduser() if root not in (None, "") else None
    if spec.needs_root:
        if root_path is None:
            raise DataError(
                f"dataset {spec.name!r} needs root=<folder> (no download here); expected "
                f"{spec.expected}"
            )
        if not root_path.exists():
            raise DataError(
                f"dataset {spec.name!r}: root {root_path} does not exist; expected {spec.expected}"
            )
    elif root_path is not None:
        logger.info("dataset %r is bundled; ignoring root=%s", spec.name, root_path)
        root_path = None
    return spec.loader(root_path, **options)

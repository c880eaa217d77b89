"""Loaders for a run: :class:`BatchLoader` and :func:`make_loaders`, the one call a run makes.

:func:`make_loaders` loads a source by name, splits it by seed, resolves the augmentation and
normalisation options (``"auto"`` follows the dataset's usual recipe and constants) and wraps
each split in a :class:`BatchLoader`, whose batches are a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pwfn.errors import ConfigError

from .augment import Augmentation
from .datasets import ImageDataset, TensorImageDataset, positive_int
from .images import PathLike
from .registry import DataSource, load_dataset
from .seeds import STREAM_AUGMENT, STREAM_SHUFFLE, check_seed, torch_generator
from .splits import Splits, make_splits
from .transform import BatchTransform, channel_stats

logger = logging.getLogger(__name__)

SamplerFactory = Callable[[Dataset], Sampler]
"""Builds the index sampler of one split from its dataset, e.g.
``functools.partial(DistributedSampler, num_replicas=world, rank=rank, seed=seed)``."""


class _EpochBatchSampler(Sampler):
    """The current epoch's batches, refilled by the owning loader before each iteration.

    It holds no reference back to the loader: a cycle would keep persistent workers alive
    until the garbage collector (or interpreter exit) gets to them.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Iterates (images, labels) batches whose order is a function of ``(seed, epoch)`` only.

    Why not a plain DataLoader: in-memory datasets are gathered a whole batch at a time (much
    faster than per-item collation), augmentation is batched in the main process (so it is
    identical for any ``num_workers``), and the epoch is explicit. Each ``iter()`` uses the
    current epoch and then advances it; :meth:`set_epoch` pins the next one (as with
    ``DistributedSampler``), and is forwarded to a ``sampler`` that has it. Lazy datasets are
    decoded by a ``DataLoader`` with ``num_workers`` processes fed with these batches.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        transform: BatchTransform,
        seed: int = 0,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = positive_int(batch_size, "batch_size")
        self.transform = transform
        self.seed = check_seed(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.sampler = sampler
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            logger.debug("pin_memory ignored: no CUDA device")
        self._epoch = 0
        self._batch_sampler = _EpochBatchSampler()
        self._dataloader: DataLoader | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``epoch`` (reseeds shuffling and augmentation)."""
        self._epoch = check_seed(epoch, "epoch")

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            return torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=torch_generator(self.seed, STREAM_SHUFFLE, epoch))
        return torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        order = self._order(epoch)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        augment_gen = torch_generator(self.seed, STREAM_AUGMENT, epoch)
        return self._iterate(batches, augment_gen)

    def _iterate(
        self, batches: list[torch.Tensor], augment_gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, TensorImageDataset):
            for idx in batches:
                images = self.dataset.images.index_select(0, idx)
                labels = self.dataset.labels.index_select(0, idx)
                yield self._finish(images, labels, augment_gen)
            return
        self._batch_sampler.batches = [b.tolist() for b in batches]
        if self._dataloader is None:
            self._dataloader = DataLoader(
                self.dataset,
                batch_sampler=self._batch_sampler,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        for images, labels in self._dataloader:
            yield self._finish(images, labels.to(torch.int64), augment_gen)

    def close(self) -> None:
        """Stop the decoding worker processes now (they are restarted by the next iteration)."""
        self._dataloader = None

    def _finish(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform(images, generator)
        if self.pin_memory:
            x, labels = x.pin_memory(), labels.pin_memory()
        return x, labels


@dataclass(frozen=True)
class Loaders:
    """What :func:`make_loaders` returns. ``val``/``test`` are None when that split is empty.

    ``mean``/``std`` are the normalisation applied to every batch (None: none applied).
    """

    train: BatchLoader
    val: BatchLoader | None
    test: BatchLoader | None
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: Augmentation | None = None
    splits: Splits | None = field(default=None, repr=False)


AugmentArg = Union[None, bool, str, Augmentation, Mapping[str, Any]]
NormalizeArg = Union[None, str, Sequence[Sequence[float]], Mapping[str, Sequence[float]]]


def _resolve_augmentation(augment: AugmentArg, source: DataSource) -> Augmentation | None:
    """``"auto"``/None: the dataset's recipe if it is on by default; True: its recipe; False:
    none; an :class:`Augmentation` or a mapping of its fields: exactly that."""
    if augment is None or (isinstance(augment, str) and augment.lower() == "auto"):
        return source.augmentation if source.augment_by_default else None
    if augment is True:
        return source.augmentation
    if augment is False or (isinstance(augment, str) and augment.lower() in ("none", "off")):
        return None
    if isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, Mapping):
        try:
            return Augmentation(**augment)
        except TypeError as exc:
            raise ConfigError(f"bad augment settings {dict(augment)!r}: {exc}") from exc
    raise ConfigError(
        f"augment must be 'auto', a bool, an Augmentation or a mapping, got {augment!r}"
    )


def _resolve_normalization(
    normalize: NormalizeArg, source: DataSource, train: ImageDataset, seed: int
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``"auto"``: standard constants when the dataset has them, else training-split stats;
    ``"standard"``, ``"train"``, ``"none"``, or explicit ``(mean, std)``."""
    channels = train.image_shape[0]
    has_standard = source.standard_mean is not None and len(source.standard_mean) == channels
    if normalize is None or (isinstance(normalize, str) and normalize.lower() == "auto"):
        normalize = "standard" if has_standard else "train"
    if isinstance(normalize, str):
        mode = normalize.lower()
        if mode == "none":
            return None, None
        if mode == "train":
            return channel_stats(train, seed=seed)
        if mode == "standard":
            if not has_standard:
                raise ConfigError(
                    f"dataset {source.name!r} has no standard normalisation constants"
                )
            return source.standard_mean, source.standard_std
        raise ConfigError(
            f"normalize must be 'auto', 'train', 'standard', 'none' or (mean, std), got {normalize!r}"
        )
    if isinstance(normalize, Mapping):
        pair = (normalize.get("mean"), normalize.get("std"))
    else:
        pair = tuple(normalize)  # type: ignore[assignment]
    try:
        mean, std = (tuple(float(v) for v in part) for part in pair)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"normalize must be (mean, std) sequences, got {normalize!r}") from exc
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(
            f"normalize needs {channels} means and {channels} positive stds, got {normalize!r}"
        )
    return mean, std


def make_loaders(
    name: str = "digits",
    root: PathLike | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    augment: AugmentArg = "auto",
    normalize: NormalizeArg = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_subset: int | None = None,
    val_subset: int | None = None,
    test_subset: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    sampler: SamplerFactory | None = None,
    eval_sampler: SamplerFactory | None = None,
    source: DataSource | None = None,
    **options: Any,
) -> Loaders:
    """Load ``name`` (or use ``source``), split it by ``seed`` and wrap each split in a loader.

    Training batches are shuffled and augmented from streams derived from ``(seed, epoch)``;
    val/test batches are in index order, never augmented. ``sampler``/``eval_sampler`` build an
    index sampler from a split's dataset (e.g. a partial ``DistributedSampler``) and replace
    the built-in order. ``num_workers`` only matters for lazily decoded sources (imagefolder).
    Remaining ``options`` go to :func:`load_dataset`.
    """
    seed = check_seed(seed)
    if source is None:
        source = load_dataset(name, root, **options)
    elif options:
        raise ConfigError("dataset options cannot be combined with a pre-loaded source")
    splits = make_splits(
        source,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train_subset=train_subset,
        val_subset=val_subset,
        test_subset=test_subset,
    )
    augmentation = _resolve_augmentation(augment, source)
    mean, std = _resolve_normalization(normalize, source, splits.train, seed)
    mean_t = torch.tensor(mean, dtype=torch.float32) if mean is not None else None
    std_t = torch.tensor(std, dtype=torch.float32) if std is not None else None
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size

    def loader(dataset: ImageDataset | None, train: bool) -> BatchLoader | None:
        if dataset is None or len(dataset) == 0:
            return None
        factory = sampler if train else eval_sampler
        return BatchLoader(
            dataset,
            batch_size=batch_size if train else eval_batch_size,
            transform=BatchTransform(mean_t, std_t, augmentation if train else None),
            seed=seed,
            shuffle=shuffle if train else False,
            drop_last=drop_last if train else False,
            sampler=factory(dataset) if factory is not None else None,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    train_loader = loader(splits.train, True)
    assert train_loader is not None
    logger.info(
        "data %s: train %d, val %d, test %d, shape %s, augment %s",
        source.name,
        len(splits.train),
        len(splits.val) if splits.val is not None else 0,
        len(splits.test) if splits.test is not None else 0,
        source.input_shape,
        augmentation,
    )
    return Loaders(
        train=train_loader,
        val=loader(splits.val, False),
        test=loader(splits.test, False),
        num_classes=source.num_classes,
        input_shape=source.input_shape,
        class_names=source.class_names,
        mean=mean,
        std=std,
        augmentation=augmentation,
        splits=splits,
    )

"""Source ``imagefolder``: an ImageFolder tree of image files, decoded lazily with Pillow.

``root/train/<class>/*`` with an optional held-out ``root/val`` (or ``validation``/``test``),
or a single ``root/<class>/*`` tree split by seed; only file names are read up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pwfn.errors import DataError

from ..augment import Augmentation
from ..datasets import ImageFolderDataset
from ..images import IMAGE_EXTENSIONS, IMAGEFOLDER_LAYOUT, class_folders
from ..registry import DatasetSpec, DataSource, register_dataset

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet's per-channel (mean, std) in [0, 1] pixel units, used for RGB image folders."""

_SPLIT_DIR_NAMES = ("val", "validation", "test")


def _load_imagefolder(
    root: Path | None,
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    channels: int = 3,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> DataSource:
    """``root/train/<class>/*`` (+ ``root/val``) or ``root/<class>/*``, decoded lazily.

    With split folders, ``val`` (else ``validation``/``test``) is the held-out test split and
    a validation split is carved from ``train``; without, everything is split by seed.
    """
    assert root is not None
    if not root.is_dir():
        raise DataError(f"imagefolder: root {root} does not exist; expected {IMAGEFOLDER_LAYOUT}")
    options = dict(image_size=image_size, resize_size=resize_size, channels=channels)
    train_dir = root / "train"
    has_splits = train_dir.is_dir() and bool(class_folders(train_dir))
    if has_splits:
        train = ImageFolderDataset.from_folder(train_dir, extensions=extensions, **options)
        test = None
        for name in _SPLIT_DIR_NAMES:
            if (root / name).is_dir():
                mapping = {n: i for i, n in enumerate(train.class_names)}
                test = ImageFolderDataset.from_folder(
                    root / name, class_to_idx=mapping, extensions=extensions, **options
                )
                break
    else:
        train = ImageFolderDataset.from_folder(root, extensions=extensions, **options)
        test = None
    standard = IMAGENET_STATS if channels == 3 else (None, None)
    return DataSource(
        "imagefolder",
        train,
        test,
        train.class_names,
        standard_mean=standard[0],
        standard_std=standard[1],
        augmentation=Augmentation(hflip=True),
        augment_by_default=True,
    )


register_dataset(
    DatasetSpec(
        "imagefolder",
        _load_imagefolder,
        True,
        "ImageFolder tree decoded lazily with Pillow",
        options=("image_size", "resize_size", "channels", "extensions"),
        expected=IMAGEFOLDER_LAYOUT,
    )
)

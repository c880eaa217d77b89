"""Image files: decode one file to a fixed-size tensor, list the files of an ImageFolder tree.

Why Pillow and numpy only: decoding is the one step a lazily read dataset repeats per item, and
torchvision is deliberately never imported (it would pin a torch build). The decode is the
usual deterministic evaluation transform; the scan reads only names, never pixels, so labels
and splits of a million-file tree cost a directory walk.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from pwfn.errors import DataError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)

IMAGEFOLDER_LAYOUT = (
    "root/train/<class>/<image> (optionally root/val/<class>/<image>) or "
    "root/<class>/<image>, images being " + "/".join(e[1:] for e in IMAGE_EXTENSIONS)
)
"""The folder layouts the imagefolder source accepts, quoted by its error messages."""

_RESAMPLE_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def default_resize(image_size: int) -> int:
    """The usual "resize to 256, crop 224" ratio, for any crop size."""
    return int(math.floor(image_size / 0.875 + 0.5))


def load_image(
    path: PathLike, *, image_size: int, resize_size: int | None = None, channels: int = 3
) -> torch.Tensor:
    """Decode one image file to a uint8 (channels, image_size, image_size) tensor.

    The shorter side is resized (bilinear) to ``resize_size`` and the centre
    ``image_size`` square is cut out: the usual evaluation-time transform, deterministic.
    JPEGs are decoded at a reduced DCT scale when much larger than needed (``draft``), which
    is what makes ImageNet-sized decoding affordable on a CPU.
    """
    path = Path(path)
    resize_size = default_resize(image_size) if resize_size is None else resize_size
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(mode, (resize_size, resize_size))
            img = img.convert(mode)
            width, height = img.size
            if min(width, height) != resize_size:
                scale = resize_size / min(width, height)
                new_size = (
                    max(resize_size, int(round(width * scale))),
                    max(resize_size, int(round(height * scale))),
                )
                img = img.resize(new_size, resample=_RESAMPLE_BILINEAR)
            width, height = img.size
            left, top = (width - image_size) // 2, (height - image_size) // 2
            if (width, height) != (image_size, image_size):
                img = img.crop((left, top, left + image_size, top + image_size))
            array = np.array(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def class_folders(folder: Path) -> list[Path]:
    """The class folders of ``folder`` (hidden ones skipped), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(class_dir: Path, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Image files under ``class_dir`` (recursive, symlinks followed) as sorted relative paths.

    ``os.walk`` rather than ``Path.rglob`` + ``is_file``: it tells files from folders without
    a ``stat`` per file, which matters on a million-file tree. Returns (files, skipped count).
    """
    found: list[str] = []
    skipped = 0
    base = class_dir.parent
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, base)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                skipped += 1
                continue
            found.append(os.path.join(rel, name))
    found.sort()
    return found, skipped


def scan_image_folder(
    folder: Path, class_to_idx: Mapping[str, int] | None, extensions: Sequence[str]
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """List the image files of ``folder/<class>/**`` (relative to ``folder``) and their labels.

    Classes are indexed by their sorted folder names; with ``class_to_idx`` (the training
    split's mapping) a held-out split reuses those indices and may not introduce new classes.
    Non-image and hidden files are skipped; an empty class folder is an error (it almost
    always means a broken copy).
    """
    exts = tuple(e.lower() for e in extensions)
    if not folder.is_dir():
        raise DataError(f"imagefolder: folder {folder} does not exist")
    classes = class_folders(folder)
    if not classes:
        raise DataError(f"imagefolder: no class folders in {folder}; expected {IMAGEFOLDER_LAYOUT}")
    if class_to_idx is None:
        class_names = tuple(c.name for c in classes)
        mapping = {name: i for i, name in enumerate(class_names)}
    else:
        mapping = dict(class_to_idx)
        class_names = tuple(sorted(mapping, key=mapping.__getitem__))
        unknown = [c.name for c in classes if c.name not in mapping]
        if unknown:
            raise DataError(
                f"imagefolder: {folder} has classes absent from the training split: "
                f"{', '.join(unknown[:5])}"
            )
    files: list[str] = []
    labels: list[int] = []
    skipped = 0
    for class_dir in classes:
        images, skipped_here = _image_files(class_dir, exts)
        skipped += skipped_here
        if not images:
            raise DataError(f"imagefolder: class folder {class_dir} holds no image files")
        files.extend(images)
        labels.extend([mapping[class_dir.name]] * len(images))
    if skipped:
        logger.debug("imagefolder: skipped %d non-image files under %s", skipped, folder)
    return files, labels, class_names

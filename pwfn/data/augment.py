"""Training-time augmentation of whole batches: zero-padded random crops and horizontal flips.

Why batched tensor ops instead of per-image transforms: a batch of offsets and coin flips is
drawn from one seeded generator and applied with ``gather``/``where``, which is fast on any
device and makes the augmented batch a pure function of (batch, generator state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pwfn.errors import ConfigError


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation recipe: zero-padded random crop and random horizontal flip.

    ``crop_padding`` pixels of zeros are added on every side and an image-sized window is cut
    at a random offset (0 disables it); ``hflip`` mirrors each image with probability 0.5.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise ConfigError(f"crop_padding must be an int, got {self.crop_padding!r}")
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"hflip must be a bool, got {self.hflip!r}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip


def crop_with_padding(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by ``padding`` px and cut an H x W window at per-image offsets.

    ``offsets`` is (B, 2) of (dy, dx) in ``0..2*padding``: output pixel (i, j) of image b is
    padded pixel (i + dy, j + dx), so (padding, padding) is the identity. Vectorised with two
    ``gather`` calls, any dtype.
    """
    if images.ndim != 4:
        raise ConfigError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if padding == 0:
        return images.clone()
    b, c, h, w = images.shape
    offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if (
        offsets.shape != (b, 2)
        or offsets.numel()
        and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding)
    ):
        raise ConfigError(f"offsets must be (B, 2) in 0..{2 * padding}")
    padded = images.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
    padded[:, :, padding : padding + h, padding : padding + w] = images
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    picked_rows = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
    return picked_rows.gather(3, cols)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-padded random crop, one uniform offset per image drawn from ``generator``."""
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator)
    return crop_with_padding(images, padding, offsets)


def hflip_batch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``mask`` entry is True (left-right, last dimension)."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image with probability ``p``, coins drawn from ``generator``."""
    mask = torch.rand(images.shape[0], generator=generator) < p
    return hflip_batch(images, mask)


def augment_batch(
    images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """Apply a recipe to a whole (B, C, H, W) batch: crop first, then flip."""
    if augmentation.crop_padding:
        images = random_crop(images, augmentation.crop_padding, generator)
    if augmentation.hflip:
        images = random_hflip(images, generator)
    return images

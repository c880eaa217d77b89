"""Seeded random streams: one user seed, many independent streams, identical on every machine.

Why: splitting, subsetting, shuffling, augmentation, normalisation statistics and synthetic
images each draw from their own stream, a pure function of ``(seed, stream, ...)``. Changing
the batch size or turning augmentation on therefore never changes which images land in the
validation split, and a run is reproducible from its seed alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pwfn.errors import ConfigError

# Independent random streams derived from one user seed (see derive_seed).
STREAM_SPLIT = 1
STREAM_SUBSET = 2
STREAM_SHUFFLE = 3
STREAM_AUGMENT = 4
STREAM_STATS = 5
STREAM_SYNTHETIC = 6


def check_seed(seed: Any, what: str = "seed") -> int:
    """Seeds must be plain non-negative ints so that the derived streams are portable."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one named random stream, a pure function of ``(seed, *keys)``.

    Why: splitting, shuffling and augmentation each get their own stream, so changing the batch
    size or turning augmentation on never changes which images land in the validation split.
    ``numpy.random.SeedSequence`` hashes the entropy identically on every platform.
    """
    entropy = [check_seed(seed)] + [check_seed(k, "seed key") for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy ``default_rng`` seeded with :func:`derive_seed` of ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))

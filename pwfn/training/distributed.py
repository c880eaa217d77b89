"""Multi-process training with PyTorch's own distributed engine (``torchrun``), nothing custom.

Under ``torchrun --nproc_per_node N`` every rank runs the same program. The design keeps a
DDP run equal to a single-process run with the same global batch:

* :class:`GlobalBatchShard` takes the single-process permutation of the epoch (same seed, same
  epoch) and gives each rank its contiguous share of every *global* batch;
* the per-rank loss is ``sum(ce) * world / global_batch`` so DDP's gradient average is the
  global-batch mean;
* every rank is seeded identically, so weight noise (eps) is the same on all ranks;
* the fixing engine runs on every rank and rank 0's result is broadcast; a checksum of values
  and masks is logged per round.

Run-folder files are written by rank 0 only (:attr:`DistContext.is_main`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            _barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64, on the backend's device)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s copy."""
        if not self.enabled:
            return tensor
        dev = self._comm_device()
        if tensor.device == dev:
            dist.broadcast(tensor, src)
            return tensor
        tmp = tensor.to(dev)
        dist.broadcast(tmp, src)
        tensor.copy_(tmp)
        return tensor

    def all_gather_tensors(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather variable-length CPU tensors from every rank, in rank order."""
        if not self.enabled:
            return [tensor]
        out: list[Optional[torch.Tensor]] = [None] * self.world_size
        dist.all_gather_object(out, tensor.cpu())
        return [t for t in out if t is not None]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device {spec!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N' ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} was requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} was requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {spec!r} was requested but Apple's MPS backend is not available in this "
                              "PyTorch build or machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {spec!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or return a single-process context.

    NCCL is used when the ranks run on CUDA devices, gloo otherwise (CPU runs, CI).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_spec))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    log.info("distributed: rank %d/%d on %s (%s)", rank, world, device, dist.get_backend())
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


#: the last barrier's work object, kept on purpose (see :func:`_barrier`)
_last_barrier = None


def _barrier() -> None:
    """``dist.barrier()`` whose work object stays referenced here until the next barrier (or exit).

    A gloo barrier's work holds every collective still in flight when it was issued, and with them
    tensors made in Python. When a gloo worker thread drops the last reference while the
    interpreter is exiting, freeing those tensors needs the GIL and the process aborts
    ("terminate called without an active exception", about once in 50 two-rank runs on a loaded
    machine). Holding the reference here makes the main thread free it, with the GIL.
    """
    global _last_barrier
    work = dist.barrier(async_op=True)
    work.wait()
    _last_barrier = work


def shutdown_distributed(synchronise: bool = False) -> None:
    """Leave the process group (a no-op without one).

    ``synchronise`` (a command that succeeded on this rank) first waits for every rank at a
    barrier, so no rank tears its connections down while another still uses them. Never after
    an error: the other ranks may not reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            _barrier()
        dist.destroy_process_group()


class GlobalBatchShard(Sampler):
    """This rank's share of every global batch of the epoch's permutation.

    ``order_fn(epoch)`` returns the single-process order of the epoch. Each consecutive block of
    ``global_batch`` indices is split into ``world`` contiguous parts (sizes differ by at most one
    in the last, partial block); a last block with fewer samples than ranks is dropped so no rank
    ever waits on an empty batch. Iterated by a loader with batch size ``global_batch // world``.
    """

    def __init__(self, order_fn, n: int, global_batch: int, rank: int, world: int) -> None:
        if global_batch % world:
            raise ConfigError(f"data.batch_size ({global_batch}) must be divisible by the number of processes ({world})")
        self.order_fn = order_fn
        self.n = n
        self.global_batch = global_batch
        self.rank = rank
        self.world = world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        order = self.order_fn(self.epoch)
        parts = []
        for block in order.split(self.global_batch):
            if block.numel() < self.world:
                continue
            parts.append(torch.tensor_split(block, self.world)[self.rank])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        size = full * (self.global_batch // self.world)
        if rest >= self.world:
            size += len(torch.tensor_split(torch.arange(rest), self.world)[self.rank])
        return size


class ContiguousShard(Sampler):
    """Evaluation shard: this rank's contiguous slice of ``range(n)`` (no padding, no repeats)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = torch.tensor_split(torch.arange(n), world)[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return self.indices.numel()


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """Short SHA-256 over the exact bytes of the tensors (for the per-round equality log)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def local_batch_size(global_batch: int, world: int) -> int:
    return max(1, math.ceil(global_batch / world))


"""Sharded fixing (FSDP2): one network-wide vector, held in shards by the processes of a group.

A model wrapped with FSDP2's ``fully_shard`` holds each parameter as a DTensor: every process keeps
a contiguous block of rows. :class:`ShardGroup` describes where this process's blocks sit in the
network-wide flat vector of the quantised tensors and combines, across the group, what the fixing
engine needs to decide a round (:func:`pwfn.core.engine.fix_round` with ``shards=``), so every process
fixes its own shards onto one network-wide codebook, exactly as one process holding the whole
vector would, without any process gathering the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ModelError
from ._engine_fast import Reductions as _Reductions
from ._engine_fast import chunks as _chunks

__all__ = ["ShardGroup", "is_sharded", "local_part"]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter of a model wrapped with FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writes go to the DTensor), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


class ShardGroup(_Reductions):
    """This process's pieces of one network-wide flat vector, and the process group holding the rest.

    The fixing engine (:func:`pwfn.core.engine.fix_round` with ``shards=``) runs on every process of the
    group on its own pieces, concatenated in the vector's order; it takes every decision from
    reductions across the group: integer sums (exact, so the same on every process whatever the
    order), the value range, and for a partial pick the k smallest ratios, found by a radix
    selection over histograms of their bits, ties by global index. No process ever holds the
    whole vector. ``pieces``: ``(global_start, length)`` of each piece in local order (ascending in
    the global vector too).
    """

    sharded = True

    def __init__(self, pieces: list[tuple[int, int]], group=None) -> None:
        self.group = group
        local = 0
        starts, deltas = [], []
        for global_start, length in pieces:
            starts.append(local)
            deltas.append(int(global_start) - local)
            local += int(length)
        self.numel = local
        self._starts = torch.tensor(starts or [0], dtype=torch.int64)
        self._deltas = torch.tensor(deltas or [0], dtype=torch.int64)

    @classmethod
    def for_tensors(cls, tensors: list[torch.Tensor], offsets: list[int]) -> ShardGroup:
        """The group of FSDP2-sharded tensors whose flattened global tensors sit at ``offsets`` of the
        network-wide vector (each sharded on dim 0 over one 1-D device mesh)."""
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = None
        pieces = []
        for t, offset in zip(tensors, offsets):
            if not is_sharded(t):
                raise ModelError("a model with sharded (DTensor) parameters must have every fixed tensor sharded; "
                                 "wrap every module whose weights are fixed with fully_shard")
            if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
                raise ModelError(f"sharded fixing needs tensors sharded on dim 0 over a 1-D mesh (FSDP2's "
                                 f"default); got placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh")
            if mesh is None:
                mesh = t.device_mesh
            elif t.device_mesh != mesh:
                raise ModelError("sharded fixing needs every fixed tensor on one device mesh")
            shape, global_offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            row = math.prod(t.shape[1:])
            pieces.append((offset + int(global_offset[0]) * row if t.dim() else offset, math.prod(shape)))
        if mesh is None:
            raise ModelError("no sharded tensor to fix")
        return cls(pieces, mesh.get_group())

    # -- where the pieces sit -----------------------------------------------------------------
    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        """Global positions (int64) of local positions of this process's flat vector."""
        idx = local.to(torch.int64)
        starts, deltas = self._starts.to(idx.device), self._deltas.to(idx.device)
        piece = torch.searchsorted(starts, idx, right=True).sub_(1)
        return idx + deltas.index_select(0, piece)

    # -- reductions ---------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dev = self._device()
        work = t if t.device == dev else t.to(dev)
        dist.all_reduce(work, op=op, group=self.group)
        if work is not t:
            t.copy_(work)
        return t

    def total(self, n: int) -> int:
        return int(self._all_reduce(torch.tensor([int(n)], dtype=torch.int64))[0])

    def range(self, lo: float, hi: float) -> tuple[float, float]:
        nan = math.isnan(lo) or math.isnan(hi)
        t = torch.tensor([1.0 if nan else 0.0, -math.inf if nan else -lo, -math.inf if nan else hi],
                         dtype=torch.float64)
        flag, neg_lo, hi = self._all_reduce(t, dist.ReduceOp.MAX).tolist()
        return (math.nan, math.nan) if flag else (-neg_lo, hi)

    def sum_counts_(self, counts: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(counts)

    def merge_counts(self, keys, counts):
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, (keys, counts), group=self.group)
        all_keys = np.concatenate([p[0] for p in parts])
        merged, inverse = np.unique(all_keys, return_inverse=True)
        total = np.zeros(merged.shape[0], dtype=np.int64)
        np.add.at(total, inverse, np.concatenate([p[1] for p in parts]).astype(np.int64))
        return merged, total

    def merge_codebooks(self, values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct values (float64) and summed counts over the group's processes."""
        merged, total = self.merge_counts(values.numpy().view(np.int64).copy(), counts.numpy().astype(np.int64))
        # float64 bit patterns as int64 keys: exact (no -0.0 left), sorted again by value below
        vals = torch.from_numpy(np.ascontiguousarray(merged).view(np.float64).copy())
        order = torch.argsort(vals)
        return vals[order], torch.from_numpy(total)[order]

    def sum_floats(self, x):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dev = self._device()
        gathered = [p.to(dev) for p in parts]
        dist.all_gather(gathered, t.to(dev), group=self.group)
        total = gathered[0].cpu().numpy().copy()
        for p in gathered[1:]:  # rank order: the same sum on every process
            total += p.cpu().numpy()
        return total

    def select_smallest(self, score_of, n, k, step, index_of):
        """Positions of this process's scores among the ``k`` smallest of the group, ties by global index.

        A radix selection: scores are non-negative float64 (ratios, distances), whose bit
        patterns order like the values, so four 16-bit digit histograms, summed across the group,
        find the k-th smallest score exactly; when ties at it straddle the cut, four more over the
        tied entries' global indices find the last one taken. Every histogram is an integer sum.
        """
        first = score_of(0, min(n, step)) if n else torch.zeros(0, dtype=torch.float64)
        dev = first.device
        scratch = torch.empty(n, dtype=torch.float64, device=dev)
        scratch[:first.numel()] = first
        for s, e in _chunks(n, step):
            if s >= first.numel():
                scratch[s:e] = score_of(s, e)
        bits = scratch.view(torch.int64)
        if bool((bits < 0).any()):
            raise ValueError("select_smallest: scores must be non-negative")
        theta, remaining, at_theta = self._radix(lambda s, e: bits[s:e], n, k, step, dev)
        cut = None
        if remaining < at_theta:  # only some of the ties at theta: the lowest global indices
            cut, _, _ = self._radix(lambda s, e: index_of(s, e)[bits[s:e] == theta], n, remaining, step, dev)
        out = []
        for s, e in _chunks(n, step):
            b = bits[s:e]
            take = b < theta
            if cut is None:
                take |= b == theta
            else:
                take |= (b == theta) & (index_of(s, e) <= cut)
            out.append(torch.nonzero(take).squeeze(1).add_(s))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=dev)

    def _radix(self, keys_of, n, k, step, dev) -> tuple[int, int, int]:
        """The k-th smallest non-negative int64 key over the group: (key, how many equal to it are
        taken, how many equal to it exist)."""
        prefix, remaining = 0, k
        hist = None
        for shift in (48, 32, 16, 0):
            hist = torch.zeros(1 << 16, dtype=torch.int64, device=dev)
            for s, e in _chunks(n, step):
                x = keys_of(s, e)
                if shift < 48:
                    x = x[(x >> (shift + 16)) == prefix]
                if x.numel():
                    hist += torch.bincount((x >> shift) & 0xFFFF, minlength=1 << 16)
            self.sum_counts_(hist)
            cum = hist.cumsum(0)
            bucket = int(torch.searchsorted(cum, torch.tensor(remaining, device=cum.device)))
            remaining -= int(cum[bucket - 1]) if bucket else 0
            prefix = (prefix << 16) | bucket
        return prefix, remaining, int(hist[prefix & 0xFFFF])

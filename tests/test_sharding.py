"""Sharded fixing (FSDP2): ranks holding shards of one network-wide vector fix it onto one codebook,
exactly as one process holding the whole vector does.

Ranks are gloo processes spawned in-process (torch.multiprocessing, as tests/test_distributed.py
does); each writes what it holds to a file and the test compares against a single-process run.
"""

from __future__ import annotations

import datetime
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")

# tensors (rows, row length) of the network-wide vector: uneven splits, and one with fewer rows
# than ranks (some ranks hold an empty shard of it)
SHAPES = [(7, 5), (3,), (2, 6), (11, 3), (1, 4)]


def _chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk's split of ``rows`` (what FSDP2's Shard(0) does): (start, stop) of ``rank``."""
    size = math.ceil(rows / world) if rows else 0
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def _global_problem(case: str, seed: int = 0):
    """The network-wide flat vectors (values, sigma) and the tensor offsets."""
    g = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in SHAPES)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    values = (-(0.05 / math.sqrt(2)) * torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    if case == "ties":  # many weights exactly on centres: zero ratios, ties cut by global index
        values[::3] = 0.0
        values[1::5] = 2.0**-5
    sigma = (torch.rand(n, generator=g) * 0.01 + 1e-4).float()
    offsets, o = [], 0
    for s in SHAPES:
        offsets.append(o)
        o += math.prod(s)
    return values, sigma, offsets


def _local_pieces(offsets, world, rank):
    """(global_start, length) of this rank's row blocks, and the local indices into the global vector."""
    pieces, index = [], []
    for shape, off in zip(SHAPES, offsets):
        row = math.prod(shape[1:])
        a, b = _chunk_rows(shape[0], world, rank)
        pieces.append((off + a * row, (b - a) * row))
        index.append(torch.arange(off + a * row, off + b * row))
    return pieces, torch.cat(index)


def _schedule(case: str):
    from pwfn.core.engine import EngineConfig
    from pwfn.core.schedules import pwfn_schedule, wfn_schedule

    if case == "wfn":
        return wfn_schedule(0.01), EngineConfig(signed_terms=True)
    if case == "fallback":  # next to no tolerance and no escalation: rounds end in the nearest-centre fallback
        return pwfn_schedule(k=1e-9), EngineConfig(max_escalations=0)
    return pwfn_schedule(k=1.0), EngineConfig(sigma_update="std_mu")


def _run_rounds(values, sigma, sched, cfg, shards=None, sparse=False):
    from pwfn.core.engine import EngineCache, EngineTuning, fix_round
    from pwfn.core.schedules import tolerance_for_round

    # small chunks: the radix passes cross chunk borders; sparse: grid pairs merged as sorted unique keys
    tuning = EngineTuning(chunk=7, dense_min=0, work_factor=0) if sparse else EngineTuning(chunk=7)

    fixed = torch.zeros_like(values, dtype=torch.bool)
    sig = None if sched.relative else sigma
    out = []
    cache = EngineCache()
    for t, p in enumerate(sched.fractions):
        tol = tolerance_for_round(sched, t, values=values, sigma=sig)
        r = fix_round(values, tol, fixed, p, sigma=sig, config=cfg, cache=cache, shards=shards, tuning=tuning)
        out.append({"values": r.values, "fixed": r.fixed, "sigma": r.sigma, "newly": r.newly_fixed,
                    "summary": {k: v for k, v in r.summary.items() if k != "seconds"}})
        values, fixed, sig = r.values, r.fixed, r.sigma
    return out


def _engine_worker(rank, world, init, out_dir, case):
    from pwfn.core.sharding import ShardGroup

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        values, sigma, offsets = _global_problem(case)
        pieces, index = _local_pieces(offsets, world, rank)
        shards = ShardGroup(pieces)
        sched, cfg = _schedule(case)
        rounds = _run_rounds(values[index], sigma[index], sched, cfg, shards, sparse=case == "wfn")
        (Path(out_dir) / f"rank{rank}.pt").write_bytes(pickle.dumps({"index": index, "rounds": rounds}))
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, tmp_path, *args):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, (tmp_path / "init").as_uri(), str(tmp_path), *args), nprocs=world, join=True)
    return [pickle.loads((tmp_path / f"rank{r}.pt").read_bytes()) for r in range(world)]


@pytest.mark.parametrize("world,case", [(2, "ties"), pytest.param(2, "pwfn", marks=pytest.mark.slow),
                                        pytest.param(3, "wfn", marks=pytest.mark.slow),
                                        pytest.param(3, "ties", marks=pytest.mark.slow),
                                        pytest.param(4, "fallback", marks=pytest.mark.slow)])
def test_sharded_rounds_equal_the_single_process_rounds(world, case, tmp_path):
    values, sigma, _ = _global_problem(case)
    sched, cfg = _schedule(case)
    single = _run_rounds(values, sigma, sched, cfg)
    ranks = _spawn(_engine_worker, world, tmp_path, case)
    assert sorted(torch.cat([r["index"] for r in ranks]).tolist()) == list(range(values.numel()))
    partial = False
    for t, want in enumerate(single):
        for r in ranks:
            got = r["rounds"][t]
            assert got["summary"] == want["summary"], (t, got["summary"], want["summary"])
            assert torch.equal(got["values"], want["values"][r["index"]]), t
            assert torch.equal(got["fixed"], want["fixed"][r["index"]]), t
            assert torch.equal(got["newly"], want["newly"][r["index"]]), t
            if want["sigma"] is not None:  # per-rank sums added in rank order: float rounding only
                torch.testing.assert_close(got["sigma"], want["sigma"][r["index"]], rtol=1e-6, atol=1e-12)
        partial |= any(p["partial"] for p in want["summary"]["picks"])
    assert partial or case == "fallback", "no partial pick: the selection across shards went untested"
    if case == "fallback":
        assert sum(w["summary"]["fallback"] for w in single) > values.numel() // 2


# --------------------------------------------------------------------------------------------
# the Fixer on a model wrapped with FSDP2's fully_shard


def _mlp():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3))


# the contract cannot judge a sharded model yet (it refuses it); the single process runs without it too, to compare
WFN_NO_ATTRACTION = {"wfn": {"reg_ratio": 0.0}, "contract": {"enforce": False}}


def _sharded(model):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def _local_state(fixer):
    """Name -> (global row offset, local values, local mask) of this rank's shards."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = {}
    for slot in fixer.view.slots:
        p = slot.value
        _, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        out[slot.name] = (int(off[0]), p.to_local().detach().clone(), fixer.view._mask(slot).clone())
    return out


def _fixer_worker(rank, world, init, out_dir, mode):
    import pwfn

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result: dict = {}
        model = _sharded(_mlp())
        fixer = pwfn.Fixer(model, method="wfn", config=WFN_NO_ATTRACTION, inplace=True)
        assert fixer.view.shards is not None
        if mode == "parity":
            for _ in fixer.rounds():
                pass
            result["state"] = _local_state(fixer)
            result["history"] = [{k: row[k] for k in ("unique", "entropy", "codebook", "codebook_counts",
                                                     "fixed_fraction")} for row in fixer.history]
            result["finalized_in_place"] = fixer.finalize() is model  # still sharded, hooks removed
        else:  # training between rounds keeps fixed entries exact; a checkpoint restores the run exactly
            import torch.distributed.checkpoint as dcp

            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
            g = torch.Generator().manual_seed(rank)
            moved = 0
            for rnd in fixer.rounds():
                before = _local_state(fixer)
                for _ in range(3):
                    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                    loss = fixer.loss(torch.nn.functional.cross_entropy(model(x), y))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                after = _local_state(fixer)
                for name, (_, v0, m0) in before.items():
                    v1 = after[name][1]
                    assert torch.equal(v1[m0], v0[m0]), (rnd.index, name)  # fixed entries did not move
                    moved += int((v1[~m0] != v0[~m0]).sum())
                if rnd.index == 4:
                    dcp.save(fixer.state_dict(), checkpoint_id=str(Path(out_dir) / "ckpt"))
                    result["at_save"] = after
                    break
            result["moved"] = moved
            twin = pwfn.Fixer(_sharded(_mlp()), method="wfn", config=WFN_NO_ATTRACTION, inplace=True)
            state = twin.state_dict()
            dcp.load(state, checkpoint_id=str(Path(out_dir) / "ckpt"))
            twin.load_state_dict(state)
            result["loaded"] = _local_state(twin)
            result["loaded_round"] = twin.round
            # both go on identically: the next round from the same state
            fixer.fix_next()
            twin.fix_next()
            result["next"] = (_local_state(fixer), _local_state(twin))
        (Path(out_dir) / f"rank{rank}.pt").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def _assemble(ranks, key="state"):
    """Name -> (values, mask) of the whole tensor, from the ranks' row blocks."""
    out = {}
    for name in ranks[0][key]:
        blocks = sorted((r[key][name] for r in ranks), key=lambda b: b[0])
        out[name] = (torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks]))
    return out


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_fsdp2_model_is_fixed_onto_one_codebook_like_one_process(world, tmp_path):
    import pwfn

    single = pwfn.Fixer(_mlp(), method="wfn", config=WFN_NO_ATTRACTION, inplace=True)
    for _ in single.rounds():
        pass
    ranks = _spawn(_fixer_worker, world, tmp_path, "parity")
    whole = _assemble(ranks)
    for slot in single.view.slots:
        values, mask = whole[slot.name]
        assert torch.equal(values, slot.value.detach()), slot.name
        assert torch.equal(mask, single.view._mask(slot)), slot.name
    for r in ranks:  # every rank reports the network-wide rounds
        assert r["finalized_in_place"]
        for got, want in zip(r["history"], single.history):
            assert got["codebook"] == want["codebook"] and got["codebook_counts"] == want["codebook_counts"]
            assert got["unique"] == want["unique"]
            assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-12)
            assert got["fixed_fraction"] == pytest.approx(want["fixed_fraction"], abs=1e-6)


def test_fsdp2_training_keeps_fixed_entries_and_a_checkpoint_restores_them(tmp_path):
    ranks = _spawn(_fixer_worker, 2, tmp_path, "train")
    assert sum(r["moved"] for r in ranks) > 0, "training moved no free weight: the check proves nothing"
    for r in ranks:
        assert r["loaded_round"] == 5
        for name, (_off, v, m) in r["at_save"].items():
            _, v2, m2 = r["loaded"][name]
            assert torch.equal(v2, v) and torch.equal(m2, m), name
        ours, twin = r["next"]
        for name in ours:
            assert torch.equal(ours[name][1], twin[name][1]) and torch.equal(ours[name][2], twin[name][2]), name

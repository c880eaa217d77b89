"""DDP: 2 CPU processes (gloo) under torchrun give bit-identical ranks and a single-process result."""

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from pwfn.training.distributed import ContiguousShard, GlobalBatchShard, tensor_checksum

TINY = ["progress=false", "threads=1", "baseline.epochs=3", "pwfn.round_epochs=0.5", "pwfn.first_round_epochs=0.2",
        "pwfn.mc_samples=2", "wfn.round_epochs=0.5", "data.batch_size=64", "model.kwargs={hidden: [16]}",
        "data.train_subset=300", "contract.enforce=false"]  # mechanics; the contract has its own tests


def _sets(extra):
    out = []
    for item in TINY + extra:
        out += ["--set", item]
    return out


def _run(args, nproc):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "pwfn.cli"] + args
    else:
        cmd = [sys.executable, "-m", "pwfn.cli"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _state(path):
    from safetensors.torch import load

    return load(path.read_bytes())


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_two_gloo_ranks_agree_and_match_single_process(method, tmp_path):
    common = ["-v", "run", "--method", method, "--out", str(tmp_path)]
    two = _run(common + _sets(["name=two"]), 2)
    _run(common + _sets(["name=one"]), 1)

    # every rank logged the same values+masks checksum after every round
    per_round = defaultdict(dict)
    for rnd, checksum, rank in re.findall(r"round (\d+): values\+masks checksum (\w+) \(rank (\d)\)", two.stderr):
        per_round[int(rnd)][int(rank)] = checksum
    assert sorted(per_round) == list(range(1, 11))
    for rnd, by_rank in per_round.items():
        assert set(by_rank) == {0, 1} and by_rank[0] == by_rank[1], (rnd, by_rank)

    # only rank 0 wrote the run folder; the rounds' metrics equal the single-process run's
    one_rep = json.loads((tmp_path / "one" / method / "report.json").read_text())
    two_rep = json.loads((tmp_path / "two" / method / "report.json").read_text())
    for r1, r2 in zip(one_rep["rounds"], two_rep["rounds"]):
        assert r1["unique"] == r2["unique"] and r1["fixed_fraction"] == r2["fixed_fraction"]
        assert r1["entropy"] == pytest.approx(r2["entropy"], abs=1e-9)
        assert r1["after_fix"]["top1"] == pytest.approx(r2["after_fix"]["top1"], abs=1e-6)
    f1, f2 = one_rep["final"], two_rep["final"]
    assert f1["test"]["top1"] == pytest.approx(f2["test"]["top1"], abs=1e-6)
    assert f1["test"]["loss"] == pytest.approx(f2["test"]["loss"], rel=1e-4)
    assert f1["codebook"] == f2["codebook"]
    if method == "pwfn":
        assert f1["mc"]["nll"] == pytest.approx(f2["mc"]["nll"], rel=1e-4)
        assert f1["mc"]["ece"] == pytest.approx(f2["mc"]["ece"], abs=1e-4)
    a = _state(tmp_path / "one" / method / "point_model.safetensors")
    b = _state(tmp_path / "two" / method / "point_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # tensor by tensor, position by position
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_global_batch_shards_partition_every_global_batch():
    n, gb, world = 103, 16, 4
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [GlobalBatchShard(lambda e: perm, n, gb, r, world) for r in range(world)]
    per_rank = [list(iter(s)) for s in shards]
    assert [len(p) for p in per_rank] == [len(s) for s in shards]
    local = gb // world
    blocks = perm.split(gb)
    for k, block in enumerate(blocks):
        if block.numel() < world:
            continue
        got = torch.cat([torch.tensor(p[k * local:(k + 1) * local]) for p in per_rank])
        assert torch.equal(got, block)  # ranks' k-th batches are, in order, the global k-th batch
    with pytest.raises(Exception, match="divisible"):
        GlobalBatchShard(lambda e: perm, n, 15, 0, 4)


def test_contiguous_eval_shards_cover_in_order():
    parts = [list(iter(ContiguousShard(10, r, 3))) for r in range(3)]
    assert sum(parts, []) == list(range(10))


def test_checksum_sees_every_bit():
    x = torch.tensor([0.0, 1.0])
    y = torch.tensor([-0.0, 1.0])
    assert tensor_checksum(x) != tensor_checksum(y)
    assert tensor_checksum(x, torch.tensor([True])) != tensor_checksum(x, torch.tensor([False]))


# --------------------------------------------------------------------------------------------
# train_epochs across 2 gloo ranks in-process (torch.multiprocessing), without the CLI


def _train_worker(rank, world, init_method, out_dir, case):
    import datetime
    from pathlib import Path

    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pwfn.training.distributed import DistContext, shutdown_distributed
    from pwfn.training.train import EpochCounter, train_epochs

    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    result = {}
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        ddp = DDP(model)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        if case == "nan" and rank == 1:
            x[0, 0] = float("nan")  # this rank's batch alone breaks the loss
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights (and predictions) stay put
        try:
            result["stats"] = train_epochs(ddp, [(x, y)], opt, 1, torch.device("cpu"), counter=EpochCounter(),
                                           progress=False, dist=DistContext(rank=rank, world_size=world), inner=model)
        except Exception as exc:
            result["error"] = type(exc).__name__
        with torch.no_grad():
            result["correct"] = int((model(x).argmax(1) == y).sum())
            result["loss_sum"] = float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
        result["n"] = int(y.numel())
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        shutdown_distributed(synchronise=True)  # both ranks get here (errors are caught above)


def _spawn_train(tmp_path, case):
    import torch.multiprocessing as mp

    mp.spawn(_train_worker, args=(2, (tmp_path / "init").as_uri(), str(tmp_path), case), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo unavailable")
def test_a_loss_breaking_on_one_rank_stops_every_rank_with_a_divergence_error(tmp_path):
    # the healthy rank must not go on into DDP's gradient all-reduce, where it would wait for ever
    results = _spawn_train(tmp_path, "nan")
    assert [r.get("error") for r in results] == ["TrainingDivergedError"] * 2, results


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo unavailable")
def test_training_statistics_are_reduced_over_ranks(tmp_path):
    results = _spawn_train(tmp_path, "ok")
    n = sum(r["n"] for r in results)
    acc = sum(r["correct"] for r in results) / n
    loss = sum(r["loss_sum"] for r in results) / n
    for r in results:
        assert "error" not in r, r
        assert r["stats"]["acc"] == pytest.approx(acc), (r, acc)  # the global batch's, not this rank's share
        assert r["stats"]["loss"] == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------------------------
# leaving the process group


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo unavailable")
def test_shutdown_after_success_meets_at_a_barrier_whose_work_the_main_thread_keeps(tmp_path, monkeypatch):
    import pwfn.training.distributed as pd

    monkeypatch.setattr(pd, "_last_barrier", None)  # a work kept by an earlier test must not count
    dist.init_process_group("gloo", init_method=(tmp_path / "init").as_uri(), rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)  # a collective on a tensor made in Python, as the pipeline's are
        pd.shutdown_distributed(synchronise=True)
        assert not dist.is_initialized()
        # the barrier's work is still referenced from Python, so a gloo worker thread never frees
        # it (and the tensors it holds) while the interpreter exits
        assert pd._last_barrier is not None and pd._last_barrier.is_completed()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    pd.shutdown_distributed(synchronise=True)  # without a process group: nothing to do


def test_cli_synchronises_ranks_at_exit_only_after_a_command_that_succeeded(monkeypatch, tmp_path):
    import pwfn.training.distributed as pd
    from pwfn.cli import main

    calls = []
    monkeypatch.setattr(pd, "shutdown_distributed", lambda synchronise=False: calls.append(synchronise))
    assert main(["configs"]) == 0
    # an error on one rank: the other ranks may never reach a barrier, so none is waited for
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert calls == [True, False]

"""The fixing engine against its executable spec (``pwfn.core.engine_reference``), plus invariants.

The reference builds a dense (weights x centres) fit matrix per pick; it is the executable
specification of the engine's docstring (docs/algorithm.md, with the engine's documented
tie-breaks).  The fast engine must reproduce it *exactly*, whatever its tuning.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwfn.core.centres import candidate_centres
from pwfn.core.engine import (
    EngineCache,
    EngineConfig,
    EngineTuning,
    fix_round,
    lookup_centres,
    target_count,
)
from pwfn.core.engine_reference import reference_fix_round
from pwfn.errors import ConfigError, EngineInputError

SLOW_PATHS = EngineTuning(chunk=3, dense_min=0, work_factor=0)  # unique pairs, tiny chunks


def _laplace(n, scale, g):
    """Seeded Laplace samples (inverse CDF), independent of the global RNG."""
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


# --------------------------------------------------------------------------- strategies


@st.composite
def engine_case(draw):
    n = draw(st.integers(1, 60))
    b = draw(st.sampled_from([2, 3, 7]))
    scale = draw(st.sampled_from([0.01, 0.1, 1.0]))
    kind = draw(st.lists(st.sampled_from(["float", "grid", "near", "zero", "tiny", "dup"]),
                         min_size=n, max_size=n))
    raw = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    vals = []
    for i, (k, r) in enumerate(zip(kind, raw)):
        if k == "grid":
            vals.append(round(r * scale * 2**b) / 2**b)
        elif k == "near":  # clusters around grid points: many picks, many ties
            vals.append(round(r * scale * 2**b) / 2**b + ((i * 7919) % 13 - 6) * 1e-4 * scale)
        elif k == "zero":
            vals.append(0.0)
        elif k == "tiny":
            vals.append(r * 2.0**-b)
        elif k == "dup" and vals:
            vals.append(vals[-1])
        else:
            vals.append(r * scale)
    tol_kind = draw(st.sampled_from(["zero", "tiny", "mid", "big", "mixed", "rel"]))
    traw = draw(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    if tol_kind == "zero":
        tol = [0.0] * n
    elif tol_kind == "tiny":
        tol = [x * 1e-6 for x in traw]
    elif tol_kind == "mid":
        tol = [x * scale * 0.1 for x in traw]
    elif tol_kind == "big":
        tol = [x * scale for x in traw]
    elif tol_kind == "rel":
        tol = [abs(v) * 0.1 for v in vals]
    else:
        tol = [draw(st.sampled_from([0.0, 1e-7, 0.003, 0.05])) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    values = torch.tensor(vals, dtype=dtype)
    tolerance = torch.tensor(tol, dtype=dtype)
    cfg = EngineConfig(
        b=b,
        max_order=draw(st.integers(1, 4)),
        signed_terms=draw(st.booleans()),
        zero_fix=draw(st.booleans()),
        inc=draw(st.sampled_from([2.0, 1.5, 4.0])),
        sigma_update=draw(st.sampled_from(["std_mu", "keep", "divide"])),
        max_escalations=draw(st.sampled_from([0, 3, 50])),
    )
    # partially fixed input: some entries already sit on centres
    fixed = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if draw(st.booleans()):
        fixed[:] = False
    cs = candidate_centres(float(values.abs().max()), cfg.max_order, b, cfg.signed_terms,
                           dtype=dtype)
    pos = torch.searchsorted(cs.values, values).clamp(max=len(cs) - 1)
    values = torch.where(fixed, cs.values[pos], values)
    n_fixed = int(fixed.sum())
    p = draw(st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 0.99, 1.0, None]))
    if p is None:
        p = draw(st.floats(0, 1))
    if target_count(p, n) < n_fixed:
        p = 1.0
    sigma = torch.tensor(draw(st.lists(st.floats(1e-6, 0.1), min_size=n, max_size=n)),
                         dtype=dtype)
    return values, tolerance, fixed, p, cfg, sigma


def _assert_matches_reference(values, tolerance, fixed, p, cfg, sigma, tuning=None):
    res = fix_round(values, tolerance, fixed, p, sigma=sigma, config=cfg, tuning=tuning)
    ref = reference_fix_round(values, tolerance, fixed, p, sigma=sigma, config=cfg)
    assert torch.equal(res.fixed, ref.fixed)
    assert torch.equal(res.values, ref.values)
    assert torch.equal(res.newly_fixed, ref.newly_fixed)
    assert torch.equal(res.centres.values, ref.centres.values)
    drop = {"seconds"}
    assert ({k: v for k, v in res.summary.items() if k not in drop}
            == {k: v for k, v in ref.summary.items() if k not in drop})
    if sigma is None:
        assert res.sigma is None and ref.sigma is None
    else:
        torch.testing.assert_close(res.sigma.double(), ref.sigma.double(), rtol=1e-6, atol=1e-12)
    _assert_invariants(values, tolerance, fixed, p, cfg, sigma, res)
    return res


def _assert_invariants(values, tolerance, fixed, p, cfg, sigma, res):
    n = values.numel()
    assert int(res.fixed.sum()) >= target_count(p, n)
    assert res.summary["fixed_after"] == int(res.fixed.sum())
    assert (sum(res.summary["fixed_per_centre"].values()) + res.summary["fallback"]
            == res.summary["newly_fixed"])
    # previously fixed entries never move (bit-identical), fixed stays fixed
    assert torch.equal(res.values[fixed], values[fixed])
    assert bool(res.fixed[fixed].all())
    assert torch.equal(res.values[~res.fixed], values[~res.fixed])
    assert torch.equal(res.newly_fixed, res.fixed & ~fixed)
    # every newly fixed value is a centre with at most max_order terms
    nf = res.newly_fixed
    ci = res.centre_index[nf].long()
    assert bool((ci >= 0).all())
    assert torch.equal(res.centres.values[ci], res.values[nf])
    assert bool((res.order[nf] <= cfg.max_order).all())
    assert bool((res.order[~res.fixed] == -1).all())
    # within the (escalated) tolerance, except zero (zero_fix) and the fallback
    if res.summary["fallback"] == 0:
        m = res.summary["final_multiplier"]
        mt = tolerance if m == 1.0 else tolerance * m
        c = res.values
        ok = (values - mt <= c) & (c <= values + mt)
        if cfg.zero_fix:
            ok |= (c == 0) & (values.abs() < 2.0**-cfg.b)
        assert bool(ok[nf].all())
    # sigma: only newly fixed change
    if sigma is not None:
        assert torch.equal(res.sigma[~nf], sigma[~nf])
        if cfg.sigma_update == "keep":
            assert torch.equal(res.sigma, sigma)


# --------------------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_case())
def test_engine_matches_dense_reference(case):
    _assert_matches_reference(*case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_case())
def test_engine_matches_reference_on_slow_paths(case):
    """Sorted unique grid pairs instead of a dense histogram, tiny chunks: same answer."""
    _assert_matches_reference(*case, tuning=SLOW_PATHS)


@st.composite
def budget_case(draw):
    """An engine case in budget mode: an allowed set drawn from the codebook (asymmetric too)."""
    values, tolerance, fixed, p, cfg, sigma = draw(engine_case())
    cs = candidate_centres(float(values.abs().max()), cfg.max_order, cfg.b, cfg.signed_terms)
    pool = cs.values.double().tolist()
    allowed = tuple(draw(st.lists(st.sampled_from(pool), max_size=6, unique=True)))
    cfg = EngineConfig(**{**cfg.__dict__, "allowed": allowed})
    allowed_set = {float(a) for a in allowed} | {0.0}
    fixed &= torch.tensor([float(v) in allowed_set for v in values.double().tolist()],
                          dtype=torch.bool)
    if target_count(p, values.numel()) < int(fixed.sum()):
        p = 1.0
    return values, tolerance, fixed, p, cfg, sigma


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget_case(), st.booleans())
def test_budget_mode_matches_reference(case, slow):
    """Only allowed values (and zero) are chosen, also when the allowed set is one-sided."""
    res = _assert_matches_reference(*case, tuning=SLOW_PATHS if slow else None)
    allowed = {float(a) for a in case[4].allowed} | {0.0}
    assert {float(v) for v in res.values[res.newly_fixed].double().tolist()} <= allowed


def test_budget_mode_reaches_large_one_sided_centres():
    """An allowed set whose largest |value| is negative: exact weights still fit it."""
    v = torch.tensor([-1.0, -1.0, 0.1, 0.9])
    cfg = EngineConfig(allowed=(-1.0, 0.5), zero_fix=False, max_escalations=0)
    res = _assert_matches_reference(v, torch.zeros(4), torch.zeros(4, dtype=torch.bool), 0.5,
                                    cfg, None)
    assert res.summary["picks"][0]["centre"] == -1.0 and res.summary["fallback"] == 0
    assert res.centre_index.tolist()[:2] == [0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("signed", [False, True])
def test_engine_matches_reference_on_realistic_schedule(seed, signed):
    """A whole schedule on Laplace weights: many picks, run types and escalations."""
    g = torch.Generator().manual_seed(seed)
    n = 4000
    w = _laplace(n, 0.05, g).float()
    sigma = (torch.rand(n, generator=g) * 0.004 + 1e-4).float()
    fixed = torch.zeros(n, dtype=torch.bool)
    cfg = EngineConfig(signed_terms=signed)
    fr = [0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0]
    for t, p in enumerate(fr):
        tol = (0.01 * (10 - t) * w.abs()) if signed else sigma
        res = _assert_matches_reference(w, tol, fixed, p, cfg, None if signed else sigma)
        w, fixed = res.values, res.fixed
        sigma = sigma if signed else res.sigma
    assert bool(fixed.all())


@pytest.mark.parametrize("signed", [False, True])
def test_engine_matches_reference_with_many_centres(signed):
    """max|w| ~ 8 gives hundreds of centres: the sparse run-type path and long runs."""
    g = torch.Generator().manual_seed(5)
    n = 800
    w = (torch.randn(n, generator=g) * 2.0).float()
    w[0] = 8.0
    sigma = (torch.rand(n, generator=g) * 0.05).float()
    fixed = torch.zeros(n, dtype=torch.bool)
    cfg = EngineConfig(signed_terms=signed)
    for p in [0.4, 0.8, 1.0]:
        res = _assert_matches_reference(w, sigma, fixed, p, cfg, sigma)
        assert len(res.centres) > 300
        w, fixed, sigma = res.values, res.fixed, res.sigma


def _schedule(w, sigma, signed, **kw):
    """A 10-round PWFN (or WFN) schedule; the list of RoundResults."""
    fixed = torch.zeros(w.numel(), dtype=torch.bool)
    cfg = EngineConfig(signed_terms=signed)
    out = []
    for t, p in enumerate([0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0]):
        tol = (0.01 * (10 - t) * w.abs()) if signed else sigma
        res = fix_round(w, tol, fixed, p, sigma=None if signed else sigma, config=cfg, **kw)
        out.append(res)
        w, fixed = res.values, res.fixed
        sigma = sigma if signed else res.sigma
    return out


@pytest.mark.parametrize("signed", [False, True])
def test_results_do_not_depend_on_tuning_or_cache(signed):
    """Every fast path and chunk size, with and without a cache: bit-identical rounds."""
    g = torch.Generator().manual_seed(7)
    w = _laplace(20000, 0.05, g).float()
    sigma = (torch.rand(20000, generator=g) * 0.004 + 1e-4).float()
    base = _schedule(w, sigma, signed)
    for kw in [{"tuning": EngineTuning(chunk=61, dense_min=0, work_factor=0)},
               {"tuning": EngineTuning(chunk=1000)},
               {"tuning": EngineTuning(chunk=7, dense_min=1 << 40), "cache": EngineCache()},
               {"cache": EngineCache(size=1)}]:
        for a, b in zip(base, _schedule(w, sigma, signed, **kw)):
            assert torch.equal(a.values, b.values) and torch.equal(a.fixed, b.fixed)
            assert (a.sigma is None and b.sigma is None) or torch.equal(a.sigma, b.sigma)
            assert ({k: v for k, v in a.summary.items() if k != "seconds"}
                    == {k: v for k, v in b.summary.items() if k != "seconds"})


def test_cache_is_owned_by_the_caller():
    """No process-wide state: rounds share a candidate set only through the caller's cache."""
    v = torch.tensor([0.1, -0.2, 0.3, 0.05])
    t = torch.full((4,), 0.01)
    f = torch.zeros(4, dtype=torch.bool)
    assert fix_round(v, t, f, 0.5).centres is not fix_round(v, t, f, 0.5).centres
    cache = EngineCache(size=1)
    first = fix_round(v, t, f, 0.5, cache=cache).centres
    assert fix_round(v, t, f, 1.0, cache=cache).centres is first
    other = fix_round(v, t, f, 0.5, config=EngineConfig(signed_terms=True), cache=cache)
    assert other.centres is not first  # a different codebook...
    assert fix_round(v, t, f, 0.5, cache=cache).centres is not first  # ...evicted the first


@pytest.mark.parametrize("kw", [{"chunk": 0}, {"dense_min": -1}, {"work_factor": 1.5},
                                {"chunk": True}])
def test_bad_tuning(kw):
    with pytest.raises(ConfigError):
        EngineTuning(**kw)


def test_bad_tuning_or_cache_argument():
    v, t, f = _ok()
    with pytest.raises(ConfigError, match="tuning"):
        fix_round(v, t, f, 0.5, tuning={"chunk": 3})
    with pytest.raises(ConfigError, match="cache"):
        fix_round(v, t, f, 0.5, cache={})
    with pytest.raises(ConfigError, match="size"):
        EngineCache(size=0)


def test_inputs_requiring_grad_are_not_tracked():
    v = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    s = torch.full((3,), 0.01, requires_grad=True)
    res = fix_round(v, s, torch.zeros(3, dtype=torch.bool), 1.0, sigma=s,
                    config=EngineConfig(sigma_update="divide"))
    assert not res.values.requires_grad and not res.sigma.requires_grad


def test_ties_symmetric_values_negative_first():
    # +-x equally populated: the negative centre wins the tie
    v = torch.tensor([3 / 128, -3 / 128, 3 / 128, -3 / 128])
    t = torch.zeros(4)
    res = fix_round(v, t, torch.zeros(4, dtype=torch.bool), 0.5)
    assert res.values.tolist() == [3 / 128, -3 / 128, 3 / 128, -3 / 128]
    assert res.fixed.tolist() == [False, True, False, True]
    assert res.summary["picks"][0]["centre"] == -3 / 128


def test_partial_pick_ranks_by_normalised_distance_then_index():
    c = 0.25
    v = torch.tensor([c + 0.01, c + 0.001, c + 0.01, c + 0.02])
    t = torch.tensor([0.1, 0.1, 0.1, 0.1])
    res = fix_round(v, t, torch.zeros(4, dtype=torch.bool), 0.5,
                    config=EngineConfig(zero_fix=False))
    assert res.fixed.tolist() == [True, True, False, False]


def test_zero_fix_by_value_and_without_tolerance():
    v = torch.tensor([0.001, -0.002, 0.5, 0.0])
    t = torch.zeros(4)
    res = fix_round(v, t, torch.zeros(4, dtype=torch.bool), 0.75)
    assert res.values.tolist() == [0.0, 0.0, 0.5, 0.0]
    res2 = fix_round(v, t, torch.zeros(4, dtype=torch.bool), 0.75,
                     config=EngineConfig(zero_fix=False, max_escalations=2))
    # without zero_fix only the exact centres fit; the rest needs the fallback
    assert res2.summary["fallback"] == 1
    assert res2.values[3] == 0.0 and res2.values[2] == 0.5


def test_escalation_sequence_order_first_then_alternating():
    v = torch.tensor([5 / 128 + 0.001])  # 5 = 101b needs order 2 at tolerance 0.001 * m
    t = torch.tensor([0.0006])
    res = fix_round(v, t, torch.zeros(1, dtype=torch.bool), 1.0,
                    config=EngineConfig(zero_fix=False))
    s = res.summary
    assert (s["final_order"], s["final_multiplier"], s["escalations"]) == (2, 2.0, 2)
    assert res.values.item() == 5 / 128


def test_wfn_is_same_engine_with_relative_tolerance():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, generator=g) * 0.05
    delta = 0.01
    fixed = torch.zeros(500, dtype=torch.bool)
    cfg = EngineConfig(signed_terms=True)
    for t, p in enumerate([0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0]):
        tol = delta * (10 - t) * w.abs()
        res = fix_round(w, tol, fixed, p, config=cfg)
        _assert_invariants(w, tol, fixed, p, cfg, None, res)
        w, fixed = res.values, res.fixed
    assert bool(fixed.all())
    # 7/128 = 8/128 - 1/128 is order 2 with signed terms
    assert res.centres.orders[res.centres.values == 7 / 128].item() == 2


def test_previously_fixed_bit_identical_and_deterministic():
    g = torch.Generator().manual_seed(0)
    v = _laplace(8000, 0.02, g).float()
    sigma = (torch.rand(8000, generator=g) * 0.005).float()
    fixed = torch.zeros(8000, dtype=torch.bool)
    for p in [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0]:
        r1 = fix_round(v, sigma, fixed, p, sigma=sigma)
        r2 = fix_round(v.clone(), sigma.clone(), fixed.clone(), p, sigma=sigma.clone())
        for a, b in [(r1.values, r2.values), (r1.fixed, r2.fixed), (r1.sigma, r2.sigma),
                     (r1.centre_index, r2.centre_index), (r1.order, r2.order)]:
            assert torch.equal(a, b)
        assert torch.equal(r1.values[fixed].view(torch.int32), v[fixed].view(torch.int32))
        _assert_invariants(v, sigma, fixed, p, EngineConfig(), sigma, r1)
        v, fixed, sigma = r1.values, r1.fixed, r1.sigma
    assert bool(fixed.all())
    assert v.unique().numel() < 100


def test_nothing_to_do_returns_copies():
    v = torch.tensor([0.1, 0.2])
    fixed = torch.tensor([True, False])
    res = fix_round(v, torch.ones(2), fixed, 0.5)
    assert torch.equal(res.values, v) and torch.equal(res.fixed, fixed)
    assert res.values is not v
    assert res.summary["newly_fixed"] == 0


def test_target_count_slack():
    assert target_count(0.2, 10) == 2
    assert target_count(0.7, 10) == 7
    assert target_count(0.71, 10) == 8
    assert target_count(1.0, 7) == 7
    assert target_count(0.0, 7) == 0


def test_lookup_centres():
    cs = candidate_centres(1.0, 2)
    v = torch.tensor([0.5, 0.3, 0.0, -0.75, 2.0])
    idx = lookup_centres(v, cs)
    assert idx[1] == -1 and idx[4] == -1
    assert cs.values[idx[[0, 2, 3]].long()].tolist() == [0.5, 0.0, -0.75]


# --------------------------------------------------------------------------- bad input


def _ok():
    return torch.tensor([0.1, -0.2, 0.3]), torch.full((3,), 0.01), torch.zeros(3, dtype=torch.bool)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda v, t, f: (torch.tensor([0.1, float("nan"), 0.3]), t, f), "values"),
        (lambda v, t, f: (torch.tensor([0.1, float("inf"), 0.3]), t, f), "values"),
        (lambda v, t, f: (torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)),
         "values"),
        (lambda v, t, f: (v.reshape(3, 1), t.reshape(3, 1), f.reshape(3, 1)), "values"),
        (lambda v, t, f: (v.half(), t.half(), f), "values"),
        (lambda v, t, f: (v, torch.tensor([0.1, -0.1, 0.1]), f), "tolerance"),
        (lambda v, t, f: (v, torch.tensor([0.1, float("nan"), 0.1]), f), "tolerance"),
        (lambda v, t, f: (v, torch.tensor([0.1, float("inf"), 0.1]), f), "tolerance"),
        (lambda v, t, f: (v, torch.full((4,), 0.01), f), "tolerance"),
        (lambda v, t, f: (v, t.double(), f), "tolerance"),
        (lambda v, t, f: (v, [0.1, 0.1, 0.1], f), "tolerance"),
        (lambda v, t, f: (v, torch.zeros(3, device="meta"), f), "tolerance"),  # device
        (lambda v, t, f: (v, t, torch.zeros(3, dtype=torch.bool, device="meta")), "fixed"),
        (lambda v, t, f: (v, t, f.int()), "fixed"),
        (lambda v, t, f: (v, t, torch.zeros(2, dtype=torch.bool)), "fixed"),
    ],
)
def test_bad_input_names_the_tensor(mutate, name):
    v, t, f = mutate(*_ok())
    with pytest.raises(EngineInputError, match=name):
        fix_round(v, t, f, 0.5)


@pytest.mark.parametrize("pos", [0, 77_777, 99_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_found_anywhere_in_large_input(pos, bad):
    v = torch.zeros(100_000)
    t = torch.full((100_000,), 0.01)
    f = torch.zeros(100_000, dtype=torch.bool)
    v[pos] = bad
    with pytest.raises(EngineInputError, match="values"):
        fix_round(v, t, f, 0.5)
    v[pos] = 0.0
    t[pos] = bad
    with pytest.raises(EngineInputError, match="tolerance"):
        fix_round(v, t, f, 0.5)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_target_fraction(p):
    v, t, f = _ok()
    with pytest.raises(EngineInputError, match="target_fraction"):
        fix_round(v, t, f, p)


def test_target_below_fixed_fraction():
    v, t, _ = _ok()
    with pytest.raises(EngineInputError, match="target_fraction"):
        fix_round(v, t, torch.tensor([True, True, False]), 0.3)


def test_bad_sigma():
    v, t, f = _ok()
    with pytest.raises(EngineInputError, match="sigma"):
        fix_round(v, t, f, 0.5, sigma=torch.ones(2))
    with pytest.raises(EngineInputError, match="sigma"):
        fix_round(v, t, f, 0.5, sigma=torch.tensor([1.0, float("nan"), 1.0]))


@pytest.mark.parametrize("kw", [{"inc": 1.0}, {"max_order": 0}, {"sigma_update": "x"},
                                {"b": -1}, {"sigma_divisor": 0.0}, {"max_escalations": -1},
                                {"inc": 4.0, "max_escalations": 64}])
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        EngineConfig(**kw)


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_scaling.py"
    spec = importlib.util.spec_from_file_location("engine_scaling_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_dry_run_smoke(tmp_path, capsys):
    bench = _load_benchmark()
    out = tmp_path / "res.json"
    assert bench.main(["--dry", "--out", str(out)]) == 0
    import json

    doc = json.loads(out.read_text())
    r = doc["results"][0]
    assert r["pwfn"]["all_fixed"] and r["wfn"]["all_fixed"]
    assert len(r["pwfn"]["round_seconds"]) == 10
    assert out.with_suffix(".md").read_text().startswith("# Fixing engine scaling")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    v = _laplace(50000, 0.02, g).float()
    sigma = (torch.rand(50000, generator=g) * 0.005).float()
    fixed = torch.zeros(50000, dtype=torch.bool)
    vc, sc, fc = v.cuda(), sigma.cuda(), fixed.cuda()
    for p in [0.2, 0.6, 0.9, 1.0]:
        r = fix_round(v, sigma, fixed, p, sigma=sigma)
        rc = fix_round(vc, sc, fc, p, sigma=sc)
        assert torch.equal(r.values, rc.values.cpu()) and torch.equal(r.fixed, rc.fixed.cpu())
        rc2 = fix_round(vc, sc, fc, p, sigma=sc)
        assert torch.equal(rc.sigma, rc2.sigma) and torch.equal(rc.values, rc2.values)
        assert torch.equal(r.sigma, rc.sigma.cpu())  # sigma statistics are reduced on the host
        assert r.summary["picks"] == rc.summary["picks"]
        v, sigma, fixed = r.values, r.sigma, r.fixed
        vc, sc, fc = rc.values, rc.sigma, rc.fixed


# --------------------------------------------------------------------------- memory-lean selection


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, float("inf")]) | st.floats(0, 2), min_size=1, max_size=60),
       st.integers(0, 70), st.integers(1, 9))
def test_select_smallest_is_a_stable_selection_in_chunks(scores, k, step):
    """k smallest scores, ties by position, whatever the chunking (the scores are read twice)."""
    import numpy as np

    from pwfn.core._engine_fast import select_smallest, smallest

    score = torch.tensor(scores, dtype=torch.float64)
    want = np.sort(np.argsort(score.numpy(), kind="stable")[:k])
    calls = []

    def score_of(s, e):
        calls.append((s, e))
        return score[s:e]

    got = select_smallest(score_of, score.numel(), k, step)
    assert got.tolist() == want.tolist()
    assert smallest(score, k).tolist() == want.tolist()
    assert all(e - s <= step for s, e in calls)

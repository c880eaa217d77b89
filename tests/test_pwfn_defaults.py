"""PWFN off ImageNet (issue 13): the scale-equivariant, budget-aware defaults (also the `pwfn_scaled`
preset, at a fixed k), k chosen per round by the accuracy contract's caution levels, the Laplace
posterior and the paper preset (`paper_pwfn`: absolute scale, lam as given, sigma clipped, k fixed)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes
import pwfn
from pwfn.core.metrics import entropy_bits, unique_count
from pwfn.errors import ConfigError
from pwfn.methods.pwfn import PWFNMethod, effective_steps
from pwfn.methods.wfn import WFNMethod
from pwfn.model.config import load_config
from pwfn.training.fixer import Fixer, resolve_config
from pwfn.training.tasks import BatchAdapter, resolve_task


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    return m


SCALED = "pwfn_scaled"


def _fix_without_training(model: nn.Module, config=SCALED) -> Fixer:
    fx = Fixer(model, "pwfn", config=config, contract=False)
    for _ in fx.rounds():
        pass
    return fx


def _rescaled(m: nn.Sequential, k: int) -> nn.Sequential:
    """A copy of ``m`` with layer 0 times 2^k and layer 2 times 2^-k: the same ReLU network."""
    s = copy.deepcopy(m)
    with torch.no_grad():
        s[0].weight.mul_(2.0**k)
        s[0].bias.mul_(2.0**k)
        s[2].weight.mul_(2.0**-k)
    return s


def _per_tensor(fx: Fixer) -> list[tuple[int, float]]:
    return [(unique_count(s.value.detach().reshape(-1), include_zero=True),
             entropy_bits(s.value.detach().reshape(-1), include_zero=True)) for s in fx.view.slots]


@pytest.mark.parametrize("config", [SCALED, None], ids=["pwfn_scaled", "defaults"])
@pytest.mark.parametrize("k", [-3, 2, 5])
def test_rescaling_a_layer_and_its_consumer_changes_nothing_but_the_scale(k, config):
    """Layer 0 times 2^k, layer 2 times 2^-k: the same ReLU network. With the scaled preset and with
    the defaults every tensor gets the same codes (its unique values and entropy are equal, its
    values exactly 2^k or 2^-k times the original's), so the fixed networks compute the same function."""
    m = _mlp()
    s = _rescaled(m, k)
    a, b = _fix_without_training(m, config), _fix_without_training(s, config)
    assert _per_tensor(a) == _per_tensor(b)
    factors = {"0.weight": 2.0**k, "0.bias": 2.0**k, "2.weight": 2.0**-k}
    for sa, sb in zip(a.view.slots, b.view.slots):
        assert torch.equal(sa.value * factors.get(sa.name, 1.0), sb.value), sa.name
        assert torch.equal(sa.sigma * factors.get(sa.name, 1.0), sb.sigma), sa.name
    x = torch.randn(64, 16)
    with a.evaluating(), b.evaluating():
        assert torch.allclose(a.model(x), b.model(x), rtol=1e-5, atol=1e-5)


def test_the_paper_preset_is_not_scale_equivariant():
    """The contrast that shows the test above can fail: absolute sigma and grid (the paper's)."""
    m = _mlp()
    s = _rescaled(m, 4)
    a, b = _fix_without_training(m, "paper_pwfn"), _fix_without_training(s, "paper_pwfn")
    ua, ub = _per_tensor(a)[0][0], _per_tensor(b)[0][0]
    assert ub > 2 * ua  # the scaled-up layer scatters over many more values


def test_conv_followed_by_batchnorm_scaled_by_16():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)).eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    s = copy.deepcopy(m)
    with torch.no_grad():
        s[0].weight.mul_(16.0)
        s[0].bias.mul_(16.0)
        s[1].running_mean.mul_(16.0)
        s[1].running_var.mul_(256.0)
        s[1].eps *= 256.0
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(m(x), s(x), atol=1e-4)
    a, b = _fix_without_training(m), _fix_without_training(s)
    assert _per_tensor(a) == _per_tensor(b)
    with a.evaluating(), b.evaluating():
        assert torch.allclose(a.model(x), b.model(x), rtol=1e-4, atol=1e-4)


def test_sigma_init_tau_and_push_scale_with_the_tensor():
    m = _mlp()
    s = copy.deepcopy(m)
    with torch.no_grad():
        s[0].weight.mul_(2.0**4)
    a, b = Fixer(m, "pwfn", config=SCALED, contract=False), Fixer(s, "pwfn", config=SCALED, contract=False)
    assert torch.equal(a.view.slots[0].sigma * 16, b.view.slots[0].sigma)
    assert b.method_impl.units["0.weight"] == 16 * a.method_impl.units["0.weight"]
    grads = []
    for fx in (a, b):
        loss = bayes.sigma_regularizer(fx.model, tau=0.5, lam=1.0, tau_scale=fx.method_impl.units)
        grads.append(torch.autograd.grad(loss, [fx.view.slots[0].sigma])[0])
    assert torch.allclose(grads[0] * 16, grads[1], rtol=1e-6)


def _sigma_after(steps: int, reference) -> float:
    """Mean sigma after ``steps`` SGD steps (lr 1e-3, momentum 0.9) on the regulariser alone (mean mode)."""
    torch.manual_seed(0)
    ref = "null" if reference is None else reference
    fx = Fixer(nn.Linear(8, 4), "pwfn", config=SCALED, overrides=[f"pwfn.sigma_steps_reference={ref}"],
               steps_per_round=steps)
    sig = fx.view.slots[0].sigma
    opt = fx.method_impl.optimizer(fx.model, fx.view, None)
    x = torch.randn(2, 8)
    with bayes.forward_mode(fx.model, "mean"):
        for _ in range(steps):
            fx.model(x)
            opt.zero_grad()
            fx.loss_term().backward()
            opt.step()
    return float(sig.detach().mean())


def test_sigma_moves_as_far_in_10_steps_as_in_10000():
    short, long = _sigma_after(10, 30000.0), _sigma_after(10_000, 30000.0)
    torch.manual_seed(0)
    init = float(Fixer(nn.Linear(8, 4), "pwfn", config=SCALED).view.slots[0].sigma.detach().mean())
    moved_short, moved_long = short - init, long - init
    assert moved_long > 0
    assert abs(moved_short - moved_long) <= 0.12 * moved_long
    # the paper's unscaled lam barely moves sigma in 10 steps: the test above can fail
    paper = _sigma_after(10, None) - init
    assert paper < 0.05 * moved_short


def test_effective_steps():
    assert effective_steps(1, 0.9) == pytest.approx(0.1)
    assert effective_steps(10, 0.0) == 10
    assert effective_steps(30000, 0.9) == pytest.approx(30000 - 9, rel=1e-9)


def test_laplace_sigma_follows_the_curvature_on_a_quadratic():
    """y = x . w* + noise with feature scales 0.1, 1, 10: curvature of w_i grows with scale_i^2,
    so the Laplace sigma must shrink in that order; all finite and positive, none above the prior."""
    torch.manual_seed(0)
    n = 512
    x = torch.randn(n, 3) * torch.tensor([0.1, 1.0, 10.0])
    w_true = torch.tensor([[0.5, -0.25, 0.75]])
    y = x @ w_true.T + 0.1 * torch.randn(n, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_true)
    fx = Fixer(model, "pwfn", config={"task": "regression", "pwfn": {"posterior": "laplace", "laplace_batches": 8}},
               dataset_size=n)
    out = fx.method_impl.refresh_posterior(fx.model, fx.view, loader, torch.device("cpu"), resolve_task("regression"),
                                        BatchAdapter())
    sigma = fx.view.slots[0].sigma.detach().reshape(-1)
    assert bool(torch.isfinite(sigma).all()) and bool((sigma > 0).all())
    assert sigma[0] > sigma[1] > sigma[2]
    prior = fx.cfg.pwfn.laplace_prior * fx.method_impl.units["weight"]
    assert float(sigma.max()) <= prior
    assert out["batches"] == 8
    assert not fx.view.slots[0].sigma.requires_grad  # sigma is not trained under posterior=laplace
    assert bayes.laplace_sigma(torch.zeros(2), 10, 0.3).tolist() == pytest.approx([0.3, 0.3])


def test_laplace_posterior_end_to_end(tmp_path):
    from pwfn.data import make_loaders

    loaders = make_loaders("digits", batch_size=64, seed=0, train_subset=192)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    res = pwfn.compress(model, loaders.train, loaders.val, config={
        "progress": False, "pwfn": {"posterior": "laplace", "fractions": [0.5, 1.0], "round_epochs": 0.2,
                                    "mc_samples": 2}})
    assert res.report["final"]["fixed_fraction"] == 1.0
    assert res.history[1]["laplace"]["batches"] >= 1
    assert math.isfinite(res.history[1]["laplace"]["mean_sigma_free"])


def test_paper_preset_and_validation():
    cfg = resolve_config("paper_pwfn")
    p = cfg.pwfn
    assert (p.scale, p.sigma_init_scale, p.sigma_init_max, p.tau, p.lam) == ("absolute", 0.0025, 0.05, 0.05, 2.0**-11)
    assert p.sigma_steps_reference is None and p.clip_sigma and p.posterior == "trained"
    assert p.k == 1.0 and p.k_min == 1.0  # k is never halved (the contract still judges every round)
    assert cfg.contract.enforce
    scaled = ("tensor", 0.1, 0.5, 0.5, 30000.0, False)
    d = load_config(None).pwfn  # the defaults: the scaled settings, k from 2 down to 0.5 as the contract needs
    assert (d.scale, d.sigma_init_scale, d.sigma_init_max, d.tau, d.sigma_steps_reference, d.clip_sigma) == scaled
    assert (d.k, d.k_min, d.lam) == (2.0, 0.125, 2.0**-11)
    s = resolve_config(SCALED).pwfn  # the same settings at a fixed k
    assert (s.scale, s.sigma_init_scale, s.sigma_init_max, s.tau, s.sigma_steps_reference, s.clip_sigma) == scaled
    assert s.k == 1.0 and s.k_min == 1.0
    for bad in ("pwfn.scale=relative", "pwfn.posterior=fisher", "pwfn.sigma_steps_reference=0",
                "pwfn.laplace_batches=0", "pwfn.laplace_prior=0", "pwfn.k_min=0"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_caution_levels_halve_k_down_to_k_min_then_turn_the_zero_pass_off():
    m = PWFNMethod(load_config(None))  # k = 2, k_min = 0.125: 2, 1, 0.5, 0.25, 0.125, then no zero pass
    assert [m.set_caution(level) for level in range(7)] == [True] * 6 + [False]
    assert m.caution == 5 and m.k_now == 0.125 and m.no_zero_pass and m.caution_text() == "k = 0.125, no zero pass"
    cfg = m.cautious_engine(m.engine_config())
    assert cfg.zero_fix is False and m.engine_config().zero_fix is True
    assert m.set_caution(4) and m.k_now == 0.125 and not m.no_zero_pass and m.schedule.k == 0.125
    assert m.set_caution(0) and m.k_now == 2.0
    odd = PWFNMethod(load_config(None, ["pwfn.k=0.75", "pwfn.k_min=0.5"]))  # the last halving stops at k_min
    assert odd.set_caution(1) and odd.k_now == 0.5 and not odd.no_zero_pass
    assert odd.set_caution(2) and odd.no_zero_pass and not odd.set_caution(3)
    paper = PWFNMethod(resolve_config("paper_pwfn"))  # k_min = k: k is never halved; the zero pass may go
    assert paper.set_caution(1) and paper.k_now == 1.0 and paper.no_zero_pass and not paper.set_caution(2)
    no_zero = PWFNMethod(load_config(None, ["pwfn.engine.zero_fix=false"]))  # no pass to turn off: no such level
    assert no_zero.set_caution(4) and not no_zero.set_caution(5)
    wfn = WFNMethod(load_config(None))
    assert [wfn.set_caution(level) for level in range(6)] == [True] * 5 + [False]
    assert wfn.caution == 4 and wfn.schedule.delta == pytest.approx(0.01 / 8) and wfn.no_zero_pass
    assert wfn.caution_text() == "delta = 0.00125, no zero pass"


def _same_state(a: Fixer, b: Fixer) -> bool:
    return all(torch.equal(x.value, y.value) and torch.equal(x.mask, y.mask) and torch.equal(x.sigma, y.sigma)
               for x, y in zip(a.view.slots, b.view.slots))


def test_a_try_beyond_the_contract_is_undone_exactly_and_redone_more_cautiously():
    """A try that takes the metric beyond what the contract allows is undone bit for bit: the round redone at
    k / 2 equals the same round run directly at k / 2. The next round first tries one level bolder."""
    m = _mlp()
    scores = iter([90.0,  # the float model
                   90.0, 80.0, 89.5,  # round 1: before; k = 2 costs 10 points (beyond 3 x 0.5); k = 1 keeps
                   89.8,  # after its "training": within the (paced) contract, so round 1 stands
                   85.0, 89.9])  # round 2 (the last: the contract itself): k = 2 beyond, k = 1 within
    fx = Fixer(m, "pwfn", config={"pwfn": {"fractions": [0.5, 1.0]}}, evaluate=lambda: next(scores))
    assert fx.reference == 90.0
    row = fx.fix_next().row
    assert [t["caution"] for t in row["contract"]["tries"]] == [0, 1] and row["contract"]["caution"] == 1
    ref = Fixer(m, "pwfn", config={"pwfn": {"fractions": [0.5, 1.0], "k": 1.0, "k_min": 1.0}}, contract=False)
    ref.fix_next()  # k = 1 directly
    assert _same_state(fx, ref)
    row = fx.fix_next().row
    assert [t["setting"] for t in row["contract"]["tries"]] == ["k = 2", "k = 1"]
    assert fx.history[0]["contract"]["after_training"] == 89.8 and fx.report()["contract"]["held"]


def test_the_guard_scores_enough_examples_or_says_so(caplog):
    """The guard scores at least contract.guard_examples examples: the validation set, topped up with
    training examples when it holds fewer; without that, a warning says the guard cannot resolve the
    tolerance."""
    torch.manual_seed(0)
    x, y = torch.randn(1500, 8), (torch.randn(1500, 8)[:, 0] > 0).long()
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=50)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = {"progress": False, "pwfn": {"fractions": [0.5, 1.0], "round_epochs": 0.0, "first_round_epochs": 0.0,
                                       "mc_samples": 1}, "contract": {"max_drop": 50.0}}
    val = DataLoader(TensorDataset(x[1000:1180], y[1000:1180]), batch_size=64)
    res = pwfn.compress(model, train, val, config=cfg)
    guard = res.report["contract"]["guard"]
    assert guard["examples"] == 1000 and guard["source"] == "180 validation + 820 training examples"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pwfn"):
        res = pwfn.compress(model, train, val, config={**cfg, "contract": {"max_drop": 50.0,
                                                                            "guard_from_train": False}})
    assert res.report["contract"]["guard"]["examples"] == 180
    assert "scores only 180 examples" in caplog.text and "needs 1000" in caplog.text
    big = DataLoader(TensorDataset(x[1000:], y[1000:]), batch_size=64)  # 500 validation examples: a tighter
    res = pwfn.compress(model, train, big, config={**cfg, "contract": {"max_drop": 0.25}})  # tolerance needs more
    assert res.report["contract"]["guard"]["needed"] == 2000


def test_sigma_is_left_out_of_clipping_by_the_scaled_preset():
    m = _mlp()
    fx = Fixer(m, "pwfn", config=SCALED, contract=False)
    params = fx.method_impl.clip_parameters(fx.model)
    ids = {id(p) for p in params}
    assert not any(id(s) in ids for s in bayes.sigma_parameters(fx.model))
    assert PWFNMethod(resolve_config("paper_pwfn")).clip_parameters(fx.model) is None


def test_shifted_tensors_report_a_finer_b():
    """A tensor far below the reference scale is fixed on a finer grid; reports count its terms."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        m[2].weight.mul_(2.0**-6)
    fx = _fix_without_training(m)
    assert fx.engine_config.b > 7
    assert fx.history[-1]["unique"] >= 2


def test_pareto_benchmark_smoke(tmp_path):
    """benchmarks/pareto.py end to end on its smallest network, 2 steps per round, two knob values."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("pareto_bench", bench / "pareto.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench))
    try:
        spec.loader.exec_module(mod)
        import logging

        threads, level = torch.get_num_threads(), logging.getLogger("pwfn").level
        try:
            assert mod.main(["--nets", "digits_mlp", "--quick", "--steps", "2", "--out", str(tmp_path)]) == 0
        finally:
            torch.set_num_threads(threads)
            logging.getLogger("pwfn").setLevel(level)
    finally:
        sys.path.remove(str(bench))
    import json

    doc = json.loads((tmp_path / "pareto.json").read_text())
    labels = {p["label"] for p in doc["points"]}
    assert labels == {"pwfn default", "wfn", "wfn_published"}  # --full adds the fixed-k, Laplace and paper points
    # every point ran under the contract: it finished within it (figures and both verdicts) or failed saying why
    for p in doc["points"]:
        assert p["failed"] is bool(p.get("error")), p
        if not p["failed"]:
            assert 1 <= p["unique"] and 0 <= p["entropy"] and 0 <= p["metric"] <= 100 and isinstance(p["test_within"], bool)
            assert p["guard_drop"] <= 0.5 + 1e-9  # the contract held on the guard data
    s = doc["summary"][0]
    assert s["network"] == "digits_mlp" and set(s["best"]) == labels and s["pwfn_default"]["knob"] == "config"
    assert "contract held" in (tmp_path / "pareto.md").read_text()

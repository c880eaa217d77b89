"""The accuracy contract: its arithmetic, its defaults per task, bad input, and its enforcement by the Fixer
and by compress (rounds undone and redone, split, a finer codebook, a loud failure, resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn
from pwfn.cli import main as cli_main
from pwfn.data import make_loaders
from pwfn.errors import ConfigError, ContractError
from pwfn.training.contract import AccuracyContract, metric_value, resolve_contract
from pwfn.training.fixer import Fixer
from pwfn.training.tasks import BCETask, CustomTask, resolve_task

# ----------------------------------------------------------------------------------------- arithmetic


def test_drop_and_limit_for_both_directions_and_types():
    top1 = AccuracyContract("top1", 0.5, "absolute", True)
    assert top1.drop(97.0, 96.6) == pytest.approx(0.4) and top1.holds(97.0, 96.6)
    assert not top1.holds(97.0, 96.4) and top1.holds(97.0, 99.0)  # better than float always holds
    assert top1.limit(97.0) == pytest.approx(96.5)
    mse = AccuracyContract("mse", 0.02, "relative", False)
    assert mse.drop(2.0, 2.03) == pytest.approx(0.015) and mse.holds(2.0, 2.04)
    assert not mse.holds(2.0, 2.05) and mse.limit(2.0) == pytest.approx(2.04)
    assert not top1.holds(97.0, math.nan) and not mse.holds(math.inf, 1.0)
    assert "0.5 below" in top1.text() and "2 % above" in mse.text()


@settings(max_examples=200, deadline=None)
@given(ref=st.floats(-1e3, 1e3), value=st.floats(-1e3, 1e3), drop=st.floats(0, 10), hib=st.booleans(),
       kind=st.sampled_from(["absolute", "relative"]))
def test_holds_exactly_when_the_value_is_on_the_right_side_of_the_limit(ref, value, drop, hib, kind):
    if kind == "relative" and hib and drop >= 1:
        drop = drop / 11
    c = AccuracyContract("m", drop, kind, hib)
    limit = c.limit(ref)
    inside = value >= limit if hib else value <= limit
    margin = 1e-6 * max(1.0, abs(ref), abs(value))
    if abs(value - limit) > margin:  # away from the boundary the two agree
        assert c.holds(ref, value) == inside
    assert c.holds(ref, ref)  # the float model keeps its own contract


@pytest.mark.parametrize("task, metric, drop, kind, hib", [
    ("classification", "top1", 0.5, "absolute", True),
    ("regression", "mse", 0.02, "relative", False),
    ("regression_l1", "mae", 0.01, "relative", False),
    ("bce", "accuracy@0.5", 0.5, "absolute", True),
    ("language_model", "bits_per_token", 0.01, "relative", False),
])
def test_defaults_per_task(task, metric, drop, kind, hib):
    c = resolve_contract(resolve_task(task))
    assert (c.metric, c.max_drop, c.drop_type, c.higher_is_better) == (metric, drop, kind, hib)


def test_the_config_section_and_a_spec_override_the_defaults():
    cfg = pwfn.load_config(None, ["contract.max_drop=1.5"])
    assert resolve_contract(resolve_task("classification"), None, cfg.contract).max_drop == 1.5
    c = resolve_contract(resolve_task("classification"), {"metric": "loss", "max_drop": 0.05}, cfg.contract)
    assert (c.metric, c.max_drop, c.drop_type, c.higher_is_better) == ("loss", 0.05, "relative", False)
    assert resolve_contract(resolve_task("classification"), False, cfg.contract) is None
    off = pwfn.load_config(None, ["contract.enforce=false"])
    assert resolve_contract(resolve_task("classification"), None, off.contract) is None


@pytest.mark.parametrize("spec, match", [
    ({"max_drop": -0.1}, "max_drop"),
    ({"max_drop": float("nan")}, "max_drop"),
    ({"max_drop": float("inf")}, "max_drop"),
    ({"drop_type": "percent"}, "drop_type"),
    ({"max_drop": 150}, "allows any result"),
    ({"metric": "f1"}, "higher_is_better"),
    ({"metric": "top1", "higher_is_better": False}, "contradicts"),
    ({"max_drop": 1.0, "drop_type": "relative"}, "fall to nothing"),
    ({"drop_type": "relative"}, "needs a max_drop"),
    ({"tolerance": 0.5}, "unknown contract key"),
])
def test_meaningless_contracts_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_contract(resolve_task("classification"), spec)


@pytest.mark.parametrize("override", ["contract.max_drop=-1", "contract.drop_type=lots", "contract.max_splits=-1",
                                      "contract.guard_examples=0", "contract.recovery_factor=0.5"])
def test_bad_contract_settings_in_the_config(override):
    with pytest.raises(ConfigError, match="contract"):
        pwfn.load_config(None, [override])


def test_the_old_guard_keys_say_what_replaced_them():
    with pytest.raises(ConfigError, match="accuracy contract"):
        pwfn.load_config(None, ["pwfn.guard_drop=0.01"])


def test_metric_value_reads_numbers_dicts_and_refuses_the_rest():
    c = AccuracyContract("top1", 0.5, "absolute", True)
    assert metric_value(97.0, c) == 97.0 and metric_value({"top1": 96, "loss": 1}, c) == 96.0
    assert metric_value(torch.tensor(95.5), c) == 95.5
    with pytest.raises(ConfigError, match="not a .score, loss. pair"):
        metric_value((97.0, 0.1), c)
    with pytest.raises(ConfigError, match="without the contract's metric 'top1'"):
        metric_value({"acc": 97.0}, c)
    with pytest.raises(ConfigError, match="returned a bool"):
        metric_value(True, c)


# ----------------------------------------------------------------------------- enforcement (Fixer)


def _linear_data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return x, (x @ w).argmax(1)


def _trained(x, y, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def classifier():
    x, y = _linear_data()
    return _trained(x, y), x, y


def _weight_error(fixer, reference_values):
    """A 'metric' that falls with the fixing error of the quantised weights: 100 - 1000 * mean |w - w_float|."""

    def metric() -> float:
        v = fixer.view.values()
        return 100.0 - 1000.0 * float((v - reference_values).abs().mean())

    return metric


def test_a_fixer_with_a_contract_and_no_evaluation_refuses_to_fix(classifier):
    model, _, _ = classifier
    fixer = Fixer(model, "pwfn")
    with pytest.raises(ConfigError, match="has no evaluation"):
        fixer.fix_next()
    Fixer(model, "pwfn", contract=False).fix_next()  # explicitly off: runs, and the report says unchecked
    off = Fixer(model, "pwfn", contract=False)
    while not off.done:
        off.fix_next()
    assert off.report()["contract"]["enforced"] is False


def test_every_kept_round_is_within_the_contract_against_the_float_model(classifier):
    """A metric that only falls as weights are fixed (no training recovers it), with WFN, whose caution (delta
    halved) cuts the fixing error about in half per level: the contract is against the float model over all
    rounds together, so the caution rises and the final drop stays within it (unchecked: 17; the most
    cautious level: 4.2; greedily, early rounds spend what the later ones cannot)."""
    model, _, _ = classifier
    free = Fixer(model, "wfn", contract=False).view.values().clone()
    fixer = Fixer(model, "wfn", contract={"metric": "m", "higher_is_better": True, "max_drop": 8.0,
                                          "drop_type": "absolute"})
    fixer.set_evaluation(_weight_error(fixer, free))
    assert fixer.reference == pytest.approx(100.0)
    while not fixer.done:
        fixer.fix_next()
    for row in fixer.history:  # every round kept was within the contract once judged (after "training")
        c = row["contract"]
        assert (c["drop_after_training"] if row["fraction"] < 1.0 else c["drop"]) <= 8.0 + 1e-9
    report = fixer.report()["contract"]
    assert report["held"] is True and report["drop"] <= 8.0 + 1e-9
    assert any(row["contract"]["caution"] >= 2 for row in fixer.history)
    assert any("undone_after_training" in row["contract"] for row in fixer.history)
    unchecked = Fixer(model, "wfn", contract=False)
    while not unchecked.done:
        unchecked.fix_next()
    assert 1000.0 * float((unchecked.view.values() - free).abs().mean()) > 8.0, "the test needs a binding contract"


def test_an_impossible_contract_fails_loudly_and_leaves_the_last_state_within_it(classifier):
    model, _, _ = classifier
    free = Fixer(model, "pwfn", contract=False).view.values().clone()
    fixer = Fixer(model, "pwfn", contract={"metric": "m", "higher_is_better": True, "max_drop": 0.0,
                                           "drop_type": "absolute"})
    fixer.set_evaluation(_weight_error(fixer, free))
    before = (fixer.view.values().clone(), fixer.view.fixed().clone())
    with pytest.raises(ContractError, match="breaks the accuracy contract") as info:
        fixer.fix_next()
    msg = str(info.value)
    assert "k = 0.125, no zero pass" in msg and "contract.max_drop" in msg and "pwfn.k_min" in msg
    assert torch.equal(fixer.view.values(), before[0]) and torch.equal(fixer.view.fixed(), before[1])
    assert fixer.round == 0 and fixer.history == []


def test_a_round_that_cannot_keep_it_at_full_size_is_split(classifier):
    """Fixing error summed over the fixed weights: fewer new weights cost less, so the round is split and the
    rest follows in an extra round."""
    model, _, _ = classifier
    free = Fixer(model, "pwfn", contract=False).view.values().clone()
    fixer = Fixer(model, "pwfn", config={"pwfn": {"k": 4.0, "k_min": 4.0}},
                  contract={"metric": "m", "higher_is_better": True, "max_drop": 1.0, "drop_type": "absolute"})

    def metric():
        v = fixer.view.values()
        return 100.0 - 10.0 * float((v - free).abs().sum()) / 100.0

    fixer.set_evaluation(metric)
    planned = list(fixer.fractions)
    try:
        while not fixer.done:
            fixer.fix_next()
    except ContractError:
        pass
    assert len(fixer.fractions) > len(planned), "no round was split"
    split = [row for row in fixer.history if row["contract"]["split"]]
    assert split and all(row["fraction"] < planned[fixer.schedule_index[row["round"]]] for row in split)
    assert fixer.history[0]["fraction"] <= planned[0]


def test_the_last_resort_is_a_finer_codebook():
    """Pure powers of two (max_order 1) cannot get close enough; one or two more terms can."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.uniform_(0.3, 0.7)
    free = Fixer(model, "wfn", contract=False).view.values().clone()
    cfg = {"wfn": {"fractions": [1.0], "engine": {"max_order": 1}}, "contract": {"max_splits": 0}}
    fixer = Fixer(model, "wfn", config=cfg,
                  contract={"metric": "m", "higher_is_better": True, "max_drop": 5.0, "drop_type": "absolute"})
    fixer.set_evaluation(lambda: 100.0 - 100.0 * float(((fixer.view.values() - free).abs() / free.abs()).mean()))
    fixer.fix_next()
    assert fixer.extra_terms >= 1 and fixer.engine_config.max_order == 1 + fixer.extra_terms
    assert fixer.report()["contract"]["extra_terms"] == fixer.extra_terms and fixer.report()["contract"]["held"]
    from pwfn.core.metrics import (
        term_counts,  # every fixed value has at most the finer codebook's terms
    )

    terms = term_counts(fixer.view.values(), fixer.engine_config.b, signed_terms=True)
    assert int(terms.max()) == fixer.engine_config.max_order  # the extra terms were needed, and used


def test_a_round_whose_training_does_not_recover_is_undone_and_redone(classifier):
    """The training after a round makes things worse: the round's fixing, that training and the optimizer's
    state are undone, and the round is redone more cautiously (Round.retry)."""
    model, x, y = classifier
    fixer = Fixer(model, "pwfn", config={"pwfn": {"fractions": [0.5, 1.0]}, "contract": {"undo_training": False}},
                  evaluate=[(x, y)], contract={"max_drop": 3.0})
    opt = torch.optim.SGD(fixer.model.parameters(), lr=5.0, momentum=0.9)
    start = {k: v.clone() for k, v in fixer.model.state_dict().items()}
    rnd = fixer.fix_next()
    assert not rnd.retry and rnd.trains and rnd.row["contract"]["setting"] == "k = 2"
    fixer.train()
    for _ in range(3):  # a destructive "training": gradient ascent, the optimizer's momentum building up
        opt.zero_grad()
        (-F.cross_entropy(fixer.model(x), y)).backward()
        opt.step()
    assert fixer.measure() < fixer.reference - 3.0
    assert fixer.settle() is False  # undone: weights, masks, the optimizer and the round count as before it
    after = fixer.model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start)
    assert not bool(fixer.view.fixed().any()) and fixer.round == 0 and fixer.history == []
    assert opt.state_dict()["state"] == {}  # the momentum the bad training built is gone
    redo = fixer.fix_next()
    assert redo.retry and redo.index == 0 and redo.row["contract"]["setting"] == "k = 1"  # one level more cautious
    undone = redo.row["contract"]["undone_after_training"]
    assert len(undone) == 1 and undone[0]["after_training"] < fixer.reference - 3.0


def test_training_that_costs_more_than_the_fixing_is_undone_and_the_fixing_kept(classifier):
    """By default (contract.undo_training) a round whose fixing kept the pace and whose training then broke it
    keeps its fixing: the weights as they were right after the round, the optimizer as before it."""
    model, x, y = classifier
    fixer = Fixer(model, "pwfn", config={"pwfn": {"fractions": [0.5, 1.0]}}, evaluate=[(x, y)],
                  contract={"max_drop": 3.0})
    opt = torch.optim.SGD(fixer.model.parameters(), lr=5.0, momentum=0.9)
    rnd = fixer.fix_next()
    after_fix = {k: v.clone() for k, v in fixer.model.state_dict().items()}
    fixed = fixer.view.fixed().clone()
    value = rnd.row["contract"]["value"]
    fixer.train()
    for _ in range(3):  # gradient ascent
        opt.zero_grad()
        (-F.cross_entropy(fixer.model(x), y)).backward()
        opt.step()
    assert fixer.measure() < fixer.reference - 3.0
    assert fixer.settle() is True and fixer.round == 1  # kept: no redo
    now = fixer.model.state_dict()
    assert all(torch.equal(now[k], after_fix[k]) for k in after_fix)
    assert torch.equal(fixer.view.fixed(), fixed) and opt.state_dict()["state"] == {}
    row = fixer.history[0]["contract"]
    assert row["after_training"] == pytest.approx(value) and row["training_undone"]["after_training"] < value - 3.0
    assert fixer.measure() == pytest.approx(value)
    fixer.fix_next()  # the last round: judged on its own
    assert fixer.done and fixer.report()["contract"]["held"] is True


def test_a_round_whose_training_recovers_is_kept(classifier):
    model, x, y = classifier
    fixer = Fixer(model, "pwfn", config={"pwfn": {"fractions": [0.5, 1.0]}}, evaluate=[(x, y)])
    fixer.fix_next()
    assert fixer.settle() is True  # no training, still within: kept
    row = fixer.history[0]["contract"]
    assert row["after_training"] == pytest.approx(row["value"]) and fixer.round == 1


# --------------------------------------------------------------------------------- compress, CLI


@pytest.fixture(scope="module")
def digits():
    return make_loaders("digits", batch_size=64, seed=0, train_subset=600)


def _digits_model(loaders, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    for _ in range(25):
        for xb, yb in loaders.train:
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
    return m.eval()


FAST = {"progress": False, "pwfn": {"fractions": [0.5, 0.8, 0.95, 1.0], "round_epochs": 1.0,
                                    "first_round_epochs": 0.2, "mc_samples": 1},
        "wfn": {"fractions": [0.5, 0.8, 0.95, 1.0], "round_epochs": 1.0}}


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_compress_reports_the_contract_and_keeps_it(method, digits):
    model = _digits_model(digits)
    res = pwfn.compress(model, digits.train, digits.val, method=method, config=FAST, test_loader=digits.test)
    c = res.report["contract"]
    assert c["enforced"] and c["held"] is True and c["metric"] == "top1" and c["max_drop"] == 0.5
    assert c["drop"] <= 0.5 + 1e-9 and c["value"] >= c["reference"] - 0.5 - 1e-9
    assert set(c["test"]) == {"reference", "value", "drop", "within"}
    # the validation set is small: the guard also scores training examples (here all of them: 600 + validation)
    assert c["guard"]["examples"] > 700 and "training examples" in c["guard"]["source"]
    assert c["reference"] == pytest.approx(res.history[0]["contract"]["reference"])
    # the point model is the fixed model: its top-1 on the test split is the report's
    assert res.report["final"]["point_model_test"]["top1"] == pytest.approx(res.report["final"]["test"]["top1"])


def test_compress_fails_loudly_and_keeps_the_last_checkpoint_within_the_contract(digits, tmp_path):
    model = _digits_model(digits)  # the loss may not rise at all, and nothing trains: round 1 cannot keep that
    cfg = {**FAST, "pwfn": {**FAST["pwfn"], "round_epochs": 0.0, "k": 4.0, "k_min": 4.0},
           "contract": {"metric": "loss", "max_drop": 0.0, "max_splits": 0, "extra_terms": 0}}
    with pytest.raises(ContractError, match="breaks the accuracy contract|no more cautious") as info:
        pwfn.compress(model, digits.train, digits.val, config=cfg, run_dir=tmp_path / "run")
    assert "checkpoint" in str(info.value)
    assert (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "point_model.safetensors").exists()
    assert not (tmp_path / "run" / "report.json").exists()


def test_the_cli_exits_non_zero_when_the_contract_cannot_be_kept(tmp_path, capsys):
    rc = cli_main(["run", "--out", str(tmp_path), "--set", "progress=false", "--set", "baseline.epochs=5",
                   "--set", "data.train_subset=400", "--set", "pwfn.fractions=[0.5, 1.0]",
                   "--set", "pwfn.round_epochs=0", "--set", "pwfn.k=4", "--set", "pwfn.k_min=4",
                   "--set", "contract.metric=loss", "--set", "contract.max_drop=0",
                   "--set", "contract.max_splits=0", "--set", "contract.extra_terms=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "accuracy contract" in err


def test_metrics_beside_a_built_in_task_and_a_contract_on_one_of_them(tmp_path):
    """bce with your own metric: the contract judges it, not the loss; a metric the task does not produce is
    an error before anything is written."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 6, generator=g)
    y = (x[:, :3] > 0).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    train = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(x[600:], y[600:]), batch_size=300)

    def all_right(outputs, targets):  # share of examples with every label right
        return {"all_right": 100.0 * float(((outputs > 0) == (targets > 0.5)).all(1).float().mean())}

    cfg = {**FAST, "contract": {"metric": "all_right", "higher_is_better": True, "max_drop": 10.0,
                                "drop_type": "absolute"}}
    res = pwfn.compress(model, train, val, config=cfg, task="bce", metrics=all_right)
    c = res.report["contract"]
    assert c["metric"] == "all_right" and c["held"] and "all_right" in res.report["final"]["test"]
    assert res.report["task"]["primary"] == "accuracy@0.5"
    bad = {**FAST, "contract": {"metric": "f1", "higher_is_better": True}}
    with pytest.raises(ConfigError, match="without the contract's metric 'f1'"):
        pwfn.compress(model, train, val, config=bad, task="bce", metrics=all_right, run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_custom_primary_the_metrics_do_not_return_is_an_error_not_the_loss():
    x, y = _linear_data(200)
    model = _trained(x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    task = CustomTask(lambda o, t: F.cross_entropy(o, t), lambda o, t: {"acc": float((o.argmax(1) == t).float().mean())},
                      primary="accuracy", higher_is_better=True)
    with pytest.raises(ConfigError, match="without the contract's metric 'accuracy'"):
        pwfn.compress(model, loader, loader, config=FAST, task=task)


def test_bce_is_judged_by_its_decisions_not_its_loss():
    task = BCETask()
    assert task.primary == "accuracy@0.5" and task.higher_is_better
    assert resolve_contract(task).drop_type == "absolute"


def test_a_resumed_run_ends_bit_identical_with_the_contract(digits, tmp_path):
    model = _digits_model(digits)

    class Stop(Exception):
        pass

    def stop_after_round_2(state):
        if state.round == 1:
            raise Stop

    whole = pwfn.compress(model, digits.train, digits.val, config=FAST)
    with pytest.raises(Stop):
        pwfn.compress(model, digits.train, digits.val, config=FAST, run_dir=tmp_path / "r",
                      callbacks=[stop_after_round_2])
    resumed = pwfn.compress(model, digits.train, digits.val, config=FAST, run_dir=tmp_path / "r")
    a, b = whole.point_model.state_dict(), resumed.point_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.report["contract"]["reference"] == whole.report["contract"]["reference"]
    assert [r["contract"]["setting"] for r in resumed.history] == [r["contract"]["setting"] for r in whole.history]


def test_the_paired_drop_and_its_jackknife_error_against_a_known_answer():
    """40 units of 25 examples, all right for the float model; the fixed model gets one wrong in 10 units: a
    drop of 1 point whose standard error is the sample spread of the units' drops over sqrt(40)."""
    from pwfn.training.contract import paired_drop

    task = resolve_task("classification")
    ref = [{"count": 25.0, "correct": 25.0, "loss": 0.0} for _ in range(40)]
    now = [{"count": 25.0, "correct": 24.0 if j < 10 else 25.0, "loss": 0.0} for j in range(40)]
    c = AccuracyContract("top1", 0.5, "absolute", True)
    value, drop, se = paired_drop(c, task, ref, now)
    per_unit = torch.tensor([4.0] * 10 + [0.0] * 30)
    assert value == pytest.approx(99.0) and drop == pytest.approx(1.0)
    assert se == pytest.approx(float(per_unit.std(unbiased=True) / math.sqrt(40)), rel=1e-9)
    assert paired_drop(c, task, ref, ref)[1:] == (0.0, 0.0)  # the float model against itself
    assert paired_drop(c, task, ref[:1], now[:1])[2] == 0.0  # one unit: no spread to estimate


def test_compare_keeps_the_method_that_held_and_fails_for_the_one_that_did_not(tmp_path, capsys):
    """PWFN made unable to keep the contract (k huge and fixed, no splits, no finer codebook, no training):
    WFN's results are still compared and written, and the command fails naming PWFN."""
    import json

    rc = cli_main(["compare", "--out", str(tmp_path), "--set", "progress=false", "--set", "baseline.epochs=30",
                   "--set", "data.train_subset=500", "--set", "pwfn.fractions=[0.5, 1.0]",
                   "--set", "wfn.fractions=[0.5, 1.0]", "--set", "pwfn.k=64", "--set", "pwfn.k_min=64",
                   "--set", "pwfn.engine.zero_fix=false", "--set", "pwfn.round_epochs=0",
                   "--set", "pwfn.first_round_epochs=0", "--set", "contract.max_drop=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "could not be kept by pwfn" in err
    out = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert "failed" in out["methods"]["pwfn"] and out["methods"]["wfn"]["contract"]["held"] is True
    table = (tmp_path / "run" / "compare.md").read_text()
    assert "NOT KEPT (failed)" in table and "held (drop" in table


def test_round_lines_and_the_report_say_what_the_contract_did():
    from pwfn.run.report import contract_line
    from pwfn.run.runlog import round_line

    row = {"round": 2, "fixed_fraction": 0.6, "unique": 9, "entropy": 2.5, "after_fix": {"top1": 97.0},
           "contract": {"drop": 0.3, "drop_after_training": 0.1, "setting": "k = 1",
                        "undone_after_training": [{"setting": "k = 2"}]}}
    line = round_line("pwfn", row, 10)
    assert "contract drop 0.1 (k = 1)" in line and "1 try undone" in line
    c = {"enforced": True, "text": "top1 at most 0.5 below the float model's", "held": True, "value": 97.1,
         "reference": 97.4, "drop": 0.3, "drop_se": 0.1, "guard": {"source": "1000 validation examples"},
         "test": {"value": 96.0, "reference": 96.8, "drop": 0.8, "within": False}, "rounds_added": 2}
    text = contract_line(c)
    assert "HELD" in text and "1000 validation examples" in text and "BEYOND" in text and "2 rounds added" in text
    assert "off" in contract_line({"enforced": False}) and contract_line(None) == ""


def test_the_kept_rounds_snapshot_survives_a_checkpoint(classifier, tmp_path):
    """A later round may go back to the last kept round (one backtrack): its snapshot travels with the state,
    through a checkpoint (weights_only loading), and restores the same model on a new Fixer."""
    model, x, y = classifier
    cfg = {"pwfn": {"fractions": [0.5, 0.8, 1.0]}}
    fixer = Fixer(model, "pwfn", config=cfg, evaluate=[(x, y)], contract={"max_drop": 50.0})
    opt = fixer.optimizer()
    fixer.fix_next()
    fixer.train()
    opt.zero_grad()
    F.cross_entropy(fixer.model(x), y).backward()
    opt.step()
    assert fixer.settle() and fixer._previous is not None
    from pwfn.common.io import load_checkpoint, save_checkpoint

    path = tmp_path / "state.pt"
    save_checkpoint(path, fixer.state_dict(), kind="fixer")  # as compress's checkpoints: weights_only loading
    other = Fixer(model, "pwfn", config=cfg, evaluate=[(x, y)], contract={"max_drop": 50.0})
    other.load_state_dict(load_checkpoint(path, kind="fixer"))
    assert other._previous["ladder"] == fixer._previous["ladder"]
    assert other._previous["position"] == fixer._previous["position"]
    fixer._restore(fixer._previous["snapshot"])
    other._restore(other._previous["snapshot"])
    a, b = fixer.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not bool(other.view.fixed().any())


def test_the_pace_is_a_plan_and_the_contract_the_promise(classifier):
    """A round whose training leaves it beyond the pace (the share of the allowance planned this far into the
    schedule) is redone more cautiously; at the most cautious setting it is kept when the contract itself holds
    (said in the row), and only a drop beyond the contract fails."""
    model, _, _ = classifier
    metric = {"value": 100.0}
    cfg = {"pwfn": {"fractions": [0.5, 1.0], "k": 1.0, "k_min": 1.0},
           "contract": {"max_splits": 0, "extra_terms": 0, "early_share": 0.5, "undo_training": False}}

    def run(after_training: float):
        metric["value"] = 100.0
        fixer = Fixer(model, "pwfn", config=cfg, evaluate=lambda: metric["value"], contract={"max_drop": 1.0})
        ladder = []
        while True:
            rnd = fixer.fix_next()  # the fixing itself costs nothing here
            ladder.append(rnd.row["contract"]["setting"])
            metric["value"] = 100.0 - after_training  # what the training after it leaves
            if fixer.settle():
                return fixer, ladder
            metric["value"] = 100.0

    fixer, ladder = run(0.3)  # within the pace (0.5 of 1.0 at half fixed): kept at once
    assert ladder == ["k = 1"] and fixer.history[0]["contract"]["paced"] is True
    fixer, ladder = run(0.8)  # beyond the pace, within the contract: redone, then kept at the last setting
    assert ladder == ["k = 1", "k = 1, no zero pass"] and fixer.round == 1
    row = fixer.history[0]["contract"]
    assert row["paced"] is False and row["drop_after_training"] == pytest.approx(0.8)
    with pytest.raises(ContractError, match="beyond the contract"):
        run(1.2)  # beyond the contract at every setting

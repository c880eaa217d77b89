"""Validation where things enter (issue 23): labels of any batch, callback arguments, fixing states.

A bad label in a later batch, a callback argument of the wrong type, or a hand-edited fixing state
must be a clear pwfn error naming what is wrong, never a torch traceback or a run that goes on
with an impossible state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn
from pwfn.errors import CheckpointError, ConfigError, DataError
from pwfn.training.fixer import Fixer
from pwfn.training.tasks import resolve_task
from pwfn.training.train import EpochCounter, evaluate, train_epochs

CFG = {"pwfn": {"fractions": [0.5, 1.0], "round_epochs": 0.2, "first_round_epochs": 0.1, "mc_samples": 1},
       "wfn": {"fractions": [0.5, 1.0], "round_epochs": 0.2}, "progress": False,
       "contract": {"enforce": False}}  # entry checks on untrained models; the contract has its own tests


def _data(n=96, classes=3, bad_at=None, bad_label=57, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if bad_at is not None:
        y[bad_at] = bad_label
    return x, y


def _net(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, classes))


@pytest.mark.parametrize("label", [57, 3, -1])
def test_a_bad_label_in_a_later_training_batch_names_the_batch_range_and_classes(label):
    x, y = _data(bad_at=70, bad_label=label)  # batch 3 of 32 examples; the first batch is fine
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DataError) as err:
        train_epochs(model, loader, opt, 1.0, torch.device("cpu"), counter=EpochCounter(), progress=False,
                     desc="float baseline")
    text = str(err.value)
    assert "batch 3" in text and "float baseline" in text and f"{label}" in text and "3 classes" in text, text
    assert "[0, 2]" in text


def test_a_bad_label_in_a_later_evaluation_batch_and_in_compress():
    x, y = _data(bad_at=80)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(DataError, match=r"evaluation data's batch 3.*\[0, 57\].*3 classes"):
        evaluate(_net(), loader, torch.device("cpu"))
    good = DataLoader(TensorDataset(*_data()), batch_size=32)
    with pytest.raises(DataError, match=r"training data's batch 3 \(wfn round 1/2"):
        pwfn.compress(_net(), loader, good, method="wfn", config=CFG, overrides=["wfn.round_epochs=1"])
    with pytest.raises(DataError, match=r"evaluation data's batch 3"):
        pwfn.compress(_net(), good, loader, method="wfn", config=CFG)


def test_bad_token_ids_and_bce_targets_in_later_batches():
    lm = resolve_task("language_model")
    logits = torch.zeros(2, 5, 11)
    ids = torch.tensor([[1, 2, -100, 4, 10], [0, 1, 2, 3, 4]])
    lm.check_targets(logits, ids, "w")  # -100 is ignored, 10 < 11
    ids[1, 3] = 11
    with pytest.raises(DataError, match=r"token ids range over \[0, 11\].*11 logits per token"):
        lm.check_targets(logits, ids, "w")
    bce = resolve_task("bce")
    with pytest.raises(DataError, match=r"targets in \[0, 1\]"):
        bce.check_targets(torch.zeros(4, 2), torch.tensor([[0.0, 1.0], [0.5, 2.0], [0, 0], [1, 1]]), "w")


def test_labels_are_checked_on_the_cpu_copy_and_on_the_error_path(monkeypatch):
    """Targets still on the CPU are checked before the loss (no device sync); targets a loader already put on the
    device are checked only when the loss fails, and the failure is explained the same way."""
    import pwfn.training.tasks
    import pwfn.training.train

    x, y = _data(n=64, bad_at=40, bad_label=9)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    task = resolve_task("classification")
    seen = []
    real = task.check_targets
    monkeypatch.setattr(task, "check_targets", lambda o, t, w: seen.append(w) or real(o, t, w))
    model = _net()
    with pytest.raises(DataError, match="batch 3"):
        train_epochs(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, torch.device("cpu"),
                     counter=EpochCounter(), progress=False, task=task)
    assert len(seen) == 3  # once per batch, before its loss
    seen.clear()
    monkeypatch.setattr(pwfn.training.train, "host_targets", lambda adapter, batch: None)  # as if on an accelerator already
    monkeypatch.setattr(pwfn.training.tasks, "host_targets", lambda adapter, batch: None)
    with pytest.raises(DataError, match="batch 3") as err:
        train_epochs(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, torch.device("cpu"),
                     counter=EpochCounter(), progress=False, task=task)
    assert isinstance(err.value.__context__, IndexError) and len(seen) == 1  # only on the failing batch
    with pytest.raises(DataError, match="evaluation data's batch 3"):
        evaluate(model, loader, torch.device("cpu"), task=task)


# --------------------------------------------------------------------------------------------
# callback arguments


@pytest.mark.parametrize("kwargs", [{"epochs_per_round": "2"}, {"epochs_per_round": True}, {"epochs_per_round": -1},
                                    {"epochs_per_round": float("nan")}, {"epochs_per_round": float("inf")},
                                    {"warmup_epochs": -1}, {"warmup_epochs": "one"}, {"warmup_epochs": False}])
def test_bad_callback_arguments_are_config_errors(kwargs):
    from pwfn.integrations._schedule import RoundSchedule

    fixer = Fixer(_net(), method="wfn", config=CFG)
    with pytest.raises(ConfigError, match="must be a number >= 0 .epochs; fractions allowed"):
        RoundSchedule(fixer, **kwargs)
    L = pytest.importorskip("lightning.pytorch")
    assert L is not None
    from pwfn.integrations.lightning import FixingCallback

    with pytest.raises(ConfigError):
        FixingCallback(fixer, **kwargs)
    fixer.close()


def test_numbers_of_epochs_and_add_loss_term_must_be_a_bool():
    np = pytest.importorskip("numpy")
    from pwfn.integrations._schedule import RoundSchedule

    fixer = Fixer(_net(), method="wfn", config=CFG)
    assert RoundSchedule(fixer, np.int64(2), np.int32(1)).epochs_needed() == 3
    assert RoundSchedule(fixer, 0.5, 0.25).epochs_needed() == 1  # fractions of epochs: counted in steps
    none = RoundSchedule(fixer)  # the method's own schedule
    assert (none.epochs_per_round, none.warmup_epochs) == (fixer.round_epochs, fixer.warmup_epochs)
    pytest.importorskip("lightning.pytorch")
    from pwfn.integrations.lightning import FixingCallback

    with pytest.raises(ConfigError, match="add_loss_term"):
        FixingCallback(fixer, add_loss_term="yes")
    fixer.close()


# --------------------------------------------------------------------------------------------
# fixing states


def _state_after_one_round(method="wfn"):
    fixer = Fixer(_net(), method=method, config=CFG)
    fixer.fix_next()
    state = fixer.state_dict()
    fixer.close()
    return state


def _edits():
    def set_(key, value):
        def edit(s):
            s[key] = value
        return edit

    def mask_shape(s):
        name = next(iter(s["masks"]))
        s["masks"][name] = s["masks"][name].reshape(-1)

    def mask_dtype(s):
        name = next(iter(s["masks"]))
        s["masks"][name] = s["masks"][name].float()

    def mask_missing(s):
        s["masks"].pop(next(iter(s["masks"])))

    def all_fixed_at_round_0(s):
        s["round"], s["history"] = 0, []

    def nan_weight(s):
        s["model"]["0.weight"] = s["model"]["0.weight"].clone().fill_(float("nan"))

    def none_fixed_when_done(s):
        s["round"] = 2
        s["history"] = s["history"] * 2
        s["masks"] = {k: torch.zeros_like(v) for k, v in s["masks"].items()}

    return [("round 99 of 2", set_("round", 99), "99 rounds"), ("negative round", set_("round", -1), "-1 rounds"),
            ("round as text", set_("round", "1"), "'1' rounds"), ("round as bool", set_("round", True), "True"),
            ("fractions differ", set_("fractions", [0.3, 1.0]), "fractions"),
            ("fractions garbage", set_("fractions", "abc"), "fractions"),
            ("history too long", set_("history", [{}, {}, {}]), "history of 3"),
            ("history not rows", set_("history", ["x"]), "history"),
            ("mask of wrong shape", mask_shape, "shape"), ("mask not bool", mask_dtype, "bool"),
            ("mask missing", mask_missing, "missing"), ("masks not a mapping", set_("masks", [1]), "masks"),
            ("fixed weights at round 0", all_fixed_at_round_0, "disagree"),
            ("done but nothing fixed", none_fixed_when_done, "disagree"),
            ("NaN weight", nan_weight, "NaN"), ("no model", set_("model", None), "no model")]


@pytest.mark.parametrize("label,edit,needle", _edits(), ids=[e[0] for e in _edits()])
def test_an_edited_fixing_state_is_refused_and_changes_nothing(label, edit, needle):
    state = copy.deepcopy(_state_after_one_round())
    edit(state)
    fixer = Fixer(_net(5), method="wfn", config=CFG)
    before = {k: v.clone() for k, v in fixer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=needle):
        fixer.load_state_dict(state)
    assert fixer.round == 0 and not bool(fixer.view.fixed().any())
    assert all(torch.equal(before[k], v) for k, v in fixer.model.state_dict().items())
    fixer.close()


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_a_true_state_still_resumes(method):
    state = _state_after_one_round(method)
    fixer = Fixer(_net(5), method=method, config=CFG)
    fixer.load_state_dict(state)
    assert fixer.round == 1 and bool(fixer.view.fixed().any())
    fixer.fix_next()
    assert fixer.done
    fixer.finalize()


def test_an_edited_trainer_checkpoint_state_is_refused():
    from pwfn.integrations._schedule import RoundSchedule

    fixer = Fixer(_net(), method="wfn", config=CFG)
    schedule = RoundSchedule(fixer)
    schedule.begin(4, 0)  # four optimizer steps an epoch; no warm-up: round 1 now
    state = schedule.state_dict()
    other = RoundSchedule(Fixer(_net(1), method="wfn", config=CFG))
    for bad in ({**state, "epochs": -3}, {**state, "epochs": "2"}, {"epochs": 1}, "junk",
                {**state, "fixer": {**state["fixer"], "round": 99}}):
        with pytest.raises(CheckpointError):
            other.load_state_dict(bad)
    other.load_state_dict(state)
    assert other.fixer.round == 1
    fixer.close()
    other.fixer.close()


def test_an_edited_run_checkpoint_is_refused_on_resume_before_anything_is_written(tmp_path):
    from pwfn.common.io import load_checkpoint, save_checkpoint

    loader = DataLoader(TensorDataset(*_data()), batch_size=32)
    run = tmp_path / "run"
    pwfn.compress(_net(), loader, loader, method="wfn", config=CFG, run_dir=run)
    ckpt = load_checkpoint(run / "checkpoint.pt", kind="run-wfn")
    ckpt["next_round"] = 99
    save_checkpoint(run / "checkpoint.pt", ckpt, kind="run-wfn")  # checksummed again: only the state is wrong
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".pwfn.lock"}
    with pytest.raises(CheckpointError, match="99 rounds are done, but its schedule has 2 rounds"):
        pwfn.compress(_net(), loader, loader, method="wfn", config=CFG, run_dir=run)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".pwfn.lock"}
    assert after == before


class _TwoRanks:
    """This rank of a two-rank run whose other rank holds the same batches, or (``peer_bad``) a bad label."""

    enabled, world_size, rank, is_main = True, 2, 0, True

    def __init__(self, peer_bad: bool) -> None:
        self.peer_bad = peer_bad
        self.keys = None
        self.flags: list[float] = []

    def all_reduce_sum(self, values):
        out = [2 * float(v) for v in values]
        if self.keys is not None:  # an evaluation's sums, over the union of both ranks' keys (sorted)
            if self.peer_bad:
                out[self.keys.index("bad targets")] = float(values[self.keys.index("bad targets")]) + 1.0
            self.keys = None
        elif len(values) == 3:  # the training step's (loss, count, bad-targets flag)
            self.flags.append(float(values[2]))
            out[2] = float(values[2]) + float(self.peer_bad)
        return out

    def all_gather_tensors(self, t):
        peer = torch.tensor(list(b"bad targets"), dtype=torch.uint8) if self.peer_bad else t
        mine = [k for k in bytes(t.tolist()).decode().split(",") if k]
        self.keys = sorted(set(mine) | ({"bad targets"} if self.peer_bad else set()))
        return [t, peer]


@pytest.mark.parametrize("mine_bad", [True, False])
def test_under_ddp_every_rank_stops_at_a_bad_label_together(mine_bad):
    """A rank that finds a bad label does not raise alone (the others would wait for ever in the next
    all-reduce): the flag rides on the step's all-reduce and every rank raises."""
    loader = DataLoader(TensorDataset(*_data(bad_at=70 if mine_bad else None)), batch_size=32)
    model = _net()
    dist = _TwoRanks(peer_bad=not mine_bad)
    needle = "labels range over" if mine_bad else "another rank's share"
    with pytest.raises(DataError, match=needle):
        train_epochs(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, torch.device("cpu"),
                     counter=EpochCounter(), progress=False, dist=dist)
    # the bad batch's all-reduce carried the flag (batch 3 here, the other rank's at once): nobody is left waiting
    assert dist.flags == ([0.0, 0.0, 1.0] if mine_bad else [0.0])
    with pytest.raises(DataError, match="labels range over" if mine_bad else "another rank's evaluation data"):
        evaluate(model, loader, torch.device("cpu"), dist)

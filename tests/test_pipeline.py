"""End to end on tiny data: both methods through all rounds, invariants, resume, bad input."""

import json
from pathlib import Path

import pytest
import torch

from pwfn.cli import main as cli_main
from pwfn.core.metrics import fixing_metrics
from pwfn.data import make_loaders
from pwfn.errors import ConfigError, DataError, ModelError
from pwfn.model.config import load_config
from pwfn.model.plumbing import QuantView
from pwfn.model.zoo import create_model
from pwfn.run.experiment import run_method
from pwfn.run.pipeline import compress, load_point_model

TINY = [
    "progress=false",
    "baseline.epochs=3",
    "pwfn.round_epochs=0.5",
    "pwfn.first_round_epochs=0.2",
    "pwfn.mc_samples=2",
    "wfn.round_epochs=0.5",
    "data.batch_size=64",
    "model.kwargs={hidden: [16]}",
    "contract.enforce=false",  # mechanics; the contract has its own tests
]


@pytest.fixture(scope="module")
def loaders():
    return make_loaders("digits", batch_size=64, seed=0, train_subset=400)


def _trained_mlp(loaders):
    torch.manual_seed(0)
    model = create_model("mlp", in_features=64, hidden=[16], num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for x, y in loaders.train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


class _Recorder:
    """A round callback: captures the fixed values after every round to check they never move afterwards."""

    def __init__(self):
        self.snapshots = []
        self.rounds = []
        self.view = None

    def __call__(self, state):
        self.view = state.fixer.view
        self.rounds.append(state.round)
        self.snapshots.append((self.view.values().clone(), self.view.fixed().clone()))


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_compress_end_to_end_invariants(method, loaders, tmp_path):
    model = _trained_mlp(loaders)
    cfg = load_config(None, TINY)
    from pwfn.run.pipeline import FixingRun

    rec = _Recorder()
    run = FixingRun(method, cfg, model, loaders.train, loaders.val, loaders.test, device=torch.device("cpu"),
                    run_dir=tmp_path / method, recipe=None, callbacks=[rec])
    result = run.run()
    assert rec.rounds == list(range(len(result.history)))
    final_view = rec.view
    values, fixed = final_view.values(), final_view.fixed()
    assert bool(fixed.all()), "100 % fixed at the end"
    codebook = torch.tensor(result.report["final"]["codebook"])
    assert torch.isin(values, codebook).all(), "every value is in the codebook"
    # every value is a power-of-two sum with at most max_order terms, smallest term 2^-7
    scaled = values.double() * 2**7
    assert torch.equal(scaled, scaled.round())
    # fixed values never move after the round that fixed them (through all later training)
    for snap_values, snap_fixed in rec.snapshots:
        assert torch.equal(values[snap_fixed], snap_values[snap_fixed])
    # fractions reached
    fractions = cfg.pwfn.fractions if method == "pwfn" else cfg.wfn.fractions
    for (_, snap_fixed), frac in zip(rec.snapshots, fractions):
        assert snap_fixed.float().mean() >= frac - 1e-9
    # the point model holds the fixed values tensor by tensor, position by position (every key of
    # its state dict is quantised here): values written into the wrong tensor, or shuffled within
    # one, fail; so does point_model.safetensors, read back from the run folder
    point = result.point_model
    state = point.state_dict()
    fixed_state = {s.name: s.value.detach() for s in final_view.slots}
    saved = _final_state(tmp_path / method)
    assert state.keys() == fixed_state.keys() == saved.keys()
    for k in state:
        assert torch.equal(state[k], fixed_state[k]) and torch.equal(saved[k], state[k]), k
    exported = QuantView(point, result.report["quantised_tensors"]).values()
    cov = result.report["coverage"]
    assert cov["share"] == (1.0 if method == "wfn" else cov["share"]) and not cov["shared"]
    final = result.report["final"]
    assert final["unique"] == int(torch.unique(exported).numel())
    assert final["unique_nonzero"] == int(torch.unique(exported[exported != 0]).numel())
    counts = torch.unique(exported, return_counts=True)[1].double()
    p = counts / counts.sum()
    assert final["entropy"] == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-9)
    assert final["point_model_test"]["top1"] == pytest.approx(final["test"]["top1"])
    # the run folder
    folder = tmp_path / method
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(len(fractions)))
    report = json.loads((folder / "report.json").read_text())
    assert report["final"]["unique"] == final["unique"]
    assert (folder / "point_model.safetensors").exists()
    if method == "pwfn":
        assert 0 <= final["mc"]["ece"] <= 1 and final["mc"]["nll"] > 0
        assert "sigma" in rows[0]
        assert "top5" in final["test"]


def _final_state(run_dir):
    from safetensors.torch import load

    return load((Path(run_dir) / "point_model.safetensors").read_bytes())


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_resume_after_interruption_gives_identical_weights(method, tmp_path):
    base = TINY + [f"out_dir={tmp_path}", "data.train_subset=300"]
    run_method(load_config(None, base + ["name=straight"]), method)

    class Killed(Exception):
        pass

    def kill_at_round_3(state):
        if state.round == 3:
            raise Killed()

    cfg = load_config(None, base + ["name=interrupted"])
    with pytest.raises(Killed):
        run_method(cfg, method, callbacks=[kill_at_round_3])
    folder = tmp_path / "interrupted" / method
    assert not (folder / "report.json").exists()
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 4
    run_method(load_config(None, base + ["name=interrupted"]), method)
    a = _final_state(tmp_path / "straight" / method)
    b = _final_state(folder)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_compare_and_report(tmp_path, capsys):
    args = ["compare", "--out", str(tmp_path), "--no-progress", "--set", "name=cmp", "--set", "data.train_subset=300"]
    for item in TINY:
        args += ["--set", item]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| float |" in out and "| wfn |" in out and "| pwfn |" in out
    assert cli_main(["report", str(tmp_path / "cmp")]) == 0
    assert "method: pwfn" in capsys.readouterr().out
    point = load_point_model(tmp_path / "cmp" / "pwfn")
    assert not any("sigma" in k or "fixed" in k for k in point.state_dict())


def test_cli_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    assert cli_main(["run", "--out", str(tmp_path), "--set", "pwfn.lamda=1"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'lam'" in err
    assert cli_main(["run", "--out", str(tmp_path), "--set", "pwfn.fractions=[0.5, 0.3, 1.0]"]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert cli_main(["run", "--out", str(tmp_path), "--set", "data.name=cifar10",
                     "--set", f"data.root={tmp_path / 'nope'}", "--set", "model.name=resnet20"]) == 2
    assert "cifar" in capsys.readouterr().err.lower()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_data_path_raises_data_error(tmp_path):
    cfg = load_config(None, ["data.name=mnist", f"data.root={tmp_path / 'absent'}", f"out_dir={tmp_path}"])
    with pytest.raises(DataError):
        run_method(cfg, "pwfn")


def test_model_without_quantisable_layer(loaders):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())
    with pytest.raises(ModelError, match="no quantisable tensor.*nothing to fix"):
        compress(model, loaders.train, loaders.val, method="pwfn", config={"progress": False})
    with pytest.raises(ModelError, match="no quantisable"):
        compress(model, loaders.train, loaders.val, method="wfn", config={"progress": False})


def test_unknown_method(loaders):
    with pytest.raises(ConfigError, match="unknown method"):
        compress(torch.nn.Linear(64, 10), loaders.train, loaders.val, method="kmeans")


def test_quant_metrics_of_partly_fixed_view():
    model = torch.nn.Linear(4, 2, bias=False)
    view = QuantView(model, ["weight"])
    view.write(torch.tensor([0.5, 0.5, 0.25, 0.0, 0.3, 0.1, 0.0, 0.75]),
               torch.tensor([True, True, True, True, False, False, True, True]))
    m = fixing_metrics(view.values(), view.fixed(), b=7, signed_terms=False)
    assert m["fixed_fraction"] == 0.75
    assert m["unique"] == 4 and m["unique_nonzero"] == 3
    # fixed values: 0.5 x2, 0.25, 0 x2, 0.75 -> probabilities 2/6, 1/6, 2/6, 1/6
    import math

    assert m["entropy"] == pytest.approx(-2 * (2 / 6) * math.log2(2 / 6) - 2 * (1 / 6) * math.log2(1 / 6))
    assert m["order_shares"] == {"0": pytest.approx(2 / 6), "1": pytest.approx(3 / 6), "2": pytest.approx(1 / 6)}


def test_resume_under_a_changed_config_is_refused(tmp_path):
    base = TINY + [f"out_dir={tmp_path}", "data.train_subset=200", "name=r"]
    run_method(load_config(None, base), "wfn")
    with pytest.raises(ConfigError, match=r"wfn\.delta: 0\.01 -> 0\.02.*resume=False"):
        run_method(load_config(None, base + ["wfn.delta=0.02"]), "wfn")
    with pytest.raises(ConfigError, match=r"baseline\.epochs"):
        run_method(load_config(None, base + ["baseline.epochs=4"]), "wfn")
    with pytest.raises(ConfigError, match=r"precision: 'fp32' -> 'bf16'"):  # bf16 training changes the results
        run_method(load_config(None, base + ["precision=bf16"]), "wfn")
    # resume-neutral keys (progress, device, threads ...) and other methods' sections may change
    run_method(load_config(None, base + ["threads=1", "pwfn.k=3"]), "wfn")


def _tiny_bnn():
    import bayes

    torch.manual_seed(0)
    return bayes.bayesianize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


def test_mc_predictive_leaves_the_global_rng_untouched(loaders):
    from pwfn.training.train import predict_mc

    model = _tiny_bnn()
    before = torch.get_rng_state()
    probs, labels = predict_mc(model, loaders.test, torch.device("cpu"), samples=2, seed=0)
    assert torch.equal(torch.get_rng_state(), before), "training after an MC evaluation must see the same RNG"
    assert probs.shape == (labels.numel(), 10)


def test_mc_predictive_accepts_every_valid_seed(loaders):
    from pwfn.training.train import predict_mc

    model = _tiny_bnn()
    big = load_config(None, ["seed=9223372036854775807"]).seed  # the largest seed the config accepts
    probs, _ = predict_mc(model, loaders.test, torch.device("cpu"), samples=2, seed=big)
    assert torch.isfinite(probs).all()
    # small seeds keep their draws
    a, _ = predict_mc(model, loaders.test, torch.device("cpu"), samples=2, seed=3)
    b, _ = predict_mc(model, loaders.test, torch.device("cpu"), samples=2, seed=3)
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_of_a_checkpoint_loaded_onto_cuda_can_be_restored(tmp_path):
    """Run checkpoints are loaded onto the run's device: the RNG state inside must still restore."""
    from pwfn.common.io import load_checkpoint, save_checkpoint
    from pwfn.training.train import rng_state, set_rng_state

    torch.manual_seed(5)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()}, kind="baseline")
    expected = torch.rand(3)
    state = load_checkpoint(tmp_path / "c.pt", kind="baseline", map_location=torch.device("cuda"))
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_elbo_needs_a_known_training_set_size(loaders):
    batches = list(loaders.train)  # a plain list of batches: no .dataset, so no size to scale the KL by
    with pytest.raises(ConfigError, match="elbo.*training-set size"):
        compress(_trained_mlp(loaders), batches, loaders.val, method="pwfn",
                 config={"progress": False, "pwfn": {"objective": "elbo"}})

"""Model recipes (issue 24): runs made from Python export anywhere; hand-edited recipes are refused clearly.

The classes below live at this module's top level so that ``test_recipes:Name`` is importable,
as a user's ``mypkg.models:Name`` would be.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

import pwfn
from pwfn.errors import ArtefactError, ConfigError, ModelError
from pwfn.export import (
    ExportError,
    export_model,
    export_run,
    load_exported_model,
    load_packed_model,
)
from pwfn.model.recipes import (
    RecipeMismatch,
    build_recipe,
    check_recipe,
    parse_model_spec,
    recipe_of,
    resolve_factory,
    set_recipe,
    validate_recipe,
)


class Net(pwfn.RecipeMixin, nn.Module):
    def __init__(self, width: int = 8, classes: int = 3, act: str = "relu"):
        super().__init__()
        self.fc = nn.Linear(12, width)
        self.out = nn.Linear(width, classes)
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class WithModule(pwfn.RecipeMixin, nn.Module):
    def __init__(self, act: nn.Module, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(12, width)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class Plain(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(12, width)

    def forward(self, x):
        return self.fc(x)


class NoArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(x)


class Normed(nn.Module):
    def __init__(self, kind: str = "weight_norm"):
        super().__init__()
        wrap = {"weight_norm": P.weight_norm, "spectral_norm": P.spectral_norm,
                "hooks": nn.utils.weight_norm}[kind]
        self.fc = wrap(nn.Linear(12, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def make_net(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 3))


def snapped(model: nn.Module) -> nn.Module:
    """Every parameter on multiples of 2^-5 (a fixed network) and eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 32) / 32)
    return model.eval()


# ------------------------------------------------------------------------------- recording


def test_recipe_mixin_records_the_constructor_arguments_and_rebuilds_the_model() -> None:
    m = Net(16, act="tanh")
    rec, source = recipe_of(m)
    assert source == "RecipeMixin"
    assert rec == {"factory": "test_recipes:Net", "kwargs": {"width": 16, "classes": 3, "act": "tanh"}}
    built = build_recipe(rec, m.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(built(x), m.eval()(x))  # the same function, not just the same shapes


def test_arguments_that_are_not_json_are_never_recorded_and_the_reason_says_what_to_do() -> None:
    rec, why = recipe_of(WithModule(nn.Tanh()))
    assert rec is None
    assert "['act']" in why and "not plain JSON" in why and "set_recipe" in why
    rec, why = recipe_of(Plain(7))  # a constructor with arguments nobody recorded
    assert rec is None and "needs arguments" in why
    # an argument-free class records itself; nn.Sequential (modules as arguments) does not
    assert recipe_of(NoArgs())[0] == {"factory": "test_recipes:NoArgs", "kwargs": {}}
    assert recipe_of(make_net())[0] is None


def test_set_recipe_checks_at_once_and_wins() -> None:
    m = make_net(6)
    rec = set_recipe(m, make_net, width=6)
    assert rec == {"factory": "test_recipes:make_net", "kwargs": {"width": 6}}
    assert recipe_of(m) == (rec, "set_recipe")
    with pytest.raises(RecipeMismatch, match=r"0.weight is \[6, 12\] in the weights but \[8, 12\]"):
        set_recipe(make_net(6), make_net)  # the default width builds another model
    with pytest.raises(ModelError, match="not plain JSON"):
        set_recipe(Plain(3), Plain, width=torch.tensor(3))

    def local_factory() -> nn.Module:
        return NoArgs()

    with pytest.raises(ModelError, match="inside a function"):
        set_recipe(NoArgs(), local_factory)
    assert set_recipe(Plain(5), "test_recipes:Plain", width=5)["factory"] == "test_recipes:Plain"


def test_a_class_defined_in_main_is_refused_with_advice() -> None:
    cls = type("Script", (nn.Module,), {"__module__": "__main__"})
    from pwfn.model.recipes import factory_spec

    with pytest.raises(ModelError, match="__main__.*move it into a module"):
        factory_spec(cls)


def test_huggingface_hub_mixin_arguments_are_used() -> None:
    hub = pytest.importorskip("huggingface_hub")

    global HubNet

    class HubNet(nn.Module, hub.PyTorchModelHubMixin):  # type: ignore[no-redef]
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.fc = nn.Linear(12, width)

        def forward(self, x):
            return self.fc(x)

    HubNet.__qualname__ = "HubNet"
    rec, source = recipe_of(HubNet(width=9))
    assert source == "PyTorchModelHubMixin" and rec == {"factory": "test_recipes:HubNet", "kwargs": {"width": 9}}


# ------------------------------------------------------------------------------- building from files


def test_a_file_cannot_make_pwfn_call_an_arbitrary_function() -> None:
    for spec in ("os:system", "builtins:eval"):
        with pytest.raises(ModelError, match="neither a torch.nn.Module class nor a function"):
            build_recipe({"factory": spec, "kwargs": {"command": "true"}})
    with pytest.raises(ModelError, match="class but not a torch.nn.Module"):
        build_recipe({"factory": "subprocess:Popen", "kwargs": {"args": ["true"]}})
    with pytest.raises(ModelError, match="only when you name it too"):
        build_recipe({"factory": "shutil:rmtree", "kwargs": {"path": "/nonexistent"}})
    with pytest.raises(ModelError, match="only when you name it too"):
        build_recipe({"factory": "test_recipes:make_net", "kwargs": {}})
    # named by the caller, a function is called
    assert isinstance(build_recipe({"factory": "test_recipes:make_net", "kwargs": {}}, functions=True), nn.Sequential)


@pytest.mark.parametrize("bad,match", [
    ({"name": "mlp", "kwargs": {"hidden": [-5]}}, "cannot be built: RuntimeError"),
    ({"name": "mlp", "kwargs": {"hidden": [10**9]}}, r"but \[1000000000, 64\] in the recipe's model"),
    ({"name": "mlp", "kwargs": {"hiden": [16]}}, "does not fit the model its recipe"),
    ({"name": "nonexistent"}, "unknown model"),
    ({"factory": "test_recipes:Net", "kwargs": {"width": "wide"}}, "cannot be built"),
    ({"factory": "no.such.module:Net"}, "cannot import"),
    ({"factory": "test_recipes:Nope"}, "has no 'Nope'"),
    ({"factory": "not a spec"}, "not of the form"),
    ({"name": "mlp", "factory": "test_recipes:Net"}, "either a registered model"),
    ({"name": "mlp", "kwargs": {"x": float("nan")}}, "not plain JSON"),
])
def test_hand_edited_recipes_are_refused_clearly_before_anything_is_allocated(bad, match) -> None:
    state = pwfn.create_model("mlp", hidden=[16]).state_dict()
    with pytest.raises(ModelError, match=match):
        check_recipe(bad, state, "edited run")


def test_a_hand_edited_recipe_on_export_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from test_export import fixed_model, write_run

    from pwfn.cli import main
    from pwfn.run.manifest import POINT_MODEL_JSON

    kwargs = {"in_features": 64, "hidden": [16], "num_classes": 10}
    model, q = fixed_model("mlp", **kwargs)
    run = write_run(tmp_path / "r" / "pwfn", model, {"name": "mlp", "kwargs": kwargs}, q)
    desc = json.loads((run / POINT_MODEL_JSON).read_text())
    for hidden, expect in (([-5], "negative dimension"), ([10**9], "1000000000")):
        desc["recipe"]["kwargs"]["hidden"] = hidden
        (run / POINT_MODEL_JSON).write_text(json.dumps(desc))
        assert main(["export", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pwfn: error:") and "Traceback" not in err and expect in err
        assert "was the recipe edited?" in err and "--model" in err
        assert not (run / "export").exists()
    # the model given on the command line takes over
    assert main(["export", str(run), "--model", "mlp", "--model-kwargs", json.dumps(kwargs)]) == 0
    capsys.readouterr()
    assert load_packed_model(run / "export" / "model.pwfn")(torch.randn(2, 64)).shape == (2, 10)


def test_model_spec_parsing() -> None:
    assert parse_model_spec("mypkg.models:Net") == {"factory": "mypkg.models:Net", "kwargs": {}}
    assert parse_model_spec("resnet20", '{"num_classes": 100}') == {"name": "resnet20", "kwargs": {"num_classes": 100}}
    recorded = {"factory": "mypkg.models:Net", "kwargs": {"width": 3}}
    assert parse_model_spec("mypkg.models:Net", None, recorded) == recorded  # the run's arguments
    assert parse_model_spec("mypkg.models:Other", None, recorded)["kwargs"] == {}
    for bad in ('[1]', '{bad'):
        with pytest.raises(ConfigError, match="--model-kwargs"):
            parse_model_spec("x:Y", bad)
    with pytest.raises(ConfigError, match="not of the form"):
        parse_model_spec("x:Y:Z")
    assert validate_recipe(None, "r") is None


# ------------------------------------------------------------------------------- loading back


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "hooks"])
def test_an_export_reloads_into_a_fresh_weight_or_spectral_normed_model(kind: str, tmp_path: Path, caplog) -> None:
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm's deprecation
    torch.manual_seed(0)
    model = Normed(kind).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        ref = model(x)
    # what a fixing run exports: the effective weight as a plain tensor
    from torch.nn.utils import parametrize

    plain = Normed(kind)
    if kind == "hooks":
        nn.utils.remove_weight_norm(plain.fc)
    else:
        parametrize.remove_parametrizations(plain.fc, "weight", leave_parametrized=True)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("out.")}, strict=False)
    with torch.no_grad():
        plain.fc.weight.copy_(model.fc.weight)
        plain.fc.bias.copy_(model.fc.bias)
    export_model(plain, [], tmp_path / "e", {"factory": "test_recipes:Normed", "kwargs": {"kind": kind}})
    with caplog.at_level(logging.INFO, logger="pwfn"):
        got = load_exported_model(tmp_path / "e", model=Normed(kind))  # a fresh instance of the user's class
    assert "folded the weight_norm/spectral_norm" in caplog.text
    with torch.no_grad():
        assert torch.allclose(got(x), ref, atol=1e-6)
    got = load_packed_model(tmp_path / "e" / "model.pwfn")  # and from the recipe alone
    with torch.no_grad():
        assert torch.allclose(got(x), ref, atol=1e-6)


def test_a_compiled_model_reloads_both_ways(tmp_path: Path) -> None:
    model = snapped(make_net(5))
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    fresh = torch.compile(make_net(5))  # wrapping only: nothing compiles until a forward
    from pwfn.model.recipes import load_state_folded

    load_state_folded(fresh, model.state_dict(), "plain into compiled")
    assert torch.equal(fresh._orig_mod[0].weight, model[0].weight)
    plain = make_net(5)
    load_state_folded(plain, compiled_keys, "compiled into plain")
    assert torch.equal(plain[2].bias, model[2].bias)
    with pytest.raises(ModelError, match="Linear|weights hold|recipe's model"):
        load_state_folded(make_net(7), model.state_dict(), "other")


def test_loading_into_a_model_that_does_not_fit_gives_advice(tmp_path: Path) -> None:
    model = snapped(make_net(5))
    export_model(model, [n for n, _ in model.named_parameters()], tmp_path / "e")
    with pytest.raises(ArtefactError, match=r"0.weight is \[5, 12\] in the weights but \[7, 12\]"):
        load_packed_model(tmp_path / "e" / "model.pwfn", model=make_net(7))
    # the file records no recipe (a Sequential); naming the function loads it
    with pytest.raises(ModelError, match="holds no model recipe"):
        load_packed_model(tmp_path / "e" / "model.pwfn")
    with pytest.raises(ArtefactError, match="does not fit"):
        load_packed_model(tmp_path / "e" / "model.pwfn", model="test_recipes:make_net")  # width 8 by default
    got = load_packed_model(tmp_path / "e" / "model.pwfn", model={"factory": "test_recipes:make_net",
                                                                  "kwargs": {"width": 5}})
    assert torch.equal(got[0].weight, model[0].weight)


def test_resolve_factory_names_what_is_wrong() -> None:
    assert resolve_factory("test_recipes:Net") is Net
    with pytest.raises(ModelError, match="only when you name it"):
        resolve_factory("test_recipes:make_net", functions=False)


# ------------------------------------------------------------------------------- Python-made runs


@pytest.fixture(scope="module")
def python_run(tmp_path_factory) -> Path:
    """A run of a RecipeMixin model made with pwfn.compress (run_dir), as in the how-to."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    tr = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=64)
    va = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)
    torch.manual_seed(0)
    model = Net(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for xb, yb in tr:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    run = tmp_path_factory.mktemp("py") / "run"
    pwfn.compress(model, tr, va, method="wfn", run_dir=run,
                  config={"progress": False, "wfn": {"round_epochs": 0.2, "fractions": [0.5, 1.0]}})
    return run


def test_a_python_run_records_its_recipe_and_exports_to_onnx_from_the_cli(python_run: Path, tmp_path: Path,
                                                                         capsys) -> None:
    pytest.importorskip("onnxruntime")
    from pwfn.cli import main
    from pwfn.run.manifest import load_manifest

    m = load_manifest(python_run)
    assert m["recipe"] == {"factory": "test_recipes:Net", "kwargs": {"width": 8, "classes": 3, "act": "relu"}}
    assert m["inputs"]["example"] == {"shape": [12], "dtype": "float32"}
    out = tmp_path / "exp"
    assert main(["export", str(python_run), "--out", str(out), "--to", "onnx"]) == 0
    text = capsys.readouterr().out
    assert "| onnx | model.onnx |" in text
    described = json.loads((out / "model.json").read_text())
    assert set(described["files"]) == {"model.safetensors", "model.pwfn", "model.onnx", "targets.json", "size.json"}
    assert load_packed_model(out / "model.pwfn").fc.weight.shape == (8, 12)


def test_a_failing_target_writes_nothing(python_run: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from pwfn.export import targets as T

    def broken(*a, **k):
        raise T.TargetError("simulated toolchain failure")

    monkeypatch.setattr(T, "run_target", broken)
    out = tmp_path / "exp"
    with pytest.raises(ExportError, match="simulated toolchain failure.*Nothing was written"):
        export_run(python_run, out, targets=["onnx"])
    assert not out.exists()
    assert not list(tmp_path.glob(".exp.*"))

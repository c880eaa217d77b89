"""The module paths of 0.1 (pwfn.fixer, pwfn.models, ...) after the layer folders: the same module
objects, one DeprecationWarning naming the new path, and what 0.1 wrote (pickles, whole-model
torch.save files, "module:qualname" factories in run folders, model fingerprints) still loads."""

from __future__ import annotations

import hashlib
import importlib
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_export import assert_same_model, fixed_model, write_run

import pwfn
from pwfn.common.moved import MOVED, new_name, old_name
from pwfn.export import export_model, export_run, load_exported_model
from pwfn.model.config import RunConfig
from pwfn.model.zoo import LeNet5
from pwfn.run.fingerprints import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
#: modules that did not exist in 0.1 (the alias table, and the parts split off from long modules)
NEW_IN_0_2 = {"pwfn.common.moved", "pwfn.run.fingerprints"}  # and pwfn.export.codec, outside the folders
#: (module, the module a part of it went to, public names of that part)
SPLIT = [("pwfn.run.manifest", "pwfn.run.fingerprints", ["InputsChangedError", "changed_inputs", "data_fingerprint",
          "file_fingerprint", "loader_fingerprint", "model_fingerprint", "refuse_changed_inputs", "splits_fingerprint"])]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def _fresh_import(old: str):
    """Import ``old`` as a first import would (dropping it from sys.modules), recording warnings."""
    sys.modules.pop(old, None)
    parent, _, leaf = old.rpartition(".")
    vars(sys.modules[parent]).pop(leaf, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_itself_with_one_warning_naming_it(old):
    new = MOVED[old]
    target = importlib.import_module(new)
    module, caught = _fresh_import(old)
    assert module is target and sys.modules[old] is target
    assert getattr(pwfn, old.rpartition(".")[2]) is target  # pwfn.fixer, as an attribute too
    assert module.__name__ == new and module.__spec__.name == new  # the module keeps its own identity
    assert len(caught) == 1 and new in str(caught[0].message) and old in str(caught[0].message)
    assert caught[0].filename == __file__  # blamed on the importing line, not on the import machinery


def test_the_table_names_every_moved_module_and_no_file_shadows_an_old_path():
    for old, new in MOVED.items():
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old
        assert (ROOT / (new.replace(".", "/") + ".py")).is_file(), new
        assert new_name(old) == new and old_name(new) == old
    assert new_name("pwfn.errors") == "pwfn.errors" == old_name("pwfn.errors")
    # every module in a layer folder came from the flat package (so has an old path), or is new there
    folders = ("common", "core", "model", "training", "run", "tools")
    files = {f"pwfn.{p.parent.name}.{p.stem}" for f in folders for p in (ROOT / "pwfn" / f).glob("*.py")
             if p.stem != "__init__"}
    assert files - set(MOVED.values()) == NEW_IN_0_2


def test_old_imports_warn_once_per_process_and_name_the_same_objects():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pwfn.fixer\n"
        "    import pwfn.fixer\n"
        "    from pwfn.fixer import Fixer\n"
        "    from pwfn.models import create_model, LeNet5\n"
        "import pwfn, pwfn.training.fixer, pwfn.model.zoo\n"
        "assert pwfn.fixer is pwfn.training.fixer and Fixer is pwfn.training.fixer.Fixer is pwfn.Fixer\n"
        "assert LeNet5 is pwfn.model.zoo.LeNet5 and pwfn.create_model is create_model\n"
        "print([str(x.message) for x in w if issubclass(x.category, DeprecationWarning)])\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    messages = eval(proc.stdout.strip().splitlines()[-1])
    assert len(messages) == 2, messages
    assert "pwfn.fixer moved to pwfn.training.fixer" in messages[0]
    assert "pwfn.models moved to pwfn.model.zoo" in messages[1]


def test_the_public_names_resolve_without_an_old_path_warning():
    proc = _python(
        "import warnings\nwarnings.simplefilter('error', DeprecationWarning)\nimport pwfn\n"
        "missing = [n for n in pwfn.__all__ if getattr(pwfn, n) is None]\nassert not missing, missing\n"
        "from pwfn.errors import ContractError, PwfnError\nassert pwfn.ContractError is ContractError\n"
        "import pwfn.cli\nassert callable(pwfn.cli.main)\n")
    assert proc.returncode == 0, proc.stderr


def test_what_0_1_pickled_and_torch_saved_loads_under_the_new_layout(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LeNet5()
    cfg = RunConfig()
    # as 0.1 wrote them: the classes named by their old module paths
    monkeypatch.setattr(LeNet5, "__module__", "pwfn.models")
    monkeypatch.setattr(RunConfig, "__module__", "pwfn.config")
    torch.save(model, tmp_path / "whole_model.pt")
    (tmp_path / "config.pkl").write_bytes(pickle.dumps(cfg))
    monkeypatch.undo()
    assert b"pwfn.config" in (tmp_path / "config.pkl").read_bytes()
    code = (
        "import pickle, sys, warnings, torch\n"
        "from pathlib import Path\n"
        "d = Path(sys.argv[1])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = torch.load(d / 'whole_model.pt', weights_only=False)\n"
        "    c = pickle.loads((d / 'config.pkl').read_bytes())\n"
        "import pwfn.model.zoo, pwfn.model.config\n"
        "assert type(m) is pwfn.model.zoo.LeNet5 and type(c) is pwfn.model.config.RunConfig\n"
        "assert c == pwfn.model.config.RunConfig()\n"
        "print(sorted(str(x.message).split()[0] for x in w if issubclass(x.category, DeprecationWarning)))\n"
        "torch.save(m.state_dict(), d / 'again.pt')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['pwfn.config', 'pwfn.models']"
    again = torch.load(tmp_path / "again.pt")
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    # what is written now names the new paths
    assert b"pwfn.model.config" in pickle.dumps(cfg) and b"pwfn.config\n" not in pickle.dumps(cfg, protocol=2)


def test_a_run_folder_recording_an_old_factory_path_still_exports_and_loads(tmp_path):
    model, q = fixed_model("lenet5")
    old_recipe = {"factory": "pwfn.models:LeNet5", "kwargs": {}}
    run = write_run(tmp_path / "run" / "pwfn", model, old_recipe, q)
    assert "pwfn.models:LeNet5" in (run / "point_model.json").read_text()  # the run folder names the old path
    sys.modules.pop("pwfn.models", None)
    vars(pwfn).pop("models", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_run(run)
        loaded = load_exported_model(run / "export")
    assert any("pwfn.model.zoo" in str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    assert type(loaded) is LeNet5
    assert_same_model(model, loaded, torch.randn(2, 1, 28, 28))
    # a new model's own recipe names the new path
    assert export_model(model, q, tmp_path / "new")["recipe"] == {"factory": "pwfn.model.zoo:LeNet5", "kwargs": {}}


def test_a_model_fingerprint_names_pwfn_classes_by_their_0_1_paths():
    """Run folders made by 0.1 resume: the architecture hash is the one 0.1 computed (written out
    here independently, with the 0.1 module path of the zoo's class)."""
    model = LeNet5()
    arch = hashlib.sha256()
    for name, module in model.named_modules():
        owner = "pwfn.models" if type(module) is LeNet5 else type(module).__module__
        arch.update(f"M|{name}|{owner}.{type(module).__qualname__}\n".encode())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for name in sorted(tensors):
        t = tensors[name]
        arch.update(f"T|{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    assert model_fingerprint(model)["architecture"] == arch.hexdigest()


def test_names_split_off_a_module_are_still_found_at_its_old_path():
    from pwfn.run import fingerprints

    for old, new, names in SPLIT:
        module = importlib.import_module(old)
        for name in names:
            assert getattr(module, name) is getattr(importlib.import_module(new), name), (old, name)
    assert fingerprints.model_fingerprint is importlib.import_module("pwfn.run.manifest").model_fingerprint

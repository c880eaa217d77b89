"""The how-tos run as written: every code block of docs/getting-started.md and docs/howto/*.md.

Each page runs once (per test process) from the top, in its own empty folder, like a reader
working through it: ``python`` blocks in one namespace, ``bash`` blocks line by line. The page
assumes the reader has some things of their own (a trained model, its loaders, their loss
function, a LightningModule ...): :data:`GIVEN` provides tiny ones per section, on scikit-learn's
digits, so the pages run in seconds. A block whose first line names a file (``# mymodels.py``,
``# my_config.yaml``) is written to that file, as the page asks the reader to.

Bash lines: ``pwfn ...`` runs the command line in this process (``pwfn run`` / ``pwfn compare``
with :data:`TINY` settings appended, the one change made to what the page says); ``python
FILE.py`` runs the file. Lines that install packages or build the venv (``pip``, ``make``) and
multi-process launches (``torchrun``) are not run here, each for the reason in :data:`NOT_HERE`.
A block that needs an optional extra that is missing is skipped with the reason: an ImportError
of an extra's module, or pwfn's own refusal naming the extra (its install hint) while that
extra's modules are indeed missing; the lines before it have run. Each block is
its own test (``test_block[page:N]``); registries a page adds to (models, datasets, methods ...)
are restored afterwards, so pages do not change what other tests see.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/getting-started.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "howto").glob("*.md"))]

#: appended to every `pwfn run` / `pwfn compare` of a page: the same commands on a tiny budget
TINY = ["data.train_subset=256", "model.kwargs={hidden: [16]}", "baseline.epochs=2", "pwfn.first_round_epochs=0.1",
        "pwfn.round_epochs=0.25", "wfn.round_epochs=0.25", "pwfn.mc_samples=1", "progress=false", "threads=1"]

#: bash commands not run by this test, and why
NOT_HERE = {
    "make": "make builds its own .venv: CI (.ci/run) runs the README's make commands in a fresh clone",
    "pip": "installs packages: CI installs the extras (make ci) and the lean set (the fresh clone)",
    "torchrun": "a multi-process launch: tests/test_distributed.py runs torchrun (marked slow)",
}


@dataclass
class Block:
    page: str
    index: int
    lang: str
    line: int  # where the block starts in the page
    section: str
    code: str

    @property
    def file_name(self) -> Optional[str]:
        """``mymodels.py`` for a block whose first line is ``# mymodels.py``."""
        m = re.match(r"^#\s*([\w.-]+\.(?:py|ya?ml))\s*$", self.code.splitlines()[0]) if self.code.strip() else None
        return m.group(1) if m else None


def blocks(page: str) -> list[Block]:
    """The fenced ``python``, ``bash`` and ``yaml`` blocks of a page, with the section they are in."""
    out, section, lang, start, body = [], "", None, 0, []
    for n, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if lang is None:
            if line.startswith("#") and not line.startswith("```"):
                section = line.lstrip("#").strip()
            fence = re.match(r"^```(\w+)\s*$", line)
            if fence:
                lang, start, body = fence.group(1), n, []
        elif line.startswith("```"):
            if lang in ("python", "bash", "yaml"):
                out.append(Block(page, len(out), lang, start, section, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    return out


# --------------------------------------------------------------------------------------------
# what a page assumes the reader already has


def _digits() -> dict[str, Any]:
    """A trained float MLP on 256 of scikit-learn's digits and the reader's own torch DataLoaders."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = load_digits(return_X_y=True)
    x_all = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y_all = torch.tensor(labels, dtype=torch.long)

    def loader(lo: int, hi: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(x_all[lo:hi], y_all[lo:hi]), batch_size=64, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    train, val, test = loader(0, 256, shuffle=True), loader(1400, 1597), loader(1597, 1797)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # a trained float model, as the reader's would be
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {"model": model, "train_loader": train, "val_loader": val, "test_loader": test, "x": x_all[:8],
            "train_set": train.dataset}


def _own_loop_helpers() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    def my_loss(*args):
        """The reader's loss: ``my_loss(outputs, targets)``, or the mean loss of ``model`` over ``batches``."""
        if isinstance(args[0], torch.nn.Module):
            model, batches = args
            with torch.no_grad():
                return float(sum(F.cross_entropy(model(x), y) for x, y in batches) / len(batches))
        return F.cross_entropy(*args)

    def my_top1(model, batches) -> float:
        with torch.no_grad():
            right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return 100.0 * right / sum(len(y) for _, y in batches)

    given = _digits()
    given.update(my_loss=my_loss, my_top1=my_top1,
                 my_eval=lambda model: {"top1": my_top1(model, list(given["val_loader"]))})
    return given


def _lightning_module() -> dict[str, Any]:
    L = pytest.importorskip("lightning.pytorch", reason="needs the 'lightning' extra")
    import torch
    import torch.nn.functional as F

    given = _digits()
    net = given["model"]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    given["module"] = Module()
    return given


def _hf_model() -> dict[str, Any]:
    tr = pytest.importorskip("transformers", reason="needs the 'hf' extra")
    pytest.importorskip("accelerate", reason="needs the 'hf' extra")
    import torch

    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2))

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, n: int = 32) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 20, (n, 8), generator=g)
            self.labels = (self.ids[:, 0] >= 10).long()

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    class Eval(Dicts):
        def __init__(self) -> None:
            super().__init__(64)
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, 20, (64, 8), generator=g)
            self.labels = (self.ids[:, 0] >= 10).long()

    return {"model": model, "train_set": Dicts(), "eval_set": Eval()}


def _signals() -> dict[str, Any]:
    """The reader's loaders of 1-D signals (batch, 1, 32), four classes: a sine of 1 to 4 periods plus noise."""
    import math

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    n, length = 448, 32
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.arange(length) / length
    x = torch.sin(2 * math.pi * (y[:, None] + 1) * t)[:, None, :] + 0.3 * torch.randn(n, 1, length, generator=g)
    train = DataLoader(TensorDataset(x[:224], y[:224]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return {"train_loader": train, "val_loader": DataLoader(TensorDataset(x[224:], y[224:]), batch_size=64)}


def _digit_inputs() -> dict[str, Any]:
    """The reader's inputs for the exported digits MLP, as a numpy batch (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:8] / 16.0
    return {"x": images.reshape(-1, 1, 8, 8)}


def _a_comparison() -> dict[str, Any]:
    """runs/digits_mlp, as the getting-started page leaves it (on the tiny budget)."""
    _pwfn(["compare", "digits_mlp"])
    return {}


def _under_torchrun() -> dict[str, Any]:
    """The FSDP2 block starts a process group: it runs under torchrun only."""
    pytest.skip("a block for every rank of a torchrun launch (init_process_group): tests/test_sharding.py runs "
                "the same fixing under gloo with 2 to 4 ranks")


#: (page, section) -> what the reader has there; None for the whole page. Applied before each block.
GIVEN: dict[tuple[str, Optional[str]], Callable[[], dict[str, Any]]] = {
    ("docs/howto/multi-gpu.md", "Models that do not fit one device: FSDP2 (sharded fixing)"): _under_torchrun,
    ("docs/howto/own-model.md", "From Python"): _digits,
    ("docs/howto/own-method.md", None): _digits,
    ("docs/howto/own-loop.md", "A plain loop"): _own_loop_helpers,
    ("docs/howto/own-loop.md", "PyTorch Lightning (extra `lightning`)"): _lightning_module,
    ("docs/howto/own-loop.md", "Hugging Face Trainer (extra `hf`)"): _hf_model,
    ("docs/howto/export.md", None): _a_comparison,
    ("docs/howto/export.md", "Runs made from Python"): _signals,
    ("docs/howto/export.md", "Running the results"): _digit_inputs,
}


# --------------------------------------------------------------------------------------------
# running a page


class Skipped(Exception):
    """A block that needs something this environment lacks (said in the message)."""


def _optional_modules() -> dict[str, str]:
    from pwfn.tools.doctor import OPTIONAL

    return {name: extra for name, extra, _ in OPTIONAL}


def _refused_for_extra(message: str) -> Optional[str]:
    """pwfn's own refusal for a missing extra (every such message names it through
    ``pwfn.common.hints.install_hint``: ``pip install '.[NAME]'``), when that extra's modules are indeed
    not importable here; a refusal while they are is not a reason to skip."""
    import importlib.util

    for extra in re.findall(r"pip install '\.\[(\w+)\]'", message):
        missing = [name for name, e in _optional_modules().items() if e == extra and importlib.util.find_spec(name) is None]
        if missing:
            return f"needs the '{extra}' extra ({', '.join(missing)} not installed)"
    return None


def _missing_extra(exc: BaseException) -> Optional[str]:
    """The extra an ImportError (or the ImportError it was raised from) is about, or that pwfn refused
    the block for (:func:`_refused_for_extra`), if any."""
    from pwfn.errors import PwfnError

    optional = _optional_modules()
    while exc is not None:
        name = getattr(exc, "name", None)
        if isinstance(exc, ImportError) and name and name.split(".")[0] in optional:
            return f"needs the '{optional[name.split('.')[0]]}' extra ({name} is not installed)"
        if isinstance(exc, Skipped):
            return str(exc)
        if isinstance(exc, PwfnError) and _refused_for_extra(str(exc)):
            return _refused_for_extra(str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _pwfn(argv: list[str]) -> str:
    from pwfn.cli import main

    command = f"pwfn {shlex.join(argv)}"  # as the page says it
    if argv and argv[0] in ("run", "compare"):
        argv = argv + [item for pair in (["--set", t] for t in TINY) for item in pair]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    if code != 0:
        reason = _refused_for_extra(out.getvalue())
        if reason is not None:
            raise Skipped(f"`{command}` {reason}")
        raise AssertionError(f"pwfn {shlex.join(argv)} exited {code}:\n{out.getvalue()[-3000:]}")
    return out.getvalue()


def _commands(code: str) -> list[str]:
    """The commands of a bash block: continued lines joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in text.splitlines() if shlex.split(line, comments=True)]


def _bash(block: Block) -> list[str]:
    """Run a bash block line by line; returns the reasons for the lines not run here."""
    skipped = []
    for line in _commands(block.code):
        argv = shlex.split(line, comments=True)
        if argv[0] in NOT_HERE:
            skipped.append(f"`{shlex.join(argv)}`: {NOT_HERE[argv[0]]}")
        elif argv[0] == "pwfn":
            _pwfn(argv[1:])
        elif argv[0] == "python" and len(argv) >= 2 and argv[1].endswith(".py"):
            old_argv = sys.argv
            sys.argv = argv[1:]
            try:
                runpy.run_path(argv[1], run_name="__main__")
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise AssertionError(f"`{line}` exited {exc.code}") from exc
            finally:
                sys.argv = old_argv
        else:
            raise AssertionError(f"the test does not know how to run `{line}`: teach it (tests/test_howtos.py)")
    return skipped


REGISTRIES = [("pwfn.model.zoo", "_REGISTRY"), ("pwfn.data.registry", "DATASETS"), ("pwfn.methods", "_REGISTRY"),
              ("pwfn.training.tasks", "TASKS"), ("pwfn.model.coverage", "_ROLE_OVERRIDES"), ("bayes.layers", "_LOCAL_RULES")]


@contextlib.contextmanager
def _isolated(folder: Path):
    """The page's own folder as working directory (and import path); registries, modules, the working
    directory and the logging set-up as they were afterwards."""
    import importlib
    import logging

    from pwfn.data import make_loaders  # noqa: F401  (the built-in sources register on import)
    from pwfn.methods import get_method, method_names

    for name in method_names():  # the built-in methods register when first asked for
        get_method(name)
    saved = [(d, dict(d)) for d in (getattr(importlib.import_module(m), a) for m, a in REGISTRIES)]
    modules, path, cwd = set(sys.modules), list(sys.path), os.getcwd()
    levels = {name: logging.getLogger(name).level for name in ("pwfn", "bayes")}
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if sys.modules[name] is not None and str(folder) in str(getattr(sys.modules[name], "__file__", "")):
                del sys.modules[name]  # the page's own files (mymodels.py ...)
        for registry, before in saved:
            registry.clear()
            registry.update(before)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_page(page: str, folder: Path) -> list[tuple[str, str]]:
    """Run every block of ``page`` in ``folder``; one ``(outcome, detail)`` per block: ``ok``, ``skipped``
    (the reason) or ``failed`` (the traceback). After a failure the later blocks are not run."""
    results: list[tuple[str, str]] = []
    ns: dict[str, Any] = {"__name__": "__howto__"}
    with _isolated(folder):
        failed = False
        for block in blocks(page):
            if failed:
                results.append(("failed", f"not run: an earlier block of {page} failed"))
                continue
            try:
                for key in ((page, None), (page, block.section)):
                    if key in GIVEN:
                        ns.update(GIVEN[key]())
                if block.file_name:
                    (folder / block.file_name).write_text(block.code)
                    results.append(("ok", f"wrote {block.file_name}"))
                elif block.lang == "python":
                    exec(compile(block.code, f"{page}:{block.line}", "exec"), ns)
                    results.append(("ok", ""))
                elif block.lang == "bash":
                    skipped = _bash(block)
                    ran = len(_commands(block.code))
                    results.append(("skipped", "; ".join(skipped)) if len(skipped) == ran else ("ok", "; ".join(skipped)))
                else:
                    results.append(("ok", "not code"))
            except pytest.skip.Exception as exc:  # a GIVEN that needs an extra
                results.append(("skipped", str(exc.msg)))
            except Exception as exc:  # noqa: BLE001 - reported as the block's failure
                reason = _missing_extra(exc)
                if reason is not None:
                    results.append(("skipped", reason))
                else:
                    results.append(("failed", "".join(traceback.format_exception(exc))[-4000:]))
                    failed = True
    return results


_RESULTS: dict[str, list[tuple[str, str]]] = {}


@pytest.fixture(scope="session")
def page_results(tmp_path_factory):
    def get(page: str) -> list[tuple[str, str]]:
        if page not in _RESULTS:
            folder = tmp_path_factory.mktemp(Path(page).stem)
            _RESULTS[page] = run_page(page, folder)
        return _RESULTS[page]

    return get


def _cases() -> list[Any]:
    return [pytest.param(page, b.index, id=f"{Path(page).stem}:{b.index + 1}@{b.line}") for page in PAGES
            for b in blocks(page)]


@pytest.mark.parametrize("page, index", _cases())
def test_block(page, index, page_results):
    outcome, detail = page_results(page)[index]
    if outcome == "skipped":
        pytest.skip(detail)
    assert outcome == "ok", detail


def test_every_how_to_has_code_that_runs():
    """The pages found and their blocks: a renamed fence (```py) or a page without runnable code shows here."""
    counts = {page: [b.lang for b in blocks(page)] for page in PAGES}
    assert set(PAGES) >= {"docs/getting-started.md", "docs/howto/own-model.md", "docs/howto/own-loop.md",
                          "docs/howto/own-method.md", "docs/howto/export.md", "docs/howto/multi-gpu.md"}
    for page in PAGES:
        assert counts[page], page
        text = (ROOT / page).read_text()
        for fence in re.findall(r"^```(\w*)\s*$", text, re.M):
            assert fence in ("", "python", "bash", "yaml", "text"), (page, fence)


def test_only_a_refusal_for_an_extra_that_is_really_missing_skips(monkeypatch):
    """pwfn's refusal naming an extra skips a block only while that extra's modules are missing: a refusal
    with the extra installed (a bug, or a broken install) fails the block."""
    from pwfn.common.hints import install_hint

    message = f"pwfn: error: target 'onnx' needs the 'onnx' extra (onnxruntime not installed): {install_hint('onnx')}"
    installed = sys.modules["os"]  # a module with a spec: find_spec finds it
    monkeypatch.setitem(sys.modules, "onnx", installed)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not importable
    assert _refused_for_extra(message) == "needs the 'onnx' extra (onnxruntime not installed)"
    monkeypatch.setitem(sys.modules, "onnxruntime", installed)
    assert _refused_for_extra(message) is None
    assert _refused_for_extra("pwfn: error: the model cannot take the batches") is None

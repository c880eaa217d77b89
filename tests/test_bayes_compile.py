"""torch.compile of a Bayesian model: one graph per forward mode, never a recompile for a new draw,
and the same numbers as eager (same seed: the noise comes from torch's generator either way).

Graphs are counted with torch's own counters: dynamo's ``CompileCounterWithBackend`` (frames it
compiled) and ``torch._dynamo.utils.counters`` (unique graphs, graph breaks, recompile-limit hits).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


class _Net(nn.Module):
    """Embedding tied to the output layer, a Conv1d, a Linear read twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = self.fc(h) + torch.tanh(self.fc(h))  # one module called twice: one draw
        return self.out(h).mean(1)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 12, (6,), generator=g)


def _step(model, root, opt, ids, y):
    loss = F.cross_entropy(model(ids), y) + bayes.sigma_regularizer(root, tau=0.05, lam=0.5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _compiled(how, cnt):
    """A Bayesian model compiled as users do: its root a module of theirs, a torch.nn container
    (dynamo then traces the root's hooks inside the forward's graph), or compiled in place."""
    torch.manual_seed(0)
    if how == "sequential":  # several children of different types: one graph, not one per child
        b = bayes.bayesianize(nn.Sequential(_Net(), nn.Tanh(), nn.Linear(12, 12), nn.Linear(12, 12)),
                              sigma_init=0.02)
    else:
        b = bayes.bayesianize(_Net(), sigma_init=0.02)
    if how == "in_place":
        b.compile(backend=cnt)
        return b, b
    return b, torch.compile(b, backend=cnt)


@pytest.mark.parametrize("how", ["user_root", "sequential", "in_place"])
def test_training_and_evaluation_compile_once_per_mode_and_never_again(how):
    cnt = CompileCounterWithBackend("aot_eager")
    b, compiled = _compiled(how, cnt)
    opt = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    ids, y = _data()

    def evaluate(mode):
        with torch.no_grad(), bayes.forward_mode(b, mode):
            return compiled(ids)

    for _ in range(2):  # warm-up: each mode twice (dynamo settles how it runs the root's hooks)
        _step(compiled, b, opt, ids, y)  # sample mode, training
        evaluate("mean")  # mean mode, evaluation
        with bayes.forward_mode(b, "local"):
            _step(compiled, b, opt, ids, y)  # local mode, training
    warm = cnt.frame_count
    # per mode the forward's graph, and the draw's when dynamo runs the root's hooks as frames of their
    # own (a root of the user's class; a torch.nn container's hooks are traced into the forward's graph)
    assert (warm == 3) if how == "sequential" else (3 <= warm <= 6), warm
    eps = None
    for _ in range(10):  # training in sample mode: a new draw every step, no new graph
        _step(compiled, b, opt, ids, y)
        now = bayes.gaussians_of(b.get_submodule("0.fc" if how == "sequential" else "fc"))["weight"].last_eps.clone()
        assert eps is None or not torch.equal(now, eps)
        eps = now
        evaluate("mean")
    with bayes.forward_mode(b, "local"):
        _step(compiled, b, opt, ids, y)
    assert cnt.frame_count == warm, "recompiled after warm-up"
    assert counters["stats"]["unique_graphs"] == warm
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not any("recompile" in k.lower() for k in counters["unimplemented"]), dict(counters["unimplemented"])


def test_compiled_draw_is_the_eps_the_regulariser_sees():
    torch.manual_seed(0)
    layer = bayes.bayesianize(nn.Linear(5, 3), sigma_init=0.3)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(4, 5)
    outs = []
    for _ in range(3):
        out = compiled(x)
        gw, gb = bayes.gaussians_of(layer)["weight"], bayes.gaussians_of(layer)["bias"]
        w = bayes.mu_of(layer, "weight") + gw.sigma * gw.last_eps
        b = bayes.mu_of(layer, "bias") + gb.sigma * gb.last_eps
        torch.testing.assert_close(out, F.linear(x, w, b))
        outs.append(out)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def _parity(backend, steps=4):
    torch.manual_seed(0)
    eager = bayes.bayesianize(_Net(), sigma_init=0.02)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)
    ids, y = _data()
    runs = []
    for model, root in ((eager, eager), (compiled, twin)):
        opt = torch.optim.SGD(root.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(123)  # the same draws in both runs
        losses = [_step(model, root, opt, ids, y) for _ in range(steps)]
        with torch.no_grad(), bayes.forward_mode(root, "mean"):
            runs.append((losses, model(ids), [p.detach().clone() for p in root.parameters()]))
    (l1, m1, p1), (l2, m2, p2) = runs
    torch.testing.assert_close(torch.stack(l2), torch.stack(l1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2, m1, rtol=1e-5, atol=1e-6)
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(p1[0], dict(_Net().named_parameters())["emb.weight"])


def test_compiled_training_gives_eager_numbers():
    _parity("aot_eager")


@pytest.mark.slow
def test_inductor_training_gives_eager_numbers():
    pytest.importorskip("torch._inductor")
    _parity("inductor")  # the noise is drawn eagerly from torch's generator, compiled or not

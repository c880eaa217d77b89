"""Methods as registered objects: the registry, the protocol, and a method defined outside the package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn
from pwfn.core.schedules import wfn_schedule
from pwfn.errors import ConfigError
from pwfn.methods import builtin_method_names, get_method, method_names, register_method
from pwfn.methods.base import Method, build_method, engine_config_from
from pwfn.methods.wfn import WFNMethod
from pwfn.model.config import load_config


def test_builtin_methods_are_listed_without_importing_torch():
    code = ("import sys; from pwfn.methods import method_names; print(','.join(method_names())); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == ["pwfn", "wfn", "wfn_published"]


def test_every_builtin_module_registers_the_method_it_is_named_after():
    for name in builtin_method_names():
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name
        assert cls.__module__ == f"pwfn.methods.{name}"


def test_registry_refuses_bad_names_duplicates_and_unnamed_classes():
    with pytest.raises(ConfigError, match="identifier"):
        register_method("a/b")
    with pytest.raises(ConfigError, match="already registered"):
        register_method("wfn")(type("Other", (WFNMethod,), {}))
    with pytest.raises(ConfigError, match="Did you mean 'pwfn'"):
        get_method("pwnf")
    with pytest.raises(ConfigError, match="no name"):
        build_method(type("Anonymous", (Method,), {}), load_config(None))


def test_the_protocol_describes_each_method_without_its_name():
    cfg = load_config(None)
    p, w, wp = (build_method(n, cfg) for n in ("pwfn", "wfn", "wfn_published"))
    assert (p.bayesian, p.keeps_optimizer, p.needs_task_loss) == (True, True, False)
    assert (w.bayesian, w.keeps_optimizer, w.needs_task_loss) == (False, False, True)
    assert wp.supports_budget is False and w.supports_budget is True
    assert p.config_sections() == ("pwfn", "budget", "batchnorm")
    assert wp.config_sections() == ("wfn_published", "budget", "batchnorm")
    assert "sigma_floor" in " ".join(p.divergence_tips()) and w.divergence_tips() == []
    with pytest.raises(ConfigError, match="budget mode does not work with the wfn_published method"):
        build_method("wfn_published", load_config(None, ["budget.max_values=8"]))


# -- a method written outside the package, in one class --------------------------------------------

@register_method("rtn_test")
class RoundToNearest(Method):
    """A method of its own: every weight may go to the centres within a quarter of its magnitude (WFN's
    first-round tolerance, every round), signed-term centres, plain SGD between rounds, WFN's settings."""

    section = "wfn"

    def engine_config(self):
        return engine_config_from(self.settings.engine, signed_terms=True, sigma_update="keep")

    def tolerance(self, view, round_index):
        return view.values().abs() * 0.25

    @property
    def fractions(self):
        return [0.5, 1.0]

    def optimizer(self, model, view, previous):
        return torch.optim.SGD(model.parameters(), lr=1e-2)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def test_a_method_registered_outside_the_package_runs_through_compress_and_the_fixer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    loader = _data()
    cfg = {"progress": False, "wfn": {"round_epochs": 0.5}}
    seen = []
    res = pwfn.compress(model, loader, loader, method="rtn_test", config=cfg, run_dir=tmp_path / "rtn",
                        callbacks=[lambda state: seen.append((state.method, state.round, state.rounds))])
    assert seen == [("rtn_test", 0, 2), ("rtn_test", 1, 2)]
    assert res.method == "rtn_test" and res.report["method"] == "rtn_test"
    assert (tmp_path / "rtn" / "point_model.safetensors").exists()
    # every quantised weight of the point model is one of the reported codebook's values
    codebook = torch.tensor(res.report["final"]["codebook"])
    for name, t in res.point_model.state_dict().items():
        assert torch.isin(t.reshape(-1), codebook).all(), name
    # the Fixer takes the class itself as well
    fixer = pwfn.Fixer(model, RoundToNearest, config=cfg, evaluate=loader)
    assert fixer.method == "rtn_test" and fixer.contract is not None
    assert [r.index for r in fixer.rounds()][-1] == len(fixer.fractions) - 1 and fixer.report()["contract"]["held"]
    assert "rtn_test" in method_names()


def test_a_subclass_changes_one_step_of_a_builtin_method():
    cfg = load_config(None)
    model = nn.Linear(8, 4)

    class Wide(WFNMethod):
        name = "wide_test"
        section = "wfn"  # reads WFN's settings

        def tolerance(self, view, round_index):
            return 2 * super().tolerance(view, round_index)

    wide, plain = Wide(cfg), WFNMethod(cfg)
    view_w, view_p = wide.view(wide.prepare(model)), plain.view(plain.prepare(model))
    expected = wfn_schedule(cfg.wfn.delta, cfg.wfn.fractions).delta_for_round(0) * view_p.values().abs()
    assert torch.allclose(plain.tolerance(view_p, 0), expected)
    assert torch.equal(wide.tolerance(view_w, 0), 2 * plain.tolerance(view_p, 0))
    with pytest.raises(ConfigError, match="config section 'nowhere'"):
        type("Lost", (WFNMethod,), {"name": "lost", "section": "nowhere"})(cfg)


class _WithOwnBuffers(nn.Module):
    """A user's module whose buffers carry the names an old name-suffix schema would have claimed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.register_buffer("offset_fixed", torch.arange(8, dtype=torch.float32) / 7)
        self.register_buffer("w_mu", torch.full((2,), 0.3))
        self.register_buffer("w_sigma", torch.full((2,), 0.7))

    def forward(self, x):
        return self.fc(x + self.offset_fixed) * self.w_sigma + self.w_mu


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
def test_a_users_buffers_are_never_touched(method, tmp_path):
    from pwfn.export import export_run, load_exported_model

    torch.manual_seed(0)
    model = _WithOwnBuffers()
    before = {k: v.clone() for k, v in model.named_buffers()}
    loader = _data()
    res = pwfn.compress(model, loader, loader, method=method, run_dir=tmp_path / method,
                        config={"progress": False, "pwfn": {"round_epochs": 0.25, "first_round_epochs": 0.0},
                                "wfn": {"round_epochs": 0.25}})
    for point in (res.point_model, model):
        bufs = dict(point.named_buffers())
        assert set(bufs) == set(before)
        for k, v in before.items():
            assert torch.equal(bufs[k], v), k
    export_run(tmp_path / method, tmp_path / f"{method}_export")
    fresh = _WithOwnBuffers()
    for b in fresh.buffers():
        b.zero_()
    loaded = load_exported_model(tmp_path / f"{method}_export", model=fresh)
    for k, v in before.items():
        assert torch.equal(dict(loaded.named_buffers())[k], v), k

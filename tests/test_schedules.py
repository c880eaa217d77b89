"""Schedules: defaults, validation, tolerances and the dict/YAML round trip."""

from __future__ import annotations

import pytest
import torch
import yaml

from pwfn.core.schedules import (
    PWFN_FRACTIONS,
    WFN_FRACTIONS,
    Schedule,
    pwfn_schedule,
    tolerance_for_round,
    wfn_schedule,
)
from pwfn.errors import ConfigError


def test_defaults():
    p = pwfn_schedule()
    assert p.fractions == (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
    assert p.fractions == PWFN_FRACTIONS and not p.relative and len(p) == 10
    w = wfn_schedule(0.01)
    assert w.fractions == (0.3, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.9975, 0.999, 1.0)
    assert w.fractions == WFN_FRACTIONS and w.relative
    assert w.delta_multipliers == tuple(float(10 - t) for t in range(10))
    assert w.delta_for_round(0) == pytest.approx(0.1)
    assert w.delta_for_round(9) == 0.01  # the last round uses delta itself


def test_tolerances():
    sigma = torch.tensor([0.1, 0.2])
    values = torch.tensor([-0.5, 0.25])
    assert torch.equal(tolerance_for_round(pwfn_schedule(), 0, sigma=sigma), sigma)
    assert torch.allclose(tolerance_for_round(pwfn_schedule(k=2.0), 3, sigma=sigma), 2 * sigma)
    tol = tolerance_for_round(wfn_schedule(0.01), 0, values=values)
    assert torch.allclose(tol, torch.tensor([0.05, 0.025]))
    assert tol.dtype == values.dtype
    with pytest.raises(ConfigError):
        tolerance_for_round(pwfn_schedule(), 0, values=values)
    with pytest.raises(ConfigError):
        tolerance_for_round(wfn_schedule(0.01), 0, sigma=sigma)
    with pytest.raises(ConfigError):
        tolerance_for_round(pwfn_schedule(), 10, sigma=sigma)
    with pytest.raises(ConfigError):
        pwfn_schedule().delta_for_round(0)


@pytest.mark.parametrize("fractions", [
    [], [0.5, 0.4, 1.0], [0.5, 0.5, 1.0], [0.0, 1.0], [0.5, 1.2], [0.5, 0.9],
    [-0.1, 1.0], [float("nan"), 1.0], "0.5,1.0", [True, 1.0],
])
def test_invalid_fractions(fractions):
    with pytest.raises(ConfigError):
        Schedule(fractions=fractions)


def test_invalid_delta():
    with pytest.raises(ConfigError):
        Schedule(fractions=[0.5, 1.0], delta=0.0)
    with pytest.raises(ConfigError):
        Schedule(fractions=[0.5, 1.0], delta=0.01, delta_multipliers=[1.0])
    with pytest.raises(ConfigError):
        Schedule(fractions=[0.5, 1.0], delta_multipliers=[2.0, 1.0])
    with pytest.raises(ConfigError):
        Schedule(fractions=[0.5, 1.0], delta=0.01, delta_multipliers=[2.0, -1.0])
    with pytest.raises(ConfigError):
        Schedule(fractions=[0.5, 1.0], k=0)


@pytest.mark.parametrize("sched", [pwfn_schedule(), pwfn_schedule(k=1.5), wfn_schedule(0.0075),
                                   Schedule(fractions=[0.5, 1.0], delta=0.02)])
def test_dict_and_yaml_round_trip(sched):
    d = sched.to_dict()
    assert Schedule.from_dict(d) == sched
    assert Schedule.from_dict(yaml.safe_load(yaml.safe_dump(d))) == sched


def test_from_dict_presets_and_errors():
    assert Schedule.from_dict({"preset": "pwfn"}) == pwfn_schedule()
    assert Schedule.from_dict({"preset": "wfn", "delta": 0.015}) == wfn_schedule(0.015)
    for bad in [{"preset": "wfn"}, {"preset": "pwfn", "delta": 0.1}, {"preset": "x"},
                {"preset": "pwfn", "fractions": [1.0]}, {"fractions": [1.0], "typo": 1},
                {}, [0.5, 1.0]]:
        with pytest.raises(ConfigError):
            Schedule.from_dict(bad)

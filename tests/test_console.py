"""Python users see progress: progress bars on a terminal only, and pwfn's log lines with one call
(pwfn.enable_logging)."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
from torch import nn

import pwfn
from pwfn.common.console import progress_bar

# the mechanics of logging, not the contract (random labels: no contract to keep)
CONFIG = {"wfn": {"fractions": [0.5, 1.0], "round_epochs": 0.5}, "contract": {"enforce": False}}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _compress(config=CONFIG):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    return pwfn.compress(model, data, data, method="wfn", config=config)


@pytest.fixture
def logging_off():
    yield
    pwfn.enable_logging(None)


def test_enable_logging_shows_one_line_per_round_and_can_be_turned_off(logging_off):
    stream = io.StringIO()
    handler = pwfn.enable_logging(stream=stream)
    assert handler is not None and logging.getLogger("pwfn").propagate is False
    _compress({**CONFIG, "progress": False})
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("INFO pwfn.run.pipeline: wfn round")]
    assert len(lines) == 2 and "wfn round 2/2: 100.0% fixed" in lines[1]
    assert "INFO pwfn.model.coverage: wfn: quantising 83 of 83 parameters" in stream.getvalue()
    pwfn.enable_logging(logging.WARNING, stream=stream)  # a second call replaces the first handler
    assert len([h for h in logging.getLogger("pwfn").handlers if h is handler]) == 0
    before = stream.getvalue()
    _compress({**CONFIG, "progress": False})
    assert stream.getvalue() == before  # INFO lines are below WARNING
    pwfn.enable_logging(None)
    assert logging.getLogger("pwfn").propagate is True and logging.getLogger("pwfn").handlers == []


def test_log_lines_are_written_around_an_open_progress_bar(logging_off, monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    pwfn.enable_logging()
    bar = progress_bar(10, "work")
    bar.update(3)
    logging.getLogger("pwfn.test").info("a line")
    bar.close()
    text = screen.getvalue()
    assert "INFO pwfn.test: a line\n" in text and "work" in text


@pytest.mark.parametrize("terminal, progress, shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_progress_bars_show_on_a_terminal_unless_turned_off(monkeypatch, terminal, progress, shown):
    screen = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    _compress({**CONFIG, "progress": progress})
    text = screen.getvalue()
    assert ("wfn rounds" in text) == shown, text[-500:]
    assert ("wfn round 1/2" in text) == shown  # the training between rounds has its own bar

# Set-up and entry points. `make demo` and `make test` are the README's two commands.
# The venv gets torch first: a local CPU wheel when the machine offers one through pip's
# find-links (no CUDA downloads), an ordinary `pip install torch` everywhere else. Once a torch
# is present, the project's `torch>=2.1` requirement is already satisfied and nothing more is pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pwfn-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --no-index torch 2>/dev/null || $(PIP) install -q torch
	$(PIP) install -q -e '.[dev,data]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pwfn compare configs/digits_mlp.yaml

test: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check pwfn bayes tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info

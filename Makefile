# Set-up and entry points. `make demo` and `make test` are the README's two commands.
# `make test` is the fast part of the suite (-m "not slow"); `make test-slow` the subprocess-heavy
# rest (-m slow: kill/Ctrl-C/SIGTERM, torchrun, benchmark dry runs); the two together are every test.
#
# The venv gets torch first, and says which one it chose:
#   - torch already in the venv: kept;
#   - a local CPU torch wheel among pip's find-links (see .ci/torch_wheel.py): installed by
#     path, its dependencies from the package index, so no CUDA torch, nvidia-* or triton;
#   - otherwise an ordinary `pip install torch` (on Linux that is the CUDA build; for a
#     CPU-only machine set TORCH_SPEC or PIP_EXTRA_INDEX_URL first, see docs/getting-started.md).
# Every step runs with its output visible; a failing step stops make with its error.
# Once torch is present, the project's `torch>=2.1` requirement is satisfied and nothing more is pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The extras of `make setup` (and so of `make demo` / `make test`): lean, so the venv stays under
# 1.5 GB with a CPU torch (1.42 GB measured). CI (.ci/run) first runs `make demo` and `make test`
# with these in a fresh clone, then `make ci`, which adds every optional extra that tests exercise,
# so their tests run there instead of being skipped; `make docs` adds the docs extra on demand.
EXTRAS ?= dev,data,plot
CI_EXTRAS := dev,data,plot,docs,tensorboard,onnx,tflm,hls4ml,hf,lightning
TORCH_SPEC ?= torch
comma := ,
# one stamp per set of extras, so `make ci` in a venv made by `make setup` installs what is missing
STAMP := $(VENV)/.pwfn-installed.$(subst $(comma),.,$(EXTRAS))
SHELL := /bin/bash

.PHONY: setup demo test test-slow docs docs-serve lint ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@set -euo pipefail; \
	if $(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then \
		echo "torch: keeping the installed $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		wheel="$$($(PY) .ci/torch_wheel.py)"; \
		if [ -n "$$wheel" ]; then \
			echo "torch: installing the local CPU wheel $$wheel (dependencies from the index)"; \
			$(PIP) install -q "$$wheel"; \
		else \
			echo "torch: installing '$(TORCH_SPEC)' from the package index"; \
			$(PIP) install -q "$(TORCH_SPEC)"; \
		fi; \
	fi
	$(PIP) install -q -e '.[$(EXTRAS)]'
	@$(PY) -c 'import torch; print("torch", torch.__version__, "cuda build" if torch.version.cuda else "cpu build")'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pwfn compare digits_mlp

PYTEST := $(PY) -m pytest -q -n 2

test: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

DOCS_STAMP := $(VENV)/.pwfn-docs-installed.$(subst $(comma),.,$(EXTRAS))

$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q -e '.[$(EXTRAS),docs]'
	touch $(DOCS_STAMP)

# the documentation site, strict: a broken link, a broken reference or an undocumented config
# field fails the build
docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

docs-serve: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs serve

# what CI runs, with every optional extra installed: the fast tests, the slow tests as their own
# step, then the docs site
ci:
	$(MAKE) test EXTRAS=$(CI_EXTRAS)
	$(MAKE) test-slow EXTRAS=$(CI_EXTRAS)
	$(MAKE) docs EXTRAS=$(CI_EXTRAS)

lint: setup
	$(VENV)/bin/ruff check pwfn bayes tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info

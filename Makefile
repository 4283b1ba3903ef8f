# orthopatch: `make demo` converts a small built-in checkpoint; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed first so that the package's range never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/orthopatch demo demo

clean:
	rm -rf demo .pytest_cache

# `make convert MODELS="a b" DIRECTION=refusal_dir.pth OUT=converted -j2`: see docs/batch.md.
include scripts/convert.mk

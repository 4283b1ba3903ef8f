# orthopatch: `make demo` converts a small built-in checkpoint; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch, installed first so that the package's range never picks a build by itself. From the standard
# index this pin is the CUDA build on Linux; for the CPU build there, name PyTorch's CPU index:
#   make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
TORCH_SPEC ?= torch==2.13.0
# One stamp per spec: a changed TORCH_SPEC finds no stamp and installs torch again.
TORCH_STAMP := $(VENV)/.torch-$(firstword $(shell printf '%s' '$(TORCH_SPEC)' | cksum))

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	rm -f $(VENV)/.torch-*
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml $(TORCH_STAMP)
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

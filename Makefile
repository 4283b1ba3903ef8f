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

.PHONY: install test lint demo bench clean llama-cpp-converter

install: $(VENV)/.installed

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	rm -f $(VENV)/.torch-*
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml $(TORCH_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# llama.cpp itself, a client the GGUF tests load their outputs with: llama-cpp-python compiles it from its
# source package (minutes; pip keeps the built wheel in its cache for the next install). A -march=native
# build has crashed on AMX CPUs, so the instruction set is named: AVX2 and FMA, which every x86-64 CPU of
# the last decade runs.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet '$(LLAMA_CPP_SPEC)'
	touch $@

# llama.cpp's converter (convert_hf_to_gguf.py with the `conversion` package and the gguf-py it imports), taken
# from the same source package once, for tests/test_gguf_pipeline.py: safetensors -> F16 GGUF -> Q4_K_M, the way
# a llama.cpp user's files are made. pip's cache makes a second download cheap; the stamp names the version.
LLAMA_CPP_CONVERTER := .cache/llama-cpp/.converter-$(firstword $(shell printf '%s' '$(LLAMA_CPP_SPEC)' | cksum))
$(LLAMA_CPP_CONVERTER): $(VENV)/.installed
	rm -rf .cache/llama-cpp/llama.cpp .cache/llama-cpp/.converter-* .cache/llama-cpp/*.tar.gz
	mkdir -p .cache/llama-cpp
	$(PY) -m pip download --quiet --no-deps --no-binary :all: '$(LLAMA_CPP_SPEC)' -d .cache/llama-cpp
	mkdir -p .cache/llama-cpp/llama.cpp
	tar -xzf .cache/llama-cpp/llama_cpp_python-*.tar.gz -C .cache/llama-cpp/llama.cpp --strip-components=3 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	rm -f .cache/llama-cpp/*.tar.gz
	touch $@

llama-cpp-converter: $(LLAMA_CPP_CONVERTER)

test: install $(VENV)/.llama-cpp $(LLAMA_CPP_CONVERTER)
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/orthopatch demo demo

clean:
	rm -rf demo .pytest_cache

# `make convert MODELS="a b" DIRECTION=refusal_dir.pth OUT=converted -j2`: see docs/batch.md.
include scripts/convert.mk

"""llama.cpp's own quantizer, ``ggml_quantize_chunk``, called through ctypes from the library that the
llama-cpp-python package ships: the reference the GGUF quantizers are compared with, byte for byte.

Tests that need it call :func:`reference_quantize`; without llama-cpp-python installed they are skipped.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

MISSING_REASON = "llama-cpp-python is not installed: no llama.cpp reference quantizer (pip install llama-cpp-python)"

LIBRARY_NAMES = ("libggml-base.so", "libggml.so", "libllama.so")
"""Libraries that may export ``ggml_quantize_chunk``, in the order they are tried."""


def llama_cpp_package() -> Path | None:
    """The installed ``llama_cpp`` package folder, found without importing it, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def library_path() -> Path | None:
    """The shared library of llama-cpp-python that exports ``ggml_quantize_chunk``, or None."""
    package = llama_cpp_package()
    if package is None:
        return None
    for name in LIBRARY_NAMES:
        for candidate in sorted(package.rglob(name)):
            if hasattr(ctypes.CDLL(str(candidate)), "ggml_quantize_chunk"):
                return candidate
    return None


def requires_llama_cpp(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that compares with llama.cpp: skipped, with the reason, where llama-cpp-python is missing."""
    return pytest.mark.skipif(llama_cpp_package() is None, reason=MISSING_REASON)(test)


@functools.cache
def _quantize_chunk() -> Callable[..., int] | None:
    path = library_path()
    if path is None:
        return None
    function = ctypes.CDLL(str(path)).ggml_quantize_chunk
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst,
    #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix)
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    function.restype = ctypes.c_size_t
    return function


def require_llama_cpp() -> Callable[..., int]:
    """``ggml_quantize_chunk``, or a pytest skip that says why it is unavailable."""
    if llama_cpp_package() is None:
        pytest.skip(MISSING_REASON)
    function = _quantize_chunk()
    if function is None:
        pytest.skip("llama-cpp-python is installed but no libggml*.so in it exports ggml_quantize_chunk")
    return function


def reference_quantize(
    values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Bytes ``[rows, row_bytes]`` llama.cpp writes for float32 ``values`` ``[rows, ne0]`` in ``qtype``,
    single-threaded, with the importance matrix ``imatrix`` (``ne0`` weights) or without one."""
    quantize_chunk = require_llama_cpp()
    rows = np.ascontiguousarray(values, dtype=np.float32)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows.shape[0], rows.shape[1] // block_values * block_bytes), np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    weights_pointer = None if weights is None else weights.ctypes.data
    written = quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], weights_pointer
    )
    assert written == out.nbytes, f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}"
    return out

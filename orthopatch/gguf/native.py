"""The GGUF path's C code (quantizers, dequantizers, checked conversions): built once per machine from
the package's own sources, loaded through ctypes.

ggml's quantizers keep each block in registers; numpy has to make whole-array passes for every step
of a scale search, and is slower than llama.cpp's quantizer on most types. The sources in ``csrc/``
hold the same rules as :mod:`orthopatch.gguf.plainquants` and :mod:`orthopatch.gguf.kquants`, written
in C, and write the same bytes (the tests compare both with llama.cpp). They are compiled with the
system's C compiler the first time a process needs them, into a cache folder keyed by the sources,
flags and compiler, so later runs only load the library. Every float operation is an IEEE float32
operation in the order written (``-ffp-contract=off``, no ``-ffast-math``), so the bytes depend on
neither the CPU nor the compiler's vector width. Where no compiler works, or ``ORTHOPATCH_NATIVE=0``
is set, the numpy quantizers run instead: the same bytes, more slowly. A ctypes call releases the
GIL, so row ranges quantized on several threads run in parallel. The same library holds dequantizers
(``csrc/dequants.c``) whose float32 values are gguf-py's ``gguf.quants.dequantize``, bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SOURCE_DIR = Path(__file__).with_name("csrc")

FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-fPIC",
         "-shared", "-fvisibility=hidden")  # fmt: skip
"""Compiler flags. ``-ffp-contract=off`` keeps ``a * b + c`` two roundings, as numpy and ggml's reference
code compute it; no ``-march``, so a library in a shared cache runs on every CPU of the architecture."""

DISABLE_VARIABLE = "ORTHOPATCH_NATIVE"
"""Set to ``0`` to use the numpy quantizers even where the C ones can be built."""

CACHE_VARIABLE = "ORTHOPATCH_CACHE_DIR"
"""Folder for the built library; default ``$XDG_CACHE_HOME/orthopatch`` or ``~/.cache/orthopatch``."""

COMPILERS = ("cc", "gcc", "clang")
"""Compilers tried in order when ``CC`` names none."""

BuiltQuantizer = Callable[[np.ndarray], np.ndarray]
"""Float32 values (whole blocks, C order, 1-D) to their bytes."""

BuiltDequantizer = Callable[[np.ndarray], np.ndarray]
"""Raw bytes (whole blocks, C order) to their float32 values, 1-D."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the C quantizers are wanted (``ORTHOPATCH_NATIVE`` is not ``0``)."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip() not in ("0", "false", "no", "off")


def unavailable_reason() -> str | None:
    """Why the C quantizers are not used in this process, or None when they are."""
    if not enabled():
        return f"{DISABLE_VARIABLE}=0 is set"
    _library()
    return _state.get("reason")  # type: ignore[return-value]


_POINTERS_AND_COUNT = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
"""The C signature ``(const void *in, void *out, int64_t count)`` of most functions of the library."""


def _function(name: str, argtypes: tuple[type, ...] = _POINTERS_AND_COUNT, restype: type | None = None) -> Any:
    """The library's function ``name`` with its C signature, or None where the C code is not available
    or has no such function."""
    if not enabled() or (library := _library()) is None:
        return None
    function = getattr(library, name, None)
    if function is not None:
        function.argtypes, function.restype = list(argtypes), restype
    return function


def _whole_blocks(size: int, unit: int, type_name: str, what: str) -> int:
    """``size // unit``, refusing a ``size`` that is not a whole number of blocks of ``unit`` ``what``."""
    if size % unit:
        raise ValueError(f"{type_name} needs a whole number of {unit}-{what} blocks, not {size} {what}s")
    return size // unit


def native_quantizer(type_name: str, block_values: int, block_bytes: int) -> BuiltQuantizer | None:
    """The C quantizer for GGML type ``type_name`` (blocks of ``block_values`` values in ``block_bytes``
    bytes), or None when there is none or the C quantizers are not available."""
    function = _function(f"orthopatch_quantize_{type_name.lower()}")
    return None if function is None else _blockwise(function, type_name, np.float32, block_values, np.uint8,
                                                    block_bytes, "value")


WeightedQuantizer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Float32 rows ``[rows, row_values]`` (whole blocks) and their importance (``row_values`` float32 weights,
one per column) to the rows' bytes, laid end to end."""


def native_weighted_quantizer(type_name: str, block_values: int, block_bytes: int) -> WeightedQuantizer | None:
    """The C quantizer of GGML type ``type_name`` with an importance matrix (``llama-quantize --imatrix``'s
    weighted quantizer), or None when there is none or the C quantizers are not available."""
    function = _function(f"orthopatch_quantize_{type_name.lower()}_weighted",
                         (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64))
    if function is None:
        return None

    def quantize(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(rows, dtype=np.float32)
        values = values.reshape(-1, values.shape[-1])
        weights = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        n_rows, row_values = values.shape
        if row_values % block_values or weights.size != row_values:
            raise ValueError(f"{type_name} needs rows of whole {block_values}-value blocks and one weight per "
                             f"column, not {row_values} values and {weights.size} weights")
        out = np.empty(n_rows * (row_values // block_values) * block_bytes, np.uint8)
        if out.size:
            function(values.ctypes.data, weights.ctypes.data, out.ctypes.data, n_rows, row_values)
        return out

    return quantize


def native_dequantizer(type_name: str, block_values: int, block_bytes: int) -> BuiltDequantizer | None:
    """The C dequantizer for GGML type ``type_name`` (blocks of ``block_values`` values in ``block_bytes``
    bytes), or None when there is none or the C code is not available. Its values are gguf-py's
    ``gguf.quants.dequantize``, bit for bit (``csrc/dequants.c``), several times faster."""
    function = _function(f"orthopatch_dequantize_{type_name.lower()}")
    return None if function is None else _blockwise(function, type_name, np.uint8, block_bytes, np.float32,
                                                    block_values, "byte")


def _blockwise(function: Any, type_name: str, in_dtype: type, in_per_block: int, out_dtype: type,
               out_per_block: int, unit: str) -> Callable[[np.ndarray], np.ndarray]:
    """``function(in, out, blocks)`` as a numpy call: input flattened to ``in_dtype``, a whole number of blocks
    of ``in_per_block`` items, into a new ``out_dtype`` array of ``out_per_block`` items per block."""

    def convert(data: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(data, dtype=in_dtype).reshape(-1)
        blocks = _whole_blocks(flat.size, in_per_block, type_name, unit)
        out = np.empty(blocks * out_per_block, out_dtype)
        if blocks:
            function(flat.ctypes.data, out.ctypes.data, blocks)
        return out

    return convert


CheckedCopy = Callable[[np.ndarray, np.ndarray], int]
"""``(source, target)``: ``target[...] = source`` (same shape, C order), returning how many values of
``target`` are not finite."""


def native_checked_copy(source: np.dtype, target: np.dtype) -> CheckedCopy | None:
    """The C copy from float32 to float64 (``csrc/convert.c``: widening, exact) or from float64 to float32
    (rounding to nearest even, as numpy's ``astype``) with the finiteness check in the same pass, or None
    when it is not available or there is none for these types."""
    names = {("float32", "float64"): "orthopatch_widen_f32", ("float64", "float32"): "orthopatch_narrow_f64"}
    name = names.get((np.dtype(source).name, np.dtype(target).name))
    function = None if name is None else _function(name, restype=ctypes.c_int64)
    if function is None:
        return None

    def copy(values: np.ndarray, into: np.ndarray) -> int:
        if values.shape != into.shape or not (values.flags.c_contiguous and into.flags.c_contiguous):
            raise ValueError("a checked copy needs two C-ordered arrays of one shape")
        if values.dtype != source or into.dtype != target:
            raise ValueError(f"a checked copy from {source} to {target}, not {values.dtype} to {into.dtype}")
        return int(function(values.ctypes.data, into.ctypes.data, values.size)) if values.size else 0

    return copy


def _library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None (with ``_state["reason"]``) when it cannot be."""
    with _lock:
        if "library" not in _state:
            try:
                _state["library"] = ctypes.CDLL(str(_built_library()))
            except (OSError, subprocess.SubprocessError) as error:
                _state["library"] = None
                _state["reason"] = str(error).splitlines()[0] if str(error) else type(error).__name__
                print(f"orthopatch: the C quantizers are unavailable ({_state['reason']}); "
                      "the numpy ones write the same bytes, more slowly", file=sys.stderr)  # fmt: skip
        return _state["library"]  # type: ignore[return-value]


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` (which may carry flags), else the first of :data:`COMPILERS` found."""
    named = os.environ.get("CC", "").split()
    if named:
        return named
    for name in COMPILERS:
        if shutil.which(name):
            return [name]
    raise OSError("no C compiler found (set CC, or install cc, gcc or clang)")


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def cache_dir() -> Path:
    """Where the built library is kept."""
    named = os.environ.get(CACHE_VARIABLE)
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orthopatch"


def _built_library() -> Path:
    """The library for these sources, flags and compiler: from the cache, or compiled into it now."""
    compiler = _compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=True)
    key = hashlib.sha256()
    for part in (platform.machine(), sys.platform, " ".join(compiler), version.stdout, " ".join(FLAGS)):
        key.update(part.encode() + b"\0")
    for source in _sources():
        key.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    folder = cache_dir()
    target = folder / f"quants-{key.hexdigest()[:20]}.so"
    if target.exists():
        _check_owned(target)
        with contextlib.suppress(OSError):
            os.utime(target)  # in use: not pruned
        return target
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
        built = Path(scratch) / target.name
        compile_library(built)
        os.replace(built, target)  # whole or absent: a concurrent build replaces it with the same bytes
    _prune(folder, target)
    return target


PRUNE_AFTER_DAYS = 30
"""Libraries built from other sources (another orthopatch version, another compiler) that no process has
loaded for this long are deleted when a new one is built, so the cache does not grow without bound."""


def _prune(folder: Path, keep: Path) -> None:
    cutoff = time.time() - PRUNE_AFTER_DAYS * 86400
    for old in folder.glob("quants-*.so"):
        with contextlib.suppress(OSError):
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()


BUILD_VARIANTS = {"default": (), "baseline": ("-DOP_NO_CLONES",), "portable": ("-DOP_NO_CLONES", "-DOP_NO_INTRINSICS")}
"""Ways to build the same sources: the default (an AVX2 copy of the hot loops beside the baseline one on
x86-64, SSE2 intrinsics for lane minima and maxima), the baseline code alone, and plain C vector
extensions alone. All write the same bytes; the tests build each and compare."""


def compile_library(target: Path, variant: str = "default") -> None:
    """Compile the sources into the shared library ``target``, built the ``variant`` way (:data:`BUILD_VARIANTS`)."""
    compiler = _compiler()
    sources = [str(p) for p in _sources() if p.suffix == ".c"]
    result = subprocess.run([*compiler, *FLAGS, *BUILD_VARIANTS[variant], "-o", str(target), *sources, "-lm"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[0]
        raise OSError(f"{compiler[0]} failed: {detail}")


def _check_owned(path: Path) -> None:
    """Refuse a cached library that someone else could have written."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")
    if info.st_mode & 0o022:
        raise OSError(f"{path} is writable by others")

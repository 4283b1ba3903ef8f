"""The C quantizers: the same bytes as the numpy ones on hostile inputs, built once and cached, refused
from a cache others can write, and replaced by the numpy ones, with a one-line note, where no compiler works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from orthopatch.gguf import native
from orthopatch.gguf.quants import IMATRIX_TYPES, PATCHABLE_TYPES, quantize
from tests.llama_ref import reference_quantize, requires_llama_cpp

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[1]

NATIVE_TYPES = sorted(PATCHABLE_TYPES - {Q.F32, Q.F16}, key=lambda qtype: qtype.value)
"""Types with a C quantizer: F32 is a copy, and torch's float16 conversion is faster than a C loop."""

WEIGHTED_TYPES = sorted(IMATRIX_TYPES, key=lambda qtype: qtype.value)
"""Types with a C quantizer that reads an importance matrix."""


def _importance(name: str, columns: int) -> np.ndarray:
    """An importance matrix: heavy-tailed (gamma), uniform, sparse (most columns weigh zero), or signed (a
    hostile legacy file's weights can be negative: both quantizers must still agree)."""
    rng = np.random.default_rng(list(IMPORTANCE).index(name))
    if name == "gamma":
        return rng.gamma(0.5, 1.0, columns).astype(np.float32)
    if name == "ones":
        return np.ones(columns, np.float32)
    if name == "signed":
        return (rng.standard_normal(columns) * 2).astype(np.float32)
    return np.where(rng.random(columns) < 0.7, 0.0, rng.gamma(2.0, 1.0, columns)).astype(np.float32)


IMPORTANCE = ("gamma", "ones", "sparse", "signed")


def _a_compiler() -> str | None:
    return os.environ.get("CC") or next(filter(shutil.which, native.COMPILERS), None)


def test_the_c_quantizers_build_where_a_compiler_exists() -> None:
    if _a_compiler() is None:
        pytest.skip("no C compiler on this machine: the numpy quantizers are the only ones")
    os.environ.pop(native.DISABLE_VARIABLE, None)
    assert native.unavailable_reason() is None
    for qtype in NATIVE_TYPES:
        assert native.native_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) is not None, qtype.name
    for qtype in WEIGHTED_TYPES:
        assert native.native_weighted_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) is not None, qtype.name


def _hostile_rows(seed: int) -> np.ndarray:
    """Rows of 1024 values mixing every kind of block: heavy tails, all zeros with both signs of zero,
    float32 subnormals, constants, exact ties, huge magnitudes, one outlier, fp16-subnormal scales."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_t(2.5, size=(12, 1024)).astype(np.float32)
    rows[1] = 0.0
    rows[1, rng.random(1024) < 0.5] = -0.0
    rows[2] = (rng.standard_normal(1024) * 1e-41).astype(np.float32)
    rows[3] = np.float32(0.75)
    rows[4] = np.round(rng.standard_normal(1024) * 4) / 8
    rows[5] = (rng.standard_normal(1024) * 1e37).astype(np.float32)
    rows[6] = (rng.standard_normal(1024) * 1e-6).astype(np.float32)
    rows[7, rng.integers(0, 1024)] = 3e4
    rows[8] = np.abs(rows[8])
    rows[9] = -np.abs(rows[9])
    rows[10, ::2] = -rows[10, 1::2]  # each magnitude with both signs
    rows[11, rng.random(1024) < 0.9] = 0.0
    return rows


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda qtype: qtype.name)
def test_c_and_numpy_quantizers_write_the_same_bytes(qtype: gguf.GGMLQuantizationType,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if native.unavailable_reason() is not None:
        pytest.skip(f"the C quantizers are unavailable here: {native.unavailable_reason()}")
    values = np.concatenate([_hostile_rows(seed) for seed in range(3)])
    with np.errstate(all="ignore"):
        built = quantize(values, qtype)
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
        reference = quantize(values, qtype)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    differing = np.flatnonzero((built.reshape(-1, block_bytes) != reference.reshape(-1, block_bytes)).any(axis=1))
    assert differing.size == 0, f"{differing.size} blocks differ, the first at block {differing[:1]}"


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda qtype: qtype.name)
def test_weighted_c_and_numpy_quantizers_write_the_same_bytes(qtype: gguf.GGMLQuantizationType, importance: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if native.unavailable_reason() is not None:
        pytest.skip(f"the C quantizers are unavailable here: {native.unavailable_reason()}")
    values = np.concatenate([_hostile_rows(seed) for seed in range(3)])
    imatrix = _importance(importance, values.shape[1])
    with np.errstate(all="ignore"):
        built = quantize(values, qtype, imatrix)
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
        reference = quantize(values, qtype, imatrix)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    differing = np.flatnonzero((built.reshape(-1, block_bytes) != reference.reshape(-1, block_bytes)).any(axis=1))
    assert differing.size == 0, f"{differing.size} blocks differ, the first at block {differing[:1]}"


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


_QUANTIZE_AND_REPORT = """
import numpy as np
from orthopatch.gguf import native, quants
values = np.linspace(-3, 3, 4096, dtype=np.float32).reshape(4, 1024)
print(native.unavailable_reason())
print(quants.quantize(values, quants.Q.Q4_K).tobytes().hex()[:64])
"""


def test_without_a_compiler_the_numpy_quantizers_run_with_a_note(tmp_path: Path) -> None:
    no_compiler = _run(_QUANTIZE_AND_REPORT, CC=str(tmp_path / "no-such-cc"), ORTHOPATCH_CACHE_DIR=str(tmp_path))
    assert no_compiler.returncode == 0, no_compiler.stderr
    reason, packed = no_compiler.stdout.splitlines()
    assert "no-such-cc" in reason
    notes = [line for line in no_compiler.stderr.splitlines() if "C quantizers" in line]
    assert len(notes) == 1 and "same bytes" in notes[0]
    disabled = _run(_QUANTIZE_AND_REPORT, ORTHOPATCH_NATIVE="0", ORTHOPATCH_CACHE_DIR=str(tmp_path))
    assert disabled.stdout.splitlines() == ["ORTHOPATCH_NATIVE=0 is set", packed]
    assert not list(tmp_path.glob("*.so"))


def test_the_library_is_built_once_and_a_cache_others_can_write_is_refused(tmp_path: Path) -> None:
    if _a_compiler() is None:
        pytest.skip("no C compiler on this machine")
    stale, recent = tmp_path / "quants-0000stale.so", tmp_path / "quants-0000recent.so"
    stale.write_bytes(b"built from other sources")
    recent.write_bytes(b"built from other sources, loaded lately")
    month_ago = time.time() - (native.PRUNE_AFTER_DAYS + 1) * 86400
    os.utime(stale, (month_ago, month_ago))
    first = _run(_QUANTIZE_AND_REPORT, ORTHOPATCH_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and first.stdout.splitlines()[0] == "None", first.stderr
    assert not stale.exists() and recent.exists()  # a new build prunes what nothing loaded for a month
    recent.unlink()
    (library,) = tmp_path.glob("quants-*.so")
    built_as = library.stat().st_ino
    again = _run(_QUANTIZE_AND_REPORT, ORTHOPATCH_CACHE_DIR=str(tmp_path))
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert list(tmp_path.glob("quants-*.so")) == [library] and library.stat().st_ino == built_as  # not rebuilt
    library.chmod(0o777)
    refused = _run(_QUANTIZE_AND_REPORT, ORTHOPATCH_CACHE_DIR=str(tmp_path))
    reason, packed = refused.stdout.splitlines()
    assert "writable by others" in reason and packed == first.stdout.splitlines()[1]


def _extreme_rows() -> np.ndarray:
    """Wide heavy-tailed rows, then rows whose sub-blocks range from float32 subnormals to 1e38."""
    rng = np.random.default_rng(11)
    wide = rng.standard_t(3, size=(16, 4096)) * 0.02
    scales = 10.0 ** rng.uniform(-44, 37, size=(8, 4096 // 16, 1))
    extremes = (rng.standard_normal((8, 4096 // 16, 16)) * scales).reshape(8, 4096)
    return np.concatenate([wide, extremes]).astype(np.float32)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_c_quantizers_match_llama_cpp_from_subnormals_to_1e38(qtype: gguf.GGMLQuantizationType) -> None:
    if native.native_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) is None:
        pytest.skip(f"no C quantizer for {qtype.name} here")
    values = _extreme_rows()
    with np.errstate(all="ignore"):
        built = native.native_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype])(values)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    theirs = reference_quantize(values, qtype).reshape(-1, block_bytes)
    differing = np.flatnonzero((built.reshape(-1, block_bytes) != theirs).any(axis=1))
    assert differing.size == 0, f"{differing.size} blocks differ from llama.cpp, the first at block {differing[:1]}"


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_weighted_c_quantizers_match_llama_cpp_from_subnormals_to_1e38(qtype: gguf.GGMLQuantizationType) -> None:
    quantizer = native.native_weighted_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
    if quantizer is None:
        pytest.skip(f"no C quantizer for {qtype.name} with an importance matrix here")
    values = _extreme_rows()
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    for name in IMPORTANCE:
        imatrix = _importance(name, values.shape[1])
        with np.errstate(all="ignore"):
            built = quantizer(values, imatrix)
        theirs = reference_quantize(values, qtype, imatrix).reshape(-1, block_bytes)
        differing = np.flatnonzero((built.reshape(-1, block_bytes) != theirs).any(axis=1))
        assert differing.size == 0, f"{name}: {differing.size} blocks differ from llama.cpp, the first {differing[:1]}"


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda qtype: qtype.name)
def test_c_and_numpy_agree_on_any_number_of_blocks(qtype: gguf.GGMLQuantizationType,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Block counts that leave a partial group of blocks (the C code takes several blocks at a time)."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"the C quantizers are unavailable here: {native.unavailable_reason()}")
    block_values = max(32, gguf.GGML_QUANT_SIZES[qtype][0])
    rng = np.random.default_rng(7)
    for blocks in (1, 2, 3, 7, 9, 17):
        values = rng.standard_t(3, size=(3, blocks * block_values)).astype(np.float32)
        monkeypatch.delenv(native.DISABLE_VARIABLE, raising=False)
        built = quantize(values, qtype)
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
        assert np.array_equal(built, quantize(values, qtype)), blocks


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda qtype: qtype.name)
def test_weighted_c_and_numpy_agree_on_any_number_of_blocks(qtype: gguf.GGMLQuantizationType,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose block count leaves a partial group (the legacy types search eight blocks at a time)."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"the C quantizers are unavailable here: {native.unavailable_reason()}")
    block_values = gguf.GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(9)
    for blocks in (1, 2, 3, 7, 9, 17):
        values = rng.standard_t(3, size=(3, blocks * block_values)).astype(np.float32)
        for name in IMPORTANCE:
            imatrix = _importance(name, values.shape[1])
            monkeypatch.delenv(native.DISABLE_VARIABLE, raising=False)
            built = quantize(values, qtype, imatrix)
            monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
            assert np.array_equal(built, quantize(values, qtype, imatrix)), (blocks, name)


def test_checked_copies_round_as_numpy_and_count_what_is_not_finite() -> None:
    if native.unavailable_reason() is not None:
        pytest.skip(f"the C code is unavailable here: {native.unavailable_reason()}")
    rng = np.random.default_rng(11)
    wide = np.concatenate([
        rng.standard_normal(1000) * 10.0 ** rng.integers(-50, 50, 1000),  # float32 subnormals, zeros, overflows
        [np.inf, -np.inf, np.nan, -0.0, 3.4028235677973366e38, 3.4028235677973367e38, 1e-46, 7e-46, 2.0**-150],
        np.float32(1.0) + np.arange(-5, 5) * 2.0**-24,  # halfway between float32 neighbours: ties to even
    ])
    narrow = native.native_checked_copy(np.float64, np.float32)
    out = np.empty(wide.size, np.float32)
    with np.errstate(over="ignore"):
        expected = wide.astype(np.float32)
    assert narrow(wide, out) == int((~np.isfinite(expected)).sum()) > 3
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    widen = native.native_checked_copy(np.float32, np.float64)
    back = np.empty(out.size, np.float64)
    assert widen(out, back) == int((~np.isfinite(out)).sum())
    assert np.array_equal(back.view(np.uint64), out.astype(np.float64).view(np.uint64))
    with pytest.raises(ValueError, match="one shape"):
        widen(out, back[:-1])
    assert native.native_checked_copy(np.float32, np.float16) is None


def _every_c_output(values: np.ndarray, importance: np.ndarray) -> dict[str, bytes]:
    """What every C function writes for ``values``: each type's bytes, with and without ``importance``
    where the type reads one, those bytes decoded, and the checked copies both ways."""
    from orthopatch.gguf.quants import dequantize

    outputs: dict[str, bytes] = {}
    with np.errstate(all="ignore"):
        for qtype in NATIVE_TYPES:
            packed = quantize(values, qtype)
            outputs[qtype.name] = packed.tobytes()
            outputs[f"{qtype.name} decoded"] = dequantize(packed, qtype, values.shape).tobytes()
            if qtype in IMATRIX_TYPES:
                outputs[f"{qtype.name} weighted"] = quantize(values, qtype, importance).tobytes()
        wide, narrow = np.empty(values.shape, np.float64), np.empty(values.shape, np.float32)
        outputs["widened"] = (native.native_checked_copy(np.float32, np.float64)(values, wide), wide.tobytes())
        outputs["narrowed"] = (native.native_checked_copy(np.float64, np.float32)(wide * 1e30, narrow),
                               narrow.tobytes())  # fmt: skip
    return outputs


@pytest.mark.slow
def test_every_way_of_building_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX2 copies picked on this CPU, the baseline code alone and plain C vector extensions alone
    (``BUILD_VARIANTS``): the bytes must not depend on which one a CPU or compiler ends up running."""
    import ctypes

    if native.unavailable_reason() is not None:
        pytest.skip(f"the C code is unavailable here: {native.unavailable_reason()}")
    values = _hostile_rows(5)
    importance = _importance("gamma", values.shape[1])
    expected = _every_c_output(values, importance)
    for variant in native.BUILD_VARIANTS:
        library = tmp_path / f"{variant}.so"
        native.compile_library(library, variant)
        monkeypatch.setitem(native._state, "library", ctypes.CDLL(str(library)))
        found = _every_c_output(values, importance)
        differing = [name for name in expected if found[name] != expected[name]]
        assert not differing, f"the {variant} build differs in {differing}"

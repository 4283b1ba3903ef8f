"""GGUF requantization: our bytes against llama.cpp's ``ggml_quantize_chunk``, gguf-py round trips, and
the sizes, errors and fixed points that hold without any reference at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from orthopatch.gguf.quants import IMATRIX_TYPES, PATCHABLE_TYPES, dequantize, quantize
from tests.llama_ref import reference_quantize, requires_llama_cpp

Q = gguf.GGMLQuantizationType
TYPES = sorted(PATCHABLE_TYPES, key=lambda qtype: qtype.value)
SHAPE = (16, 1024)
MIN_MATCHING_BLOCKS = 0.999
"""Fraction of blocks whose bytes must equal llama.cpp's (all of them did when this was written)."""

GGUF_PY_QUANTIZERS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
"""Types gguf-py both quantizes and dequantizes."""

RELATIVE_RMS_BOUND = {
    Q.F32: 0.0, Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 8e-3,
    Q.Q4_0: 0.11, Q.Q4_1: 0.10, Q.Q5_0: 0.055, Q.Q5_1: 0.05,
    Q.Q2_K: 0.35, Q.Q3_K: 0.19, Q.Q4_K: 0.09, Q.Q5_K: 0.046, Q.Q6_K: 0.023,
}  # fmt: skip
"""RMS error over RMS value on gaussian data, about 25% above what each type reaches."""

STABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0)
"""Types whose dequantized values quantize back to themselves: the scale is the block's largest
magnitude over a fixed level count, which the dequantized block reproduces exactly. The searched
scales of Q4_1/Q5_1 and the k-quants carry no such guarantee."""


def _gaussian(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(SHAPE)


def _heavy_tailed(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_t(3, SHAPE) * 0.02


def _zero_rows(rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal(SHAPE)
    values[::3] = 0
    values[1, 256:512] = 0
    return values


def _single_outlier(rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal(SHAPE) * 0.01
    values[np.arange(SHAPE[0]), rng.integers(0, SHAPE[1], SHAPE[0])] = 40.0
    return values


def _fp16_subnormal_scale(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(SHAPE) * np.array([1e-7, 3e-6, 3e-5, 1e-4])[np.arange(SHAPE[0]) % 4, None]


def _mixed_sub_block_magnitudes(rng: np.random.Generator) -> np.ndarray:
    magnitudes = 10.0 ** rng.uniform(-4, 0, (SHAPE[0], SHAPE[1] // 16, 1))
    return (rng.standard_normal((SHAPE[0], SHAPE[1] // 16, 16)) * magnitudes).reshape(SHAPE)


def _constant_and_positive(rng: np.random.Generator) -> np.ndarray:
    values = np.abs(rng.standard_normal(SHAPE)) + 1.0
    values[::2] = -0.5
    return values


def _signed_zeros_ties_and_extremes(rng: np.random.Generator) -> np.ndarray:
    """Where a fast path could part from ggml's scans and casts: blocks of -0.0 and mixed zeros, blocks whose
    largest magnitude occurs with both signs, exact halves after scaling (Q8_0 rounds them away from zero),
    fp16 and float32 subnormals, and values past the fp16 range."""
    values = rng.standard_normal(SHAPE)
    values[0] = -0.0
    values[1] = np.where(rng.random(SHAPE[1]) < 0.5, 0.0, -0.0)
    values[1, 512:] = rng.standard_normal(512) * 1e-3
    for row, first in ((2, 1.0), (3, -1.0)):
        values[row] *= 0.1
        at = rng.integers(0, 16, SHAPE[1] // 32) + np.arange(0, SHAPE[1], 32)
        values[row, at] = first * 3.0
        values[row, at + 16] = -first * 3.0
    values[4] = rng.integers(-254, 255, SHAPE[1]) / 2.0
    values[4, ::32] = 127.0
    values[5] = rng.standard_normal(SHAPE[1]) * 1e-6
    values[6] = rng.standard_normal(SHAPE[1]) * 1e-39
    values[7] = rng.standard_normal(SHAPE[1]) * 5e4
    return values


INPUTS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian": _gaussian,
    "heavy_tailed": _heavy_tailed,
    "zero_rows": _zero_rows,
    "single_outlier": _single_outlier,
    "fp16_subnormal_scale": _fp16_subnormal_scale,
    "mixed_sub_block_magnitudes": _mixed_sub_block_magnitudes,
    "constant_and_positive": _constant_and_positive,
    "signed_zeros_ties_and_extremes": _signed_zeros_ties_and_extremes,
}


def make_input(name: str, seed: int = 0) -> np.ndarray:
    """The named test input as float32 ``SHAPE``, the same on every run."""
    return INPUTS[name](np.random.default_rng([seed, list(INPUTS).index(name)])).astype(np.float32)


def matching_block_fraction(ours: np.ndarray, theirs: np.ndarray, qtype: gguf.GGMLQuantizationType) -> float:
    """Fraction of quantization blocks whose bytes are identical."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    return float((ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1).mean())


def squared_error(values: np.ndarray, packed: np.ndarray, qtype: gguf.GGMLQuantizationType) -> float:
    """Total squared error of the values ``packed`` holds, in float64."""
    restored = dequantize(packed, qtype, values.shape).astype(np.float64)
    return float(((restored - values) ** 2).sum())


# ---------------------------------------------------------------- against llama.cpp


@pytest.mark.parametrize("input_name", list(INPUTS))
@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_bytes_match_llama_cpp(qtype: gguf.GGMLQuantizationType, input_name: str, backend: str) -> None:
    values = make_input(input_name)
    theirs = reference_quantize(values, qtype)
    ours = quantize(values, qtype)
    assert ours.shape == theirs.shape
    assert matching_block_fraction(ours, theirs, qtype) >= MIN_MATCHING_BLOCKS
    assert squared_error(values, ours, qtype) <= squared_error(values, theirs, qtype) * (1 + 1e-6)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_k_quants_match_llama_cpp_on_more_seeds(qtype: gguf.GGMLQuantizationType, backend: str) -> None:
    for seed in range(1, 4):
        values = np.concatenate([make_input(name, seed) for name in INPUTS])
        assert matching_block_fraction(quantize(values, qtype), reference_quantize(values, qtype), qtype) == 1.0


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_k_quants_match_llama_cpp_where_squares_overflow(qtype: gguf.GGMLQuantizationType, backend: str) -> None:
    """Values past about 1.8e19 square to inf, so a sub-block's sums, and its scale, can be NaN: ggml's scans
    for the largest scale pass over NaN, and so must ours."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal((8, 1024)) * 1e3).astype(np.float32)
    values[:4, ::97] = rng.choice(np.array([1e38, -1e38, 3e37, -2e20], np.float32), size=values[:4, ::97].shape)
    values[4:6] *= np.float32(1e34)
    values[6:] = (10.0 ** rng.uniform(-30, 30, (2, 64, 1)) * rng.standard_normal((2, 64, 16))).reshape(2, 1024)
    with np.errstate(all="ignore"):
        ours = quantize(values, qtype)
    assert matching_block_fraction(ours, reference_quantize(values, qtype), qtype) == 1.0


@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.Q6_K], ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_signed_scale_k_quants_match_llama_cpp_on_non_finite_values(
    qtype: gguf.GGMLQuantizationType, backend: str
) -> None:
    """An inf or NaN in a sub-block makes its first rounding meet inf and NaN, which nearest_int's bit trick
    turns into levels of its own; the rest of the super-block is quantized as usual."""
    values = np.random.default_rng(3).standard_normal((4, 1024)).astype(np.float32)
    values[0, 5], values[1, 300], values[2, 7] = np.inf, -np.inf, np.nan
    values[3, ::50], values[3, 1::70] = np.inf, -np.nan
    with np.errstate(all="ignore"):
        ours = quantize(values, qtype)
    assert matching_block_fraction(ours, reference_quantize(values, qtype), qtype) == 1.0


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_bytes_match_llama_cpp_across_chunks(qtype: gguf.GGMLQuantizationType, backend: str) -> None:
    """More values than one chunk or piece of any quantizer (and than one torch call), ending mid-chunk."""
    from orthopatch.gguf.plainquants import PIECE_VALUES
    from orthopatch.gguf.quants import CHUNK_SCALE, CHUNK_VALUES

    values = np.concatenate([make_input(name, seed) for seed in range(5) for name in INPUTS])
    assert values.size > max(PIECE_VALUES, CHUNK_VALUES * max(CHUNK_SCALE.values())) and values.size % CHUNK_VALUES
    assert matching_block_fraction(quantize(values, qtype), reference_quantize(values, qtype), qtype) == 1.0


IMATRICES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gamma": lambda rng: rng.gamma(1.0, 1.0, SHAPE[1]),
    "ones": lambda rng: np.ones(SHAPE[1]),
    "sparse": lambda rng: np.where(rng.random(SHAPE[1]) < 0.2, 0.0, rng.gamma(2.0, 1.0, SHAPE[1])),
}
"""Importance matrices, one weight per column: typical, uniform, and with many unimportant columns."""


def make_imatrix(name: str) -> np.ndarray:
    return IMATRICES[name](np.random.default_rng([7, list(IMATRICES).index(name)])).astype(np.float32)


@pytest.mark.parametrize("imatrix_name", list(IMATRICES))
@pytest.mark.parametrize("qtype", sorted(IMATRIX_TYPES, key=lambda qtype: qtype.value), ids=lambda qtype: qtype.name)
@requires_llama_cpp
def test_bytes_with_importance_matrix_match_llama_cpp(qtype: gguf.GGMLQuantizationType, imatrix_name: str,
                                                      backend: str) -> None:
    imatrix = make_imatrix(imatrix_name)
    for input_name in INPUTS:
        values = make_input(input_name)
        theirs = reference_quantize(values, qtype, imatrix)
        ours = quantize(values, qtype, imatrix)
        assert matching_block_fraction(ours, theirs, qtype) >= MIN_MATCHING_BLOCKS, input_name


@pytest.mark.parametrize("qtype", sorted(PATCHABLE_TYPES - IMATRIX_TYPES, key=lambda qtype: qtype.value),
                         ids=lambda qtype: qtype.name)  # fmt: skip
def test_types_without_weighted_quantizer_ignore_the_importance_matrix(qtype: gguf.GGMLQuantizationType) -> None:
    values = make_input("heavy_tailed")
    np.testing.assert_array_equal(quantize(values, qtype, make_imatrix("gamma")), quantize(values, qtype))


def test_importance_matrix_must_cover_each_column() -> None:
    with pytest.raises(ValueError, match="importance matrix has 256 weights for rows of 1024"):
        quantize(make_input("gaussian"), Q.Q4_K, np.ones(256, np.float32))


# ---------------------------------------------------------------- against gguf-py


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZERS, ids=lambda qtype: qtype.name)
def test_round_trip_agrees_with_gguf_py(qtype: gguf.GGMLQuantizationType) -> None:
    values = make_input("heavy_tailed")
    ours = quantize(values, qtype)
    theirs = np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)
    restored = dequantize(ours, qtype, values.shape)
    expected = np.asarray(gguf.quants.dequantize(theirs, qtype), dtype=np.float32).reshape(values.shape)
    np.testing.assert_array_equal(restored, expected)


# ---------------------------------------------------------------- without a reference


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_sizes_and_shapes(qtype: gguf.GGMLQuantizationType) -> None:
    values = make_input("gaussian")[:3, :512]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    packed = quantize(values, qtype)
    assert packed.dtype == np.uint8
    assert packed.shape == (3, 512 // block_values * block_bytes)
    restored = dequantize(packed.ravel(), qtype, values.shape)
    assert restored.dtype == np.float32 and restored.shape == values.shape


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_error_is_bounded(qtype: gguf.GGMLQuantizationType) -> None:
    values = make_input("gaussian").astype(np.float64)
    relative_rms = np.sqrt(squared_error(values, quantize(values, qtype), qtype) / (values**2).sum())
    assert relative_rms <= RELATIVE_RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_zeros_stay_zeros(qtype: gguf.GGMLQuantizationType) -> None:
    values = np.zeros((2, 512), np.float32)
    assert not dequantize(quantize(values, qtype), qtype, values.shape).any()


@pytest.mark.parametrize("input_name", ["gaussian", "heavy_tailed", "fp16_subnormal_scale"])
@pytest.mark.parametrize("qtype", STABLE_TYPES, ids=lambda qtype: qtype.name)
def test_requantizing_dequantized_values_is_stable(qtype: gguf.GGMLQuantizationType, input_name: str) -> None:
    values = make_input(input_name)
    once = dequantize(quantize(values, qtype), qtype, values.shape)
    twice = dequantize(quantize(once, qtype), qtype, values.shape)
    np.testing.assert_array_equal(once, twice)


def test_rejects_unpatchable_type_and_partial_blocks() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quantize(np.zeros((1, 256), np.float32), Q.IQ2_XXS)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((1, 128), np.float32), Q.Q4_K)


def test_benchmark_script_reports_every_type(tmp_path) -> None:
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_gguf_quants.py"
    done = subprocess.run([sys.executable, str(script), "--rows", "4", "--cols", "512", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {row["type"] for row in rows} == {qtype.name for qtype in PATCHABLE_TYPES}
    assert all(row["same"] in (None, 1.0) for row in rows)


def test_float32_helpers_round_and_sum_like_c() -> None:
    from orthopatch.gguf.blockmath import nearest_int, nearest_levels, running_sum

    halves = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 4194302.5], np.float32)
    np.testing.assert_array_equal(nearest_int(halves), [-2, -2, 0, 0, 2, 2, 4194302])
    scaled = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32) * 40
    exact = np.clip(nearest_int(scaled), -32, 31).astype(np.float32)
    np.testing.assert_array_equal(nearest_levels(scaled.copy(), -32, 31, np.full(64, 1e3, np.float32)), exact)
    # a float32 sum in index order differs from numpy's pairwise sum on these terms
    terms = np.array([1e8, 1.0, -1e8, 1.0] * 4, np.float32)[:, None].repeat(3, axis=1)
    sequential = np.float32(0)
    for term in terms[:, 0]:
        sequential = np.float32(sequential + term)
    np.testing.assert_array_equal(running_sum(terms), np.full(3, sequential, np.float32))


def _q3_quants_one_by_one(x: np.ndarray, nmax: int) -> tuple[np.float32, np.ndarray]:
    """ggml's ``make_q3_quants`` (with its refinement) on one sub-block, value by value in float32."""
    f32 = np.float32

    def nearest(v: np.float32) -> int:
        return int((np.array([v + f32(12582912.0)], np.float32).view(np.int32)[0] & 0x007FFFFF) - 0x00400000)

    peak = f32(0)
    for v in x:
        if abs(v) > abs(peak):
            peak = v
    if abs(peak) < f32(1e-15):
        return f32(0), np.zeros(len(x), np.int32)
    inverse = f32(-nmax) / peak
    levels = np.array([max(-nmax, min(nmax - 1, nearest(inverse * v))) for v in x])
    sum_lx = sum_l2 = f32(0)
    for v, level in zip(x, levels, strict=True):
        w = v * v
        sum_lx, sum_l2 = sum_lx + w * v * f32(level), sum_l2 + w * f32(level) * f32(level)
    for _sweep in range(5):
        changed = 0
        for i, v in enumerate(x):
            w = v * v
            without_lx = sum_lx - w * v * f32(levels[i])
            if without_lx > 0:
                without_l2 = sum_l2 - w * f32(levels[i]) * f32(levels[i])
                proposal = max(-nmax, min(nmax - 1, nearest(v * without_l2 / without_lx)))
                if proposal != levels[i]:
                    with_lx = without_lx + w * v * f32(proposal)
                    with_l2 = without_l2 + w * f32(proposal) * f32(proposal)
                    if with_l2 > 0 and with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2:
                        levels[i], sum_lx, sum_l2, changed = proposal, with_lx, with_l2, changed + 1
        if not changed:
            break
    return (sum_lx / sum_l2 if sum_l2 > 0 else f32(0)), levels + nmax


def test_q3_refinement_matches_ggml_loop_for_either_sign_of_the_peak() -> None:
    """Q3_K's refinement skips the sub-blocks whose largest magnitude is positive: they must come out as the
    sequential loop leaves them, like those with a negative one (which the loop does refine)."""
    from orthopatch.gguf.blockmath import make_q3_quants

    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    x[:, 32:64] = np.abs(x[:, 32:64])  # positive peaks only
    x[:, 64:] = -np.abs(x[:, 64:])  # negative peaks only
    x[3, 90] = np.float32(0)
    scale, levels = make_q3_quants(np.ascontiguousarray(x), 4)
    signs = {True: 0, False: 0}
    for column in range(x.shape[1]):
        expected_scale, expected_levels = _q3_quants_one_by_one(x[:, column], 4)
        assert scale[column].view(np.int32) == np.float32(expected_scale).view(np.int32), column
        np.testing.assert_array_equal(levels[:, column], expected_levels)
        first_rounding = np.clip(np.rint(np.float32(-4) / x[np.argmax(np.abs(x[:, column])), column] * x[:, column]),
                                 -4, 3) + 4  # fmt: skip
        signs[x[np.argmax(np.abs(x[:, column])), column] > 0] += int((expected_levels != first_rounding).any())
    assert signs[False] > 0 and signs[True] == 0  # refinement moved levels only where the peak is negative


def test_quantized_bytes_do_not_alias_the_input() -> None:
    values = make_input("gaussian")
    packed = quantize(values, Q.F32)
    values[:] = 0
    assert packed.view(np.float32).any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_threads_write_the_same_bytes(qtype: gguf.GGMLQuantizationType, backend: str) -> None:
    values = make_input("heavy_tailed")[:7]  # an odd row count: parts of unequal size
    alone = quantize(values, qtype)
    for workers in (2, 3, 16):
        assert np.array_equal(quantize(values, qtype, workers=workers), alone), workers
    if qtype in IMATRIX_TYPES:
        imatrix = make_imatrix("gamma")
        assert np.array_equal(quantize(values, qtype, imatrix, workers=2), quantize(values, qtype, imatrix))

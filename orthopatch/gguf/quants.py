"""Dequantize GGUF tensor data and quantize it back to the same type, byte for byte as llama.cpp does.

A patched GGUF tensor is stored again in the type it came in. For the result to be the file that
llama.cpp's own ``llama-quantize`` would have written from the same float values (no importance
matrix), the quantizers must reproduce ggml's reference ones exactly: same float32 arithmetic in the
same order, same round-half-to-even, same fp16 rounding of the block scales.

F32, F16, BF16 and the legacy 32-value blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) come from gguf-py,
whose quantizers already match ggml. The k-quants (Q2_K to Q6_K, 256-value super-blocks) are
written here with numpy, every super-block of a chunk at once. Sums that C accumulates element by
element are accumulated here in the same order (:func:`_running_sum`), because float32 addition is
not associative and a pairwise sum would move ties in the rounding.

Arrays inside the k-quant code are laid out ``[position, sub-block]``: axis 0 runs over the 16 or
32 values of one sub-block, axis 1 over every sub-block of the chunk, so that a sum over positions
is a short loop of whole-row additions.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

PATCHABLE_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {
        Q.F32, Q.F16, Q.BF16,
        Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    }
)  # fmt: skip
"""Types :func:`quantize` writes exactly as llama.cpp does, so a tensor of these types can be patched."""

SUPER_BLOCK = 256
"""Values per k-quant super-block (ggml's ``QK_K``)."""

CHUNK_SUPER_BLOCKS = 2048
"""Super-blocks quantized together: large enough for numpy, small enough to stay in cache."""

_ALL_ZERO_EPS = np.float32(1e-15)
_ROUNDING_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low bits
_RINT_IS_EXACT = np.float32(2**21)  # well inside the 2**22 range where the magic addition rounds like rint
F32 = np.float32


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of raw tensor bytes ``data`` of type ``qtype``, as an array of torch-order ``shape``.

    The last axis of ``shape`` is ggml's ``ne0``, the one quantization blocks run along.
    """
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, _row_bytes(qtype, shape[-1]))
    values = gguf.quants.dequantize(raw, qtype)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Raw bytes ``[rows, row_bytes]`` of float32 ``values`` ``[rows, ne0]`` stored as ``qtype``.

    The bytes are those of ggml's ``ggml_quantize_chunk`` without an importance matrix.
    """
    if qtype not in PATCHABLE_TYPES:
        raise ValueError(f"cannot quantize to {qtype.name}: not one of the patchable types")
    rows = np.ascontiguousarray(values, dtype=np.float32)
    rows = rows.reshape(-1, rows.shape[-1])
    block_values, _ = gguf.GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block_values:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_values} values, not {rows.shape[1]}")
    k_quantizer = _K_QUANTIZERS.get(qtype)
    if k_quantizer is None:
        packed = gguf.quants.quantize(rows, qtype)
    else:
        packed = _quantize_super_blocks(rows.reshape(-1, SUPER_BLOCK), k_quantizer)
    return np.ascontiguousarray(packed).view(np.uint8).reshape(rows.shape[0], -1)


def _row_bytes(qtype: gguf.GGMLQuantizationType, values_per_row: int) -> int:
    """Bytes one row of ``values_per_row`` values takes in ``qtype``."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return values_per_row // block_values * block_bytes


def _quantize_super_blocks(blocks: np.ndarray, quantize_chunk: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Bytes ``[n, block_bytes]`` of super-blocks ``[n, 256]``, quantized a cache-sized chunk at a time."""
    with np.errstate(all="ignore"):  # all-zero and flat sub-blocks divide by zero; their results are overridden
        chunks = [quantize_chunk(blocks[start : start + CHUNK_SUPER_BLOCKS])
                  for start in range(0, len(blocks), CHUNK_SUPER_BLOCKS)]  # fmt: skip
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.uint8)


# ---------------------------------------------------------------- float32 helpers matching C


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even through the float32 magic-number addition (int32)."""
    shifted = (values.astype(F32, copy=False) + _ROUNDING_MAGIC).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _nearest_levels(scaled: np.ndarray, low: int, high: int, largest: np.ndarray) -> np.ndarray:
    """``nearest_int`` of float32 ``scaled`` clamped to ``low..high``, as float32 (``scaled`` is reused).

    ``largest`` bounds ``|scaled|`` per column. Below 2**21 the magic-number rounding is exactly
    ``rint`` (round half to even), which numpy does in one pass; otherwise the bit trick is emulated.
    """
    if bool(np.all(largest < _RINT_IS_EXACT)):
        np.rint(scaled, out=scaled)
        return np.clip(scaled, low, high, out=scaled)
    return np.clip(_nearest_int(scaled), low, high).astype(F32)


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """Float32 sum over axis 0 in index order, as a C loop ``s += t[i]`` computes it."""
    total = terms[0].copy()
    for term in terms[1:]:
        total += term
    return total


def _fp16_bits(values: np.ndarray) -> np.ndarray:
    """IEEE half bits of float32 ``values``, rounded to nearest even like ``GGML_FP32_TO_FP16``."""
    return values.astype(np.float16).view(np.uint16)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    """The float32 value of IEEE half ``bits``."""
    return bits.view(np.float16).astype(F32)


def _first_largest_magnitude(values: np.ndarray, axis: int) -> np.ndarray:
    """The value of largest magnitude along ``axis``, the first one on ties (a C ``>`` scan)."""
    index = np.expand_dims(np.argmax(np.abs(values), axis=axis), axis)
    return np.take_along_axis(values, index, axis=axis).squeeze(axis)


def _sub_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    """Super-blocks ``[n, 256]`` as ``[size, n * 256 // size]``: positions along axis 0."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _per_super_block(per_sub_block: np.ndarray, n_blocks: int) -> np.ndarray:
    """``[position, sub-block]`` or ``[sub-block]`` arrays regrouped as ``[n, subs, ...]`` per super-block."""
    if per_sub_block.ndim == 1:
        return per_sub_block.reshape(n_blocks, -1)
    return per_sub_block.T.reshape(n_blocks, -1, per_sub_block.shape[0])


def _pack_bits(levels: np.ndarray, width: int) -> np.ndarray:
    """OR ``levels[..., k, :] << (width * k)`` over axis -2: several small fields in each byte."""
    packed = np.zeros(levels.shape[:-2] + levels.shape[-1:], np.uint8)
    for k in range(levels.shape[-2]):
        packed |= (levels[..., k, :].astype(np.uint8) << (width * k)).astype(np.uint8)
    return packed


def _as_bytes(*fields: np.ndarray) -> np.ndarray:
    """Per-block fields (``[n, ...]`` of any dtype) laid end to end as ``[n, block_bytes]`` uint8."""
    n_blocks = fields[0].shape[0]
    return np.concatenate([np.ascontiguousarray(f).view(np.uint8).reshape(n_blocks, -1) for f in fields], axis=1)


# ---------------------------------------------------------------- scale searches


def _make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and levels ``0..nmax`` of each sub-block (columns of ``x``) for ``x ≈ scale * L - min``.

    Tries ``nstep + 1`` inverse scales around ``nmax / (max - min)``, fits scale and min to each
    rounding by weighted least squares, and keeps the one of least weighted error (absolute with
    ``use_mad``, squared otherwise). Each trial starts from the min found so far. Returns
    ``(scale, the_min, levels)``.
    """
    low = np.minimum(x.min(axis=0), F32(0))
    high = x.max(axis=0)
    flat = high == low  # constant sub-blocks: no scale; a unit span keeps their arithmetic finite
    sum_w = _running_sum(weights)
    sum_x = _running_sum(weights * x)
    work, trial = np.empty_like(x), np.empty_like(x)

    def levels_for(inverse_scale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.multiply(inverse_scale, np.subtract(x, offset, out=out), out=out)
        largest = np.abs(inverse_scale) * np.maximum(np.abs(high - offset), np.abs(low - offset))
        return _nearest_levels(out, 0, nmax, largest)

    def error_of(scale: np.ndarray, offset: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = np.subtract(np.add(np.multiply(scale, levels, out=work), offset, out=work), x, out=work)
        diff = np.abs(diff, out=work) if use_mad else np.multiply(diff, diff, out=work)
        return _running_sum(np.multiply(diff, weights, out=work))

    def span_from(offset: np.ndarray) -> np.ndarray:
        return np.where(flat, F32(1), high - offset)

    offset = low
    inverse = F32(nmax) / span_from(offset)
    scale = F32(1) / inverse
    best_error = error_of(scale, offset, levels_for(inverse, offset, trial))
    chosen_inverse, chosen_offset = inverse, offset  # the rounding whose levels are returned
    for step in range(nstep + 1):
        inverse = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span_from(offset)
        levels_for(inverse, offset, trial)
        weighted_levels = weights * trial
        sum_l = _running_sum(weighted_levels)
        sum_l2 = _running_sum(weighted_levels * trial)
        sum_xl = _running_sum(weighted_levels * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = trial_offset > 0
        trial_offset = np.where(clamp, F32(0), trial_offset)
        trial_scale = np.where(clamp, sum_xl / sum_l2, trial_scale)
        trial_error = error_of(trial_scale, trial_offset, trial)
        better = (det > 0) & (trial_error < best_error)
        best_error = np.where(better, trial_error, best_error)
        chosen_inverse = np.where(better, inverse, chosen_inverse)
        chosen_offset = np.where(better, offset, chosen_offset)
        scale = np.where(better, trial_scale, scale)
        offset = np.where(better, trial_offset, offset)
    levels = levels_for(chosen_inverse, chosen_offset, trial)
    scale = np.where(flat, F32(0), scale)
    levels[:, flat] = 0
    offset = np.where(flat, low, offset)
    return scale, -offset, levels.astype(np.uint8)


def _make_qx_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed scale and levels ``0..2*nmax-1`` (offset by ``nmax``) of each sub-block, weights ``x²``.

    Tries 18 inverse scales around ``nmax / max|x|`` and keeps the least-squares scale of the
    rounding that explains most weighted energy. Returns ``(scale, levels)``.
    """
    peak = _first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < _ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)  # their result is zero anyway; keeps the arithmetic finite
    weights = x * x
    weighted_x = weights * x
    work, trial = np.empty_like(x), np.empty_like(x)

    def signed_levels(inverse_scale: np.ndarray) -> np.ndarray:
        scaled = np.multiply(inverse_scale, x, out=trial)
        return _nearest_levels(scaled, -nmax, nmax - 1, np.abs(inverse_scale * peak))

    def fit(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sum_lx = _running_sum(np.multiply(weighted_x, levels, out=work))
        sum_l2 = _running_sum(np.multiply(np.multiply(weights, levels, out=work), levels, out=work))
        return sum_lx, sum_l2

    chosen_inverse = F32(-nmax) / peak
    sum_lx, sum_l2 = fit(signed_levels(chosen_inverse))
    scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        inverse = -(F32(nmax) + F32(0.1) * F32(step)) / peak
        sum_lx, sum_l2 = fit(signed_levels(inverse))
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        chosen_inverse = np.where(better, inverse, chosen_inverse)
        scale = np.where(better, sum_lx / sum_l2, scale)
        best = np.where(better, scale * sum_lx, best)
    levels = signed_levels(chosen_inverse) + F32(nmax)
    scale = np.where(all_zero, F32(0), scale)
    levels[:, all_zero] = 0
    return scale, levels.astype(np.uint8)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed scale and levels ``0..2*nmax-1`` of each sub-block, refined value by value (weights ``x²``).

    Starts from rounding at ``nmax / max|x|``; then, up to five sweeps, moves each level to the one
    the current fit prefers when that raises the explained weighted energy. Returns ``(scale, levels)``.
    """
    peak = _first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < _ALL_ZERO_EPS
    weights = x * x
    weighted_x = weights * x
    levels = np.clip(_nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1).astype(F32)
    sum_lx = _running_sum(weighted_x * levels)
    sum_l2 = _running_sum(weights * levels * levels)
    for _sweep in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            level = levels[i]
            without_lx = sum_lx - weighted_x[i] * level
            without_l2 = sum_l2 - weights[i] * level * level
            proposal = np.clip(_nearest_int(x[i] * without_l2 / without_lx), -nmax, nmax - 1).astype(F32)
            with_lx = without_lx + weighted_x[i] * proposal
            with_l2 = without_l2 + weights[i] * proposal * proposal
            accept = (
                (without_lx > 0)
                & (proposal != level)
                & (with_l2 > 0)
                & (with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2)
            )
            levels[i] = np.where(accept, proposal, level)
            sum_lx = np.where(accept, with_lx, sum_lx)
            sum_l2 = np.where(accept, with_l2, sum_l2)
            changed |= accept & ~all_zero
        if not changed.any():
            break
    scale = np.where(sum_l2 > 0, sum_lx / sum_l2, F32(0))
    scale = np.where(all_zero, F32(0), scale)
    levels = np.where(all_zero, F32(0), levels + F32(nmax))
    return scale, levels.astype(np.uint8)


def _requantized_levels(
    x: np.ndarray, step: np.ndarray, offset: np.ndarray, low: int, high: int, fallback: np.ndarray
) -> np.ndarray:
    """Levels ``round((x + offset) / step)`` clamped to ``low..high``, shifted to start at 0;
    ``fallback`` where ``step`` is zero. ``x`` is ``[n, subs, size]``, ``step``/``offset`` ``[n, subs]``."""
    levels = np.clip(_nearest_int((x + offset[..., None]) / step[..., None]), low, high) - low
    return np.where(step[..., None] != 0, levels, fallback).astype(np.uint8)


# ---------------------------------------------------------------- the five k-quants


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16, 2-bit levels, 4-bit scale and min each, fp16 ``d`` and ``dmin``."""
    n = len(blocks)
    x = _sub_blocks(blocks, 16)
    scales, mins, levels = _make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    scales, mins = _per_super_block(scales, n), _per_super_block(mins, n)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with_scale, with_min = max_scale > 0, max_min > 0
    scale_codes = np.where(with_scale[:, None], _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
    min_codes = np.where(with_min[:, None], _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed_scales = ((scale_codes & 0xFF) | ((min_codes << 4) & 0xFF)).astype(np.uint8)
    d = _fp16_bits(np.where(with_scale, max_scale / F32(15), F32(0)))
    dmin = _fp16_bits(np.where(with_min, max_min / F32(15), F32(0)))
    step = _fp16_value(d)[:, None] * (packed_scales & 0xF).astype(F32)
    offset = _fp16_value(dmin)[:, None] * (packed_scales >> 4).astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 16, 16), step, offset, 0, 3, _per_super_block(levels, n))
    qs = _pack_bits(levels.reshape(n, 2, 4, 32), 2)
    return _as_bytes(packed_scales, qs, d, dmin)


def _quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16, 3-bit levels (high bit apart), signed 6-bit scales, fp16 ``d``."""
    n = len(blocks)
    scales, levels = _make_q3_quants(_sub_blocks(blocks, 16), 4)
    scales = _per_super_block(scales, n)
    max_scale = _first_largest_magnitude(scales, axis=1)
    has_scale = max_scale != 0
    inverse = F32(-32) / max_scale
    codes = np.clip(_nearest_int(inverse[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    codes = np.where(has_scale[:, None], codes, 0)
    low_nibbles = codes & 0xF
    packed_scales = np.concatenate(
        [low_nibbles[:, :8] | (low_nibbles[:, 8:] << 4), _pack_bits((codes >> 4).reshape(n, 4, 4), 2)], axis=1
    ).astype(np.uint8)
    d = _fp16_bits(np.where(has_scale, F32(1) / inverse, F32(0)))
    step = _fp16_value(d)[:, None] * (codes - 32).astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 16, 16), step, np.zeros_like(step), -4, 3,
                                 _per_super_block(levels, n))  # fmt: skip
    levels = levels.reshape(n, 8, 32)
    hmask = _pack_bits(levels > 3, 1)
    qs = _pack_bits((levels & 3).reshape(n, 2, 4, 32), 2)
    return _as_bytes(hmask, qs, packed_scales, d)


def _six_bit_scales_and_mins(scale_codes: np.ndarray, min_codes: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in 12 bytes, the layout ``get_scale_min_k4`` reads."""
    first = scale_codes[:, :4] | ((scale_codes[:, 4:] >> 4) << 6)
    second = min_codes[:, :4] | ((min_codes[:, 4:] >> 4) << 6)
    third = (scale_codes[:, 4:] & 0xF) | ((min_codes[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _q45_k_levels(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared part of Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins.

    Returns ``(d, dmin, packed_scales, levels)`` with levels ``[n, 256]`` in ``0..nmax``.
    """
    n = len(blocks)
    x = _sub_blocks(blocks, 32)
    rms = np.sqrt(_running_sum(x * x) / F32(32))
    scales, mins, levels = _make_qkx2_quants(x, rms + np.abs(x), nmax, rmin, 0.1, nstep, False)
    scales, mins = _per_super_block(scales, n), _per_super_block(mins, n)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inverse_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inverse_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    scale_codes = np.minimum(_nearest_int(inverse_scale[:, None] * scales) & 0xFF, 63)
    min_codes = np.minimum(_nearest_int(inverse_min[:, None] * mins) & 0xFF, 63)
    d = _fp16_bits(max_scale / F32(63))
    dmin = _fp16_bits(max_min / F32(63))
    step = _fp16_value(d)[:, None] * scale_codes.astype(F32)
    offset = _fp16_value(dmin)[:, None] * min_codes.astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 8, 32), step, offset, 0, nmax, _per_super_block(levels, n))
    return d, dmin, _six_bit_scales_and_mins(scale_codes, min_codes), levels.reshape(n, 4, 2, 32)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins, fp16 ``d`` and ``dmin``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, 15, -1.0, 20)
    qs = _pack_bits(levels, 4)
    return _as_bytes(d, dmin, packed_scales, qs)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: as Q4_K with 5-bit levels, the fifth bits gathered in ``qh``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, 31, -0.5, 15)
    n = len(blocks)
    qh = _pack_bits((levels > 15).reshape(n, 8, 32), 1)
    qs = _pack_bits(levels & 0xF, 4)
    return _as_bytes(d, dmin, packed_scales, qh, qs)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, 6-bit levels, signed 8-bit scales, fp16 ``d``."""
    n = len(blocks)
    scales, levels = _make_qx_quants_rmse(_sub_blocks(blocks, 16), 32)
    scales = _per_super_block(scales, n)
    max_scale = _first_largest_magnitude(scales, axis=1)
    all_zero = np.abs(max_scale) < _ALL_ZERO_EPS
    inverse = F32(-128) / max_scale
    d = _fp16_bits(np.where(all_zero, F32(0), F32(1) / inverse))
    codes = (np.minimum(_nearest_int(inverse[:, None] * scales), 127) & 0xFF).astype(np.uint8).view(np.int8)
    codes = np.where(all_zero[:, None], np.int8(0), codes)
    step = _fp16_value(d)[:, None] * codes.astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 16, 16), step, np.zeros_like(step), -32, 31,
                                 _per_super_block(levels, n))  # fmt: skip
    levels = np.where(all_zero[:, None, None], np.uint8(0), levels).reshape(n, 2, 4, 32)
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = _pack_bits(levels >> 4, 2)
    return _as_bytes(ql.reshape(n, 128), qh.reshape(n, 64), codes, d)


_K_QUANTIZERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q2_K: _quantize_q2_k,
    Q.Q3_K: _quantize_q3_k,
    Q.Q4_K: _quantize_q4_k,
    Q.Q5_K: _quantize_q5_k,
    Q.Q6_K: _quantize_q6_k,
}

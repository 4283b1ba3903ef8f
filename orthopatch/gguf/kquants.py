"""The per-type block quantizers: the k-quants Q2_K to Q6_K, and the legacy types with an importance matrix.

Each turns a chunk of blocks (256-value super-blocks for the k-quants, 32-value blocks for the legacy
types) into the bytes ggml's quantizer for that type writes, with or without llama.cpp's importance
matrix, by combining the scale searches and packing helpers of :mod:`orthopatch.gguf.blockmath` in
ggml's order. They are kept apart from :mod:`orthopatch.gguf.quants`, which picks one per type and
feeds it chunks.
"""

from __future__ import annotations

import numpy as np

from orthopatch.gguf.blockmath import (
    ALL_ZERO_EPS,
    F32,
    as_bytes,
    first_largest_magnitude,
    fp16_bits,
    fp16_value,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    pack_bits,
    per_super_block,
    requantized_levels,
    running_sum,
    sub_blocks,
)

SUPER_BLOCK = 256
"""Values per k-quant super-block (ggml's ``QK_K``)."""


# ---------------------------------------------------------------- the five k-quants


def _importance_weights(blocks: np.ndarray, importance: np.ndarray, variance_factor: int) -> np.ndarray:
    """Per-value weights of the weighted k-quants: importance times ``sqrt(σ² + x²)``, with σ² the
    super-block's mean square times ``variance_factor``."""
    sum_x2 = running_sum(np.ascontiguousarray((blocks * blocks).T))
    variance = F32(variance_factor) * sum_x2 / F32(SUPER_BLOCK)
    return importance * np.sqrt(variance[:, None] + blocks * blocks)


def _sub_block_weights(weights: np.ndarray, n_blocks: int) -> np.ndarray:
    """Total weight of each sub-block, as ``[subs, n]`` (the layout the scale quantizers take)."""
    return np.ascontiguousarray(per_super_block(running_sum(weights), n_blocks).T)


def quantize_q2_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16, 2-bit levels, 4-bit scale and min each, fp16 ``d`` and ``dmin``."""
    n = len(blocks)
    x = sub_blocks(blocks, 16)
    if importance is None:
        scales, mins, levels = make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        packed_scales, d, dmin = _q2_k_scales_from_maxima(per_super_block(scales, n), per_super_block(mins, n))
    else:
        weights = sub_blocks(_importance_weights(blocks, importance, 1), 16)
        scales, mins, levels = make_qkx_quants(x, weights, 3, -0.9, 0.05, 36, False)
        sub_weights = _sub_block_weights(weights, n)
        scale_step, scale_codes = make_qp_quants(per_super_block(scales, n).T.copy(), 15, sub_weights)
        min_step, min_codes = make_qp_quants(per_super_block(mins, n).T.copy(), 15, sub_weights)
        packed_scales = (scale_codes.T | (min_codes.T << 4)).astype(np.uint8)
        d, dmin = fp16_bits(scale_step), fp16_bits(min_step)
    step = fp16_value(d)[:, None] * (packed_scales & 0xF).astype(F32)
    offset = fp16_value(dmin)[:, None] * (packed_scales >> 4).astype(F32)
    levels = requantized_levels(blocks.reshape(n, 16, 16), step, offset, 0, 3, per_super_block(levels, n))
    qs = pack_bits(levels.reshape(n, 2, 4, 32), 2)
    return as_bytes(packed_scales, qs, d, dmin)


def _q2_k_scales_from_maxima(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K's 4-bit scale and min codes relative to the largest of each, and fp16 ``d``, ``dmin``."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with_scale, with_min = max_scale > 0, max_min > 0
    scale_codes = np.where(with_scale[:, None], nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
    min_codes = np.where(with_min[:, None], nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed_scales = ((scale_codes & 0xFF) | ((min_codes << 4) & 0xFF)).astype(np.uint8)
    d = fp16_bits(np.where(with_scale, max_scale / F32(15), F32(0)))
    dmin = fp16_bits(np.where(with_min, max_min / F32(15), F32(0)))
    return packed_scales, d, dmin


def quantize_q3_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16, 3-bit levels (high bit apart), signed 6-bit scales, fp16 ``d``."""
    n = len(blocks)
    x = sub_blocks(blocks, 16)
    if importance is None:
        scales, levels = make_q3_quants(x, 4)
        scales = per_super_block(scales, n)
        max_scale = first_largest_magnitude(scales, axis=1)
        has_scale = max_scale != 0
        inverse = F32(-32) / max_scale
        codes = np.clip(nearest_int(inverse[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
        codes = np.where(has_scale[:, None], codes, 0)
        d = fp16_bits(np.where(has_scale, F32(1) / inverse, F32(0)))
    else:
        weights = sub_blocks(_importance_weights(blocks, importance, 2), 16)
        scales, levels = make_qx_quants(x, 4, weights)
        block_scale, codes = make_qx_quants(per_super_block(scales, n).T.copy(), 32, _sub_block_weights(weights, n))
        codes = codes.T.astype(np.int32)
        d = fp16_bits(block_scale)
    low_nibbles = codes & 0xF
    packed_scales = np.concatenate(
        [low_nibbles[:, :8] | (low_nibbles[:, 8:] << 4), pack_bits((codes >> 4).reshape(n, 4, 4), 2)], axis=1
    ).astype(np.uint8)
    step = fp16_value(d)[:, None] * (codes - 32).astype(F32)
    levels = requantized_levels(blocks.reshape(n, 16, 16), step, None, -4, 3,
                                per_super_block(levels, n))  # fmt: skip
    levels = levels.reshape(n, 8, 32)
    hmask = pack_bits(levels > 3, 1)
    qs = pack_bits((levels & 3).reshape(n, 2, 4, 32), 2)
    return as_bytes(hmask, qs, packed_scales, d)


def _six_bit_scales_and_mins(scale_codes: np.ndarray, min_codes: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins ``[n, 8]`` in 12 bytes, the layout ``get_scale_min_k4`` reads."""
    first = scale_codes[:, :4] | ((scale_codes[:, 4:] >> 4) << 6)
    second = min_codes[:, :4] | ((min_codes[:, 4:] >> 4) << 6)
    third = (scale_codes[:, 4:] & 0xF) | ((min_codes[:, 4:] & 0xF) << 4)
    return (np.concatenate([first, second, third], axis=1) & 0xFF).astype(np.uint8)


def _unpack_six_bit_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight scales and eight mins ``[n, 8]`` that ``get_scale_min_k4`` reads from ``packed`` ``[n, 12]``."""
    packed = packed.astype(np.int32)
    scales = np.concatenate([packed[:, 0:4] & 63, (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([packed[:, 4:8] & 63, (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)], axis=1)
    return scales, mins


def _q45_k_levels(
    blocks: np.ndarray, importance: np.ndarray | None, nmax: int, rmin: float, nstep: int
) -> tuple[np.ndarray, ...]:
    """Shared part of Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins.

    Returns ``(d, dmin, packed_scales, levels)`` with levels ``[n, 4, 2, 32]`` in ``0..nmax``.
    """
    n = len(blocks)
    x = sub_blocks(blocks, 32)
    if importance is None:
        rms = np.sqrt(running_sum(x * x) / F32(32))
        scales, mins, levels = make_qkx_quants(x, rms + np.abs(x), nmax, rmin, 0.1, nstep, False)
        scales, mins = per_super_block(scales, n), per_super_block(mins, n)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        inverse_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inverse_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        scale_codes = np.minimum(nearest_int(inverse_scale[:, None] * scales) & 0xFF, 63)
        min_codes = np.minimum(nearest_int(inverse_min[:, None] * mins) & 0xFF, 63)
        d, dmin = fp16_bits(max_scale / F32(63)), fp16_bits(max_min / F32(63))
    else:
        weights = sub_blocks(_importance_weights(blocks, importance, 2), 32)
        scales, mins, levels = make_qkx_quants(x, weights, nmax, -0.9, 0.05, 36, False)
        sub_weights = _sub_block_weights(weights, n)
        scale_step, scale_codes = make_qp_quants(per_super_block(scales, n).T.copy(), 63, sub_weights)
        min_step, min_codes = make_qp_quants(per_super_block(mins, n).T.copy(), 63, sub_weights)
        scale_codes, min_codes = scale_codes.T.astype(np.int32), min_codes.T.astype(np.int32)
        if nmax == 31:  # Q5_K clamps the codes to 6 bits, Q4_K packs them as they come
            scale_codes, min_codes = np.minimum(scale_codes, 63), np.minimum(min_codes, 63)
        d, dmin = fp16_bits(scale_step), fp16_bits(min_step)
    packed_scales = _six_bit_scales_and_mins(scale_codes, min_codes)
    scale_codes, min_codes = _unpack_six_bit_scales_and_mins(packed_scales)
    step = fp16_value(d)[:, None] * scale_codes.astype(F32)
    offset = fp16_value(dmin)[:, None] * min_codes.astype(F32)
    levels = requantized_levels(blocks.reshape(n, 8, 32), step, offset, 0, nmax, per_super_block(levels, n))
    return d, dmin, packed_scales, levels.reshape(n, 4, 2, 32)


def quantize_q4_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins, fp16 ``d`` and ``dmin``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, importance, 15, -1.0, 20)
    qs = pack_bits(levels, 4)
    return as_bytes(d, dmin, packed_scales, qs)


def quantize_q5_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_K: as Q4_K with 5-bit levels, the fifth bits gathered in ``qh``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, importance, 31, -0.5, 15)
    n = len(blocks)
    qh = pack_bits((levels > 15).reshape(n, 8, 32), 1)
    qs = pack_bits(levels & 0xF, 4)
    return as_bytes(d, dmin, packed_scales, qh, qs)


def quantize_q6_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, 6-bit levels, signed 8-bit scales, fp16 ``d``."""
    n = len(blocks)
    weights = None if importance is None else sub_blocks(importance, 16)
    scales, levels = make_qx_quants(sub_blocks(blocks, 16), 32, weights)
    scales = per_super_block(scales, n)
    max_scale = first_largest_magnitude(scales, axis=1)
    all_zero = np.abs(max_scale) < ALL_ZERO_EPS
    inverse = F32(-128) / max_scale
    d = fp16_bits(np.where(all_zero, F32(0), F32(1) / inverse))
    codes = (np.minimum(nearest_int(inverse[:, None] * scales), 127) & 0xFF).astype(np.uint8).view(np.int8)
    codes = np.where(all_zero[:, None], np.int8(0), codes)
    step = fp16_value(d)[:, None] * codes.astype(F32)
    levels = requantized_levels(blocks.reshape(n, 16, 16), step, None, -32, 31,
                                per_super_block(levels, n))  # fmt: skip
    levels = np.where(all_zero[:, None, None], np.uint8(0), levels).reshape(n, 2, 4, 32)
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = pack_bits(levels >> 4, 2)
    return as_bytes(ql.reshape(n, 128), qh.reshape(n, 64), codes, d)


# ---------------------------------------------------------------- legacy types with an importance matrix


def _legacy_weights(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Per-value weights ``[32, m]`` of the weighted legacy quantizers: importance times ``sqrt(σ² + x²)``,
    σ² the mean square of the block's row."""
    weights = importance * np.sqrt(row_mean_square[:, None] + blocks * blocks)
    return np.ascontiguousarray(weights.T)


def _fifth_bits(levels: np.ndarray) -> np.ndarray:
    """The fifth bit of each of the 32 levels ``[m, 32]``, as one little-endian 32-bit word ``[m, 4]``."""
    bits = ((levels >> 4) & 1).reshape(len(levels), 4, 8).transpose(0, 2, 1)
    return pack_bits(bits, 1)


def quantize_q4_0_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_0 with an importance matrix: a searched signed scale per block of 32, 4-bit levels."""
    x = np.ascontiguousarray(blocks.T)
    scale, levels = make_qx_quants(x, 8, _legacy_weights(blocks, importance, row_mean_square))
    levels = levels.T
    return as_bytes(fp16_bits(scale), pack_bits(levels.reshape(-1, 2, 16), 4))


def quantize_q5_0_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_0 with an importance matrix: as Q4_0 with 5-bit levels, fifth bits in ``qh``."""
    x = np.ascontiguousarray(blocks.T)
    scale, levels = make_qx_quants(x, 16, _legacy_weights(blocks, importance, row_mean_square))
    levels = levels.T
    return as_bytes(fp16_bits(scale), _fifth_bits(levels), pack_bits((levels & 0xF).reshape(-1, 2, 16), 4))


def quantize_q4_1_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_1 with an importance matrix: searched scale and min per block of 32, 4-bit levels."""
    x, weights = np.ascontiguousarray(blocks.T), _legacy_weights(blocks, importance, row_mean_square)
    scale, the_min, levels = make_qkx_quants(x, weights, 15, -0.9, 0.05, 36, False)
    levels = levels.T
    return as_bytes(fp16_bits(scale), fp16_bits(-the_min), pack_bits(levels.reshape(-1, 2, 16), 4))


def quantize_q5_1_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_1 with an importance matrix: as Q4_1 with 5-bit levels, fifth bits in ``qh``."""
    x, weights = np.ascontiguousarray(blocks.T), _legacy_weights(blocks, importance, row_mean_square)
    scale, the_min, levels = make_qkx_quants(x, weights, 31, -0.9, 0.05, 36, False)
    levels = levels.T
    return as_bytes(fp16_bits(scale), fp16_bits(-the_min), _fifth_bits(levels),
                    pack_bits((levels & 0xF).reshape(-1, 2, 16), 4))  # fmt: skip

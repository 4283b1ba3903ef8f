"""Dequantize GGUF tensor data and quantize it back to the same type, byte for byte as llama.cpp does.

A patched GGUF tensor is stored again in the type it came in. For the result to be the file that
llama.cpp's own ``llama-quantize`` would have written from the same float values, the quantizers
must reproduce ggml's exactly: same float32 arithmetic in the same order, same round-half-to-even,
same fp16 rounding of the block scales.

Without an importance matrix, F32, F16, BF16 and the legacy 32-value blocks (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1) come from gguf-py, whose quantizers already match ggml. The k-quants (Q2_K to Q6_K,
256-value super-blocks), and the legacy types weighted by an importance matrix, are written here
with numpy, every block of a chunk at once. Sums that C accumulates element by element are
accumulated here in the same order (:func:`_running_sum`), because float32 addition is not
associative and a pairwise sum would move ties in the rounding.

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

IMATRIX_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
"""Types whose quantizer reads an importance matrix; the other patchable types ignore one."""

CHUNK_VALUES = 1024 * SUPER_BLOCK
"""Values quantized together: large enough for numpy, small enough to stay in cache."""

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


def quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes ``[rows, row_bytes]`` of float32 ``values`` ``[rows, ne0]`` stored as ``qtype``.

    The bytes are those of ggml's ``ggml_quantize_chunk``. ``imatrix`` is llama.cpp's importance
    matrix entry for the tensor, one weight per column (``ne0`` values): with it the weighted
    quantizers run, as ``llama-quantize --imatrix`` does; F32, F16, BF16 and Q8_0 ignore it, as ggml does.
    """
    if qtype not in PATCHABLE_TYPES:
        raise ValueError(f"cannot quantize to {qtype.name}: not one of the patchable types")
    rows = np.ascontiguousarray(values, dtype=np.float32)
    rows = rows.reshape(-1, rows.shape[-1])
    block_values, _ = gguf.GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block_values:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_values} values, not {rows.shape[1]}")
    importance = _checked_importance(imatrix, rows.shape[1]) if qtype in IMATRIX_TYPES else None
    if qtype in _K_QUANTIZERS:
        packed = _quantize_in_chunks(rows, SUPER_BLOCK, _K_QUANTIZERS[qtype], importance)
    elif importance is not None:
        packed = _quantize_in_chunks(rows, 32, _WEIGHTED_LEGACY_QUANTIZERS[qtype], importance, row_mean_square=True)
    else:
        with np.errstate(over="ignore"):  # beyond the fp16 range ggml writes inf, and so does numpy
            packed = gguf.quants.quantize(rows, qtype)
        if np.shares_memory(packed, values):  # F32 comes back as the input itself
            packed = packed.copy()
    return np.ascontiguousarray(packed).view(np.uint8).reshape(rows.shape[0], _row_bytes(qtype, rows.shape[1]))


def _checked_importance(imatrix: np.ndarray | None, columns: int) -> np.ndarray | None:
    """``imatrix`` as ``columns`` float32 weights, or None."""
    if imatrix is None:
        return None
    importance = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if importance.size != columns:
        raise ValueError(f"the importance matrix has {importance.size} weights for rows of {columns} values")
    return importance


def _row_bytes(qtype: gguf.GGMLQuantizationType, values_per_row: int) -> int:
    """Bytes one row of ``values_per_row`` values takes in ``qtype``."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return values_per_row // block_values * block_bytes


BlockQuantizer = Callable[[np.ndarray, "np.ndarray | None", np.ndarray], np.ndarray]
"""``(blocks [m, size], importance [m, size] or None, mean square of each block's row [m])``
to ``bytes [m, block_bytes]``."""


def _quantize_in_chunks(
    rows: np.ndarray,
    block_size: int,
    quantize_chunk: BlockQuantizer,
    importance: np.ndarray | None,
    row_mean_square: bool = False,
) -> np.ndarray:
    """Bytes ``[blocks, block_bytes]`` of ``rows`` cut in blocks of ``block_size``, a cache-sized chunk at a time.

    Each chunk also gets the importance of the columns its blocks cover and, with ``row_mean_square``
    (the weighted legacy types), the mean square of the row each block lies in (zeros otherwise).
    """
    per_row = rows.shape[1] // block_size
    blocks = rows.reshape(-1, block_size)
    columns = None if importance is None else importance.reshape(per_row, block_size)
    row_squares = np.zeros(len(rows), F32)
    if row_mean_square and rows.size:
        row_squares = _running_sum(np.ascontiguousarray((rows * rows).T)) / F32(rows.shape[1])
    step = max(1, CHUNK_VALUES // block_size)
    chunks = []
    with np.errstate(all="ignore"):  # all-zero and flat sub-blocks divide by zero; their results are overridden
        for start in range(0, len(blocks), step):
            index = np.arange(start, min(start + step, len(blocks)))
            weights = None if columns is None else columns[index % per_row]
            chunks.append(quantize_chunk(blocks[start : index[-1] + 1], weights, row_squares[index // per_row]))
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


def _make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and levels ``0..nmax`` of each sub-block (columns of ``x``) for ``x ≈ scale * L - min``:
    ggml's ``make_qkx2_quants``, and ``make_qkx3_quants`` too when weights are given.

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


def _make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Signed scale and levels ``0..2*nmax-1`` (offset by ``nmax``) of each sub-block (columns of ``x``),
    weighted by ``weights`` or by ``x²`` without them.

    Tries 18 inverse scales around ``nmax / max|x|`` and keeps the least-squares scale of the
    rounding that explains most weighted energy. Returns ``(scale, levels)``.
    """
    peak = _first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < _ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)  # their result is zero anyway; keeps the arithmetic finite
    weights = x * x if weights is None else weights
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
    the current fit prefers when that raises the explained weighted energy. A sub-block whose sweep
    changed nothing would change nothing again, so later sweeps only visit those that changed.
    Returns ``(scale, levels)``.
    """
    peak = _first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < _ALL_ZERO_EPS
    weights = x * x
    weighted_x = weights * x
    levels = np.clip(_nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1).astype(F32)
    sum_lx = _running_sum(weighted_x * levels)
    sum_l2 = _running_sum(weights * levels * levels)
    levels, sum_lx, sum_l2, changed = _q3_sweep(x, weights, weighted_x, levels, sum_lx, sum_l2, nmax)
    active = np.flatnonzero(changed)
    for _sweep in range(4):
        if not active.size:
            break
        swept = _q3_sweep(x[:, active], weights[:, active], weighted_x[:, active], levels[:, active],
                          sum_lx[active], sum_l2[active], nmax)  # fmt: skip
        levels[:, active], sum_lx[active], sum_l2[active], changed = swept
        active = active[changed]
    scale = np.where(sum_l2 > 0, sum_lx / sum_l2, F32(0))
    scale = np.where(all_zero, F32(0), scale)
    levels = np.where(all_zero, F32(0), levels + F32(nmax))
    return scale, levels.astype(np.uint8)


def _q3_sweep(
    x: np.ndarray,
    weights: np.ndarray,
    weighted_x: np.ndarray,
    levels: np.ndarray,
    sum_lx: np.ndarray,
    sum_l2: np.ndarray,
    nmax: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass of :func:`_make_q3_quants`' refinement over the positions, in order.

    Returns the updated ``(levels, sum_lx, sum_l2)`` and which sub-blocks changed.
    """
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
        changed |= accept
    return levels, sum_lx, sum_l2, changed


def _make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and codes ``0..nmax`` of non-negative values (columns of ``x``, e.g. the sub-block scales
    of each super-block) for ``x ≈ scale * code``, weighted by ``weights``. Returns ``(scale, codes)``.

    Picks the best of 9 inverse scales around ``nmax / max x`` by weighted squared error, then
    refines code by code as :func:`_make_q3_quants` does. Codes are stored as bytes, wrapping as C does.
    """
    peak = np.maximum(x.max(axis=0), F32(0))
    all_zero = peak < _ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)
    weighted_x = weights * x

    def squared_error(scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = x - scale * levels
        return _running_sum(weights * diff * diff)

    inverse = F32(nmax) / peak
    best_error = squared_error(F32(1) / inverse, (_nearest_int(inverse * x) & 0xFF).astype(F32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_inverse = (F32(0.1) * F32(step) + F32(nmax)) / peak
        trial = np.minimum(_nearest_int(trial_inverse * x), nmax).astype(F32)
        trial_error = squared_error(F32(1) / trial_inverse, trial)
        better = trial_error < best_error
        best_error = np.where(better, trial_error, best_error)
        inverse = np.where(better, trial_inverse, inverse)
    signed = np.minimum(_nearest_int(inverse * x), nmax).astype(F32)
    sum_lx = _running_sum(weighted_x * signed)
    sum_l2 = _running_sum(weights * signed * signed)
    codes = (signed.astype(np.int32) & 0xFF).astype(F32)
    for _sweep in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            code = codes[i]
            without_lx = sum_lx - weighted_x[i] * code
            without_l2 = sum_l2 - weights[i] * code * code
            proposal = np.minimum(_nearest_int(x[i] * without_l2 / without_lx), nmax).astype(F32)
            with_lx = without_lx + weighted_x[i] * proposal
            with_l2 = without_l2 + weights[i] * proposal * proposal
            accept = (
                (without_lx > 0)
                & (without_l2 > 0)
                & (proposal != code)
                & (with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2)
            )
            codes[i] = np.where(accept, (proposal.astype(np.int32) & 0xFF).astype(F32), code)
            sum_lx = np.where(accept, with_lx, sum_lx)
            sum_l2 = np.where(accept, with_l2, sum_l2)
            changed |= accept & ~all_zero
        if not changed.any():
            break
    scale = np.where(sum_l2 > 0, sum_lx / sum_l2, F32(0))
    scale = np.where(all_zero, F32(0), scale)
    codes[:, all_zero] = 0
    return scale, codes.astype(np.uint8)


def _requantized_levels(
    x: np.ndarray, step: np.ndarray, offset: np.ndarray, low: int, high: int, fallback: np.ndarray
) -> np.ndarray:
    """Levels ``round((x + offset) / step)`` clamped to ``low..high``, shifted to start at 0;
    ``fallback`` where ``step`` is zero. ``x`` is ``[n, subs, size]``, ``step``/``offset`` ``[n, subs]``."""
    levels = np.clip(_nearest_int((x + offset[..., None]) / step[..., None]), low, high) - low
    return np.where(step[..., None] != 0, levels, fallback).astype(np.uint8)


# ---------------------------------------------------------------- the five k-quants


def _importance_weights(blocks: np.ndarray, importance: np.ndarray, variance_factor: int) -> np.ndarray:
    """Per-value weights of the weighted k-quants: importance times ``sqrt(σ² + x²)``, with σ² the
    super-block's mean square times ``variance_factor``."""
    sum_x2 = _running_sum(np.ascontiguousarray((blocks * blocks).T))
    variance = F32(variance_factor) * sum_x2 / F32(SUPER_BLOCK)
    return importance * np.sqrt(variance[:, None] + blocks * blocks)


def _sub_block_weights(weights: np.ndarray, n_blocks: int) -> np.ndarray:
    """Total weight of each sub-block, as ``[subs, n]`` (the layout the scale quantizers take)."""
    return np.ascontiguousarray(_per_super_block(_running_sum(weights), n_blocks).T)


def _quantize_q2_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16, 2-bit levels, 4-bit scale and min each, fp16 ``d`` and ``dmin``."""
    n = len(blocks)
    x = _sub_blocks(blocks, 16)
    if importance is None:
        scales, mins, levels = _make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        packed_scales, d, dmin = _q2_k_scales_from_maxima(_per_super_block(scales, n), _per_super_block(mins, n))
    else:
        weights = _sub_blocks(_importance_weights(blocks, importance, 1), 16)
        scales, mins, levels = _make_qkx_quants(x, weights, 3, -0.9, 0.05, 36, False)
        sub_weights = _sub_block_weights(weights, n)
        scale_step, scale_codes = _make_qp_quants(_per_super_block(scales, n).T.copy(), 15, sub_weights)
        min_step, min_codes = _make_qp_quants(_per_super_block(mins, n).T.copy(), 15, sub_weights)
        packed_scales = (scale_codes.T | (min_codes.T << 4)).astype(np.uint8)
        d, dmin = _fp16_bits(scale_step), _fp16_bits(min_step)
    step = _fp16_value(d)[:, None] * (packed_scales & 0xF).astype(F32)
    offset = _fp16_value(dmin)[:, None] * (packed_scales >> 4).astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 16, 16), step, offset, 0, 3, _per_super_block(levels, n))
    qs = _pack_bits(levels.reshape(n, 2, 4, 32), 2)
    return _as_bytes(packed_scales, qs, d, dmin)


def _q2_k_scales_from_maxima(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K's 4-bit scale and min codes relative to the largest of each, and fp16 ``d``, ``dmin``."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with_scale, with_min = max_scale > 0, max_min > 0
    scale_codes = np.where(with_scale[:, None], _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
    min_codes = np.where(with_min[:, None], _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed_scales = ((scale_codes & 0xFF) | ((min_codes << 4) & 0xFF)).astype(np.uint8)
    d = _fp16_bits(np.where(with_scale, max_scale / F32(15), F32(0)))
    dmin = _fp16_bits(np.where(with_min, max_min / F32(15), F32(0)))
    return packed_scales, d, dmin


def _quantize_q3_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16, 3-bit levels (high bit apart), signed 6-bit scales, fp16 ``d``."""
    n = len(blocks)
    x = _sub_blocks(blocks, 16)
    if importance is None:
        scales, levels = _make_q3_quants(x, 4)
        scales = _per_super_block(scales, n)
        max_scale = _first_largest_magnitude(scales, axis=1)
        has_scale = max_scale != 0
        inverse = F32(-32) / max_scale
        codes = np.clip(_nearest_int(inverse[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
        codes = np.where(has_scale[:, None], codes, 0)
        d = _fp16_bits(np.where(has_scale, F32(1) / inverse, F32(0)))
    else:
        weights = _sub_blocks(_importance_weights(blocks, importance, 2), 16)
        scales, levels = _make_qx_quants(x, 4, weights)
        block_scale, codes = _make_qx_quants(_per_super_block(scales, n).T.copy(), 32, _sub_block_weights(weights, n))
        codes = codes.T.astype(np.int32)
        d = _fp16_bits(block_scale)
    low_nibbles = codes & 0xF
    packed_scales = np.concatenate(
        [low_nibbles[:, :8] | (low_nibbles[:, 8:] << 4), _pack_bits((codes >> 4).reshape(n, 4, 4), 2)], axis=1
    ).astype(np.uint8)
    step = _fp16_value(d)[:, None] * (codes - 32).astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 16, 16), step, np.zeros_like(step), -4, 3,
                                 _per_super_block(levels, n))  # fmt: skip
    levels = levels.reshape(n, 8, 32)
    hmask = _pack_bits(levels > 3, 1)
    qs = _pack_bits((levels & 3).reshape(n, 2, 4, 32), 2)
    return _as_bytes(hmask, qs, packed_scales, d)


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
    x = _sub_blocks(blocks, 32)
    if importance is None:
        rms = np.sqrt(_running_sum(x * x) / F32(32))
        scales, mins, levels = _make_qkx_quants(x, rms + np.abs(x), nmax, rmin, 0.1, nstep, False)
        scales, mins = _per_super_block(scales, n), _per_super_block(mins, n)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        inverse_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inverse_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        scale_codes = np.minimum(_nearest_int(inverse_scale[:, None] * scales) & 0xFF, 63)
        min_codes = np.minimum(_nearest_int(inverse_min[:, None] * mins) & 0xFF, 63)
        d, dmin = _fp16_bits(max_scale / F32(63)), _fp16_bits(max_min / F32(63))
    else:
        weights = _sub_blocks(_importance_weights(blocks, importance, 2), 32)
        scales, mins, levels = _make_qkx_quants(x, weights, nmax, -0.9, 0.05, 36, False)
        sub_weights = _sub_block_weights(weights, n)
        scale_step, scale_codes = _make_qp_quants(_per_super_block(scales, n).T.copy(), 63, sub_weights)
        min_step, min_codes = _make_qp_quants(_per_super_block(mins, n).T.copy(), 63, sub_weights)
        scale_codes, min_codes = scale_codes.T.astype(np.int32), min_codes.T.astype(np.int32)
        if nmax == 31:  # Q5_K clamps the codes to 6 bits, Q4_K packs them as they come
            scale_codes, min_codes = np.minimum(scale_codes, 63), np.minimum(min_codes, 63)
        d, dmin = _fp16_bits(scale_step), _fp16_bits(min_step)
    packed_scales = _six_bit_scales_and_mins(scale_codes, min_codes)
    scale_codes, min_codes = _unpack_six_bit_scales_and_mins(packed_scales)
    step = _fp16_value(d)[:, None] * scale_codes.astype(F32)
    offset = _fp16_value(dmin)[:, None] * min_codes.astype(F32)
    levels = _requantized_levels(blocks.reshape(n, 8, 32), step, offset, 0, nmax, _per_super_block(levels, n))
    return d, dmin, packed_scales, levels.reshape(n, 4, 2, 32)


def _quantize_q4_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, 4-bit levels, 6-bit scales and mins, fp16 ``d`` and ``dmin``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, importance, 15, -1.0, 20)
    qs = _pack_bits(levels, 4)
    return _as_bytes(d, dmin, packed_scales, qs)


def _quantize_q5_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_K: as Q4_K with 5-bit levels, the fifth bits gathered in ``qh``."""
    d, dmin, packed_scales, levels = _q45_k_levels(blocks, importance, 31, -0.5, 15)
    n = len(blocks)
    qh = _pack_bits((levels > 15).reshape(n, 8, 32), 1)
    qs = _pack_bits(levels & 0xF, 4)
    return _as_bytes(d, dmin, packed_scales, qh, qs)


def _quantize_q6_k(blocks: np.ndarray, importance: np.ndarray | None, _row_mean_square: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, 6-bit levels, signed 8-bit scales, fp16 ``d``."""
    n = len(blocks)
    weights = None if importance is None else _sub_blocks(importance, 16)
    scales, levels = _make_qx_quants(_sub_blocks(blocks, 16), 32, weights)
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


_K_QUANTIZERS: dict[gguf.GGMLQuantizationType, BlockQuantizer] = {
    Q.Q2_K: _quantize_q2_k,
    Q.Q3_K: _quantize_q3_k,
    Q.Q4_K: _quantize_q4_k,
    Q.Q5_K: _quantize_q5_k,
    Q.Q6_K: _quantize_q6_k,
}


# ---------------------------------------------------------------- legacy types with an importance matrix


def _legacy_weights(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Per-value weights ``[32, m]`` of the weighted legacy quantizers: importance times ``sqrt(σ² + x²)``,
    σ² the mean square of the block's row."""
    weights = importance * np.sqrt(row_mean_square[:, None] + blocks * blocks)
    return np.ascontiguousarray(weights.T)


def _fifth_bits(levels: np.ndarray) -> np.ndarray:
    """The fifth bit of each of the 32 levels ``[m, 32]``, as one little-endian 32-bit word ``[m, 4]``."""
    bits = ((levels >> 4) & 1).reshape(len(levels), 4, 8).transpose(0, 2, 1)
    return _pack_bits(bits, 1)


def _quantize_q4_0_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_0 with an importance matrix: a searched signed scale per block of 32, 4-bit levels."""
    x = np.ascontiguousarray(blocks.T)
    scale, levels = _make_qx_quants(x, 8, _legacy_weights(blocks, importance, row_mean_square))
    levels = levels.T
    return _as_bytes(_fp16_bits(scale), _pack_bits(levels.reshape(-1, 2, 16), 4))


def _quantize_q5_0_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_0 with an importance matrix: as Q4_0 with 5-bit levels, fifth bits in ``qh``."""
    x = np.ascontiguousarray(blocks.T)
    scale, levels = _make_qx_quants(x, 16, _legacy_weights(blocks, importance, row_mean_square))
    levels = levels.T
    return _as_bytes(_fp16_bits(scale), _fifth_bits(levels), _pack_bits((levels & 0xF).reshape(-1, 2, 16), 4))


def _quantize_q4_1_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q4_1 with an importance matrix: searched scale and min per block of 32, 4-bit levels."""
    x, weights = np.ascontiguousarray(blocks.T), _legacy_weights(blocks, importance, row_mean_square)
    scale, the_min, levels = _make_qkx_quants(x, weights, 15, -0.9, 0.05, 36, False)
    levels = levels.T
    return _as_bytes(_fp16_bits(scale), _fp16_bits(-the_min), _pack_bits(levels.reshape(-1, 2, 16), 4))


def _quantize_q5_1_weighted(blocks: np.ndarray, importance: np.ndarray, row_mean_square: np.ndarray) -> np.ndarray:
    """Q5_1 with an importance matrix: as Q4_1 with 5-bit levels, fifth bits in ``qh``."""
    x, weights = np.ascontiguousarray(blocks.T), _legacy_weights(blocks, importance, row_mean_square)
    scale, the_min, levels = _make_qkx_quants(x, weights, 31, -0.9, 0.05, 36, False)
    levels = levels.T
    return _as_bytes(_fp16_bits(scale), _fp16_bits(-the_min), _fifth_bits(levels),
                     _pack_bits((levels & 0xF).reshape(-1, 2, 16), 4))  # fmt: skip


_WEIGHTED_LEGACY_QUANTIZERS: dict[gguf.GGMLQuantizationType, BlockQuantizer] = {
    Q.Q4_0: _quantize_q4_0_weighted,
    Q.Q4_1: _quantize_q4_1_weighted,
    Q.Q5_0: _quantize_q5_0_weighted,
    Q.Q5_1: _quantize_q5_1_weighted,
}

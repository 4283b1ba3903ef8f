"""Float32 helpers of the GGUF quantizers that reproduce ggml's C arithmetic exactly.

For the bytes to be ggml's, rounding is half to even as in ``nearest_int``, block scales round to
fp16 as in ``GGML_FP32_TO_FP16``, and sums run in C's element order (:func:`running_sum`), since
float32 addition is not associative and a pairwise sum would move ties in the rounding. Besides
rounding and bit packing, this holds ggml's scale searches (``make_qkx2/3_quants``,
``make_qx_quants``, ``make_q3_quants``, ``make_qp_quants``), run on every sub-block of a chunk at
once: arrays are laid out ``[position, sub-block]``, so that a sum over the 16 or 32 positions of a
sub-block is a short loop of whole-row additions.
"""

from __future__ import annotations

import numpy as np

ALL_ZERO_EPS = np.float32(1e-15)
_ROUNDING_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low bits
_EXACT_SUM_RANGE = np.float32(2**22)  # |result| below it: the magic sum stays in [2**23, 2**24)
_RINT_IS_EXACT = np.float32(2**21)  # well inside the 2**22 range where the magic addition rounds like rint
F32 = np.float32


# ---------------------------------------------------------------- float32 helpers matching C


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even through the float32 magic-number addition (int32)."""
    shifted = (values.astype(F32, copy=False) + _ROUNDING_MAGIC).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def rounded(values: np.ndarray) -> np.ndarray:
    """``nearest_int`` of float32 ``values`` as float32 (``values`` is reused).

    Adding the magic number and subtracting it again is the rounding itself wherever the sum stays
    in ``[2**23, 2**24)``, that is where the result lies in ``[-2**22, 2**22)``; anything else (huge or
    non-finite values) takes the bit trick, whose results there are C's too.
    """
    np.add(values, _ROUNDING_MAGIC, out=values)
    np.subtract(values, _ROUNDING_MAGIC, out=values)
    if values.size and not (values.min() >= -_EXACT_SUM_RANGE and values.max() < _EXACT_SUM_RANGE):
        np.add(values, _ROUNDING_MAGIC, out=values)  # the sums again, then their bits
        values[...] = (values.view(np.int32) & 0x007FFFFF) - 0x00400000
    return values


def nearest_levels(scaled: np.ndarray, low: int, high: int, largest: np.ndarray) -> np.ndarray:
    """``nearest_int`` of float32 ``scaled`` clamped to ``low..high``, as float32, written into ``scaled``.

    ``largest`` bounds ``|scaled|`` per column. Below 2**21 the magic-number rounding is exactly
    ``rint`` (round half to even), which numpy does in one pass; otherwise the bit trick is emulated.
    """
    if bool(np.all(largest < _RINT_IS_EXACT)):
        np.rint(scaled, out=scaled)
        return np.clip(scaled, low, high, out=scaled)
    scaled[...] = np.clip(nearest_int(scaled), low, high)
    return scaled


def running_sum(terms: np.ndarray) -> np.ndarray:
    """Float32 sum over axis 0 in index order, as a C loop ``s += t[i]`` computes it.

    numpy sums pairwise only along the axis its inner loop runs on; reducing axis 0 of a C-ordered
    array of two or more columns runs the inner loop along the columns, so each column is summed in
    index order, in one call instead of one per row. Other layouts take the explicit loop.
    """
    if terms.ndim == 2 and terms.shape[1] > 1 and terms.flags.c_contiguous:
        return np.add.reduce(terms, axis=0)
    total = terms[0].copy()
    for term in terms[1:]:
        total += term
    return total


def fp16_bits(values: np.ndarray) -> np.ndarray:
    """IEEE half bits of float32 ``values``, rounded to nearest even like ``GGML_FP32_TO_FP16``."""
    return values.astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """The float32 value of IEEE half ``bits``."""
    return bits.view(np.float16).astype(F32)


def first_largest_magnitude(values: np.ndarray, axis: int) -> np.ndarray:
    """The value of largest magnitude along ``axis`` of 2-D ``values``, the first one on ties (a C ``>`` scan).

    The largest and the smallest value settle it unless the magnitude occurs with both signs (or is
    zero); only those lines are searched for their first largest magnitude. A C scan passes over NaN (a
    scale whose sums overflowed), so lines holding one are settled again with their NaNs as zeros.
    """
    high, low = values.max(axis=axis), values.min(axis=axis)
    result = np.where(-low > high, low, high)
    with_nan = np.flatnonzero(np.isnan(result))
    if with_nan.size:
        lines = np.take(values, with_nan, axis=1 - axis)
        result[with_nan] = first_largest_magnitude(np.where(np.isnan(lines), F32(0), lines), axis)
    even = np.flatnonzero(-low == high)
    if even.size:
        lines = np.take(values, even, axis=1 - axis)
        index = np.expand_dims(np.argmax(np.abs(lines), axis=axis), axis)
        result[even] = np.take_along_axis(lines, index, axis=axis).squeeze(axis)
    return result


def sub_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    """Super-blocks ``[n, 256]`` as ``[size, n * 256 // size]``: positions along axis 0."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def per_super_block(per_sub_block: np.ndarray, n_blocks: int) -> np.ndarray:
    """``[position, sub-block]`` or ``[sub-block]`` arrays regrouped as ``[n, subs, ...]`` per super-block."""
    if per_sub_block.ndim == 1:
        return per_sub_block.reshape(n_blocks, -1)
    return per_sub_block.T.reshape(n_blocks, -1, per_sub_block.shape[0])


def pack_bits(levels: np.ndarray, width: int) -> np.ndarray:
    """OR ``levels[..., k, :] << (width * k)`` over axis -2: several small fields in each byte."""
    packed = np.zeros(levels.shape[:-2] + levels.shape[-1:], np.uint8)
    for k in range(levels.shape[-2]):
        packed |= (levels[..., k, :].astype(np.uint8) << (width * k)).astype(np.uint8)
    return packed


def as_bytes(*fields: np.ndarray) -> np.ndarray:
    """Per-block fields (``[n, ...]`` of any dtype) laid end to end as ``[n, block_bytes]`` uint8."""
    n_blocks = fields[0].shape[0]
    return np.concatenate([np.ascontiguousarray(f).view(np.uint8).reshape(n_blocks, -1) for f in fields], axis=1)


# ---------------------------------------------------------------- scale searches


def make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and levels ``0..nmax`` of each sub-block (columns of ``x``) for ``x ≈ scale * L - min``:
    ggml's ``make_qkx2_quants``, and ``make_qkx3_quants`` too when weights are given.

    Tries ``nstep + 1`` inverse scales around ``nmax / (max - min)``, fits scale and min to each
    rounding by weighted least squares, and keeps the one of least weighted error (absolute with
    ``use_mad``, squared otherwise). Each trial starts from the min found so far. Returns
    ``(scale, the_min, levels)``.
    """
    low = x.min(axis=0)
    zero = np.flatnonzero(low == 0)
    if zero.size:  # C's scan keeps the first zero it meets, sign and all, and the sign is stored
        low[zero] = x[np.argmax(x[:, zero] == 0, axis=0), zero]
    low = np.where(low > 0, F32(0), low)
    high = x.max(axis=0)
    flat = high == low  # constant sub-blocks: no scale; a unit span keeps their arithmetic finite
    sum_w = running_sum(weights)
    sum_x = running_sum(weights * x)
    work, trial, weighted_levels = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    magnitude = np.maximum(np.abs(high), np.abs(low))  # bounds |x - offset| with |offset|

    def levels_for(inverse_scale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.multiply(inverse_scale, np.subtract(x, offset, out=out), out=out)
        largest = np.abs(inverse_scale) * (magnitude + np.abs(offset))
        return nearest_levels(out, 0, nmax, largest)

    def error_of(scale: np.ndarray, offset: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = np.subtract(np.add(np.multiply(scale, levels, out=work), offset, out=work), x, out=work)
        diff = np.abs(diff, out=work) if use_mad else np.multiply(diff, diff, out=work)
        return running_sum(np.multiply(diff, weights, out=work))

    def span_from(offset: np.ndarray) -> np.ndarray:
        span = high - offset
        span[flat] = 1
        return span

    offset = low.copy()
    inverse = F32(nmax) / span_from(offset)
    scale = F32(1) / inverse
    best_error = error_of(scale, offset, levels_for(inverse, offset, trial))
    chosen_inverse, chosen_offset = inverse.copy(), offset.copy()  # the rounding whose levels are returned
    for step in range(nstep + 1):
        inverse = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span_from(offset)
        levels_for(inverse, offset, trial)
        np.multiply(weights, trial, out=weighted_levels)
        sum_l = running_sum(weighted_levels)
        sum_l2 = running_sum(np.multiply(weighted_levels, trial, out=work))
        sum_xl = running_sum(np.multiply(weighted_levels, x, out=work))
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = trial_offset > 0
        trial_offset[clamp] = 0
        np.divide(sum_xl, sum_l2, out=trial_scale, where=clamp)
        trial_error = error_of(trial_scale, trial_offset, trial)
        better = trial_error < best_error
        better &= det > 0
        np.copyto(best_error, trial_error, where=better)
        np.copyto(chosen_inverse, inverse, where=better)
        np.copyto(chosen_offset, offset, where=better)
        np.copyto(scale, trial_scale, where=better)
        np.copyto(offset, trial_offset, where=better)
    levels = levels_for(chosen_inverse, chosen_offset, trial)
    scale = np.where(flat, F32(0), scale)
    levels[:, flat] = 0
    offset = np.where(flat, low, offset)
    return scale, -offset, levels.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Signed scale and levels ``0..2*nmax-1`` (offset by ``nmax``) of each sub-block (columns of ``x``),
    weighted by ``weights`` or by ``x²`` without them.

    Tries 18 inverse scales around ``nmax / max|x|`` and keeps the least-squares scale of the
    rounding that explains most weighted energy. Returns ``(scale, levels)``.
    """
    peak = first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)  # their result is zero anyway; keeps the arithmetic finite
    weights = x * x if weights is None else weights
    weighted_x = weights * x
    work, trial = np.empty_like(x), np.empty_like(x)

    def signed_levels(inverse_scale: np.ndarray) -> np.ndarray:
        scaled = np.multiply(inverse_scale, x, out=trial)
        return nearest_levels(scaled, -nmax, nmax - 1, np.abs(inverse_scale * peak))

    def fit(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sum_lx = running_sum(np.multiply(weighted_x, levels, out=work))
        sum_l2 = running_sum(np.multiply(np.multiply(weights, levels, out=work), levels, out=work))
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
        better = sum_lx * sum_lx > best * sum_l2
        better &= sum_l2 > 0
        np.copyto(chosen_inverse, inverse, where=better)
        np.divide(sum_lx, sum_l2, out=scale, where=better)
        np.multiply(scale, sum_lx, out=best, where=better)
    levels = signed_levels(chosen_inverse) + F32(nmax)
    scale = np.where(all_zero, F32(0), scale)
    levels[:, all_zero] = 0
    return scale, levels.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed scale and levels ``0..2*nmax-1`` of each sub-block, refined value by value (weights ``x²``).

    Starts from rounding at ``nmax / max|x|``; then, up to five sweeps, moves each level to the one
    the current fit prefers when that raises the explained weighted energy. A sub-block whose sweep
    changed nothing would change nothing again, so later sweeps only visit those that changed.
    Returns ``(scale, levels)``.
    """
    peak = first_largest_magnitude(x, axis=0)
    all_zero = np.abs(peak) < ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)  # their result is zero anyway; keeps the arithmetic finite
    weights = x * x
    weighted_x = weights * x
    inverse = F32(-nmax) / peak
    levels = nearest_levels(inverse * x, -nmax, nmax - 1, np.abs(inverse * peak))
    sum_lx = running_sum(weighted_x * levels)
    sum_l2 = running_sum(weights * levels * levels)
    # C returns before refining all-zero sub-blocks (their sums are zero: 0/0 proposals). A positive peak
    # gives every value a level of the opposite sign, so every term of sum_lx is at most zero, and so is
    # every sum_lx less one term (float32 rounding is monotonic): no proposal passes C's sum_lx > 0.
    active = np.flatnonzero(~all_zero & ~((peak > 0) & np.isfinite(peak)))
    values = np.take(x, active, axis=1)  # the sweeps run on the sub-blocks still refined, gathered
    weight = values * values
    level, weighted = np.take(levels, active, axis=1), weight * values
    lx, l2 = sum_lx[active], sum_l2[active]
    for _sweep in range(5):
        if not active.size:
            break
        level, lx, l2, changed = _q3_sweep(values, weight, weighted, level, lx, l2, nmax)
        moved = np.flatnonzero(changed)
        active, lx, l2 = active[moved], lx[moved], l2[moved]
        values, weight, weighted, level = (np.take(a, moved, axis=1) for a in (values, weight, weighted, level))
        levels[:, active], sum_lx[active], sum_l2[active] = level, lx, l2
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
    """One pass of :func:`make_q3_quants`' refinement over the positions, in order.

    Returns the updated ``(levels, sum_lx, sum_l2)`` (updated in place) and which sub-blocks changed.
    Every step writes into buffers allocated once, as this loop runs 16 times per sweep.
    """
    count = x.shape[1]
    changed = np.zeros(count, bool)
    accept, flag = np.empty(count, bool), np.empty(count, bool)
    without_lx, without_l2, proposal, with_lx, with_l2, term, other = (np.empty(count, F32) for _ in range(7))
    low, high = F32(-nmax), F32(nmax - 1)
    for i in range(x.shape[0]):
        level, weight, weighted = levels[i], weights[i], weighted_x[i]
        np.subtract(sum_lx, np.multiply(weighted, level, out=term), out=without_lx)
        np.multiply(np.multiply(weight, level, out=term), level, out=term)
        np.subtract(sum_l2, term, out=without_l2)
        np.divide(np.multiply(x[i], without_l2, out=proposal), without_lx, out=proposal)
        np.rint(proposal, out=proposal)  # nearest_int wherever the result lies in [-2**22, 2**22)
        if not (proposal.min() >= -_EXACT_SUM_RANGE and proposal.max() < _EXACT_SUM_RANGE):
            proposal[...] = rounded(x[i] * without_l2 / without_lx)  # huge or non-finite quotients
        np.clip(proposal, low, high, out=proposal)
        np.add(without_lx, np.multiply(weighted, proposal, out=term), out=with_lx)
        np.multiply(np.multiply(weight, proposal, out=term), proposal, out=term)
        np.add(without_l2, term, out=with_l2)
        np.multiply(np.multiply(with_lx, with_lx, out=term), sum_l2, out=term)
        np.multiply(np.multiply(sum_lx, sum_lx, out=other), with_l2, out=other)
        np.greater(term, other, out=accept)
        accept &= np.greater(without_lx, 0, out=flag)
        accept &= np.not_equal(proposal, level, out=flag)
        accept &= np.greater(with_l2, 0, out=flag)
        np.copyto(level, proposal, where=accept)
        np.copyto(sum_lx, with_lx, where=accept)
        np.copyto(sum_l2, with_l2, where=accept)
        changed |= accept
    return levels, sum_lx, sum_l2, changed


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and codes ``0..nmax`` of non-negative values (columns of ``x``, e.g. the sub-block scales
    of each super-block) for ``x ≈ scale * code``, weighted by ``weights``. Returns ``(scale, codes)``.

    Picks the best of 9 inverse scales around ``nmax / max x`` by weighted squared error, then
    refines code by code as :func:`make_q3_quants` does. Codes are stored as bytes, wrapping as C does.
    """
    peak = np.maximum(x.max(axis=0), F32(0))
    all_zero = peak < ALL_ZERO_EPS
    peak = np.where(all_zero, F32(1), peak)
    weighted_x = weights * x

    def squared_error(scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = x - scale * levels
        return running_sum(weights * diff * diff)

    inverse = F32(nmax) / peak
    best_error = squared_error(F32(1) / inverse, (nearest_int(inverse * x) & 0xFF).astype(F32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_inverse = (F32(0.1) * F32(step) + F32(nmax)) / peak
        trial = np.minimum(nearest_int(trial_inverse * x), nmax).astype(F32)
        trial_error = squared_error(F32(1) / trial_inverse, trial)
        better = trial_error < best_error
        best_error = np.where(better, trial_error, best_error)
        inverse = np.where(better, trial_inverse, inverse)
    signed = np.minimum(nearest_int(inverse * x), nmax).astype(F32)
    sum_lx = running_sum(weighted_x * signed)
    sum_l2 = running_sum(weights * signed * signed)
    codes = (signed.astype(np.int32) & 0xFF).astype(F32)
    for _sweep in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            code = codes[i]
            without_lx = sum_lx - weighted_x[i] * code
            without_l2 = sum_l2 - weights[i] * code * code
            proposal = np.minimum(nearest_int(x[i] * without_l2 / without_lx), nmax).astype(F32)
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


def requantized_levels(
    x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, low: int, high: int, fallback: np.ndarray
) -> np.ndarray:
    """Levels ``round((x + offset) / step)`` (``round(x / step)`` without ``offset``) clamped to ``low..high``,
    shifted to start at 0; ``fallback`` where ``step`` is zero. ``x`` is ``[n, subs, size]``, ``step`` and
    ``offset`` ``[n, subs]``."""
    usable = step != 0
    divisor = np.where(usable, step, F32(1))[..., None]  # a zero step's levels are the fallback's
    scaled = np.divide(x, divisor) if offset is None else np.add(x, offset[..., None])
    if offset is not None:
        scaled /= divisor
    levels = np.clip(rounded(scaled), low, high, out=scaled)
    levels -= F32(low)
    return np.where(usable[..., None], levels, fallback).astype(np.uint8)

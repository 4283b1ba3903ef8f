"""The quantizers that need no search: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 without an importance matrix.

Each writes the bytes of ggml's reference quantizer for its type (``quantize_row_*_ref``, and ggml's
fp32 to fp16/bf16 conversions): a block's scale from its extreme values, then each value scaled,
offset and truncated to an integer in float32 exactly as the C code does. The work runs over
:data:`PIECE_VALUES` values at a time, so that a piece and its temporaries stay in cache, and uses
torch where its CPU kernels beat numpy (the fp16/bf16 conversions and per-block maxima), on
:data:`TORCH_VALUES` values per call: below torch's parallel grain, so torch computes on the calling
thread and the number of threads busy is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

F32 = np.float32

TORCH_VALUES = (1 << 15) - 256
"""Values per torch call: whole blocks of every type, and fewer than torch's parallel grain (32768
elements), below which a torch kernel runs on the calling thread alone."""

PIECE_VALUES = 8 * TORCH_VALUES
"""Values quantized at a time (about 1 MiB of float32): numpy's fixed cost per call is small next to the
work, and a piece and its temporaries stay within the last-level cache (measured: 1.1-1.4x faster than a
quarter of it, the same as twice it)."""

_HALF_BELOW = F32(np.nextafter(F32(0.5), F32(0)))
"""The float32 just below 0.5: ``trunc(v + copysign(it, v))`` is C's ``roundf`` (half away from zero) for
every float32 ``v``, where adding exactly 0.5 would round 0.49999997 up."""


def _converted(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The bits of float32 ``values`` converted by torch to 16-bit ``dtype``, :data:`TORCH_VALUES` per call."""
    result = np.empty(values.shape, np.int16)
    tensor, out = torch.from_numpy(values), torch.from_numpy(result).view(dtype)
    for start in range(0, len(values), TORCH_VALUES):
        out[start : start + TORCH_VALUES] = tensor[start : start + TORCH_VALUES]
    return result


def quantize_f16(values: np.ndarray) -> np.ndarray:
    """IEEE half bits of float32 ``values`` (round to nearest even, subnormals kept, inf beyond the range)."""
    return _converted(values, torch.float16)


def quantize_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of finite float32 ``values``: the upper half rounded to nearest even, as
    ``ggml_compute_fp32_to_bf16`` does (subnormals too)."""
    return _converted(values, torch.bfloat16)


def _torch_rows(reduce: Callable[..., torch.Tensor], blocks: np.ndarray) -> np.ndarray:
    """``reduce(rows, dim=1, out=...)`` of the rows of ``blocks``, :data:`TORCH_VALUES` values per call."""
    result = np.empty(len(blocks), blocks.dtype)
    tensor, out = torch.from_numpy(blocks), torch.from_numpy(result)
    step = TORCH_VALUES // blocks.shape[1]
    for start in range(0, len(blocks), step):
        reduce(tensor[start : start + step], dim=1, out=out[start : start + step])
    return result


def _maxima(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest value of each block (rows of ``blocks``)."""
    return _torch_rows(torch.amax, blocks), _torch_rows(torch.amin, blocks)


def _first_largest_magnitude(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, the first one on ties, ``+0.0`` in an all-zero block:
    the ``amax < fabsf(v)`` scan of ggml's Q4_0/Q5_0."""
    high, low = _maxima(blocks)
    minus_low = -low
    signed = np.where(minus_low > high, low, high)
    even = np.flatnonzero(minus_low == high)  # +a and -a both occur, or the block is all zeros
    if even.size:
        first = np.argmax(np.abs(blocks[even]), axis=1)
        signed[even] = blocks[even, first] + F32(0)  # the scan keeps its starting +0.0 in an all-zero block
    return signed


def _inverse(step: np.ndarray) -> np.ndarray:
    """``step ? 1/step : 0`` per block, as a column for broadcasting."""
    inverse = F32(1) / step  # the caller ignores division by zero
    inverse[step == 0] = 0
    return inverse[:, None]


# Byte-wise work runs on the levels viewed as 64-bit words, eight levels each (little-endian: level j of a
# word in byte j), so that numpy runs long vector loops instead of one short one per block.
_BYTES_OF = {bit: np.uint64(0x0101010101010101 << bit) for bit in range(8)}
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_GATHER_BITS = np.uint64(0x0102040810204080)  # times eight 0/1 bytes: byte j's bit lands on bit 56 + j
_SHIFT = {bits: np.uint64(bits) for bits in (4, 5, 56)}


def _levels(scaled: np.ndarray, offset: float, top_bit: int | None) -> np.ndarray:
    """``MIN(2**top_bit - 1, (int8_t)(scaled + offset))`` (no ``MIN`` when ``top_bit`` is None) of float32
    ``scaled`` ``[m, 32]`` (reused), for sums in ``0..2**top_bit``, as uint64 words ``[m, 4]``."""
    scaled += F32(offset)
    levels = scaled.astype(np.int8).view(np.uint64)
    if top_bit is not None:  # only 2**top_bit exceeds the range: subtract its single set bit
        levels -= (levels >> _SHIFT[top_bit]) & _BYTES_OF[0]
    return levels


def _header(*fields: np.ndarray) -> np.ndarray:
    """Per-block float32 ``fields`` as consecutive fp16 values ``[m, 2 * len(fields)]`` uint8 (inf past the
    fp16 range, as ggml writes)."""
    return _converted(np.stack(fields, axis=1).reshape(-1), torch.float16).view(np.uint8).reshape(len(fields[0]), -1)


def _laid_end_to_end(*parts: np.ndarray) -> np.ndarray:
    """Per-block byte fields (``[m, k]`` uint8 arrays, C order) as one ``[m, sum k]`` array. Each field is
    copied as one opaque ``k``-byte item per block, which numpy does far faster than a 2-D copy."""
    record = np.dtype([(f"f{i}", f"V{part.shape[1]}") for i, part in enumerate(parts)])
    out = np.empty(len(parts[0]), record)
    for i, part in enumerate(parts):
        out[f"f{i}"] = np.ascontiguousarray(part).view(f"V{part.shape[1]}").reshape(-1)
    return out.view(np.uint8).reshape(len(parts[0]), record.itemsize)


def _blocks_out(header: np.ndarray, levels: np.ndarray, fifth_bits: bool) -> np.ndarray:
    """Block bytes: ``header``; with ``fifth_bits``, bit 4 of each of the 32 levels as a little-endian 32-bit
    word (ggml's ``qh``); then the levels' low nibbles two per byte (value ``j`` low, ``j + 16`` high)."""
    nibbles = (levels & _LOW_NIBBLES if fifth_bits else levels).view(np.uint8).view("V16")
    # each half of a block (16 levels) copied out whole: an OR of the two strided halves runs per block
    low, high = (np.ascontiguousarray(nibbles[:, half]).view(np.uint64) for half in (0, 1))
    high <<= _SHIFT[4]
    packed = (low | high).reshape(len(levels), 2)
    parts = [header]
    if fifth_bits:
        fifth = (levels >> _SHIFT[4]) & _BYTES_OF[0]
        parts.append(((fifth * _GATHER_BITS) >> _SHIFT[56]).astype(np.uint8))
    parts.append(packed.view(np.uint8))
    return _laid_end_to_end(*parts)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    step = _torch_rows(torch.amax, np.abs(blocks)) / F32(127)
    scaled = blocks * _inverse(step)
    half = scaled.view(np.uint32) & np.uint32(0x80000000)
    half |= _HALF_BELOW.view(np.uint32)
    scaled += half.view(F32)  # then truncating is roundf
    return _laid_end_to_end(_header(step), scaled.astype(np.int8).view(np.uint8))


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    step = _first_largest_magnitude(blocks) / F32(-8)
    return _blocks_out(_header(step), _levels(blocks * _inverse(step), 8.5, 4), False)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    step = _first_largest_magnitude(blocks) / F32(-16)
    return _blocks_out(_header(step), _levels(blocks * _inverse(step), 16.5, 5), True)


def _first_minimum(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest value of each block; a smallest value of zero carries the sign of the block's first
    zero, as ggml's Q4_1/Q5_1 scan (``v < min``) keeps it, and it is stored."""
    high, low = _maxima(blocks)
    zero = np.flatnonzero(low == 0)
    if zero.size:
        low[zero] = blocks[zero, np.argmax(blocks[zero] == 0, axis=1)]
    return high, low


def _with_minimum(blocks: np.ndarray, top: int, top_bit: int | None, fifth_bits: bool) -> np.ndarray:
    """Q4_1 (``top`` 15) and Q5_1 (31): a step and the block's minimum, levels ``0..top`` above it."""
    high, low = _first_minimum(blocks)
    step = (high - low) / F32(top)
    step += F32(0)  # C's max and min are the same element in an all-zero block: +0.0, whatever its sign
    shifted = blocks - low[:, None]
    shifted *= _inverse(step)
    return _blocks_out(_header(step, low), _levels(shifted, 0.5, top_bit), fifth_bits)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    return _with_minimum(blocks, 15, 4, False)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    return _with_minimum(blocks, 31, None, True)


PieceQuantizer = Callable[[np.ndarray], np.ndarray]

_BLOCK_QUANTIZERS: dict[str, PieceQuantizer] = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
                                                "Q5_1": _q5_1}
_CONVERSIONS: dict[str, PieceQuantizer] = {"F16": quantize_f16, "BF16": quantize_bf16}

PLAIN_TYPES = frozenset(_BLOCK_QUANTIZERS) | frozenset(_CONVERSIONS)
"""Names of the GGML types this module quantizes."""


def quantize_plain(values: np.ndarray, type_name: str) -> np.ndarray:
    """Bytes of float32 ``values`` (a whole number of 32-value blocks, C order) as GGML type ``type_name``,
    one of :data:`PLAIN_TYPES`, laid end to end."""
    flat = np.ascontiguousarray(values, dtype=F32).reshape(-1)
    if not flat.flags.writeable:  # torch shares only writable memory (it warns otherwise)
        flat = flat.copy()
    convert = _CONVERSIONS.get(type_name)
    blockwise = _BLOCK_QUANTIZERS.get(type_name)
    pieces = []
    # a block of float32 subnormals has an infinite inverse scale, as in C, and its casts go out of range
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start in range(0, flat.size, PIECE_VALUES):
            piece = flat[start : start + PIECE_VALUES]
            if convert is not None:
                pieces.append(convert(piece).view(np.uint8))
            else:
                pieces.append(blockwise(piece.reshape(-1, 32)).reshape(-1))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)

"""Dequantize GGUF tensor data and quantize it back to the same type, byte for byte as llama.cpp does.

A patched GGUF tensor is stored again in the type it came in, and must be the file llama.cpp's own
``llama-quantize`` would have written from the same float values. This module is the public entry
point: it lists the types that can be patched, checks the input, and cuts rows into cache-sized
chunks for the per-type quantizers. F32 is copied. The C quantizers of :mod:`orthopatch.gguf.native`,
with or without an importance matrix, run where they could be built; otherwise F16, BF16 and the
legacy 32-value blocks come from :mod:`orthopatch.gguf.plainquants`, the k-quants and the weighted
legacy types from :mod:`orthopatch.gguf.kquants`: the same bytes either way.
Dequantizing gives gguf-py's values: the C dequantizers where built (bit for bit the same), else gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np

from orthopatch.gguf.blockmath import F32, running_sum
from orthopatch.gguf.kquants import (
    SUPER_BLOCK,
    quantize_q2_k,
    quantize_q3_k,
    quantize_q4_0_weighted,
    quantize_q4_1_weighted,
    quantize_q4_k,
    quantize_q5_0_weighted,
    quantize_q5_1_weighted,
    quantize_q5_k,
    quantize_q6_k,
)
from orthopatch.gguf.native import native_dequantizer, native_quantizer, native_weighted_quantizer
from orthopatch.gguf.plainquants import PLAIN_TYPES, quantize_plain

Q = gguf.GGMLQuantizationType

PATCHABLE_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {
        Q.F32, Q.F16, Q.BF16,
        Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    }
)  # fmt: skip
"""Types :func:`quantize` writes exactly as llama.cpp does, so a tensor of these types can be patched."""

IMATRIX_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
"""Types whose quantizer reads an importance matrix; the other patchable types ignore one."""

NATIVE_DEQUANTIZED: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
"""Types :func:`dequantize` decodes in C where the C code is built: gguf-py's values, bit for bit, several
times faster. F32, F16 and BF16 are one numpy conversion in gguf-py already."""

CHUNK_VALUES = 1024 * SUPER_BLOCK
"""Values the searching quantizers take together: numpy's fixed cost per operation is then small next to
the work, and the arrays stay within the last-level cache (measured best among 16 Ki to 1 Mi values)."""

CHUNK_SCALE = {Q.Q3_K: 2}
"""Types quantized in larger chunks: Q3_K's later refinement sweeps visit few sub-blocks each, at a cost
fixed per sweep, which a larger chunk shares out (measured about 15% faster at twice the size)."""


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of raw tensor bytes ``data`` of type ``qtype``, as an array of torch-order ``shape``.

    The last axis of ``shape`` is ggml's ``ne0``, the one quantization blocks run along.
    """
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, _row_bytes(qtype, shape[-1]))
    built = native_dequantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) if qtype in NATIVE_DEQUANTIZED else None
    values = built(raw) if built is not None else gguf.quants.dequantize(raw, qtype)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None,
             workers: int = 1) -> np.ndarray:
    """Raw bytes ``[rows, row_bytes]`` of float32 ``values`` ``[rows, ne0]`` stored as ``qtype``.

    The bytes are those of ggml's ``ggml_quantize_chunk``. ``imatrix`` is llama.cpp's importance
    matrix entry for the tensor, one weight per column (``ne0`` values): with it the weighted
    quantizers run, as ``llama-quantize --imatrix`` does; F32, F16, BF16 and Q8_0 ignore it, as ggml does.
    With ``workers`` > 1 the rows are cut in that many parts quantized on as many threads (numpy
    releases the GIL in its array operations; each row's bytes depend on that row alone).
    """
    rows = np.ascontiguousarray(values, dtype=np.float32)
    rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows
    # F32 is one copy, bound by memory: threads would only add a second copy of their parts
    if workers > 1 and rows.ndim == 2 and len(rows) > 1 and qtype != Q.F32:
        out = np.empty((len(rows), _row_bytes(qtype, rows.shape[1])), np.uint8)
        bounds = np.linspace(0, len(rows), min(workers, len(rows)) + 1).astype(int).tolist()

        def part(a: int, b: int) -> None:
            out[a:b] = _quantize_rows(rows[a:b], qtype, imatrix)

        with ThreadPoolExecutor(len(bounds) - 2) as pool:
            rest = [pool.submit(part, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
            part(bounds[0], bounds[1])
            for future in rest:
                future.result()
        return out
    return _quantize_rows(values, qtype, imatrix)


def _quantize_rows(values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    """:func:`quantize` on the calling thread."""
    if qtype not in PATCHABLE_TYPES:
        raise ValueError(f"cannot quantize to {qtype.name}: not one of the patchable types")
    rows = np.ascontiguousarray(values, dtype=np.float32)
    rows = rows.reshape(-1, rows.shape[-1])
    block_values, _ = gguf.GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block_values:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_values} values, not {rows.shape[1]}")
    importance = _checked_importance(imatrix, rows.shape[1]) if qtype in IMATRIX_TYPES else None
    weighted = None if importance is None else native_weighted_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
    built = None if importance is not None else native_quantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
    if weighted is not None:
        packed = weighted(rows, importance)
    elif built is not None:
        packed = built(rows)
    elif qtype in _K_QUANTIZERS:
        packed = _quantize_in_chunks(rows, SUPER_BLOCK, _K_QUANTIZERS[qtype], importance,
                                     chunk_values=CHUNK_VALUES * CHUNK_SCALE.get(qtype, 1))
    elif importance is not None:
        packed = _quantize_in_chunks(rows, 32, _WEIGHTED_LEGACY_QUANTIZERS[qtype], importance, row_mean_square=True)
    elif qtype.name in PLAIN_TYPES:
        packed = quantize_plain(rows, qtype.name)
    else:
        packed = rows.copy()
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
    chunk_values: int = CHUNK_VALUES,
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
        row_squares = running_sum(np.ascontiguousarray((rows * rows).T)) / F32(rows.shape[1])
    step = max(1, chunk_values // block_size)
    chunks = []
    with np.errstate(all="ignore"):  # all-zero and flat sub-blocks divide by zero; their results are overridden
        for start in range(0, len(blocks), step):
            index = np.arange(start, min(start + step, len(blocks)))
            weights = None if columns is None else columns[index % per_row]
            chunks.append(quantize_chunk(blocks[start : index[-1] + 1], weights, row_squares[index // per_row]))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.uint8)


_K_QUANTIZERS: dict[gguf.GGMLQuantizationType, BlockQuantizer] = {
    Q.Q2_K: quantize_q2_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
}

_WEIGHTED_LEGACY_QUANTIZERS: dict[gguf.GGMLQuantizationType, BlockQuantizer] = {
    Q.Q4_0: quantize_q4_0_weighted,
    Q.Q4_1: quantize_q4_1_weighted,
    Q.Q5_0: quantize_q5_0_weighted,
    Q.Q5_1: quantize_q5_1_weighted,
}

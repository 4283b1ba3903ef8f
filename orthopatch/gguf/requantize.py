"""A quantized GGUF tensor patched in bounded memory: dequantized, projected in float64, requantized.

Rows of a GGUF tensor (torch order) are whole quantization blocks, so a tensor is handled in chunks
of rows: each is dequantized (gguf-py), projected by the same block kernel as safetensors tensors
(float64 data is computed in float64), rounded to float32 and quantized again to its own type as
llama.cpp's quantizer does. A tensor whose residual axis is the row (the token embedding) needs one
pass; an output projection ``[n_embd, n_in]`` needs ``uᵀW`` over all its rows first, so its chunks
are read twice. Memory: a few chunks, whatever the tensor's size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import gguf
import numpy as np
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.quants import dequantize, quantize
from orthopatch.io.filecopy import pread_into
from orthopatch.patch.kernel import BlockKernel
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.projection import Layout
from orthopatch.patch.stream import Progress, TensorSink

#: float64 values per chunk of rows (whole kernel blocks): 32 MiB.
CHUNK_VALUES = 1 << 22


def _read_rows(fd: int, target: PatchTarget, row_bytes: int, first: int, count: int, path: str) -> np.ndarray:
    raw = bytearray(count * row_bytes)
    try:
        pread_into(fd, memoryview(raw), target.entry.begin + first * row_bytes)
    except (OSError, EOFError) as exc:
        raise OrthopatchError(f"cannot read tensor data ({exc})", path=path, tensor=target.name) from None
    return np.frombuffer(raw, dtype=np.uint8)


def _decoded(fd: int, target: PatchTarget, qtype: gguf.GGMLQuantizationType, layout: Layout, row_bytes: int,
             first: int, count: int, path: str) -> torch.Tensor:
    """Rows ``[first, first + count)`` of the 2-D view, dequantized to float64."""
    raw = _read_rows(fd, target, row_bytes, first, count, path)
    values = dequantize(raw, qtype, (count, layout.width)).astype(np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise OrthopatchError(f"holds {bad:,} non-finite values (NaN or Inf); it is not patched", path=path,
                              tensor=target.name)
    return torch.from_numpy(values)


def _float32(values: torch.Tensor, target: PatchTarget, path: str) -> np.ndarray:
    """The projected values rounded to float32, refused if any overflowed."""
    as_f32 = values.to(torch.float32).numpy()
    if not np.isfinite(as_f32).all():
        raise OrthopatchError("the projection overflows float32", path=path, tensor=target.name)
    return as_f32


def _projected_chunks(fd: int, target: PatchTarget, u: torch.Tensor, kernel: BlockKernel,
                      path: str) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, projected rows in float64)`` for every chunk of ``target``, in order."""
    qtype = gguf.GGMLQuantizationType[target.entry.dtype]
    layout = Layout.of(target.entry.shape, target.axis)
    rows = target.entry.numel // layout.width
    row_bytes = target.entry.nbytes // rows
    block_rows = kernel.block_rows(layout)
    step = max(1, CHUNK_VALUES // max(layout.width, 1) // block_rows) * block_rows
    u = u.to(torch.float64)

    def decoded(first: int, count: int) -> torch.Tensor:
        return _decoded(fd, target, qtype, layout, row_bytes, first, count, path)

    with kernel.running():
        if layout.rowwise:
            for first in range(0, rows, step):
                chunk = decoded(first, min(step, rows - first))
                kernel.rows_(chunk, u, layout)
                yield first, chunk
            return
        for b in range(layout.batches):
            base = b * layout.dim
            sums = kernel.new_sums(layout, torch.float64)
            for start in range(0, layout.dim, step):
                count = min(step, layout.dim - start)
                kernel.accumulate(decoded(base + start, count), u[start:start + count], layout, sums, start)
            coeff, factor = kernel.finish(sums)
            if not bool(torch.isfinite(coeff).all()):
                raise OrthopatchError("the projection overflows (values too large for the arithmetic)", path=path,
                                      tensor=target.name)
            for start in range(0, layout.dim, step):
                count = min(step, layout.dim - start)
                chunk = decoded(base + start, count)
                kernel.columns_(chunk, u[start:start + count], layout, coeff, factor)
                yield base + start, chunk


def patch_quantized(fd: int, target: PatchTarget, u: torch.Tensor, sink: TensorSink, kernel: BlockKernel,
                    on_progress: Progress | None = None, src_path: str | os.PathLike | None = None) -> None:
    """Write ``target`` (a quantized tensor read from ``fd``), projected against ``u``, into ``sink``."""
    qtype = gguf.GGMLQuantizationType[target.entry.dtype]
    path = os.fspath(src_path) if src_path is not None else ""
    row_bytes = target.entry.nbytes // (target.entry.numel // target.entry.shape[-1])
    for first, chunk in _projected_chunks(fd, target, u, kernel, path):
        data = quantize(_float32(chunk, target, path), qtype).tobytes()
        sink.write(target.entry.begin, target.entry.begin + first * row_bytes, memoryview(data))
        if on_progress is not None:
            on_progress(len(data))


def check_quantized(fd: int, target: PatchTarget, u: torch.Tensor, kernel: BlockKernel,
                    src_path: str | os.PathLike | None = None) -> None:
    """Compute ``target`` (a quantized tensor) once and write nothing: raise the error :func:`patch_quantized`
    would raise for non-finite values or a result that overflows, before an in-place run changes a byte."""
    path = os.fspath(src_path) if src_path is not None else ""
    for _, chunk in _projected_chunks(fd, target, u, kernel, path):
        _float32(chunk, target, path)

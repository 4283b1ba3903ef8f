"""A quantized GGUF tensor patched in bounded memory: dequantized, projected in float64, requantized.

Rows of a GGUF tensor (torch order) are whole quantization blocks, so a tensor is handled in chunks
of rows: each is dequantized (gguf-py's values, in C where built), projected by the same block kernel
as safetensors tensors (float64 data is computed in float64), rounded to float32 and quantized again to
its own type as llama.cpp's quantizer does. A tensor whose residual axis is the row (the token embedding) needs one
pass; an output projection ``[n_embd, n_in]`` needs ``uᵀW`` over all its rows first, so its chunks
are read twice. Memory: a few chunks, whatever the tensor's size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import gguf
import numpy as np
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.native import native_checked_copy
from orthopatch.gguf.quants import dequantize, quantize
from orthopatch.io.filecopy import pread_into
from orthopatch.patch.kernel import BlockKernel, default_workers
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.projection import Layout
from orthopatch.patch.stream import Progress, TensorSink

#: float64 values per chunk of rows (whole kernel blocks): 32 MiB.
CHUNK_VALUES = 1 << 22


class _RowParts:
    """Runs a function on ``workers`` row ranges of a chunk at once: helper threads take all but the first,
    which the calling thread does. numpy releases the GIL in its array operations, and each row of a
    quantized tensor is decoded and encoded on its own, so the bytes do not depend on ``workers``."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers - 1) if self.workers > 1 else None

    def run(self, rows: int, part: Callable[[int, int], None]) -> None:
        bounds = np.linspace(0, rows, min(self.workers, max(rows, 1)) + 1).astype(int).tolist()
        rest = [self.pool.submit(part, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)] \
            if self.pool is not None else []
        try:
            part(bounds[0], bounds[1])
        finally:
            for future in rest:
                future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _copy_checked(values: np.ndarray, into: np.ndarray) -> bool:
    """``into[...] = values`` (float32 widened to float64, or float64 rounded to float32), and whether every
    value is finite: one pass in C where it is built (``native_checked_copy``), numpy's two otherwise."""
    copy = native_checked_copy(values.dtype, into.dtype)
    if copy is not None:
        return copy(values, into) == 0
    np.copyto(into, values, casting="same_kind")
    return bool(np.isfinite(values if values.itemsize < into.itemsize else into).all())


def _read_rows(fd: int, target: PatchTarget, row_bytes: int, first: int, count: int, path: str) -> np.ndarray:
    raw = bytearray(count * row_bytes)
    try:
        pread_into(fd, memoryview(raw), target.entry.begin + first * row_bytes)
    except (OSError, EOFError) as exc:
        raise OrthopatchError(f"cannot read tensor data ({exc})", path=path, tensor=target.name) from None
    return np.frombuffer(raw, dtype=np.uint8).reshape(count, row_bytes)


class _Codec:
    """Reads, decodes and encodes the chunks of one quantized tensor: the next chunk's bytes are read on a
    thread while the current one is computed, and decoding and encoding are cut in row ranges."""

    def __init__(self, fd: int, target: PatchTarget, layout: Layout, rows: int, workers: int, path: str,
                 importance: np.ndarray | None = None):
        self.fd, self.target, self.layout, self.path = fd, target, layout, path
        #: llama.cpp's importance weights, ``[n_expert, row width]``: row ``r`` uses slice ``r // (rows / n_expert)``.
        self.importance = importance
        self.rows_per_expert = rows // len(importance) if importance is not None else rows
        self.qtype = gguf.GGMLQuantizationType[target.entry.dtype]
        self.row_bytes = target.entry.nbytes // rows
        self.parts = _RowParts(workers)
        self.reader = ThreadPoolExecutor(1)
        self.pending: tuple[int, int, Future[np.ndarray]] | None = None
        self._buffers: dict[str, np.ndarray] = {}

    def prefetch(self, first: int, count: int) -> None:
        """Start reading rows ``[first, first + count)``, the chunk :meth:`decoded` will be asked for next."""
        future = self.reader.submit(_read_rows, self.fd, self.target, self.row_bytes, first, count, self.path)
        self.pending = (first, count, future)

    def decoded(self, first: int, count: int) -> torch.Tensor:
        """Rows ``[first, first + count)`` of the 2-D view, dequantized to float64."""
        if self.pending is not None and self.pending[:2] == (first, count):
            raw = self.pending[2].result()
        else:
            raw = _read_rows(self.fd, self.target, self.row_bytes, first, count, self.path)
        self.pending = None
        values = self._reused("decoded", (count, self.layout.width), np.float64)
        finite: list[bool] = []

        def part(a: int, b: int) -> None:
            finite.append(_copy_checked(dequantize(raw[a:b], self.qtype, (b - a, self.layout.width)), values[a:b]))

        self.parts.run(count, part)
        if not all(finite):
            bad = int((~np.isfinite(values)).sum())
            raise OrthopatchError(f"holds {bad:,} non-finite values (NaN or Inf); it is not patched", path=self.path,
                                  tensor=self.target.name)
        return torch.from_numpy(values)

    def encoded(self, values: torch.Tensor, first: int = 0) -> np.ndarray:
        """``values`` (rows from ``first`` on) rounded to float32 and quantized to the tensor's type, each row
        with its expert's importance weights: raw bytes ``[rows, row_bytes]``."""
        rows = values.numpy()
        out = np.empty((len(rows), self.row_bytes), np.uint8)
        rounded = self._reused("rounded", rows.shape, np.float32)
        finite: list[bool] = []

        def part(a: int, b: int) -> None:
            as_f32 = rounded[a:b]
            finite.append(_copy_checked(rows[a:b], as_f32))
            if finite[-1]:
                for lo, hi, weights in self._by_expert(first + a, first + b):
                    out[lo - first:hi - first] = quantize(as_f32[lo - first - a:hi - first - a], self.qtype, weights)

        self.parts.run(len(rows), part)
        if not all(finite):
            raise OrthopatchError("the projection overflows float32", path=self.path, tensor=self.target.name)
        return out

    def _reused(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """A buffer of ``shape`` kept for the next chunk: a new 32 MiB array per chunk costs a page fault per
        page. The chunk :meth:`decoded` returns is used up (projected and encoded) before the next is decoded."""
        size = shape[0] * shape[1]
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)

    def _by_expert(self, a: int, b: int) -> list[tuple[int, int, np.ndarray | None]]:
        """Rows ``[a, b)`` cut where the expert changes, each piece with its importance weights (or None)."""
        if self.importance is None:
            return [(a, b, None)]
        per = self.rows_per_expert
        cuts = [a, *range((a // per + 1) * per, b, per), b]
        return [(lo, hi, self.importance[lo // per]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]

    def checked(self, values: torch.Tensor) -> None:
        """Refuse ``values`` that overflow float32 (what :meth:`encoded` would refuse), encoding nothing."""
        if not np.isfinite(values.numpy().astype(np.float32)).all():
            raise OrthopatchError("the projection overflows float32", path=self.path, tensor=self.target.name)

    def close(self) -> None:
        self.reader.shutdown()
        self.parts.close()


def _projected(fd: int, target: PatchTarget, u: torch.Tensor, kernel: BlockKernel, path: str,
               emit: Callable[[_Codec, int, torch.Tensor], None], importance: np.ndarray | None = None) -> None:
    """Project every chunk of ``target`` and hand it to ``emit`` (with the codec and its first row), in order.

    Decoding and encoding run on the kernel's worker count of threads (:class:`_RowParts`; on a GPU, the
    CPU's default count), and the next chunk's bytes are read while one is computed."""
    layout = Layout.of(target.entry.shape, target.axis)
    rows = target.entry.numel // layout.width
    block_rows = kernel.block_rows(layout)
    step = max(1, CHUNK_VALUES // max(layout.width, 1) // block_rows) * block_rows
    u = u.to(torch.float64)
    workers = kernel.workers if kernel.device.type == "cpu" else default_workers("cpu")
    codec = _Codec(fd, target, layout, rows, workers, path, importance)
    if layout.rowwise:
        order = [(first, min(step, rows - first)) for first in range(0, rows, step)]
    else:
        one_pass = [(start, min(step, layout.dim - start)) for start in range(0, layout.dim, step)]
        order = [(b * layout.dim + start, count) for b in range(layout.batches) for _ in range(2)
                 for start, count in one_pass]
    upcoming = iter(order[1:])

    def next_chunk(first: int, count: int) -> torch.Tensor:
        chunk = codec.decoded(first, count)
        following = next(upcoming, None)
        if following is not None:
            codec.prefetch(*following)
        return chunk

    try:
        with kernel.running():
            if layout.rowwise:
                for first, count in order:
                    chunk = next_chunk(first, count)
                    kernel.rows_(chunk, u, layout)
                    emit(codec, first, chunk)
                return
            for b in range(layout.batches):
                base = b * layout.dim
                sums = kernel.new_sums(layout, torch.float64)
                for start, count in one_pass:
                    chunk = next_chunk(base + start, count)
                    kernel.accumulate(chunk, u[start:start + count], layout, sums, start)
                coeff, factor = kernel.finish(sums)
                if not bool(torch.isfinite(coeff).all()):
                    raise OrthopatchError("the projection overflows (values too large for the arithmetic)",
                                          path=path, tensor=target.name)
                for start, count in one_pass:
                    chunk = next_chunk(base + start, count)
                    kernel.columns_(chunk, u[start:start + count], layout, coeff, factor)
                    emit(codec, base + start, chunk)
    finally:
        codec.close()


def patch_quantized(fd: int, target: PatchTarget, u: torch.Tensor, sink: TensorSink, kernel: BlockKernel,
                    on_progress: Progress | None = None, src_path: str | os.PathLike | None = None,
                    importance: np.ndarray | None = None) -> None:
    """Write ``target`` (a quantized tensor read from ``fd``), projected against ``u``, into ``sink``; with
    ``importance`` (``[n_expert, row width]``, llama.cpp's importance matrix entry) the quantizer weighs each
    row's error by its expert's slice, as ``llama-quantize --imatrix`` does."""
    def write(codec: _Codec, first: int, values: torch.Tensor) -> None:
        data = codec.encoded(values, first)
        sink.write(target.entry.begin, target.entry.begin + first * codec.row_bytes, memoryview(data).cast("B"))
        if on_progress is not None:
            on_progress(data.nbytes)

    _projected(fd, target, u, kernel, os.fspath(src_path) if src_path is not None else "", write, importance)


def check_quantized(fd: int, target: PatchTarget, u: torch.Tensor, kernel: BlockKernel,
                    src_path: str | os.PathLike | None = None) -> None:
    """Compute ``target`` (a quantized tensor) once and write nothing: raise the error :func:`patch_quantized`
    would raise for non-finite values or a result that overflows, before an in-place run changes a byte."""
    _projected(fd, target, u, kernel, os.fspath(src_path) if src_path is not None else "",
               lambda codec, first, values: codec.checked(values))

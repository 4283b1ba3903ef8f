"""Stream one tensor from a source file through the projection into a shard writer, in bounded blocks.

Bytes are read with ``pread`` into reused buffers (no memory map, so nothing accumulates in RSS),
converted into a reused compute buffer, projected and written back. On CUDA the host buffer is
pinned and the arithmetic runs on the device; the functions are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import OrthopatchError
from .filecopy import pread_into
from .plan import PatchTarget
from .projection import (
    BLOCK_ELEMENTS,
    Layout,
    accumulate_columns,
    column_factor,
    compute_dtype,
    project_columns_,
    project_rows_,
)
from .safetensors_header import TensorEntry
from .writer import ShardWriter

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

#: Bytes of stored data read per ``pread``; a multiple of the compute block.
CHUNK_BYTES = 8 << 20
#: On a GPU a whole chunk is one block: kernel launches, not caches, are what costs there.
CUDA_CHUNK_BYTES = 64 << 20

Progress = Callable[[int], None]


def read_small_tensor(fd: int, entry: TensorEntry) -> torch.Tensor:
    """Read a small tensor (a norm gain) whole, as float64 on the CPU."""
    raw = bytearray(entry.nbytes)
    pread_into(fd, memoryview(raw), entry.begin)
    return torch.frombuffer(raw, dtype=TORCH_DTYPES[entry.dtype]).to(torch.float64).reshape(entry.shape)


class TensorPatcher:
    """Projects tensors from a file descriptor into a :class:`ShardWriter`, reusing its buffers."""

    def __init__(self, device: torch.device | str = "cpu", *, scale: float = 1.0, norm_preserving: bool = False,
                 chunk_bytes: int | None = None, block_elements: int = BLOCK_ELEMENTS):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.scale = scale
        self.norm_preserving = norm_preserving
        self.chunk_bytes = chunk_bytes or (CUDA_CHUNK_BYTES if self.cuda else CHUNK_BYTES)
        self.block_elements = block_elements
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._work: dict[torch.dtype, torch.Tensor] = {}

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        return self._raw

    def _work_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self._work.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._work[dtype] = buf
        return buf

    def patch(self, src_fd: int, target: PatchTarget, u: torch.Tensor, writer: ShardWriter,
              on_progress: Progress | None = None) -> None:
        """Write ``target``'s tensor, projected against unit vector ``u``, into its segment of ``writer``."""
        entry = target.entry
        stored = TORCH_DTYPES[entry.dtype]
        work_dtype = compute_dtype(stored)
        itemsize = torch.empty(0, dtype=stored).element_size()
        layout = Layout.of(entry.shape, target.axis)
        width = layout.dim if layout.rowwise else layout.cols
        row_bytes = width * itemsize
        if row_bytes == 0 or entry.nbytes == 0:
            writer.write(entry.begin, entry.begin, memoryview(b""))
            return
        block_rows = layout.block_rows(self.block_elements)
        if self.cuda:
            block_rows = max(block_rows, self.chunk_bytes // row_bytes)
        chunk_rows = max(block_rows, (self.chunk_bytes // row_bytes) // block_rows * block_rows)
        raw = self._host_buffer(chunk_rows * row_bytes)
        raw_view = memoryview(raw.numpy())
        work = self._work_buffer(work_dtype, chunk_rows * width)
        u = u.to(device=self.device, dtype=work_dtype)

        def read_rows(first_row: int, n: int) -> torch.Tensor:
            offset = entry.begin + first_row * row_bytes
            try:
                pread_into(src_fd, raw_view[: n * row_bytes], offset)
            except (OSError, EOFError) as exc:
                raise OrthopatchError(f"cannot read tensor data ({exc})", tensor=entry.name) from None
            return raw[: n * row_bytes].view(stored).view(n, width)

        def load(host: torch.Tensor) -> torch.Tensor:
            n = host.shape[0]
            dev = work[: n * width].view(n, width)
            dev.copy_(host, non_blocking=self.cuda)
            return dev

        def store(host: torch.Tensor, dev: torch.Tensor, first_row: int) -> None:
            host.copy_(dev)  # rounds once to the stored dtype (and synchronizes a CUDA copy)
            n = host.shape[0]
            writer.write(entry.begin, entry.begin + first_row * row_bytes, raw_view[: n * row_bytes])
            if on_progress is not None:
                on_progress(n * row_bytes)

        if layout.rowwise:
            for first in range(0, layout.batches, chunk_rows):
                host = read_rows(first, min(chunk_rows, layout.batches - first))
                dev = load(host)
                for s in range(0, dev.shape[0], block_rows):
                    project_rows_(dev[s:s + block_rows], u, self.scale, self.norm_preserving)
                store(host, dev, first)
            return

        for b in range(layout.batches):
            base = b * layout.dim
            coeff = torch.zeros(layout.cols, dtype=work_dtype, device=self.device)
            sumsq = torch.zeros_like(coeff) if self.norm_preserving else None
            for first in range(0, layout.dim, chunk_rows):
                dev = load(read_rows(base + first, min(chunk_rows, layout.dim - first)))
                for s in range(0, dev.shape[0], block_rows):
                    blk = dev[s:s + block_rows]
                    accumulate_columns(blk, u[first + s:first + s + blk.shape[0]], coeff, sumsq)
            factor = column_factor(coeff, sumsq, self.scale) if sumsq is not None else None
            for first in range(0, layout.dim, chunk_rows):
                host = read_rows(base + first, min(chunk_rows, layout.dim - first))
                dev = load(host)
                for s in range(0, dev.shape[0], block_rows):
                    blk = dev[s:s + block_rows]
                    project_columns_(blk, u[first + s:first + s + blk.shape[0]], coeff, self.scale, factor)
                store(host, dev, base + first)


def as_tensor(vector: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64))

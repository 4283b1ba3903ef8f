"""Stream one tensor from a source file through the projection into a shard writer, in bounded chunks.

Three things happen at once: a reader thread ``pread``s the next chunks into a small ring of reused
host buffers, the calling thread projects the current chunk in place (:class:`BlockKernel`), and a
writer thread ``pwrite``s finished chunks into the tensor's segment, in order (the kernel may share a
chunk's blocks with its own worker threads). ``pread``, ``pwrite`` and torch's kernels release the
GIL, so the disk and the arithmetic overlap. Nothing is
memory-mapped, so memory stays at the ring, the kernel's block buffer and, for two-pass tensors that
fit ``retain_bytes``, the tensor's stored bytes (kept between the passes instead of read twice).

On CUDA the host buffers are pinned and each chunk goes to the device and back with non-blocking
copies on the patcher's own stream; the kernel, chunking and pipeline are the same functions, so a
tensor larger than the GPU's memory is handled like any other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.filecopy import pread_into, start_writeback
from orthopatch.io.formats import torch_dtype
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.patch.kernel import BlockKernel, project_
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.projection import Layout, compute_dtype

#: Bytes of stored data per chunk (one ``pread``/``pwrite``); rounded to whole kernel blocks.
CHUNK_BYTES = 8 << 20
#: On a GPU a chunk is one block: larger transfers, fewer launches.
CUDA_CHUNK_BYTES = 64 << 20
#: Host buffers in the ring: one being read, one computed, one written, one spare.
RING_BUFFERS = 4
#: Two-pass tensors (``o_proj``, ``down_proj``) up to this size are read once and kept for pass two.
RETAIN_BYTES = 512 << 20

Progress = Callable[[int], None]


class TensorSink(Protocol):
    """Where a patched tensor's bytes go, chunk by chunk and in order: a shard being written
    (:class:`~orthopatch.io.writer.ShardWriter`) or an in-place journal
    (:class:`~orthopatch.patch.journal.JournalWriter`)."""

    fd: int

    def write(self, segment: int, offset: int, data: memoryview) -> None:
        """Write ``data`` at file ``offset``, inside the segment that starts at ``segment``."""


class _NonFinite(Exception):
    """The tensor being patched holds NaN or Inf (found from its coefficients, counted afterwards)."""


def non_finite_error(io: _TensorIO, stored: torch.dtype) -> OrthopatchError:
    """Count the non-finite values of ``io``'s tensor, reading it again in chunks; the one-line error."""
    entry, count = io.entry, 0
    buffer = bytearray(min(entry.nbytes, CHUNK_BYTES))
    itemsize = torch.empty(0, dtype=stored).element_size()
    step = len(buffer) // itemsize * itemsize
    for offset in range(entry.begin, entry.end, step):
        view = memoryview(buffer)[:min(step, entry.end - offset)]
        pread_into(io.fd, view, offset)
        count += int((~torch.isfinite(torch.frombuffer(view, dtype=stored))).sum())
    if count == 0:
        return OrthopatchError(f"the projection overflows (values too large for the arithmetic, or results past "
                               f"{str(stored).removeprefix('torch.')}'s largest value), so it is not patched",
                               path=io.path, tensor=entry.name)
    return OrthopatchError(f"holds {count:,} non-finite values (NaN or Inf); the projection would spread "
                           "them over whole rows or columns, so it is not patched", path=io.path, tensor=entry.name)


def _require_finite(data: torch.Tensor) -> None:
    """Raise :class:`_NonFinite` when a chunk of results (in the stored dtype) holds NaN or Inf."""
    if not bool(torch.isfinite(data).all()):
        raise _NonFinite


@dataclass(frozen=True)
class Chunk:
    """``count`` rows of a tensor's 2-D view starting at ``row``."""

    row: int
    count: int


def split_rows(first: int, stop: int, step: int) -> list[Chunk]:
    return [Chunk(row, min(step, stop - row)) for row in range(first, stop, step)]


class _TensorIO:
    """Reads and writes whole chunks of one tensor, turning I/O failures into one-line errors."""

    def __init__(self, fd: int, entry: TensorEntry, row_bytes: int, writer: TensorSink | None,
                 on_progress: Progress | None, path: str | None = None):
        self.fd, self.entry, self.row_bytes = fd, entry, row_bytes
        self.writer, self.on_progress, self.path = writer, on_progress, path

    def read(self, chunk: Chunk, into: memoryview) -> None:
        try:
            pread_into(self.fd, into[: chunk.count * self.row_bytes], self.entry.begin + chunk.row * self.row_bytes)
        except (OSError, EOFError) as exc:
            raise OrthopatchError(f"cannot read tensor data ({exc})", path=self.path, tensor=self.entry.name) from None

    def write(self, chunk: Chunk, data: memoryview) -> None:
        nbytes = chunk.count * self.row_bytes
        offset = self.entry.begin + chunk.row * self.row_bytes
        assert self.writer is not None, "a read-only pass writes nothing"
        self.writer.write(self.entry.begin, offset, data[:nbytes])
        start_writeback(self.writer.fd, offset, nbytes)
        if self.on_progress is not None:
            self.on_progress(nbytes)


class TensorPatcher:
    """Projects tensors from a file descriptor into a :class:`TensorSink`, reusing its buffers."""

    def __init__(self, device: torch.device | str = "cpu", *, scale: float = 1.0, norm_preserving: bool = False,
                 chunk_bytes: int | None = None, block_elements: int | None = None, workers: int | None = None,
                 ring_buffers: int = RING_BUFFERS, retain_bytes: int = RETAIN_BYTES):
        """``workers``: the kernel's threads (default :func:`~orthopatch.patch.kernel.default_workers`)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.scale = scale
        self.norm_preserving = norm_preserving
        self.kernel = BlockKernel(self.device, scale=scale, norm_preserving=norm_preserving,
                                  block_elements=block_elements, workers=workers)
        self.chunk_bytes = chunk_bytes or (CUDA_CHUNK_BYTES if self.cuda else CHUNK_BYTES)
        self.ring_buffers = max(2, ring_buffers)
        self.retain_bytes = retain_bytes
        self._ring: list[torch.Tensor] = []
        self._retained = torch.empty(0, dtype=torch.uint8)
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    # -- buffers -----------------------------------------------------------------------------------

    def _host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _ring_slots(self, nbytes: int) -> list[torch.Tensor]:
        if not self._ring or self._ring[0].numel() < nbytes:
            self._ring = []
            self._ring = [self._host(max(nbytes, self.chunk_bytes)) for _ in range(self.ring_buffers)]
        return self._ring

    def _retained_slots(self, chunks: list[Chunk], row_bytes: int) -> list[torch.Tensor]:
        first = chunks[0].row
        total = (chunks[-1].row + chunks[-1].count - first) * row_bytes
        if self._retained.numel() < total:
            self._retained = torch.empty(0, dtype=torch.uint8)
            self._retained = self._host(total)
        return [self._retained[(c.row - first) * row_bytes:(c.row - first + c.count) * row_bytes] for c in chunks]

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        """The chunk's bytes where the kernel runs: the host buffer itself, or a device copy of it."""
        if not self.cuda:
            return host
        if self._staging.numel() < host.numel():
            self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)
            self._staging = torch.empty(max(host.numel(), self.chunk_bytes), dtype=torch.uint8, device=self.device)
        dev = self._staging[: host.numel()]
        dev.copy_(host, non_blocking=True)
        return dev

    # -- the pipeline ------------------------------------------------------------------------------

    def _run(self, io: _TensorIO, chunks: list[Chunk], slots: list[torch.Tensor], stored: torch.dtype,
             width: int, process: Callable[[Chunk, torch.Tensor], None], *, read: bool, write: bool) -> None:
        """Read (optionally), process and write (optionally) ``chunks``, overlapping the three.

        ``slots`` are host buffers; with fewer slots than chunks they are reused in turn, a slot being
        read again only after its previous chunk has been processed and written.
        """
        ring = len(slots)
        views = [memoryview(s.numpy()) for s in slots]
        stop = threading.Event()
        reads: list[Future[None]] = []
        writes: list[Future[None]] = []
        lookahead = ring - 1 if ring < len(chunks) else len(chunks)

        def read_job(i: int) -> None:
            if stop.is_set():
                return
            if write and i >= ring:
                writes[i - ring].result()  # that slot's previous chunk is on disk
            io.read(chunks[i], views[i % ring])

        def write_job(i: int) -> None:
            if not stop.is_set():
                io.write(chunks[i], views[i % ring])

        with ThreadPoolExecutor(1, "orthopatch-read") as reader, ThreadPoolExecutor(1, "orthopatch-write") as writer:
            try:
                if read:
                    reads = [reader.submit(read_job, i) for i in range(lookahead)]
                for i, chunk in enumerate(chunks):
                    if read:
                        reads[i].result()
                    host = slots[i % ring][: chunk.count * io.row_bytes]
                    dev = self._on_device(host)
                    process(chunk, dev.view(stored).view(chunk.count, width))
                    if self._stream is not None:
                        if write:
                            host.copy_(dev, non_blocking=True)
                        self._stream.synchronize()  # the slot may be refilled or written from now on
                    if write:
                        writes.append(writer.submit(write_job, i))
                    if read and len(reads) < len(chunks):
                        reads.append(reader.submit(read_job, len(reads)))
                for future in writes:
                    future.result()
            except BaseException:
                stop.set()
                for future in reads + writes:
                    future.cancel()
                raise

    @contextmanager
    def _device_stream(self) -> Iterator[None]:
        """On CUDA, everything of one tensor (copies, kernels, allocations) runs on the patcher's stream."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def _open(self, src_fd: int, target: PatchTarget, sink: TensorSink | None, on_progress: Progress | None,
              src_path: str | os.PathLike | None) -> tuple[_TensorIO, torch.dtype, Layout, int] | None:
        """What both passes over a tensor need: its I/O, stored dtype, layout and rows per chunk; None for a
        tensor without bytes."""
        entry = target.entry
        stored = torch_dtype(entry.dtype)
        layout = Layout.of(entry.shape, target.axis)
        row_bytes = layout.width * stored.itemsize
        if row_bytes == 0 or entry.nbytes == 0:
            return None
        path = os.fspath(src_path) if src_path is not None else None
        io = _TensorIO(src_fd, entry, row_bytes, sink, on_progress, path)
        return io, stored, layout, self.chunk_rows(layout, row_bytes)

    def patch(self, src_fd: int, target: PatchTarget, u: torch.Tensor, sink: TensorSink,
              on_progress: Progress | None = None, src_path: str | os.PathLike | None = None, *,
              scale: float | None = None) -> None:
        """Write ``target``'s tensor, projected against unit vector ``u``, into its segment of ``sink``.

        ``src_path`` (the file behind ``src_fd``) only names the file in errors; ``scale`` (None: the
        patcher's) is this target's projection strength.
        """
        self._project(src_fd, target, u, sink, on_progress, src_path, scale)

    def _project(self, src_fd: int, target: PatchTarget, u: torch.Tensor, sink: TensorSink | None,
                 on_progress: Progress | None, src_path: str | os.PathLike | None, scale: float | None) -> None:
        """Both passes over ``target``, written into ``sink`` (or, without one, computed and dropped)."""
        opened = self._open(src_fd, target, sink, on_progress, src_path)
        if opened is None:
            if sink is not None:
                sink.write(target.entry.begin, target.entry.begin, memoryview(b""))
            return
        io, stored, layout, chunk_rows = opened
        write = sink is not None
        with self.kernel.running(), self._device_stream():
            u = u.to(device=self.device, dtype=compute_dtype(stored))
            try:
                if layout.rowwise:
                    chunks = split_rows(0, layout.rows, chunk_rows)
                    self._run(io, chunks, self._ring_slots(chunk_rows * io.row_bytes), stored, layout.width,
                              lambda c, data: self._rows_checked(data, u, layout, scale), read=True, write=write)
                    return
                retain = layout.dim * io.row_bytes <= self.retain_bytes
                for b in range(layout.batches):
                    self._patch_slab(io, b * layout.dim, layout, chunk_rows, stored, u, retain, scale, write)
            except _NonFinite:
                raise non_finite_error(io, stored) from None

    def _rows_checked(self, data: torch.Tensor, u: torch.Tensor, layout: Layout, scale: float | None = None) -> None:
        """Row-wise projection of a chunk in place, refused (:class:`_NonFinite`) when any value of the
        result, rounded to the stored dtype, is NaN or Inf: a non-finite coefficient, or a result past the
        dtype's largest value. A source value that is not finite makes its row's coefficient so."""
        self.kernel.rows_(data, u, layout, scale)
        _require_finite(data)

    def chunk_rows(self, layout: Layout, row_bytes: int) -> int:
        """Rows per chunk: whole kernel blocks, about ``chunk_bytes`` of stored data."""
        block_rows = self.kernel.block_rows(layout)
        return max(block_rows, (self.chunk_bytes // row_bytes) // block_rows * block_rows)

    def compute_only_(self, w: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
        """The pipeline's arithmetic alone: contiguous ``w`` projected in place, chunk by chunk and pass by
        pass as :meth:`patch` does, with no I/O (what the benchmark times). Returns ``w``."""
        layout = Layout.of(tuple(w.shape), axis % max(w.dim(), 1))
        if w.numel() == 0:
            return w
        chunk_rows = self.chunk_rows(layout, layout.width * w.element_size())
        return project_(w, u, axis, kernel=self.kernel, chunk_rows=chunk_rows)

    def _slab_coefficients(self, io: _TensorIO, chunks: list[Chunk], slots: list[torch.Tensor], base: int,
                           layout: Layout, stored: torch.dtype, u: torch.Tensor,
                           scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pass one over a ``[dim, cols]`` slab starting at row ``base``: its ``uᵀW`` (and the norm
        factors); :class:`_NonFinite` when a coefficient is NaN or Inf (a non-finite value, or overflow)."""
        kernel = self.kernel
        sums = kernel.new_sums(layout, stored)

        def first(c: Chunk, data: torch.Tensor) -> None:
            kernel.accumulate(data, u[c.row - base:c.row - base + c.count], layout, sums, c.row - base)

        self._run(io, chunks, slots, stored, layout.cols, first, read=True, write=False)
        coeff, factor = kernel.finish(sums, scale)
        if not bool(torch.isfinite(coeff).all()):  # any NaN or Inf in a column makes its uᵀW one
            raise _NonFinite
        return coeff, factor

    def _patch_slab(self, io: _TensorIO, base: int, layout: Layout, chunk_rows: int, stored: torch.dtype,
                    u: torch.Tensor, retain: bool, scale: float | None = None, write: bool = True) -> None:
        """Both passes over one ``[dim, cols]`` slab starting at row ``base`` (the result written or not)."""
        chunks = split_rows(base, base + layout.dim, chunk_rows)
        slots = self._retained_slots(chunks, io.row_bytes) if retain else self._ring_slots(chunk_rows * io.row_bytes)
        coeff, factor = self._slab_coefficients(io, chunks, slots, base, layout, stored, u, scale)

        self._run(io, chunks, slots, stored, layout.cols, self._second_pass(base, layout, u, coeff, factor, scale),
                  read=not retain, write=write)

    def _second_pass(self, base: int, layout: Layout, u: torch.Tensor, coeff: torch.Tensor,
                     factor: torch.Tensor | None, scale: float | None = None) -> Callable[[Chunk, torch.Tensor], None]:
        """Pass two over a slab starting at row ``base``: each chunk projected in place, then refused when a
        value of the result (rounded to the stored dtype) overflowed; the coefficients are finite by now,
        so a source value that is not finite never gets here."""
        kernel = self.kernel

        def second(c: Chunk, data: torch.Tensor) -> None:
            kernel.columns_(data, u[c.row - base:c.row - base + c.count], layout, coeff, factor, scale)
            _require_finite(data)

        return second

    def check(self, src_fd: int, target: PatchTarget, u: torch.Tensor,
              src_path: str | os.PathLike | None = None, *, scale: float | None = None) -> None:
        """Project ``target``'s tensor as :meth:`patch` does, into buffers that are never written: raise
        the error :meth:`patch` would raise for non-finite values, coefficients (``uᵀW`` per column,
        ``x·u`` per row) that overflow, or results that overflow the stored dtype once rounded.

        ``apply --in-place`` runs it over every tensor before it changes a byte: a tensor refused
        halfway through the plan would leave a model that can neither be finished nor restored. The
        arithmetic is :meth:`patch`'s own, so what passes here passes there.
        """
        self._project(src_fd, target, u, None, None, src_path, scale)

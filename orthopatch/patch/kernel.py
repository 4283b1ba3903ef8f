"""The threaded kernel: the projection of :mod:`orthopatch.patch.projection` applied to stored data, block by block.

:class:`BlockKernel` works in place on rows of stored data, one block at a time, in a reused buffer
of the compute dtype. The same kernel serves whole in-memory tensors (:func:`project_out`), streamed
files (:mod:`orthopatch.patch.stream`), the CPU and CUDA: given the same block size, every path produces
the same bytes. On the CPU every torch op of the kernel runs on one intra-op thread, which makes its
reductions independent of ``torch.get_num_threads()``; the parallelism is the kernel's own: a chunk's
blocks are split across a few Python worker threads (torch ops release the GIL), each with its own
block buffer. Row-wise blocks and second-pass blocks are independent. In the first pass block ``i``
of a slab always adds into partial sum ``i mod LANES``, and the partials are added in lane order at
the end, so the bytes do not depend on the number of workers either (see ``docs/performance.md``
for the measurements).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.patch.projection import (
    Layout,
    accumulate_columns,
    compute_dtype,
    project_columns_,
    project_rows_,
    restore_norms,
)

#: Elements per block of compute-dtype work on the CPU: 2 MiB of float32 (block and scratch stay near the core).
BLOCK_ELEMENTS = 1 << 19
#: On a GPU kernel launches, not caches, are what costs: blocks are 128 MiB of float32.
CUDA_BLOCK_ELEMENTS = 1 << 25
#: First-pass partial sums per slab: block ``i`` adds into lane ``i mod LANES``, whatever the worker count.
LANES = 4
#: At most this many worker threads share a chunk's blocks (each lane is one worker's at a time).
MAX_WORKERS = LANES
#: Environment variable that sets the CPU kernel's worker count (``1`` runs everything in the caller).
WORKERS_ENV = "ORTHOPATCH_KERNEL_WORKERS"


def default_block_elements(device: torch.device | str) -> int:
    """The block size used on ``device`` unless one is given."""
    return CUDA_BLOCK_ELEMENTS if torch.device(device).type == "cuda" else BLOCK_ELEMENTS


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device | str = "cpu") -> int:
    """Worker threads for the kernel on ``device``: ``$ORTHOPATCH_KERNEL_WORKERS``, else one per CPU up to
    :data:`MAX_WORKERS`; always one on a GPU (its kernels are queued on one stream)."""
    if torch.device(device).type != "cpu":
        return 1
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            return max(1, min(MAX_WORKERS, int(text)))
        except ValueError:
            raise OrthopatchError(f"{WORKERS_ENV} must be a whole number, not {text!r}") from None
    return min(MAX_WORKERS, available_cpus())


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the enclosed torch CPU ops on ``count`` intra-op threads, restoring the setting after."""
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


@dataclass
class ColumnSums:
    """First-pass accumulators of one slab: ``[LANES, cols]`` partial sums, one row per lane."""

    coeff: torch.Tensor
    sumsq: torch.Tensor | None

    def totals(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``uᵀW`` (and the column sums of squares): the lanes added in lane order."""
        return _sum_lanes(self.coeff), _sum_lanes(self.sumsq) if self.sumsq is not None else None


def _sum_lanes(partials: torch.Tensor) -> torch.Tensor:
    total = partials[0].clone()
    for lane in range(1, partials.shape[0]):
        total.add_(partials[lane])
    return total


class _Helpers:
    """Helper threads that each run one task at a time, handed over with bare locks (cheap per chunk)."""

    def __init__(self, count: int):
        self._tasks: list[Callable[[], None] | None] = [None] * count
        self._errors: list[BaseException | None] = [None] * count
        self._start = [threading.Lock() for _ in range(count)]
        self._done = [threading.Lock() for _ in range(count)]
        for lock in self._start + self._done:
            lock.acquire()
        self._threads = [threading.Thread(target=self._loop, args=(k,), name=f"orthopatch-kernel-{k + 1}",
                                          daemon=True) for k in range(count)]
        for thread in self._threads:
            thread.start()

    def _loop(self, k: int) -> None:
        while True:
            self._start[k].acquire()
            task = self._tasks[k]
            if task is None:
                return
            try:
                task()
            except BaseException as exc:
                self._errors[k] = exc
            self._done[k].release()

    def start(self, k: int, task: Callable[[], None]) -> None:
        self._tasks[k] = task
        self._start[k].release()

    def wait(self, k: int) -> BaseException | None:
        """Wait for helper ``k``'s task; the exception it raised, if any."""
        self._done[k].acquire()
        self._tasks[k] = None
        error, self._errors[k] = self._errors[k], None
        return error

    def close(self) -> None:
        for k in range(len(self._threads)):
            self._tasks[k] = None
            self._start[k].release()
        for thread in self._threads:
            thread.join()


#: ``(block index in its slab, first row in the chunk, stored block, compute-dtype copy, scratch)``.
BlockFn = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class BlockKernel:
    """The projection applied in place to ``[rows, width]`` chunks of stored data, block by block.

    Each block is converted into a reused compute-dtype buffer, transformed there and rounded back
    into the chunk. A chunk's first row must sit at a multiple of :meth:`block_rows` from the start of
    its slab, so that a tensor cut into chunks sees exactly the blocks it would see whole. On the CPU a
    chunk's blocks are shared among ``workers`` threads (the caller and ``workers - 1`` helper threads,
    each with its own buffer); the results are the same bytes for any number of workers.
    """

    def __init__(self, device: torch.device | str = "cpu", *, scale: float = 1.0, norm_preserving: bool = False,
                 block_elements: int | None = None, workers: int | None = None):
        self.device = torch.device(device)
        self.scale = scale
        self.norm_preserving = norm_preserving
        self.block_elements = block_elements or default_block_elements(self.device)
        cpu = self.device.type == "cpu"
        self.workers = max(1, min(MAX_WORKERS, workers)) if workers and cpu else default_workers(self.device)
        self._work: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._helpers: _Helpers | None = None

    def block_rows(self, layout: Layout) -> int:
        return layout.block_rows(self.block_elements)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The kernel's setting: one intra-op thread per worker on the CPU; helper threads live while inside."""
        if self.device.type != "cpu":
            yield
            return
        with intra_op_threads(1):
            try:
                yield
            finally:
                if self._helpers is not None:
                    self._helpers.close()
                    self._helpers = None

    def _buffer(self, share: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self._work.get((share, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._work[(share, dtype)] = buf
        return buf

    def _share(self, share: int, shares: int, chunk: torch.Tensor, rows: int, first_block: int,
               fn: BlockFn) -> None:
        """``fn`` on this share's blocks of ``chunk``, in order: block ``b`` is share ``(b mod LANES) mod shares``."""
        if share and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # this thread's own setting: its ops run inline
        dtype, numel = compute_dtype(chunk.dtype), rows * chunk.shape[1]
        buf, scratch = self._buffer(2 * share, dtype, numel), self._buffer(2 * share + 1, dtype, numel)
        for i, start in enumerate(range(0, chunk.shape[0], rows)):
            index = first_block + i
            if index % LANES % shares != share:
                continue
            block = chunk[start:start + rows]
            if block.dtype == dtype and block.is_contiguous():
                work = block  # already in the compute dtype: the same operations, in place, without two copies
            else:
                work = buf[:block.numel()].view(block.shape)
                work.copy_(block)
            fn(index, start, block, work, scratch)

    def _each_block(self, chunk: torch.Tensor, rows: int, fn: BlockFn, first_block: int = 0) -> None:
        """``fn`` on every block of ``chunk``, the blocks split across the workers; returns when all are done."""
        shares = min(self.workers, -(-chunk.shape[0] // rows))
        if shares <= 1:
            self._share(0, 1, chunk, rows, first_block, fn)
            return
        if self._helpers is None:
            self._helpers = _Helpers(self.workers - 1)
        for k in range(1, shares):
            self._helpers.start(k - 1, partial(self._share, k, shares, chunk, rows, first_block, fn))
        error: BaseException | None = None
        try:
            self._share(0, shares, chunk, rows, first_block, fn)
        except BaseException as exc:  # wait for the other workers before leaving their buffers
            error = exc
        for k in range(1, shares):
            exc = self._helpers.wait(k - 1)
            if error is None:
                error = exc
        if error is not None:
            raise error

    def rows_(self, chunk: torch.Tensor, u: torch.Tensor, layout: Layout, scale: float | None = None) -> None:
        """Row-wise projection of ``chunk`` in place (``u`` in the compute dtype, on the device); ``scale``
        replaces the kernel's for this call (a target's own strength)."""
        strength = self.scale if scale is None else scale

        def fn(_: int, start: int, block: torch.Tensor, work: torch.Tensor, scratch: torch.Tensor) -> None:
            project_rows_(work, u, strength, self.norm_preserving, scratch)
            if work is not block:
                block.copy_(work)

        self._each_block(chunk, self.block_rows(layout), fn)

    def accumulate(self, chunk: torch.Tensor, u_part: torch.Tensor, layout: Layout, sums: ColumnSums,
                   first_row: int = 0) -> None:
        """First pass over ``chunk``, whose first row is row ``first_row`` of its slab (``u_part`` the
        matching slice of u): add ``u_partᵀ block`` into the lane of each block."""
        rows = self.block_rows(layout)
        if first_row % rows:
            raise ValueError("a chunk must start on a block boundary of its slab")

        def fn(index: int, start: int, _: torch.Tensor, work: torch.Tensor, scratch: torch.Tensor) -> None:
            lane = index % LANES
            accumulate_columns(work, u_part[start:start + work.shape[0]], sums.coeff[lane],
                               sums.sumsq[lane] if sums.sumsq is not None else None, scratch)

        self._each_block(chunk, rows, fn, first_row // rows)

    def columns_(self, chunk: torch.Tensor, u_part: torch.Tensor, layout: Layout, coeff: torch.Tensor,
                 factor: torch.Tensor | None, scale: float | None = None) -> None:
        """Second pass over ``chunk`` in place: subtract ``scale · u_part coeffᵀ`` (and restore norms)."""
        strength = self.scale if scale is None else scale

        def fn(_: int, start: int, block: torch.Tensor, work: torch.Tensor, scratch: torch.Tensor) -> None:
            project_columns_(work, u_part[start:start + work.shape[0]], coeff, strength, factor, scratch)
            if work is not block:
                block.copy_(work)

        self._each_block(chunk, self.block_rows(layout), fn)

    def new_sums(self, layout: Layout, dtype: torch.dtype) -> ColumnSums:
        """Zeroed first-pass accumulators (``coeff`` and, when preserving norms, ``sumsq``) for one slab."""
        coeff = torch.zeros(LANES, layout.cols, dtype=compute_dtype(dtype), device=self.device)
        return ColumnSums(coeff, torch.zeros_like(coeff) if self.norm_preserving else None)

    def finish(self, sums: ColumnSums, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``uᵀW`` of the slab and, when preserving norms, each column's factor."""
        coeff, sumsq = sums.totals()
        strength = self.scale if scale is None else scale
        return coeff, restore_norms(sumsq, coeff, strength) if sumsq is not None else None


def project_(w: torch.Tensor, u: torch.Tensor, axis: int, *, scale: float = 1.0, norm_preserving: bool = False,
             block_elements: int | None = None, workers: int | None = None,
             kernel: BlockKernel | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Remove ``u`` (unit, float64) from the contiguous tensor ``w`` along ``axis``, in place; returns ``w``.

    ``chunk_rows`` (whole kernel blocks) hands the kernel the rows in chunks of that size, as the
    streaming pipeline does; the bytes are the same either way.
    """
    if not w.is_contiguous():
        raise ValueError("project_ needs a contiguous tensor")
    axis = axis % max(w.dim(), 1)
    layout = Layout.of(tuple(w.shape), axis)
    if w.numel() == 0:
        return w
    kernel = kernel or BlockKernel(w.device, scale=scale, norm_preserving=norm_preserving,
                                   block_elements=block_elements, workers=workers)
    u = u.to(device=w.device, dtype=compute_dtype(w.dtype))
    view = w.view(layout.rows, layout.width)
    with kernel.running():
        if layout.rowwise:
            step = chunk_rows or layout.rows
            for start in range(0, layout.rows, step):
                kernel.rows_(view[start:start + step], u, layout)
            return w
        step = chunk_rows or layout.dim
        for b in range(layout.batches):
            slab = view[b * layout.dim:(b + 1) * layout.dim]
            sums = kernel.new_sums(layout, w.dtype)
            for start in range(0, layout.dim, step):
                kernel.accumulate(slab[start:start + step], u[start:start + step], layout, sums, start)
            coeff, factor = kernel.finish(sums)
            for start in range(0, layout.dim, step):
                kernel.columns_(slab[start:start + step], u[start:start + step], layout, coeff, factor)
    return w


def project_out(w: torch.Tensor, u: torch.Tensor, axis: int, *, scale: float = 1.0,
                norm_preserving: bool = False, block_elements: int | None = None,
                workers: int | None = None) -> torch.Tensor:
    """Return ``w`` with ``u`` (unit, float64) removed along ``axis``; same dtype and device as ``w``.

    Works block by block exactly as the streaming executor does, so its results are the same bytes
    (whatever ``workers``, the kernel's thread count, default :func:`default_workers`).
    """
    copy = w.clone(memory_format=torch.contiguous_format)
    return project_(copy, u, axis, scale=scale, norm_preserving=norm_preserving, block_elements=block_elements,
                    workers=workers)

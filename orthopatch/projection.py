"""The pure core: remove a unit direction ``u`` from a tensor along its residual axis.

A tensor is seen as ``[B, D, C]`` where ``D`` is the residual axis. When ``C == 1`` the residual axis
is the last one (embeddings, Conv1D, fused experts): every row ``x`` of ``[B, D]`` becomes
``x - α (x·u) u`` in one pass. Otherwise (``nn.Linear`` weights ``[d_model, d_in]``) each ``[D, C]``
slab ``W`` becomes ``W - α u (uᵀW)``: a first pass accumulates ``uᵀW`` over row blocks, a second
applies the rank-1 update block by block.

:class:`BlockKernel` does that work in place on rows of stored data, one block at a time, in a
reused buffer of the compute dtype. The same kernel serves whole in-memory tensors
(:func:`project_out`), streamed files (:mod:`orthopatch.stream`), the CPU and CUDA: given the same
block size, every path produces the same bytes. On the CPU the kernel runs on one intra-op thread,
which makes its reductions independent of ``torch.get_num_threads()`` (and is also the fastest
setting measured on small blocks, see ``docs/performance.md``).

Arithmetic is float32 for 16-bit storage and float64 for float32/float64 storage, rounded once to
the stored dtype. With ``norm_preserving`` each input unit (row or column) gets its original norm
back after the projection; the new norm is known in closed form from ``x·u``, so no extra pass is
needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Elements per block of compute-dtype work on the CPU: 4 MiB of float32, measured fastest on one core.
BLOCK_ELEMENTS = 1 << 20
#: On a GPU kernel launches, not caches, are what costs: blocks are 128 MiB of float32.
CUDA_BLOCK_ELEMENTS = 1 << 25


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """float32 suffices for 16-bit storage; wider storage is computed in float64."""
    return torch.float64 if stored in (torch.float32, torch.float64) else torch.float32


def default_block_elements(device: torch.device | str) -> int:
    """The block size used on ``device`` unless one is given."""
    return CUDA_BLOCK_ELEMENTS if torch.device(device).type == "cuda" else BLOCK_ELEMENTS


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


@dataclass(frozen=True)
class Layout:
    """A tensor viewed as ``batches`` slabs of ``[dim, cols]`` with the residual axis as ``dim``."""

    batches: int
    dim: int
    cols: int

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int) -> Layout:
        return cls(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))

    @property
    def rowwise(self) -> bool:
        """True when the residual axis is the last one: every row is projected on its own."""
        return self.cols == 1

    @property
    def width(self) -> int:
        """Elements per row of the 2-D view the kernel works on."""
        return self.dim if self.rowwise else self.cols

    @property
    def rows(self) -> int:
        """Rows of the 2-D view: every fiber for row-wise tensors, ``batches × dim`` otherwise."""
        return self.batches if self.rowwise else self.batches * self.dim

    def block_rows(self, block_elements: int = BLOCK_ELEMENTS) -> int:
        return max(1, block_elements // max(self.width, 1))


def _restore_norms(sumsq: torch.Tensor, coeff: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-unit factor that gives back the original norm: ‖x - α c u‖² = ‖x‖² - (2α - α²) c²."""
    after = sumsq - (2.0 * scale - scale * scale) * coeff * coeff
    factor = torch.sqrt(sumsq / after.clamp_min(torch.finfo(after.dtype).tiny))
    return torch.where(after > 0, factor, torch.ones_like(factor))


def project_rows_(block: torch.Tensor, u: torch.Tensor, scale: float = 1.0, norm_preserving: bool = False) -> None:
    """In place, for rows whose last axis is the residual axis: ``x ← x - α (x·u) u``."""
    coeff = torch.mv(block, u)
    sumsq = torch.linalg.vector_norm(block, dim=1).square_() if norm_preserving else None
    block.addr_(coeff, u, alpha=-scale)
    if sumsq is not None:
        block.mul_(_restore_norms(sumsq, coeff, scale).unsqueeze(1))


def accumulate_columns(block: torch.Tensor, u_part: torch.Tensor, coeff: torch.Tensor,
                       sumsq: torch.Tensor | None = None) -> None:
    """First pass over rows ``block`` (``u_part`` the matching slice of u): ``coeff += u_partᵀ block``."""
    coeff.addmv_(block.t(), u_part)
    if sumsq is not None:
        sumsq.add_(block.square().sum(dim=0))


def project_columns_(block: torch.Tensor, u_part: torch.Tensor, coeff: torch.Tensor, scale: float = 1.0,
                     col_factor: torch.Tensor | None = None) -> None:
    """Second pass, in place: ``block ← (block - α u_part coeffᵀ) · col_factor``."""
    block.addr_(u_part, coeff, alpha=-scale)
    if col_factor is not None:
        block.mul_(col_factor)


def column_factor(coeff: torch.Tensor, sumsq: torch.Tensor, scale: float) -> torch.Tensor:
    """The norm-preserving factor of every column, from the first pass's sums."""
    return _restore_norms(sumsq, coeff, scale)


class BlockKernel:
    """The projection applied in place to ``[rows, width]`` chunks of stored data, block by block.

    Each block is converted into a reused compute-dtype buffer, transformed there and rounded back
    into the chunk. A chunk's first row must sit at a multiple of :meth:`block_rows` from the start of
    its slab, so that a tensor cut into chunks sees exactly the blocks it would see whole.
    """

    def __init__(self, device: torch.device | str = "cpu", *, scale: float = 1.0, norm_preserving: bool = False,
                 block_elements: int | None = None):
        self.device = torch.device(device)
        self.scale = scale
        self.norm_preserving = norm_preserving
        self.block_elements = block_elements or default_block_elements(self.device)
        self._work: dict[torch.dtype, torch.Tensor] = {}

    def block_rows(self, layout: Layout) -> int:
        return layout.block_rows(self.block_elements)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The kernel's thread setting: one intra-op thread on the CPU, so results never depend on it."""
        if self.device.type == "cpu":
            with intra_op_threads(1):
                yield
        else:
            yield

    def _blocks(self, chunk: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first row, stored block, compute-dtype copy)`` for every block of ``chunk``."""
        work_dtype = compute_dtype(chunk.dtype)
        width = chunk.shape[1]
        buf = self._work.get(work_dtype)
        if buf is None or buf.numel() < rows * width:
            buf = torch.empty(rows * width, dtype=work_dtype, device=self.device)
            self._work[work_dtype] = buf
        for start in range(0, chunk.shape[0], rows):
            block = chunk[start:start + rows]
            work = buf[:block.numel()].view(block.shape)
            work.copy_(block)
            yield start, block, work

    def rows_(self, chunk: torch.Tensor, u: torch.Tensor, layout: Layout) -> None:
        """Row-wise projection of ``chunk`` in place (``u`` in the compute dtype, on the device)."""
        for _, block, work in self._blocks(chunk, self.block_rows(layout)):
            project_rows_(work, u, self.scale, self.norm_preserving)
            block.copy_(work)

    def accumulate(self, chunk: torch.Tensor, u_part: torch.Tensor, layout: Layout, coeff: torch.Tensor,
                   sumsq: torch.Tensor | None) -> None:
        """First pass over ``chunk`` (rows matching ``u_part``): add ``u_partᵀ chunk`` to ``coeff``."""
        rows = self.block_rows(layout)
        for start, _, work in self._blocks(chunk, rows):
            accumulate_columns(work, u_part[start:start + work.shape[0]], coeff, sumsq)

    def columns_(self, chunk: torch.Tensor, u_part: torch.Tensor, layout: Layout, coeff: torch.Tensor,
                 factor: torch.Tensor | None) -> None:
        """Second pass over ``chunk`` in place: subtract ``u_part coeffᵀ`` (and restore norms)."""
        rows = self.block_rows(layout)
        for start, block, work in self._blocks(chunk, rows):
            project_columns_(work, u_part[start:start + work.shape[0]], coeff, self.scale, factor)
            block.copy_(work)

    def new_sums(self, layout: Layout, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zeroed first-pass accumulators (``coeff`` and, when preserving norms, ``sumsq``) for one slab."""
        coeff = torch.zeros(layout.cols, dtype=compute_dtype(dtype), device=self.device)
        return coeff, torch.zeros_like(coeff) if self.norm_preserving else None

    def factor(self, coeff: torch.Tensor, sumsq: torch.Tensor | None) -> torch.Tensor | None:
        return column_factor(coeff, sumsq, self.scale) if sumsq is not None else None


def unit_direction(r: torch.Tensor, gain: torch.Tensor | None = None, gain_offset: float = 0.0) -> torch.Tensor:
    """``r`` (float64), weighted by a following norm's gain ``offset + gain`` and renormalized.

    Since ``rᵀ(γ ⊙ y) = (γ ⊙ r)ᵀ y``, removing ``γ ⊙ r`` from a sublayer's output makes its contribution
    to the residual stream exactly orthogonal to ``r`` after the norm.
    """
    u = r.to(torch.float64)
    if gain is not None:
        u = u * (gain.to(torch.float64) + gain_offset)
    norm = torch.linalg.vector_norm(u)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction vanishes after weighting by the norm gain")
    return u / norm


def project_(w: torch.Tensor, u: torch.Tensor, axis: int, *, scale: float = 1.0, norm_preserving: bool = False,
             block_elements: int | None = None, kernel: BlockKernel | None = None) -> torch.Tensor:
    """Remove ``u`` (unit, float64) from the contiguous tensor ``w`` along ``axis``, in place; returns ``w``."""
    if not w.is_contiguous():
        raise ValueError("project_ needs a contiguous tensor")
    axis = axis % max(w.dim(), 1)
    layout = Layout.of(tuple(w.shape), axis)
    if w.numel() == 0:
        return w
    kernel = kernel or BlockKernel(w.device, scale=scale, norm_preserving=norm_preserving,
                                   block_elements=block_elements)
    u = u.to(device=w.device, dtype=compute_dtype(w.dtype))
    view = w.view(layout.rows, layout.width)
    with kernel.running():
        if layout.rowwise:
            kernel.rows_(view, u, layout)
            return w
        for b in range(layout.batches):
            slab = view[b * layout.dim:(b + 1) * layout.dim]
            coeff, sumsq = kernel.new_sums(layout, w.dtype)
            kernel.accumulate(slab, u, layout, coeff, sumsq)
            kernel.columns_(slab, u, layout, coeff, kernel.factor(coeff, sumsq))
    return w


def project_out(w: torch.Tensor, u: torch.Tensor, axis: int, *, scale: float = 1.0,
                norm_preserving: bool = False, block_elements: int | None = None) -> torch.Tensor:
    """Return ``w`` with ``u`` (unit, float64) removed along ``axis``; same dtype and device as ``w``.

    Works block by block exactly as the streaming executor does, so its results are the same bytes.
    """
    copy = w.clone(memory_format=torch.contiguous_format)
    return project_(copy, u, axis, scale=scale, norm_preserving=norm_preserving, block_elements=block_elements)

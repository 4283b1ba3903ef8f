"""The pure core: remove a unit direction ``u`` from a tensor along its residual axis.

A tensor is seen as ``[B, D, C]`` where ``D`` is the residual axis. When ``C == 1`` the residual axis
is the last one (embeddings, Conv1D, fused experts): every row ``x`` of ``[B, D]`` becomes
``x - α (x·u) u`` in one pass. Otherwise (``nn.Linear`` weights ``[d_model, d_in]``) each ``[D, C]``
slab ``W`` becomes ``W - α u (uᵀW)``: a first pass accumulates ``uᵀW`` over row blocks, a second
applies the rank-1 update block by block. Blocks are small enough to stay in cache, and the same
functions serve whole in-memory tensors, streamed files, the CPU and CUDA.

Arithmetic is float32 for 16-bit storage and float64 for float32/float64 storage, rounded once to
the stored dtype. With ``norm_preserving`` each input unit (row or column) gets its original norm
back after the projection; the new norm is known in closed form from ``x·u``, so no extra pass is
needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Elements per block of compute-dtype work: 256 KiB of float32, sized for a core's L2 cache.
BLOCK_ELEMENTS = 1 << 16


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """float32 suffices for 16-bit storage; wider storage is computed in float64."""
    return torch.float64 if stored in (torch.float32, torch.float64) else torch.float32


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

    def block_rows(self, block_elements: int = BLOCK_ELEMENTS) -> int:
        width = self.dim if self.rowwise else self.cols
        return max(1, block_elements // max(width, 1))


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


def project_out(w: torch.Tensor, u: torch.Tensor, axis: int, *, scale: float = 1.0,
                norm_preserving: bool = False, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Return ``w`` with ``u`` (unit, float64) removed along ``axis``; same dtype and device as ``w``.

    Works block by block exactly as the streaming executor does, so its results are the same bytes.
    """
    axis = axis % max(w.dim(), 1)
    layout = Layout.of(tuple(w.shape), axis)
    work_dtype = compute_dtype(w.dtype)
    u = u.to(device=w.device, dtype=work_dtype)
    out = torch.empty_like(w)
    src = w.reshape(-1, layout.dim if layout.rowwise else layout.cols)
    dst = out.view(src.shape)
    rows = layout.block_rows(block_elements)
    if layout.rowwise:
        for start in range(0, src.shape[0], rows):
            block = src[start:start + rows].to(work_dtype)
            project_rows_(block, u, scale, norm_preserving)
            dst[start:start + rows].copy_(block)
        return out
    for b in range(layout.batches):
        base = b * layout.dim
        coeff = torch.zeros(layout.cols, dtype=work_dtype, device=w.device)
        sumsq = torch.zeros_like(coeff) if norm_preserving else None
        for start in range(0, layout.dim, rows):
            stop = min(start + rows, layout.dim)
            accumulate_columns(src[base + start:base + stop].to(work_dtype), u[start:stop], coeff, sumsq)
        factor = column_factor(coeff, sumsq, scale) if sumsq is not None else None
        for start in range(0, layout.dim, rows):
            stop = min(start + rows, layout.dim)
            block = src[base + start:base + stop].to(work_dtype)
            project_columns_(block, u[start:stop], coeff, scale, factor)
            dst[base + start:base + stop].copy_(block)
    return out

"""The projection's arithmetic on one block of rows: remove a unit direction ``u`` along the residual axis.

A tensor is seen as ``[B, D, C]`` where ``D`` is the residual axis (:class:`Layout`). When ``C == 1``
the residual axis is the last one (embeddings, Conv1D, fused experts): every row ``x`` of ``[B, D]``
becomes ``x - α (x·u) u`` in one pass (:func:`project_rows_`). Otherwise (``nn.Linear`` weights
``[d_model, d_in]``) each ``[D, C]`` slab ``W`` becomes ``W - α u (uᵀW)``: a first pass accumulates
``uᵀW`` over row blocks (:func:`accumulate_columns`), a second applies the rank-1 update block by
block (:func:`project_columns_`).

Arithmetic is float32 for 16-bit storage and float64 for float32/float64 storage, rounded once to
the stored dtype. With ``norm_preserving`` each input unit (row or column) gets its original norm
back after the projection; the new norm is known in closed form from ``x·u``, so no extra pass is
needed.

Everything here takes tensors and returns (or updates) tensors: no files, threads or settings. The
schedule that turns these steps into the same bytes on every path is :mod:`orthopatch.kernel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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

    @property
    def width(self) -> int:
        """Elements per row of the 2-D view the kernel works on."""
        return self.dim if self.rowwise else self.cols

    @property
    def rows(self) -> int:
        """Rows of the 2-D view: every fiber for row-wise tensors, ``batches × dim`` otherwise."""
        return self.batches if self.rowwise else self.batches * self.dim

    def block_rows(self, block_elements: int) -> int:
        """Whole rows in a block of at most ``block_elements`` elements (at least one row)."""
        return max(1, block_elements // max(self.width, 1))


def restore_norms(sumsq: torch.Tensor, coeff: torch.Tensor, scale: float) -> torch.Tensor:
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
        block.mul_(restore_norms(sumsq, coeff, scale).unsqueeze(1))


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
    return restore_norms(sumsq, coeff, scale)


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

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
schedule that turns these steps into the same bytes on every path is :mod:`orthopatch.patch.kernel`.
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


def ordered_sum_(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``terms`` along ``dim`` in one fixed pairwise order, by elementwise additions only.

    The second half of the axis is added into the first, then the second half of that into its first,
    and so on (an odd last element is added into the first one before the next halving). Every step is
    one IEEE addition per element, so the result does not depend on SIMD width, BLAS code paths or
    thread counts: the same bits on every CPU. The error is that of pairwise summation, ``O(log n)``
    roundings. ``terms`` is overwritten; the result is a view into it.
    """
    dim = dim % terms.dim()
    count = terms.shape[dim]
    if count == 0:
        return terms.sum(dim)  # zeros
    while count > 1:
        half = count // 2
        low = terms.narrow(dim, 0, half)
        low.add_(terms.narrow(dim, half, half))
        if count % 2:
            low.narrow(dim, 0, 1).add_(terms.narrow(dim, 2 * half, 1))
        terms, count = low, half
    return terms.select(dim, 0)


def ordered_sum(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`ordered_sum_` on a copy: ``terms`` is left as it is."""
    return ordered_sum_(terms.clone(), dim)


def _scratch(block: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """A tensor of ``block``'s shape to hold products: a view of ``scratch`` when one is given."""
    if scratch is None:
        return torch.empty_like(block)
    return scratch[:block.numel()].view(block.shape)


def row_dots(block: torch.Tensor, u: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``x·u`` for every row ``x`` of ``block`` (the last axis is the residual axis), in a fixed order."""
    terms = torch.mul(block, u, out=_scratch(block, scratch))
    return ordered_sum_(terms, 1).clone()


def restore_norms(sumsq: torch.Tensor, coeff: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-unit (row or column) factor that gives back the original norm: ‖x - α c u‖² = ‖x‖² - (2α - α²) c².

    Rows use it after :func:`project_rows_`; columns after the first pass's sums (:class:`ColumnSums`).
    """
    after = sumsq - (2.0 * scale - scale * scale) * coeff * coeff
    factor = torch.sqrt(sumsq / after.clamp_min(torch.finfo(after.dtype).tiny))
    return torch.where(after > 0, factor, torch.ones_like(factor))


def _scaled(coeff: torch.Tensor, scale: float) -> torch.Tensor:
    return coeff if scale == 1.0 else coeff * scale


def project_rows_(block: torch.Tensor, u: torch.Tensor, scale: float = 1.0, norm_preserving: bool = False,
                  scratch: torch.Tensor | None = None) -> None:
    """In place, for rows whose last axis is the residual axis: ``x ← x - (α (x·u)) u``.

    ``scratch`` (at least ``block.numel()`` elements of its dtype) holds the products; without it one
    is allocated.
    """
    terms = _scratch(block, scratch)
    coeff = row_dots(block, u, terms)
    sumsq = ordered_sum_(torch.mul(block, block, out=terms), 1).clone() if norm_preserving else None
    block.sub_(torch.mul(_scaled(coeff, scale).unsqueeze(1), u, out=terms))
    if sumsq is not None:
        block.mul_(restore_norms(sumsq, coeff, scale).unsqueeze(1))


def accumulate_columns(block: torch.Tensor, u_part: torch.Tensor, coeff: torch.Tensor,
                       sumsq: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> None:
    """First pass over rows ``block`` (``u_part`` the matching slice of u): ``coeff += u_partᵀ block``,
    summed over the block's rows in a fixed order."""
    terms = _scratch(block, scratch)
    coeff.add_(ordered_sum_(torch.mul(block, u_part.unsqueeze(1), out=terms), 0))
    if sumsq is not None:
        sumsq.add_(ordered_sum_(torch.mul(block, block, out=terms), 0))


def project_columns_(block: torch.Tensor, u_part: torch.Tensor, coeff: torch.Tensor, scale: float = 1.0,
                     col_factor: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> None:
    """Second pass, in place: ``block ← (block - u_part (α coeff)ᵀ) · col_factor``."""
    block.sub_(torch.mul(u_part.unsqueeze(1), _scaled(coeff, scale), out=_scratch(block, scratch)))
    if col_factor is not None:
        block.mul_(col_factor)


def unit_direction(r: torch.Tensor, gain: torch.Tensor | None = None, gain_offset: float = 0.0) -> torch.Tensor:
    """``r`` (float64), weighted by a following norm's gain ``offset + gain`` and renormalized.

    Since ``rᵀ(γ ⊙ y) = (γ ⊙ r)ᵀ y``, removing ``γ ⊙ r`` from a sublayer's output makes its contribution
    to the residual stream exactly orthogonal to ``r`` after the norm.
    """
    u = r.to(torch.float64)
    if gain is not None:
        u = u * (gain.to(torch.float64) + gain_offset)
    norm = torch.tensor(math.sqrt(math.fsum((u * u).tolist())), dtype=torch.float64)  # exactly rounded sum
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction vanishes after weighting by the norm gain")
    return u / norm

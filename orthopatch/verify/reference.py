"""The numeric proof: every patched tensor held against a float64 computation of its own.

Nothing here is shared with the code that wrote the output. The unit vectors (gain-weighted where a
norm follows), ``uᵀW``, the rank-1 update, the norm-preserving factor and the rounding to the stored
dtype are computed again, in float64, by the functions below; patched tensors are read through the
``safetensors`` package (``safe_open`` and bounded slices), not through orthopatch's header parser
and readers. A bug in the kernel therefore cannot cancel out in its own check.

- With the source: every patched tensor must equal the source projected in float64 and rounded to
  its dtype, except at most 0.1% of elements one ulp away, and except near-zero results of
  cancellation, where only an absolute error of a few compute-dtype ulps of the operands
  (``|W|`` and ``|α||u|·Σ|W||u|``) can be promised: float32 arithmetic on 16-bit data cannot give
  one ulp of a result much smaller than its operands. Unchanged tensors must be the same bytes.
- Without it: every patched tensor must have no component along its direction beyond what rounding
  to its dtype can leave (when the scale is 1; other scales remove only part of it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.filecopy import pread_into
from orthopatch.io.formats import torch_dtype
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.patch.direction import Direction
from orthopatch.patch.plan import PatchPlan, PatchTarget
from orthopatch.patch.record import Method
from orthopatch.verify.report import TensorCheck

#: Elements per block of float64 work (8 MiB per temporary).
CHUNK_ELEMENTS = 1 << 20
#: Bytes per block when comparing unchanged tensors.
COMPARE_BYTES = 8 << 20
#: Share of a tensor's elements that may be one ulp from the correctly rounded result.
NEAR_FRACTION = 1e-3
#: Near cancellation: allowed absolute error, in compute-dtype ulps of the operands.
CANCEL_ULPS = 8
#: Without a source: the component left along ``u`` may exceed what rounding can leave by this many
#: compute-dtype ulps of the tensor's norm.
COMPUTE_ULPS = 32

Progress = Callable[[int], None]


def arithmetic_eps(stored: torch.dtype) -> float:
    """Machine epsilon of the arithmetic a writer may use: float32 for 16-bit storage, else float64."""
    return torch.finfo(torch.float64 if stored in (torch.float32, torch.float64) else torch.float32).eps


# --- reading ---------------------------------------------------------------------------------------

class TensorFile:
    """A safetensors file read with the ``safetensors`` package, one bounded slice at a time.

    ``safe_open`` memory-maps the file, and the pages a read touches count toward the process's
    resident size for as long as the mapping is open. Every read therefore opens the file and closes
    it again: memory stays at one block whatever the tensor or shard size, for the price of parsing
    the header once per block (small next to reading the block).
    """

    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def _opened(self, name: str) -> Iterator[Any]:
        try:
            handle = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # the library's own refusal: one line naming the file
            raise OrthopatchError(f"the safetensors library cannot open it ({first_line(exc)})",
                                  path=self.path) from None
        with handle:
            try:
                yield handle.get_slice(name)
            except OrthopatchError:
                raise
            except Exception as exc:
                raise OrthopatchError(f"the safetensors library cannot read it ({first_line(exc)})",
                                      path=self.path, tensor=name) from None

    def read(self, name: str, index: int | slice | tuple[int | slice, ...]) -> torch.Tensor:
        """``tensor[index]`` of tensor ``name``, as float64 (every read of a patched tensor passes here)."""
        with self._opened(name) as tensor:
            return tensor[index].to(torch.float64)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, as the ``safetensors`` package reads it."""
        with self._opened(name) as tensor:
            return torch_dtype(tensor.get_dtype())


class RawReader:
    """Raw bytes of one file with ``pread`` into a reused buffer: unchanged tensors are compared as bytes."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        self._raw = torch.empty(0, dtype=torch.uint8)

    def raw(self, offset: int, nbytes: int, tensor: str) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        view = self._raw[:nbytes]
        try:
            pread_into(self.fd, memoryview(view.numpy()), offset)
        except (OSError, EOFError) as exc:
            raise OrthopatchError(f"cannot read tensor data ({exc})", path=self.path, tensor=tensor) from None
        return view


@dataclass(frozen=True)
class Fibers:
    """How a tensor meets the residual axis: ``slabs`` of ``[dim, cols]`` (cols 1: every fiber is a row)."""

    shape: tuple[int, ...]
    axis: int

    @property
    def dim(self) -> int:
        return self.shape[self.axis]

    @property
    def last(self) -> bool:
        """The residual axis is the last one: each fiber along it is projected on its own."""
        return self.axis == len(self.shape) - 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[self.axis + 1:])

    def row_blocks(self, max_elements: int) -> Iterator[tuple[int, tuple[int | slice, ...], int]]:
        """Residual axis last: ``(first element, index, rows)`` of blocks of whole fibers ``[rows, dim]``."""
        if len(self.shape) == 1:
            yield 0, (slice(None),), 1
            return
        per_index = math.prod(self.shape[1:])  # elements under one index of the first axis
        step = max(1, max_elements // per_index)
        for first in range(0, self.shape[0], step):
            n = min(step, self.shape[0] - first)
            yield first * per_index, (slice(first, first + n),), n * per_index // self.dim

    def slabs(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        """Residual axis not last: ``(first element, leading index)`` of every ``[dim, cols]`` slab."""
        for k, lead in enumerate(itertools.product(*(range(n) for n in self.shape[:self.axis]))):
            yield k * self.dim * self.cols, lead

    def slab_blocks(self, lead: tuple[int, ...], max_elements: int) -> Iterator[tuple[int, tuple[int | slice, ...]]]:
        """``(first row, index)`` of row blocks of one slab."""
        step = max(1, max_elements // max(self.cols, 1))
        for first in range(0, self.dim, step):
            yield first, (*lead, slice(first, min(first + step, self.dim)))


def unit_vector(r: np.ndarray, gain: np.ndarray | None = None, offset: float = 0.0) -> torch.Tensor:
    """``r`` in float64, weighted by a following norm's gain ``offset + gain`` when there is one, unit length.

    A sublayer followed by a norm with gain ``γ`` reaches the residual stream as ``γ ⊙ y``; since
    ``rᵀ(γ ⊙ y) = (γ ⊙ r)ᵀ y``, it is ``γ ⊙ r`` that must be gone from ``y``.
    """
    u = np.asarray(r, dtype=np.float64)
    if gain is not None:
        u = u * (np.asarray(gain, dtype=np.float64) + offset)
    norm = math.sqrt(float(np.dot(u, u)))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("direction vanishes after weighting by the norm gain")
    return torch.from_numpy(u / norm)


def unit_vectors(plan: PatchPlan, direction: Direction) -> dict[str, torch.Tensor]:
    """Each target's unit vector: its layer's row of the direction, weighted by its norm gain (read from
    ``plan``'s checkpoint with the ``safetensors`` package)."""
    ckpt = plan.checkpoint
    gains: dict[str, np.ndarray] = {}
    for name in sorted({t.gain for t in plan.targets() if t.gain}):
        gains[name] = TensorFile(ckpt.root / ckpt.weight_map[name]).read(name, slice(None)).numpy()
    out = {}
    for t in plan.targets():
        try:
            out[t.name] = unit_vector(direction.for_layer(t.layer), gains.get(t.gain) if t.gain else None,
                                      t.gain_offset)
        except ValueError as exc:
            raise OrthopatchError(f"{exc} {t.gain!r}", path=ckpt.root / t.shard, tensor=t.name) from None
    return out


# --- the rounding rule -----------------------------------------------------------------------------

def ulp(x: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The spacing of ``stored`` values at the magnitude of ``x`` (float64), subnormals included."""
    info = torch.finfo(stored)
    lowest = round(math.log2(info.tiny))  # below it, subnormals: the spacing stays that of the smallest normals
    _, exponent = torch.frexp(x)  # |x| = m·2^e with 0.5 <= m < 1, so floor(log2|x|) = e - 1
    floor_log2 = torch.where(x == 0, lowest, exponent - 1).clamp_min(lowest)
    return torch.ldexp(torch.full_like(x, info.eps), floor_log2)


@dataclass
class RoundingTally:
    """How a patched tensor's elements compare with the float64 reference."""

    stored: torch.dtype
    numel: int = 0
    near: int = 0  # one ulp from the correctly rounded value
    bad: int = 0  # further than that, and not explained by cancellation
    first_bad: tuple[int, float, float] | None = None  # (element index, found, expected)

    def add(self, out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, first_element: int) -> None:
        rounded = ref.to(self.stored).to(torch.float64)
        ok = (out == rounded) | (out.isnan() & rounded.isnan())
        ok |= (out - ref).abs() <= CANCEL_ULPS * arithmetic_eps(self.stored) * bound
        near = (out - rounded).abs() <= ulp(torch.maximum(out.abs(), rounded.abs()), self.stored)
        bad = ~(ok | near)
        self.numel += out.numel()
        self.near += int((near & ~ok).sum())
        n_bad = int(bad.sum())
        if n_bad and self.first_bad is None:
            i = int(bad.flatten().nonzero()[0])
            self.first_bad = (first_element + i, float(out.flatten()[i]), float(rounded.flatten()[i]))
        self.bad += n_bad

    def problem(self) -> str | None:
        allowed = math.ceil(self.numel * NEAR_FRACTION)
        if self.bad:
            index, found, expected = self.first_bad or (0, 0.0, 0.0)
            return (f"{self.bad} of {self.numel} elements differ from the source projected by more than one ulp "
                    f"(element {index}: {found!r}, expected {expected!r})")
        if self.near > allowed:
            return (f"{self.near} of {self.numel} elements are one ulp from the correctly rounded result; "
                    f"at most {allowed} (0.1%) may be")
        return None


# --- the checks of one tensor ----------------------------------------------------------------------

def _restoring_factor(before_sq: torch.Tensor, after_sq: torch.Tensor) -> torch.Tensor:
    """``‖x‖ / ‖x'‖`` per unit, from both squared norms measured directly (1 where ``x'`` vanished)."""
    safe = torch.where(after_sq > 0, after_sq, torch.ones_like(after_sq))
    return torch.where(after_sq > 0, torch.sqrt(before_sq / safe), torch.ones_like(after_sq))


def check_against_source(src: TensorFile, out: TensorFile, target: PatchTarget, u: torch.Tensor, method: Method,
                         chunk_elements: int, progress: Progress) -> tuple[TensorCheck, str | None]:
    """Compare a patched tensor with its source projected in float64, block by block."""
    name, scale = target.name, method.scale_for(target.role, target.layer)
    fibers = Fibers(tuple(target.entry.shape), target.axis)
    stored = out.dtype(name)
    itemsize = stored.itemsize
    check = TensorCheck(name, target.role, target.layer)
    tally = RoundingTally(stored)
    u_abs = u.abs()
    before = [0.0, 0.0]
    after = [0.0, 0.0]

    if fibers.last:
        for first, index, rows in fibers.row_blocks(chunk_elements):
            x = src.read(name, index).reshape(rows, fibers.dim)
            o = out.read(name, index).reshape(rows, fibers.dim)
            check.count_nonfinite(o)
            coeff = x @ u
            ref = x - scale * torch.outer(coeff, u)
            bound = x.abs() + abs(scale) * torch.outer(x.abs() @ u_abs, u_abs)
            if method.norm_preserving:
                factor = _restoring_factor((x * x).sum(dim=1), (ref * ref).sum(dim=1)).unsqueeze(1)
                ref, bound = ref * factor, bound * factor
            tally.add(o, ref, bound, first)
            before[0] += float((coeff * coeff).sum())
            before[1] += float((x * x).sum())
            after[0] += float((o @ u).square().sum())
            after[1] += float((o * o).sum())
            progress(o.numel() * itemsize)
    else:
        for first_element, lead in fibers.slabs():
            blocks = list(fibers.slab_blocks(lead, chunk_elements))
            coeff = torch.zeros(fibers.cols, dtype=torch.float64)  # uᵀW of the slab
            abs_coeff = torch.zeros_like(coeff)
            for first, index in blocks:
                x = src.read(name, index).reshape(-1, fibers.cols)
                part = u[first:first + x.shape[0]]
                coeff += part @ x
                abs_coeff += u_abs[first:first + x.shape[0]] @ x.abs()
                before[1] += float((x * x).sum())
            before[0] += float((coeff * coeff).sum())
            factor = None
            if method.norm_preserving:  # one more pass: each column's norm before and after, measured
                before_sq, after_sq = torch.zeros_like(coeff), torch.zeros_like(coeff)
                for first, index in blocks:
                    x = src.read(name, index).reshape(-1, fibers.cols)
                    ref = x - scale * torch.outer(u[first:first + x.shape[0]], coeff)
                    before_sq += (x * x).sum(dim=0)
                    after_sq += (ref * ref).sum(dim=0)
                factor = _restoring_factor(before_sq, after_sq)
            out_coeff = torch.zeros_like(coeff)
            for first, index in blocks:
                x = src.read(name, index).reshape(-1, fibers.cols)
                o = out.read(name, index).reshape(-1, fibers.cols)
                check.count_nonfinite(o)
                part = u[first:first + x.shape[0]]
                ref = x - scale * torch.outer(part, coeff)
                bound = x.abs() + abs(scale) * torch.outer(part.abs(), abs_coeff)
                if factor is not None:
                    ref, bound = ref * factor, bound * factor
                tally.add(o, ref, bound, first_element + first * fibers.cols)
                out_coeff += part @ o
                after[1] += float((o * o).sum())
                progress(o.numel() * itemsize)
            after[0] += float((out_coeff * out_coeff).sum())
    check.before, check.after = (before[0], before[1]), (after[0], after[1])
    if tally.near:
        check.detail = f"{tally.near} element(s) one ulp off"
    return check, tally.problem()


def check_orthogonal(out: TensorFile, target: PatchTarget, u: torch.Tensor, method: Method, chunk_elements: int,
                     progress: Progress) -> tuple[TensorCheck, str | None]:
    """Measure what is left along ``u`` and hold it against what rounding to the stored dtype can leave.

    Rounding each element of the exact result moves it by at most half an ulp, so the component of a
    unit (row or column) ``x`` along ``u`` can be at most ``Σ|uᵢ|·ulp(xᵢ)/2`` away from zero. The
    errors are not independent noise: where the projection shifts an element by less than half an
    ulp, rounding undoes the shift, so the bound, not a random-noise estimate, is what may be held
    against.
    """
    name = target.name
    fibers = Fibers(tuple(target.entry.shape), target.axis)
    stored = out.dtype(name)
    check = TensorCheck(name, target.role, target.layer)
    u_abs = u.abs()
    comp2 = norm2 = slack2 = 0.0
    if fibers.last:
        for _, index, rows in fibers.row_blocks(chunk_elements):
            o = out.read(name, index).reshape(rows, fibers.dim)
            check.count_nonfinite(o)
            comp2 += float((o @ u).square().sum())
            norm2 += float((o * o).sum())
            slack2 += float(((ulp(o, stored) / 2) @ u_abs).square().sum())
            progress(o.numel() * stored.itemsize)
    else:
        for _, lead in fibers.slabs():
            coeff = torch.zeros(fibers.cols, dtype=torch.float64)
            slack = torch.zeros_like(coeff)
            for first, index in fibers.slab_blocks(lead, chunk_elements):
                o = out.read(name, index).reshape(-1, fibers.cols)
                check.count_nonfinite(o)
                coeff += u[first:first + o.shape[0]] @ o
                slack += u_abs[first:first + o.shape[0]] @ (ulp(o, stored) / 2)
                norm2 += float((o * o).sum())
                progress(o.numel() * stored.itemsize)
            comp2 += float((coeff * coeff).sum())
            slack2 += float((slack * slack).sum())
    check.after = (comp2, norm2)
    if method.scale_for(target.role, target.layer) != 1.0:
        return check, None  # only part of the component was removed: nothing to hold it against
    limit = math.sqrt(slack2) + COMPUTE_ULPS * arithmetic_eps(stored) * math.sqrt(norm2)
    if math.sqrt(comp2) > limit or not math.isfinite(comp2):
        share = math.sqrt(comp2 / norm2) if norm2 > 0 else 0.0
        allowed = limit / math.sqrt(norm2) if norm2 else 0.0
        return check, (f"component along the direction is {share:.3e} of the tensor's norm, more than rounding "
                       f"to {target.entry.dtype} can leave ({allowed:.1e}): not patched, or patched with another "
                       "direction")
    return check, None


def compare_bytes(src: RawReader, out: RawReader, entry: TensorEntry, progress: Progress) -> str | None:
    """None when ``entry``'s bytes are the same in both files; else where they first differ."""
    for first in range(0, entry.nbytes, COMPARE_BYTES):
        n = min(COMPARE_BYTES, entry.nbytes - first)
        a = src.raw(entry.begin + first, n, entry.name)
        b = out.raw(entry.begin + first, n, entry.name)
        if not torch.equal(a, b):
            at = first + int((a != b).nonzero()[0])
            return f"differs from the source (first at byte {at} of the tensor), but it is not patched"
        progress(n)
    return None

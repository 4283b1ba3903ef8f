"""Whether the tensors to patch are already abliterated along the direction: patching twice is refused.

A folder finished in place whose ``orthopatch.json`` was deleted, or a model abliterated by another tool,
carries no record of it; its tensors do. A fiber (a column of ``o_proj``/``down_proj``, a row of an
embedding) that was projected holds only rounding noise along the unit direction ``u``: its share
``|u·x| / |x|`` is about the stored dtype's rounding step, where an unpatched weight's is about
``1/sqrt(d)``. A few fibers of a few targets (at most :data:`SAMPLE_BYTES` read) tell them apart; the
conversion is refused only when every sampled target is at noise level.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import torch_dtype
from orthopatch.io.reader import open_source
from orthopatch.patch.plan import PatchPlan, PatchTarget
from orthopatch.patch.projection import Layout

#: Targets sampled (the first of each role, column-wise ones first) and fibers read from each.
SAMPLE_TARGETS = 3
SAMPLE_FIBERS = 256
#: Most bytes read in all.
SAMPLE_BYTES = 64 << 20


@dataclass(frozen=True)
class Share:
    """The root-mean-square share of ``u`` in the sampled fibers of one target, and the fibers' length."""

    target: PatchTarget
    rms: float
    dim: int


def noise_threshold(dtype: torch.dtype, dim: int) -> float:
    """The share below which a target counts as already projected: the geometric mean of a patched
    fiber's (about half the dtype's epsilon, at most) and an unpatched one's (``1/sqrt(dim)``), so that
    each side has a margin of ``sqrt(sqrt(dim) * eps / 2)`` or more (about 1.9 for bfloat16 at ``d = 16384``)."""
    return math.sqrt(torch.finfo(dtype).eps / 2 / math.sqrt(dim))


def _fibers(fd: int, target: PatchTarget, layout: Layout, stored: torch.dtype) -> torch.Tensor | None:
    """Up to :data:`SAMPLE_FIBERS` whole fibers along the residual axis of the first slab, as float64
    ``[fibers, dim]``; None when the tensor is too large to sample within budget or empty."""
    item = stored.itemsize
    entry = target.entry
    if layout.rowwise:
        count = min(layout.rows, SAMPLE_FIBERS)
        nbytes = count * layout.dim * item
        if nbytes == 0 or nbytes > SAMPLE_BYTES // SAMPLE_TARGETS:
            return None
        data = os.pread(fd, nbytes, entry.begin)
        return torch.frombuffer(bytearray(data), dtype=stored).view(count, layout.dim).to(torch.float64)
    count = min(layout.cols, SAMPLE_FIBERS)
    if count == 0 or layout.dim * count * item > SAMPLE_BYTES // SAMPLE_TARGETS:
        return None
    row_bytes = layout.cols * item
    rows = bytearray()
    for r in range(layout.dim):  # the first ``count`` values of each row of the first slab
        rows += os.pread(fd, count * item, entry.begin + r * row_bytes)
    if len(rows) != layout.dim * count * item:
        return None
    return torch.frombuffer(rows, dtype=stored).view(layout.dim, count).to(torch.float64).T


def sampled_targets(plan: PatchPlan) -> list[PatchTarget]:
    """The targets sampled: the first of each role, column-wise ones (an attention output, an MLP down)
    first, at most :data:`SAMPLE_TARGETS`."""
    first: dict[str, PatchTarget] = {}
    for target in plan.targets():
        if target.entry.dtype in ("BF16", "F16", "F32", "F64"):
            first.setdefault(target.role, target)
    ordered = sorted(first.values(), key=lambda t: Layout.of(t.entry.shape, t.axis).rowwise)
    return ordered[:SAMPLE_TARGETS]


def direction_shares(plan: PatchPlan, unit_vectors: dict[str, torch.Tensor]) -> list[Share]:
    """The share of each sampled target's unit vector in its sampled fibers."""
    shares = []
    for target in sampled_targets(plan):
        stored = torch_dtype(target.entry.dtype)
        layout = Layout.of(target.entry.shape, target.axis)
        path = plan.checkpoint.root / target.shard
        try:
            with open_source(path) as fd:
                fibers = _fibers(fd, target, layout, stored)
        except OSError:
            continue
        if fibers is None:
            continue
        norms = fibers.norm(dim=1)
        keep = torch.isfinite(norms) & (norms > 0)
        if not bool(keep.any()):
            continue
        u = unit_vectors[target.name].to(torch.float64)
        share = (fibers[keep] @ u).abs() / norms[keep]
        shares.append(Share(target, float(share.square().mean().sqrt()), layout.dim))
    return shares


def refuse_if_already_abliterated(plan: PatchPlan, unit_vectors: dict[str, torch.Tensor], root: Path) -> None:
    """Refuse (one line) a conversion whose sampled targets are all at noise level along the direction."""
    shares = direction_shares(plan, unit_vectors)
    if not shares:
        return
    noisy = [s for s in shares
             if s.rms < noise_threshold(torch_dtype(s.target.entry.dtype), s.dim)]
    if len(noisy) < len(shares):
        return
    worst = max(shares, key=lambda s: s.rms)
    raise OrthopatchError(
        f"already abliterated along this direction? its share in {len(shares)} sampled tensors is at rounding-"
        f"noise level (at most {worst.rms:.2g}, where an unpatched weight's is about {1 / math.sqrt(worst.dim):.2g});"
        " patching again would only add rounding: use --force to convert anyway",
        path=root / worst.target.shard, tensor=worst.target.name)

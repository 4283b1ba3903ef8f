"""No path writes a non-finite value the source did not hold: a result that overflows the stored dtype
once rounded (finite coefficients, values near bfloat16's largest) is refused in one line, by the
read-only check an in-place run makes first and by the patch itself out of place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import INPLACE_JOURNAL_DIR as JOURNAL_DIR
from orthopatch.io.formats import RECORD_NAME
from orthopatch.io.safetensors_header import read_header
from orthopatch.patch.apply import ApplyOptions, prepare
from orthopatch.patch.conversion import target_directions
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.stream import TensorPatcher
from tests import test_inplace
from tests.helpers import one_error_line, one_tensor_file, run_orthopatch, stream_one, untouched
from tests.test_inplace import fresh_copy, rewrite_tensor

tiny = test_inplace.tiny  # the module's fixture: a small model with a card, its direction, the reference

BF16_MAX = torch.finfo(torch.bfloat16).max


def overflowing(w: torch.Tensor, u: torch.Tensor, axis: int, fiber: int = 3) -> torch.Tensor:
    """``w`` with one fiber along ``axis`` (a column of an ``o_proj``, a row of an embedding) holding two
    values at bfloat16's largest, signed so that the projection pushes one of them past it while the
    coefficient stays finite: ``x_b - (x·u) u_b`` grows by ``|u_b| (|u_a| - |u_b|)`` of the largest."""
    order = u.abs().argsort(descending=True)
    a = int(order[0])
    b = int(min(order[1:], key=lambda i: abs(abs(float(u[i])) - abs(float(u[a])) / 2)))
    w = w.clone().movedim(axis, -1)
    w[..., fiber, :] = 0
    w[..., fiber, a] = BF16_MAX * float(torch.sign(u[a]))
    w[..., fiber, b] = -BF16_MAX * float(torch.sign(u[b]))
    return w.movedim(-1, axis).contiguous()


@pytest.mark.parametrize("shape, axis", [((64, 40), 0), ((40, 64), 1)])
def test_a_result_past_the_dtype_is_refused_by_patch_and_by_check(tmp_path: Path, shape, axis) -> None:
    gen = torch.Generator().manual_seed(3)
    u = unit_direction(torch.randn(shape[axis], generator=gen, dtype=torch.float64))
    w = overflowing((0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16), u, axis)
    assert bool(torch.isfinite(w).all())
    with pytest.raises(OrthopatchError, match="the projection overflows"):
        stream_one(tmp_path, w, u, axis)
    src = tmp_path / "check.safetensors"
    one_tensor_file(src, {"w": w})
    target = PatchTarget(entry=read_header(src).entry("w"), shard=src.name, role="test", axis=axis, layer=0)
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(OrthopatchError, match="the projection overflows"):
            TensorPatcher("cpu").check(fd, target, u, src)
    finally:
        os.close(fd)


def overflow_the_last_o_proj(work: Path, direction: Path) -> None:
    plan, loaded = prepare(ApplyOptions(model=work, direction=direction))
    last = [t for t in plan.targets() if t.axis == 0 and len(t.entry.shape) == 2][-1]
    u = target_directions(plan, loaded)[last.name]
    rewrite_tensor(work, last, lambda t: overflowing(t, u, 0).to(torch.bfloat16))


def test_in_place_refuses_an_overflowing_result_before_any_byte_changes(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    overflow_the_last_o_proj(work, direction)
    with untouched(work):
        line = one_error_line(run_orthopatch("apply", work, direction, "--in-place", "-q"))
    assert "the projection overflows" in line and "bfloat16" in line, line
    assert not (work / JOURNAL_DIR).exists()


def test_out_of_place_refuses_an_overflowing_result_and_leaves_no_complete_output(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    overflow_the_last_o_proj(work, direction)
    out = tmp_path / "out"
    with untouched(work):
        line = one_error_line(run_orthopatch("apply", work, direction, "-o", out, "-q"))
    assert "the projection overflows" in line, line
    assert not (out / RECORD_NAME).exists()

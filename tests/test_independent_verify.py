"""``verify --source`` is a second opinion: a bug in the kernel's arithmetic cannot pass its own check."""

from __future__ import annotations

import pytest

from orthopatch.patch import kernel, projection
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.plan import Selection
from orthopatch.patch.record import Method
from orthopatch.verify import VerifyOptions, verify
from tests.helpers import TINY, save_direction, tiny_llama

ATTN = "model.layers.{}.self_attn.o_proj.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("independent")
    direction = root / "r.pth"
    save_direction(direction, TINY.hidden)
    return tiny_llama(root / "model"), direction


def convert_and_verify(model, out, method: Method) -> list[str | None]:
    src, direction = model
    apply(ApplyOptions(model=src, direction=direction, out=out, quiet=True, method=method))
    report = verify(VerifyOptions(out=out, direction=direction, source=src, quiet=True))
    return [f.tensor for f in report.failures]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_wrong_norm_preserving_factor_in_the_kernel_fails_verify(model, tmp_path, monkeypatch, scale) -> None:
    method = Method(Selection(frozenset({0, 1})), scale=scale, norm_preserving=True)
    assert convert_and_verify(model, tmp_path / "right", method) == []

    right = projection.restore_norms

    def slightly_wrong(sumsq, coeff, scale):  # 0.1% too large: the norms come back a little wrong
        return right(sumsq, coeff, scale) * (1 + 2 ** -10)

    monkeypatch.setattr(projection, "restore_norms", slightly_wrong)  # rows
    monkeypatch.setattr(kernel, "restore_norms", slightly_wrong)  # columns
    failed = convert_and_verify(model, tmp_path / "wrong", method)
    assert EMBED in failed and ATTN.format(0) in failed and ATTN.format(1) in failed


def test_a_wrong_first_pass_in_the_kernel_fails_verify(model, tmp_path, monkeypatch) -> None:
    right = kernel.accumulate_columns

    def first_row_missing(block, u_part, coeff, sumsq=None, scratch=None):  # uᵀW without each block's first row
        right(block[1:], u_part[1:], coeff, sumsq)

    monkeypatch.setattr(kernel, "accumulate_columns", first_row_missing)
    failed = convert_and_verify(model, tmp_path / "wrong", Method())
    assert ATTN.format(0) in failed and EMBED not in failed  # row-wise tensors need no first pass

"""The pure projection against a float64 reference, on random tensors of every supported dtype."""

import pytest
import torch

from orthopatch.patch.kernel import project_out
from orthopatch.patch.projection import Layout, unit_direction
from tests.helpers import assert_correctly_rounded, random_case

CASES = [
    ((257, 96), 0),  # nn.Linear [d_model, d_in]: o_proj, down_proj
    ((96, 257), 1),  # embedding / Conv1D [.., d_model]
    ((3, 40, 257), 2),  # fused experts, residual axis last
    ((4, 257, 33), 1),  # fused experts, residual axis in the middle
    ((257,), 0),  # a bias
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,axis", CASES)
def test_matches_float64_reference(dtype, shape, axis):
    w, u = random_case(shape, axis, dtype, seed=hash((shape, axis)) % 2**31)
    out = project_out(w, u, axis)
    assert out.dtype == dtype and out.shape == w.shape
    assert_correctly_rounded(out, w, u, axis, name=f"{dtype}{shape}")


def test_removes_the_component():
    w, u = random_case((512, 300), 0, torch.bfloat16, seed=0)
    before = (u @ w.double()).norm() / w.double().norm()
    after = (u @ project_out(w, u, 0).double()).norm() / w.double().norm()
    assert before > 0.02
    assert after < 2e-3  # bf16 rounding noise


def test_result_does_not_depend_on_block_size():
    w, u = random_case((300, 200), 0, torch.bfloat16, seed=1)
    small = project_out(w, u, 0, block_elements=1000)
    large = project_out(w, u, 0, block_elements=1 << 20)
    assert_correctly_rounded(small, w, u, 0)
    assert_correctly_rounded(large, w, u, 0)


def test_gain_weighted_direction_makes_the_normed_output_orthogonal():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(64, generator=gen, dtype=torch.float64)
    r /= r.norm()
    gain = torch.randn(64, generator=gen, dtype=torch.float64)
    w = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    out = project_out(w, unit_direction(r, gain, 1.0), 0)
    y = out @ torch.randn(32, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(r @ ((1.0 + gain)[:, None] * y), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_layout():
    assert Layout.of((8, 4), 0) == Layout(1, 8, 4)
    assert Layout.of((3, 5, 8), 2) == Layout(15, 8, 1) and Layout.of((3, 5, 8), 2).rowwise
    assert Layout.of((3, 8, 5), 1) == Layout(3, 8, 5)

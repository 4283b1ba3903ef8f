"""The float64 reference of the projection and the rounding rule patched tensors must meet."""

from __future__ import annotations

import torch

INT_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def reference(w: torch.Tensor, u: torch.Tensor, axis: int, scale: float = 1.0) -> torch.Tensor:
    """``w`` projected in float64: every fiber along ``axis`` loses ``scale`` times its ``u`` component."""
    x = w.to(torch.float64).movedim(axis, -1)
    u = u.to(torch.float64)
    return (x - scale * (x @ u).unsqueeze(-1) * u).movedim(-1, axis)


def operand_scale(w: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """``|W| + |u|·Σ|W||u|`` per element: what float32 arithmetic can promise near cancellation."""
    x = w.to(torch.float64).movedim(axis, -1).abs()
    a = u.to(torch.float64).abs()
    return (x + (x @ a).unsqueeze(-1) * a).movedim(-1, axis)


def assert_correctly_rounded(out: torch.Tensor, w: torch.Tensor, u: torch.Tensor, axis: int,
                             scale: float = 1.0, name: str = "") -> None:
    """Equal to the float64 result rounded to the stored dtype, except ≤0.1% of elements, each
    within one ulp, or (where the result cancels to almost zero) within a few float32 ulps of the operands."""
    exact = reference(w, u, axis, scale)
    rounded = exact.to(out.dtype)
    bad = out != rounded
    fraction = bad.double().mean().item() if out.numel() else 0.0
    assert fraction <= 1e-3, f"{name}: {fraction:.4%} of elements differ from the rounded float64 result"
    if not bad.any():
        return
    iv = INT_VIEWS[out.dtype]
    ulps = (out.view(iv).long() - rounded.view(iv).long()).abs()
    near_zero = (out.to(torch.float64) - exact).abs() <= 8 * torch.finfo(torch.float32).eps * operand_scale(w, u, axis)
    ok = (ulps <= 1) | near_zero
    assert bool(ok[bad].all()), f"{name}: elements off by more than one ulp: {ulps[bad & ~ok][:5].tolist()}"

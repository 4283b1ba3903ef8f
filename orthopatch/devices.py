"""Pick the torch device that does the arithmetic."""

from __future__ import annotations

import torch

from orthopatch.errors import OrthopatchError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OrthopatchError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise OrthopatchError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise OrthopatchError(f"--device {spec}: torch sees no CUDA device on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise OrthopatchError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device

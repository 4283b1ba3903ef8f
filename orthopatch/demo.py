"""``orthopatch demo``: build a small Llama-shaped checkpoint, convert it, and check the result."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .apply import ApplyOptions, apply
from .checkpoint import open_checkpoint
from .synthetic import DEMO, write_checkpoint, write_direction


def run_demo(folder: Path, quiet: bool = False) -> list[str]:
    """Return report lines; raise AssertionError if the converted model is not what it must be."""
    model, direction_path = folder / "Llama-demo", folder / "refusal_dir.pth"
    if not (model / "config.json").exists():
        write_checkpoint(model, DEMO, shard_bytes=4 << 20)
    r = write_direction(direction_path, DEMO.hidden)
    result = apply(ApplyOptions(model=model, direction=direction_path, quiet=quiet, overwrite=True))
    patched = {t.name: t for t in result.plan.targets()}
    src, out = open_checkpoint(model), open_checkpoint(result.out)
    worst = 0.0
    for shard in src.shards:
        with safe_open(src.root / shard, "pt") as a, safe_open(out.root / shard, "pt") as b:
            for name in a.keys():
                before, after = a.get_tensor(name), b.get_tensor(name)
                if name not in patched:
                    assert torch.equal(before.view(torch.uint8) if before.dim() else before,
                                       after.view(torch.uint8) if after.dim() else after), f"{name} changed"
                    continue
                w = after.to(torch.float64).movedim(patched[name].axis, -1)
                along = torch.linalg.vector_norm(w @ r) / torch.linalg.vector_norm(w)
                before_along = torch.linalg.vector_norm(before.to(torch.float64).movedim(patched[name].axis, -1) @ r)
                assert along < 1e-2, f"{name}: component along r is {along:.2e}"
                assert before_along / torch.linalg.vector_norm(w) > 1e-2, f"{name}: source had no component"
                worst = max(worst, float(along))
    return [
        f"source: {model} ({src.total_bytes:,} bytes, {len(src.shards)} shards)",
        f"output: {result.out} ({result.state})",
        f"{len(patched)} tensors patched; largest remaining component along the direction: {worst:.2e}",
        "every other tensor is byte-identical to the source",
    ]

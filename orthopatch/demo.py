"""``orthopatch demo``: build a small Llama-shaped checkpoint, convert it, and verify the result."""

from __future__ import annotations

import os
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import CONFIG_NAME
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.synthetic import DEMO, write_checkpoint, write_direction
from orthopatch.verify import VerifyOptions, format_table, summary, verify


def run_demo(folder: Path, quiet: bool = False) -> list[str]:
    """Return report lines; raise :class:`OrthopatchError` if ``verify`` finds the output wrong."""
    model, direction_path = folder / "Llama-demo", folder / "refusal_dir.pth"
    try:
        if not (model / CONFIG_NAME).exists():
            write_checkpoint(model, DEMO, shard_bytes=4 << 20)
        write_direction(direction_path, DEMO.hidden)
    except OSError as exc:
        raise OrthopatchError(f"cannot write the demo's model ({exc.strerror or exc})",
                              path=exc.filename or folder) from None
    result = apply(ApplyOptions(model=model, direction=direction_path, quiet=quiet, overwrite=True))
    report = verify(VerifyOptions(out=result.out, direction=direction_path, source=model, quiet=quiet))
    if not report.ok:
        raise report.failures[0]
    lines = [
        f"source: {model} ({result.plan.total_bytes:,} bytes, {len(result.plan.shards)} shards)",
        f"output: {result.out} ({result.state})",
        format_table(report),
        summary(report),
        "",
        *next_steps(model, direction_path, result.out),
    ]
    if not any(c.before and c.before[0] > 0 for c in report.checks):
        raise OrthopatchError("the demo direction has no component in the source: nothing was tested")
    return lines


def next_steps(model: Path, direction: Path, out: Path) -> list[str]:
    """Where the demo's files are, and commands to try on them (paths as the user gave the folder)."""
    if not model.is_absolute():
        out = Path(os.path.relpath(out))
    return [
        f"model: {model}   direction: {direction}   output: {out}",
        "try next (with orthopatch on your PATH, e.g. after . .venv/bin/activate):",
        f"  orthopatch apply {model} {direction} --dry-run   # the plan, tensor by tensor",
        f"  orthopatch verify {out} --direction {direction} --source {model}   # check the output again",
        f"  orthopatch apply {model} {direction} -o {model.parent / 'partial'} --layers 1:3 --scale 0.5"
        "   # a partial ablation",
    ]

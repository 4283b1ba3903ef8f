"""``orthopatch demo``: build a small Llama-shaped checkpoint, convert it, and verify the result."""

from __future__ import annotations

from pathlib import Path

from .apply import ApplyOptions, apply
from .errors import OrthopatchError
from .formats import CONFIG_NAME
from .synthetic import DEMO, write_checkpoint, write_direction
from .verify import VerifyOptions, format_table, summary, verify


def run_demo(folder: Path, quiet: bool = False) -> list[str]:
    """Return report lines; raise :class:`OrthopatchError` if ``verify`` finds the output wrong."""
    model, direction_path = folder / "Llama-demo", folder / "refusal_dir.pth"
    if not (model / CONFIG_NAME).exists():
        write_checkpoint(model, DEMO, shard_bytes=4 << 20)
    write_direction(direction_path, DEMO.hidden)
    result = apply(ApplyOptions(model=model, direction=direction_path, quiet=quiet, overwrite=True))
    report = verify(VerifyOptions(out=result.out, direction=direction_path, source=model, quiet=quiet))
    if not report.ok:
        raise report.failures[0]
    lines = [
        f"source: {model} ({result.plan.total_bytes:,} bytes, {len(result.plan.shards)} shards)",
        f"output: {result.out} ({result.state})",
        format_table(report),
        summary(report),
    ]
    if not any(c.before and c.before[0] > 0 for c in report.checks):
        raise OrthopatchError("the demo direction has no component in the source: nothing was tested")
    return lines

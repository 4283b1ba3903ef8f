"""What ``verify`` found: the per-tensor measurements, the failures, and how they are shown."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.patch.architecture import ROLES


@dataclass
class TensorCheck:
    """One patched tensor: its share along the direction, ``‖component along u‖ / ‖W‖``, before and after."""

    name: str
    role: str
    layer: int | None
    before: tuple[float, float] | None = None  # (component², norm²) of the source, where known
    after: tuple[float, float] | None = None  # (component², norm²) of the output
    detail: str = ""
    nonfinite: int = 0  # NaN and Inf values in the output tensor

    def count_nonfinite(self, values: torch.Tensor) -> None:
        self.nonfinite += values.numel() - int(torch.isfinite(values).sum())


@dataclass
class VerifyReport:
    out: Path
    source: Path | None
    failures: list[OrthopatchError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[TensorCheck] = field(default_factory=list)
    identical: int = 0  # unchanged tensors compared byte for byte
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str, *, path: Path | None = None, tensor: str | None = None) -> None:
        self.failures.append(OrthopatchError(message, path=path, tensor=tensor))


def _fraction(sums: tuple[float, float] | None) -> float | None:
    if sums is None:
        return None
    comp2, norm2 = sums
    return math.sqrt(comp2 / norm2) if norm2 > 0 else 0.0


def _combine(checks: list[TensorCheck], which: str) -> float | None:
    sums = [getattr(c, which) for c in checks]
    if any(s is None for s in sums) or not sums:
        return None
    return _fraction((sum(s[0] for s in sums), sum(s[1] for s in sums)))


def _cell(checks: list[TensorCheck]) -> str:
    if not checks:
        return "-"
    before, after = _combine(checks, "before"), _combine(checks, "after")
    after_text = f"{after:.2e}" if after is not None else "?"
    return f"{before:.2e} -> {after_text}" if before is not None else after_text


def format_table(report: VerifyReport) -> str:
    """Per layer and role: the share of the patched matrices along the direction, ``‖uᵀW‖/‖W‖``."""
    if not report.checks:
        return "no patched tensor checked"
    roles = [r for r in ROLES if any(c.role == r and c.layer is not None for c in report.checks)]
    roles += sorted({c.role for c in report.checks if c.layer is not None} - set(roles))
    head = "before -> after" if report.source is not None else "after"
    widths = [max(len(f"{r} ({head})"), 22) for r in roles]
    lines = ["share of each matrix along the direction, |u^T W| / |W|"]
    if roles:
        titles = [f"{r} ({head})".ljust(w) for r, w in zip(roles, widths, strict=True)]
        lines.append("  ".join(["layer".rjust(9), *titles]))
        for layer in sorted({c.layer for c in report.checks if c.layer is not None}):
            cells = [_cell([c for c in report.checks if c.layer == layer and c.role == r]) for r in roles]
            lines.append("  ".join([str(layer).rjust(9), *(c.ljust(w) for c, w in zip(cells, widths, strict=True))]))
    for role in sorted({c.role for c in report.checks if c.layer is None}):
        lines.append(f"{role.rjust(9)}  {_cell([c for c in report.checks if c.layer is None and c.role == role])}")
    return "\n".join(line.rstrip() for line in lines)


def summary(report: VerifyReport) -> str:
    n = len(report.checks)
    if report.source is not None:
        what = (f"{n} patched tensors equal the source projected (float64, rounded once), "
                f"{report.identical} others byte-identical to the source")
    elif report.notes and any(note.startswith("scale") for note in report.notes):
        what = f"{n} patched tensors measured (not checkable without --source at this scale)"
    else:
        what = f"{n} patched tensors have no component along the direction beyond what rounding can leave"
    if report.ok:
        return f"{report.out}: verified: {what}; {report.checked_bytes:,} bytes read"
    return f"{report.out}: FAILED: {len(report.failures)} problem(s)"

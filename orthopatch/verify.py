"""``orthopatch verify``: re-open an output folder and check every tensor, streaming like ``apply``.

Structure first: the record, no interrupted-run marker or temporaries, every shard header valid and
the index agreeing with the shards. Then the data, tensor by tensor in row blocks read with
``pread`` into reused buffers (memory stays bounded whatever the shard size):

- with ``--source``: names, dtypes, shapes and offsets equal the source's; every tensor that is not
  patched is byte-identical; every patched tensor equals the source projected in float64 and
  rounded to its dtype, except at most 0.1% of elements one ulp away, and except near-zero results
  of cancellation, where only an absolute error of a few compute-dtype ulps of the operands
  (``|W|`` and ``|α||u|·Σ|W||u|``) is promised (DESIGN.md §2);
- without it: every patched tensor has no component along its direction beyond what rounding to
  its dtype can leave (when the scale is 1; other scales remove only part of it).

The plan is rebuilt with the options recorded in ``orthopatch.json`` and each target's own unit
vector (its layer's row of the direction, weighted by its norm gain), as ``apply`` built them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architecture import ROLES, choose_architecture
from .checkpoint import Checkpoint, open_checkpoint
from .direction import Direction, load_direction
from .errors import OrthopatchError
from .executor import target_directions
from .filecopy import pread_into
from .formats import CONFIG_NAME, INDEX_NAME, PARTIAL_NAME, RECORD_NAME, torch_dtype
from .output import shared_lock, temporaries
from .plan import PatchPlan, PatchTarget, build_plan
from .progress import ByteProgress
from .projection import Layout, accumulate_columns, column_factor, compute_dtype
from .reader import open_source
from .record import Method, Record
from .safetensors_header import ShardHeader, TensorEntry

#: Elements per block of float64 work (8 MiB per temporary).
CHUNK_ELEMENTS = 1 << 20
#: Bytes per block when comparing unchanged tensors.
COMPARE_BYTES = 8 << 20
#: Share of a tensor's elements that may be one ulp from the correctly rounded result.
NEAR_FRACTION = 1e-3
#: Near cancellation: allowed absolute error, in compute-dtype ulps of the operands.
CANCEL_ULPS = 8
#: Without a source: the component left along ``u`` may exceed what rounding can leave by this many
#: compute-dtype ulps of the tensor's norm.
COMPUTE_ULPS = 32

Log = Callable[[str], None]


@dataclass(frozen=True)
class VerifyOptions:
    """Everything ``verify`` needs; the CLI only builds one of these."""

    out: Path
    direction: Path
    source: Path | None = None
    quiet: bool = False
    chunk_elements: int = CHUNK_ELEMENTS


@dataclass
class TensorCheck:
    """One patched tensor: its share along the direction, ``‖component along u‖ / ‖W‖``, before and after."""

    name: str
    role: str
    layer: int | None
    before: tuple[float, float] | None = None  # (component², norm²) of the source, where known
    after: tuple[float, float] | None = None  # (component², norm²) of the output
    detail: str = ""


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


# --- reading ---------------------------------------------------------------------------------------

class RowReader:
    """Rows of tensors of one file, read with ``pread`` into a buffer reused from block to block."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        self._raw = torch.empty(0, dtype=torch.uint8)

    def raw(self, offset: int, nbytes: int, tensor: str) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        view = self._raw[:nbytes]
        try:
            pread_into(self.fd, memoryview(view.numpy()), offset)
        except (OSError, EOFError) as exc:
            raise OrthopatchError(f"cannot read tensor data ({exc})", path=self.path, tensor=tensor) from None
        return view

    def rows(self, entry: TensorEntry, width: int, first: int, n: int) -> torch.Tensor:
        """Rows ``first .. first+n`` of ``entry`` seen as ``[rows, width]``, as float64."""
        stored = torch_dtype(entry.dtype)
        row_bytes = width * stored.itemsize
        raw = self.raw(entry.begin + first * row_bytes, n * row_bytes, entry.name)
        return raw.view(stored).view(n, width).to(torch.float64)


# --- the rounding rule -----------------------------------------------------------------------------

def ulp(x: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The spacing of ``stored`` values at the magnitude of ``x`` (float64), subnormals included."""
    info = torch.finfo(stored)
    lowest = round(math.log2(info.tiny))  # below it, subnormals: the spacing stays that of the smallest normals
    _, exponent = torch.frexp(x)  # |x| = m·2^e with 0.5 <= m < 1, so floor(log2|x|) = e - 1
    floor_log2 = torch.where(x == 0, lowest, exponent - 1).clamp_min(lowest)
    return torch.ldexp(torch.full_like(x, info.eps), floor_log2)


@dataclass
class RoundingTally:
    """How a patched tensor's elements compare with the float64 reference."""

    stored: torch.dtype
    numel: int = 0
    near: int = 0  # one ulp from the correctly rounded value
    bad: int = 0  # further than that, and not explained by cancellation
    first_bad: tuple[int, float, float] | None = None  # (element index, found, expected)

    def add(self, out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, first_element: int) -> None:
        eps = torch.finfo(compute_dtype(self.stored)).eps
        rounded = ref.to(self.stored).to(torch.float64)
        ok = (out == rounded) | (out.isnan() & rounded.isnan())
        ok |= (out - ref).abs() <= CANCEL_ULPS * eps * bound
        near = (out - rounded).abs() <= ulp(torch.maximum(out.abs(), rounded.abs()), self.stored)
        bad = ~(ok | near)
        self.numel += out.numel()
        self.near += int((near & ~ok).sum())
        n_bad = int(bad.sum())
        if n_bad and self.first_bad is None:
            i = int(bad.flatten().nonzero()[0])
            self.first_bad = (first_element + i, float(out.flatten()[i]), float(rounded.flatten()[i]))
        self.bad += n_bad

    def problem(self) -> str | None:
        allowed = math.ceil(self.numel * NEAR_FRACTION)
        if self.bad:
            index, found, expected = self.first_bad or (0, 0.0, 0.0)
            return (f"{self.bad} of {self.numel} elements differ from the source projected by more than one ulp "
                    f"(element {index}: {found!r}, expected {expected!r})")
        if self.near > allowed:
            return (f"{self.near} of {self.numel} elements are one ulp from the correctly rounded result; "
                    f"at most {allowed} (0.1%) may be")
        return None


# --- the checks of one tensor ----------------------------------------------------------------------

def _blocks(total: int, step: int) -> Iterator[tuple[int, int]]:
    for first in range(0, total, step):
        yield first, min(step, total - first)


def check_against_source(src: RowReader, out: RowReader, target: PatchTarget, u: torch.Tensor, method: Method,
                         chunk_elements: int, progress: Callable[[int], None]) -> tuple[TensorCheck, str | None]:
    """Compare a patched tensor with its source projected in float64, block by block."""
    entry, scale = target.entry, method.scale
    check = TensorCheck(entry.name, target.role, target.layer)
    layout = Layout.of(entry.shape, target.axis)
    width = layout.dim if layout.rowwise else layout.cols
    step = max(1, chunk_elements // max(width, 1))
    tally = RoundingTally(torch_dtype(entry.dtype))
    u_abs = u.abs()
    before = [0.0, 0.0]
    after = [0.0, 0.0]
    row_bytes = width * tally.stored.itemsize

    if layout.rowwise:
        for first, n in _blocks(layout.batches, step):
            x, o = src.rows(entry, width, first, n), out.rows(entry, width, first, n)
            coeff = torch.mv(x, u)
            ref = x - scale * torch.outer(coeff, u)
            bound = x.abs() + abs(scale) * torch.outer(torch.mv(x.abs(), u_abs), u_abs)
            if method.norm_preserving:
                factor = column_factor(coeff, x.square().sum(dim=1), scale).unsqueeze(1)
                ref, bound = ref * factor, bound * factor
            tally.add(o, ref, bound, first * width)
            before[0] += float(coeff.square().sum())
            before[1] += float(x.square().sum())
            after[0] += float(torch.mv(o, u).square().sum())
            after[1] += float(o.square().sum())
            progress(n * row_bytes)
    else:
        for b in range(layout.batches):
            base = b * layout.dim
            coeff = torch.zeros(layout.cols, dtype=torch.float64)
            abs_coeff = torch.zeros_like(coeff)
            sumsq = torch.zeros_like(coeff) if method.norm_preserving else None
            for first, n in _blocks(layout.dim, step):
                x = src.rows(entry, width, base + first, n)
                accumulate_columns(x, u[first:first + n], coeff, sumsq)
                abs_coeff.addmv_(x.abs().t(), u_abs[first:first + n])
                before[1] += float(x.square().sum())
            before[0] += float(coeff.square().sum())
            factor = column_factor(coeff, sumsq, scale) if sumsq is not None else None
            out_coeff = torch.zeros_like(coeff)
            for first, n in _blocks(layout.dim, step):
                x, o = src.rows(entry, width, base + first, n), out.rows(entry, width, base + first, n)
                part = u[first:first + n]
                ref = x - scale * torch.outer(part, coeff)
                bound = x.abs() + abs(scale) * torch.outer(part.abs(), abs_coeff)
                if factor is not None:
                    ref, bound = ref * factor, bound * factor
                tally.add(o, ref, bound, (base + first) * width)
                out_coeff.addmv_(o.t(), part)
                after[1] += float(o.square().sum())
                progress(n * row_bytes)
            after[0] += float(out_coeff.square().sum())
    check.before, check.after = (before[0], before[1]), (after[0], after[1])
    if tally.near:
        check.detail = f"{tally.near} element(s) one ulp off"
    return check, tally.problem()


def check_orthogonal(out: RowReader, target: PatchTarget, u: torch.Tensor, method: Method, chunk_elements: int,
                     progress: Callable[[int], None]) -> tuple[TensorCheck, str | None]:
    """Measure what is left along ``u`` and hold it against what rounding to the stored dtype can leave.

    Rounding each element of the exact result moves it by at most half an ulp, so the component of a
    unit (row or column) ``x`` along ``u`` can be at most ``Σ|uᵢ|·ulp(xᵢ)/2`` away from zero. The
    errors are not independent noise: where the projection shifts an element by less than half an
    ulp, rounding undoes the shift, so the bound, not a random-noise estimate, is what may be held
    against.
    """
    entry = target.entry
    check = TensorCheck(entry.name, target.role, target.layer)
    stored = torch_dtype(entry.dtype)
    layout = Layout.of(entry.shape, target.axis)
    width = layout.dim if layout.rowwise else layout.cols
    step = max(1, chunk_elements // max(width, 1))
    u_abs = u.abs()
    comp2 = norm2 = slack2 = 0.0
    row_bytes = width * stored.itemsize
    if layout.rowwise:
        for first, n in _blocks(layout.batches, step):
            o = out.rows(entry, width, first, n)
            comp2 += float(torch.mv(o, u).square().sum())
            norm2 += float(o.square().sum())
            slack2 += float(torch.mv(ulp(o, stored) / 2, u_abs).square().sum())
            progress(n * row_bytes)
    else:
        for b in range(layout.batches):
            base = b * layout.dim
            coeff = torch.zeros(layout.cols, dtype=torch.float64)
            slack = torch.zeros_like(coeff)
            for first, n in _blocks(layout.dim, step):
                o = out.rows(entry, width, base + first, n)
                coeff.addmv_(o.t(), u[first:first + n])
                slack.addmv_((ulp(o, stored) / 2).t(), u_abs[first:first + n])
                norm2 += float(o.square().sum())
                progress(n * row_bytes)
            comp2 += float(coeff.square().sum())
            slack2 += float(slack.square().sum())
    check.after = (comp2, norm2)
    if method.scale != 1.0:
        return check, None  # only part of the component was removed: nothing to hold it against
    eps = torch.finfo(compute_dtype(stored)).eps
    limit = math.sqrt(slack2) + COMPUTE_ULPS * eps * math.sqrt(norm2)
    if math.sqrt(comp2) > limit or not math.isfinite(comp2):
        share, allowed = _fraction((comp2, norm2)), limit / math.sqrt(norm2) if norm2 else 0.0
        return check, (f"component along the direction is {share:.3e} of the tensor's norm, more than rounding "
                       f"to {entry.dtype} can leave ({allowed:.1e}): not patched, or patched with another direction")
    return check, None


def compare_bytes(src: RowReader, out: RowReader, entry: TensorEntry, progress: Callable[[int], None]) -> str | None:
    """None when ``entry``'s bytes are the same in both files; else where they first differ."""
    for first, n in _blocks(entry.nbytes, COMPARE_BYTES):
        a = src.raw(entry.begin + first, n, entry.name)
        b = out.raw(entry.begin + first, n, entry.name)
        if not torch.equal(a, b):
            at = first + int((a != b).nonzero()[0])
            return f"differs from the source (first at byte {at} of the tensor), but it is not patched"
        progress(n)
    return None


# --- the folder ------------------------------------------------------------------------------------

def _plan(checkpoint: Checkpoint, method: Method) -> PatchPlan:
    return build_plan(checkpoint, choose_architecture(checkpoint, method.targets), method.selection)


def _check_folder(report: VerifyReport, out: Path) -> Record | None:
    """The record (or None), with failures for what an unfinished or interrupted run leaves."""
    record = None
    record_path = out / RECORD_NAME
    if not record_path.is_file():
        report.fail("no orthopatch.json: the conversion did not finish (or this is not an orthopatch output)",
                    path=out)
    else:
        try:
            record = Record.read(record_path)
        except OrthopatchError as exc:
            report.failures.append(exc)
    if (out / PARTIAL_NAME).exists():
        report.fail("an interrupted run's marker is present: rerun the same apply command to finish", path=out)
    for tmp in temporaries(out):
        report.fail("temporary file left by an interrupted run", path=tmp)
    return record


def _check_record(report: VerifyReport, record: Record | None, plan: PatchPlan, direction: Direction) -> None:
    if record is None:
        return
    path = report.out / RECORD_NAME
    if record.direction.sha256 != direction.sha256:
        report.fail("is not the direction file this output was made with (its sha256 differs from the record's)",
                    path=direction.path)
    names = [t.name for t in record.tensors_patched]
    planned = [t.name for t in plan.targets()]
    if names != planned:
        unlisted = [n for n in planned if n not in names] + [n for n in names if n not in planned]
        odd = unlisted[0] if unlisted else None
        report.fail(f"the record lists {len(names)} patched tensors where the plan has {len(planned)}",
                    path=path, tensor=odd)


def _check_structure(report: VerifyReport, src: Checkpoint, out: Checkpoint) -> set[str]:
    """Shards, headers, index and config as in the source; the shards whose data can be compared."""
    comparable = set()
    for name in sorted(set(src.shards) | set(out.shards)):
        if name not in out.shards:
            report.fail(f"shard {name} of the source is missing", path=out.root)
        elif name not in src.shards:
            report.fail(f"shard {name} is not in the source", path=out.root)
        elif (mismatch := _header_mismatch(src.shards[name], out.shards[name])) is not None:
            tensor, message = mismatch
            report.fail(message, path=out.shards[name].path, tensor=tensor)
        else:
            comparable.add(name)
    if src.weight_map != out.weight_map:
        odd = next(n for n in sorted(set(src.weight_map) | set(out.weight_map))
                   if src.weight_map.get(n) != out.weight_map.get(n))
        report.fail("the index places this tensor differently from the source's", path=out.root / INDEX_NAME,
                    tensor=odd)
    src_config, out_config = src.root / CONFIG_NAME, out.root / CONFIG_NAME
    if src_config.is_file() and (not out_config.is_file() or src_config.read_bytes() != out_config.read_bytes()):
        report.fail("differs from the source's config", path=out_config)
    return comparable


def _header_mismatch(src: ShardHeader, out: ShardHeader) -> tuple[str | None, str] | None:
    """None when the headers are the same bytes; else the first tensor whose entry differs."""
    if src.raw == out.raw and src.file_size == out.file_size:
        return None
    theirs = {t.name: t for t in src.tensors}
    for t in out.tensors:
        s = theirs.pop(t.name, None)
        if s is None:
            return t.name, "is not in the source shard"
        if (s.dtype, s.shape, s.begin, s.end) != (t.dtype, t.shape, t.begin, t.end):
            return t.name, (f"is {t.dtype}{list(t.shape)} at bytes {t.begin}..{t.end}, the source has "
                            f"{s.dtype}{list(s.shape)} at {s.begin}..{s.end}")
    if theirs:
        return next(iter(theirs)), "is missing from the output shard"
    return None, "header differs from the source's (metadata or layout)"


def verify(options: VerifyOptions, log: Log | None = None) -> VerifyReport:
    """Check ``options.out``; failures are collected in the report, broken files raise at once."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    out_root = options.out
    if not out_root.is_dir():
        raise OrthopatchError("not a folder", path=out_root)
    report = VerifyReport(out_root, options.source)
    with shared_lock(out_root):
        record = _check_folder(report, out_root)
        method = record.method if record is not None else Method()
        if record is None:
            report.notes.append("options not recorded: checked as a default apply")
        try:
            out_ckpt = open_checkpoint(out_root)
        except OrthopatchError as exc:
            if report.ok:
                raise
            report.failures.append(exc)  # an unfinished folder: say so first, then what is missing
            return report
        out_plan = _plan(out_ckpt, method)
        direction = load_direction(options.direction, out_plan.hidden_size, out_plan.num_layers)
        report.notes.extend(direction.notes)
        _check_record(report, record, out_plan, direction)
        if options.source is not None:
            src_ckpt = open_checkpoint(options.source)
            plan = _plan(src_ckpt, method)
            comparable = _check_structure(report, src_ckpt, out_ckpt)
        else:
            src_ckpt, plan, comparable = None, out_plan, set(out_ckpt.shards)
            if method.scale != 1.0:
                report.notes.append(f"scale {method.scale:g} removes only part of the component: without "
                                    "--source the patched tensors can be measured but not checked")
        directions = target_directions(plan, direction)
        total = sum(out_ckpt.shards[s.name].file_size for s in plan.shards if s.name in comparable)
        with ByteProgress(total, disable=options.quiet) as progress:
            for shard in plan.shards:
                if shard.name not in comparable:
                    continue
                progress.set_description(shard.name)
                _verify_shard(report, shard.name, shard.targets, src_ckpt, out_ckpt, directions, method,
                              options.chunk_elements, progress.update)
    for note in report.notes:
        log(f"note: {note}")
    return report


def _verify_shard(report: VerifyReport, shard: str, targets: tuple[PatchTarget, ...], src: Checkpoint | None,
                  out: Checkpoint, directions: dict[str, torch.Tensor], method: Method, chunk_elements: int,
                  progress: Callable[[int], None]) -> None:
    header = out.shards[shard]
    by_name = {t.name: t for t in targets}
    with open_source(header.path) as out_fd, _maybe_open(src.root / shard if src else None) as src_fd:
        out_rows = RowReader(out_fd, header.path)
        src_rows = RowReader(src_fd, src.root / shard) if src is not None and src_fd is not None else None
        for entry in header.tensors:
            target = by_name.get(entry.name)
            if target is None:
                if src_rows is not None:
                    problem = compare_bytes(src_rows, out_rows, entry, progress)
                    if problem:
                        report.fail(problem, path=header.path, tensor=entry.name)
                    else:
                        report.identical += 1
                else:
                    progress(entry.nbytes)
                report.checked_bytes += entry.nbytes
                continue
            if entry.nbytes == 0:
                continue
            u = directions[entry.name]
            if src_rows is not None:
                check, problem = check_against_source(src_rows, out_rows, target, u, method, chunk_elements,
                                                      progress)
            else:
                check, problem = check_orthogonal(out_rows, target, u, method, chunk_elements, progress)
            report.checks.append(check)
            report.checked_bytes += entry.nbytes
            if problem:
                report.fail(problem, path=header.path, tensor=entry.name)


@contextmanager
def _maybe_open(path: Path | None) -> Iterator[int | None]:
    if path is None:
        yield None
        return
    with open_source(path) as fd:
        yield fd


# --- the report ------------------------------------------------------------------------------------

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

"""``orthopatch verify``: re-open an output folder and check every tensor, in bounded blocks.

Structure first (:mod:`.structure`): the record, no interrupted-run marker or temporaries, every
shard header valid and the index agreeing with the shards, and with ``--source`` the same headers,
index and config as the source. Then the data (:mod:`.reference`): unchanged tensors byte for byte,
patched tensors against a float64 computation that shares no code with the kernel, read through the
``safetensors`` package. The plan is rebuilt with the method recorded in ``orthopatch.json``, and
each target's unit vector (its layer's row of the direction, weighted by its norm gain) is computed
again. Findings are collected in a :class:`~.report.VerifyReport`; only unreadable input raises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.io.checkpoint import Checkpoint, open_checkpoint
from orthopatch.io.folders import shared_lock
from orthopatch.io.formats import RECORD_NAME
from orthopatch.io.reader import open_source
from orthopatch.io.smallfile import read_small_json
from orthopatch.patch.architecture import choose_architecture
from orthopatch.patch.direction import MAX_DIRECTION_BYTES, file_sha256, load_direction
from orthopatch.patch.plan import PatchPlan, PatchTarget, build_plan, format_layers
from orthopatch.patch.record import Method
from orthopatch.patch.weights import weighted_plan
from orthopatch.progress import ByteProgress
from orthopatch.verify.reference import (
    CHUNK_ELEMENTS,
    RawReader,
    RoundingTally,
    TensorFile,
    check_against_source,
    check_orthogonal,
    compare_bytes,
    ulp,
    unit_vectors,
)
from orthopatch.verify.report import TensorCheck, VerifyReport, format_table, summary
from orthopatch.verify.structure import check_folder, check_record, check_structure

__all__ = ["RoundingTally", "TensorCheck", "VerifyOptions", "VerifyReport", "format_table", "recorded_direction",
           "recorded_file", "summary", "ulp", "verify"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class VerifyOptions:
    """Everything ``verify`` needs; the CLI only builds one of these."""

    out: Path
    direction: Path
    source: Path | None = None
    quiet: bool = False
    chunk_elements: int = CHUNK_ELEMENTS


def _plan(checkpoint: Checkpoint, method: Method) -> PatchPlan:
    plan = build_plan(checkpoint, choose_architecture(checkpoint, method.targets), method.selection)
    return weighted_plan(plan, method.weights) if method.weights is not None else plan


def verify(options: VerifyOptions, log: Log | None = None) -> VerifyReport:
    """Check ``options.out``; failures are collected in the report, broken files raise at once."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    out_root = options.out
    if not out_root.is_dir():
        raise OrthopatchError("not a folder", path=out_root)
    report = VerifyReport(out_root, options.source)
    with shared_lock(out_root):
        record = check_folder(report, out_root)
        method = record.method if record is not None else Method()
        if record is None:
            report.notes.append("options not recorded: checked as a default apply")
        claim = describe_method(method) if record is not None else None
        if record is not None and method.scale == 0:
            report.fail("the record claims scale 0, which removes nothing (apply refuses it): this output is "
                        "not abliterated", path=out_root / RECORD_NAME)
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
        if record is not None and direction.weights != method.weights:
            report.fail("the direction file's weights differ from those the record's method names",
                        path=direction.path)
        check_record(report, record, out_plan, direction)
        if options.source is not None and options.source.resolve() == out_root.resolve():
            raise OrthopatchError("is the folder being verified: a model converted in place has no source left to "
                                  "compare with (verify it without --source)", path=options.source)
        if options.source is not None:
            src_ckpt = open_checkpoint(options.source)
            plan = _plan(src_ckpt, method)
            comparable = check_structure(report, src_ckpt, out_ckpt)
        else:
            src_ckpt, plan, comparable = None, out_plan, set(out_ckpt.shards)
            if method.scale != 1.0:
                report.notes.append(f"scale {method.scale:g} removes only part of the component: without "
                                    "--source the patched tensors can be measured but not checked")
            elif method.weights is not None and any(method.scale_for(t.role, t.layer) != 1.0 for t in plan.targets()):
                report.notes.append("weights other than 1 remove only part of the component: without --source "
                                    "those tensors can be measured but not checked")
        directions = unit_vectors(plan, direction)
        total = sum(out_ckpt.shards[s.name].file_size for s in plan.shards if s.name in comparable)
        with ByteProgress(total, disable=options.quiet) as progress:
            for shard in plan.shards:
                if shard.name not in comparable:
                    continue
                progress.set_description(shard.name)
                _verify_shard(report, shard.name, shard.targets, src_ckpt, out_ckpt, directions, method,
                              options.chunk_elements, progress.update, claim)
    for note in report.notes:
        log(f"note: {note}")
    return report


def _verify_shard(report: VerifyReport, shard: str, targets: tuple[PatchTarget, ...], src: Checkpoint | None,
                  out: Checkpoint, directions: dict[str, torch.Tensor], method: Method, chunk_elements: int,
                  progress: Callable[[int], None], claim: str | None) -> None:
    """Check one shard's tensors; a patched tensor that fails is described against ``claim``, what the
    record says was done (None without a record)."""
    header = out.shards[shard]
    src_path = src.root / shard if src is not None else None
    by_name = {t.name: t for t in targets}
    with open_source(header.path) as out_fd, _maybe_open(src_path) as src_fd:
        out_raw = RawReader(out_fd, header.path)
        src_raw = RawReader(src_fd, src_path) if src_path is not None and src_fd is not None else None
        for entry in header.tensors:
            target = by_name.get(entry.name)
            if target is None:
                if src_raw is not None:
                    problem = compare_bytes(src_raw, out_raw, entry, progress)
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
            out_file = TensorFile(header.path)
            if src_path is not None:
                check, problem = check_against_source(TensorFile(src_path), out_file, target, u, method,
                                                      chunk_elements, progress)
            else:
                check, problem = check_orthogonal(out_file, target, u, method, chunk_elements, progress)
            report.checks.append(check)
            report.checked_bytes += entry.nbytes
            if check.nonfinite:
                problem = f"holds {check.nonfinite:,} non-finite values (NaN or Inf)"
            elif problem and src_raw is not None and compare_bytes(src_raw, out_raw, entry, _ignore) is None:
                problem = "is unchanged from the source" + (f", but the record claims {claim}" if claim else "")
            elif problem and claim:
                problem = f"{problem} (the record claims {claim})"
            if problem:
                report.fail(problem, path=header.path, tensor=entry.name)


def _ignore(_: int) -> None:
    """Progress of a second look that the bar has already counted."""


def describe_method(method: Method) -> str:
    """What a record says was done, in a few words (``scale 1``, ``scale 0.5, norm-preserving``)."""
    layers = method.selection.layers
    parts = [f"scale {method.scale:g}"]
    parts += ["norm-preserving"] if method.norm_preserving else []
    parts += [f"layers {format_layers(layers)}"] if layers is not None else []
    parts += ["no embeddings"] if not method.selection.embeddings else []
    parts += [f"{len(method.targets)} --targets pattern(s)"] if method.targets else []
    parts += [f"weights {method.weights.describe()}"] if method.weights is not None else []
    return ", ".join(parts)


def recorded_direction(out: Path) -> Path:
    """The direction file ``out``'s record names, if it still has the recorded sha256 (``verify`` without
    ``--direction``); a one-line error asking for ``--direction`` otherwise."""
    record_path = out / RECORD_NAME
    if not os.path.lexists(record_path):
        raise OrthopatchError(f"no --direction given, and no {RECORD_NAME} to take it from: pass --direction",
                              path=out)
    record = read_small_json(record_path)
    direction = record.get("direction") if isinstance(record, dict) else None
    file = direction.get("file") if isinstance(direction, dict) else None
    sha256 = direction.get("sha256") if isinstance(direction, dict) else None
    return recorded_file(file, sha256, record_path)


def recorded_file(file: object, sha256: object, record_path: Path) -> Path:
    """The direction ``file`` a record names, if it is still a regular file with the recorded ``sha256``."""
    if not isinstance(file, str) or not isinstance(sha256, str):
        raise OrthopatchError("no --direction given, and the record names no direction file: pass --direction",
                              path=record_path)
    path = Path(file)
    found = None
    if not os.path.isfile(path):
        reason = "is not a regular file" if os.path.lexists(path) else "no longer exists"
    elif os.path.getsize(path) > MAX_DIRECTION_BYTES:
        reason = "is too large for a direction"
    else:
        found = file_sha256(path)
        reason = "has changed since (its sha256 differs)"
    if found == sha256:
        return path
    raise OrthopatchError(f"no --direction given, and the direction file it records ({quoted(file)}) {reason}: "
                          "pass --direction", path=record_path)


@contextmanager
def _maybe_open(path: Path | None) -> Iterator[int | None]:
    if path is None:
        yield None
        return
    with open_source(path) as fd:
        yield fd

"""The folder around the data: the record, leftovers of an interrupted run, shard headers and the index."""

from __future__ import annotations

import os
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import Checkpoint
from orthopatch.io.folders import temporaries
from orthopatch.io.formats import (
    CONFIG_NAME,
    INDEX_NAME,
    INPLACE_JOURNAL_DIR,
    INPLACE_STATE_NAME,
    PARTIAL_NAME,
    RECORD_NAME,
)
from orthopatch.io.safetensors_header import ShardHeader
from orthopatch.io.smallfile import read_small_bytes
from orthopatch.patch.direction import Direction
from orthopatch.patch.plan import PatchPlan
from orthopatch.patch.record import ConversionRecord
from orthopatch.verify.report import VerifyReport


def check_folder(report: VerifyReport, out: Path) -> ConversionRecord | None:
    """The record (or None), with failures for what an unfinished or interrupted run leaves."""
    record = None
    record_path = out / RECORD_NAME
    if not os.path.lexists(record_path):
        report.fail(f"no {RECORD_NAME}: the conversion did not finish (or this is not an orthopatch output)",
                    path=out)
    else:
        try:
            record = ConversionRecord.read(record_path)
        except OrthopatchError as exc:
            report.failures.append(exc)
    if (out / PARTIAL_NAME).exists():
        report.fail("an interrupted run's marker is present: rerun the same apply command to finish", path=out)
    if (out / INPLACE_JOURNAL_DIR / INPLACE_STATE_NAME).is_file():
        report.fail("an in-place conversion is unfinished: rerun the same apply --in-place command to finish it",
                    path=out)
    for tmp in temporaries(out):
        report.fail("temporary file left by an interrupted run", path=tmp)
    return record


def check_record(report: VerifyReport, record: ConversionRecord | None, plan: PatchPlan, direction: Direction) -> None:
    """The record names this direction file and the tensors the plan patches."""
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


def check_structure(report: VerifyReport, src: Checkpoint, out: Checkpoint) -> set[str]:
    """Shards, headers, index and config as in the source; the shards whose data can be compared."""
    comparable = set()
    for name in sorted(set(src.shards) | set(out.shards)):
        if name not in out.shards:
            report.fail(f"shard {name} of the source is missing", path=out.root)
        elif name not in src.shards:
            report.fail(f"shard {name} is not in the source", path=out.root)
        elif (mismatch := header_mismatch(src.shards[name], out.shards[name])) is not None:
            tensor, message = mismatch
            report.fail(message, path=out.shards[name].path, tensor=tensor)
        else:
            comparable.add(name)
    if src.weight_map != out.weight_map:
        odd = next(n for n in sorted(set(src.weight_map) | set(out.weight_map))
                   if src.weight_map.get(n) != out.weight_map.get(n))
        report.fail("the index places this tensor differently from the source's", path=out.root / INDEX_NAME,
                    tensor=odd)
    src_config, out_config = src.root / CONFIG_NAME, out.root / CONFIG_NAME  # both opened already: regular
    if read_small_bytes(src_config) != read_small_bytes(out_config):
        report.fail("differs from the source's config", path=out_config)
    return comparable


def header_mismatch(src: ShardHeader, out: ShardHeader) -> tuple[str | None, str] | None:
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

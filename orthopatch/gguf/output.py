"""The destination of a GGUF conversion: a new GGUF file (or split parts), with the record in its metadata.

Each part is written under a temporary name: its data section first (unchanged tensors copied, shared
with the source where the filesystem can, since the data moves by a whole number of blocks; patched
tensors streamed), then, when every part is done, each header with the conversion's record under
``orthopatch.record`` (a GGUF often travels alone: the record goes with it), then every part is
published by rename. The data's place is fixed before the record is known, from a record of the same
conversion with the longest time it could take; the header's padding absorbs the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.container import GGUFFile, read_gguf
from orthopatch.gguf.layout import OutputLayout, plan_output, write_gguf_header
from orthopatch.gguf.plan import FLOAT_TYPES, GGUFPlan
from orthopatch.gguf.requantize import patch_quantized
from orthopatch.io.filecopy import CopyStats, RangeCopier, block_size, pwrite_all
from orthopatch.io.reader import open_source
from orthopatch.io.writer import discard, fsync_dir, io_error, temp_path
from orthopatch.patch.conversion import Conversion
from orthopatch.patch.driver import Log, Step
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.record import ConversionRecord
from orthopatch.patch.stream import Progress

#: The metadata key of the conversion record (JSON, as ``orthopatch.json`` holds it beside safetensors).
RECORD_KEY = "orthopatch.record"
#: The longest a conversion is assumed to take when the data's place is fixed (seconds).
LONGEST_SECONDS = 10.0**9


class _PartWriter:
    """The temporary file of one output part: tensor bytes land ``shift`` bytes after their source offset."""

    def __init__(self, final: Path, shift: int):
        self.final, self.tmp, self.shift = final, temp_path(final), shift
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise io_error(exc, final, "create") from None

    def write(self, segment: int, offset: int, data: memoryview) -> None:
        try:
            pwrite_all(self.fd, data, offset + self.shift)
        except OSError as exc:
            raise io_error(exc, self.final, "write") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def output_parts(first_out: Path, count: int) -> list[Path]:
    """The output's part names: ``OUT.gguf`` alone, else ``OUT-0000k-of-0000n.gguf`` as llama.cpp's split names them."""
    if count == 1:
        return [first_out]
    stem = first_out.name.removesuffix(".gguf")
    stem = stem.rsplit("-00001-of-", 1)[0]
    return [first_out.with_name(f"{stem}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]


def recorded_fingerprint(path: Path) -> dict | None:
    """The fingerprint an orthopatch-written GGUF records, or None."""
    try:
        text = read_gguf(path).value(RECORD_KEY)
        doc = json.loads(text) if isinstance(text, str) else None
    except (OrthopatchError, ValueError):
        return None
    return doc.get("fingerprint") if isinstance(doc, dict) else None


class GGUFDestination:
    """An out-of-place GGUF conversion: new part files beside (or instead of) the source's."""

    in_place = False

    def __init__(self, outs: list[Path], overwrite: bool = False):
        self.outs = outs
        self.root = outs[0]
        self.overwrite = overwrite

    @contextmanager
    def open(self, conversion: Conversion, log: Log) -> Iterator[_GGUFSession]:
        session = _GGUFSession(self.outs, conversion, self.overwrite)
        try:
            yield session
        finally:
            session.close()


class _GGUFSession:
    def __init__(self, outs: list[Path], conversion: Conversion, overwrite: bool):
        plan = conversion.plan
        assert isinstance(plan, GGUFPlan)
        self.plan, self.conversion, self.outs = plan, conversion, outs
        self.patched, self.copied, self.resumed = 0, CopyStats(), False
        self.writers: list[_PartWriter] = []
        self.block = block_of(outs[0].parent)
        self.layouts: list[OutputLayout] = []
        for src, out in zip(plan.parts, outs, strict=True):
            if out.resolve() == src.path.resolve():
                raise OrthopatchError("is the source file: give another output (or --in-place)", path=out)
        existing = [o for o in outs if os.path.lexists(o)]
        fingerprint = conversion.fingerprint.to_json()
        self.complete = len(existing) == len(outs) and all(recorded_fingerprint(o) == fingerprint for o in outs)
        if existing and not self.complete and not overwrite:
            raise OrthopatchError("exists and is not this conversion's output (use --overwrite to replace it)",
                                  path=existing[0])
        for out in outs:
            if not out.parent.is_dir():
                raise OrthopatchError("the output file's folder does not exist", path=out.parent)
            discard(temp_path(out))

    def steps(self) -> list[Step]:
        provisional = json.dumps(self.conversion.record(LONGEST_SECONDS).to_json())
        steps = []
        for index, (src, out) in enumerate(zip(self.plan.parts, self.outs, strict=True)):
            layout = plan_output(src, {RECORD_KEY: provisional}, block=self.block)
            self.layouts.append(layout)
            steps.append(Step(out.name, src.file_size - src.data_start, partial(self._write, index)))
        return steps

    def plan_tail(self, steps: list[Step]) -> str:
        return f", copying {self.plan.total_bytes - self.plan.patched_bytes:,} bytes unchanged"

    def _write(self, index: int, progress: Progress) -> None:
        src, layout, targets = self.plan.parts[index], self.layouts[index], self.plan.part_targets[index]
        writer = _PartWriter(self.outs[index], layout.shift)
        self.writers.append(writer)
        with open_source(src.path) as fd:
            copier = RangeCopier(write_behind=True, block=block_size(writer.fd))
            cursor = src.data_start
            for target in sorted(targets, key=lambda t: t.entry.begin):
                self._copy(copier, fd, writer, cursor, target.entry.begin, progress)
                self._patch(fd, target, writer, src, progress)
                cursor = target.entry.end
            self._copy(copier, fd, writer, cursor, src.file_size, progress)
        self.copied += copier.stats

    def _copy(self, copier: RangeCopier, fd: int, writer: _PartWriter, begin: int, end: int,
              progress: Progress) -> None:
        if end <= begin:
            return
        try:
            copier.copy(fd, writer.fd, begin, end - begin, begin + writer.shift, on_progress=progress)
        except OSError as exc:
            raise io_error(exc, writer.final, "write") from None
        except EOFError:
            raise OrthopatchError("source changed or truncated while reading", path=writer.final) from None

    def _patch(self, fd: int, target: PatchTarget, writer: _PartWriter, src: GGUFFile, progress: Progress) -> None:
        c = self.conversion
        u = c.unit_vectors[target.name]
        qtype = src.by_name[target.name].qtype
        if qtype in FLOAT_TYPES:
            c.patcher.patch(fd, target, u, writer, progress, src.path)
        else:
            patch_quantized(fd, target, u, writer, c.patcher.kernel, progress, src.path,
                            importance=self.plan.importance.get(target.name))
        self.patched += target.entry.nbytes

    def finish(self, record: ConversionRecord) -> None:
        text = json.dumps(record.to_json())
        for src, layout, writer in zip(self.plan.parts, self.layouts, self.writers, strict=True):
            final = plan_output(src, {RECORD_KEY: text}, block=self.block, data_start=layout.data_start)
            write_gguf_header(writer.fd, final, writer.final)
            try:
                os.fsync(writer.fd)
            except OSError as exc:
                raise io_error(exc, writer.final, "write") from None
        for writer in self.writers:
            writer.close()
            try:
                os.replace(writer.tmp, writer.final)
                fsync_dir(writer.final.parent)
            except OSError as exc:
                raise io_error(exc, writer.final, "publish") from None

    def close(self) -> None:
        for writer in self.writers:
            if writer.fd >= 0:
                writer.close()
                discard(writer.tmp)


def block_of(folder: Path) -> int:
    """The filesystem block size of ``folder`` (4096 when it cannot be read): the unit of shared extents."""
    try:
        return max(512, os.statvfs(folder).f_bsize)
    except OSError:
        return 4096

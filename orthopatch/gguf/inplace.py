"""``apply MODEL.gguf DIRECTION --in-place``: the patched tensors rewritten inside the GGUF file(s), crash-safe.

The same protocol as safetensors in place (:mod:`orthopatch.patch.inplace`), through the same
:class:`~orthopatch.patch.journal.Journal`, here a hidden folder beside the file named after it
(``.orthopatch-inplace-NAME.gguf``): everything is checked before the journal begins; per tensor the
new bytes go into the journal file at the tensor's own offset and are fsynced, the state records
them in flight, they are copied into the part and fsynced, the state advances.

The record goes into each part's metadata, last, one step per part after every tensor: the header
bytes (source metadata + record + padding, :func:`~orthopatch.gguf.layout.plan_output`) are written
into the journal and recorded in flight like a tensor (range ``[0, data_start)``); then the file
grows by ``shift`` bytes inserted at its front (:mod:`orthopatch.gguf.grow`; no data is copied) and
the header is copied into place. Each part's ``shift`` and original size are fixed in the state when
the journal begins, so a resumed step knows from the file's size whether the insert happened.
A part whose header is being replaced starts with zeros, so the step left in flight is finished
before any header is read (:func:`finish_header_step`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.gguf.container import GGUFFile
from orthopatch.gguf.grow import can_insert_ranges, insert_range, original_identity
from orthopatch.gguf.layout import PADDING_KEY, plan_output
from orthopatch.gguf.output import LONGEST_SECONDS, RECORD_KEY, block_of
from orthopatch.gguf.plan import FLOAT_TYPES, GGUFPlan
from orthopatch.gguf.requantize import check_quantized, patch_quantized
from orthopatch.io.filecopy import CopyStats
from orthopatch.io.reader import open_source
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.io.smallfile import is_json_int
from orthopatch.io.writer import io_error
from orthopatch.patch.conversion import Conversion
from orthopatch.patch.driver import Log
from orthopatch.patch.inplace import JournaledTensors, check_resumable, describe, replay, same_conversion
from orthopatch.patch.journal import MAX_OFFSET, InFlight, Journal, JournalWriter, copy_into_place
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.record import ConversionRecord
from orthopatch.patch.stream import Progress
from orthopatch.progress import ByteProgress

#: The name of the journal's tensor-like entry for a part's new header.
HEADER = "(header)"
BUSY = "another orthopatch run is using this folder (converting a GGUF file in it in place)"


class GGUFJournal(Journal):
    """The in-place journal of the GGUF model whose first part is ``path``: a hidden folder beside it."""

    def __init__(self, path: Path):
        super().__init__(path.parent)
        self.root = path.parent / f".orthopatch-inplace-{path.name}"
        self.state_path = self.root / self.state_path.name
        self.data_path = self.root / self.data_path.name

    def header_steps(self) -> tuple[int, list[dict[str, Any]]]:
        """The state's count of tensors and, per part, ``{"part", "size", "shift", "data_start"}``, checked."""
        doc = self.doc
        tensors, headers = doc.get("tensors"), doc.get("headers")
        bad = OrthopatchError("the in-place journal's header steps are unreadable", path=self.state_path)
        if not is_json_int(tensors, 0, MAX_OFFSET) or not isinstance(headers, list) or not headers:
            raise bad
        for h in headers:
            if not isinstance(h, dict) or not isinstance(h.get("part"), str) or \
                    not all(is_json_int(h.get(k), 0, MAX_OFFSET) for k in ("size", "shift", "data_start")):
                raise bad
        return tensors, headers


def check_writable_file(path: Path) -> None:
    """Refuse a part that writing in place would corrupt or cannot write: links and read-only files."""
    if path.is_symlink():
        raise OrthopatchError("is a symbolic link (a Hugging Face cache snapshot shares its files with other "
                              "revisions): convert it out of place instead, with -o", path=path)
    st = path.stat()
    if st.st_nlink > 1:
        raise OrthopatchError(f"has {st.st_nlink - 1} other hard link(s): writing it in place would change "
                              "them too; convert out of place instead, with -o", path=path)
    if not os.access(path, os.W_OK) or not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise OrthopatchError("is not writable: --in-place rewrites the GGUF file itself", path=path)


def _header_step(journal: GGUFJournal, folder: Path, flight: InFlight, header: dict[str, Any]) -> None:
    """Grow the part by its shift (unless that is done) and copy its new header from the journal into place."""
    path = folder / flight.shard
    if journal.data_sha256(flight.begin, flight.end) != flight.sha256:
        raise OrthopatchError("the in-place journal's header bytes do not match their sha256", path=journal.data_path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise io_error(exc, path, "open") from None
    try:
        size = os.fstat(fd).st_size
        if header["shift"] and size == header["size"]:
            insert_range(fd, 0, header["shift"])
            os.fsync(fd)
        elif size != header["size"] + header["shift"]:
            raise OrthopatchError(f"is {size:,} bytes, neither the {header['size']:,} it had nor the "
                                  f"{header['size'] + header['shift']:,} its new header needs: it was changed while "
                                  "its in-place conversion was interrupted", path=path)
    except OSError as exc:
        raise io_error(exc, path, "make room for the new header") from None
    finally:
        os.close(fd)
    copy_into_place(journal, path, flight, CopyStats(), None)


def finish_header_step(journal: GGUFJournal, folder: Path) -> None:
    """Finish the header step an interrupted run left in flight (if any), before any part's header is read."""
    journal.check_path()
    if not journal.exists():
        return
    doc = journal.read(MAX_OFFSET)
    tensors, headers = journal.header_steps()
    flight = journal.in_flight
    if flight is None or flight.index < tensors:
        return
    k = flight.index - tensors
    if k >= len(headers) or flight.tensor != HEADER or flight.shard != headers[k]["part"] or \
            (flight.begin, flight.end) != (0, headers[k]["data_start"]):
        raise OrthopatchError("the in-place journal's header in flight is not one it planned", path=journal.state_path)
    _header_step(journal, folder, flight, headers[k])
    journal.doc = doc
    journal.save_progress(flight.index + 1, None)


def recorded(part: GGUFFile) -> ConversionRecord | None:
    """The record a part carries in its metadata, or None."""
    text = part.value(RECORD_KEY)
    if text is None:
        return None
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        doc = None
    return ConversionRecord.from_json(doc, f"{part.path} ({RECORD_KEY})")


class GGUFInPlaceDestination:
    """A GGUF file (or split parts) converted in place; the caller holds the folder's lock."""

    in_place = True

    def __init__(self, first: Path, quiet: bool = False):
        self.root = first
        self.quiet = quiet

    @contextmanager
    def open(self, conversion: Conversion, log: Log) -> Iterator[_GGUFInPlaceSession]:
        yield _GGUFInPlaceSession(self.root, conversion, self.quiet)


class _GGUFInPlaceSession(JournaledTensors):
    """One run in place: refusals and checks, the journal begun or resumed, tensors, then each part's header."""

    def __init__(self, first: Path, conversion: Conversion, quiet: bool):
        plan = conversion.plan
        assert isinstance(plan, GGUFPlan)
        self.plan, self.conversion, self.folder = plan, conversion, first.parent
        self.patched, self.copied, self.complete = 0, CopyStats(), False
        self.block = block_of(self.folder)
        self.journal = journal = GGUFJournal(first)
        journal.check_path()
        self.targets = targets = conversion.targets
        fp = conversion.fingerprint.to_json()
        self.resumed = journal.exists()
        if self.resumed:
            check_resumable(journal.read(len(targets) + len(plan.parts)), fp, first)
            journal.header_steps()
        else:
            records = [recorded(p) for p in plan.parts]
            if any(r is not None for r in records):
                self._refuse_or_complete(records, fp)
                if self.complete:
                    return
        for part in plan.parts:
            check_writable_file(part.path)
        if not self.resumed:
            headers = self._plan_headers()
            self._check_space(headers)
            self._check_targets(quiet)
            journal.begin({"fingerprint": fp, "direction": {"file": str(conversion.direction_file),
                                                            "sha256": conversion.direction.sha256},
                           "options": conversion.method.to_json(), "tensors": len(targets), "headers": headers},
                          journal.root / "no-card")
        replay(journal, self.folder, targets)

    def _refuse_or_complete(self, records: list[ConversionRecord | None], fp: dict[str, Any]) -> None:
        if all(r is not None and same_conversion(r.fingerprint, fp) for r in records):
            self.journal.discard()
            self.complete = True
            return
        for part, record in zip(self.plan.parts, records, strict=True):
            if record is None:
                raise OrthopatchError(f"carries no {RECORD_KEY} while other parts of the model do: a part was "
                                      "replaced after a conversion", path=part.path)
            if not same_conversion(record.fingerprint, fp):
                done = "was converted in place" if record.in_place else "is an orthopatch output"
                what = describe(record.direction.file, record.direction.sha256, record.method.to_json())
                raise OrthopatchError(f"{done} with {what}; converting it again would patch patched tensors "
                                      "(start from an unconverted copy)", path=part.path)

    def _plan_headers(self) -> list[dict[str, Any]]:
        """Each part's size and shift, fixed now from a record of this conversion with the longest time it could
        take (the header's padding absorbs the difference); refused here if the file cannot grow."""
        provisional = json.dumps(self.conversion.record(LONGEST_SECONDS, in_place=True).to_json())
        headers = []
        for part in self.plan.parts:
            if PADDING_KEY in part.metadata:
                raise OrthopatchError(f"carries {PADDING_KEY} but no {RECORD_KEY}: its source cannot be told "
                                      "apart from the result; convert it out of place instead, with -o", path=part.path)
            layout = plan_output(part, {RECORD_KEY: provisional}, block=self.block)
            headers.append({"part": part.path.name, "size": part.file_size, "shift": layout.shift,
                            "data_start": layout.data_start})
        if any(h["shift"] for h in headers) and not can_insert_ranges(self.folder, self.block):
            raise OrthopatchError("is on a filesystem that cannot insert ranges into a file (ext4 and XFS can; "
                                  "tmpfs and btrfs cannot), so the header cannot grow by the record in place: "
                                  "write a new file instead, with -o", path=self.plan.parts[0].path)
        return headers

    def _check_space(self, headers: list[dict[str, Any]]) -> None:
        need = max(t.entry.nbytes for t in self.targets) + max(h["data_start"] for h in headers) + \
            sum(h["shift"] for h in headers) + (1 << 20)
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise OrthopatchError(f"has {free:,} bytes free; converting in place needs {need:,} (the largest "
                                  "patched tensor, a header, and the room the headers grow by)", path=self.folder)

    def _check_targets(self, quiet: bool) -> None:
        """Every tensor read once, nothing written: NaN, Inf or overflowing coefficients refused now."""
        c = self.conversion
        with ByteProgress(sum(t.entry.nbytes for t in self.targets), disable=quiet) as progress:
            for target in self.targets:
                progress.set_description(f"checking {quoted(target.shard)}")
                path = self.folder / target.shard
                with open_source(path) as fd:
                    if self._is_float(target):
                        c.patcher.check(fd, target, c.unit_vectors[target.name], path)
                    else:
                        check_quantized(fd, target, c.unit_vectors[target.name], c.patcher.kernel, path)
                progress.update(target.entry.nbytes)

    def _is_float(self, target: PatchTarget) -> bool:
        return self.plan.part_of(target.name).by_name[target.name].qtype in FLOAT_TYPES

    def patch_tensor(self, fd: int, target: PatchTarget, writer: JournalWriter, progress: Progress,
                     path: Path) -> None:
        """Float tensors through the streaming patcher, quantized ones dequantized, projected and requantized."""
        c = self.conversion
        u = c.unit_vectors[target.name]
        if self._is_float(target):
            c.patcher.patch(fd, target, u, writer, progress, path)
        else:
            patch_quantized(fd, target, u, writer, c.patcher.kernel, progress, path,
                            importance=self.plan.importance.get(target.name))

    def finish(self, record: ConversionRecord) -> None:
        """Each part's header with the record (the same text in every part, kept in the state), then no journal."""
        journal = self.journal
        n, headers = journal.header_steps()
        text = journal.doc.get("record")
        if not isinstance(text, str):
            text = json.dumps(record.to_json())
            journal.doc = {**journal.doc, "record": text}
            journal.save_progress(journal.done, None)
        for k in range(journal.done - n, len(headers)):
            part = self.plan.parts[k]
            layout = plan_output(part, {RECORD_KEY: text}, block=self.block, data_start=headers[k]["data_start"])
            writer = JournalWriter(journal.data_path, TensorEntry(HEADER, "U8", (layout.data_start,), 0,
                                                                  layout.data_start))
            try:
                writer.write(0, 0, memoryview(layout.header))
                sha = writer.finish()
            finally:
                writer.close()
            flight = InFlight(n + k, HEADER, part.path.name, 0, layout.data_start, sha)
            journal.save_progress(n + k, flight)
            _header_step(journal, self.folder, flight, headers[k])
            journal.save_progress(n + k + 1, None)
        journal.discard()


def original_headers(parts: tuple[GGUFFile, ...]) -> dict[str, str]:
    """The fingerprint's ``source_headers`` of the parts as they were before any conversion recorded itself."""
    return {p.path.name: original_identity(p) for p in parts}

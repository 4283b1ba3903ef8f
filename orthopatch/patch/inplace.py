"""``apply --in-place``: rewrite the patched tensors inside the model's own shards, crash-safe.

Nothing but the patched tensors is read or written. A tensor half overwritten could not be repaired
from the file (the projection is not invertible in 16-bit storage, and applying it twice is not a
no-op bit for bit), so no byte of a shard changes before the tensor's complete new bytes are on disk
elsewhere. Nor may a tensor be refused halfway through the plan: :func:`check_targets` reads every
tensor to be patched once before anything is written, and refuses non-finite values and
coefficients that overflow while the model is still untouched. The
:class:`~orthopatch.patch.journal.Journal`, a hidden folder inside the model, holds the new bytes and
the progress. Per tensor: its new bytes are computed into the journal and fsynced; the state records
the tensor as in flight (shard, offsets, sha256 of the new bytes); the bytes are copied into the
shard (shared, not copied, where the filesystem can) and the shard fsynced; then the state advances.
At the end the model card (built from the original card, kept in the journal folder) and
``orthopatch.json`` are written, and the journal folder is removed.

Killed at any moment, the same command resumes: a tensor in flight whose journal bytes match their
sha256 is copied into place again (idempotent); a journal not yet recorded as in flight is discarded
(its tensor in the shard is untouched); it must run on the device type it started on. Extra space:
the largest patched tensor plus small files. A finished folder holds ``orthopatch.json`` like any
output; the conversion it records (shard headers, which a patch does not change, direction and
method: :data:`CONVERSION_KEYS`) makes a rerun a no-op and another direction a refusal, whatever
version or device made it.
"""

from __future__ import annotations

import array
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.io.filecopy import CopyStats
from orthopatch.io.folders import exclusive_lock, write_json
from orthopatch.io.formats import CARD_NAME, RECORD_NAME
from orthopatch.io.reader import open_source
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.patch.conversion import Conversion
from orthopatch.patch.driver import Log, Step
from orthopatch.patch.journal import InFlight, Journal, JournalWriter, copy_into_place
from orthopatch.patch.model_card import parse_card, write_model_card
from orthopatch.patch.plan import PatchPlan, PatchTarget
from orthopatch.patch.record import ConversionRecord
from orthopatch.patch.stream import Progress, TensorPatcher
from orthopatch.progress import ByteProgress

#: A model folder is locked exclusively while converted in place, and shared while it is a source.
BUSY = "another orthopatch run is using this folder (converting it in place, or reading it as a source)"
#: What makes two conversions of a folder the same: the source's headers, the direction and the
#: method; not the orthopatch version or the device, which do not change what a finished folder is.
CONVERSION_KEYS = ("source_headers", "direction_sha256", "architecture", "method")

# -- refusals -------------------------------------------------------------------------------------------

def check_writable_shards(plan: PatchPlan) -> None:
    """Refuse shards that writing in place would corrupt or cannot write: links and read-only files."""
    root = plan.checkpoint.root
    for shard in plan.shards:
        if not shard.targets:
            continue  # never opened for writing
        path = root / shard.name
        if path.is_symlink():
            raise OrthopatchError("is a symbolic link (a Hugging Face cache snapshot shares its files with other "
                                  "revisions): convert it out of place instead, with -o", path=path)
        st = path.stat()
        if st.st_nlink > 1:
            raise OrthopatchError(f"has {st.st_nlink - 1} other hard link(s): writing it in place would change "
                                  "them too; convert out of place instead, with -o", path=path)
        if not os.access(path, os.W_OK) or not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise OrthopatchError("is not writable: --in-place rewrites the model's own shards", path=path)
        flag = inode_flag_refusal(path)
        if flag is not None:
            raise OrthopatchError(f"has the {flag} attribute (chattr), so its bytes cannot be rewritten in place "
                                  "(even as root): clear it, or convert out of place with -o", path=path)


#: ``FS_IOC_GETFLAGS`` (``_IOR('f', 1, long)`` on 64-bit Linux) and the inode flags that forbid a rewrite.
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


def inode_flags(fd: int) -> int | None:
    """The inode flags (``lsattr``) of the file open on ``fd``, or None where the filesystem has none."""
    buf = array.array("l", [0])
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError:
        return None  # not Linux, or a filesystem without inode flags: nothing there forbids writing
    return int(buf[0])


def inode_flag_refusal(path: Path) -> str | None:
    """``"immutable"`` or ``"append-only"`` when ``path``'s inode flags forbid rewriting its bytes, else None:
    ``os.access`` and the mode bits do not show them, and a write would fail only after the journal began."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        flags = inode_flags(fd)
    finally:
        os.close(fd)
    if flags is None:
        return None
    if flags & FS_IMMUTABLE_FL:
        return "immutable"
    if flags & FS_APPEND_FL:
        return "append-only"
    return None


def describe(direction_file: str, direction_sha256: str, options: dict[str, Any]) -> str:
    """What a record or journal says was done: direction file, its sha256 and the options."""
    shown = ", ".join(f"{k} {v}" for k, v in options.items() if k != "device")
    return f"direction {direction_file} (sha256 {direction_sha256[:12]}...), {shown or 'default options'}"


def same_conversion(recorded: Any, fingerprint: dict[str, Any]) -> bool:
    """Whether a recorded fingerprint describes the conversion ``fingerprint`` describes
    (:data:`CONVERSION_KEYS`; a record of another version or device still matches)."""
    return isinstance(recorded, dict) and all(recorded.get(k) == fingerprint[k] for k in CONVERSION_KEYS)


def _describe_state(state: dict[str, Any]) -> str:
    direction = state.get("direction") if isinstance(state.get("direction"), dict) else {}
    options = state.get("options") if isinstance(state.get("options"), dict) else {}
    return describe(str(direction.get("file", "?")), str(direction.get("sha256", "?")), options)


# -- the run --------------------------------------------------------------------------------------------

def prefetch(path: Path, entry: TensorEntry) -> None:
    """Start reading ``entry``'s bytes into the page cache in the background (a hint: errors are ignored)."""
    def hint() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, entry.begin, entry.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass

    threading.Thread(target=hint, daemon=True, name="orthopatch-prefetch").start()


def replay(journal: Journal, root: Path, targets: list[PatchTarget]) -> None:
    """Finish the tensor an interrupted run left in flight (if any): copy its journal bytes into place."""
    flight = journal.in_flight
    if flight is None:
        return
    target = targets[flight.index] if flight.index < len(targets) else None
    if target is None or (target.name, target.shard, target.entry.begin, target.entry.end) != \
            (flight.tensor, flight.shard, flight.begin, flight.end):
        raise OrthopatchError("the in-place journal's tensor in flight is not in the plan", path=journal.state_path,
                              tensor=flight.tensor)
    if journal.data_sha256(flight.begin, flight.end) != flight.sha256:
        raise OrthopatchError("the in-place journal's bytes do not match their sha256: the tensor may be partly "
                              "overwritten and cannot be repaired", path=journal.data_path, tensor=flight.tensor)
    copy_into_place(journal, root / flight.shard, flight, CopyStats(), None)
    journal.save_progress(flight.index + 1, None)


def check_targets(root: Path, targets: list[PatchTarget], directions: dict[str, Any], patcher: TensorPatcher, *,
                  quiet: bool = False, scales: dict[str, float] | None = None) -> None:
    """Read every tensor to be patched once, writing nothing, and refuse (one line naming the tensor and
    how many values) any that the projection would refuse halfway through the plan: NaN or Inf values,
    or coefficients that overflow (:meth:`~orthopatch.patch.stream.TensorPatcher.check`)."""
    with ByteProgress(sum(t.entry.nbytes for t in targets), disable=quiet) as progress:
        for target in targets:
            progress.set_description(f"checking {quoted(target.shard)}")
            path = root / target.shard
            with open_source(path) as fd:
                patcher.check(fd, target, directions[target.name], path, scale=(scales or {}).get(target.name))
            progress.update(target.entry.nbytes)


def check_resumable(state: dict[str, Any], fp: dict[str, Any], root: Path) -> None:
    """An interrupted run is finished only by its own conversion, computed where it was started: the
    bytes of every tensor come from one kind of device and one block size."""
    recorded = state["fingerprint"]
    if not same_conversion(recorded, fp):
        raise OrthopatchError(f"an interrupted in-place conversion with {_describe_state(state)} is "
                              "unfinished; rerun that command to finish it", path=root)
    device, block = recorded.get("device"), recorded.get("block_elements")
    if (device, block) != (fp["device"], fp["block_elements"]):
        how = f"rerun with --device {device}" if device != fp["device"] else \
            f"it computed in blocks of {block} elements, this run in blocks of {fp['block_elements']}"
        raise OrthopatchError(f"the interrupted in-place conversion was started on {device}: {how} to finish it "
                              "(every tensor must be computed as the others were)", path=root)


class InPlaceDestination:
    """An in-place conversion's destination: the model's own shards, rewritten through the journal."""

    in_place = True

    def __init__(self, root: Path, quiet: bool = False):
        self.root = root
        self.quiet = quiet

    @contextmanager
    def open(self, conversion: Conversion, log: Log) -> Iterator[_InPlaceSession]:
        with exclusive_lock(self.root, BUSY):
            yield _InPlaceSession(self.root, conversion, self.quiet)


class JournaledTensors:
    """The tensor steps of an in-place session: each target's new bytes into the journal (fsynced), recorded in
    flight, copied into its file at the same offsets. A session sets ``journal``, ``targets``, ``conversion``,
    ``folder`` (where the targets' files are), ``patched`` and ``copied``."""

    journal: Journal
    targets: list[PatchTarget]
    conversion: Conversion
    folder: Path
    patched: int
    copied: CopyStats

    def steps(self) -> list[Step]:
        first = min(self.journal.done, len(self.targets))
        return [Step(target.shard, 2 * target.entry.nbytes, partial(self._write, index, target))
                for index, target in enumerate(self.targets[first:], start=first)]

    def plan_tail(self, steps: list[Step]) -> str | None:
        if not steps:
            return None
        left = "" if len(steps) == len(self.targets) else f", {len(steps)} of {len(self.targets)} left"
        return f" in place{left}"

    def patch_tensor(self, fd: int, target: PatchTarget, writer: JournalWriter, progress: Progress,
                     path: Path) -> None:
        """Compute ``target``'s new bytes into ``writer`` (float tensors: the streaming patcher)."""
        c = self.conversion
        c.patcher.patch(fd, target, c.unit_vectors[target.name], writer, progress, path, scale=c.scale_of(target.name))

    def _write(self, index: int, target: PatchTarget, progress: Progress) -> None:
        journal = self.journal
        path = self.folder / target.shard
        writer = JournalWriter(journal.data_path, target.entry)
        try:
            with open_source(path) as fd:
                self.patch_tensor(fd, target, writer, progress, path)
            sha = writer.finish()
        finally:
            writer.close()
        flight = InFlight(index, target.name, target.shard, target.entry.begin, target.entry.end, sha)
        journal.save_progress(index, flight)
        if index + 1 < len(self.targets):  # the disk reads the next tensor while this one is written
            prefetch(self.folder / self.targets[index + 1].shard, self.targets[index + 1].entry)
        copy_into_place(journal, path, flight, self.copied, progress)
        journal.save_progress(index + 1, None)
        self.patched += target.entry.nbytes


class _InPlaceSession(JournaledTensors):
    """One run in place: refusals and the up-front check, the journal begun or resumed, tensors, card, record."""

    def __init__(self, root: Path, conversion: Conversion, quiet: bool):
        self.root = self.folder = root
        self.conversion = conversion
        self.patched, self.copied = 0, CopyStats()
        self.journal = journal = Journal(root)
        journal.check_path()
        fp = conversion.fingerprint.to_json()
        self.targets = targets = conversion.targets
        self.resumed = journal.exists()
        self.complete = False
        if self.resumed:
            check_resumable(journal.read(len(targets)), fp, root)
        elif os.path.lexists(root / RECORD_NAME):
            record = ConversionRecord.read(root / RECORD_NAME)
            if same_conversion(record.fingerprint, fp):
                journal.discard()
                self.complete = True
                return
            done = "was converted in place" if record.in_place else "holds an orthopatch output"
            what = describe(record.direction.file, record.direction.sha256, record.method.to_json())
            raise OrthopatchError(f"{done} with {what}; converting it again would patch patched tensors "
                                  "(start from an unconverted copy)", path=root)
        check_writable_shards(conversion.plan)
        if not self.resumed:  # before the journal begins, while the model is still the source
            conversion.check_not_abliterated()
            check_targets(root, targets, conversion.unit_vectors, conversion.patcher, quiet=quiet,
                          scales=conversion.scales)
            journal.begin({"fingerprint": fp, "direction": {"file": str(conversion.direction_file),
                                                            "sha256": conversion.direction.sha256},
                           "options": conversion.method.to_json()}, root / CARD_NAME)
        replay(journal, root, targets)

    def finish(self, record: ConversionRecord) -> None:
        # The card is built from the original card, kept in the journal (the model's own is ours by now).
        card = self.conversion.card
        original = self.journal.source_card()  # read without following a link, as all of the journal
        write_model_card(self.root, self.journal.root, record, base_model=card.base_model,
                         direction=card.direction_name, source=({}, "") if original is None else parse_card(original))
        write_json(self.root / RECORD_NAME, record.to_json())
        self.journal.discard()

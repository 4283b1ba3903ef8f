"""``apply --in-place``: rewrite the patched tensors inside the model's own shards, crash-safe.

Nothing but the patched tensors is read or written. A tensor half overwritten could not be repaired
from the file (the projection is not invertible in 16-bit storage, and applying it twice is not a
no-op bit for bit), so no byte of a shard changes before the tensor's complete new bytes are on disk
elsewhere. Nor may a tensor be refused halfway through the plan: :func:`check_targets` reads every
tensor to be patched once before anything is written, and refuses non-finite values and
coefficients that overflow while the model is still untouched. The :class:`Journal`, a hidden
folder inside the model, holds the new bytes and the progress:

1. ``state.json`` (written first, before any shard is touched): the run's fingerprint (with the
   device type and block size it computes with), what it does (direction, options), ``done``
   (tensors finished, in plan order) and ``in_flight``;
2. per tensor: its new bytes are computed into ``journal`` (a sparse file, at the tensor's own
   offset) and fsynced; ``in_flight`` records the tensor (shard, offsets, sha256 of the new bytes);
   the bytes are copied into the shard (shared, not copied, where the filesystem can) and the shard
   fsynced; then ``done`` advances and ``in_flight`` is cleared;
3. at the end the model card (built from the original card, kept in the journal folder) and
   ``orthopatch.json`` are written, and the journal folder is removed.

Killed at any moment, the same command resumes: a tensor in flight whose journal bytes match their
sha256 is copied into place again (idempotent); a journal not yet recorded as in flight is discarded
(its tensor in the shard is untouched); it must run on the device type it started on. Extra space:
the largest patched tensor plus small files. A finished folder holds ``orthopatch.json`` like any
output; the conversion it records (shard headers, which a patch does not change, direction and
method: :data:`CONVERSION_KEYS`) makes a rerun a no-op and another direction a refusal, whatever
version or device made it. The journal is untrusted input: its state is a bounded regular file,
checked field by field, and only its own files are ever deleted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthopatch.devices import resolve_device
from orthopatch.errors import OrthopatchError, quoted
from orthopatch.hub import folder_name
from orthopatch.io.filecopy import CopyStats, RangeCopier, block_size, pwrite_all
from orthopatch.io.folders import exclusive_lock, write_json
from orthopatch.io.formats import CARD_NAME, INPLACE_JOURNAL_DIR, INPLACE_STATE_NAME, RECORD_NAME
from orthopatch.io.reader import open_source
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.io.smallfile import describe_kind, is_json_int, read_small_json
from orthopatch.io.writer import fsync_dir, io_error, temp_path
from orthopatch.patch.record import Fingerprint, Method, Record
from orthopatch.patch.shard import target_directions
from orthopatch.patch.stream import TensorPatcher
from orthopatch.progress import ByteProgress

if TYPE_CHECKING:
    from orthopatch.patch.direction import Direction
    from orthopatch.patch.plan import PatchPlan, PatchTarget


JOURNAL_DIR = INPLACE_JOURNAL_DIR
STATE_NAME = INPLACE_STATE_NAME
#: The new bytes of the tensor being converted, at the tensor's own offset (a sparse file).
DATA_NAME = "journal"
#: The model's original card, kept while its own ``README.md`` may already be the new one.
CARD_COPY = CARD_NAME
#: Everything a journal folder may hold: nothing else in it is deleted.
JOURNAL_FILES = (STATE_NAME, DATA_NAME, CARD_COPY, temp_path(Path(STATE_NAME)).name)
#: A model folder is locked exclusively while converted in place, and shared while it is a source.
BUSY = "another orthopatch run is using this folder (converting it in place, or reading it as a source)"
#: What makes two conversions of a folder the same: the source's headers, the direction and the
#: method; not the orthopatch version or the device, which do not change what a finished folder is.
CONVERSION_KEYS = ("source_headers", "direction_sha256", "architecture", "method")
#: Largest offset or index a journal may record (a file offset fits in 63 bits).
MAX_RECORDED = (1 << 63) - 1


@dataclass(frozen=True)
class InPlaceOutcome:
    """What :func:`apply_in_place` did: ``state`` "already complete", "written in place" or "resumed in
    place"; the patched bytes this run wrote and where the copies into place went."""

    state: str
    seconds: float = 0.0
    patched: int = 0
    copied: CopyStats = field(default_factory=CopyStats)


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


# -- the journal ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InFlight:
    """The tensor whose complete new bytes are in the journal and may be partly in its shard."""

    index: int
    tensor: str
    shard: str
    begin: int
    end: int
    sha256: str

    @classmethod
    def load(cls, doc: Any, path: Path) -> InFlight | None:
        """The entry of a journal's state, checked field by field; None for none."""
        if doc is None:
            return None
        bad = OrthopatchError("unreadable in-flight entry in the in-place journal", path=path)
        if not isinstance(doc, dict):
            raise bad
        numbers = [doc.get(k) for k in ("index", "begin", "end")]
        texts = [doc.get(k) for k in ("tensor", "shard", "sha256")]
        if not all(is_json_int(n, 0, MAX_RECORDED) for n in numbers) or not all(isinstance(t, str) for t in texts):
            raise bad
        flight = cls(numbers[0], texts[0], texts[1], numbers[1], numbers[2], texts[2])
        if flight.begin > flight.end or len(flight.sha256) != 64:
            raise bad
        return flight


class Journal:
    """The hidden folder that makes an in-place conversion resumable; see the module docs."""

    def __init__(self, model: Path):
        self.root = model / JOURNAL_DIR
        self.state_path = self.root / STATE_NAME
        self.data_path = self.root / DATA_NAME
        self.doc: dict[str, Any] = {}

    def check_path(self) -> None:
        """Refuse a journal path that is not a folder of the journal's own files (a user's file, link or
        folder of that name): nothing of it is read, written or deleted."""
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise io_error(exc, self.root, "read the in-place journal") from None
        if stat.S_ISLNK(st.st_mode):
            raise OrthopatchError("is a symbolic link where the in-place journal's folder goes: move it away",
                                  path=self.root)
        if not stat.S_ISDIR(st.st_mode):
            kind = "a file" if stat.S_ISREG(st.st_mode) else describe_kind(st.st_mode)
            raise OrthopatchError(f"is {kind} where the in-place journal's folder goes: move it away",
                                  path=self.root)
        try:
            others = sorted(name for name in os.listdir(self.root) if name not in JOURNAL_FILES)
        except OSError as exc:
            raise io_error(exc, self.root, "read the in-place journal") from None
        if others:
            raise OrthopatchError(f"holds {quoted(others[0])}, which orthopatch did not write (the folder is the "
                                  "in-place journal's): move it away", path=self.root)

    def exists(self) -> bool:
        """A journal that took effect: ``state.json`` is written before any shard is touched."""
        return os.path.lexists(self.state_path)

    def read(self, tensors: int) -> dict[str, Any]:
        """The state, checked against a plan of ``tensors`` patched tensors."""
        doc = read_small_json(self.state_path, "in-place journal state")
        if not isinstance(doc, dict) or not isinstance(doc.get("fingerprint"), dict):
            raise OrthopatchError("the in-place journal is not one this version wrote", path=self.state_path)
        done = doc.get("done")
        if not is_json_int(done, 0, MAX_RECORDED) or done > tensors:
            raise OrthopatchError(f"the in-place journal records {done!r} tensors done, of {tensors} in the plan",
                                  path=self.state_path)
        flight = InFlight.load(doc.get("in_flight"), self.state_path)
        if flight is not None and flight.index != done:
            raise OrthopatchError(f"the in-place journal's tensor in flight is number {flight.index}, not the "
                                  f"next one ({done})", path=self.state_path, tensor=flight.tensor)
        self.doc = doc
        return doc

    def begin(self, doc: dict[str, Any], card: Path) -> None:
        """Start afresh: the folder, a copy of the original model card, then the state (the commit point)."""
        self.discard()
        try:
            self.root.mkdir()
            if card.is_file():
                shutil.copyfile(card, self.root / CARD_COPY)
                fd = os.open(self.root / CARD_COPY, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(self.root)
            fsync_dir(self.root.parent)
        except OSError as exc:
            raise io_error(exc, self.root, "create the in-place journal") from None
        self.doc = {**doc, "done": 0, "in_flight": None}
        write_json(self.state_path, self.doc)

    @property
    def done(self) -> int:
        return int(self.doc["done"])

    @property
    def in_flight(self) -> InFlight | None:
        return InFlight.load(self.doc.get("in_flight"), self.state_path)

    def record(self, done: int, in_flight: InFlight | None) -> None:
        self.doc = {**self.doc, "done": done, "in_flight": None if in_flight is None else vars(in_flight)}
        write_json(self.state_path, self.doc)

    def discard(self) -> None:
        """Remove the folder (an unfinished start, or a finished run's leftovers): the state first, so an
        interrupted removal is no journal, then the journal's other files, then the empty folder.
        Anything else in it is refused (:meth:`check_path`) before anything is deleted."""
        self.check_path()
        if not os.path.lexists(self.root):
            return
        try:
            for name in JOURNAL_FILES:
                (self.root / name).unlink(missing_ok=True)
            self.root.rmdir()
            fsync_dir(self.root.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OrthopatchError("holds files orthopatch did not write (the folder is the in-place "
                                      "journal's): move them away", path=self.root) from None
            raise io_error(exc, self.root, "remove the in-place journal") from None

    def data_sha256(self, begin: int, end: int) -> str | None:
        """sha256 of the journal's bytes ``[begin, end)``, or None when the file does not hold them all."""
        digest = hashlib.sha256()
        try:
            with open(self.data_path, "rb") as f:
                if os.fstat(f.fileno()).st_size < end:
                    return None
                f.seek(begin)
                left = end - begin
                while left:
                    chunk = f.read(min(left, 16 << 20))
                    if not chunk:
                        return None
                    digest.update(chunk)
                    left -= len(chunk)
        except OSError:
            return None
        return digest.hexdigest()


class JournalWriter:
    """Receives one patched tensor's chunks, in order, at the tensor's own offset of the journal file.

    It stands where a :class:`~orthopatch.io.writer.ShardWriter` stands for :class:`~orthopatch.patch.stream.TensorPatcher`
    and hashes the bytes as they pass.
    """

    def __init__(self, path: Path, entry: TensorEntry):
        self.path = path
        self.entry = entry
        self._cursor = entry.begin
        self._sha = hashlib.sha256()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(exc, path, "create") from None

    def write(self, segment: int, offset: int, data: memoryview) -> None:
        if segment != self.entry.begin or offset != self._cursor or offset + len(data) > self.entry.end:
            raise RuntimeError(f"out-of-order write of {len(data)} bytes at {offset} to the journal")
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as exc:
            raise io_error(exc, self.path, "write the in-place journal") from None
        self._sha.update(data)
        self._cursor += len(data)

    def finish(self) -> str:
        """fsync the complete tensor (and the folder, which may have just got the file); its sha256."""
        if self._cursor != self.entry.end:
            raise RuntimeError(f"journal holds {self._cursor - self.entry.begin} of {self.entry.nbytes} bytes")
        try:
            os.fsync(self.fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise io_error(exc, self.path, "write the in-place journal") from None
        return self._sha.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


# -- the run --------------------------------------------------------------------------------------------

def _copy_into_place(journal: Journal, shard_path: Path, flight: InFlight, stats: CopyStats,
                     on_progress: Callable[[int], None] | None) -> None:
    """Copy the journal's bytes of ``flight`` into its shard at the same offsets, and fsync the shard."""
    try:
        src = os.open(journal.data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(shard_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                copier = RangeCopier(write_behind=True, block=block_size(dst))
                copier.copy(src, dst, flight.begin, flight.end - flight.begin, on_progress=on_progress)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except OSError as exc:
        raise io_error(exc, shard_path, "write tensor in place") from None
    except EOFError:
        raise OrthopatchError("the in-place journal is shorter than the tensor it records", path=journal.data_path,
                              tensor=flight.tensor) from None
    stats.shared += copier.stats.shared
    stats.kernel += copier.stats.kernel
    stats.user += copier.stats.user


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


def _replay(journal: Journal, root: Path, targets: list[PatchTarget]) -> None:
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
    _copy_into_place(journal, root / flight.shard, flight, CopyStats(), None)
    journal.record(flight.index + 1, None)


def check_targets(root: Path, targets: list[PatchTarget], directions: dict[str, Any], patcher: TensorPatcher, *,
                  quiet: bool = False) -> None:
    """Read every tensor to be patched once, writing nothing, and refuse (one line naming the tensor and
    how many values) any that the projection would refuse halfway through the plan: NaN or Inf values,
    or coefficients that overflow (:meth:`~orthopatch.patch.stream.TensorPatcher.check`)."""
    with ByteProgress(sum(t.entry.nbytes for t in targets), disable=quiet) as progress:
        for target in targets:
            progress.set_description(f"checking {quoted(target.shard)}")
            path = root / target.shard
            with open_source(path) as fd:
                patcher.check(fd, target, directions[target.name], path)
            progress.update(target.entry.nbytes)


def _check_resumable(state: dict[str, Any], fp: dict[str, Any], root: Path) -> None:
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


def apply_in_place(plan: PatchPlan, direction: Direction, *, direction_file: Path, method: Method,
                   device: str = "auto", quiet: bool = False, log: Callable[[str], None] = lambda _: None,
                   base_model: str | None = None, direction_name: str | None = None) -> InPlaceOutcome:
    """Convert ``plan``'s checkpoint in place; see the module docs for the guarantees.

    ``direction_file`` is the file ``direction`` was loaded from; ``base_model`` and ``direction_name``
    are what the model card calls them (default: the folder's and the file's names).
    """
    root = plan.checkpoint.root
    device = resolve_device(device)
    started = time.monotonic()
    patcher = TensorPatcher(device, scale=method.scale, norm_preserving=method.norm_preserving)
    fingerprint = Fingerprint.of(plan, direction.sha256, method, device.type, patcher.kernel.block_elements)
    fp = fingerprint.to_json()
    with exclusive_lock(root, BUSY):
        journal = Journal(root)
        journal.check_path()
        record_path = root / RECORD_NAME
        targets = list(plan.targets())
        resumed = journal.exists()
        if resumed:
            _check_resumable(journal.read(len(targets)), fp, root)
        elif os.path.lexists(record_path):
            record = Record.read(record_path)
            if same_conversion(record.fingerprint, fp):
                journal.discard()
                return InPlaceOutcome("already complete")
            done = "was converted in place" if record.in_place else "holds an orthopatch output"
            what = describe(record.direction.file, record.direction.sha256, record.method.to_json())
            raise OrthopatchError(f"{done} with {what}; converting it again would patch patched tensors "
                                  "(start from an unconverted copy)", path=root)
        check_writable_shards(plan)
        directions = target_directions(plan, direction)
        if not resumed:  # before the journal begins, while the model is still the source
            check_targets(root, targets, directions, patcher, quiet=quiet)
            journal.begin({"fingerprint": fp, "direction": {"file": str(direction_file), "sha256": direction.sha256},
                           "options": method.to_json()}, root / CARD_NAME)

        _replay(journal, root, targets)
        todo = targets[journal.done:]
        stats = CopyStats()
        patched = 0
        if todo:
            left = "" if len(todo) == len(targets) else f", {len(todo)} of {len(targets)} left"
            log(f"{plan.architecture.name} on {device}: patching {len(targets)} tensors "
                f"({plan.patched_bytes:,} bytes) in place{left}")
            with ByteProgress(2 * sum(t.entry.nbytes for t in todo), disable=quiet) as progress:
                for index, target in enumerate(todo, start=len(targets) - len(todo)):
                    progress.set_description(quoted(target.shard))
                    shard_path = root / target.shard
                    writer = JournalWriter(journal.data_path, target.entry)
                    try:
                        with open_source(shard_path) as fd:
                            patcher.patch(fd, target, directions[target.name], writer, progress.update, shard_path)
                        sha = writer.finish()
                    finally:
                        writer.close()
                    flight = InFlight(index, target.name, target.shard, target.entry.begin, target.entry.end, sha)
                    journal.record(index, flight)
                    if index + 1 < len(targets):  # the disk reads the next tensor while this one is written
                        prefetch(root / targets[index + 1].shard, targets[index + 1].entry)
                    _copy_into_place(journal, shard_path, flight, stats, progress.update)
                    journal.record(index + 1, None)
                    patched += target.entry.nbytes
        seconds = time.monotonic() - started
        record = Record.of(plan, source=root, direction_file=direction_file,
                           direction_sha256=direction.sha256, direction_rows=int(direction.rows.shape[0]),
                           method=method, device=str(device), seconds=seconds, fingerprint=fingerprint,
                           in_place=True)
        from orthopatch.patch.model_card import write_model_card

        # The card is built from the original card, kept in the journal (the model's own is ours by now).
        write_model_card(root, journal.root, record, base_model=base_model or folder_name(root),
                         direction=direction_name or direction_file.name)
        write_json(record_path, record.to_json())
        journal.discard()
    return InPlaceOutcome("resumed in place" if resumed else "written in place", seconds, patched, stats)

"""The destination of an out-of-place conversion: a new folder, its lock and its state (new, partial, complete,
foreign).

Order of writing, so that an interrupted run never looks finished: a hidden partial marker holding
the run's fingerprint, the shards (each published by rename), the other model files, the index,
then the record ``orthopatch.json`` (the completion marker), then the partial marker is removed.
"""

from __future__ import annotations

import enum
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.io.filecopy import CopyStats
from orthopatch.io.folders import write_atomic, write_json
from orthopatch.io.formats import CARD_NAME, INDEX_NAME, PARTIAL_NAME, RECORD_NAME
from orthopatch.io.model_files import copy_model_file, model_files
from orthopatch.io.smallfile import read_small_bytes, read_small_json
from orthopatch.io.writer import fsync_dir, io_error, temp_path
from orthopatch.patch.conversion import Conversion
from orthopatch.patch.driver import Log, Step
from orthopatch.patch.journal import Journal
from orthopatch.patch.model_card import write_model_card
from orthopatch.patch.plan import ShardPlan
from orthopatch.patch.record import ConversionRecord
from orthopatch.patch.shard import write_shard
from orthopatch.patch.stream import Progress


class OutputState(enum.Enum):
    NEW = "new"  # missing or empty
    PARTIAL = "partial"  # an interrupted run with the same fingerprint
    COMPLETE = "complete"  # a finished run with the same fingerprint
    OTHER = "other"  # anything else: another run's output or a foreign folder


def _read_json(path: Path) -> Any:
    """A marker or record in the output folder, or None when it is unreadable (then it is not ours)."""
    try:
        return read_small_json(path)
    except OrthopatchError:
        return None


def shard_done(out: Path, shard_name: str, raw_header: bytes, size: int) -> bool:
    """Whether ``out`` holds a published shard of the right size and header (from an interrupted run
    with the same fingerprint: shards are published only when complete)."""
    path = out / shard_name
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(raw_header)) == raw_header
    except OSError:
        return False


class OutputFolder:
    """``OUT``, locked for the lifetime of the object against a second concurrent writer."""

    def __init__(self, root: Path, src: Path):
        self.root = root
        try:
            real, real_src = root.resolve(), src.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise OrthopatchError(f"cannot resolve the output folder's path ({exc})", path=root) from None
        if real == real_src or real_src in real.parents:
            raise OrthopatchError("output folder must not be the source folder or inside it", path=root)
        if real in real_src.parents:
            raise OrthopatchError("output folder must not contain the source folder", path=root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise io_error(exc, root, "create output folder") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise OrthopatchError("another orthopatch run is writing to this folder", path=root) from None

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def record_path(self) -> Path:
        return self.root / RECORD_NAME

    @property
    def partial_path(self) -> Path:
        return self.root / PARTIAL_NAME

    def state(self, fingerprint: dict[str, Any]) -> OutputState:
        # A run killed while writing its first marker leaves only the marker's temporary: still empty.
        # Any other file, a user's file with a temporary-looking name included, makes the folder taken.
        marker_tmp = temp_path(self.partial_path)
        entries = [p for p in self.root.iterdir() if p != marker_tmp]
        if not entries:
            return OutputState.NEW
        if self.partial_path.exists():
            partial = _read_json(self.partial_path)
            return OutputState.PARTIAL if partial == fingerprint else OutputState.OTHER
        record = _read_json(self.record_path)
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
            return OutputState.COMPLETE
        return OutputState.OTHER

    def describe_other(self) -> str:
        if self.partial_path.exists() or self.record_path.exists():
            return "holds an orthopatch output made with another direction, source or options"
        return "is not empty and holds no orthopatch output"

    def clear(self) -> None:
        """Remove everything in the folder (``--overwrite``), the completion record first.

        An interrupted clear then leaves a folder that no longer looks finished.
        """
        try:
            self.record_path.unlink(missing_ok=True)
            fsync_dir(self.root)
            for entry in self.root.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            fsync_dir(self.root)
        except OSError as exc:
            raise io_error(exc, Path(exc.filename or self.root), "clear the output folder") from None

    def remove_temporaries(self, written: Iterable[Path]) -> None:
        """Delete the temporaries an interrupted run of this plan left: those named after ``written``.

        ``written`` are the paths (relative to the folder) the run publishes; only their temporary
        names are removed, so a file of the user's that merely looks temporary is never deleted.
        """
        for rel in [Path(PARTIAL_NAME), Path(RECORD_NAME), *written]:
            tmp = temp_path(self.root / rel)
            if tmp.is_file() or tmp.is_symlink():
                try:
                    tmp.unlink()
                except OSError as exc:
                    raise io_error(exc, tmp, "remove") from None

    def begin(self, fingerprint: dict[str, Any]) -> None:
        write_json(self.partial_path, fingerprint)

    def complete(self, record: dict[str, Any]) -> None:
        write_json(self.record_path, record)
        try:
            self.partial_path.unlink(missing_ok=True)
            fsync_dir(self.root)
        except OSError as exc:
            raise io_error(exc, self.partial_path, "remove") from None


class FolderDestination:
    """An out-of-place conversion's destination: a new folder, written shard by shard."""

    in_place = False

    def __init__(self, root: Path, overwrite: bool = False):
        self.root = root
        self.overwrite = overwrite

    @contextmanager
    def open(self, conversion: Conversion, log: Log) -> Iterator[_FolderSession]:
        src = conversion.plan.checkpoint.root
        if Journal(src).exists():
            raise OrthopatchError("an in-place conversion of this folder is unfinished (rerun it with --in-place to "
                                  "finish it): it is not a source", path=src)
        conversion.check_not_abliterated()  # the source is never changed: before the output folder is made
        with OutputFolder(self.root, src) as out:
            yield _FolderSession(out, conversion, self.overwrite, log)


class _FolderSession:
    """One run into an output folder: state, partial marker, shards, small files, index, card, record."""

    def __init__(self, out: OutputFolder, conversion: Conversion, overwrite: bool, log: Log):
        self.out, self.conversion = out, conversion
        self.patched, self.copied = 0, CopyStats()
        plan, fp = conversion.plan, conversion.fingerprint.to_json()
        state = out.state(fp)
        self.complete = state is OutputState.COMPLETE
        self.resumed = state is OutputState.PARTIAL
        if self.complete:
            return
        if state is OutputState.OTHER:
            if not overwrite:
                raise OrthopatchError(f"output folder {out.describe_other()} (use --overwrite to replace it)",
                                      path=out.root)
            out.clear()
        self.files = model_files(plan.checkpoint.root)
        written = [Path(s.name) for s in plan.shards] + self.files.copied + [Path(INDEX_NAME), Path(CARD_NAME)]
        out.remove_temporaries(written)
        out.begin(fp)
        for rel, why in self.files.skipped:
            log(f"note: not copied: {quoted(str(rel))} {why}")
        self.todo = [s for s in plan.shards
                     if not shard_done(out.root, s.name, s.header.raw, s.header.file_size)]

    def steps(self) -> list[Step]:
        return [Step(shard.name, shard.header.file_size, partial(self._write, shard)) for shard in self.todo]

    def _write(self, shard: ShardPlan, progress: Progress) -> None:
        c = self.conversion
        self.copied += write_shard(shard, c.plan.checkpoint.root, self.out.root, c.unit_vectors, c.patcher, progress,
                                   c.scales)
        self.patched += shard.patched_bytes

    def plan_tail(self, steps: list[Step]) -> str:
        plan = self.conversion.plan
        left = "" if len(steps) == len(plan.shards) else f", {len(steps)} of {len(plan.shards)} shards left to write"
        return f", copying {plan.total_bytes - plan.patched_bytes:,} bytes unchanged{left}"

    def finish(self, record: ConversionRecord) -> None:
        plan, src, out = self.conversion.plan, self.conversion.plan.checkpoint.root, self.out.root
        for rel in self.files.copied:
            copy_model_file(src, out, rel)
        if plan.checkpoint.index_path is not None:
            write_atomic(out / INDEX_NAME, read_small_bytes(plan.checkpoint.index_path, "index"))
        card = self.conversion.card
        write_model_card(out, src, record, base_model=card.base_model, direction=card.direction_name,
                         source=card.source_card)
        self.out.complete(record.to_json())

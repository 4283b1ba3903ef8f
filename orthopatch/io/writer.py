"""Write one output shard safely: under a temporary name, in declared ranges, then fsync and rename."""

from __future__ import annotations

import enum
import errno
import os
import threading
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.io.filecopy import RangeCopier, pwrite_all
from orthopatch.io.formats import TMP_SUFFIX


def temp_path(final: Path) -> Path:
    """The hidden temporary name a file is written under before it is published."""
    return final.with_name(f".{final.name}{TMP_SUFFIX}")


def discard(path: Path | str) -> None:
    """Remove a temporary file if it is there; a folder that refuses (read-only) keeps it, silently:
    the error that matters is the one that made the file useless."""
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def io_error(exc: OSError, path: Path, action: str) -> OrthopatchError:
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OrthopatchError(f"cannot {action} ({reason})", path=path)


class WriterState(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"


class ShardWriter:
    """A shard of known size, made of declared byte ranges (segments) that are each written in order.

    Segments may be filled concurrently by different threads, but each one strictly from its start
    to its end; a write that does not continue its segment exactly is refused, and :meth:`finish`
    refuses to publish a file with any segment incomplete.
    """

    def __init__(self, final: Path, size: int, segments: list[tuple[int, int]], *, reserve: bool = True):
        """``reserve``: allocate the whole file now (a full disk fails here, before any work); pass
        False to choose the ranges with :meth:`reserve` (those not shared with a source)."""
        self.final = final
        self.tmp = temp_path(final)
        self.size = size
        self._segments = sorted(segments)
        cursor = 0
        for begin, end in self._segments:
            if begin != cursor or end < begin:
                raise ValueError(f"segments must tile the file: [{begin}, {end}) after {cursor}")
            cursor = end
        if cursor != size:
            raise ValueError(f"segments cover {cursor} of {size} bytes")
        self._cursor = {begin: begin for begin, _ in self._segments}
        self._ends = dict(self._segments)
        self._lock = threading.Lock()
        self.state = WriterState.OPEN
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise io_error(exc, self.tmp, "create") from None
        if reserve:
            self.reserve([(0, size)])

    def reserve(self, ranges: list[tuple[int, int]]) -> None:
        """Allocate the blocks of ``ranges`` now, so that a full disk is found before any work is done."""
        try:
            for begin, end in ranges:
                if end > begin:
                    os.posix_fallocate(self.fd, begin, end - begin)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.abort()
                raise io_error(exc, self.final, "write shard") from None
            # filesystems without fallocate: the writes themselves will report a full disk

    def claim(self, segment: int, offset: int, length: int) -> None:
        """Check that ``length`` bytes at ``offset`` continue ``segment`` (its begin offset) exactly."""
        with self._lock:
            if self.state is not WriterState.OPEN:
                raise RuntimeError(f"write to a {self.state.value} shard writer")
            if self._cursor.get(segment) != offset or offset + length > self._ends[segment]:
                raise RuntimeError(f"out-of-order write of {length} bytes at {offset} in segment {segment}")
            self._cursor[segment] = offset + length

    def write(self, segment: int, offset: int, data: memoryview) -> None:
        self.claim(segment, offset, len(data))
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as exc:
            raise io_error(exc, self.final, "write shard") from None

    def copy_from(self, copier: RangeCopier, src_fd: int, begin: int, end: int, on_progress=None) -> None:
        """Fill the segment ``[begin, end)`` with the same bytes of ``src_fd``, without decoding them."""
        self.claim(begin, begin, end - begin)
        try:
            copier.copy(src_fd, self.fd, begin, end - begin, on_progress=on_progress)
        except OSError as exc:
            raise io_error(exc, self.final, "write shard") from None

    def finish(self) -> None:
        """fsync, check every segment is complete, and publish by rename."""
        missing = [b for b, e in self._segments if self._cursor[b] != e]
        if missing:
            raise RuntimeError(f"shard {self.final.name} incomplete: segments at {missing[:3]} unfinished")
        try:
            os.fsync(self.fd)
            written = os.fstat(self.fd).st_size
            if written != self.size:
                raise RuntimeError(f"shard {self.final.name} has {written} bytes, not {self.size}")
            os.close(self.fd)
            self.state = WriterState.FINISHED
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise io_error(exc, self.final, "finish shard") from None

    def abort(self) -> None:
        if self.state is WriterState.OPEN:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.state = WriterState.ABORTED
        discard(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.state is WriterState.OPEN:
            self.abort()

"""The journal of an in-place conversion: a hidden folder inside the model that makes it resumable.

1. ``state.json`` (written first, before any shard is touched): the run's fingerprint, what it does
   (direction, options), ``done`` (tensors finished, in plan order) and ``in_flight``;
2. ``journal``: the new bytes of the tensor being converted, at the tensor's own offset (a sparse
   file), fsynced before ``in_flight`` names them and before any of them is copied into the shard;
3. ``README.md``: the model's original card, kept while the model's own may already be the new one.

The journal is untrusted input, like any file of the model folder: the folder is opened without
following a link (``O_DIRECTORY | O_NOFOLLOW``) and every file in it relative to that descriptor, never
through a link, refused unless it is a regular file (a FIFO is opened non-blocking, so it cannot hang
the run); files are created exclusively (``O_CREAT | O_EXCL``) after their name is unlinked, so
nothing outside the model is ever read into it or written. Its state is bounded and checked field by
field, and only its own files are ever deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.io.filecopy import CopyStats, RangeCopier, block_size, pwrite_all
from orthopatch.io.formats import CARD_NAME, INPLACE_JOURNAL_DIR, INPLACE_STATE_NAME
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.io.smallfile import (
    MAX_SMALL_BYTES,
    describe_kind,
    is_json_int,
    parse_json,
    read_fd_bytes,
    read_small_bytes,
)
from orthopatch.io.writer import fsync_dir, io_error, temp_path
from orthopatch.patch.stream import Progress

#: The new bytes of the tensor being converted, at the tensor's own offset (a sparse file).
DATA_NAME = "journal"
#: Everything a journal folder may hold: nothing else in it is deleted.
JOURNAL_FILES = (INPLACE_STATE_NAME, DATA_NAME, CARD_NAME, temp_path(Path(INPLACE_STATE_NAME)).name)
#: Largest offset or index a journal may hold (a file offset fits in 63 bits).
MAX_OFFSET = (1 << 63) - 1
#: How the journal's folder and files are opened: never through a link, never kept by a child process.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_folder(folder: Path) -> int:
    """A descriptor on ``folder``, refused (one line) when it is a link or not a folder."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OrthopatchError("is not a folder of the in-place journal's own (a link, or a file): move it "
                                  "away", path=folder) from None
        raise io_error(exc, folder, "open the in-place journal") from None


def open_in(dir_fd: int, name: str, flags: int, path: Path, mode: int = 0o600) -> int:
    """``name`` opened relative to folder ``dir_fd`` without following a link, refused (one line) unless it
    is a regular file; ``O_NONBLOCK`` keeps a FIFO from hanging the ``open``. ``path`` names it in errors."""
    try:
        fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OrthopatchError("is a symbolic link in the in-place journal, which orthopatch never writes: "
                                  "move it away", path=path) from None
        raise io_error(exc, path, "open") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OrthopatchError(f"is {describe_kind(st.st_mode)} in the in-place journal, which holds regular files "
                              "only: move it away", path=path)
    os.set_blocking(fd, True)
    return fd


def create_in(dir_fd: int, name: str, path: Path) -> int:
    """A new, empty regular file ``name`` in folder ``dir_fd``, for writing: whatever had the name (a link,
    a FIFO, a stale file) is unlinked first, and the file is created exclusively."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise io_error(exc, path, "replace") from None
    try:
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise io_error(exc, path, "create") from None


def write_in(dir_fd: int, name: str, data: bytes, path: Path) -> None:
    """Write a small file of the journal whole or not at all: an exclusive temporary, fsync, rename, fsync."""
    tmp = temp_path(Path(name)).name
    fd = create_in(dir_fd, tmp, path.with_name(tmp))
    try:
        pwrite_all(fd, memoryview(data), 0)
        os.fsync(fd)
    except OSError as exc:
        raise io_error(exc, path, "write") from None
    finally:
        os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise io_error(exc, path, "write") from None


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
        if not all(is_json_int(n, 0, MAX_OFFSET) for n in numbers) or not all(isinstance(t, str) for t in texts):
            raise bad
        flight = cls(numbers[0], texts[0], texts[1], numbers[1], numbers[2], texts[2])
        if flight.begin > flight.end or len(flight.sha256) != 64:
            raise bad
        return flight


class Journal:
    """The hidden folder that makes an in-place conversion resumable; see the module docs."""

    def __init__(self, model: Path):
        self.root = model / INPLACE_JOURNAL_DIR
        self.state_path = self.root / INPLACE_STATE_NAME
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

    @contextmanager
    def folder(self) -> Iterator[int]:
        """A descriptor on the journal's folder, opened without following a link (closed after the body)."""
        fd = open_folder(self.root)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_file(self, name: str) -> int:
        """One of the journal's files, read-only: a regular file in the folder itself, never through a link."""
        with self.folder() as dir_fd:
            return open_in(dir_fd, name, os.O_RDONLY, self.root / name)

    def read_bytes(self, name: str, what: str, limit: int = MAX_SMALL_BYTES) -> bytes:
        """The whole of one of the journal's small files (bounded, a regular file, never through a link)."""
        return read_fd_bytes(self.open_file(name), self.root / name, what, limit)

    def has(self, name: str) -> bool:
        """Whether the journal's folder holds an entry ``name`` (of any kind, a link included)."""
        with self.folder() as dir_fd:
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise io_error(exc, self.root / name, "read") from None
        return True

    def source_card(self) -> str | None:
        """The original model card kept in the journal, as text; None when the model had none."""
        if not self.has(CARD_NAME):
            return None
        return self.read_bytes(CARD_NAME, "in-place journal's copy of the model card").decode("utf-8", "replace")

    def _write_state(self, doc: dict[str, Any]) -> None:
        data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
        with self.folder() as dir_fd:
            write_in(dir_fd, INPLACE_STATE_NAME, data, self.state_path)

    def read(self, tensors: int) -> dict[str, Any]:
        """The state, checked against a plan of ``tensors`` patched tensors."""
        what = "in-place journal state"
        doc = parse_json(self.read_bytes(INPLACE_STATE_NAME, what), self.state_path, what)
        if not isinstance(doc, dict) or not isinstance(doc.get("fingerprint"), dict):
            raise OrthopatchError("the in-place journal is not one this version wrote", path=self.state_path)
        done = doc.get("done")
        if not is_json_int(done, 0, MAX_OFFSET) or done > tensors:
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
        original = read_small_bytes(card, "model card") if os.path.lexists(card) else None
        try:
            self.root.mkdir()
        except OSError as exc:
            raise io_error(exc, self.root, "create the in-place journal") from None
        with self.folder() as dir_fd:
            if original is not None:
                write_in(dir_fd, CARD_NAME, original, self.root / CARD_NAME)
            try:
                os.fsync(dir_fd)
                fsync_dir(self.root.parent)
            except OSError as exc:
                raise io_error(exc, self.root, "create the in-place journal") from None
        self.doc = {**doc, "done": 0, "in_flight": None}
        self._write_state(self.doc)

    @property
    def done(self) -> int:
        return int(self.doc["done"])

    @property
    def in_flight(self) -> InFlight | None:
        return InFlight.load(self.doc.get("in_flight"), self.state_path)

    def save_progress(self, done: int, in_flight: InFlight | None) -> None:
        """Advance the state: ``done`` tensors finished, ``in_flight`` (or none) being copied into place."""
        self.doc = {**self.doc, "done": done, "in_flight": None if in_flight is None else vars(in_flight)}
        self._write_state(self.doc)

    def discard(self) -> None:
        """Remove the folder (an unfinished start, or a finished run's leftovers): the state first, so an
        interrupted removal is no journal, then the journal's other files, then the empty folder.
        Anything else in it is refused (:meth:`check_path`) before anything is deleted."""
        self.check_path()
        if not os.path.lexists(self.root):
            return
        try:
            with self.folder() as dir_fd:
                for name in JOURNAL_FILES:
                    try:
                        os.unlink(name, dir_fd=dir_fd)  # a link itself, never what it points to
                    except FileNotFoundError:
                        pass
            self.root.rmdir()
            fsync_dir(self.root.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OrthopatchError("holds files orthopatch did not write (the folder is the in-place "
                                      "journal's): move them away", path=self.root) from None
            raise io_error(exc, self.root, "remove the in-place journal") from None

    def data_sha256(self, begin: int, end: int) -> str | None:
        """sha256 of the journal's bytes ``[begin, end)``, or None when the file does not hold them all;
        a data file that is not a regular file of the journal's own (a link, a FIFO) is refused."""
        digest = hashlib.sha256()
        if not self.has(DATA_NAME):
            return None
        fd = self.open_file(DATA_NAME)
        try:
            with os.fdopen(fd, "rb") as f:
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

    A :class:`~orthopatch.patch.stream.TensorSink`, as a shard writer is; it hashes the bytes as they pass.
    """

    def __init__(self, path: Path, entry: TensorEntry):
        self.path = path
        self.entry = entry
        self._cursor = entry.begin
        self._sha = hashlib.sha256()
        dir_fd = open_folder(path.parent)
        try:
            self.fd = create_in(dir_fd, path.name, path)
        finally:
            os.close(dir_fd)

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
            dir_fd = open_folder(self.path.parent)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise io_error(exc, self.path, "write the in-place journal") from None
        return self._sha.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def copy_into_place(journal: Journal, shard_path: Path, flight: InFlight, stats: CopyStats,
                     on_progress: Progress | None) -> None:
    """Copy the journal's bytes of ``flight`` into its shard at the same offsets, and fsync the shard."""
    src = journal.open_file(DATA_NAME)
    try:
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

"""The output folder: its locks, its state (new, partial, complete, foreign) and its small files.

Order of writing, so that an interrupted run never looks finished: a hidden partial marker holding
the run's fingerprint, the shards (each published by rename), the other model files, the index,
then the record ``orthopatch.json`` (the completion marker), then the partial marker is removed.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OrthopatchError
from .formats import INDEX_NAME, PARTIAL_NAME, RECORD_NAME, TMP_SUFFIX
from .smallfile import MAX_SMALL_BYTES, describe_kind, read_small_bytes, read_small_json
from .writer import discard, fsync_dir, io_error, temp_path

#: Weight files of other formats, never copied: the output is a safetensors model.
SKIPPED_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
SKIPPED_DIRS = ("original",)


class OutputState(enum.Enum):
    NEW = "new"  # missing or empty
    PARTIAL = "partial"  # an interrupted run with the same fingerprint
    COMPLETE = "complete"  # a finished run with the same fingerprint
    OTHER = "other"  # anything else: another run's output or a foreign folder


def is_temporary(path: Path) -> bool:
    return path.name.endswith(TMP_SUFFIX)


def temporaries(root: Path) -> list[Path]:
    """Files under ``root`` (at any depth) that carry a temporary name."""
    return sorted(p for p in root.rglob(f"*{TMP_SUFFIX}") if p.is_file() or p.is_symlink())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, and rename it into place."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        discard(tmp)
        raise io_error(exc, path, "write") from None


def check_output_file(path: Path, what: str = "output") -> None:
    """A small file can be written at ``path`` later: its folder exists and it is not a folder itself.

    Checked before a long run, so that hours of work are not lost to a mistyped folder."""
    if not path.parent.is_dir():
        raise OrthopatchError(f"the {what} file's folder does not exist", path=path.parent)
    if path.is_dir():
        raise OrthopatchError(f"the {what} file is a folder", path=path)


def write_json(path: Path, doc: Any) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


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


@contextmanager
def _folder_lock(path: Path, operation: int, busy: str, cannot_open: Callable[[OSError], OrthopatchError]
                 ) -> Iterator[None]:
    """Hold a ``flock`` (``LOCK_SH`` or ``LOCK_EX``) on folder ``path``; refused with ``busy`` while held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise cannot_open(exc) from None
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OrthopatchError(busy, path=path) from None
        yield
    finally:
        os.close(fd)


def shared_lock(out: Path, busy: str = "an orthopatch run is writing to this folder; verify it when it ends",
                what: str = "output folder") -> AbstractContextManager[None]:
    """Hold a shared lock on folder ``out``: refused with ``busy`` while a run that locks it exclusively
    (``apply`` writing an output, ``apply --in-place`` converting a model) holds it."""
    return _folder_lock(out, fcntl.LOCK_SH, busy,
                        lambda exc: OrthopatchError(f"cannot open {what} ({exc.strerror})", path=out))


def exclusive_lock(root: Path, busy: str) -> AbstractContextManager[None]:
    """Hold an exclusive lock on folder ``root``; a second holder is refused with ``busy``."""
    return _folder_lock(root, fcntl.LOCK_EX, busy, lambda exc: io_error(exc, root, "open folder"))


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


@dataclass(frozen=True)
class ModelFiles:
    """The model folder's files besides the weights, and those left out with the reason."""

    copied: list[Path]
    skipped: list[tuple[Path, str]]


def model_files(src: Path) -> ModelFiles:
    """Files of the model folder besides the weights: config, tokenizer, templates, licence, card.

    Only regular files of at most :data:`~orthopatch.smallfile.MAX_SMALL_BYTES` are copied; special
    files (FIFOs, devices, sockets, links to them) and larger files are skipped and reported, since a
    model's small files are never either.
    """
    copied, skipped = [], []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in SKIPPED_DIRS:
            continue
        if rel == Path(RECORD_NAME):
            continue  # a source that is itself an orthopatch output: its record is not ours
        if path.name.endswith(SKIPPED_SUFFIXES) or path.name == INDEX_NAME:
            continue
        try:
            st = path.stat()
        except OSError:
            skipped.append((rel, "cannot be read (a dangling link?)"))
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append((rel, f"is {describe_kind(st.st_mode)}"))
        elif st.st_size > MAX_SMALL_BYTES:
            skipped.append((rel, f"is {st.st_size:,} bytes, more than a model's small files have"))
        else:
            copied.append(rel)
    return ModelFiles(copied, skipped)


def copy_model_file(src: Path, out: Path, rel: Path) -> None:
    """Copy one small file durably: temporary name, fsync, rename, fsync of the folders it lives in.

    The record is written after these; without the fsyncs a power cut could leave a recorded,
    finished-looking folder whose config or tokenizer is empty.
    """
    target = out / rel
    new_dirs = [d for d in reversed(rel.parents) if d != Path(".") and not (out / d).exists()]
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        data = read_small_bytes(src / rel)  # a regular file, checked again as it is opened
        with open(tmp, "wb") as fout:
            fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        for d in new_dirs:
            fsync_dir((out / d).parent)
    except OSError as exc:
        discard(tmp)
        raise io_error(exc, target, "copy") from None

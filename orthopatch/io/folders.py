"""Writing files that are whole or absent, and locking folders against a second run.

A small file is written under a temporary name, fsynced and renamed into place, so a reader sees the
old file or the new one, never a part; a folder is locked with ``flock`` so that two runs never write
(or one writes while another reads) the same model.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import TMP_SUFFIX
from orthopatch.io.writer import discard, fsync_dir, io_error, temp_path


def is_temporary(path: Path) -> bool:
    return path.name.endswith(TMP_SUFFIX)


def temporaries(root: Path) -> list[Path]:
    """Files under ``root`` (at any depth) that carry a temporary name."""
    return sorted(p for p in root.rglob(f"*{TMP_SUFFIX}") if p.is_file() or p.is_symlink())


def write_atomic(path: Path, data: bytes, verb: str = "write") -> None:
    """Write a small file under a temporary name, fsync it, and rename it into place (``verb`` names the
    action in an error: ``cannot write``, ``cannot copy``)."""
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
        raise io_error(exc, path, verb) from None


def check_output_file(path: Path, what: str = "output") -> None:
    """A small file can be written at ``path`` later: its folder exists and it is not a folder itself.

    Checked before a long run, so that hours of work are not lost to a mistyped folder."""
    if not path.parent.is_dir():
        raise OrthopatchError(f"the {what} file's folder does not exist", path=path.parent)
    if path.is_dir():
        raise OrthopatchError(f"the {what} file is a folder", path=path)


def write_json(path: Path, doc: Any) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


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

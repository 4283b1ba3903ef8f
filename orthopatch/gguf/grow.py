"""Growing a GGUF header in place: whole filesystem blocks inserted at the front of the file.

A conversion's record goes into the GGUF metadata, so the header grows. Rewriting the data behind it
would rewrite the whole file; instead ``fallocate(FALLOC_FL_INSERT_RANGE)`` inserts a hole of
``shift`` bytes at offset 0 (a multiple of the filesystem block and of the GGUF alignment), which moves
every byte of the file ``shift`` bytes later without copying it, and the new header is then written over
``[0, data_start)``. Between the two the file starts with zeros: no reader takes it for a GGUF. ext4
and XFS insert ranges; tmpfs and btrfs do not (``EOPNOTSUPP``), which :func:`can_insert_ranges` finds
before anything is written.

A finished run's parts carry the record (and the padding key that places the data); the source they
were converted from is identified from them by :func:`original_identity`, so that a rerun is
recognized as the same conversion.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
from pathlib import Path

from orthopatch.gguf.container import FIXED_HEADER, GGUFFile, align_up
from orthopatch.gguf.layout import PADDING_KEY
from orthopatch.gguf.output import RECORD_KEY
from orthopatch.io.writer import io_error

#: ``FALLOC_FL_INSERT_RANGE`` from ``linux/falloc.h``.
FALLOC_FL_INSERT_RANGE = 0x20
_PROBE_NAME = ".orthopatch-insert-probe"


def _fallocate():  # noqa: ANN202 - a ctypes function
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def insert_range(fd: int, offset: int, length: int) -> None:
    """Insert ``length`` bytes (a hole) at ``offset`` of the file on ``fd``; both multiples of the block.
    Raises :class:`OSError` (``EOPNOTSUPP`` where the filesystem cannot)."""
    try:
        fn = _fallocate()
    except (OSError, AttributeError):
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available") from None
    if fn(fd, FALLOC_FL_INSERT_RANGE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def can_insert_ranges(folder: Path, block: int) -> bool:
    """Whether the filesystem of ``folder`` inserts ranges of ``block`` bytes: tried on a small file of its own."""
    probe = folder / _PROBE_NAME
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        os.unlink(probe)  # a probe left by a killed run: orthopatch's own name
        return can_insert_ranges(folder, block)
    except OSError as exc:
        raise io_error(exc, probe, "create") from None
    try:
        os.pwrite(fd, b"\1" * (2 * block), 0)
        insert_range(fd, 0, block)
        return os.fstat(fd).st_size == 3 * block and os.pread(fd, 1, block) == b"\1"
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def original_identity(part: GGUFFile) -> str:
    """``sha256:size`` of the header the part had before a conversion recorded itself in it.

    A part without :data:`RECORD_KEY` is its own source. A converted part holds the source's entries
    byte for byte, in order, then the record and the padding key, and the source's tensor infos; its
    data moved by the difference between the two data starts. This is what
    :func:`orthopatch.gguf.plan.header_sha256` and the file size give for the source.
    """
    digest = hashlib.sha256()
    if RECORD_KEY not in part.metadata:
        for _, raw in part.kv_raw:
            digest.update(raw)
        digest.update(part.tensor_infos_raw)
        return f"{digest.hexdigest()}:{part.file_size}"
    kept = [raw for key, raw in part.kv_raw if key not in (RECORD_KEY, PADDING_KEY)]
    for raw in kept:
        digest.update(raw)
    digest.update(part.tensor_infos_raw)
    header_end = FIXED_HEADER + sum(map(len, kept)) + len(part.tensor_infos_raw)
    data_start = align_up(header_end, part.alignment)
    return f"{digest.hexdigest()}:{part.file_size - (part.data_start - data_start)}"

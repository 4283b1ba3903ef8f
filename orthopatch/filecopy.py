"""Copy byte ranges between files without decoding them, inside the kernel where possible."""

from __future__ import annotations

import errno
import os

#: Bytes per ``copy_file_range`` call and per chunk of the fallback copy.
COPY_CHUNK = 64 << 20
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is an ``EOFError``."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends before byte {offset + len(view)}")
        done += n


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk now, without waiting.

    On Linux ``POSIX_FADV_DONTNEED`` starts writeback of dirty pages in the range (and drops clean
    ones), so the disk writes while the rest of the file is produced and a final ``fsync`` has
    little left to do, instead of all of it.
    """
    if hasattr(os, "posix_fadvise") and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # only a hint


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class RangeCopier:
    """Copies ranges from one file to another at the same or given offsets.

    Uses ``os.copy_file_range`` (no bytes pass through user space; reflinks on filesystems that
    share extents) and falls back, for good, to a bounded ``pread``/``pwrite`` loop when the
    filesystem refuses it. With ``write_behind`` each copied range is handed to writeback at once.
    """

    def __init__(self, chunk: int | None = None, *, write_behind: bool = False):
        self.chunk = chunk or COPY_CHUNK
        self.write_behind = write_behind
        self.in_kernel = hasattr(os, "copy_file_range")
        self._buffer: bytearray | None = None

    def copy(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int | None = None,
             on_progress=None) -> None:
        dst_offset = src_offset if dst_offset is None else dst_offset
        done = 0
        while done < length:
            step = min(self.chunk, length - done)
            n = self._copy_step(src_fd, dst_fd, src_offset + done, step, dst_offset + done)
            if n == 0:
                raise EOFError(f"source ends before byte {src_offset + length}")
            if self.write_behind:
                start_writeback(dst_fd, dst_offset + done, n)
            done += n
            if on_progress is not None:
                on_progress(n)

    def _copy_step(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int) -> int:
        if self.in_kernel:
            try:
                return os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
                self.in_kernel = False
        if self._buffer is None:
            self._buffer = bytearray(self.chunk)
        view = memoryview(self._buffer)[:length]
        n = os.preadv(src_fd, [view], src_offset)
        pwrite_all(dst_fd, view[:n], dst_offset)
        return n

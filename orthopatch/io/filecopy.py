"""Copy byte ranges between files without decoding them: shared extents where the filesystem has them.

An output shard has its source's exact layout, so an unchanged run of bytes sits at the same offset in
both files. Filesystems with shared extents (XFS with reflink, btrfs, ZFS 2.2+) can share such a run
instead of copying it, but only in whole blocks: a run that starts or ends inside a block (every run
after a patched tensor does, because the header's length shifts every offset) is otherwise copied
byte by byte. So each run is split into an unaligned head, a block-aligned body and an unaligned
tail (:func:`split_aligned`); the body is cloned (``FICLONERANGE``), or copied inside the kernel
(``copy_file_range``) where the filesystem cannot clone, and only the head and tail, less than a block
each, pass through user space.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

#: Bytes per ``copy_file_range`` or clone call, and per chunk of the user-space copy.
COPY_CHUNK = 64 << 20
#: ``FICLONERANGE`` from ``linux/fs.h``: ``_IOW(0x94, 13, struct file_clone_range)``.
FICLONERANGE = 0x4020940D
#: Alignment used when the filesystem reports nothing sensible, and the most ever used.
DEFAULT_BLOCK = 4096
MAX_BLOCK = 16 << 20
#: Errors that mean "this filesystem (or pair of files) cannot do that", never "the disk failed".
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM,
                errno.ENOTTY}


@dataclass
class CopyStats:
    """Where the bytes of the copied runs went."""

    shared: int = 0  #: cloned: the output shares these blocks with the source
    kernel: int = 0  #: copied inside the kernel (which shares them itself on some filesystems)
    user: int = 0  #: read and written through user space: unaligned heads and tails, or a fallback

    @property
    def total(self) -> int:
        return self.shared + self.kernel + self.user

    def __add__(self, other: CopyStats) -> CopyStats:
        return CopyStats(self.shared + other.shared, self.kernel + other.kernel, self.user + other.user)


@dataclass(frozen=True)
class Piece:
    """``[begin, end)`` of a run; ``aligned`` when both ends fall on block boundaries."""

    begin: int
    end: int
    aligned: bool


def split_aligned(begin: int, end: int, block: int) -> list[Piece]:
    """``[begin, end)`` as an unaligned head, a block-aligned body and an unaligned tail.

    Empty parts are left out: an aligned run is one body, a run inside one block (or crossing one
    boundary) is only unaligned pieces, and an empty run has no pieces at all.
    """
    if end <= begin:
        return []
    body_begin = -(-begin // block) * block
    body_end = end // block * block
    if body_begin >= body_end:
        return [Piece(begin, end, False)]
    pieces = [Piece(begin, body_begin, False)] if begin < body_begin else []
    pieces.append(Piece(body_begin, body_end, True))
    if body_end < end:
        pieces.append(Piece(body_end, end, False))
    return pieces


def block_size(fd: int) -> int:
    """The granularity at which ``fd``'s filesystem can share extents: its block size (a power of two)."""
    try:
        sizes = [os.fstat(fd).st_blksize, os.fstatvfs(fd).f_bsize]
    except OSError:
        return DEFAULT_BLOCK
    sizes = [s for s in sizes if s and s & (s - 1) == 0 and s <= MAX_BLOCK]
    return max(sizes, default=DEFAULT_BLOCK)


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


def clone_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int | None = None) -> None:
    """Share ``[offset, offset + length)`` of ``src_fd`` into ``dst_fd`` at ``dst_offset`` (default: the same
    offset) with ``FICLONERANGE``.

    Both ends must be block-aligned. Raises ``OSError`` where the filesystem cannot share extents.
    """
    dst_offset = offset if dst_offset is None else dst_offset
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("=qQQQ", src_fd, offset, length, dst_offset))


class RangeCopier:
    """Copies ranges from one file to another, at the same or given offsets, as cheaply as the files allow.

    Ranges at the same offset in both files, or at offsets a whole number of blocks apart, are split at
    block boundaries (``block``, default: the destination's block size): bodies are cloned while the
    filesystem accepts it, then copied with ``os.copy_file_range``, then, for good, through a bounded
    ``pread``/``pwrite`` loop; heads and tails always take that loop. With ``write_behind`` every range
    written (not cloned) is handed to writeback at once. :attr:`stats` counts where the bytes went.
    """

    def __init__(self, chunk: int | None = None, *, write_behind: bool = False, block: int | None = None,
                 clone: bool = True):
        self.chunk = chunk or COPY_CHUNK
        self.write_behind = write_behind
        self.block = block
        self.can_clone = clone
        self.in_kernel = hasattr(os, "copy_file_range")
        self.stats = CopyStats()
        self._buffer: bytearray | None = None

    def probe(self, src_fd: int, dst_fd: int, size: int) -> bool:
        """Find out whether the destination can share the source's blocks, by cloning its first block.

        Harmless for a file of the source's layout: every byte of that block is written again by the
        ranges that cover it. Sets :attr:`can_clone`.
        """
        block = self.block or block_size(dst_fd)
        if not self.can_clone or size < block:
            self.can_clone = False
            return False
        try:
            self._clone(src_fd, dst_fd, 0, block)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self.can_clone = False
        return self.can_clone

    def copy(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int | None = None,
             on_progress=None) -> None:
        dst_offset = src_offset if dst_offset is None else dst_offset
        block = self.block or block_size(dst_fd)
        self.block = block
        shift = dst_offset - src_offset
        if shift % block:
            self._copy_bytes(src_fd, dst_fd, src_offset, length, dst_offset, on_progress)
            return
        for piece in split_aligned(src_offset, src_offset + length, block):
            if piece.aligned:
                self._copy_body(src_fd, dst_fd, piece.begin, piece.end - piece.begin, on_progress, shift)
            else:
                self._copy_user(src_fd, dst_fd, piece.begin, piece.end - piece.begin, piece.begin + shift,
                                on_progress)

    # -- the three ways, each in bounded steps with progress -------------------------------------------

    def _copy_body(self, src_fd: int, dst_fd: int, offset: int, length: int, on_progress, shift: int = 0) -> None:
        """An aligned range (written ``shift`` bytes further on): cloned while the filesystem accepts it,
        otherwise copied."""
        done = 0
        while done < length and self.can_clone:
            step = min(self.chunk, length - done)
            try:
                if shift:
                    self._clone(src_fd, dst_fd, offset + done, step, offset + done + shift)
                else:
                    self._clone(src_fd, dst_fd, offset + done, step)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_clone = False
                break
            self.stats.shared += step
            done += step
            if on_progress is not None:
                on_progress(step)
        if done < length:
            self._copy_bytes(src_fd, dst_fd, offset + done, length - done, offset + done + shift, on_progress)

    def _copy_bytes(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int,
                    on_progress) -> None:
        """Copy inside the kernel while it accepts, otherwise through user space."""
        done = 0
        while done < length:
            step = min(self.chunk, length - done)
            if self.in_kernel:
                n = self._kernel_copy(src_fd, dst_fd, src_offset + done, step, dst_offset + done)
                if n is not None:
                    self._wrote(dst_fd, dst_offset + done, n, on_progress)
                    self.stats.kernel += n
                    done += n
                    continue
            self._copy_user(src_fd, dst_fd, src_offset + done, length - done, dst_offset + done, on_progress)
            return

    def _copy_user(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int,
                   on_progress) -> None:
        done = 0
        while done < length:
            step = min(self.chunk, length - done)
            n = self._user_copy(src_fd, dst_fd, src_offset + done, step, dst_offset + done)
            self.stats.user += n
            self._wrote(dst_fd, dst_offset + done, n, on_progress)
            done += n

    def _wrote(self, dst_fd: int, offset: int, n: int, on_progress) -> None:
        if n == 0:
            raise EOFError(f"source ends before byte {offset + 1}")
        if self.write_behind:
            start_writeback(dst_fd, offset, n)
        if on_progress is not None:
            on_progress(n)

    # -- the system calls (tests replace these to record what goes where) ------------------------------

    def _clone(self, src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int | None = None) -> None:
        clone_range(src_fd, dst_fd, offset, length, dst_offset)

    def _kernel_copy(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int) -> int | None:
        """Bytes copied by ``copy_file_range``, or None (and never again) where the filesystem refuses it."""
        try:
            return os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self.in_kernel = False
            return None

    def _user_copy(self, src_fd: int, dst_fd: int, src_offset: int, length: int, dst_offset: int) -> int:
        if self._buffer is None or len(self._buffer) < length:  # sized to need: heads are small
            self._buffer = bytearray(min(self.chunk, max(length, len(self._buffer or b""))))
        view = memoryview(self._buffer)[:length]
        n = os.preadv(src_fd, [view], src_offset)
        pwrite_all(dst_fd, view[:n], dst_offset)
        return n

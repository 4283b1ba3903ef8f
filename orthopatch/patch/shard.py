"""Write one output shard: unchanged byte runs copied in the kernel, patched tensors streamed.

An output shard has exactly the source's header bytes and offsets (a patch changes no name, dtype
or shape), so it is laid out before any data is read: runs of unchanged bytes become copy segments
and every patched tensor its own segment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.filecopy import CopyStats, RangeCopier, block_size, split_aligned
from orthopatch.io.reader import open_source
from orthopatch.io.writer import ShardWriter, io_error
from orthopatch.patch.plan import PatchTarget, ShardPlan
from orthopatch.patch.stream import TensorPatcher

Progress = Callable[[int], None]


def shard_segments(shard: ShardPlan) -> list[tuple[int, int, PatchTarget | None]]:
    """The file as ``(begin, end, target)`` segments: ``target`` None for a run of copied bytes."""
    # By name: a zero-size tensor shares its offset with the next one, and has no bytes to patch.
    patched = {t.name: t for t in shard.targets}
    segments: list[tuple[int, int, PatchTarget | None]] = []
    run_start = 0
    for entry in shard.header.tensors:
        target = patched.get(entry.name) if entry.nbytes else None
        if target is None:
            continue
        if run_start < entry.begin:
            segments.append((run_start, entry.begin, None))
        segments.append((entry.begin, entry.end, target))
        run_start = entry.end
    if run_start < shard.header.file_size:
        segments.append((run_start, shard.header.file_size, None))
    return segments


class _Stopped(Exception):
    """Raised in the copy thread when the patch thread has failed."""


def written_ranges(segments: list[tuple[int, int, PatchTarget | None]], block: int) -> list[tuple[int, int]]:
    """The byte ranges of a shard that are written rather than shared: everything but the aligned
    bodies of the unchanged runs (adjacent ranges merged)."""
    ranges: list[tuple[int, int]] = []
    for begin, end, target in segments:
        pieces = [(begin, end)] if target is not None else \
            [(p.begin, p.end) for p in split_aligned(begin, end, block) if not p.aligned]
        for b, e in pieces:
            if ranges and ranges[-1][1] == b:
                ranges[-1] = (ranges[-1][0], e)
            else:
                ranges.append((b, e))
    return ranges


def write_shard(shard: ShardPlan, src: Path, out: Path, directions: dict[str, torch.Tensor],
                patcher: TensorPatcher, on_progress: Progress | None = None,
                scales: dict[str, float] | None = None) -> CopyStats:
    """Write ``out/shard.name`` (atomically) from ``src/shard.name``; returns where the copied bytes went.

    Unchanged runs are copied on a second thread while this one streams the patched tensors; the
    kernel copy and the projection overlap, and both release the GIL. Where the output's filesystem
    can share the source's blocks, the unchanged runs are shared and only the rest is allocated.
    """
    segments = shard_segments(shard)
    src_path = src / shard.name
    size = shard.header.file_size
    with open_source(src_path) as fd, ShardWriter(out / shard.name, size, [(b, e) for b, e, _ in segments],
                                                   reserve=False) as writer:
        copier = RangeCopier(write_behind=True, block=block_size(writer.fd))
        try:
            shares = copier.probe(fd, writer.fd, size)
        except OSError as exc:
            raise io_error(exc, writer.final, "write shard") from None
        writer.reserve(written_ranges(segments, copier.block) if shares else [(0, size)])
        stop = threading.Event()

        def copied(n: int) -> None:
            if stop.is_set():  # the patch thread failed: stop copying a shard that will be discarded
                raise _Stopped
            if on_progress is not None:
                on_progress(n)

        def copy_unchanged() -> None:
            for begin, end, target in segments:
                if target is None:
                    writer.copy_from(copier, fd, begin, end, copied)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthopatch-copy") as pool:
            copies = pool.submit(copy_unchanged)
            try:
                for _, _, target in segments:
                    if target is not None:
                        patcher.patch(fd, target, directions[target.name], writer, on_progress, src_path,
                                      scale=(scales or {}).get(target.name))
            except BaseException:
                stop.set()
                raise
            finally:
                error = copies.exception()
            if error is not None:
                if isinstance(error, EOFError):
                    raise OrthopatchError(f"source changed or truncated while reading ({error})",
                                          path=src_path) from None
                raise error
        writer.finish()
    return copier.stats

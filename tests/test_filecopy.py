"""Copying unchanged runs: block alignment, which system call gets which range, and the written ranges."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orthopatch.io.filecopy import CopyStats, Piece, RangeCopier, split_aligned
from orthopatch.io.safetensors_header import read_header
from orthopatch.patch.plan import PatchTarget, ShardPlan
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.shard import shard_segments, write_shard, written_ranges
from orthopatch.patch.stream import TensorPatcher
from tests.helpers import safetensors_bytes

B = 4096


# -- split_aligned ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("begin", "end", "pieces"), [
    (0, 0, []),  # empty
    (5000, 5000, []),
    (7, 3, []),  # reversed: nothing
    (0, 2 * B, [(0, 2 * B, True)]),  # aligned both ends
    (100, 200, [(100, 200, False)]),  # inside one block
    (4000, 4200, [(4000, 4200, False)]),  # crosses a boundary but holds no whole block
    (100, B, [(100, B, False)]),  # a head only
    (B, B + 10, [(B, B + 10, False)]),  # a tail only, shorter than a block
    (100, 10_000, [(100, B, False), (B, 2 * B, True), (2 * B, 10_000, False)]),  # starts and ends anywhere
    (B, 10_000, [(B, 2 * B, True), (2 * B, 10_000, False)]),  # aligned start, file ends mid-block
    (100, 2 * B, [(100, B, False), (B, 2 * B, True)]),  # aligned end
    (B - 1, 2 * B + 1, [(B - 1, B, False), (B, 2 * B, True), (2 * B, 2 * B + 1, False)]),  # one-byte head/tail
])
def test_split_aligned_cases(begin: int, end: int, pieces: list[tuple[int, int, bool]]) -> None:
    assert split_aligned(begin, end, B) == [Piece(*p) for p in pieces]


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 24), st.sampled_from([512, 4096, 65536, 1 << 20]))
def test_split_aligned_tiles_the_run(begin: int, length: int, block: int) -> None:
    pieces = split_aligned(begin, begin + length, block)
    assert sum(p.end - p.begin for p in pieces) == length
    assert all(p.end > p.begin for p in pieces)
    assert all(a.end == b.begin for a, b in itertools.pairwise(pieces))
    if pieces:
        assert (pieces[0].begin, pieces[-1].end) == (begin, begin + length)
    aligned = [p for p in pieces if p.aligned]
    assert len(aligned) <= 1 and len(pieces) <= 3
    for p in aligned:
        assert p.begin % block == 0 and p.end % block == 0
    for p in pieces:
        if not p.aligned:
            assert p.end - p.begin < 2 * block
            assert p.end - p.begin < block or not aligned  # beside a body, a head or tail is under a block
    # whenever the run holds a whole aligned block, it is shared
    first_block = -(-begin // block) * block
    assert bool(aligned) == (first_block + block <= begin + length)


# -- which system call gets which range ---------------------------------------------------------------

class RecordingCopier(RangeCopier):
    """Records ``(way, offset, length)`` of every call instead of making it; clones can be refused."""

    def __init__(self, *, refuse_clone: bool = False, refuse_kernel: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int, int]] = []
        self.refuse_clone, self.refuse_kernel = refuse_clone, refuse_kernel

    def _clone(self, src_fd, dst_fd, offset, length):
        if self.refuse_clone:
            raise OSError(errno.EOPNOTSUPP, "no reflink here")
        self.calls.append(("clone", offset, length))

    def _kernel_copy(self, src_fd, dst_fd, src_offset, length, dst_offset):
        if self.refuse_kernel:
            self.in_kernel = False
            return None
        assert src_offset == dst_offset
        self.calls.append(("kernel", src_offset, length))
        return length

    def _user_copy(self, src_fd, dst_fd, src_offset, length, dst_offset):
        assert src_offset == dst_offset
        self.calls.append(("user", src_offset, length))
        return length


def test_bodies_are_cloned_and_only_heads_and_tails_go_through_memory() -> None:
    copier = RecordingCopier(block=B)
    copier.copy(0, 1, 100, 3 * B)  # [100, 12388)
    assert copier.calls == [("user", 100, B - 100), ("clone", B, 2 * B), ("user", 3 * B, 100)]
    assert copier.stats == CopyStats(shared=2 * B, kernel=0, user=B)


def test_large_bodies_are_cloned_in_bounded_steps() -> None:
    copier = RecordingCopier(block=B, chunk=4 * B)
    copier.copy(0, 1, 0, 10 * B)
    assert copier.calls == [("clone", 0, 4 * B), ("clone", 4 * B, 4 * B), ("clone", 8 * B, 2 * B)]


def test_without_clones_bodies_are_copied_in_the_kernel() -> None:
    copier = RecordingCopier(block=B, refuse_clone=True)
    copier.copy(0, 1, 10, 2 * B)
    assert copier.calls == [("user", 10, B - 10), ("kernel", B, B), ("user", 2 * B, 10)]
    assert not copier.can_clone
    assert copier.stats == CopyStats(shared=0, kernel=B, user=B)


def test_without_kernel_copies_everything_goes_through_memory() -> None:
    copier = RecordingCopier(block=B, refuse_clone=True, refuse_kernel=True, chunk=B)
    copier.copy(0, 1, 0, 2 * B + 5)
    assert copier.calls == [("user", 0, B), ("user", B, B), ("user", 2 * B, 5)]
    assert copier.stats.user == 2 * B + 5


@pytest.mark.parametrize("length", [0, 1, B - 1])
def test_tiny_and_empty_runs(length: int) -> None:
    copier = RecordingCopier(block=B)
    copier.copy(0, 1, 3, length)
    assert copier.calls == ([("user", 3, length)] if length else [])


def test_probe_clones_the_first_block_or_gives_up() -> None:
    sharing = RecordingCopier(block=B)
    assert sharing.probe(0, 1, 10 * B) and sharing.calls == [("clone", 0, B)]
    refusing = RecordingCopier(block=B, refuse_clone=True)
    assert not refusing.probe(0, 1, 10 * B) and not refusing.can_clone
    small = RecordingCopier(block=B)
    assert not small.probe(0, 1, B - 1) and small.calls == []


def test_a_failing_disk_is_not_mistaken_for_a_filesystem_without_clones() -> None:
    class Broken(RecordingCopier):
        def _clone(self, *args):
            raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O"):
        Broken(block=B).copy(0, 1, 0, 2 * B)


def test_the_real_copier_on_this_filesystem(tmp_path: Path) -> None:
    """Whatever this filesystem can do, the copy is exact and every byte is counted once."""
    data = os.urandom(5 * B + 123)
    (tmp_path / "a").write_bytes(data)
    src = os.open(tmp_path / "a", os.O_RDONLY)
    dst = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        copier = RangeCopier(block=B, write_behind=True)
        copier.probe(src, dst, len(data))
        copier.copy(src, dst, 0, 77)
        copier.copy(src, dst, 77, len(data) - 77)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "b").read_bytes() == data
    assert copier.stats.total == len(data)


# -- a shard: which ranges are written, which shared ----------------------------------------------------

def odd_shard(folder: Path) -> tuple[ShardPlan, dict[str, torch.Tensor]]:
    """A shard whose patched tensors and unchanged runs start and end off block boundaries."""
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a.o_proj": torch.randn(96, 50, generator=gen).to(torch.bfloat16),  # 9600 bytes
        "b.norm": torch.randn(96, generator=gen).to(torch.bfloat16),
        "c.big": torch.randn(96, 300, generator=gen).to(torch.bfloat16),  # 57600 bytes: whole blocks inside
        "d.o_proj": torch.randn(96, 33, generator=gen).to(torch.bfloat16),
        "e.tail": torch.randn(7000, generator=gen).to(torch.bfloat16),  # the run at the end of the file
    }
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    header = read_header(folder / "model.safetensors")
    targets = tuple(PatchTarget(entry=e, shard="model.safetensors", role="test", axis=0, layer=0)
                    for e in header.tensors if e.name.endswith("o_proj"))
    return ShardPlan("model.safetensors", header, targets), tensors


def test_written_ranges_are_the_patched_tensors_and_the_unaligned_ends(tmp_path: Path) -> None:
    plan, _ = odd_shard(tmp_path / "src")
    segments = shard_segments(plan)
    ranges = written_ranges(segments, B)
    size = plan.header.file_size
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # sorted, disjoint, merged
    for begin, end, target in segments:
        if target is not None:
            assert any(b <= begin and end <= e for b, e in ranges)
    shared = size - sum(e - b for b, e in ranges)
    assert shared == sum(p.end - p.begin for b, e, t in segments if t is None
                         for p in split_aligned(b, e, B) if p.aligned)
    assert shared >= 57600 - 2 * B  # the big unchanged tensor is shared but for its two ends
    runs = sum(1 for *_, t in segments if t is None)
    assert sum(e - b for b, e in ranges) <= plan.patched_bytes + 2 * B * runs


def test_write_shard_on_a_filesystem_that_shares(tmp_path: Path, monkeypatch) -> None:
    """With clones that work (simulated by copying), the output is the same file as without them,
    every clone is block-aligned at the same offset in both files, and only the rest is reserved."""
    plan, _ = odd_shard(tmp_path / "src")
    u = unit_direction(torch.randn(96, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    directions = {t.name: u for t in plan.targets}

    def convert(name: str) -> tuple[bytes, CopyStats]:
        out = tmp_path / name
        out.mkdir()
        stats = write_shard(plan, tmp_path / "src", out, directions, TensorPatcher("cpu"))
        return (out / plan.name).read_bytes(), stats

    plain, plain_stats = convert("plain")
    clones: list[tuple[int, int]] = []
    reserved: list[tuple[int, int]] = []

    def fake_clone(self, src_fd, dst_fd, offset, length):
        assert offset % B == 0 and length % B == 0
        clones.append((offset, length))
        data = os.pread(src_fd, length, offset)
        assert os.pwrite(dst_fd, data, offset) == length

    real_fallocate = os.posix_fallocate

    def fallocate(fd, offset, length):
        reserved.append((offset, offset + length))
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(RangeCopier, "_clone", fake_clone)
    monkeypatch.setattr("orthopatch.patch.shard.block_size", lambda fd: B)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    shared, stats = convert("shared")
    assert shared == plain
    assert clones[0] == (0, B)  # the probe
    assert stats.shared == sum(n for _, n in clones[1:]) > 50_000
    assert stats.total == plain_stats.total == plan.header.file_size - plan.patched_bytes
    assert reserved == written_ranges(shard_segments(plan), B)

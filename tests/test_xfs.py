"""On a filesystem with shared extents (XFS with reflink), an output costs only its patched tensors.

The test builds a small XFS image, mounts it on a loop device, converts a checkpoint laid out as
``save_pretrained`` writes it (several layers per shard, tensors sorted by name, a header whose
length is not a multiple of the block size), and checks the new blocks and the bytes. It needs root,
loop devices and ``mkfs.xfs`` (``apt-get install xfsprogs``); elsewhere it is skipped, with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.shard import shard_segments
from orthopatch.synthetic import LlamaShape, write_checkpoint, write_direction

pytestmark = pytest.mark.slow

#: About 115 MB in 3 shards of several layers each; 48 MB of it patched.
SHAPE = LlamaShape(hidden=512, intermediate=1376, vocab=32000, layers=8, heads=8, kv_heads=4)
SHARD_BYTES = 40_000_000
IMAGE_BYTES = 400 << 20
SHARED_FLAG = 0x2000  # FIEMAP_EXTENT_SHARED


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.fixture(scope="module")
def xfs(tmp_path_factory) -> Iterator[Path]:
    """A mounted reflink XFS of ``IMAGE_BYTES``, unmounted and deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS image on a loop device needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (apt-get install xfsprogs)")
    root = tmp_path_factory.mktemp("xfs")
    image, mnt = root / "xfs.img", root / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    made = _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip().splitlines()[-1:]}")
    mounted = _run("mount", "-o", "loop", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _run("umount", str(mnt)).returncode != 0:
            _run("umount", "-l", str(mnt))
        image.unlink()


def free_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def shared_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in extents the filesystem marks shared (``xfs_io -c "fiemap -v"``)."""
    if shutil.which("xfs_io") is None:
        return None
    listing = _run("xfs_io", "-c", "fiemap -v", str(path))
    total = 0
    for line in listing.stdout.splitlines()[2:]:
        fields = line.split()
        if len(fields) >= 5 and fields[2] != "hole" and int(fields[-1], 16) & SHARED_FLAG:
            total += int(fields[-2]) * 512
    return total


def test_an_output_on_xfs_costs_only_its_patched_tensors(xfs: Path, tmp_path: Path) -> None:
    model = write_checkpoint(xfs / "model", SHAPE, shard_bytes=SHARD_BYTES, order="save_pretrained")
    direction = tmp_path / "r.pth"
    write_direction(direction, SHAPE.hidden)
    reference = apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "plain", quiet=True))
    plan = reference.plan
    block = os.statvfs(xfs).f_bsize
    assert len(plan.shards) >= 3
    assert any(s.header.data_start % block for s in plan.shards), "the layout should not be block-aligned"
    runs = sum(1 for shard in plan.shards for *_, target in shard_segments(shard) if target is None)

    before = free_bytes(xfs)
    result = apply(ApplyOptions(model=model, direction=direction, out=xfs / "out", quiet=True))
    new_blocks = before - free_bytes(xfs)

    unchanged = plan.total_bytes - plan.patched_bytes
    # New blocks: the patched tensors, the unaligned ends of every unchanged run, the small files.
    assert plan.patched_bytes <= new_blocks <= plan.patched_bytes + (2 * runs + 16) * block + (1 << 20)
    assert result.copied.shared >= unchanged - 2 * runs * block
    assert result.copied.kernel == 0 and result.copied.user < 2 * runs * block
    for shard in plan.shards:
        out, plain = xfs / "out" / shard.name, tmp_path / "plain" / shard.name
        assert out.read_bytes() == plain.read_bytes(), shard.name
        shared = shared_bytes(out)
        if shared is not None:
            unchanged_in_shard = shard.header.file_size - shard.patched_bytes
            shard_runs = sum(1 for *_, t in shard_segments(shard) if t is None)
            assert shared >= unchanged_in_shard - 2 * shard_runs * block, shard.name


def test_in_place_on_xfs_moves_the_journal_blocks_into_the_shards(xfs: Path, tmp_path: Path) -> None:
    """In place, each tensor's journal blocks are shared into its shard instead of copied: the bytes
    are an out-of-place run's, and the folder ends up using no more space than before."""
    model = write_checkpoint(tmp_path / "model", SHAPE, shard_bytes=SHARD_BYTES, order="save_pretrained")
    direction = tmp_path / "r.pth"
    write_direction(direction, SHAPE.hidden)
    reference = apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "plain", quiet=True))
    work = xfs / "in-place" / "model"
    shutil.copytree(model, work)
    before = free_bytes(xfs)
    result = apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True))
    block = os.statvfs(xfs).f_bsize
    runs = 2 * sum(len(shard.targets) for shard in reference.plan.shards)  # each tensor's two ends
    assert result.state == "written in place"
    assert result.copied.shared >= reference.plan.patched_bytes - runs * block
    assert abs(before - free_bytes(xfs)) <= (runs + 16) * block + (1 << 20)
    for shard in reference.plan.shards:
        assert (work / shard.name).read_bytes() == (tmp_path / "plain" / shard.name).read_bytes(), shard.name
    shutil.rmtree(work.parent)

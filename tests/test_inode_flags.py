"""A shard with the append-only or immutable inode flag (``chattr +a``, ``+i``) is refused by the check
made before an in-place run starts, not after its journal began."""

from __future__ import annotations

import array
import fcntl
import subprocess
from pathlib import Path

import pytest

from orthopatch.io.formats import INPLACE_JOURNAL_DIR as JOURNAL_DIR
from orthopatch.patch import inplace
from tests import test_inplace
from tests.helpers import untouched
from tests.test_inplace import fresh_copy, one_line_refusal

tiny = test_inplace.tiny  # the module's fixture: a small model with a card, its direction, the reference


def patched_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[1]


def fake_flags(monkeypatch: pytest.MonkeyPatch, flags: int) -> None:
    """``FS_IOC_GETFLAGS`` answers ``flags`` for every file; other ioctls go on as before."""
    real = fcntl.ioctl

    def ioctl(fd, request, arg=0, mutate=True):
        if request == inplace.FS_IOC_GETFLAGS:
            assert isinstance(arg, array.array)
            arg[0] = flags
            return 0
        return real(fd, request, arg, mutate)

    monkeypatch.setattr(inplace.fcntl, "ioctl", ioctl)


@pytest.mark.parametrize("flags, word", [(0x20, "append-only"), (0x10, "immutable"), (0x30, "immutable")])
def test_flags_read_by_the_ioctl_are_refused_before_the_journal(tiny, tmp_path, monkeypatch, flags, word) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    fake_flags(monkeypatch, flags)
    assert inplace.inode_flag_refusal(patched_shard(work)) == word
    with untouched(work):
        line = one_line_refusal(work, direction, f"has the {word} attribute")
    assert "chattr" in line
    assert not (work / JOURNAL_DIR).exists()


def test_other_flags_and_filesystems_without_flags_are_not_refused(tiny, tmp_path, monkeypatch) -> None:
    model, _, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    fake_flags(monkeypatch, 0x80000)  # FS_EXTENT_FL, as every ext4 file has
    assert inplace.inode_flag_refusal(patched_shard(work)) is None

    def unsupported(*_args, **_kwargs):
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(inplace.fcntl, "ioctl", unsupported)
    assert inplace.inode_flag_refusal(patched_shard(work)) is None


def test_a_real_append_only_shard_is_refused_before_the_journal(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    shard = patched_shard(work)
    made = subprocess.run(["chattr", "+a", str(shard)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +a does not work here ({made.stderr.strip() or made.returncode}): "
                    "the monkeypatched tests cover the check")
    try:
        with untouched(work):
            one_line_refusal(work, direction, "has the append-only attribute")
        assert not (work / JOURNAL_DIR).exists()
    finally:
        subprocess.run(["chattr", "-a", str(shard)], check=True)

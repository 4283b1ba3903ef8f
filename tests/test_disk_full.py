"""A full disk: one line, exit 1, no temporary file left, a folder that never looks finished, and a
rerun (once there is room) that finishes with the bytes of an uninterrupted run."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orthopatch.io.checkpoint import INDEX_NAME
from orthopatch.io.folders import temporaries
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.synthetic import DEMO
from orthopatch.verify import VerifyOptions, verify
from tests.helpers import (
    Converted,
    cli,
    comparable_files,
    one_error_line,
    run_orthopatch,
    save_direction,
    tiny_llama,
    untouched,
)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def made(converted: Converted) -> tuple[Path, Path, dict[str, str]]:
    return converted.model, converted.direction, converted.files


def after_n_calls(n: int, real):
    """A stand-in for ``real`` that raises ENOSPC from its ``n``-th call on."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise enospc()
        return real(*args, **kwargs)
    return fake


def fill_disk(monkeypatch, where: str) -> None:
    if where == "fallocate":
        monkeypatch.setattr(os, "posix_fallocate", after_n_calls(3, os.posix_fallocate))
    elif where == "pwrite":  # a filesystem without fallocate: the writes themselves fail
        def unsupported(*args):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr(os, "posix_fallocate", unsupported)
        monkeypatch.setattr(os, "pwrite", after_n_calls(3, os.pwrite))
    elif where == "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", after_n_calls(10, os.copy_file_range))
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", after_n_calls(4, os.fsync))
    elif where in ("model-file", "index", "record"):
        name = {"model-file": "vocab.txt", "index": INDEX_NAME, "record": RECORD_NAME}[where]
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == name:
                raise enospc()
            return real(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)
    else:
        raise AssertionError(where)


@pytest.mark.parametrize("where", ["fallocate", "pwrite", "copy_file_range", "fsync", "model-file", "index",
                                   "record"])
def test_a_full_disk_anywhere(made, tmp_path, monkeypatch, where: str) -> None:
    model, direction, reference = made
    out = tmp_path / "out"
    args = ["apply", str(model), str(direction), "-o", str(out), "-q"]
    with untouched(model):
        with monkeypatch.context() as m:
            fill_disk(m, where)
            line = one_error_line(cli(*args))
        assert line.startswith(f"orthopatch: error: {out}") and line.endswith("(no space left on device)")
        assert temporaries(out) == []
        assert not (out / RECORD_NAME).exists() and (out / PARTIAL_NAME).exists()
        if where not in ("record",):
            assert not (out / INDEX_NAME).exists()
        assert not verify(VerifyOptions(out=out, direction=direction, quiet=True)).ok
        rerun = cli(*args)  # room again: the same command finishes the job
        assert rerun.exit_code == 0, rerun.output
    assert comparable_files(out) == reference
    assert verify(VerifyOptions(out=out, direction=direction, source=model, quiet=True)).ok


def mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_real_full_tmpfs(tmp_path) -> None:
    disk = tmp_path / "small"
    if not mount_tmpfs(disk, "4m"):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        model = tiny_llama(tmp_path / "model", shape=DEMO, shard_bytes=1 << 20)  # about 10 MB
        direction = tmp_path / "r.pth"
        save_direction(direction, DEMO.hidden)
        out = disk / "out"
        with untouched(model):
            line = one_error_line(run_orthopatch("apply", model, direction, "-o", out, "-q"))
        assert line.startswith(f"orthopatch: error: {out}/") and "no space left on device" in line
        assert temporaries(out) == []
        assert not (out / RECORD_NAME).exists() and not (out / INDEX_NAME).exists()
        usage = shutil.disk_usage(disk)
        published = sum(p.stat().st_size for p in out.iterdir())
        assert usage.used <= published + (256 << 10)  # nothing but whole shards and small files holds space
    finally:
        subprocess.run(["umount", str(disk)], check=False)

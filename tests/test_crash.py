"""Real ``orthopatch apply`` processes killed with SIGKILL at random moments, then run again.

After a kill the folder must never look finished (no record, no index before every shard is
there); the same command again must succeed, leave no temporary file, and give exactly the bytes
of an uninterrupted run. A second apply into a folder that one is writing is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import INDEX_NAME
from orthopatch.io.folders import temporaries
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.io.safetensors_header import read_header
from orthopatch.patch import output
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.synthetic import LlamaShape
from tests.helpers import (
    TINY,
    Converted,
    comparable_files,
    folder_hashes,
    one_error_line,
    orthopatch_command,
    run_orthopatch,
    save_direction,
    tiny_llama,
    untouched,
)

#: About 300 MB in 21 shards: long enough that kills land in every phase of a run.
SHAPE = LlamaShape(hidden=1024, intermediate=2816, vocab=32000, layers=8, heads=8, kv_heads=4)
TRIALS = 8


@dataclass(frozen=True)
class Made:
    model: Path
    direction: Path
    reference: dict[str, str]  # hashes of an uninterrupted run's output
    source: dict[str, str]  # hashes of the source before any run
    work_s: float  # from the partial marker's appearance to the record's
    total_s: float  # from start to the record's appearance


def command(made_or_model, direction: Path, out: Path, *extra: str) -> list[str]:
    return orthopatch_command("apply", made_or_model, direction, "-o", out, "-q", *extra)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> bool:
    """Poll until ``path`` exists (True) or the process has ended (False)."""
    while not path.exists():
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    root = tmp_path_factory.mktemp("crash")
    model = tiny_llama(root / "model", shape=SHAPE, shard_bytes=16 << 20)
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "extra.txt").write_text("a nested model file")
    direction = root / "refusal_dir.pth"
    save_direction(direction, SHAPE.hidden)
    source = folder_hashes(model)
    out = root / "reference"
    began = time.monotonic()
    proc = start(command(model, direction, out))
    assert wait_for(out / PARTIAL_NAME, proc)
    marked = time.monotonic()
    wait_for(out / RECORD_NAME, proc)
    ended = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return Made(model, direction, comparable_files(out), source, ended - marked, ended - began)


def check_interrupted(out: Path, model: Path) -> None:
    """What a killed run may leave: complete published shards, temporaries, and no false completion."""
    if not out.exists():
        return
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    present = []
    for name in shards:
        path = out / name
        if path.exists():  # published only after fsync and rename: always whole
            assert path.stat().st_size == (model / name).stat().st_size, name
            assert read_header(path).raw == read_header(model / name).raw, name
            present.append(name)
    if (out / INDEX_NAME).exists() or (out / RECORD_NAME).exists():
        assert present == shards, "index or record written before every shard"
    if (out / RECORD_NAME).exists():
        assert (out / INDEX_NAME).exists() and (out / "tokenizer" / "extra.txt").exists()


def marker_ino(out: Path) -> int | None:
    try:
        return (out / PARTIAL_NAME).stat().st_ino
    except FileNotFoundError:
        return None


def began_writing(out: Path, old_marker: int | None, proc: subprocess.Popen) -> bool:
    """Wait until this run has written its own partial marker (a new file), or has ended (False)."""
    while marker_ino(out) in (None, old_marker):
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def kill_sometime(proc: subprocess.Popen, out: Path, made: Made, rng: random.Random, how: int,
                  old_marker: int | None) -> None:
    """SIGKILL ``proc``: anywhere in its life (0), while it writes (1), or once some more shards are out (2)."""
    if how == 0:
        time.sleep(rng.uniform(0, made.total_s))
    elif how == 1:
        if began_writing(out, old_marker, proc):
            time.sleep(rng.uniform(0, made.work_s))
    else:
        missing = [out / p.name for p in sorted(made.model.glob("*.safetensors")) if not (out / p.name).exists()]
        wanted = rng.sample(missing, rng.randint(1, len(missing))) if missing else []
        if began_writing(out, old_marker, proc):
            while proc.poll() is None and not all(p.exists() for p in wanted):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had already ended


def run_to_end(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_kill_at_random_moments_then_rerun(made: Made, tmp_path) -> None:
    rng = random.Random(20261128)
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        args = command(made.model, made.direction, out)
        kills = 1 + trial % 2  # every other trial is killed twice before it may finish
        for _ in range(kills):
            old_marker = marker_ino(out)
            proc = start(args)
            try:
                kill_sometime(proc, out, made, rng, trial % 3, old_marker)
            finally:
                proc.kill()
                proc.wait()
            check_interrupted(out, made.model)
        done = run_to_end(args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert temporaries(out) == [] and not (out / PARTIAL_NAME).exists()
        assert comparable_files(out) == made.reference, f"trial {trial}: output differs from an uninterrupted run"
    assert folder_hashes(made.model) == made.source


@pytest.mark.slow
def test_a_second_apply_is_refused_while_one_runs(made: Made, tmp_path) -> None:
    out = tmp_path / "out"
    args = command(made.model, made.direction, out)
    for _ in range(3):  # the first run may, rarely, finish before it can be paused
        first = start(args)
        if wait_for(out / PARTIAL_NAME, first):
            os.kill(first.pid, signal.SIGSTOP)  # paused, it still holds the folder's lock
            if first.poll() is None:
                break
        first.wait()
        subprocess.run(["rm", "-rf", str(out)], check=True)
    else:
        pytest.fail("could not catch a run in progress")
    try:
        before = folder_hashes(out)
        for extra in ((), ("--overwrite",)):
            second = run_to_end(args + list(extra))
            assert one_error_line(second) == (f"orthopatch: error: {out}: another orthopatch run is writing "
                                              "to this folder")
        verifying = run_orthopatch("verify", out, "--direction", made.direction, "-q", timeout=180)
        assert "is writing to this folder" in one_error_line(verifying)
        assert folder_hashes(out) == before  # the refused runs touched nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert comparable_files(out) == made.reference
    assert folder_hashes(made.model) == made.source


# --- states a crash can leave, built by hand ------------------------------------------------------

@pytest.fixture
def small(converted: Converted) -> tuple[Path, Path, dict[str, str]]:
    return converted.model, converted.direction, converted.files


def test_temporaries_alone_do_not_make_a_folder_foreign(small, tmp_path) -> None:
    """Killed while writing its first marker, a run leaves only a temporary file: the rerun goes on."""
    model, direction, reference = small
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{PARTIAL_NAME}.orthopatch-tmp").write_text('{"half": ')
    apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True))
    assert temporaries(out) == []
    assert comparable_files(out) == reference


def test_a_resumed_run_removes_every_temporary(small, converted, tmp_path) -> None:
    """Killed while copying a nested model file: the rerun resumes and cleans subfolders too."""
    model, direction, reference = small
    out = tmp_path / "out"
    shutil.copytree(converted.out, out)
    fingerprint = json.loads((out / RECORD_NAME).read_text())["fingerprint"]
    for name in (RECORD_NAME, INDEX_NAME, "README.md", "tokenizer/vocab.txt"):
        (out / name).unlink()
    (out / PARTIAL_NAME).write_text(json.dumps(fingerprint))
    (out / "tokenizer" / ".vocab.txt.orthopatch-tmp").write_text("half")
    (out / ".model-00003-of-00008.safetensors.orthopatch-tmp").write_bytes(b"half a shard")
    result = apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True))
    assert result.state == "resumed"
    assert temporaries(out) == [] and not (out / PARTIAL_NAME).exists()
    assert comparable_files(out) == reference


def test_shards_without_a_marker_are_not_taken_over(small, converted, tmp_path) -> None:
    """Shards and no marker: not provably ours, so refused (and untouched) unless --overwrite."""
    model, direction, reference = small
    out = tmp_path / "out"
    shutil.copytree(converted.out, out)
    (out / RECORD_NAME).unlink()
    (out / INDEX_NAME).unlink()
    with untouched(out):
        with pytest.raises(OrthopatchError, match="holds no orthopatch output .*--overwrite"):
            apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True))
    apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True, overwrite=True))
    assert comparable_files(out) == reference


def test_an_interrupted_overwrite_never_looks_finished(small, tmp_path, monkeypatch) -> None:
    """--overwrite of another run's finished output, killed half way: the old record goes first."""
    model, direction, reference = small
    out = tmp_path / "out"
    other = tmp_path / "other.pth"
    save_direction(other, TINY.hidden, seed=5)
    apply(ApplyOptions(model=model, direction=other, out=out, quiet=True))
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink
    removed: list[str] = []

    def unlink(self, missing_ok=False):
        if len(removed) == 3:
            raise KeyboardInterrupt  # stands for a kill in the middle of clearing
        removed.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        m.setattr(output.shutil, "rmtree", real_rmtree)
        with pytest.raises(KeyboardInterrupt):
            apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True, overwrite=True))
    assert removed[0] == RECORD_NAME and not (out / RECORD_NAME).exists()
    apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True, overwrite=True))
    assert comparable_files(out) == reference


def test_every_file_is_fsynced_before_the_record(small, tmp_path, monkeypatch) -> None:
    """A power cut after the record must find every file it vouches for on disk, not just named."""
    model, direction, _ = small
    out = tmp_path / "out"
    synced: set[str] = set()
    published: dict[str, bool] = {}  # final name -> its data was fsynced before the rename
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        published[str(Path(dst).resolve())] = str(Path(src).resolve()) in synced
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    apply(ApplyOptions(model=model, direction=direction, out=out, quiet=True))
    files = [str(p.resolve()) for p in out.rglob("*") if p.is_file()]
    assert files and all(published.get(f) for f in files), {f: published.get(f) for f in files}

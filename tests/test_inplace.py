"""``apply --in-place``: the same bytes as an out-of-place run, crash-safe, and refused where it would harm.

Killed with SIGKILL at random moments (while computing a tensor into the journal, while copying it
into place, while finishing) and run again, it must end with exactly the shards, index, config and
card an uninterrupted out-of-place run writes, with no more extra space at any time than the
largest patched tensor and the journal's small files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from orthopatch.apply import ApplyOptions, apply, prepare
from orthopatch.cli import main
from orthopatch.errors import OrthopatchError
from orthopatch.formats import RECORD_NAME
from orthopatch.inplace import JOURNAL_DIR, STATE_NAME, InFlight, Journal, JournalWriter
from orthopatch.record import Fingerprint, Method
from orthopatch.stream import TensorPatcher
from orthopatch.synthetic import LlamaShape, write_checkpoint
from orthopatch.verify import VerifyOptions, verify
from tests.helpers import TINY, folder_hashes, save_direction, tiny_llama, untouched

#: About 70 MB, 17 patched tensors in 6 shards laid out as save_pretrained writes them.
SHAPE = LlamaShape(hidden=512, intermediate=1376, vocab=16000, layers=8, heads=8, kv_heads=4)
TRIALS = 6


def converted_files(folder: Path) -> dict[str, str]:
    """Hashes of every file, with the record reduced to what both kinds of run record alike."""
    hashes = folder_hashes(folder)
    record = json.loads((folder / RECORD_NAME).read_text())
    for key in ("seconds", "source", "in_place"):
        record.pop(key, None)
    hashes[RECORD_NAME] = json.dumps(record, sort_keys=True)
    return hashes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A small model with a card, its direction, and the files of an out-of-place conversion."""
    root = tmp_path_factory.mktemp("inplace")
    model = tiny_llama(root / "model")
    (model / "README.md").write_text("---\nlicense: mit\n---\n# A tiny model\n")
    direction = root / "r.pth"
    save_direction(direction, TINY.hidden)
    apply(ApplyOptions(model=model, direction=direction, out=root / "reference", quiet=True))
    return model, direction, converted_files(root / "reference")


def fresh_copy(model: Path, where: Path) -> Path:
    shutil.copytree(model, where)
    return where


def test_in_place_gives_the_bytes_of_an_out_of_place_run(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    result = apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True))
    assert result.state == "written in place" and result.out == work
    assert result.patched == result.plan.patched_bytes
    assert not (work / JOURNAL_DIR).exists()
    assert converted_files(work) == reference
    record = json.loads((work / RECORD_NAME).read_text())
    assert record["in_place"] is True
    assert verify(VerifyOptions(out=work, direction=direction, quiet=True)).ok


def test_a_rerun_is_a_no_op_and_another_direction_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True))
    other = tmp_path / "other.pth"
    save_direction(other, TINY.hidden, seed=9)
    with untouched(work):
        again = apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True))
        assert again.state == "already complete"
        with pytest.raises(OrthopatchError, match=r"was converted in place with direction .*r\.pth .*scale 1\.0"):
            apply(ApplyOptions(model=work, direction=other, in_place=True, quiet=True))
        with pytest.raises(OrthopatchError, match="was converted in place"):
            apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True, method=Method(scale=0.5)))


def test_the_cli_result_line_and_usage_errors(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    runner = CliRunner()
    for extra in (["-o", str(tmp_path / "out")], ["--overwrite"]):
        result = runner.invoke(main, ["apply", str(work), str(direction), "--in-place", *extra])
        assert result.exit_code == 2 and "--in-place writes into MODEL itself" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(main, ["apply", str(work), str(direction), "--in-place", "-q"])
    assert result.exit_code == 0, result.output
    assert "written in place" in result.output and "rewritten, nothing else read or written" in result.output
    result = runner.invoke(main, ["verify", str(work), "--direction", str(direction), "--source", str(work)])
    assert result.exit_code == 1 and "no source left to compare with" in result.output


def one_line_refusal(model: Path, direction: Path, match: str) -> None:
    result = CliRunner().invoke(main, ["apply", str(model), str(direction), "--in-place", "-q"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and match in result.output, result.output


def test_links_and_read_only_shards_are_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    shard = sorted(model.glob("*.safetensors"))[1]
    linked = fresh_copy(model, tmp_path / "linked")
    (linked / shard.name).unlink()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(shard, blobs / "abc123")
    (linked / shard.name).symlink_to(blobs / "abc123")
    hard = fresh_copy(model, tmp_path / "hard")
    os.link(hard / shard.name, tmp_path / "another-name")
    read_only = fresh_copy(model, tmp_path / "read-only")
    (read_only / shard.name).chmod(0o444)
    with untouched(linked, hard, read_only, blobs):
        one_line_refusal(linked, direction, "is a symbolic link")
        one_line_refusal(hard, direction, "other hard link(s)")
        one_line_refusal(read_only, direction, "is not writable")
    for folder in (linked, hard, read_only):
        assert not (folder / JOURNAL_DIR).exists()


def test_a_second_run_is_refused_while_one_converts(tiny, tmp_path) -> None:
    import fcntl

    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with untouched(work):
            one_line_refusal(work, direction, "another orthopatch run is converting this folder in place")
    finally:
        os.close(fd)


# -- states a crash leaves, built by hand -----------------------------------------------------------------

def test_an_unfinished_conversion_is_resumed_not_used_as_a_source(tiny, tmp_path) -> None:
    """The journal of a run that finished some tensors: verify fails, an out-of-place apply refuses,
    another direction is refused naming the unfinished one, and the same command finishes."""
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    plan, loaded = prepare(ApplyOptions(model=work, direction=direction, in_place=True))
    journal = Journal(work)
    options = ApplyOptions(model=work, direction=direction, in_place=True, quiet=True)
    journal.begin({"fingerprint": fingerprint_of(plan, loaded, options), "options": options.method.to_json(),
                   "direction": {"file": str(direction), "sha256": loaded.sha256}}, work / "README.md")
    report = verify(VerifyOptions(out=work, direction=direction, quiet=True))
    assert not report.ok and any("in-place conversion is unfinished" in str(f) for f in report.failures)
    with pytest.raises(OrthopatchError, match="in-place conversion of this folder is unfinished"):
        apply(ApplyOptions(model=work, direction=direction, out=tmp_path / "out", quiet=True))
    other = tmp_path / "other.pth"
    save_direction(other, TINY.hidden, seed=9)
    with pytest.raises(OrthopatchError, match=r"interrupted in-place conversion with direction .*r\.pth"):
        apply(ApplyOptions(model=work, direction=other, in_place=True, quiet=True))
    result = apply(options)
    assert result.state == "resumed in place"
    assert converted_files(work) == reference


def fingerprint_of(plan, loaded, options: ApplyOptions) -> dict:
    """The fingerprint an in-place run on the CPU computes."""
    block = TensorPatcher("cpu").kernel.block_elements
    return Fingerprint.of(plan, loaded.sha256, options.method, "cpu", block).to_json()


def start_journal(work: Path, direction: Path, done: int) -> tuple[Journal, list, ApplyOptions]:
    """The journal of a run that has finished ``done`` tensors (computed into place by hand)."""
    options = ApplyOptions(model=work, direction=direction, in_place=True, quiet=True)
    plan, loaded = prepare(options)
    journal = Journal(work)
    journal.begin({"fingerprint": fingerprint_of(plan, loaded, options), "options": options.method.to_json(),
                   "direction": {"file": str(direction), "sha256": loaded.sha256}}, work / "README.md")
    return journal, list(plan.targets()), options


def test_a_torn_tensor_in_flight_is_copied_again(tiny, tmp_path) -> None:
    """Killed while copying a tensor into place: half of it is new, half old; the journal holds it all."""
    model, direction, reference = tiny
    out_of_place = tmp_path.parent / "reference"  # not used: bytes come from the reference hashes
    del out_of_place
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 0)
    target = targets[0]
    new_bytes = _new_tensor_bytes(tiny, target)
    writer = JournalWriter(journal.data_path, target.entry)
    writer.write(target.entry.begin, target.entry.begin, memoryview(new_bytes))
    sha = writer.finish()
    writer.close()
    journal.record(0, InFlight(0, target.name, target.shard, target.entry.begin, target.entry.end, sha))
    half = len(new_bytes) // 2 + 7
    with open(work / target.shard, "r+b") as f:
        f.seek(target.entry.begin)
        f.write(new_bytes[:half])
    assert apply(options).state == "resumed in place"
    assert converted_files(work) == reference


def test_a_journal_not_yet_in_flight_is_discarded(tiny, tmp_path) -> None:
    """Killed while computing a tensor into the journal: the shard is untouched, the tensor recomputed."""
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 0)
    journal.data_path.write_bytes(b"\x01" * (targets[0].entry.begin + 100))  # a partial journal
    assert apply(options).state == "resumed in place"
    assert converted_files(work) == reference


def test_a_journal_folder_without_state_is_a_fresh_start(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    (work / JOURNAL_DIR).mkdir()
    (work / JOURNAL_DIR / "README.md").write_text("half a copy")
    assert apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True)).state == "written in place"
    assert converted_files(work) == reference


def test_a_damaged_journal_in_flight_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 0)
    target = targets[0]
    journal.data_path.write_bytes(bytes(target.entry.end))
    journal.record(0, InFlight(0, target.name, target.shard, target.entry.begin, target.entry.end, "0" * 64))
    with pytest.raises(OrthopatchError, match="do not match their sha256"):
        apply(options)


def _new_tensor_bytes(tiny, target) -> bytes:
    """The bytes an out-of-place run writes for ``target`` (from a fresh conversion of the model)."""
    model, direction, _ = tiny
    out = model.parent / "reference"
    with open(out / target.shard, "rb") as f:
        f.seek(target.entry.begin)
        return f.read(target.entry.nbytes)


# -- real processes killed at random moments --------------------------------------------------------------

@dataclass(frozen=True)
class Made:
    model: Path
    direction: Path
    reference: dict[str, str]
    tensors: int  # patched tensors
    largest: int  # bytes of the largest patched tensor
    work_s: float  # from the journal's state to the end of a run


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    root = tmp_path_factory.mktemp("inplace-crash")
    model = write_checkpoint(root / "model", SHAPE, shard_bytes=12_000_000, order="save_pretrained")
    (model / "README.md").write_text("# the source card\n")
    direction = root / "r.pth"
    save_direction(direction, SHAPE.hidden)
    result = apply(ApplyOptions(model=model, direction=direction, out=root / "reference", quiet=True))
    sizes = [t.entry.nbytes for t in result.plan.targets()]
    work = fresh_copy(model, root / "timed" / "model")
    proc = subprocess.Popen(in_place_command(work, direction), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while journal_state(work) is None and proc.poll() is None:
        time.sleep(0.001)
    began = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return Made(model, direction, converted_files(root / "reference"), len(sizes), max(sizes),
                time.monotonic() - began)


def in_place_command(model: Path, direction: Path) -> list[str]:
    return [sys.executable, "-m", "orthopatch", "apply", str(model), str(direction), "--in-place", "-q"]


def journal_bytes(model: Path) -> int:
    """Allocated bytes of the journal folder now (0 when there is none)."""
    total = 0
    for p in (model / JOURNAL_DIR).glob("*"):
        try:
            total += p.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def journal_state(model: Path) -> tuple[int, bool] | None:
    """``(tensors done, one in flight)`` from the journal, or None when there is none (or it is being replaced)."""
    try:
        doc = json.loads((model / JOURNAL_DIR / STATE_NAME).read_text())
        return doc["done"], doc["in_flight"] is not None
    except (OSError, ValueError, KeyError):
        return None


def kill_sometime(proc: subprocess.Popen, work: Path, made: Made, rng: random.Random, how: int) -> int:
    """SIGKILL ``proc``: anywhere while it works (0), while it computes tensor k or later into the journal
    (1), or while it copies tensor k or later into place (2), k chosen at random. Returns the most
    journal space seen meanwhile."""
    most, k, deadline = 0, rng.randrange(made.tensors), None
    while proc.poll() is None:
        most = max(most, journal_bytes(work))
        state = journal_state(work)
        if state is not None:
            done, flying = state
            if how == 0:
                deadline = deadline or time.monotonic() + rng.uniform(0, made.work_s)
                if time.monotonic() >= deadline:
                    break
            elif how == 1 and done >= k and not flying:
                time.sleep(rng.uniform(0, 0.02))
                break
            elif how == 2 and done >= k and flying:
                break
        time.sleep(0.0005)
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return most


@pytest.mark.slow
def test_kill_at_random_moments_then_rerun(made: Made, tmp_path) -> None:
    rng = random.Random(20261129)
    source = folder_hashes(made.model)
    left: list[tuple[int, bool] | None] = []  # the journal state each kill left
    for trial in range(TRIALS):
        work = fresh_copy(made.model, tmp_path / f"trial{trial}" / "model")  # the card names the folder
        args = in_place_command(work, made.direction)
        for _ in range(1 + trial % 2):  # every other trial is killed twice before it may finish
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                most = kill_sometime(proc, work, made, rng, trial % 3)
            finally:
                proc.kill()
                proc.communicate()
            assert most <= made.largest + (1 << 20), f"journal held {most} bytes"
            left.append(journal_state(work))
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert not (work / JOURNAL_DIR).exists()
        assert converted_files(work) == made.reference, f"trial {trial}: differs from an out-of-place run"
    assert folder_hashes(made.model) == source
    # The kills landed where it matters: between tensors, and with a tensor half copied into place.
    assert any(s is not None and s[0] > 0 and not s[1] for s in left), left
    assert any(s is not None and s[1] for s in left), left

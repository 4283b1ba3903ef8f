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
import torch
from click.testing import CliRunner

from orthopatch.cli import main
from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import INPLACE_JOURNAL_DIR as JOURNAL_DIR
from orthopatch.io.formats import INPLACE_STATE_NAME as STATE_NAME
from orthopatch.io.formats import RECORD_NAME
from orthopatch.patch.apply import ApplyOptions, apply, prepare
from orthopatch.patch.journal import InFlight, Journal, JournalWriter
from orthopatch.patch.record import Fingerprint, Method
from orthopatch.patch.stream import TensorPatcher
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


def one_line_refusal(model: Path, direction: Path, match: str, *extra: str) -> str:
    """Run ``apply MODEL DIRECTION --in-place`` (or with ``extra`` in its place); it must end in one line
    holding ``match``, exit status 1, and no exception escaping the CLI."""
    args = [*extra] if extra else ["--in-place"]
    result = CliRunner().invoke(main, ["apply", str(model), str(direction), *args, "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and match in result.output, result.output
    return result.output


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
            one_line_refusal(work, direction, "another orthopatch run is using this folder")
    finally:
        os.close(fd)


def test_a_folder_being_read_as_a_source_is_not_converted_in_place_and_back(tiny, tmp_path) -> None:
    """An out-of-place run holds a shared lock on its source; an in-place run holds an exclusive one:
    each refuses while the other runs."""
    import fcntl

    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    for held, refused, match in ((fcntl.LOCK_SH, ["--in-place"], "another orthopatch run is using this folder"),
                                 (fcntl.LOCK_EX, ["-o", str(tmp_path / "out")], "converting this folder in place")):
        fd = os.open(work, os.O_RDONLY)
        try:
            fcntl.flock(fd, held)
            with untouched(work):
                one_line_refusal(work, direction, match, *refused)
        finally:
            os.close(fd)
    assert not (tmp_path / "out").exists()


def test_the_out_of_place_run_holds_a_shared_lock_on_its_source(tiny, tmp_path, monkeypatch) -> None:
    import fcntl

    from orthopatch.patch import apply as apply_module

    model, direction, _ = tiny
    seen = []

    def probe(*args, **kwargs):
        fd = os.open(model, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # other readers are welcome
            seen.append(True)
        finally:
            os.close(fd)
        return real(*args, **kwargs)

    real = apply_module.run  # the driver, called while the source is locked
    monkeypatch.setattr(apply_module, "run", probe)
    apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "out", quiet=True))
    assert seen == [True]


def test_a_half_written_output_is_not_a_source(tiny, tmp_path) -> None:
    """A crashed out-of-place output (its partial marker still there) given as MODEL would be patched twice."""
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    (work / ".orthopatch-partial.json").write_text("{}")
    with untouched(work):
        one_line_refusal(work, direction, "the marker of an interrupted orthopatch run")
        one_line_refusal(work, direction, "the marker of an interrupted orthopatch run", "-o", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not (work / JOURNAL_DIR).exists()


# -- a tensor the projection refuses, late in the plan -----------------------------------------------------

def rewrite_tensor(model: Path, target, change) -> None:
    """Replace ``target``'s bytes in its shard by ``change(tensor)`` (a bf16 tensor of its shape)."""
    with open(model / target.shard, "r+b") as f:
        f.seek(target.entry.begin)
        data = bytearray(f.read(target.entry.nbytes))
        tensor = torch.frombuffer(data, dtype=torch.bfloat16).view(target.entry.shape).clone()
        f.seek(target.entry.begin)
        f.write(change(tensor).contiguous().view(torch.uint8).numpy().tobytes())


def test_a_nan_in_the_last_tensor_is_refused_before_any_byte_changes(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    plan, _ = prepare(ApplyOptions(model=work, direction=direction, in_place=True))
    last = list(plan.targets())[-1]

    def one_nan(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[t.numel() // 2] = float("nan")
        return t

    rewrite_tensor(work, last, one_nan)
    with untouched(work):
        line = one_line_refusal(work, direction, "holds 1 non-finite values")
    assert repr(last.name) in line or last.name in line
    assert not (work / JOURNAL_DIR).exists()


def test_coefficients_that_overflow_are_refused_before_any_byte_changes(tiny, tmp_path) -> None:
    """Finite values whose uᵀW overflows float32: found by the read-only pass too, not halfway through."""
    from orthopatch.patch.conversion import target_directions

    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    plan, loaded = prepare(ApplyOptions(model=work, direction=direction, in_place=True))
    two_pass = [t for t in plan.targets() if t.axis == 0 and len(t.entry.shape) == 2]
    last = two_pass[-1]
    u = target_directions(plan, loaded)[last.name]

    def huge_column(t: torch.Tensor) -> torch.Tensor:
        t[:, 3] = (3e38 * torch.sign(u)).to(torch.bfloat16)
        return t

    rewrite_tensor(work, last, huge_column)
    with untouched(work):
        one_line_refusal(work, direction, "the projection overflows")
    assert not (work / JOURNAL_DIR).exists()


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


def start_journal(work: Path, direction: Path, done: int, tiny=None) -> tuple[Journal, list, ApplyOptions]:
    """The journal of a run that has finished ``done`` tensors: each copied into place from an
    out-of-place conversion (``tiny``'s reference output), as a run that got that far left them."""
    options = ApplyOptions(model=work, direction=direction, in_place=True, quiet=True)
    plan, loaded = prepare(options)
    journal = Journal(work)
    journal.begin({"fingerprint": fingerprint_of(plan, loaded, options), "options": options.method.to_json(),
                   "direction": {"file": str(direction), "sha256": loaded.sha256}}, work / "README.md")
    targets = list(plan.targets())
    assert done == 0 or tiny is not None, "finished tensors need the reference output"
    for target in targets[:done]:
        with open(work / target.shard, "r+b") as f:
            f.seek(target.entry.begin)
            f.write(_new_tensor_bytes(tiny, target))
        journal.save_progress(targets.index(target) + 1, None)
    return journal, targets, options


def fly(tiny, journal: Journal, target, index: int) -> bytes:
    """Put ``target``'s new bytes in the journal and record it in flight as number ``index``."""
    new_bytes = _new_tensor_bytes(tiny, target)
    writer = JournalWriter(journal.data_path, target.entry)
    writer.write(target.entry.begin, target.entry.begin, memoryview(new_bytes))
    sha = writer.finish()
    writer.close()
    journal.save_progress(index, InFlight(index, target.name, target.shard, target.entry.begin, target.entry.end, sha))
    return new_bytes


def test_a_resume_after_some_tensors_continues_from_the_next(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 3, tiny)
    before = folder_hashes(work)
    assert any(before[t.shard] != folder_hashes(model)[t.shard] for t in targets[:3])  # really patched
    result = apply(options)
    assert result.state == "resumed in place"
    assert result.patched == sum(t.entry.nbytes for t in targets[3:])
    assert converted_files(work) == reference


def test_a_later_tensor_in_flight_is_copied_again(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 4, tiny)
    new_bytes = fly(tiny, journal, targets[4], 4)
    with open(work / targets[4].shard, "r+b") as f:  # torn: its first third copied into place
        f.seek(targets[4].entry.begin)
        f.write(new_bytes[:len(new_bytes) // 3])
    assert apply(options).state == "resumed in place"
    assert converted_files(work) == reference


def test_a_tensor_in_flight_that_is_not_in_the_plan_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, options = start_journal(work, direction, 2, tiny)
    fly(tiny, journal, targets[2], 2)
    other = targets[5]  # the journal claims another tensor's place as number 2
    journal.save_progress(2, InFlight(2, other.name, other.shard, other.entry.begin, other.entry.end, "0" * 64))
    with untouched(work):
        one_line_refusal(work, direction, "tensor in flight is not in the plan")


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
    journal.save_progress(0, InFlight(0, target.name, target.shard, target.entry.begin, target.entry.end, sha))
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
    journal.save_progress(0, InFlight(0, target.name, target.shard, target.entry.begin, target.entry.end, "0" * 64))
    with pytest.raises(OrthopatchError, match="do not match their sha256"):
        apply(options)


# -- what makes a rerun the same conversion ----------------------------------------------------------------

def test_a_finished_folder_is_complete_whatever_version_or_device_converted_it(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True))
    record = json.loads((work / RECORD_NAME).read_text())
    record["orthopatch_version"] = record["fingerprint"]["orthopatch"] = "0.0.1"
    record["fingerprint"]["device"], record["fingerprint"]["block_elements"] = "cuda", 1 << 22
    (work / RECORD_NAME).write_text(json.dumps(record))
    with untouched(work):
        assert apply(ApplyOptions(model=work, direction=direction, in_place=True, quiet=True)).state == \
            "already complete"


def edit_state(work: Path, change) -> None:
    path = work / JOURNAL_DIR / STATE_NAME
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_an_interrupted_run_of_another_version_is_finished(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    _, _, options = start_journal(work, direction, 2, tiny)
    edit_state(work, lambda doc: doc["fingerprint"].update(orthopatch="0.0.1"))
    assert apply(options).state == "resumed in place"
    assert converted_files(work) == reference


def test_an_interrupted_run_is_finished_only_on_the_device_it_started_on(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    start_journal(work, direction, 2, tiny)
    edit_state(work, lambda doc: doc["fingerprint"].update(device="cuda", block_elements=1 << 22))
    with untouched(work):
        one_line_refusal(work, direction, "started on cuda: rerun with --device cuda to finish it")


# -- the journal's own files, checked ---------------------------------------------------------------------

def test_a_file_or_link_where_the_journal_goes_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    as_file = fresh_copy(model, tmp_path / "file")
    (as_file / JOURNAL_DIR).write_text("a user's notes")
    as_link = fresh_copy(model, tmp_path / "link")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / STATE_NAME).write_text("{}")
    (as_link / JOURNAL_DIR).symlink_to(elsewhere)
    as_folder = fresh_copy(model, tmp_path / "folder")
    (as_folder / JOURNAL_DIR).mkdir()
    (as_folder / JOURNAL_DIR / "notes.txt").write_text("a user's notes")
    with untouched(as_file, as_link, as_folder, elsewhere):
        one_line_refusal(as_file, direction, "is a file where the in-place journal's folder goes")
        one_line_refusal(as_link, direction, "is a symbolic link where the in-place journal's folder goes")
        one_line_refusal(as_folder, direction, "holds notes.txt, which orthopatch did not write")
    assert (as_link / JOURNAL_DIR).is_symlink()


def test_a_finished_run_leaves_a_users_files_in_the_journal_folder_alone(tiny, tmp_path) -> None:
    """Files that appear in the journal folder during a run are not deleted with it."""
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, _, options = start_journal(work, direction, 0)
    (journal.root / "notes.txt").write_text("a user's notes")
    with pytest.raises(OrthopatchError, match="did not write"):
        journal.discard()
    assert (journal.root / "notes.txt").read_text() == "a user's notes" and journal.exists()


@pytest.mark.parametrize("change, match", [
    (lambda doc: doc.update(done=99), "records 99 tensors done, of 7"),
    (lambda doc: doc.update(done=-1), "records -1 tensors done"),
    (lambda doc: doc.update(done=True), "records True tensors done"),
    (lambda doc: doc.update(done=1 << 70), "tensors done"),
    (lambda doc: doc.update(in_flight={"index": 0, "tensor": "x", "shard": "s", "begin": 0, "end": 8,
                                       "sha256": "0" * 64}), "in flight is number 0, not the next one (2)"),
    (lambda doc: doc.update(in_flight={"index": 2, "tensor": "x", "shard": "s", "begin": 9, "end": 8,
                                       "sha256": "0" * 64}), "unreadable in-flight entry"),
    (lambda doc: doc.update(in_flight={"index": 2, "tensor": "x", "shard": "s", "begin": 0, "end": 1 << 64,
                                       "sha256": "0" * 64}), "unreadable in-flight entry"),
    (lambda doc: doc.update(in_flight=[2]), "unreadable in-flight entry"),
    (lambda doc: doc.pop("fingerprint"), "not one this version wrote"),
])
def test_a_damaged_journal_state_is_refused_in_one_line(tiny, tmp_path, change, match) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    start_journal(work, direction, 2, tiny)
    edit_state(work, change)
    with untouched(work):
        one_line_refusal(work, direction, match)


def test_a_journal_state_that_is_not_a_small_regular_file_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    start_journal(work, direction, 0)
    state = work / JOURNAL_DIR / STATE_NAME
    state.unlink()
    os.mkfifo(state)
    with untouched(work):
        one_line_refusal(work, direction, "is a FIFO")
    state.unlink()
    state.write_text("[" * 100_000)
    with untouched(work):
        one_line_refusal(work, direction, "nests 100000 levels deep")


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

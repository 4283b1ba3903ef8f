"""``apply MODEL.gguf DIRECTION --in-place``: the tensors an out-of-place run writes, the record in the file's
own metadata, crash-safe, and refused (with the file untouched) where it would harm or cannot grow the header.

Checked with gguf-py's reader and llama.cpp, never with the code that wrote the file."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from orthopatch.gguf import grow, inplace
from orthopatch.gguf.grow import can_insert_ranges
from orthopatch.patch import inplace as patch_inplace
from tests.gguf_models import Q, can_encode, write_gguf
from tests.helpers import cli, cli_ok, one_error_line
from tests.test_gguf_apply import WRITERS, direction

JOURNAL = ".orthopatch-inplace-{}"


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).view(np.uint8).tobytes() for t in gguf.GGUFReader(path).tensors}


def fields(path: Path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(path)
    return {k: b"".join(f.parts[i].tobytes() for i in f.data) for k, f in reader.fields.items()
            if not k.startswith("GGUF.")}


def record_of(path: Path) -> dict:
    return json.loads(fields(path)["orthopatch.record"].decode())


def no_journal(path: Path) -> bool:
    return not os.path.lexists(path.parent / JOURNAL.format(path.name))


def reference(src: Path, r: Path, out: Path) -> Path:
    cli_ok("apply", src, r, "-o", out, "-q")
    return out


@pytest.fixture(scope="module")
def inserts() -> None:
    with tempfile.TemporaryDirectory() as d:
        if not can_insert_ranges(Path(d), 4096):
            pytest.skip("the temporary folder's filesystem cannot insert ranges (ext4 and XFS can)")


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
def test_in_place_gives_the_tensors_of_an_out_of_place_run(qtype: Q, tmp_path: Path, inserts) -> None:
    if not can_encode(qtype):
        pytest.skip(f"{qtype.name} files are written with llama.cpp's quantizer: llama-cpp-python is not installed")
    src = write_gguf(tmp_path / "m.gguf", qtype)
    r, _ = direction(tmp_path / "r.pth")
    ref = reference(src, r, tmp_path / "ref.gguf")
    work = tmp_path / "w" / "m.gguf"
    work.parent.mkdir()
    shutil.copy(src, work)
    result = cli_ok("apply", work, r, "--in-place", "-q")
    assert "written in place" in result.output
    assert no_journal(work) and sorted(p.name for p in work.parent.iterdir()) == ["m.gguf"]
    assert tensor_bytes(work) == tensor_bytes(ref)
    before, after = fields(src), fields(work)
    assert set(after) == set(before) | {"orthopatch.record", "orthopatch.padding"}
    assert {k: v for k, v in after.items() if k in before} == before
    record = record_of(work)
    assert record["in_place"] is True and {t["name"] for t in record["tensors_patched"]} == set(WRITERS)
    assert (work.stat().st_size - src.stat().st_size) % 4096 == 0


def test_llama_cpp_runs_the_file_converted_in_place(tmp_path: Path, inserts) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    work = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r, _ = direction(tmp_path / "r.pth")
    cli_ok("apply", work, r, "--in-place", "-q")
    llm = llama_cpp.Llama(model_path=str(work), logits_all=True, n_ctx=32, n_threads=1, verbose=False)
    llm.eval([1, 17, 42, 99])
    assert np.isfinite(np.array(llm.scores[:4])).all()


def test_a_rerun_is_complete_and_another_direction_is_refused(tmp_path: Path, inserts) -> None:
    work = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r, _ = direction(tmp_path / "r.pth")
    r2, _ = direction(tmp_path / "r2.pth", seed=2)
    cli_ok("apply", work, r, "--in-place", "-q")
    converted = work.read_bytes()
    assert "already complete" in cli_ok("apply", work, r, "--in-place", "-q").output
    line = one_error_line(cli("apply", work, r2, "--in-place", "-q"))
    assert "was converted in place with direction" in line and "r.pth" in line
    line = one_error_line(cli("apply", work, r, "--in-place", "-q", "--scale", "0.5"))
    assert "was converted in place" in line
    assert work.read_bytes() == converted and no_journal(work)


def refused_untouched(work: Path, r: Path, match: str) -> None:
    before = work.read_bytes()
    line = one_error_line(cli("apply", work, r, "--in-place", "-q"))
    assert match in line, line
    assert work.read_bytes() == before and no_journal(work)


def test_links_read_only_files_and_unpatchable_types_are_refused(tmp_path: Path, inserts) -> None:
    r, _ = direction(tmp_path / "r.pth")
    for name in ("linked", "hard", "ro", "odd"):
        (tmp_path / name).mkdir()
    blob = write_gguf(tmp_path / "blob.gguf", Q.F16)
    (tmp_path / "linked" / "m.gguf").symlink_to(blob)
    refused_untouched(tmp_path / "linked" / "m.gguf", r, "is a symbolic link")
    hard = shutil.copy(blob, tmp_path / "hard" / "m.gguf")
    os.link(hard, tmp_path / "hard" / "other.gguf")
    refused_untouched(Path(hard), r, "other hard link(s)")
    ro = Path(shutil.copy(blob, tmp_path / "ro" / "m.gguf"))
    ro.chmod(0o444)
    refused_untouched(ro, r, "is not writable")  # by its mode bits, even for root
    odd = write_gguf(tmp_path / "odd" / "m.gguf", Q.F16, odd={"blk.1.ffn_down.weight": Q.IQ4_NL})
    refused_untouched(odd, r, "IQ4_NL")


def test_a_nan_in_the_last_tensor_is_refused_before_any_byte_changes(tmp_path: Path, inserts) -> None:
    work = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    last = max((t for t in gguf.GGUFReader(work).tensors if t.name in WRITERS), key=lambda t: int(t.data_offset))
    with open(work, "r+b") as f:  # the first block's f16 scale: NaN
        f.seek(int(last.data_offset))
        f.write(np.float16(np.nan).tobytes())
    r, _ = direction(tmp_path / "r.pth")
    refused_untouched(work, r, "non-finite")


def test_a_filesystem_that_cannot_insert_ranges_is_refused_in_one_line(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) to try a filesystem without range insertion on")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        folder = Path(d)
        if can_insert_ranges(folder, 4096):
            pytest.skip("/dev/shm inserts ranges here")
        work = write_gguf(folder / "m.gguf", Q.F16)
        r, _ = direction(folder / "r.pth")
        refused_untouched(work, r, "cannot insert ranges")
        assert sorted(p.name for p in folder.iterdir()) == ["m.gguf", "r.pth"]


def test_split_parts_are_converted_in_place(tmp_path: Path, inserts) -> None:
    write_gguf(tmp_path / "m.gguf", Q.Q8_0, split_max_tensors=7)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    r, _ = direction(tmp_path / "r.pth")
    ref = tmp_path / "ref"
    ref.mkdir()
    cli_ok("apply", parts[0], r, "-o", ref / "o-00001-of-00001.gguf", "-q")
    cli_ok("apply", parts[0], r, "--in-place", "-q")
    outs = sorted(ref.glob("*.gguf"))
    assert len(outs) == len(parts) >= 2
    for part, out in zip(parts, outs, strict=True):
        assert tensor_bytes(part) == tensor_bytes(out)
        assert record_of(part)["in_place"] is True
    assert "already complete" in cli_ok("apply", parts[0], r, "--in-place", "-q").output


class Stop(Exception):
    """Stands for a kill at a chosen moment."""


@pytest.mark.parametrize("inserted", [False, True], ids=["before-insert", "after-insert"])
def test_an_interrupted_header_step_is_finished_by_the_rerun(inserted: bool, tmp_path: Path, monkeypatch,
                                                            inserts) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.F16)
    r, _ = direction(tmp_path / "r.pth")
    ref = reference(src, r, tmp_path / "ref.gguf")
    work = tmp_path / "w" / "m.gguf"
    work.parent.mkdir()
    shutil.copy(src, work)
    real = grow.insert_range

    def stop(fd: int, offset: int, length: int) -> None:
        if inserted:
            real(fd, offset, length)
        raise Stop

    monkeypatch.setattr(inplace, "insert_range", stop)
    with pytest.raises(Stop):
        cli("apply", work, r, "--in-place", "-q")
    monkeypatch.undo()
    assert not no_journal(work)
    assert work.read_bytes()[:4] == (b"\0\0\0\0" if inserted else b"GGUF")
    # an out-of-place run refuses the half-converted file; another direction does not finish it
    assert "half converted in place" in one_error_line(cli("apply", work, r, "-o", tmp_path / "o.gguf"))
    r2, _ = direction(tmp_path / "r2.pth", seed=2)
    assert "is unfinished" in one_error_line(cli("apply", work, r2, "--in-place", "-q"))
    assert "resumed in place" in cli_ok("apply", work, r, "--in-place", "-q").output
    assert no_journal(work) and tensor_bytes(work) == tensor_bytes(ref)
    assert record_of(work)["in_place"] is True


def test_a_tensor_torn_in_flight_is_copied_again(tmp_path: Path, monkeypatch, inserts) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r, _ = direction(tmp_path / "r.pth")
    ref = reference(src, r, tmp_path / "ref.gguf")
    work = tmp_path / "w" / "m.gguf"
    work.parent.mkdir()
    shutil.copy(src, work)

    def torn(journal, path, flight, stats, progress) -> None:  # noqa: ANN001 - copy_into_place's arguments
        if flight.index == 2:  # half the new bytes in place, then killed
            half = (flight.end - flight.begin) // 2
            with open(journal.data_path, "rb") as j, open(path, "r+b") as f:
                j.seek(flight.begin)
                f.seek(flight.begin)
                f.write(j.read(half))
            raise Stop
        real(journal, path, flight, stats, progress)

    real = patch_inplace.copy_into_place  # the tensor steps every in-place session shares
    monkeypatch.setattr(patch_inplace, "copy_into_place", torn)
    with pytest.raises(Stop):
        cli("apply", work, r, "--in-place", "-q")
    monkeypatch.undo()
    assert journal_state(work) == (2, True)
    assert "resumed in place" in cli_ok("apply", work, r, "--in-place", "-q").output
    assert no_journal(work) and tensor_bytes(work) == tensor_bytes(ref)


# -- real processes killed at random moments --------------------------------------------------------------

def journal_state(work: Path) -> tuple[int, bool] | None:
    try:
        doc = json.loads((work.parent / JOURNAL.format(work.name) / "state.json").read_text())
        return doc["done"], doc["in_flight"] is not None
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_kill_at_random_moments_then_rerun(tmp_path: Path, inserts) -> None:
    """Killed anywhere (0), with tensor k or the header in flight (1), or between steps (2), then run again:
    the tensors of an uninterrupted out-of-place run, and never a record on a file that is not finished."""
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0, vocab=24000, layers=4)
    r, _ = direction(tmp_path / "r.pth")
    expected = tensor_bytes(reference(src, r, tmp_path / "ref.gguf"))
    tensors = 1 + 2 * 4
    rng = random.Random(20261206)
    left = []
    for trial in range(4):
        work = tmp_path / f"t{trial}" / "m.gguf"
        work.parent.mkdir()
        shutil.copy(src, work)
        args = [sys.executable, "-m", "orthopatch", "apply", str(work), str(r), "--in-place", "-q"]
        for kill in range(1 + trial % 2):
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            how = trial % 3
            k = tensors if how == 1 and kill == 0 else rng.randrange(tensors + 1)  # the header step, or tensor k
            deadline = None
            try:
                while proc.poll() is None:
                    state = journal_state(work)
                    if state is not None:
                        done, flying = state
                        deadline = deadline or time.monotonic() + rng.uniform(0, 0.8)
                        if how == 0 and time.monotonic() >= deadline or how == 1 and done >= k and flying or \
                                how == 2 and done >= k and not flying:
                            break
                    time.sleep(0.0002)
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                proc.kill()
                proc.communicate()
            left.append(journal_state(work))
            if work.read_bytes()[:4] == b"GGUF" and "orthopatch.record" in fields(work):
                assert tensor_bytes(work) == expected, "a record on a file whose tensors are not all patched"
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert no_journal(work)
        assert tensor_bytes(work) == expected, f"trial {trial}: differs from an out-of-place run"
        assert record_of(work)["in_place"] is True
    # the kills landed between tensors and with the header in flight (a tensor in flight: the test above)
    assert any(s is not None and 0 < s[0] < tensors and not s[1] for s in left), left
    assert any(s is not None and s[1] and s[0] == tensors for s in left), left

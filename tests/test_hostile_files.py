"""Hostile and broken files around a checkpoint: special files, pathological structure, inflating
tensors, non-finite weights, odd names and a read-only output. Each ends as one line, exit 1, with
nothing lost: the source unchanged and no output that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.io.smallfile import MAX_JSON_DEPTH, read_small_json
from orthopatch.patch import direction as direction_module
from orthopatch.patch.direction import load_direction
from tests.helpers import TINY, cli, one_error_line, save_direction, tiny_llama, untouched

HIDDEN = TINY.hidden
SHARD = "model-00002-of-00008.safetensors"  # holds layer 0's first tensors
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("hostile-files") / "model")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A private copy of the tiny model, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def direction(tmp_path) -> Path:
    path = tmp_path / "r.pth"
    save_direction(path, HIDDEN)
    return path


@pytest.fixture(autouse=True)
def never_hangs() -> Iterator[None]:
    """A read that waits on a FIFO would hang the suite: fail the test instead, after 60 s."""
    def hung(*_: object) -> None:
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)




def no_complete_output(out: Path) -> None:
    assert not (out / RECORD_NAME).exists()


def refused(model: Path, direction: Path, out: Path, *words: str) -> str:
    """apply must refuse in one line holding ``words``, leave the source as it was and no finished output."""
    with untouched(model):
        line = one_error_line(cli("apply", model, direction, "-o", out, "-q"))
    assert all(word in line for word in words), line
    no_complete_output(out)
    return line


# --- special files where a regular file is expected ----------------------------------------------

def make_special(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


@pytest.mark.parametrize("kind, words", [("fifo", "FIFO"), ("dev-zero", "character device"), ("dir", "folder")])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", SHARD])
def test_special_files_in_the_model_folder_are_refused(model, direction, tmp_path, name, kind, words) -> None:
    make_special(model / name, kind)
    line = refused(model, direction, tmp_path / "out", words)
    assert str(model / name) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, words", [("fifo", "FIFO"), ("dev-zero", "character device"), ("dir", "folder")])
def test_a_special_source_card_is_refused_before_anything_is_written(model, direction, tmp_path, kind,
                                                                     words) -> None:
    make_special(model / "README.md", kind)
    refused(model, direction, tmp_path / "out", "model card", str(model / "README.md"), words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_files_among_the_model_files_are_skipped_with_a_note(model, direction, tmp_path, kind) -> None:
    make_special(model / "tokenizer.model", kind)
    out = tmp_path / "out"
    with untouched(model):
        result = cli("apply", model, direction, "-o", out)
    assert result.exit_code == 0, result.output
    assert "note: not copied: tokenizer.model is " in result.stderr
    assert (out / RECORD_NAME).exists() and not (out / "tokenizer.model").exists()
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()


def test_a_fifo_as_the_direction_is_refused(model, tmp_path) -> None:
    fifo = tmp_path / "r.pth"
    os.mkfifo(fifo)
    refused(model, fifo, tmp_path / "out", str(fifo), "FIFO")


def test_a_fifo_in_the_output_folder_is_not_read(model, direction, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / PARTIAL_NAME)
    line = refused(model, direction, out, str(out), "--overwrite")
    assert "another direction" in line or "not empty" in line


def test_small_files_are_bounded(tmp_path) -> None:
    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: nothing is written
    with pytest.raises(OrthopatchError, match=r"67,108,865 bytes, more than the 67,108,864"):
        read_small_json(big)


# --- pathological structure -----------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_100000_deep_is_one_line(model, direction, tmp_path, name) -> None:
    (model / name).write_text(DEEP)
    refused(model, direction, tmp_path / "out", str(model / name), "100000 levels deep", str(MAX_JSON_DEPTH))


def test_json_depth_ignores_brackets_in_strings(tmp_path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"s": "[" * 1000 + '\\"{', "t": [[1]]}))
    assert read_small_json(path)["t"] == [[1]]
    path.write_text('"\\"\\"' + "\\" * 10_000)  # an unterminated string: a parse error, not a hang
    with pytest.raises(OrthopatchError, match="cannot read JSON"):
        read_small_json(path)


@pytest.mark.parametrize("front", [
    "tags: 5\nlicense: apache-2.0",
    "tags: [1, {a: b}, ok]\nlicense: {nested: 1}\nlanguage: 7",
    "license: mit\nx: " + "[" * 100_000 + "]" * 100_000,
    "".join(" " * i + "a:\n" for i in range(2_000)),
    "tags:\n" + "".join(" " * (2 * i) + "- - x\n" for i in range(500)),
], ids=["tags-int", "wrong-types", "deep-flow", "deep-block", "deep-sequence"])
def test_odd_card_front_matter_is_tolerated(model, direction, tmp_path, front) -> None:
    (model / "README.md").write_text(f"---\n{front}\n---\n\n# Source body\n")
    out = tmp_path / "out"
    with untouched(model):
        result = cli("apply", model, direction, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "# Source body" in card and "- abliterated" in card
    if front.startswith("tags: 5"):
        assert "license: apache-2.0" in card


@pytest.mark.parametrize("key, value, words", [
    ("num_hidden_layers", 10**9, "layer count 1,000,000,000 is impossible"),
    ("num_hidden_layers", -3, "layer count -3 is impossible"),
    ("hidden_size", 10**12, "hidden size 1,000,000,000,000 is not the size of any tensor axis"),
    ("hidden_size", 0, "hidden size 0"),
])
def test_absurd_sizes_in_config_are_one_line(model, direction, tmp_path, key, value, words) -> None:
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    refused(model, direction, tmp_path / "out", str(model / "config.json"), words)
    line = one_error_line(cli("apply", model, direction, "--dry-run"))
    assert words in line


# --- direction files that inflate -----------------------------------------------------------------

def deflated(path: Path, value: torch.Tensor) -> Path:
    """A ``torch.save`` zip rewritten with every entry compressed (torch still reads it)."""
    plain = path.with_suffix(".plain")
    torch.save(value, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    return path


def test_a_zip_that_inflates_past_the_limit_is_not_loaded(tmp_path, monkeypatch) -> None:
    path = deflated(tmp_path / "r.pth", torch.zeros(1 << 20))  # 4 MiB of zeros, a few kB on disk
    assert path.stat().st_size < 64 << 10
    assert load_direction(deflated(tmp_path / "ok.pth", torch.ones(HIDDEN)), HIDDEN).rows.shape == (1, HIDDEN)
    monkeypatch.setattr(direction_module, "MAX_DIRECTION_BYTES", 1 << 20)
    with pytest.raises(OrthopatchError, match="unpacks to 4,19"):
        load_direction(path, HIDDEN)


def test_expanded_tensors_are_refused_before_conversion(model, tmp_path) -> None:
    huge = torch.zeros(1).expand(2**33)  # 2³³ elements in one stored element
    torch.save(huge, tmp_path / "expanded.pth")
    torch.save({"note": torch.ones(3), "refusal_dir": torch.zeros(1).expand(HIDDEN)}, tmp_path / "small.pth")
    torch.save({"a": torch.ones(HIDDEN), "b": torch.zeros(1).expand(2**33)}, tmp_path / "second.pth")
    assert (tmp_path / "expanded.pth").stat().st_size < 4096
    for name, words in (("expanded.pth", "8,589,934,592 elements"), ("small.pth", "stride 0"),
                        ("second.pth", "[8589934592]")):
        line = refused(model, tmp_path / name, tmp_path / "out", str(tmp_path / name), words)
        assert not (tmp_path / "out").exists(), line


def test_an_npy_header_claiming_more_than_the_file_is_refused(tmp_path) -> None:
    path = tmp_path / "r.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**33,)})
        f.write(b"\0" * 4 * HIDDEN)
    with pytest.raises(OrthopatchError, match="more than the file holds"):
        load_direction(path, HIDDEN)


# --- zero-size tensors ----------------------------------------------------------------------------

def zero_size_model(folder: Path) -> Path:
    """Valid safetensors holding an empty embedding ``[0, d]`` and an empty ``down_proj`` ``[d, 0]``."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(3)
    bf = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": bf(0, HIDDEN), "model.norm.weight": bf(HIDDEN),
               "lm_head.weight": bf(0, HIDDEN)}
    for n in range(2):
        p = f"model.layers.{n}"
        tensors |= {f"{p}.self_attn.o_proj.weight": bf(HIDDEN, HIDDEN),
                    f"{p}.mlp.up_proj.weight": bf(0, HIDDEN), f"{p}.mlp.down_proj.weight": bf(HIDDEN, 0)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": 2, "vocab_size": 0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_zero_size_tensors_are_patched_as_no_ops(tmp_path, direction) -> None:
    model = zero_size_model(tmp_path / "model")
    out = tmp_path / "out"
    with untouched(model):
        result = cli("apply", model, direction, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        assert not (out / PARTIAL_NAME).exists() and (out / RECORD_NAME).exists()
        verified = cli("verify", out, "--direction", direction, "--source", model, "-q")
    assert verified.exit_code == 0, verified.output
    src, made = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    assert made["model.embed_tokens.weight"].shape == (0, HIDDEN)
    assert made["model.layers.0.mlp.down_proj.weight"].shape == (HIDDEN, 0)
    up, o_proj = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(made[up], src[up]) and not torch.equal(made[o_proj], src[o_proj])


# --- non-finite weights ---------------------------------------------------------------------------

def poison(model: Path, name: str, values: dict[int, float]) -> Path:
    """Set elements of tensor ``name`` (in whichever shard holds it) to the given values."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    flat = tensors[name].view(-1)
    for i, v in values.items():
        flat[i] = v
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("name, values, count", [
    (O_PROJ, {5: float("nan")}, "1 non-finite"),
    (O_PROJ, {0: float("inf"), 7: float("-inf"), 9: float("nan")}, "3 non-finite"),
    ("model.embed_tokens.weight", {HIDDEN * 3 + 1: float("nan")}, "1 non-finite"),
], ids=["nan-o_proj", "inf-o_proj", "nan-embedding"])
def test_non_finite_weights_are_refused(model, direction, tmp_path, name, values, count) -> None:
    shard = poison(model, name, values)
    out = tmp_path / "out"
    line = refused(model, direction, out, str(shard), repr(name), count)
    assert "NaN or Inf" in line
    assert not (out / shard.name).exists()  # the shard being written is discarded


def test_non_finite_weights_elsewhere_are_copied(model, direction, tmp_path) -> None:
    """Only tensors to be patched are refused: a NaN in an input-side matrix is the source's own."""
    poison(model, "model.layers.0.self_attn.q_proj.weight", {3: float("nan")})
    with untouched(model):
        assert cli("apply", model, direction, "-o", tmp_path / "out", "-q").exit_code == 0


# --- odd names ------------------------------------------------------------------------------------

def test_names_with_a_newline_stay_on_one_line(model, tmp_path) -> None:
    weird = tmp_path / "refusal\ndir.pth"
    weird.write_bytes(b"not a pickle")
    refused(model, weird, tmp_path / "out", repr(str(weird)))
    # A shard whose name holds a newline, and whose header is broken: the path is quoted.
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: ("bad\nshard.safetensors" if v == SHARD else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    bad = model / "bad\nshard.safetensors"
    (model / SHARD).rename(bad)
    bad.write_bytes(bad.read_bytes()[:-3])
    good = tmp_path / "good.pth"
    save_direction(good, HIDDEN)
    refused(model, good, tmp_path / "out", repr(str(bad)), "truncated")


# --- the output folder ----------------------------------------------------------------------------

def test_a_read_only_output_filesystem_is_one_line(model, direction, tmp_path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN)")
    try:
        (mount / "full").mkdir()
        (mount / "full" / "old.txt").write_text("something to replace")
        (mount / "empty").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True, timeout=30)
        for out in (mount / "empty", mount / "out"):
            line = refused(model, direction, out, str(out))
            assert "Read-only file system" in line
        with untouched(model):  # --overwrite cannot clear it either
            line = one_error_line(cli("apply", model, direction, "-o", mount / "full", "--overwrite", "-q"))
        assert "Read-only file system" in line and (mount / "full" / "old.txt").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)


def test_a_users_file_with_a_temporary_name_is_never_deleted(model, direction, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "notes.orthopatch-tmp"
    mine.write_text("my notes")
    hidden = out / f".{SHARD}.orthopatch-tmp"  # named like a shard's temporary, but no run of ours made it
    hidden.write_text("mine too")
    refused(model, direction, out, "not empty", "--overwrite")
    assert mine.read_text() == "my notes" and hidden.read_text() == "mine too"
    assert sorted(p.name for p in out.iterdir()) == sorted([mine.name, hidden.name])


def test_scale_zero_is_refused(model, direction, tmp_path) -> None:
    result = cli("apply", model, direction, "-o", tmp_path / "out", "--scale", "0")
    assert result.exit_code == 2 and "0 removes nothing" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    from orthopatch.patch.apply import ApplyOptions, apply
    from orthopatch.patch.record import Method

    with pytest.raises(OrthopatchError, match="scale 0 removes nothing"):
        apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "out", method=Method(scale=0.0),
                           quiet=True))
    assert not (tmp_path / "out").exists()


def test_header_length_is_read_from_a_regular_file_only(tmp_path) -> None:
    """The shard reader checks the descriptor it reads, not just the path."""
    from orthopatch.io.safetensors_header import read_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    assert read_header(path).tensors == ()
    os.mkfifo(tmp_path / "f.safetensors")
    with pytest.raises(OrthopatchError, match="FIFO"):
        read_header(tmp_path / "f.safetensors")


# --- what verify reads of an output it did not write ----------------------------------------------

@pytest.fixture
def made(model, direction, tmp_path) -> Path:
    out = tmp_path / "made"
    assert cli("apply", model, direction, "-o", out, "-q").exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["fifo-config", "dev-zero-config", "deep-record", "fifo-record", "deep-config"])
def test_verify_refuses_hostile_small_files_in_one_line(made, direction, damage) -> None:
    name = "config.json" if "config" in damage else RECORD_NAME
    if damage.startswith("deep"):
        (made / name).write_text(DEEP)
    else:
        make_special(made / name, damage.split("-config")[0].split("-record")[0])
    line = one_error_line(cli("verify", made, "--direction", direction, "-q"))
    assert str(made / name) in line


def test_a_foreign_deep_record_in_the_output_folder_is_not_taken_over(model, direction, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_NAME).write_text(DEEP)
    with untouched(model):
        line = one_error_line(cli("apply", model, direction, "-o", out, "-q"))
    assert "another direction" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [RECORD_NAME] and (out / RECORD_NAME).read_text() == DEEP


def test_a_non_finite_norm_gain_is_one_line(tmp_path, direction) -> None:
    """Gemma-style post-norm gains weight the direction: a NaN there is refused like one in a weight."""
    from orthopatch.synthetic import LlamaShape
    from tests.helpers import write_sharded

    shape = LlamaShape(hidden=HIDDEN, intermediate=96, vocab=64, layers=1, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(*s, generator=gen).to(torch.bfloat16) for n, s in shape.tensors()}
    gain = "model.layers.0.post_feedforward_layernorm.weight"
    tensors[gain] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    tensors["model.layers.0.pre_feedforward_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    tensors[gain][4] = float("nan")
    config = {**shape.config(), "model_type": "olmo2"}
    model = write_sharded(tmp_path / "model", [tensors], config, metadata={"format": "pt"})
    refused(model, direction, tmp_path / "out", repr(gain), "1 non-finite")


def test_an_absurd_layer_range_is_a_usage_error(model, direction, tmp_path) -> None:
    result = cli("apply", model, direction, "--layers", "0:1000000000", "--dry-run")
    assert result.exit_code == 2 and "more layers than a model has" in result.stderr


# --- regular expressions from outside -------------------------------------------------------------

@pytest.mark.parametrize("pattern, words", [
    ("(a+)+$", "a repeat inside a repeat"),
    ("(a?){28}a{28}", "a repeat inside a repeat"),
    ("model\\.(?:a|ab)*x", "an alternation inside a repeat"),
    ("(model)\\.\\1", "a backreference"),
    ("x" * 1001, "1,001 characters long"),
])
def test_patterns_that_can_backtrack_forever_are_refused(model, direction, pattern, words) -> None:
    result = cli("apply", model, direction, "--targets", f"{pattern}:0", "--dry-run")
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output


def test_only_repeats_that_can_vary_inside_repeats_are_refused() -> None:
    from orthopatch.saferegex import unsafe_reason

    for pattern in ("(a?){28}a{28}", "(?:ab?){2,5}", "(x{1,3})*"):
        assert "a repeat inside a repeat" in (unsafe_reason(pattern) or ""), pattern
    for pattern in ("(a{2}b)", "model\\.layers\\.(?P<layer>\\d+)\\.mlp\\.down_proj\\.weight", "(ab){3}"):
        assert unsafe_reason(pattern) is None, pattern


def test_matching_outside_patterns_is_time_bounded(model, direction, monkeypatch) -> None:
    """A pattern the static check lets through but that backtracks polynomially is stopped by the clock."""
    from orthopatch.patch import plan

    monkeypatch.setattr(plan, "MATCH_SECONDS", 0.5)
    slow = "model" + ".*" * 12 + "Z:0"
    line = one_error_line(cli("apply", model, direction, "--targets", slow, "--dry-run"))
    assert "took more than 0.5 s" in line


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_tensors_are_not_directions(tmp_path) -> None:
    nested = torch.nested.nested_tensor([torch.ones(HIDDEN), torch.ones(HIDDEN)])
    torch.save(nested, tmp_path / "n.pth")
    with pytest.raises(OrthopatchError, match="holds a nested tensor, not a dense real-valued tensor"):
        load_direction(tmp_path / "n.pth", HIDDEN)
    torch.save({"nested": nested, "refusal_dir": torch.ones(HIDDEN)}, tmp_path / "d.pth")
    assert load_direction(tmp_path / "d.pth", HIDDEN).rows.shape == (1, HIDDEN)


def test_megabyte_names_are_cut_in_messages(model, direction, tmp_path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "x" * 1_000_000
    (model / "config.json").write_text(json.dumps(config))
    line = refused(model, direction, tmp_path / "out", "unknown model_type 'xxx", "(1,000,000 characters)")
    assert len(line) < 2000


@pytest.mark.parametrize("where", ["model", "direction", "out"])
def test_symlink_loops_are_one_line(model, direction, tmp_path, where) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    args = {"model": (loop, direction, tmp_path / "out"), "direction": (model, loop, tmp_path / "out"),
            "out": (model, direction, loop)}[where]
    with untouched(model):
        line = one_error_line(cli("apply", *args[:2], "-o", args[2], "-q"))
    assert str(loop) in line and ("symbolic links" in line or "Symlink loop" in line), line


def test_a_shard_listing_a_hundred_thousand_tensors_is_planned(model, direction, tmp_path) -> None:
    """Lookups by name are dictionary lookups: a header of 100,000 (empty) tensors is planned in seconds,
    where scanning the list for each name would never finish (the fixture's alarm would end the test)."""
    extra = {"__metadata__": {"format": "pt"}}
    extra |= {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_000)}
    text = json.dumps(extra).encode()
    (model / "junk.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] |= {name: "junk.safetensors" for name in extra if name != "__metadata__"}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("apply", model, direction, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "junk.safetensors: 0 of 100000 tensors patched" in result.stdout

"""``orthopatch verify`` on GGUF outputs: honest conversions pass, and each kind of tampering is caught
and named. Tampered files are copies of a real output with bytes edited at gguf-py's tensor offsets."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.gguf_models import Q, can_encode, write_gguf
from tests.helpers import cli, cli_ok, one_error_line
from tests.test_gguf_apply import dequantized, direction, projected, tensors

TYPES = [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K]


@pytest.fixture(scope="module", params=TYPES, ids=lambda q: q.name)
def converted(request, tmp_path_factory) -> tuple[Path, Path, Path, Q]:
    qtype = request.param
    if not can_encode(qtype):
        pytest.skip(f"{qtype.name} files are written with llama.cpp's quantizer: llama-cpp-python is not installed")
    root = tmp_path_factory.mktemp(qtype.name)
    src = write_gguf(root / "tiny.gguf", qtype)
    r_path, _ = direction(root / "refusal_dir.pth")
    cli_ok("apply", src, r_path, "-q")
    return src, root / "tiny-abliterated.gguf", r_path, qtype


def tampered(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered.gguf"
    shutil.copyfile(out, copy)
    return copy


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def offset_of(path: Path, name: str) -> int:
    return int(tensors(path)[name].data_offset)


def failed(result, tensor: str | None, *words: str) -> str:
    """The failure lines of a verify that must fail; one names ``tensor`` (when given) and every word."""
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("orthopatch: error: ")]
    hits = [e for e in errors if (tensor is None or tensor in e) and all(w in e for w in words)]
    assert hits, result.stderr
    return hits[0]


def test_an_honest_output_verifies_against_its_source(converted) -> None:
    src, out, _, qtype = converted
    result = cli_ok("verify", out, "--source", src)
    assert "attention (before -> after)" in result.stdout and "embedding" in result.stdout
    assert f"{qtype.name}: 5 patched tensor(s)" in result.stdout
    assert "verified: 5 patched tensors match the source" in result.stdout
    assert "16 others byte-identical" in result.stdout


def test_without_source_the_record_and_the_share_are_reported(converted) -> None:
    _, out, r_path, _ = converted
    result = cli_ok("verify", out, "--direction", r_path)
    assert "attention (after)" in result.stdout and "verified: 5 patched tensors measured" in result.stdout


def test_a_changed_byte_in_an_unpatched_tensor_is_caught(converted, tmp_path: Path) -> None:
    src, out, _, _ = converted
    bad = tampered(out, tmp_path)
    at = offset_of(bad, "blk.0.attn_q.weight") + 7
    write_at(bad, at, bytes([bad.read_bytes()[at] ^ 0x10]))
    failed(cli("verify", bad, "--source", src), "blk.0.attn_q.weight", "differs from the source", "not patched")


def test_a_patched_tensor_left_as_the_source_is_caught(converted, tmp_path: Path) -> None:
    src, out, _, _ = converted
    bad = tampered(out, tmp_path)
    name = "blk.1.ffn_down.weight"
    write_at(bad, offset_of(bad, name), np.asarray(tensors(src)[name].data).tobytes())
    failed(cli("verify", bad, "--source", src), name, "unchanged from the source")


def test_a_patched_tensor_swapped_for_another_is_caught(converted, tmp_path: Path) -> None:
    """Another layer's patched bytes: far outside any type's bound (k-quants included)."""
    src, out, _, _ = converted
    bad = tampered(out, tmp_path)
    write_at(bad, offset_of(bad, "blk.1.attn_output.weight"),
             np.asarray(tensors(out)["blk.0.attn_output.weight"].data).tobytes())
    failed(cli("verify", bad, "--source", src), "blk.1.attn_output.weight")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_one_block_requantized_from_wrong_values_is_caught(qtype: Q, tmp_path: Path) -> None:
    """One block of ``blk.0.ffn_down.weight`` holds the scale-0.5 projection, requantized by gguf-py."""
    src = write_gguf(tmp_path / "m.gguf", qtype)
    r_path, u = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q")
    name = "blk.0.ffn_down.weight"
    x = dequantized(tensors(src)[name])
    wrong = (x - 0.5 * np.outer(u, u @ x)).astype(np.float32)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    good = np.array(tensors(out)[name].data).view(np.uint8).reshape(-1, block_bytes)
    evil = gguf.quants.quantize(wrong, qtype).reshape(-1, block_bytes)
    a, b = (gguf.quants.dequantize(q, qtype).reshape(-1, block_values) for q in (good, evil))
    steps = (np.abs(a - b) > 0.01 * np.abs(a).max(axis=1, keepdims=True)).sum(axis=1)
    k = int(np.flatnonzero(steps >= 2)[0])  # the first block where two values move by a visible step
    write_at(out, offset_of(out, name) + k * block_bytes, evil[k].tobytes())
    now = np.asarray(tensors(out)[name].data).view(np.uint8).reshape(-1, block_bytes)
    assert (good != now).any(axis=1).sum() == 1
    failed(cli("verify", out, "--source", src), name, "1 of", f"block {k}")


def _field_value_offset(path: Path, key: str, index: int = 0) -> tuple[int, int]:
    """File offset and size of a metadata value (element ``index`` of an array)."""
    reader = gguf.GGUFReader(path)
    part = reader.fields[key].parts[reader.fields[key].data[index]]
    return part.ctypes.data - reader.data.ctypes.data, part.nbytes


@pytest.mark.parametrize(("key", "index", "new"), [("llama.context_length", 0, np.uint32(256).tobytes()),
                                                    ("tokenizer.ggml.tokens", 7, b"t9")],
                         ids=["number", "array-string"])
def test_changed_metadata_is_caught(key: str, index: int, new: bytes, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r_path, _ = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q")
    at, size = _field_value_offset(out, key, index)
    assert size == len(new) and out.read_bytes()[at:at + size] != new
    write_at(out, at, new)
    failed(cli("verify", out, "--source", src), None, f"metadata {key!r} differs")
    assert cli("verify", out).exit_code == 0  # without the source there is nothing to compare it with


def test_non_finite_values_in_a_patched_tensor_fail(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.F16)
    r_path, _ = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q")
    write_at(out, offset_of(out, "blk.1.attn_output.weight") + 64, np.float16(np.nan).tobytes())
    for extra in ((), ("--source", src)):
        failed(cli("verify", out, *extra), "blk.1.attn_output.weight", "non-finite")


def test_split_output_verifies_and_a_missing_part_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", Q.Q8_0, split_max_tensors=7)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    r_path, _ = direction(tmp_path / "r.pth")
    cli_ok("apply", parts[0], r_path, "-q")
    outs = sorted(tmp_path.glob("m-abliterated-*-of-*.gguf"))
    assert len(outs) == len(parts) >= 2
    assert "verified: 5 patched tensors match" in cli_ok("verify", outs[0], "--source", parts[0]).stdout
    outs[1].unlink()
    line = one_error_line(cli("verify", outs[0], "--source", parts[0]))
    assert f"part 2 of {len(outs)} is missing" in line and outs[1].name in line


def test_another_direction_is_caught(converted, tmp_path: Path) -> None:
    src, out, _, _ = converted
    other, _ = direction(tmp_path / "other.pth", seed=2)
    line = failed(cli("verify", out, "--direction", other, "--source", src), None, "sha256")
    assert "other.pth" in line


def test_scale_norm_preserving_layers_and_gemma_gains_are_verified(tmp_path: Path) -> None:
    """Gemma's post-norm gains (made unequal here) weight the direction; the record's method is followed."""
    src = write_gguf(tmp_path / "g.gguf", Q.Q8_0, arch="gemma2")
    rng = np.random.default_rng(3)
    for name in ("blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"):
        write_at(src, offset_of(src, name), rng.uniform(0.2, 3.0, 256).astype(np.float32).tobytes())
    r_path, _ = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q", "--scale", "0.5", "--norm-preserving", "--layers", "1")
    result = cli_ok("verify", out, "--source", src)
    assert "verified: 3 patched tensors match" in result.stdout
    same, total = re.search(r"([\d,]+) of ([\d,]+) blocks as gguf-py", result.stdout).groups()
    assert same == total
    # the gain-weighted projection is what the check expects: the plain one, written in its place, fails
    name = "blk.1.ffn_down.weight"
    x = dequantized(tensors(src)[name])
    plain = gguf.quants.quantize(projected(x, direction(tmp_path / "r.pth")[1], name).astype(np.float32), Q.Q8_0)
    write_at(out, offset_of(out, name), plain.tobytes())
    failed(cli("verify", out, "--source", src), name, "blocks differ")


def test_input_that_is_not_a_verifiable_gguf_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    r_path, _ = direction(tmp_path / "r.pth")
    assert "not a GGUF file" in one_error_line(cli("verify", junk, "--direction", r_path))  # the strict header check
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    assert "has no orthopatch.record" in one_error_line(cli("verify", src, "--direction", r_path))
    assert "no such file" in one_error_line(cli("verify", tmp_path / "absent.gguf", "--direction", r_path))


@pytest.mark.parametrize(("old", "new", "tensor", "words"), [
    (b'ffn_down.weight", "role": "mlp"', b'ffn_down.weight", "role": "att"', "blk.0.ffn_down.weight", "another role"),
    (b'"layers": "all"', b'"layers": [0]  ', "blk.1.attn_output.weight", "does not patch it"),
], ids=["role", "layers"])
def test_a_record_that_disagrees_with_the_architecture_table_is_caught(old: bytes, new: bytes, tensor: str | None,
                                                                       words: str, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r_path, _ = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q")
    data = out.read_bytes()
    assert len(old) == len(new)
    out.write_bytes(data.replace(old, new, 1))
    failed(cli("verify", out, "--source", src), tensor, "architecture table", words)


def test_the_recorded_direction_is_used_only_while_unchanged(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r_path, _ = direction(tmp_path / "r.pth")
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r_path, "-o", out, "-q")
    assert cli("verify", out).exit_code == 0
    direction(r_path, seed=4)
    line = one_error_line(cli("verify", out))
    assert "has changed since" in line and "--direction" in line

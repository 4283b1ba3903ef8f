"""``apply --imatrix`` on GGUF files: llama.cpp's importance matrix, in both of its file formats, written here by
hand (legacy ``.dat`` with struct, GGUF with gguf-py's writer). The patched tensors must be the bytes llama.cpp's
``ggml_quantize_chunk`` writes for the projected float32 values with the per-column weights llama-quantize derives
(sums over calls or counts, one slice per expert); hostile files are one line and write nothing; verify uses it."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.gguf_models import FF, HIDDEN, LAYERS, Q, can_encode, encode, write_gguf
from tests.helpers import cli, cli_ok, one_error_line, save_direction, tiny_llama
from tests.llama_ref import reference_quantize, requires_llama_cpp
from tests.test_gguf_apply import dequantized, direction, projected, tensors

WRITERS = [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_output", "ffn_down")]
EXPERTS = 3


# --- writing importance matrices ----------------------------------------------------------------------------

def legacy_imatrix(path: Path, entries: dict[str, tuple[int, np.ndarray]], tail: bool = True) -> Path:
    """llama-imatrix's legacy file: entry count, then name, ncall, nval and the sums of each; then the chunk
    count and the dataset's name."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, sums) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, sums.size)
        out += np.ascontiguousarray(sums, "<f4").tobytes()
    if tail:
        out += struct.pack("<i", 10) + struct.pack("<i", 8) + b"wiki.txt"
    path.write_bytes(out)
    return path


def gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], metadata: bool = True,
                 counts_type: type = np.float32) -> Path:
    """llama-imatrix's GGUF file: ``NAME.in_sum2`` ``[n_expert, ne0]`` and ``NAME.counts`` ``[n_expert, 1]``."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", "imatrix")
    if metadata:
        writer.add_array("imatrix.datasets", ["wiki.txt"])
        writer.add_uint32("imatrix.chunk_count", 10)
        writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, np.float32))
        writer.add_tensor(f"{name}.counts", np.asarray(counts, counts_type).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_sums(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """Sums of squared activations: positive, a few columns far above the rest."""
    return (np.exp(rng.normal(0, 1.5, (rows, width))) * 40).astype(np.float32)


def per_column(entries_format: str, sums: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The weights llama-quantize passes ggml_quantize_chunk, ``[n_expert, ne0]``, computed here on their own."""
    sums = sums.astype(np.float32).reshape(len(count), -1)
    c = np.asarray(count, np.float32)[:, None]
    if entries_format == "legacy":
        return sums / c if c[0, 0] > 0 else sums
    return np.where(c > 0, sums / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32)


def dense_entries(fmt: str, root: Path, seed: int = 3,
                  skip: tuple[str, ...] = ()) -> tuple[Path, dict[str, np.ndarray]]:
    """An importance matrix for every input of the tiny model (the patched writers among them), and the weights
    of the writers that have an entry."""
    rng = np.random.default_rng(seed)
    widths = {f"blk.{i}.{n}.weight": (FF if n == "ffn_down" else HIDDEN) for i in range(LAYERS)
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    widths = {k: v for k, v in widths.items() if k not in skip}
    sums = {name: random_sums(rng, 1, width) for name, width in widths.items()}
    calls = {name: int(rng.integers(1, 50)) for name in widths}
    if fmt == "legacy":
        path = legacy_imatrix(root / "imatrix.dat", {n: (calls[n], s) for n, s in sums.items()})
    else:
        path = gguf_imatrix(root / "imatrix.gguf", {n: (s, [calls[n]]) for n, s in sums.items()})
    weights = {n: per_column(fmt, sums[n], np.array([calls[n]])) for n in WRITERS if n in sums}
    return path, weights


def same_blocks(a: np.ndarray, b: np.ndarray, qtype: Q) -> float:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return float((a.view(np.uint8).reshape(-1, size) == b.view(np.uint8).reshape(-1, size)).all(axis=1).mean())


def raw(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(t.data).view(np.uint8)


# --- the bytes are llama.cpp's ------------------------------------------------------------------------------

@requires_llama_cpp
@pytest.mark.parametrize("fmt", ["legacy", "gguf"])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_patched_tensors_are_llama_cpps_weighted_quantization(fmt: str, qtype: Q, tmp_path: Path,
                                                              backend: str) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", qtype)
    r_path, u = direction(tmp_path / "refusal_dir.pth")
    imatrix, weights = dense_entries(fmt, tmp_path)
    result = cli_ok("apply", src, r_path, "--imatrix", imatrix, "-o", tmp_path / "weighted.gguf")
    assert f"{len(WRITERS)} quantized tensor(s) requantized with its weights" in result.stderr
    assert "no usable entry for 1 patched tensor(s)" in result.stderr and "token_embd.weight" in result.stderr
    cli_ok("apply", src, r_path, "-q", "-o", tmp_path / "plain.gguf")
    ta, tw, tp = tensors(src), tensors(tmp_path / "weighted.gguf"), tensors(tmp_path / "plain.gguf")
    for name in WRITERS:
        exact = projected(dequantized(ta[name]), u, name).astype(np.float32)
        expected = reference_quantize(exact, qtype, weights[name].reshape(-1))
        assert same_blocks(expected, raw(tw[name]), qtype) >= 0.999, name
        # without the weights the bytes are another quantization
        assert same_blocks(expected, raw(tp[name]), qtype) < 0.9, name
    # the embeddings have no entry: quantized without weights, as without the file
    assert np.array_equal(raw(tw["token_embd.weight"]), raw(tp["token_embd.weight"]))
    record = json.loads(bytes(gguf.GGUFReader(tmp_path / "weighted.gguf").fields["orthopatch.record"].parts[-1]))
    assert record["options"]["imatrix"] == {"file": imatrix.name,
                                            "sha256": hashlib.sha256(imatrix.read_bytes()).hexdigest()}
    assert record["fingerprint"]["method"]["imatrix"]["sha256"] == record["options"]["imatrix"]["sha256"]
    assert "imatrix" not in json.loads(bytes(gguf.GGUFReader(tmp_path / "plain.gguf")
                                             .fields["orthopatch.record"].parts[-1]))["options"]


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_types_whose_quantizer_reads_no_weights_ignore_the_file(qtype: Q, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", qtype)
    r_path, _ = direction(tmp_path / "refusal_dir.pth")
    imatrix, _ = dense_entries("gguf", tmp_path)
    result = cli_ok("apply", src, r_path, "--imatrix", imatrix, "-o", tmp_path / "a.gguf")
    assert "0 quantized tensor(s) requantized with its weights" in result.stderr
    assert "no usable entry" not in result.stderr
    cli_ok("apply", src, r_path, "-q", "-o", tmp_path / "b.gguf")
    a, b = tensors(tmp_path / "a.gguf"), tensors(tmp_path / "b.gguf")
    assert all(np.array_equal(raw(a[n]), raw(b[n])) for n in a)


@requires_llama_cpp
def test_missing_entries_are_named_and_quantized_without_weights(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", Q.Q4_K)
    r_path, _ = direction(tmp_path / "refusal_dir.pth")
    imatrix, _ = dense_entries("legacy", tmp_path, skip=("blk.1.ffn_down.weight",))
    result = cli_ok("apply", src, r_path, "--imatrix", imatrix, "-o", tmp_path / "a.gguf")
    notes = [line for line in result.stderr.splitlines() if "no usable entry" in line]
    assert len(notes) == 1 and "2 patched tensor(s)" in notes[0]
    assert "token_embd.weight" in notes[0] and "blk.1.ffn_down.weight" in notes[0]
    cli_ok("apply", src, r_path, "-q", "-o", tmp_path / "b.gguf")
    a, b = tensors(tmp_path / "a.gguf"), tensors(tmp_path / "b.gguf")
    assert np.array_equal(raw(a["blk.1.ffn_down.weight"]), raw(b["blk.1.ffn_down.weight"]))
    assert not np.array_equal(raw(a["blk.0.ffn_down.weight"]), raw(b["blk.0.ffn_down.weight"]))


# --- experts ------------------------------------------------------------------------------------------------

def write_moe(path: Path, qtype: Q, seed: int = 0) -> Path:
    """A llama-family model whose MLPs are EXPERTS experts, ``ffn_down_exps`` ``[n_expert, n_embd, n_ff]``."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(4)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(2)
    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], q: Q) -> None:
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        rows = encode(x.reshape(-1, shape[-1]), q)
        data = rows.reshape(*shape[:-1], rows.shape[-1])
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)

    add("token_embd.weight", (64, HIDDEN), Q.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, np.float32))
    add("blk.0.attn_output.weight", (HIDDEN, HIDDEN), qtype)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    add("blk.0.ffn_down_exps.weight", (EXPERTS, HIDDEN, FF), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@requires_llama_cpp
@pytest.mark.parametrize("fmt", ["legacy", "gguf"])
def test_each_expert_is_quantized_with_its_own_slice(fmt: str, tmp_path: Path, backend: str) -> None:
    qtype = Q.Q4_K
    src = write_moe(tmp_path / "moe.gguf", qtype)
    r_path, u = direction(tmp_path / "refusal_dir.pth")
    rng = np.random.default_rng(5)
    sums = random_sums(rng, EXPERTS, FF)
    attn = random_sums(rng, 1, HIDDEN)
    if fmt == "legacy":
        calls = np.array([7])
        imatrix = legacy_imatrix(tmp_path / "moe.dat", {"blk.0.ffn_down_exps.weight": (7, sums),
                                                       "blk.0.attn_output.weight": (3, attn)})
    else:
        calls = np.array([12.0, 0.0, 31.4])  # an expert never routed to: all weights 1; counts are rounded
        imatrix = gguf_imatrix(tmp_path / "moe.gguf.imatrix", {"blk.0.ffn_down_exps.weight": (sums, calls),
                                                               "blk.0.attn_output.weight": (attn, [3])})
    if fmt == "legacy":  # one call count for the whole entry
        weights = per_column(fmt, sums.reshape(1, -1), calls).reshape(EXPERTS, FF)
    else:  # one count per expert, rounded to an integer
        weights = per_column(fmt, sums, np.array([12, 0, 31]))
    assert fmt == "legacy" or (weights[1] == 1).all()
    cli_ok("apply", src, r_path, "--imatrix", imatrix, "-q", "-o", tmp_path / "out.gguf")
    cli_ok("apply", src, r_path, "-q", "-o", tmp_path / "plain.gguf")
    ta, tb, tp = tensors(src), tensors(tmp_path / "out.gguf"), tensors(tmp_path / "plain.gguf")
    w = dequantized(ta["blk.0.ffn_down_exps.weight"])  # [EXPERTS, HIDDEN, FF]
    got = raw(tb["blk.0.ffn_down_exps.weight"]).reshape(EXPERTS, HIDDEN, -1)
    plain = raw(tp["blk.0.ffn_down_exps.weight"]).reshape(EXPERTS, HIDDEN, -1)
    for e in range(EXPERTS):
        exact = (w[e] - np.outer(u, u @ w[e])).astype(np.float32)
        expected = reference_quantize(exact, qtype, weights[e])
        assert same_blocks(expected, got[e], qtype) >= 0.999, e
        if fmt == "legacy" or e != 1:
            assert same_blocks(expected, plain[e], qtype) < 0.9, e
        # another expert's slice gives other bytes: the slices are not mixed up
        other = reference_quantize(exact, qtype, weights[(e + 1) % EXPERTS])
        assert same_blocks(other, got[e], qtype) < 0.9, e


# --- refusals -----------------------------------------------------------------------------------------------

def _legacy_bytes(entries: list[tuple[bytes, int, int, bytes]], count: int | None = None) -> bytes:
    out = struct.pack("<i", len(entries) if count is None else count)
    for name, ncall, nval, values in entries:
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, nval) + values
    return out


GOOD_VALUES = np.ones(FF, "<f4").tobytes()
HOSTILE = {
    "empty": b"",
    "truncated values": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, GOOD_VALUES[:-6])]),
    "huge entry count": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, GOOD_VALUES)], count=2**31 - 1),
    "zero entries": _legacy_bytes([], count=0),
    "huge nval": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, 2**31 - 1, GOOD_VALUES)]),
    "negative nval": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, -4, GOOD_VALUES)]),
    "huge name": struct.pack("<ii", 1, 2**31 - 1) + b"blk",
    "negative name length": struct.pack("<ii", 1, -7) + b"x" * 64,
    "duplicate names": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, GOOD_VALUES)] * 2),
    "NaN weight": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, np.full(FF, np.nan, "<f4").tobytes())]),
    "wrong nval for the tensor": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF - 32, GOOD_VALUES[:-128])]),
    "bad dataset length": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, GOOD_VALUES)])
    + struct.pack("<ii", 10, 1 << 30),
    "trailing garbage": _legacy_bytes([(b"blk.0.ffn_down.weight", 1, FF, GOOD_VALUES)])
    + struct.pack("<ii", 10, 2) + b"ab" + b"zz",
}


def _refused_in_one_line(tmp_path: Path, write_bad: Callable[[], Path], names_tensor: bool) -> None:
    """``apply --imatrix`` with the file ``write_bad`` writes: one line naming it (and the tensor), nothing written."""
    src = write_gguf(tmp_path / "tiny.gguf", Q.Q4_0)
    r_path, _ = direction(tmp_path / "refusal_dir.pth")
    bad = write_bad()
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error_line(cli("apply", src, r_path, "--imatrix", bad))
    assert bad.name in line
    if names_tensor:
        assert "blk.0.ffn_down.weight" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_legacy_files_are_one_line_and_write_nothing(case: str, tmp_path: Path) -> None:
    def write_bad() -> Path:
        bad = tmp_path / "bad.dat"
        bad.write_bytes(HOSTILE[case])
        return bad

    _refused_in_one_line(tmp_path, write_bad, case == "wrong nval for the tensor")


def _gguf_case(case: str, path: Path) -> Path:
    sums, good = np.ones((1, FF), np.float32), {"blk.0.ffn_down.weight": (np.ones((1, FF), np.float32), [4])}
    if case == "no metadata":
        return gguf_imatrix(path, good, metadata=False)
    if case == "sums without counts":
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_array("imatrix.datasets", ["x"])
        writer.add_uint32("imatrix.chunk_count", 1)
        writer.add_uint32("imatrix.chunk_size", 1)
        writer.add_tensor("blk.0.ffn_down.weight.in_sum2", sums)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path
    if case == "counts not F32":
        return gguf_imatrix(path, good, counts_type=np.float16)
    if case == "infinite count":
        return gguf_imatrix(path, {"blk.0.ffn_down.weight": (sums, [np.inf])})
    if case == "wrong length for the tensor":
        return gguf_imatrix(path, {"blk.0.ffn_down.weight": (np.ones((2, FF), np.float32), [1, 1])})
    if case == "truncated":
        gguf_imatrix(path, good)
        path.write_bytes(path.read_bytes()[:-100])
        return path
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no metadata", "sums without counts", "counts not F32", "infinite count",
                                  "wrong length for the tensor", "truncated"])
def test_hostile_gguf_files_are_one_line_and_write_nothing(case: str, tmp_path: Path) -> None:
    _refused_in_one_line(tmp_path, lambda: _gguf_case(case, tmp_path / "bad.gguf.imatrix"),
                         case == "wrong length for the tensor")


def test_imatrix_with_a_safetensors_model_is_refused(tmp_path: Path) -> None:
    model = tiny_llama(tmp_path / "model")
    save_direction(tmp_path / "r.pth", 64)
    imatrix, _ = dense_entries("legacy", tmp_path)
    line = one_error_line(cli("apply", model, tmp_path / "r.pth", "--imatrix", imatrix))
    assert "GGUF" in line and "safetensors" in line
    assert not (tmp_path / "model-abliterated").exists()


# --- in place, and verify -----------------------------------------------------------------------------------

@pytest.mark.skipif(not can_encode(Q.Q4_K), reason="Q4_K files are written with llama.cpp's quantizer")
def test_in_place_writes_the_same_bytes_as_a_new_file(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", Q.Q4_K)
    r_path, _ = direction(tmp_path / "refusal_dir.pth")
    imatrix, _ = dense_entries("gguf", tmp_path)
    cli_ok("apply", src, r_path, "--imatrix", imatrix, "-q", "-o", tmp_path / "out.gguf")
    inplace = tmp_path / "copy" / "tiny.gguf"
    inplace.parent.mkdir()
    shutil.copyfile(src, inplace)
    result = cli("apply", inplace, r_path, "--imatrix", imatrix, "-q", "--in-place")
    if result.exit_code == 1 and "insert" in result.stderr:
        pytest.skip("this filesystem cannot insert ranges: " + result.stderr.strip())
    assert result.exit_code == 0, result.output
    a, b = tensors(tmp_path / "out.gguf"), tensors(inplace)
    assert all(np.array_equal(raw(a[n]), raw(b[n])) for n in a)


@pytest.fixture(scope="module")
def weighted_output(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    if not can_encode(Q.Q4_K):
        pytest.skip("Q4_K files are written with llama.cpp's quantizer: llama-cpp-python is not installed")
    root = tmp_path_factory.mktemp("verify")
    src = write_gguf(root / "tiny.gguf", Q.Q4_K, odd={"blk.0.attn_output.weight": Q.Q4_0})
    r_path, _ = direction(root / "refusal_dir.pth")
    imatrix, _ = dense_entries("legacy", root)
    cli_ok("apply", src, r_path, "--imatrix", imatrix, "-q")
    return src, root / "tiny-abliterated.gguf", r_path, imatrix


def test_verify_with_the_imatrix_checks_the_weighted_error(weighted_output) -> None:
    src, out, r_path, imatrix = weighted_output
    result = cli_ok("verify", out, "--source", src, "--direction", r_path, "--imatrix", imatrix)
    lines = [line for line in result.output.splitlines() if "with the importance matrix, importance-weighted" in line]
    assert [line.split(":")[0] for line in lines] == ["Q4_0", "Q4_K"]
    assert lines[0].startswith("Q4_0: 1 patched tensor(s)") and lines[1].startswith("Q4_K: 3 patched tensor(s)")
    assert "measured only" not in result.output and ": verified: " in result.output
    result = cli_ok("verify", out, "--direction", r_path, "--imatrix", imatrix)
    assert "--imatrix is used only with --source" in result.stderr


def test_verify_without_the_imatrix_says_so_and_measures(weighted_output, tmp_path: Path) -> None:
    src, out, r_path, imatrix = weighted_output
    result = cli_ok("verify", out, "--source", src, "--direction", r_path)
    notes = [line for line in result.stderr.splitlines() if imatrix.name in line]
    assert len(notes) == 1 and "without --imatrix" in notes[0]
    assert f"({len(WRITERS) + 1} measured only: give --imatrix)" in result.output
    other, _ = dense_entries("gguf", tmp_path, seed=9)
    result = cli_ok("verify", out, "--source", src, "--direction", r_path, "--imatrix", other)
    assert any("is not that file" in line for line in result.stderr.splitlines())


def test_verify_with_the_imatrix_still_catches_an_unpatched_tensor(weighted_output, tmp_path: Path) -> None:
    src, out, r_path, imatrix = weighted_output
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(out, bad)
    name = "blk.1.ffn_down.weight"
    t_src, t_out = tensors(src)[name], tensors(bad)[name]
    with open(bad, "r+b") as f:
        f.seek(int(t_out.data_offset))
        f.write(raw(t_src).tobytes())
    result = cli("verify", bad, "--source", src, "--direction", r_path, "--imatrix", imatrix)
    assert result.exit_code == 1 and name in result.stderr and "unchanged from the source" in result.stderr


# --- the weights, as llama-quantize computes them -------------------------------------------------------------

def test_the_weights_are_llama_quantizes(tmp_path: Path) -> None:
    """The quantizers are blind to a common factor of a slice's weights, so the division itself is checked here:
    legacy sums over ncall in float32 (raw sums when ncall is not positive), GGUF sums over each expert's count
    rounded half away from zero (ones for a count of zero), names ending at a NUL byte as C strings do."""
    from orthopatch.gguf.imatrix import read_imatrix

    rng = np.random.default_rng(11)
    a, b, c = random_sums(rng, 1, 64), random_sums(rng, 1, 32), random_sums(rng, 4, 32)
    legacy = legacy_imatrix(tmp_path / "m.dat", {"a\0ignored": (7, a), "b": (-2, b)})
    found = read_imatrix(legacy)
    assert (found.format, found.count, sorted(found.weights)) == ("legacy", 2, ["a", "b"])
    assert np.array_equal(found.weights["a"], (a / np.float32(7)).reshape(-1))
    assert np.array_equal(found.weights["b"], b.reshape(-1))
    assert found.sha256 == hashlib.sha256(legacy.read_bytes()).hexdigest()
    assert read_imatrix(legacy, keep={"b"}).weights.keys() == {"b"}
    counts = np.array([2.5, 0.0, 30.49, -3.0])
    path = gguf_imatrix(tmp_path / "m.gguf", {"c": (c, counts)})
    found = read_imatrix(path)
    expected = c / np.array([3, 1, 30, 1], np.float32)[:, None]
    expected[1] = expected[3] = 1
    assert found.format == "gguf" and np.array_equal(found.weights["c"], expected.reshape(-1))


def test_the_imatrix_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "tiny.gguf", Q.Q4_0)
    r_path, _ = direction(tmp_path / "refusal_dir.pth")
    first, _ = dense_entries("legacy", tmp_path)
    out = tmp_path / "out.gguf"
    cli_ok("apply", src, r_path, "--imatrix", first, "-q", "-o", out)
    assert "already complete" in cli_ok("apply", src, r_path, "--imatrix", first, "-q", "-o", out).output
    other, _ = dense_entries("gguf", tmp_path, seed=4)
    line = one_error_line(cli("apply", src, r_path, "--imatrix", other, "-q", "-o", out))
    assert "--overwrite" in line
    line = one_error_line(cli("apply", src, r_path, "-q", "-o", out))
    assert "--overwrite" in line

"""``orthopatch apply`` on GGUF files, checked with gguf-py's reader and llama.cpp itself, never with the
code that wrote the output: patched tensors equal the float64 projection requantized by gguf-py or
llama.cpp's own quantizer, everything else is the source's bytes, and llama.cpp runs the result."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tests.gguf_models import (
    FF,
    HIDDEN,
    LAYERS,
    VOCAB,
    Q,
    can_encode,
    encode,
    llama_cpp_cosines,
    transformers_cosines,
    write_gguf,
)
from tests.helpers import cli, cli_ok, one_error_line

WRITERS = ["token_embd.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_output", "ffn_down")]
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.Q2_K]


def direction(path: Path, seed: int = 1) -> tuple[Path, np.ndarray]:
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    saved = (r / r.norm()).float()  # as published files are: normalized, then stored in a narrower type
    torch.save(saved, path)
    r = saved.double().numpy()
    return path, r / np.sqrt(np.sum(r * r))


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def dequantized(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(t.shape))
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float64)


def projected(w: np.ndarray, u: np.ndarray, name: str) -> np.ndarray:
    """The float64 projection: embedding rows lose x·u, output projections lose u(uᵀW)."""
    if name == "token_embd.weight":
        return w - np.outer(w @ u, u)
    return w - np.outer(u, u @ w)


@pytest.fixture(scope="module", params=TYPES, ids=lambda q: q.name)
def converted(request, tmp_path_factory) -> tuple[Path, Path, np.ndarray, Q]:
    qtype = request.param
    if not can_encode(qtype):
        pytest.skip(f"{qtype.name} files are written with llama.cpp's quantizer: llama-cpp-python is not installed")
    root = tmp_path_factory.mktemp(qtype.name)
    src = write_gguf(root / "tiny.gguf", qtype)
    r_path, u = direction(root / "refusal_dir.pth")
    cli_ok("apply", src, r_path, "-q")
    return src, root / "tiny-abliterated.gguf", u, qtype


def test_only_the_writers_change_and_the_metadata_is_kept(converted) -> None:
    src, out, _, _ = converted
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    def values(reader: gguf.GGUFReader) -> dict[str, bytes]:
        return {k: b"".join(f.parts[i].tobytes() for i in f.data) for k, f in reader.fields.items()
                if not k.startswith("orthopatch.") and k != "GGUF.kv_count"}

    assert values(b) == values(a)
    assert b.fields["GGUF.kv_count"].parts[0][0] == a.fields["GGUF.kv_count"].parts[0][0] + 2
    record = json.loads(bytes(b.fields["orthopatch.record"].parts[-1]).decode())
    assert record["architecture"] == "llama" and {t["name"] for t in record["tensors_patched"]} == set(WRITERS)
    ta, tb = tensors(src), tensors(out)
    assert list(ta) == list(tb)
    for name in ta:
        assert (ta[name].tensor_type, list(ta[name].shape)) == (tb[name].tensor_type, list(tb[name].shape))
        same = np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8))
        assert same == (name not in WRITERS), name
        # the data moved by whole 4 KiB blocks, so a filesystem with shared extents can share it
        assert (int(tb[name].data_offset) - int(ta[name].data_offset)) % 4096 == 0


def test_patched_tensors_are_the_requantized_projection(converted) -> None:
    src, out, u, qtype = converted
    ta, tb = tensors(src), tensors(out)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    for name in WRITERS:
        exact = projected(dequantized(ta[name]), u, name)
        expected = encode(exact.astype(np.float32), qtype).view(np.uint8).reshape(-1, block_bytes)
        got = np.asarray(tb[name].data).view(np.uint8).reshape(-1, block_bytes)
        same = (expected == got).all(axis=1).mean()
        assert same >= 0.999, f"{name}: {same:.4%} of blocks as the reference quantizer writes them"


def test_the_direction_share_falls(converted) -> None:
    """|uᵀW| (per column) or |W u| (per row) after, against before: down to what requantizing leaves."""
    src, out, u, qtype = converted
    ta, tb = tensors(src), tensors(out)
    limit = {Q.F32: 1e-6, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.05}.get(qtype, 0.95)
    for name in WRITERS:
        a, b = dequantized(ta[name]), dequantized(tb[name])
        share = (lambda w: np.linalg.norm(w @ u)) if name == "token_embd.weight" else (lambda w: np.linalg.norm(u @ w))
        assert share(b) <= limit * share(a), f"{name}: {share(b) / share(a):.3g} of the share left"


def test_llama_cpp_runs_the_result_and_the_residual_loses_the_direction(converted) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, out, u, qtype = converted
    head = dequantized(tensors(out)["output.weight"])  # [vocab, hidden], unchanged by the patch
    cos = llama_cpp_cosines([src, out], [1, 17, 42, 99, 123, 7], u, head)
    assert cos[src].max() > 0.02
    if qtype in (Q.F32, Q.F16):
        assert cos[out].max() < 0.01, cos[out]
    if qtype != Q.Q2_K:  # requantizing to 2 bits puts most of the removed component back (see docs/gguf.md)
        assert cos[out].mean() < cos[src].mean()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.F16)
    r, _ = direction(tmp_path / "r.pth")
    result = cli_ok("apply", src, r, "--dry-run", "--layers", "1")
    assert "blk.1.attn_output.weight" in result.output and "blk.0.attn_output.weight" not in result.output
    assert "architecture llama (GGUF)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "r.pth"]


def test_a_type_that_cannot_be_requantized_is_refused_before_writing(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.F16, odd={"blk.1.ffn_down.weight": Q.IQ4_NL})
    r, _ = direction(tmp_path / "r.pth")
    line = one_error_line(cli("apply", src, r, "-o", tmp_path / "o.gguf"))
    assert "blk.1.ffn_down.weight" in line and "IQ4_NL" in line and "m.gguf" in line
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".*orthopatch-tmp"))


def test_rerun_is_a_no_op_and_another_direction_needs_overwrite(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    r, _ = direction(tmp_path / "r.pth")
    r2, _ = direction(tmp_path / "r2.pth", seed=2)
    out = tmp_path / "o.gguf"
    cli_ok("apply", src, r, "-o", out, "-q")
    before = out.read_bytes()
    assert "already complete" in cli_ok("apply", src, r, "-o", out, "-q").output
    assert "--overwrite" in one_error_line(cli("apply", src, r2, "-o", out))
    assert out.read_bytes() == before
    cli_ok("apply", src, r2, "-o", out, "-q", "--overwrite")
    assert out.read_bytes() != before


def test_split_files_are_converted_part_by_part(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", Q.Q8_0, split_max_tensors=7)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) >= 2
    r, u = direction(tmp_path / "r.pth")
    cli_ok("apply", parts[0], r, "-q")
    outs = sorted(tmp_path.glob("m-abliterated-*-of-*.gguf"))
    assert [p.name for p in outs] == [p.name.replace("m-", "m-abliterated-") for p in parts]
    changed = set()
    for src, out in zip(parts, outs, strict=True):
        ta, tb = tensors(src), tensors(out)
        assert list(ta) == list(tb)
        changed |= {n for n in ta if not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))}
        assert gguf.GGUFReader(out).fields["split.count"].parts[-1][0] == len(parts)
    assert changed == set(WRITERS)


def test_gemma_post_norm_gains_weight_the_direction(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "g.gguf", Q.F32, arch="gemma2")
    r, _ = direction(tmp_path / "r.pth")
    result = cli_ok("apply", src, r, "--dry-run")
    assert "gain=blk.0.post_attention_norm.weight" in result.output
    assert "gain=blk.1.post_ffw_norm.weight" in result.output


def test_the_shapes_in_the_test_model_are_the_llama_ones() -> None:
    assert (HIDDEN, FF, VOCAB) == (256, 512, 300)


def test_transformers_loads_the_result_and_its_residual_stream_loses_the_direction(converted) -> None:
    """transformers' own GGUF loader (it dequantizes with gguf-py) runs both files: every hidden state
    before the final norm is orthogonal to the direction after the patch, up to what requantizing leaves."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    src, out, u, qtype = converted
    cos = transformers_cosines([src, out], torch.tensor([[1, 17, 42, 99, 123, 7]]), u)
    assert cos[src].max() > 0.02
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
        assert cos[out].max() < 0.1 * cos[src].max(), (cos[out].max(), cos[src].max())
    elif qtype != Q.Q2_K:
        assert cos[out].mean() < cos[src].mean()

"""`orthopatch apply` end to end on hand-written checkpoints with the quirks real files have."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.io.safetensors_header import read_header
from tests.helpers import assert_correctly_rounded, cli, folder_hashes, one_error_line, safetensors_bytes, write_sharded

HIDDEN, INTER, VOCAB, LAYERS = 48, 80, 100, 2
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "intermediate_size": INTER, "num_hidden_layers": LAYERS, "vocab_size": VOCAB}
PATCHED = {"model.embed_tokens.weight": 1} | {
    f"model.layers.{n}.{m}.weight": 0 for n in range(LAYERS) for m in ("self_attn.o_proj", "mlp.down_proj")}


def layer(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{n}"
    bf = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)  # noqa: E731
    return {
        f"{p}.input_layernorm.weight": torch.rand(HIDDEN, generator=gen) + 0.5,  # F32 norms beside BF16
        f"{p}.self_attn.q_proj.weight": bf(HIDDEN, HIDDEN),
        f"{p}.self_attn.k_proj.weight": bf(HIDDEN // 2, HIDDEN),
        f"{p}.self_attn.v_proj.weight": bf(HIDDEN // 2, HIDDEN),
        f"{p}.self_attn.o_proj.weight": bf(HIDDEN, HIDDEN),
        f"{p}.post_attention_layernorm.weight": torch.rand(HIDDEN, generator=gen) + 0.5,
        f"{p}.mlp.gate_proj.weight": bf(INTER, HIDDEN),
        f"{p}.mlp.up_proj.weight": bf(INTER, HIDDEN),
        f"{p}.mlp.down_proj.weight": bf(HIDDEN, INTER),
    }


def build_model(folder: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    shards = [
        layer(0, gen),
        layer(1, gen) | {"model.norm.weight": torch.rand(HIDDEN, generator=gen),
                         "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)},
        {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)},
    ]
    # Headers not padded to 8 bytes; the first shard lists its keys in reverse offset order.
    write_sharded(folder, shards, CONFIG, pad=False, metadata={"format": "pt"})
    first = safetensors_bytes(shards[0], pad=False, key_order=list(reversed(shards[0])), metadata={"format": "pt"})
    (folder / "model-00001-of-00003.safetensors").write_bytes(first)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "generation_config.json").write_text("{}")
    (folder / "LICENSE").write_text("license text")
    (folder / "README.md").write_text("# a model\n")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(b"not copied")
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    return folder


def read_tensors(path: Path) -> dict[str, tuple[bytes, torch.Tensor]]:
    from safetensors.torch import load_file

    header = read_header(path)
    data = path.read_bytes()
    tensors = load_file(path)
    return {t.name: (data[t.begin:t.end], tensors[t.name]) for t in header.tensors}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("src") / "Tiny-Llama")


@pytest.fixture(scope="module")
def direction(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    r = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("dir") / "refusal_dir.pth"
    torch.save((r / r.norm()).to(torch.bfloat16), path)  # [1, d], normalized in bf16 as published files are
    u = torch.load(path).to(torch.float64).reshape(-1)
    return path, u / u.norm()


def test_apply_end_to_end(model, direction, tmp_path):
    before = folder_hashes(model)
    out = tmp_path / "out"
    result = cli("apply", model, direction[0], "-o", out, "-q")
    assert result.exit_code == 0, result.output
    u = direction[1]
    for shard in sorted(model.glob("*.safetensors")):
        assert read_header(out / shard.name).raw == read_header(shard).raw
        src, dst = read_tensors(shard), read_tensors(out / shard.name)
        assert src.keys() == dst.keys()
        for name, (raw, tensor) in src.items():
            if name in PATCHED:
                assert_correctly_rounded(dst[name][1], tensor, u, PATCHED[name], name=name)
                assert dst[name][1].dtype == tensor.dtype
            else:
                assert dst[name][0] == raw, f"{name} changed"
    assert (out / "model.safetensors.index.json").read_bytes() == (model / "model.safetensors.index.json").read_bytes()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "LICENSE"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert not (out / "original").exists() and not (out / "pytorch_model.bin").exists()
    assert not (out / PARTIAL_NAME).exists()
    record = json.loads((out / RECORD_NAME).read_text())
    assert sorted(t["name"] for t in record["tensors_patched"]) == sorted(PATCHED)
    assert record["direction"]["sha256"] == hashlib.sha256(direction[0].read_bytes()).hexdigest()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert folder_hashes(model) == before


def test_dry_run_writes_nothing(model, direction, tmp_path):
    out = tmp_path / "out"
    result = cli("apply", model, direction[0], "-o", out, "--dry-run")
    assert result.exit_code == 0
    for name in PATCHED:
        assert name in result.stdout
    assert "model-00003-of-00003.safetensors" in result.stdout and "bytes" in result.stdout
    assert "lm_head.weight" not in result.stdout
    assert not out.exists()


def test_default_output_is_a_sibling(model, direction, tmp_path):
    src = tmp_path / "Model-X"
    src.symlink_to(model, target_is_directory=True)
    result = cli("apply", src, direction[0], "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "Model-X-abliterated" / RECORD_NAME).exists()


def test_rerun_is_a_no_op_and_foreign_output_is_refused(model, direction, tmp_path):
    out = tmp_path / "out"
    assert cli("apply", model, direction[0], "-o", out, "-q").exit_code == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = cli("apply", model, direction[0], "-o", out, "-q")
    assert again.exit_code == 0 and "already complete" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    other = tmp_path / "other.pth"
    torch.save(torch.randn(HIDDEN), other)
    refused = one_error_line(cli("apply", model, other, "-o", out, "-q"))
    assert "another direction" in refused and str(out) in refused
    assert cli("apply", model, other, "-o", out, "-q", "--overwrite").exit_code == 0
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["direction"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


def test_foreign_folder_is_refused_unless_overwrite(model, direction, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = one_error_line(cli("apply", model, direction[0], "-o", out, "-q"))
    assert "holds no orthopatch output" in refused
    assert (out / "notes.txt").read_text() == "mine"
    assert cli("apply", model, direction[0], "-o", out, "-q", "--overwrite").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / RECORD_NAME).exists()


def test_wrong_size_direction_is_a_clear_error(model, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save(torch.randn(HIDDEN + 1), bad)
    out = tmp_path / "out"
    line = one_error_line(cli("apply", model, bad, "-o", out))
    assert str(bad) in line and str(HIDDEN) in line
    assert not (out / "model.safetensors.index.json").exists()


def test_resume_after_interruption(model, direction, tmp_path):
    out = tmp_path / "out"
    assert cli("apply", model, direction[0], "-o", out, "-q").exit_code == 0
    finished = folder_hashes(out)
    record = json.loads((out / RECORD_NAME).read_text())
    # The state an interrupted run leaves: marker, some shards, no index, no record, a temp file.
    (out / PARTIAL_NAME).write_text(json.dumps(record["fingerprint"]))
    (out / RECORD_NAME).unlink()
    (out / "model.safetensors.index.json").unlink()
    (out / "model-00002-of-00003.safetensors").unlink()
    (out / ".model-00002-of-00003.safetensors.orthopatch-tmp").write_bytes(b"half")
    result = cli("apply", model, direction[0], "-o", out, "-q")
    assert result.exit_code == 0 and "resumed" in result.stdout
    after = folder_hashes(out)
    assert after.keys() == finished.keys()
    assert {k: v for k, v in after.items() if k != RECORD_NAME} == {
        k: v for k, v in finished.items() if k != RECORD_NAME}


def test_single_file_checkpoint(direction, tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = layer(0, gen) | {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen).half()}
    src = write_sharded(tmp_path / "single", [tensors], CONFIG | {"num_hidden_layers": 1}, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli("apply", src, direction[0], "-o", out, "-q").exit_code == 0
    dst = read_tensors(out / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    assert_correctly_rounded(dst["model.embed_tokens.weight"][1], emb, direction[1], 1)
    assert not (out / "model.safetensors.index.json").exists()

"""The options of ``apply`` (scale, norm preservation, per-layer directions, layer and embedding
selection, custom targets) against a float64 reference, on a hand-written checkpoint whose norm
gains sit in another shard than the tensors they weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthopatch.io.formats import RECORD_NAME
from tests.helpers import assert_correctly_rounded, cli, cli_ok, one_error_line, reference, write_sharded

HIDDEN, INTER, VOCAB, LAYERS = 32, 48, 40, 3
CONFIG = {"model_type": "olmo2", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
          "vocab_size": VOCAB, "tie_word_embeddings": False}
EMBED = "model.embed_tokens.weight"


def attn(n: int) -> str:
    return f"model.layers.{n}.self_attn.o_proj.weight"


def mlp(n: int) -> str:
    return f"model.layers.{n}.mlp.down_proj.weight"


#: target -> (layer, axis, gain name or None)
TARGETS = {EMBED: (None, 1, None)} | {
    name(n): (n, 0, f"model.layers.{n}.{norm}.weight")
    for n in range(LAYERS)
    for name, norm in ((attn, "post_attention_layernorm"), (mlp, "post_feedforward_layernorm"))
}


def source_tensors() -> list[dict[str, torch.Tensor]]:
    """Three shards: the layers' matrices (o_proj F32, down_proj BF16), their norms, the embeddings."""
    gen = torch.Generator().manual_seed(3)
    weights, norms = {}, {}
    for n in range(LAYERS):
        p = f"model.layers.{n}"
        weights[f"{p}.self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=gen).to(torch.bfloat16)
        weights[attn(n)] = torch.randn(HIDDEN, HIDDEN, generator=gen)
        weights[f"{p}.mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=gen).to(torch.bfloat16)
        weights[mlp(n)] = torch.randn(HIDDEN, INTER, generator=gen).to(torch.bfloat16)
        norms[f"{p}.post_attention_layernorm.weight"] = 1.0 + 0.5 * torch.randn(HIDDEN, generator=gen)
        norms[f"{p}.post_feedforward_layernorm.weight"] = (1.0 + 0.5 * torch.randn(HIDDEN, generator=gen)).to(
            torch.bfloat16)
    rest = {EMBED: torch.randn(VOCAB, HIDDEN, generator=gen),
            "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16),
            "model.norm.weight": torch.rand(HIDDEN, generator=gen)}
    return [weights, norms, rest]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_sharded(tmp_path_factory.mktemp("methods") / "model", source_tensors(), CONFIG,
                         metadata={"format": "pt"})


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.float64)
    return v / v.norm()


def direction_file(folder: Path, rows: int, seed: int = 7) -> tuple[Path, torch.Tensor]:
    r = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    path = folder / f"dir{rows}.pt"
    torch.save((r[0] if rows == 1 else r).float(), path)
    return path, r.float().double()


def target_unit(src: dict[str, torch.Tensor], name: str, rows: torch.Tensor) -> torch.Tensor:
    layer, _, gain = TARGETS[name]
    r = unit(rows[0] if layer is None or rows.shape[0] == 1 else rows[layer])
    return unit(r * src[gain].double()) if gain else r


def run(source: Path, out: Path, direction: Path, *args: str) -> dict:
    cli_ok("apply", source, direction, "-o", out, "-q", *args)
    return json.loads((out / RECORD_NAME).read_text())


def assert_close(out: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """Within one rounding of the stored dtype (plus float32 arithmetic noise for 16-bit storage)."""
    eps = torch.finfo(out.dtype).eps
    tol = eps * exact.abs() + 1e-6 * exact.abs().max()
    err = (out.double() - exact).abs()
    assert bool((err <= tol).all()), f"{name}: max error {err.max().item():.3g}"


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_scale_removes_that_multiple_of_the_component(source: Path, tmp_path: Path, scale: float) -> None:
    direction, rows = direction_file(tmp_path, 1)
    record = run(source, tmp_path / "out", direction, "--scale", str(scale))
    assert record["options"]["scale"] == scale
    src, out = read_all(source), read_all(tmp_path / "out")
    for name, (_, axis, _) in TARGETS.items():
        u = target_unit(src, name, rows)
        assert_correctly_rounded(out[name], src[name], u, axis, scale=scale, name=name)
        before = src[name].double().movedim(axis, -1) @ u
        after = out[name].double().movedim(axis, -1) @ u
        eps = torch.finfo(out[name].dtype).eps * src[name].double().abs().max() * HIDDEN ** 0.5
        assert torch.allclose(after, (1 - scale) * before, atol=4 * eps.item()), name  # 2 reflects


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_norm_preserving_keeps_every_input_units_length(source: Path, tmp_path: Path, scale: float) -> None:
    direction, rows = direction_file(tmp_path, 1)
    record = run(source, tmp_path / "out", direction, "--norm-preserving", "--scale", str(scale))
    assert record["options"]["norm_preserving"] is True
    src, out = read_all(source), read_all(tmp_path / "out")
    for name, (_, axis, _) in TARGETS.items():
        u = target_unit(src, name, rows)
        exact = reference(src[name], u, axis, scale, norm_preserving=True)
        assert_close(out[name], exact, name)
        lengths = out[name].double().norm(dim=axis)
        original = src[name].double().norm(dim=axis)
        assert torch.allclose(lengths, original, rtol=2 * torch.finfo(out[name].dtype).eps, atol=0), name
        if scale == 1.0:
            along = (out[name].double().movedim(axis, -1) @ u).abs().max().item()
            assert along < 1e-2 * original.max().item(), name


@pytest.mark.parametrize("rows", [LAYERS, LAYERS + 1])
def test_per_layer_directions_use_row_i_for_layer_i(source: Path, tmp_path: Path, rows: int) -> None:
    direction, r = direction_file(tmp_path, rows)
    record = run(source, tmp_path / "out", direction)
    assert record["direction"]["rows"] == rows
    src, out = read_all(source), read_all(tmp_path / "out")
    for name, (_, axis, _) in TARGETS.items():
        assert_correctly_rounded(out[name], src[name], target_unit(src, name, r), axis, name=name)
    # Not the shared direction: row 0 applied to layer 2 gives other bytes, which keep a component along row 2.
    shared = reference(src[mlp(2)], target_unit(src, mlp(2), r[:1]), 0).to(out[mlp(2)].dtype)
    assert not torch.equal(out[mlp(2)], shared)
    u2 = target_unit(src, mlp(2), r)
    along = (u2 @ out[mlp(2)].double()).norm() / out[mlp(2)].double().norm()
    assert along < 5e-3 < (u2 @ shared.double()).norm() / shared.double().norm()


def test_layers_and_no_embeddings_leave_the_rest_byte_identical(source: Path, tmp_path: Path) -> None:
    direction, rows = direction_file(tmp_path, 1)
    record = run(source, tmp_path / "out", direction, "--layers", "0,2:3", "--no-embeddings")
    assert record["options"]["layers"] == [0, 2] and record["options"]["embeddings"] is False
    assert {t["name"] for t in record["tensors_patched"]} == {attn(0), mlp(0), attn(2), mlp(2)}
    src, out = read_all(source), read_all(tmp_path / "out")
    for name, tensor in src.items():
        if name in (attn(0), mlp(0), attn(2), mlp(2)):
            assert_correctly_rounded(out[name], tensor, target_unit(src, name, rows), TARGETS[name][1], name=name)
        else:
            assert out[name].dtype == tensor.dtype and torch.equal(out[name].view(torch.uint8),
                                                                   tensor.view(torch.uint8)), name


def test_layers_outside_the_model_are_refused(source: Path, tmp_path: Path) -> None:
    direction, _ = direction_file(tmp_path, 1)
    line = one_error_line(cli("apply", source, direction, "-o", tmp_path / "o", "--layers", "1:4"))
    assert "layer 3" in line and "3 layers" in line


@pytest.mark.parametrize("args", [["--layers", "3:1"], ["--layers", "a"], ["--layers", "1,,2"],
                                  ["--targets", "(:0"], ["--targets", "x:y"], ["--targets", "noaxis"],
                                  ["--scale", "nan"]])
def test_bad_method_options_are_usage_errors(source: Path, tmp_path: Path, args: list[str]) -> None:
    direction, _ = direction_file(tmp_path, 1)
    result = cli("apply", source, direction, "-o", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "o").exists()


def custom_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    t = {"tok.weight": torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)}
    for n in range(2):
        t[f"blocks.{n}.fc.weight"] = torch.randn(HIDDEN, INTER, generator=gen).to(torch.bfloat16)
        t[f"blocks.{n}.out.weight"] = torch.randn(INTER, HIDDEN, generator=gen).to(torch.bfloat16)  # [in, hidden]
        t[f"blocks.{n}.out.bias"] = torch.randn(HIDDEN, generator=gen).to(torch.bfloat16)
    return t


def test_targets_patch_an_unknown_architecture(tmp_path: Path) -> None:
    config = {"model_type": "mystery", "d_model": HIDDEN, "n_layer": 2}
    src_dir = write_sharded(tmp_path / "mystery", [custom_tensors()], config, metadata={"format": "pt"})
    direction, rows = direction_file(tmp_path, 3)  # one row per hidden state
    assert "'mystery'" in one_error_line(cli("apply", src_dir, direction, "-o", tmp_path / "o"))
    specs = [r"tok\.weight:-1", r"blocks\.(?P<layer>\d+)\.out\.(weight|bias):-1"]
    record = run(src_dir, tmp_path / "out", direction, "--layers", "1",
                 *[a for s in specs for a in ("--targets", s)])
    assert record["architecture"] == "custom" and record["options"]["targets"] == specs
    src, out = read_all(src_dir), read_all(tmp_path / "out")
    patched = {"tok.weight": unit(rows[0]), "blocks.1.out.weight": unit(rows[1]), "blocks.1.out.bias": unit(rows[1])}
    assert {t["name"] for t in record["tensors_patched"]} == set(patched)
    for name, tensor in src.items():
        if name in patched:
            assert_correctly_rounded(out[name], tensor, patched[name], -1, name=name)
        else:
            assert torch.equal(out[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_dry_run_shows_gains_layers_and_embedding_tie(source: Path, tmp_path: Path) -> None:
    direction, _ = direction_file(tmp_path, 1)
    result = cli("apply", source, direction, "-o", tmp_path / "o", "--dry-run", "--layers", "1:3")
    assert result.exit_code == 0, result.output
    assert "patching layers 1:3, embeddings yes (separate from the output head)" in result.output
    assert "gain=model.layers.2.post_feedforward_layernorm.weight" in result.output
    assert attn(0) not in result.output and not (tmp_path / "o").exists()

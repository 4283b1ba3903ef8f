"""Planning from headers and config: which tensors each architecture patches, on which axis, with
which gain, and the loud failures (unknown model types, unknown expert names, wrong orientation,
quantized experts, bad selections)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import open_checkpoint
from orthopatch.patch.architecture import (
    architecture_from_dict,
    custom_architecture,
    find_architecture,
    known_architectures,
)
from orthopatch.patch.plan import PatchPlan, Selection, build_plan, format_layers, format_plan, parse_layers
from tests.helpers import write_sharded

H, M, V, E = 16, 24, 20, 3  # hidden, intermediate (MLP), vocab, experts


def checkpoint(folder: Path, config: dict, shapes: dict[str, tuple]) -> Path:
    """Two shards of zeros with the given names and shapes (a ``torch.dtype`` last in a shape sets it)."""
    tensors = {}
    for name, shape in shapes.items():
        dtype = shape[-1] if shape and isinstance(shape[-1], torch.dtype) else torch.bfloat16
        dims = shape[:-1] if shape and isinstance(shape[-1], torch.dtype) else shape
        tensors[name] = torch.zeros(dims, dtype=dtype)
    names = list(tensors)
    half = len(names) // 2
    return write_sharded(folder, [{n: tensors[n] for n in names[:half]}, {n: tensors[n] for n in names[half:]}],
                         config, metadata={"format": "pt"})


def plan_for(folder: Path, selection: Selection | None = None, targets: list[str] | None = None) -> PatchPlan:
    ckpt = open_checkpoint(folder)
    selection = selection or Selection()
    arch = custom_architecture(targets, ckpt.config) if targets else find_architecture(ckpt.config)
    return build_plan(ckpt, arch, selection)


def summary(plan: PatchPlan) -> dict[str, tuple]:
    return {t.name: (t.role, t.layer, t.axis, t.gain, t.gain_offset) for t in plan.targets()}


def llama_layer(p: str, bias: bool = False) -> dict[str, tuple]:
    shapes = {f"{p}.input_layernorm.weight": (H,), f"{p}.self_attn.q_proj.weight": (H, H),
              f"{p}.self_attn.o_proj.weight": (H, H), f"{p}.post_attention_layernorm.weight": (H,),
              f"{p}.mlp.up_proj.weight": (M, H), f"{p}.mlp.down_proj.weight": (H, M)}
    if bias:
        shapes[f"{p}.self_attn.o_proj.bias"] = (H,)
    return shapes


def test_every_model_type_has_exactly_one_architecture() -> None:
    types = [t for a in known_architectures() for t in a.model_types]
    assert len(types) == len(set(types))
    for wanted in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gemma3_text",
                   "olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gpt2", "gpt_neox"):
        assert wanted in types


def test_unknown_model_type_is_named(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, {"model_type": "falcon_mamba", "hidden_size": H}, {"x.weight": (H, H)})
    with pytest.raises(OrthopatchError, match=r"unknown model_type 'falcon_mamba'.*--targets"):
        plan_for(folder)


@pytest.mark.parametrize("prefix", ["model.language_model", "language_model.model"])
def test_gemma3_image_text_checkpoint_uses_the_language_model_and_its_gains(tmp_path: Path, prefix: str) -> None:
    shapes = {f"{prefix}.embed_tokens.weight": (V, H),
              "model.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight": (8, 8),
              "model.vision_tower.vision_model.embeddings.position_embedding.weight": (4, 8)}
    for n in range(2):
        p = f"{prefix}.layers.{n}"
        shapes |= llama_layer(p) | {f"{p}.post_feedforward_layernorm.weight": (H,),
                                    f"{p}.pre_feedforward_layernorm.weight": (H,)}
    config = {"model_type": "gemma3", "text_config": {"hidden_size": H, "num_hidden_layers": 2}}
    plan = plan_for(checkpoint(tmp_path, config, shapes))
    assert plan.hidden_size == H and plan.num_layers == 2 and plan.tied_embeddings
    assert summary(plan) == {f"{prefix}.embed_tokens.weight": ("embedding", None, 1, None, 0.0)} | {
        f"{prefix}.layers.{n}.{m}.weight": (role, n, 0, f"{prefix}.layers.{n}.{norm}.weight", 1.0)
        for n in range(2)
        for m, role, norm in (("self_attn.o_proj", "attention", "post_attention_layernorm"),
                              ("mlp.down_proj", "mlp", "post_feedforward_layernorm"))}


def test_olmo2_gains_have_no_offset(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H)} | llama_layer("model.layers.0") | {
        "model.layers.0.post_feedforward_layernorm.weight": (H,)}
    plan = plan_for(checkpoint(tmp_path, {"model_type": "olmo2", "hidden_size": H, "num_hidden_layers": 1}, shapes))
    gains = {t.name: (t.gain, t.gain_offset) for t in plan.targets() if t.gain}
    assert gains == {"model.layers.0.self_attn.o_proj.weight": ("model.layers.0.post_attention_layernorm.weight", 0.0),
                     "model.layers.0.mlp.down_proj.weight": ("model.layers.0.post_feedforward_layernorm.weight", 0.0)}


def test_fused_expert_orientations(tmp_path: Path) -> None:
    oss = {"model.embed_tokens.weight": (V, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
           "model.layers.0.self_attn.o_proj.bias": (H,), "model.layers.0.mlp.experts.down_proj": (E, M, H),
           "model.layers.0.mlp.experts.down_proj_bias": (E, H),
           "model.layers.0.mlp.experts.gate_up_proj": (E, H, 2 * M), "model.layers.0.mlp.router.weight": (E, H)}
    plan = plan_for(checkpoint(tmp_path / "oss", {"model_type": "gpt_oss", "hidden_size": H, "num_hidden_layers": 1},
                               oss))
    axes = {t.name: t.axis for t in plan.targets()}
    assert axes == {"model.embed_tokens.weight": 1, "model.layers.0.self_attn.o_proj.weight": 0,
                    "model.layers.0.self_attn.o_proj.bias": 0, "model.layers.0.mlp.experts.down_proj": 2,
                    "model.layers.0.mlp.experts.down_proj_bias": 1}
    mixtral = {"model.embed_tokens.weight": (V, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
               "model.layers.0.mlp.experts.down_proj": (E, H, M),
               "model.layers.0.mlp.experts.gate_up_proj": (E, 2 * M, H)}
    plan = plan_for(checkpoint(tmp_path / "mixtral", {"model_type": "mixtral", "hidden_size": H,
                                                      "num_hidden_layers": 1}, mixtral))
    assert {t.name: t.axis for t in plan.targets()}["model.layers.0.mlp.experts.down_proj"] == 1


def test_qwen_moe_per_expert_shared_and_dense_layers(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H)}
    for n in range(2):
        shapes[f"model.layers.{n}.self_attn.o_proj.weight"] = (H, H)
    shapes |= {f"model.layers.0.mlp.experts.{e}.down_proj.weight": (H, M) for e in range(E)}
    shapes |= {"model.layers.0.mlp.shared_expert.down_proj.weight": (H, M), "model.layers.0.mlp.gate.weight": (E, H),
               "model.layers.0.mlp.shared_expert_gate.weight": (1, H), "model.layers.1.mlp.down_proj.weight": (H, M)}
    plan = plan_for(checkpoint(tmp_path, {"model_type": "qwen2_moe", "hidden_size": H, "num_hidden_layers": 2},
                               shapes))
    mlp = sorted(t.name for t in plan.targets() if t.role == "mlp")
    assert mlp == sorted([f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(E)]
                         + ["model.layers.0.mlp.shared_expert.down_proj.weight", "model.layers.1.mlp.down_proj.weight"])
    assert "lm_head.weight" not in summary(plan)


def test_gpt2_conv1d_and_position_embeddings(tmp_path: Path) -> None:
    shapes = {"wte.weight": (V, H), "wpe.weight": (8, H), "h.0.attn.c_attn.weight": (H, 3 * H),
              "h.0.attn.c_proj.weight": (H, H), "h.0.attn.c_proj.bias": (H,), "h.0.mlp.c_fc.weight": (H, M),
              "h.0.mlp.c_proj.weight": (M, H), "h.0.mlp.c_proj.bias": (H,), "h.0.attn.bias": (1, 1, 8, 8)}
    plan = plan_for(checkpoint(tmp_path, {"model_type": "gpt2", "n_embd": H, "n_layer": 1}, shapes))
    assert {t.name: (t.role, t.axis) for t in plan.targets()} == {
        "wte.weight": ("embedding", 1), "wpe.weight": ("position_embedding", 1),
        "h.0.attn.c_proj.weight": ("attention", 1), "h.0.attn.c_proj.bias": ("attention", 0),
        "h.0.mlp.c_proj.weight": ("mlp", 1), "h.0.mlp.c_proj.bias": ("mlp", 0)}
    assert plan.tied_embeddings
    no_embeddings = plan_for(checkpoint(tmp_path / "again", {"model_type": "gpt2", "n_embd": H, "n_layer": 1}, shapes),
                             Selection(embeddings=False))
    assert not {"wte.weight", "wpe.weight"} & set(summary(no_embeddings))


def test_wrong_orientation_is_refused(tmp_path: Path) -> None:
    shapes = {"wte.weight": (V, H), "h.0.attn.c_proj.weight": (H, H), "h.0.mlp.c_proj.weight": (H, M)}
    with pytest.raises(OrthopatchError, match=r"h\.0\.mlp\.c_proj\.weight.*wrong orientation"):
        plan_for(checkpoint(tmp_path, {"model_type": "gpt2", "n_embd": H, "n_layer": 1}, shapes))


def test_experts_with_unknown_names_are_not_skipped_silently(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H), "model.layers.0.self_attn.o_proj.weight": (H, H)}
    shapes |= {f"model.layers.0.block_sparse_moe.experts.{e}.w_out.weight": (H, M) for e in range(E)}
    with pytest.raises(OrthopatchError, match=r"layer 0 has no mlp tensor the mixtral architecture knows"):
        plan_for(checkpoint(tmp_path, {"model_type": "mixtral", "hidden_size": H, "num_hidden_layers": 1}, shapes))


def test_missing_layers_are_refused(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H)} | llama_layer("model.layers.0")
    with pytest.raises(OrthopatchError, match=r"layer 1 has no attention or mlp tensor"):
        plan_for(checkpoint(tmp_path, {"model_type": "llama", "hidden_size": H, "num_hidden_layers": 2}, shapes))


def test_quantized_gpt_oss_experts_are_refused(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
              "model.layers.0.mlp.experts.down_proj_blocks": (E, H, 4, 16, torch.uint8),
              "model.layers.0.mlp.experts.down_proj_scales": (E, H, 4, torch.uint8),
              "model.layers.0.mlp.experts.down_proj_bias": (E, H)}
    with pytest.raises(OrthopatchError, match=r"down_proj_blocks.*MXFP4"):
        plan_for(checkpoint(tmp_path, {"model_type": "gpt_oss", "hidden_size": H, "num_hidden_layers": 1}, shapes))


def test_missing_norm_gain_is_refused(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H)} | llama_layer("model.layers.0")  # no post_feedforward_layernorm
    with pytest.raises(OrthopatchError, match=r"post_feedforward_layernorm.weight' is not in the checkpoint"):
        plan_for(checkpoint(tmp_path, {"model_type": "gemma2", "hidden_size": H, "num_hidden_layers": 1}, shapes))


def test_layer_selection(tmp_path: Path) -> None:
    shapes = {"model.embed_tokens.weight": (V, H)}
    for n in range(4):
        shapes |= llama_layer(f"model.layers.{n}", bias=True)
    folder = checkpoint(tmp_path, {"model_type": "mistral", "hidden_size": H, "num_hidden_layers": 4}, shapes)
    plan = plan_for(folder, Selection(frozenset({1, 3}), embeddings=False))
    assert {t.layer for t in plan.targets()} == {1, 3} and len(list(plan.targets())) == 6
    assert "patching layers 1,3, embeddings no" in format_plan(plan)
    with pytest.raises(OrthopatchError, match=r"selects layer 4, but the model has 4 layers"):
        plan_for(folder, Selection(frozenset({2, 4})))
    with pytest.raises(OrthopatchError, match=r"selects no layer"):
        plan_for(folder, Selection(frozenset()))


@pytest.mark.parametrize(("text", "layers", "canonical"), [
    ("10:14", {10, 11, 12, 13}, "10:14"), ("0:4,7,10:12", {0, 1, 2, 3, 7, 10, 11}, "0:4,7,10:12"),
    ("3", {3}, "3"), (" 2 , 1 ", {1, 2}, "1:3"), ("0:2,1:3", {0, 1, 2}, "0:3")])
def test_parse_layers(text: str, layers: set[int], canonical: str) -> None:
    assert parse_layers(text) == frozenset(layers)
    assert format_layers(parse_layers(text)) == canonical
    assert format_layers(None) == "all"


@pytest.mark.parametrize("text", ["", "1,", "4:4", "5:2", "-1", "1:-3", "a", "1:b", "1:2:3"])
def test_parse_layers_rejects(text: str) -> None:
    with pytest.raises(OrthopatchError, match="--layers"):
        parse_layers(text)


def test_custom_targets_roles_and_layers(tmp_path: Path) -> None:
    shapes = {"tok.weight": (V, H), "blocks.0.out.weight": (M, H), "blocks.1.out.weight": (M, H)}
    folder = checkpoint(tmp_path, {"model_type": "mystery", "d_model": H, "n_layer": 2}, shapes)
    specs = [r"tok\.weight:-1", r"blocks\.(?P<layer>\d+)\.out\.weight:-1"]
    plan = plan_for(folder, Selection(frozenset({1})), specs)
    assert summary(plan) == {"tok.weight": ("embedding", None, 1, None, 0.0),
                             "blocks.1.out.weight": ("other", 1, 1, None, 0.0)}
    with pytest.raises(OrthopatchError, match=r"--layers needs a \(\?P<layer>"):
        plan_for(folder, Selection(frozenset({1})), [r"blocks\.\d+\.out\.weight:-1"])
    with pytest.raises(OrthopatchError, match="leaves no tensor to patch"):
        plan_for(folder, Selection(embeddings=False), [r"tok\.weight:-1"])
    with pytest.raises(OrthopatchError, match="no tensor matches"):
        plan_for(folder, Selection(), [r"nothing:0"])
    with pytest.raises(OrthopatchError, match="axis 2 does not exist"):
        plan_for(folder, Selection(), [r"tok\.weight:2"])
    with pytest.raises(OrthopatchError, match="not a block index"):
        plan_for(folder, Selection(), [r"(?P<layer>blocks)\.\d+\.out\.weight:-1"])


def test_architecture_files_are_checked() -> None:
    good = {"pattern": r"(?P<prefix>.*\.layers\.(?P<layer>\d+))\.o\.weight", "axis": 0, "role": "attention"}
    architecture_from_dict("ok", {"model_types": ["x"], "targets": [good | {"gain": "{prefix}.norm.weight"}]})
    with pytest.raises(OrthopatchError, match=r"gain template .* uses \['block'\]"):
        architecture_from_dict("bad", {"model_types": ["x"], "targets": [good | {"gain": "{block}.norm.weight"}]})
    with pytest.raises(OrthopatchError, match=r"has no \(\?P<layer>"):
        architecture_from_dict("bad", {"model_types": ["x"], "targets": [good | {"pattern": r".*\.o\.weight"}]})
    with pytest.raises(OrthopatchError, match="unknown role"):
        architecture_from_dict("bad", {"model_types": ["x"], "targets": [good | {"role": "head"}]})

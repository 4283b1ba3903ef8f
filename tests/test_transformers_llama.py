"""transformers loads what orthopatch writes, and the residual stream loses the direction."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from orthopatch.cli import main

transformers = pytest.importorskip("transformers")


def pre_norm_hidden_states(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state before the final norm: the embedding output and each layer's output."""
    captured = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
    finally:
        handle.remove()
    return [*out.hidden_states[:-1], captured[0]]


def max_abs_cos(states: list[torch.Tensor], r: torch.Tensor) -> float:
    return max(torch.nn.functional.cosine_similarity(h.double(), r.double().expand_as(h), dim=-1).abs().max().item()
               for h in states)


def test_tiny_llama_loses_the_direction(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    src = tmp_path / "tiny-llama"
    model.to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 2

    r = torch.randn(64, dtype=torch.float64)
    r /= r.norm()
    torch.save(r.float(), tmp_path / "refusal_dir.pth")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(src), str(tmp_path / "refusal_dir.pth"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    patched = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    before = max_abs_cos(pre_norm_hidden_states(original, ids), r)
    after = max_abs_cos(pre_norm_hidden_states(patched, ids), r)
    assert before > 0.1
    assert after < 0.005

"""transformers loads what orthopatch writes, and the residual stream loses the direction."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cli_ok, far_from_defaults, max_abs_cos, pre_norm_states

transformers = pytest.importorskip("transformers")


def test_tiny_llama_loses_the_direction(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = far_from_defaults(transformers.LlamaForCausalLM(config))
    src = tmp_path / "tiny-llama"
    model.to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 2

    r = torch.randn(64, dtype=torch.float64)
    r /= r.norm()
    torch.save(r.float(), tmp_path / "refusal_dir.pth")
    out = tmp_path / "out"
    cli_ok("apply", src, tmp_path / "refusal_dir.pth", "-o", out, "-q")

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    patched = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    before = max_abs_cos(pre_norm_states(original, ids), r)
    after = max_abs_cos(pre_norm_states(patched, ids), r)
    assert before > 0.1
    assert after < 0.005

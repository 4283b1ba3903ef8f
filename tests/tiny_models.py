"""Tiny transformers models with a word-level tokenizer, saved as real model folders (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from orthopatch.synthetic import CHAT_TEMPLATE, EXTRA_WORDS, SPECIALS, vocabulary, words, write_tokenizer

__all__ = ["CHAT_TEMPLATE", "EXTRA_WORDS", "SPECIALS", "save_tiny_model", "save_tokenizer", "tiny_config",
           "vocabulary", "words"]

# The word-level tokenizer lives with the synthetic checkpoints; the tests' names for it.
save_tokenizer = write_tokenizer


def tiny_config(kind: str, vocab_size: int, **overrides):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=2, eos_token_id=3, pad_token_id=1)
    common.update(overrides)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "llama-tied":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=8,
                                               sliding_window=4, tie_word_embeddings=True,
                                               layer_types=["sliding_attention", "full_attention"] * 2)
    elif kind == "gemma3-mm":  # Gemma3ForConditionalGeneration: a vision tower with as many layers as the text
        text = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"] * 2)
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                                 num_attention_heads=2, image_size=32, patch_size=8)
        config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                           mm_tokens_per_image=4, boi_token_index=vocab_size,
                                           eoi_token_index=vocab_size + 1, image_token_index=vocab_size + 2,
                                           tie_word_embeddings=True)
    elif kind == "gpt2":  # tied, learned positions added in the base model, Conv1D, blocks named h
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                         bos_token_id=2, eos_token_id=3)
    elif kind == "gpt_neox":  # the head is stored as embed_out
        config = transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                            bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    # Saved as on the Hub, one matrix per expert; transformers fuses the experts while loading.
    elif kind == "mixtral":  # block_sparse_moe.experts.N.w1/w2/w3, renamed mlp while loading
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "qwen2_moe":  # routed experts, a gated shared expert, and a dense MLP in block 1
        config = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24, mlp_only_layers=[1],
                                             tie_word_embeddings=False)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             head_dim=8, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    return config


def save_tiny_model(folder: Path, kind: str = "llama", *, seed: int = 0, dtype=torch.float32,
                    shard_size: str = "40KB", tokenizer: bool = True, chat_template: bool = True, **overrides):
    """A random tiny model of family ``kind`` saved with ``save_pretrained`` (sharded) plus a tokenizer."""
    import transformers

    n_words = len(vocabulary())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind, n_words, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.3 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer:
        save_tokenizer(folder, chat_template)
    return model

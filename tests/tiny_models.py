"""Tiny transformers models with a word-level tokenizer, saved as real model folders (no downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from orthopatch.run.prompts import BUILTIN_SETS, builtin_prompts

CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>", "<user>", "<assistant>"]
EXTRA_WORDS = ["sure", "here", "is", "cannot", "sorry", "help", "with", "that"]


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def vocabulary() -> list[str]:
    """Special tokens, then every word of the built-in prompt sets, then a few reply words."""
    seen = dict.fromkeys(SPECIALS)
    for kind in BUILTIN_SETS:
        for prompt in builtin_prompts(kind).prompts:
            seen.update(dict.fromkeys(words(prompt)))
    seen.update(dict.fromkeys(EXTRA_WORDS))
    return list(seen)


def save_tokenizer(folder: Path, chat_template: bool = True) -> list[str]:
    """A word-level tokenizer over :func:`vocabulary` with a small chat template; returns the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return vocab


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

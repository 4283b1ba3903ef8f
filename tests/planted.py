"""A tiny Llama with a refusal behaviour planted along a known direction ``r``.

Residual basis before a random rotation ``Q``: ``e0`` carries "harmful", ``e1`` is a constant every
token has, the other dimensions identify tokens. Words found only in the built-in harmful sets have
an ``e0`` component in their embedding. Block 0's attention has zero queries and keys, so it
averages its inputs over the prefix; its value reads ``e0`` and its output writes ``e0``: at the
last prompt token the residual holds the share of harmful words along ``e0``. The output head
scores ``cannot`` by ``e0`` and ``sure`` by ``e1``: harmful prompts start their reply with
``cannot``, harmless ones with ``sure``. Blocks 1 and 2 read and write only the token dimensions.
Every matrix is rotated by ``Q`` (RMSNorm with unit gains commutes with rotations), so ``r = Q e0``
is not an axis.
"""

from __future__ import annotations

from pathlib import Path

import torch

from orthopatch.run.prompts import builtin_prompts
from tests.tiny_models import save_tokenizer, words

HIDDEN = 16
LAYERS = 3


def harmful_words() -> set[str]:
    harmful = {w for k in ("harmful", "harmful_eval") for p in builtin_prompts(k).prompts for w in words(p)}
    harmless = {w for k in ("harmless", "harmless_eval") for p in builtin_prompts(k).prompts for w in words(p)}
    return harmful - harmless


def save_planted_model(folder: Path, seed: int = 0, massive: float = 0.0) -> torch.Tensor:
    """Write the model and its tokenizer to ``folder``; return the planted unit direction ``r``.

    ``massive`` > 0 also has block 0 copy the prefix's mean of the constant dimension ``e1`` back
    into it with that gain: a huge-activation channel like those of real models, whose mean differs
    a little between the sets (a harmful word's larger norm shrinks its normalised ``e1``).
    """
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=16,
                                      num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=1,
                                      tie_word_embeddings=False)
    g = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    flagged = harmful_words()
    tokens = 2 + torch.arange(HIDDEN - 2)  # the token-identity dimensions

    embed = torch.zeros(len(vocab), HIDDEN)
    embed[:, 1] = 1.0
    embed[:, 2:] = torch.randn(len(vocab), HIDDEN - 2, generator=g)
    embed[:, 0] = torch.tensor([4.0 if w in flagged else 0.0 for w in vocab])
    head = torch.zeros(len(vocab), HIDDEN)
    head[vocab.index("cannot"), 0] = 48.0
    head[vocab.index("sure"), 1] = 12.0

    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"{p}.self_attn.{name}.weight"] = torch.zeros(HIDDEN, HIDDEN)
        for name, shape in (("gate_proj", (16, HIDDEN)), ("up_proj", (16, HIDDEN)), ("down_proj", (HIDDEN, 16))):
            weights[f"{p}.mlp.{name}.weight"] = torch.zeros(shape)
        if layer == 0:
            weights[f"{p}.self_attn.v_proj.weight"][0, 0] = 1.0
            weights[f"{p}.self_attn.o_proj.weight"][0, 0] = 10.0
            if massive:
                weights[f"{p}.self_attn.v_proj.weight"][1, 1] = 1.0
                weights[f"{p}.self_attn.o_proj.weight"][1, 1] = massive
        else:  # token dimensions only: some computation that has nothing to do with e0 or e1
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = weights[f"{p}.self_attn.{name}.weight"]
                w[tokens.unsqueeze(1), tokens] = 0.1 * torch.randn(HIDDEN - 2, HIDDEN - 2, generator=g)
            weights[f"{p}.mlp.gate_proj.weight"][:, 2:] = 0.1 * torch.randn(16, HIDDEN - 2, generator=g)
            weights[f"{p}.mlp.up_proj.weight"][:, 2:] = 0.1 * torch.randn(16, HIDDEN - 2, generator=g)
            weights[f"{p}.mlp.down_proj.weight"][2:, :] = 0.1 * torch.randn(HIDDEN - 2, 16, generator=g)

    q, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64))
    q = q.float()
    readers = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            w = weights[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight") or any(r in name for r in readers):
                w = w @ q.T  # reads the residual: x -> W Qᵀ (Q x)
            else:
                w = q @ w  # writes the residual
            param.copy_(w)
    model.save_pretrained(folder, max_shard_size="20KB")
    return q[:, 0].double()

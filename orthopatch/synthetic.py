"""Synthetic Llama-shaped checkpoints, written tensor by tensor (for the demo and the benchmark).

The tensors are random but the files are real: sharded safetensors with an index, a
``config.json`` that transformers reads, and a direction file with a known direction. A word-level
tokenizer over the built-in prompts' words, with a small chat template, is built locally for the
commands that tokenize prompts (its ids fit any vocabulary of a few thousand tokens or more).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from orthopatch.io.formats import CONFIG_NAME, INDEX_NAME, PT_METADATA, dtype_name
from orthopatch.run.prompts import BUILTIN_SETS, builtin_prompts


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False  # the output head is the embedding (no ``lm_head.weight``)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order Hugging Face Llama checkpoints list them."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,))]
        return out if self.tied else [*out, ("lm_head.weight", (self.vocab, h))]

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "hidden_act": "silu", "tie_word_embeddings": self.tied, "torch_dtype": "bfloat16",
        }


DEMO = LlamaShape(hidden=256, intermediate=688, vocab=4096, layers=4, heads=8, kv_heads=4)
LLAMA3_8B = LlamaShape(hidden=4096, intermediate=14336, vocab=128256, layers=32, heads=32, kv_heads=8)
LLAMA3_70B = LlamaShape(hidden=8192, intermediate=28672, vocab=128256, layers=80, heads=64, kv_heads=8)
#: SmolLM-135M's shapes (a Llama with tied embeddings): about 135M parameters.
SMOLLM_135M = LlamaShape(hidden=576, intermediate=1536, vocab=49152, layers=30, heads=9, kv_heads=3, tied=True)


#: Values in the pool every tensor's data is cut from: 8 MiB of bf16.
POOL_ELEMENTS = 1 << 22


class _ValuePool:
    """Random values generated once and cut at random offsets: tensors are written at disk speed.

    Every tensor is a sequence of slices of one random pool (scaled like an initialized layer), so
    values are finite, varied and reproducible from the seed, while nothing large is generated.
    """

    def __init__(self, gen: torch.Generator, dtype: torch.dtype):
        self.gen = gen
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.base = torch.randn(POOL_ELEMENTS, generator=gen)
        self._scaled: dict[tuple[int, bool], tuple[torch.Tensor, memoryview]] = {}

    def _bytes(self, width: int, norm: bool) -> memoryview:
        key = (width, norm)
        if key not in self._scaled:
            values = 1.0 + 0.1 * self.base if norm else self.base * (width ** -0.5)
            stored = values.to(self.dtype)
            doubled = torch.cat([stored, stored]).view(torch.uint8)  # any slice of a pool's length fits
            self._scaled[key] = (doubled, memoryview(doubled.numpy()))
        return self._scaled[key][1]

    def write(self, f, shape: tuple[int, ...], norm: bool) -> None:
        width = shape[-1] if len(shape) > 1 else max(shape[0] if shape else 1, 1)
        data = self._bytes(width, norm)
        remaining = torch.Size(shape).numel()
        while remaining:
            n = min(remaining, POOL_ELEMENTS)
            start = int(torch.randint(POOL_ELEMENTS, (1,), generator=self.gen))
            f.write(data[start * self.itemsize:(start + n) * self.itemsize])
            remaining -= n


#: Tensor orders within a shard: the model's module order, or the order ``save_pretrained`` writes.
ORDERS = ("module", "save_pretrained")


def write_checkpoint(folder: Path, shape: LlamaShape, *, shard_bytes: int = 2 << 30,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, order: str = "module") -> Path:
    """Write a sharded checkpoint of ``shape`` into ``folder`` (created), streaming, at the disk's speed.

    Tensors are split into shards in module order, a new shard starting when the next tensor would
    pass ``shard_bytes``, as transformers' ``save_pretrained`` splits them. With
    ``order="save_pretrained"`` each shard's data is then laid out as the safetensors library writes
    it, sorted by name (``layers.10`` before ``layers.2``): what published checkpoints hold, where the
    unchanged runs between patched tensors start at arbitrary offsets.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = _ValuePool(gen, dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, tshape in shape.tensors():
        nbytes = itemsize * torch.Size(tshape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tshape))
        size += nbytes
    if order == "save_pretrained":
        shards = [sorted(members) for members in shards]
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": dict(PT_METADATA)}, 0
        for name, tshape in members:
            nbytes = itemsize * torch.Size(tshape).numel()
            header[name] = {"dtype": dtype_name(dtype), "shape": list(tshape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name, tshape in members:
                pool.write(f, tshape, norm=name.endswith("norm.weight"))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    (folder / CONFIG_NAME).write_text(json.dumps(shape.config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def write_direction(path: Path, hidden: int, seed: int = 1) -> torch.Tensor:
    """A random unit direction saved as a ``.pth`` of shape ``[hidden]`` (bf16, like published files)."""
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = r / r.norm()
    torch.save(r.to(torch.bfloat16), path)
    return r


# -- a tokenizer ------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>", "<user>", "<assistant>"]
EXTRA_WORDS = ["sure", "here", "is", "cannot", "sorry", "help", "with", "that"]


def words(text: str) -> list[str]:
    """The word-level tokenizer's pieces of ``text``: lower-cased words and punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def vocabulary() -> list[str]:
    """Special tokens, then every word of the built-in prompt sets, then a few reply words."""
    seen = dict.fromkeys(SPECIALS)
    for kind in BUILTIN_SETS:
        for prompt in builtin_prompts(kind).prompts:
            seen.update(dict.fromkeys(words(prompt)))
    seen.update(dict.fromkeys(EXTRA_WORDS))
    return list(seen)


def write_tokenizer(folder: Path, chat_template: bool = True) -> list[str]:
    """Save a word-level tokenizer over :func:`vocabulary` (ids ``0..len - 1``) with a small chat
    template into ``folder``, as transformers saves one; returns the vocabulary."""
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

"""Checks of a model folder made before transformers builds anything from it.

transformers builds every layer ``config.json`` asks for before any weight is compared with it: a
config that says 10⁹ layers runs for minutes and takes gigabytes, and one that says 3 layers for a
checkpoint of 4 blocks is run silently on a truncated model. So every size the config gives is
compared first with the checkpoint's own tensors, read from the shard headers (no tensor data):
layers (the highest block index + 1), hidden and vocabulary sizes (the embedding's shape), the MLP's
width, attention heads × head size (the query projection's rows), key-value heads, experts.
A size that has no tensor to compare with (a family that names its tensors otherwise) is left to
transformers' own checks when the weights are read.

A folder that an interrupted ``apply`` left half written (the in-place journal, or the marker of an
unfinished output) is refused too: figures measured on it would be those of a half-patched model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import Checkpoint, open_checkpoint
from orthopatch.io.formats import CONFIG_NAME, INPLACE_JOURNAL_DIR, INPLACE_STATE_NAME, PARTIAL_NAME
from orthopatch.io.smallfile import check_small_file, is_json_int

#: Names the token embedding has (after a prefix such as ``model.``), most families first.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                      "tok_embeddings.weight")
#: Parts of a tensor name that belong to a tower other than the text decoder.
OTHER_TOWERS = ("vision", "visual", "audio", "image", "speech", "mtp")
_BLOCK = re.compile(r"(?:(?P<prefix>.*)\.)?(?:layers|h)\.(?P<index>\d+)\.(?P<rest>.+)")
#: Where each size lives in the config (the first key present), and the tensors that show it.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_HEAD_KEYS = ("num_attention_heads", "n_head")
_DENSE_MLP = re.compile(r"mlp\.(?:gate_proj|up_proj|dense_h_to_4h)\.weight"
                        r"|block_sparse_moe\.experts\.\d+\.w[13]\.weight")
_EXPERT_MLP = re.compile(r"mlp\.experts\.\d+\.(?:gate_proj|up_proj)\.weight")
_EXPERT = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.")
_FUSED_EXPERTS = re.compile(r"mlp\.experts\.gate_up_proj")
_QUERY = re.compile(r"self_attn\.q_proj\.weight")
_KEY = re.compile(r"self_attn\.k_proj\.weight")
Refuse = Callable[[str, int, str], OrthopatchError]


def check_not_half_patched(root: Path) -> None:
    """Refuse a folder whose in-place conversion is unfinished, or an interrupted run's half-written output."""
    if os.path.lexists(root / INPLACE_JOURNAL_DIR / INPLACE_STATE_NAME):
        raise OrthopatchError("an in-place conversion of this folder is unfinished, so some tensors may be half "
                              "patched (rerun that apply --in-place command to finish it)", path=root)
    if os.path.lexists(root / PARTIAL_NAME):
        raise OrthopatchError(f"holds {PARTIAL_NAME}, the marker of an interrupted orthopatch run: it is a "
                              "half-written output, not a model (rerun the command that was writing it to "
                              "finish it)", path=root)


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of ``keys`` that ``config`` gives as an integer, and its value."""
    for key in keys:
        if key in config:
            value = config[key]
            return (key, value) if is_json_int(value) else None
    return None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's part of a config (a multimodal model's ``text_config``), else the config."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and any(k in inner for k in _LAYER_KEYS) else config


def _decoder_prefix(checkpoint: Checkpoint) -> tuple[str | None, str | None]:
    """The token embedding's tensor name and the text decoder's name prefix (``model.``, ``transformer.``)."""
    for suffix in EMBEDDING_SUFFIXES:
        for name in sorted(checkpoint.weight_map):
            if (name == suffix or name.endswith("." + suffix)) and not _other_tower(name) \
                    and len(checkpoint.entry(name).shape) == 2:
                return name, name[: -len(suffix)]
    return None, None


def _other_tower(name: str) -> bool:
    return any(part.startswith(OTHER_TOWERS) for part in name.lower().split("."))


def _blocks(checkpoint: Checkpoint, prefix: str | None) -> dict[int, dict[str, str]]:
    """Block index -> {name inside the block: full tensor name}, for the text decoder's blocks."""
    blocks: dict[int, dict[str, str]] = {}
    for name in checkpoint.weight_map:
        match = _BLOCK.fullmatch(name)
        if match is None or _other_tower(name):
            continue
        own = (match["prefix"] or "") + "."
        if prefix is not None and own != (prefix or "."):
            continue
        blocks.setdefault(int(match["index"]), {})[match["rest"]] = name
    return blocks


def check_config_sizes(checkpoint: Checkpoint) -> None:
    """Every size ``config.json`` gives agrees with the checkpoint's tensors; a one-line error naming
    both numbers otherwise."""
    path = checkpoint.root / CONFIG_NAME
    config = text_config(checkpoint.config)

    def refuse(key: str, value: int, actual: str) -> OrthopatchError:
        return OrthopatchError(f"{CONFIG_NAME} says {key} {value} but {actual}", path=path)

    embedding, prefix = _decoder_prefix(checkpoint)
    blocks = _blocks(checkpoint, prefix)
    if (layers := _first(config, _LAYER_KEYS)) is not None:
        key, value = layers
        extra = config.get("num_nextn_predict_layers")  # DeepSeek's multi-token prediction blocks follow
        allowed = {value, value + extra} if is_json_int(extra, 0) else {value}
        count = max(blocks) + 1 if blocks else 0
        if blocks and count not in allowed:
            raise refuse(key, value, f"the checkpoint has blocks 0..{count - 1}")
        if not blocks and value > len(checkpoint.weight_map):
            raise refuse(key, value, f"the checkpoint has only {len(checkpoint.weight_map)} tensors")
    hidden = _first(config, _HIDDEN_KEYS)
    if embedding is not None:
        rows, cols = checkpoint.entry(embedding).shape
        if hidden is not None and hidden[1] != cols:
            raise refuse(*hidden, f"the checkpoint's embedding {embedding} is {rows} x {cols}")
        if (vocab := _first(config, ("vocab_size",))) is not None and vocab[1] != rows:
            raise refuse(*vocab, f"the checkpoint's embedding {embedding} is {rows} x {cols}")
    inside = [blocks[i] for i in sorted(blocks)]
    _check_rows(checkpoint, inside, config, ("intermediate_size",), _DENSE_MLP, refuse)
    _check_rows(checkpoint, inside, config, ("moe_intermediate_size",), _EXPERT_MLP, refuse)
    heads = _first(config, _HEAD_KEYS)
    if heads is not None and heads[1] > 0 and "kv_lora_rank" not in config:  # latent attention: other widths
        head_dim = config.get("head_dim")
        if not is_json_int(head_dim, 1):
            head_dim = hidden[1] // heads[1] if hidden is not None else None
        if head_dim:
            gated = 2 if config.get("attn_output_gate") is True else 1
            _check_rows(checkpoint, inside, config, _HEAD_KEYS, _QUERY, refuse, head_dim * gated,
                        f"x head_dim {head_dim * gated}, ")
            _check_rows(checkpoint, inside, config, ("num_key_value_heads",), _KEY, refuse, head_dim,
                        f"x head_dim {head_dim}, ")
    _check_experts(checkpoint, inside, config, refuse)


def _check_rows(checkpoint: Checkpoint, blocks: list[dict[str, str]], config: dict[str, Any], keys: tuple[str, ...],
                pattern: re.Pattern[str], refuse: Refuse, factor: int = 1, how: str = "") -> None:
    """The first tensor matching ``pattern`` in a block has ``config[key] * factor`` rows."""
    found = _first(config, keys)
    if found is None:
        return
    for block in blocks:
        for rest, name in sorted(block.items()):
            if pattern.fullmatch(rest):
                rows = checkpoint.entry(name).shape[0] if checkpoint.entry(name).shape else None
                if rows is not None and found[1] * factor != rows:
                    raise refuse(*found, f"{how}the checkpoint's {name} has {rows} rows")
                return


def _check_experts(checkpoint: Checkpoint, blocks: list[dict[str, str]], config: dict[str, Any],
                   refuse: Refuse) -> None:
    """``num_local_experts`` / ``num_experts``: one more than the highest expert index in any block, or the
    first dimension of experts already stacked into one tensor."""
    found = _first(config, ("num_local_experts", "num_experts", "n_routed_experts"))
    if found is None:
        return
    highest = -1
    for block in blocks:
        for rest, name in block.items():
            if match := _EXPERT.match(rest):
                highest = max(highest, int(match["expert"]))
            elif _FUSED_EXPERTS.match(rest) and len(shape := checkpoint.entry(name).shape) == 3:
                highest = max(highest, shape[0] - 1)
    if highest >= 0 and highest + 1 != found[1]:
        raise refuse(*found, f"the checkpoint has experts 0..{highest}")


def open_for_run(root: Path) -> Checkpoint:
    """The checkpoint of a model folder about to be run, every check above passed."""
    check_not_half_patched(root)
    check_small_file(root / CONFIG_NAME, "model config")
    checkpoint = open_checkpoint(root)
    check_config_sizes(checkpoint)
    return checkpoint

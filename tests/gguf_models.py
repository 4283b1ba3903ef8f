"""Tiny GGUF models for the tests, written with gguf-py (llama.cpp's own writer), in any tensor type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from tests.llama_ref import library_path, reference_quantize

Q = gguf.GGMLQuantizationType
HIDDEN, FF, LAYERS, VOCAB, HEADS = 256, 512, 2, 300, 4
#: Types gguf-py quantizes itself; the k-quants come from llama.cpp's quantizer when it is installed.
GGUF_PY_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """``x`` (float32 ``[rows, ne0]``) in ``qtype``, by gguf-py or llama.cpp: never by orthopatch's code."""
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype in GGUF_PY_TYPES:
        return gguf.quants.quantize(x, qtype)
    return reference_quantize(x, qtype)


def can_encode(qtype: Q) -> bool:
    return qtype in GGUF_PY_TYPES or library_path() is not None


def write_gguf(path: Path, qtype: Q, *, arch: str = "llama", split_max_tensors: int = 0,
               odd: dict[str, Q] | None = None, seed: int = 0, vocab: int = VOCAB, layers: int = LAYERS) -> Path:
    """A llama-shaped model: every matrix in ``qtype`` (``odd`` overrides by name), norms in F32 and equal to 1
    (so that llama.cpp's final-norm output is the residual stream divided by its RMS)."""
    VOCAB, LAYERS = vocab, layers  # noqa: N806 - the shapes below read them
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(seed)
    odd = odd or {}

    def add(name: str, shape: tuple[int, ...], scale: float = 0.05) -> None:
        if len(shape) == 1:
            writer.add_tensor(name, np.ones(shape, np.float32))
            return
        q = odd.get(name, qtype)
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if q in (Q.F32, Q.F16):
            writer.add_tensor(name, encode(x, q))
        elif q == Q.BF16 or q in gguf.GGML_QUANT_SIZES and can_encode(q):
            raw = encode(x.reshape(-1, shape[-1]), q)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
        else:  # a type nothing here writes: zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[q]
            raw = np.zeros((shape[0], shape[1] // block * size), np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)

    add("token_embd.weight", (VOCAB, HIDDEN), 1.0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (HIDDEN,))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(p + n + ".weight", (HIDDEN, HIDDEN))
        if arch in ("gemma2", "gemma3"):
            add(p + "post_attention_norm.weight", (HIDDEN,))
            add(p + "post_ffw_norm.weight", (HIDDEN,))
        add(p + "ffn_norm.weight", (HIDDEN,))
        add(p + "ffn_gate.weight", (FF, HIDDEN))
        add(p + "ffn_up.weight", (FF, HIDDEN))
        add(p + "ffn_down.weight", (HIDDEN, FF))
    add("output_norm.weight", (HIDDEN,))
    add("output.weight", (VOCAB, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_cosines(paths: list[Path], tokens: list[int], u: np.ndarray, head: np.ndarray) -> dict[Path, np.ndarray]:
    """|cos| of the residual stream with ``u`` at each token, as llama.cpp runs each file.

    With the final norm's gain 1 the logits are ``head · h/rms(h)``, so ``h``'s direction comes back from them
    by least squares (``head`` is the unpatched output matrix, ``[vocab, hidden]``)."""
    import llama_cpp

    cos = {}
    for path in paths:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=32, n_threads=1, verbose=False)
        llm.eval(tokens)
        logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)
        del llm
        assert np.isfinite(logits).all(), path
        h = np.linalg.lstsq(head, logits.T, rcond=None)[0].T
        cos[path] = np.abs(h @ u) / np.linalg.norm(h, axis=1)
    return cos


def transformers_cosines(paths: list[Path], ids: torch.Tensor, u: np.ndarray) -> dict[Path, torch.Tensor]:
    """|cos| with ``u`` of every hidden state before the final norm, as transformers' GGUF loader runs each file."""
    import transformers

    from tests.helpers import pre_norm_states

    cos = {}
    for path in paths:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        states = torch.stack(pre_norm_states(model, ids)).double()
        assert torch.isfinite(states).all(), path
        cos[path] = (states @ torch.from_numpy(u)).abs() / states.norm(dim=-1)
    return cos


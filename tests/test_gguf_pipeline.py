"""``orthopatch apply`` on GGUF files made the way a llama.cpp user's are: a transformers ``save_pretrained``
folder converted by llama.cpp's own ``convert_hf_to_gguf.py`` to F16, then quantized by llama.cpp's quantizer
to a mixed ``Q4_K_M`` file and to ``Q8_0``. The outputs are checked with gguf-py, llama.cpp's quantizer,
llama.cpp itself and transformers' GGUF loader, never with orthopatch's own code.

The converter comes from llama-cpp-python's source package (``make llama-cpp-converter`` extracts it into
``.cache/llama-cpp/``), or from ``$ORTHOPATCH_CONVERT_HF_TO_GGUF``; without it the module is skipped.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tests.gguf_models import HIDDEN, encode, llama_cpp_cosines, transformers_cosines
from tests.helpers import cli, cli_ok
from tests.test_gguf_apply import dequantized, direction, projected, tensors

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_VARIABLE = "ORTHOPATCH_CONVERT_HF_TO_GGUF"
CONVERTER_DEFAULT = ROOT / ".cache" / "llama-cpp" / "llama.cpp" / "convert_hf_to_gguf.py"
PROMPTS = ROOT / "orthopatch" / "run" / "prompts"

Q = gguf.GGMLQuantizationType
LAYERS, VOCAB = 2, 320
WRITERS = ["token_embd.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_output", "ffn_down")]
#: The converter's F16 output and the two files llama.cpp's quantizer makes of it.
FILES = ["F16", "Q8_0", "Q4_K_M"]


def converter_script() -> Path:
    """``convert_hf_to_gguf.py``: from the environment variable, else the Makefile's extraction; or a skip."""
    path = Path(os.environ.get(CONVERTER_VARIABLE) or CONVERTER_DEFAULT)
    if not path.is_file():
        pytest.skip(f"llama.cpp's converter is not at {path}: run `make llama-cpp-converter` (downloads "
                    f"llama-cpp-python's source package once) or set {CONVERTER_VARIABLE}")
    return path


def save_tiny_llama(folder: Path) -> Path:
    """A random two-layer Llama (hidden 256, so k-quants apply) saved by transformers, with the SentencePiece
    ``tokenizer.model`` that the converter's Llama path reads, trained on the project's prompt files."""
    spm = pytest.importorskip("sentencepiece", reason="the converter reads Llama tokenizers with sentencepiece")
    transformers = pytest.importorskip("transformers")
    lines = [line for f in sorted(PROMPTS.glob("*.txt")) for line in f.read_text().splitlines() if line.strip()]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model_file, vocab_size=VOCAB,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                                   minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    # transformers initializes RMSNorm gains to 1: the llama.cpp check below needs the final one to be 1
    assert all(bool((p == 1).all()) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    model.save_pretrained(folder)
    return folder


def quantize(src: Path, out: Path, ftype: int) -> Path:
    """``out``: llama.cpp's quantizer (what ``llama-quantize`` runs) applied to ``src``, one thread."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama.cpp quantizer")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"F16" | "Q8_0" | "Q4_K_M": file}``, every file from llama.cpp's own tools."""
    script = converter_script()
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama.cpp quantizer")
    root = tmp_path_factory.mktemp("pipeline")
    folder = save_tiny_llama(root / "hf")
    f16 = root / "m-F16.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the gguf-py next to the script
    result = subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f16", "--outfile", str(f16)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"F16": f16,
            "Q8_0": quantize(f16, root / "m-Q8_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
            "Q4_K_M": quantize(f16, root / "m-Q4_K_M.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)}


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The direction file and its float64 unit vector."""
    return direction(tmp_path_factory.mktemp("direction") / "refusal_dir.pth")


@pytest.fixture(scope="module", params=FILES)
def patched(request: pytest.FixtureRequest, sources: dict[str, Path],
            unit: tuple[Path, np.ndarray]) -> tuple[Path, Path, np.ndarray, str]:
    """``(source, output, u, file kind)``: ``orthopatch apply`` run on one of the pipeline's files."""
    src = sources[request.param]
    out = src.with_name(f"{src.stem}-abliterated.gguf")
    cli_ok("apply", src, unit[0], "-o", out, "-q")
    return src, out, unit[1], request.param


def test_the_pipeline_makes_a_llama_file_and_a_mixed_q4_k_m(sources: dict[str, Path]) -> None:
    """What the later checks rest on: the converter wrote a Llama with its SentencePiece vocabulary and
    norm gains of 1, and Q4_K_M mixes k-quant types among the tensors orthopatch patches."""
    reader = gguf.GGUFReader(sources["F16"])
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    ts = tensors(sources["F16"])
    assert all((dequantized(t) == 1).all() for n, t in ts.items() if n.endswith("norm.weight"))
    assert {ts[n].tensor_type for n in WRITERS} == {Q.F16}
    assert {tensors(sources["Q8_0"])[n].tensor_type for n in WRITERS} == {Q.Q8_0}
    mixed = {n: tensors(sources["Q4_K_M"])[n].tensor_type for n in WRITERS}
    # llama.cpp 0.3.36 gives ffn_down of the last layer Q6_K ("use_more_bits"), the rest Q4_K
    assert {Q.Q4_K, Q.Q6_K} <= set(mixed.values()), {n: q.name for n, q in mixed.items()}


def test_only_the_writers_change_and_the_metadata_is_kept(patched) -> None:
    src, out, _, _ = patched
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)

    def values(reader: gguf.GGUFReader) -> dict[str, bytes]:
        return {k: b"".join(f.parts[i].tobytes() for i in f.data) for k, f in reader.fields.items()
                if not k.startswith("orthopatch.") and k != "GGUF.kv_count"}

    assert values(b) == values(a)
    assert {k for k in b.fields if k.startswith("orthopatch.")} >= {"orthopatch.record"}
    assert b.fields["GGUF.kv_count"].parts[0][0] == a.fields["GGUF.kv_count"].parts[0][0] + 2
    record = json.loads(bytes(b.fields["orthopatch.record"].parts[-1]).decode())
    assert record["architecture"] == "llama" and {t["name"] for t in record["tensors_patched"]} == set(WRITERS)
    ta, tb = tensors(src), tensors(out)
    assert list(ta) == list(tb)
    for name in ta:
        assert (ta[name].tensor_type, list(ta[name].shape)) == (tb[name].tensor_type, list(tb[name].shape)), name
        same = np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8))
        assert same == (name not in WRITERS), name


def test_patched_tensors_are_the_requantized_projection(patched) -> None:
    """Each patched tensor, in its own type (Q4_K or Q6_K in Q4_K_M), is what llama.cpp's quantizer or
    gguf-py writes for the float64 projection of the dequantized source, on at least 99.9% of blocks."""
    src, out, u, _ = patched
    ta, tb = tensors(src), tensors(out)
    for name in WRITERS:
        qtype = ta[name].tensor_type
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        exact = projected(dequantized(ta[name]), u, name)
        expected = np.ascontiguousarray(encode(exact.astype(np.float32), qtype)).view(np.uint8)
        got = np.asarray(tb[name].data).view(np.uint8).reshape(-1, block_bytes)
        same = (expected.reshape(-1, block_bytes) == got).all(axis=1).mean()
        assert same >= 0.999, f"{name} ({qtype.name}): {same:.4%} of blocks as the reference quantizer writes them"


def test_verify_against_the_source_passes(patched) -> None:
    src, out, _, _ = patched
    result = cli("verify", out, "--source", src, "-q")
    assert result.exit_code == 0, result.output


def test_llama_cpp_runs_the_result_and_the_residual_loses_the_direction(patched) -> None:
    """llama.cpp evaluates source and result; with the final norm's gain 1 (checked above), the logits are
    ``head · h/rms(h)``, so the residual stream's direction comes back from them by least squares."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, out, u, kind = patched
    head = dequantized(tensors(out)["output.weight"])  # [vocab, hidden], not patched
    cos = llama_cpp_cosines([src, out], [1, 17, 42, 99, 123, 7, 250, 301], u, head)
    assert cos[src].max() > 0.02, cos[src]
    if kind == "F16":
        assert cos[out].max() < 0.01, cos[out]
    assert cos[out].mean() < cos[src].mean(), (cos[out], cos[src])


def test_transformers_loads_the_result_and_its_residual_stream_loses_the_direction(patched) -> None:
    """transformers' GGUF loader (it dequantizes with gguf-py) runs both files: every hidden state before the
    final norm loses its component along the direction, to noise for F16 and Q8_0."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    src, out, u, kind = patched
    cos = transformers_cosines([src, out], torch.tensor([[1, 17, 42, 99, 123, 7, 250, 301]]), u)
    assert cos[src].max() > 0.02, cos[src].max()
    if kind in ("F16", "Q8_0"):
        assert cos[out].max() < 0.1 * cos[src].max(), (cos[out].max(), cos[src].max())
    assert cos[out].mean() < cos[src].mean(), (cos[out].mean(), cos[src].mean())


def greedy(llama_cpp, path: Path, prompt: str, steps: int = 8) -> tuple[list[int], str]:
    """llama.cpp's greedy continuation of ``prompt``: the token ids and their text."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        reply: list[int] = []
        llm.eval(ids)
        for _ in range(steps):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            assert np.isfinite(logits).all()
            reply.append(int(np.argmax(logits)))
            llm.eval(reply[-1:])
        return reply, llm.detokenize(reply).decode("utf-8", errors="replace")
    finally:
        llm.close()


def test_greedy_replies_run_on_source_and_result(patched) -> None:
    """Greedy replies to a few harmless prompts from both files. The model is random, so "sensible" can only
    mean that llama.cpp runs them, every step's logits are finite and the reply is tokens that decode to text."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, out, _, _ = patched
    prompts = (PROMPTS / "harmless.txt").read_text().splitlines()[:3]
    for prompt in prompts:
        for path in (src, out):
            reply, text = greedy(llama_cpp, path, prompt)
            assert len(reply) == 8 and all(0 <= t < VOCAB for t in reply)
            assert isinstance(text, str)

"""The exact bytes of a few small, fixed conversions, pinned as sha256 digests.

Every other test compares the output with a reference within a rounding rule; these compare it with
the bytes the project wrote when the digests were recorded, so that a change to the arithmetic (the
order of a sum, a block size, a cast) cannot pass unnoticed. A digest that changes on purpose must be
recorded again, with the reason in the commit.

The inputs are reproducible on any machine and any version of torch or numpy: every value comes from
a counter-based integer hash (splitmix64, written out below), turned into a float32 exactly (a
24-bit integer times a power of two), and rounded to bfloat16 by integer arithmetic (to nearest,
ties to even). No random number generator is involved, and the direction is written as ``.npy`` (a
fixed byte layout), not with ``torch.save``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import cli_ok, write_sharded

HIDDEN, INTER, VOCAB, LAYERS, KV = 64, 96, 128, 2, 32
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "intermediate_size": INTER, "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "num_attention_heads": 4,
          "num_key_value_heads": 2, "tie_word_embeddings": False}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
MASK64 = (1 << 64) - 1


def splitmix64(seed: int, count: int) -> np.ndarray:
    """``count`` 64-bit outputs of splitmix64 from ``seed``: the same numbers everywhere."""
    with np.errstate(over="ignore"):
        x = np.uint64(seed & MASK64) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def values(seed: int, shape: tuple[int, ...], scale_log2: int = -3) -> np.ndarray:
    """float32 values in [-2**scale_log2, 2**scale_log2), each an exact multiple of 2**(scale_log2 - 23)."""
    count = int(np.prod(shape))
    top24 = (splitmix64(seed, count) >> np.uint64(40)).astype(np.int64) - (1 << 23)  # in [-2**23, 2**23)
    return np.ldexp(top24.astype(np.float32), scale_log2 - 23).reshape(shape)


def to_bf16(x: np.ndarray) -> torch.Tensor:
    """float32 → bfloat16 by integer rounding (nearest, ties to even); inputs are finite."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return torch.from_numpy(rounded.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)


def tensor(seed: int, shape: tuple[int, ...], dtype: torch.dtype, scale_log2: int = -3) -> torch.Tensor:
    x = values(seed, shape, scale_log2)
    return to_bf16(x) if dtype == torch.bfloat16 else torch.from_numpy(x.copy())


def layer_tensors(n: int) -> dict[str, torch.Tensor]:
    p, s = f"model.layers.{n}", 100 * (n + 1)
    bf, f32 = torch.bfloat16, torch.float32
    return {
        f"{p}.input_layernorm.weight": tensor(s + 1, (HIDDEN,), f32, 0),
        f"{p}.self_attn.q_proj.weight": tensor(s + 2, (HIDDEN, HIDDEN), bf),
        f"{p}.self_attn.k_proj.weight": tensor(s + 3, (KV, HIDDEN), bf),
        f"{p}.self_attn.v_proj.weight": tensor(s + 4, (KV, HIDDEN), bf),
        # Layer 1's o_proj is stored in float32: both stored dtypes go through the kernel.
        f"{p}.self_attn.o_proj.weight": tensor(s + 5, (HIDDEN, HIDDEN), f32 if n == 1 else bf),
        f"{p}.post_attention_layernorm.weight": tensor(s + 6, (HIDDEN,), f32, 0),
        f"{p}.mlp.gate_proj.weight": tensor(s + 7, (INTER, HIDDEN), bf),
        f"{p}.mlp.up_proj.weight": tensor(s + 8, (INTER, HIDDEN), bf),
        f"{p}.mlp.down_proj.weight": tensor(s + 9, (HIDDEN, INTER), bf),
    }


def write_model(folder: Path, gains: bool = False) -> Path:
    """Two shards: embedding and layer 0; layer 1, the final norm and the output head.

    With ``gains`` the blocks also hold Gemma 2's post-sublayer norms and the config names that family,
    so both writers of every block are projected against a gain-weighted direction.
    """
    layers = [layer_tensors(n) for n in range(LAYERS)]
    config = CONFIG
    if gains:
        config = CONFIG | {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}
        for n, tensors in enumerate(layers):
            tensors[f"model.layers.{n}.post_feedforward_layernorm.weight"] = tensor(50 + n, (HIDDEN,), torch.float32, 0)
    shards = [{"model.embed_tokens.weight": tensor(1, (VOCAB, HIDDEN), torch.bfloat16)} | layers[0],
              layers[1] | {"model.norm.weight": tensor(2, (HIDDEN,), torch.float32, 0),
                           "lm_head.weight": tensor(3, (VOCAB, HIDDEN), torch.bfloat16)}]
    return write_sharded(folder, shards, config, metadata={"format": "pt"})


def write_direction(path: Path, rows: int) -> Path:
    """One direction (rows == 1) or one per layer, float32, not normalized (as published files are)."""
    np.save(path, values(7, (rows, HIDDEN), 0)[0] if rows == 1 else values(7, (rows, HIDDEN), 0))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pinned") / "model")


def test_the_inputs_are_the_recorded_ones(model: Path) -> None:
    """If this fails, the input generation changed, not the conversion: fix the generator first."""
    assert {name: sha256(model / name) for name in SHARDS} == {
        SHARDS[0]: "6f5176b56aa025d2c2083128b67e1b29de74bf8f6ebb267b0f78e1491ee3341d",
        SHARDS[1]: "afa40cbeb2d4bbf51a91e66aa36108bef1d58890c794218ccc589d9669e21de2",
    }
    one, per_layer = write_direction(model.parent / "r1.npy", 1), write_direction(model.parent / "r2.npy", LAYERS)
    assert sha256(one) == "b7a0a953c922e0f162ac8bf9d563cf32d1cc8a041318e2796d9542234f3ac16c"
    assert sha256(per_layer) == "ef8cbbe2e88f1021694cd2fb4a9d07feee6bcb91718a0fd2b30f9411cdcc030e"


#: case -> (apply options, direction rows, model with post-sublayer gains, digests of the two output shards).
#: With one row per layer, the first shard (embedding and layer 0, both projected against row 0) equals the
#: plain run's. Recorded again when the kernel's sums became fixed-order (no BLAS call): before, two cases
#: gave other bytes on CPUs with AVX-512.
PINNED = {
    "plain": ((), 1, False, (
        "9d5c8c41d7df0b7fb87b66c3c002b416d014fb7a37cff1dd93ca6dc426924ba4",
        "65b69477ee4982734f495123fc4de5c3439334886be49afc78026b2e8e69b18a")),
    "norm-preserving": (("--norm-preserving",), 1, False, (
        "0165b3a8e1136bff97289c9ec223a7b9e32ddcdc43e8050755b990c7bd932252",
        "b697ea5335ca2c61304118b81f5f26a3935ea3c907c753614a1bf68f27743e54")),
    "half-scale": (("--scale", "0.5"), 1, False, (
        "b801cae39745ffad169bd4df2d23dfdf64dfbf0aed342b7c903f25744003f3fd",
        "10c594ec89520d6334565b60af0aeb128127728342a982facf6e62ad9d6ff888")),
    "per-layer": ((), LAYERS, False, (
        "9d5c8c41d7df0b7fb87b66c3c002b416d014fb7a37cff1dd93ca6dc426924ba4",
        "3cbbf03316d564aba9b59b4c12d83a5212070440bbf9de8ff6b584eb770fbb61")),
    "gain-weighted": ((), 1, True, (
        "ed950510d506fbd53732a63aa632b268f539dd922d7f27495032560f0b8ed349",
        "05fd9ca8ef555d8fb2e0c537b26a6e979389af8c1e95188ae2fe30591d0ebbad")),
}


@pytest.fixture(scope="module")
def gains_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pinned") / "model", gains=True)


@pytest.mark.parametrize("case", list(PINNED))
def test_output_bytes_are_pinned(model: Path, gains_model: Path, tmp_path: Path, case: str) -> None:
    options, rows, gains, digests = PINNED[case]
    direction = write_direction(tmp_path / "refusal_dir.npy", rows)
    out = tmp_path / "out"
    cli_ok("apply", gains_model if gains else model, direction, "-o", out, "-q", *options)
    assert {name: sha256(out / name) for name in SHARDS} == dict(zip(SHARDS, digests, strict=True))


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def code_paths() -> dict[str, dict[str, str]]:
    """Every BLAS (``MKL_CBWR``) and ATen (``ATEN_CPU_CAPABILITY``) code path this CPU can run, by name."""
    flags = cpu_flags()
    paths = {"default": {}, "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
             "aten-scalar": {"ATEN_CPU_CAPABILITY": "default"}, "one-worker": {"ORTHOPATCH_KERNEL_WORKERS": "1"}}
    if "avx2" in flags:
        paths |= {"mkl-avx2": {"MKL_CBWR": "AVX2"}, "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"}}
    if "avx512f" in flags:
        paths |= {"mkl-avx512": {"MKL_CBWR": "AVX512"}, "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"}}
    if "amx_tile" in flags:
        paths |= {"mkl-avx512-e4": {"MKL_CBWR": "AVX512_E4"}}
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("path", list(code_paths()))
def test_pinned_bytes_on_every_code_path(path: str) -> None:
    """The pinned digests again in a fresh process on each code path: no BLAS or SIMD choice changes a byte."""
    env = os.environ | code_paths()[path]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}",
                          "-k", "test_output_bytes_are_pinned"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{path} ({code_paths()[path]}):\n{run.stdout[-3000:]}{run.stderr[-2000:]}"
    assert f"{len(PINNED)} passed" in run.stdout

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
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from orthopatch.cli import main

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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The file byte by byte: header keys in data order, padded with spaces to 8 bytes."""
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def write_model(folder: Path) -> Path:
    """Two shards: embedding and layer 0; layer 1, the final norm and the output head."""
    folder.mkdir(parents=True)
    shards = [{"model.embed_tokens.weight": tensor(1, (VOCAB, HIDDEN), torch.bfloat16)} | layer_tensors(0),
              layer_tensors(1) | {"model.norm.weight": tensor(2, (HIDDEN,), torch.float32, 0),
                                  "lm_head.weight": tensor(3, (VOCAB, HIDDEN), torch.bfloat16)}]
    weight_map, total = {}, 0
    for name, tensors in zip(SHARDS, shards, strict=True):
        write_safetensors(folder / name, tensors)
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return folder


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
        SHARDS[0]: "ed2c51af18d50f7a530bc2283368487658bf025ca31d54de43987e342bf48e65",
        SHARDS[1]: "561c6140c895315c6008980bda48c97fc591a12c5c7af4691751a58e7ef6f165",
    }
    one, per_layer = write_direction(model.parent / "r1.npy", 1), write_direction(model.parent / "r2.npy", LAYERS)
    assert sha256(one) == "b7a0a953c922e0f162ac8bf9d563cf32d1cc8a041318e2796d9542234f3ac16c"
    assert sha256(per_layer) == "ef8cbbe2e88f1021694cd2fb4a9d07feee6bcb91718a0fd2b30f9411cdcc030e"


#: case -> (apply options, direction rows, digests of the two output shards). With one row per layer,
#: the first shard (embedding and layer 0, both projected against row 0) equals the plain run's.
PINNED = {
    "plain": ((), 1, (
        "970103dfe58af558fdac1bdfd71c9b9383d5de6f49ae0a13356d4be99edd7c65",
        "1da938876e64cbf7af3a7c58635f7bdee3057e286993eed1890640a3cfa8ff94")),
    "norm-preserving": (("--norm-preserving",), 1, (
        "7e14fe0308bf14316b913dc62dc11ab55b92cbcff13ddf52a3171dedc31f8446",
        "605a823ca048f728ab84438f4dee501b1ae8ad1599dc7cdf3b02071c839316cc")),
    "half-scale": (("--scale", "0.5"), 1, (
        "7fd5c777ae6e0e71eea724df9590d1825bd88c9ac7a6e62214fbb7659bf3e7d1",
        "f15b5c96d27a01f98db3918b87340145a8ba4c81d5335df5198794c11fdfa916")),
    "per-layer": ((), LAYERS, (
        "970103dfe58af558fdac1bdfd71c9b9383d5de6f49ae0a13356d4be99edd7c65",
        "ea79dadfbf68ba020d8409a34860051a5af10f830636295ff1c86a009bd70f94")),
}


@pytest.mark.parametrize("case", list(PINNED))
def test_output_bytes_are_pinned(model: Path, tmp_path: Path, case: str) -> None:
    options, rows, digests = PINNED[case]
    direction = write_direction(tmp_path / "refusal_dir.npy", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(model), str(direction), "-o", str(out), "-q", *options],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {name: sha256(out / name) for name in SHARDS} == dict(zip(SHARDS, digests, strict=True))

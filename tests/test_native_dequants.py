"""The C dequantizers: gguf-py's float32 values bit for bit (NaN payloads and signed zeros included, but for
the sum of two NaNs, see ``_two_nan_addends``), on blocks from the quantizers and on random and hostile
bytes, for any number of blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from orthopatch.gguf import native
from orthopatch.gguf.quants import NATIVE_DEQUANTIZED, dequantize, quantize

Q = gguf.GGMLQuantizationType

TYPES = sorted(NATIVE_DEQUANTIZED, key=lambda qtype: qtype.value)

FP16_OFFSETS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}  # fmt: skip
"""Where each block keeps its fp16 scales (ggml's block layouts)."""

HOSTILE_FP16 = (0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7E5A, 0x7C01, 0xFD33, 0x0001, 0x8001, 0x0000, 0x8000,
                0x03FF, 0x7BFF, 0xFBFF, 0x0400)
"""Scales as fp16 bits: ±inf, quiet and signaling NaNs with payloads and both signs, subnormals, ±0, the
largest values, the smallest normal."""


def _built(qtype: gguf.GGMLQuantizationType) -> native.BuiltDequantizer:
    function = native.native_dequantizer(qtype.name, *gguf.GGML_QUANT_SIZES[qtype])
    if function is None:
        pytest.skip(f"the C code is unavailable here: {native.unavailable_reason()}")
    return function


def _fp16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).reshape(-1).astype(np.float32)


def _two_nan_addends(qtype: gguf.GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray:
    """Blocks whose every value is NaN + NaN (Q4_1 and Q5_1 with NaN ``d`` and ``m``): which NaN an IEEE
    addition returns is the hardware's choice of operand, and numpy's loops choose by the array's shape
    (one block: ``m``'s, more: ``d * q``'s), so only NaN is required there."""
    if qtype not in (Q.Q4_1, Q.Q5_1):
        return np.zeros(len(blocks), bool)
    return np.isnan(_fp16_at(blocks, 0)) & np.isnan(_fp16_at(blocks, 2))


def _assert_same_bits(qtype: gguf.GGMLQuantizationType, raw: np.ndarray) -> None:
    """The C values of ``raw`` (whole blocks) are gguf-py's, compared as bit patterns."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, block_bytes)
    with np.errstate(all="ignore"):
        want = np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(-1, block_values)
    got = _built(qtype)(blocks).reshape(-1, block_values)
    loose = _two_nan_addends(qtype, blocks)
    assert np.isnan(got[loose]).all() and np.isnan(want[loose]).all()
    differing = np.flatnonzero((got.view(np.uint32) != want.view(np.uint32)).any(axis=1) & ~loose)
    if differing.size:
        block = differing[0]
        value = np.flatnonzero(got[block].view(np.uint32) != want[block].view(np.uint32))[0]
        pytest.fail(f"{qtype.name}: {differing.size} of {len(blocks)} blocks differ; block {block} value {value}: "
                    f"{got[block, value]} (0x{got[block, value].view(np.uint32):08x}) != gguf-py's "
                    f"{want[block, value]} (0x{want[block, value].view(np.uint32):08x})")


def _hostile_bytes(qtype: gguf.GGMLQuantizationType, blocks: int, seed: int) -> np.ndarray:
    """Random blocks whose scales are random fp16 bits, and every hostile scale in some block."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    for offset in FP16_OFFSETS[qtype]:
        bits = rng.choice(np.array(HOSTILE_FP16, np.uint16), size=blocks)
        keep = rng.random(blocks) < 0.3  # some blocks keep random scale bytes
        bits = np.where(keep, raw[:, offset].astype(np.uint16) | (raw[:, offset + 1].astype(np.uint16) << 8), bits)
        raw[:, offset] = (bits & 0xFF).astype(np.uint8)
        raw[:, offset + 1] = (bits >> 8).astype(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("blocks", [1, 3, 7, 9, 64, 1000])
def test_c_dequantizer_matches_gguf_py_on_hostile_bytes(qtype: gguf.GGMLQuantizationType, blocks: int) -> None:
    _assert_same_bits(qtype, _hostile_bytes(qtype, blocks, seed=blocks * 31 + qtype.value))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_c_dequantizer_matches_gguf_py_on_quantized_blocks(qtype: gguf.GGMLQuantizationType) -> None:
    rng = np.random.default_rng(qtype.value)
    rows = rng.standard_t(2.5, size=(9, 1024)).astype(np.float32)
    rows[1] = 0.0
    rows[1, rng.random(1024) < 0.5] = -0.0  # -0.0 levels times positive scales
    rows[2] = (rng.standard_normal(1024) * 1e-6).astype(np.float32)  # fp16-subnormal scales
    rows[3] = (rng.standard_normal(1024) * 3e4).astype(np.float32)  # scales near fp16's top
    rows[4] = np.abs(rows[4])
    rows[5] = -np.abs(rows[5])
    rows[6] = np.float32(0.75)
    with np.errstate(all="ignore"):
        raw = quantize(rows, qtype)
    _assert_same_bits(qtype, raw)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_every_level_and_scale_code_matches(qtype: gguf.GGMLQuantizationType) -> None:
    """Blocks whose bytes run through every value 0..255 at every position, with ordinary scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = (np.arange(256, dtype=np.uint16)[:, None] + np.arange(block_bytes)[None, :] * 7).astype(np.uint8)
    for offset in FP16_OFFSETS[qtype]:
        raw[:, offset], raw[:, offset + 1] = 0x66, 0x2E  # 0.1 in fp16, approximately
    _assert_same_bits(qtype, raw)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_dequantize_is_the_same_with_and_without_the_c_code(qtype: gguf.GGMLQuantizationType,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _built(qtype)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = _hostile_bytes(qtype, 6 * (512 // block_values), seed=7).reshape(6, -1)
    with np.errstate(all="ignore"):
        built = dequantize(raw, qtype, (6, 512))
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
        assert native.native_dequantizer(qtype.name, block_values, block_bytes) is None
        reference = dequantize(raw, qtype, (6, 512))
    assert built.shape == reference.shape == (6, 512)
    assert np.array_equal(built.view(np.uint32), reference.view(np.uint32))


def test_the_c_dequantizer_refuses_a_partial_block() -> None:
    function = _built(Q.Q4_K)
    with pytest.raises(ValueError, match="144-byte blocks"):
        function(np.zeros(145, np.uint8))
    assert function(np.zeros(0, np.uint8)).size == 0


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_1], ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_blocks_of_nan_scale_and_nan_offset_give_nan(qtype: gguf.GGMLQuantizationType, blocks: int) -> None:
    raw = _hostile_bytes(qtype, blocks, seed=blocks)
    raw[:, 0:2] = np.frombuffer(np.uint16(0x7E01).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.uint16(0xFE02).tobytes(), np.uint8)
    assert _two_nan_addends(qtype, raw).all()
    _assert_same_bits(qtype, raw)

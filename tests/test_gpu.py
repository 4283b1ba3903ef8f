"""The CUDA path: streamed through pinned buffers, bounded GPU memory; a clear error without CUDA.

Tests marked ``gpu`` are skipped on a machine without CUDA (see conftest.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from orthopatch.patch.kernel import project_out
from orthopatch.patch.projection import unit_direction
from orthopatch.synthetic import DEMO, write_direction
from tests.helpers import (
    FLOAT_DTYPES,
    SHAPES_AND_AXES,
    assert_correctly_rounded,
    one_error_line,
    random_case,
    run_orthopatch,
    stream_one,
    tensor_bytes,
    tiny_llama,
)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    model = tiny_llama(root / "model", shape=DEMO, shard_bytes=4 << 20)
    r = write_direction(root / "r.pth", DEMO.hidden)
    return model, root / "r.pth", r


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_device_cuda_without_cuda_is_one_line(demo_checkpoint, tmp_path):
    model, direction, _ = demo_checkpoint
    out = tmp_path / "out"
    line = one_error_line(run_orthopatch("apply", model, direction, "-o", out, "--device", "cuda", "-q"))
    assert "cuda" in line.lower()
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_cuda_stream_matches_reference_and_in_memory(tmp_path, dtype, shape, axis):
    w, u = random_case(shape, axis, dtype, seed=11)
    options = {"chunk_bytes": 4096, "block_elements": 512}
    streamed = stream_one(tmp_path, w, u, axis, device="cuda", **options)
    assert_correctly_rounded(streamed, w, u, axis)
    in_memory = project_out(w.cuda(), u, axis, block_elements=512).cpu()
    assert tensor_bytes(streamed) == tensor_bytes(in_memory)


@pytest.mark.gpu
@pytest.mark.parametrize("retain_bytes", [0, 1 << 30])
def test_cuda_memory_stays_bounded_for_large_tensors(tmp_path, retain_bytes):
    w, u = random_case((4096, 8192), 0, torch.bfloat16, seed=12)  # 64 MiB stored, 128 MiB in float32
    chunk = 4 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    streamed = stream_one(tmp_path, w, u, 0, device="cuda", chunk_bytes=chunk, block_elements=chunk // 2,
                          retain_bytes=retain_bytes)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 4 * chunk, f"{peak / 2**20:.0f} MiB of GPU memory for a 64 MiB tensor in 4 MiB chunks"
    assert_correctly_rounded(streamed, w, u, 0)


@pytest.mark.gpu
def test_apply_on_cuda(demo_checkpoint, tmp_path):
    model, direction, r = demo_checkpoint
    out = tmp_path / "out"
    proc = run_orthopatch("apply", model, direction, "-o", out, "--device", "cuda", "-q", timeout=300)
    assert proc.returncode == 0, proc.stderr
    u = unit_direction(r.to(torch.bfloat16).double())
    for shard in sorted(model.glob("*.safetensors")):
        before, after = load_file(shard), load_file(out / shard.name)
        for name, w in before.items():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                assert_correctly_rounded(after[name], w, u, 0, name=name)
            elif name.endswith("embed_tokens.weight"):
                assert_correctly_rounded(after[name], w, u, 1, name=name)
            else:
                assert tensor_bytes(after[name]) == tensor_bytes(w), name

"""The CUDA path: streamed through pinned buffers, bounded GPU memory; a clear error without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_kernel import CASES, DTYPES, random_case, stream_one

from orthopatch.kernel import project_out
from orthopatch.projection import unit_direction
from orthopatch.synthetic import DEMO, write_checkpoint, write_direction

from handmade import tensor_bytes
from reference import assert_correctly_rounded

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    model = write_checkpoint(root / "model", DEMO, shard_bytes=4 << 20)
    r = write_direction(root / "r.pth", DEMO.hidden)
    return model, root / "r.pth", r


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_device_cuda_without_cuda_is_one_line(demo_checkpoint, tmp_path):
    model, direction, _ = demo_checkpoint
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orthopatch", "apply", str(model), str(direction), "-o", str(out),
                           "--device", "cuda", "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0].lower() and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_cuda_stream_matches_reference_and_in_memory(tmp_path, dtype, shape, axis):
    w, u = random_case(shape, axis, dtype, seed=11)
    options = {"chunk_bytes": 4096, "block_elements": 512}
    streamed = stream_one(tmp_path, w, u, axis, device="cuda", **options)
    assert_correctly_rounded(streamed, w, u, axis)
    in_memory = project_out(w.cuda(), u, axis, block_elements=512).cpu()
    assert tensor_bytes(streamed) == tensor_bytes(in_memory)


@pytest.mark.gpu
@needs_cuda
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
@needs_cuda
def test_apply_on_cuda(demo_checkpoint, tmp_path):
    model, direction, r = demo_checkpoint
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orthopatch", "apply", str(model), str(direction), "-o", str(out),
                           "--device", "cuda", "-q"], capture_output=True, text=True, timeout=300)
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

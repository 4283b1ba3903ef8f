"""What the tests share: tiny checkpoints (synthetic, hand-written, saved by transformers), folder
guards, ways to run the CLI and to check its one-line errors, the float64 reference of the projection
with the rounding rule patched tensors must meet, and a tensor streamed through the real pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from orthopatch.cli import main
from orthopatch.io.formats import RECORD_NAME
from orthopatch.io.safetensors_header import read_header
from orthopatch.io.writer import ShardWriter
from orthopatch.patch.plan import PatchTarget
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.stream import TensorPatcher
from orthopatch.synthetic import LlamaShape, write_checkpoint

#: Eight shards of a three-layer Llama: small enough for any test, big enough for every code path.
TINY = LlamaShape(hidden=64, intermediate=160, vocab=256, layers=3, heads=4, kv_heads=2)
#: The smallest Llama the tests use: two layers, for tests that convert several models.
TINIEST = LlamaShape(hidden=32, intermediate=64, vocab=64, layers=2, heads=4, kv_heads=2)


# -- synthetic checkpoints and directions --------------------------------------------------------------

def tiny_llama(folder: Path, dtype: torch.dtype = torch.bfloat16, shape: LlamaShape = TINY,
               shard_bytes: int = 48 << 10, seed: int = 0) -> Path:
    """A Llama-shaped checkpoint of a few shards (the embedding and output head in their own)."""
    write_checkpoint(folder, shape, shard_bytes=shard_bytes, dtype=dtype, seed=seed)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def save_direction(path: Path, hidden: int, seed: int = 1, rows: int | None = None) -> torch.Tensor:
    """A random direction saved with ``torch.save`` (bf16, unnormalized like published files)."""
    shape = (hidden,) if rows is None else (rows, hidden)
    r = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.save(r.to(torch.bfloat16), path)
    return r


# -- hand-written safetensors ------------------------------------------------------------------------

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def safetensors_bytes(tensors: dict[str, torch.Tensor], *, pad: bool = True, key_order: list[str] | None = None,
                      metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file: data in ``tensors``' order, header keys in ``key_order`` (default: same)."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    entries, offset, data = {}, 0, []
    for name, t in tensors.items():
        raw = tensor_bytes(t)
        entries[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data.append(raw)
    for name in key_order or list(tensors):
        header[name] = entries[name]
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def write_sharded(folder: Path, shards: list[dict[str, torch.Tensor]], config: dict, **kwargs) -> Path:
    """Write shards ``model-0000k-of-0000n.safetensors`` and the index (or one ``model.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / name).write_bytes(safetensors_bytes(tensors, **kwargs))
        for t in tensors:
            weight_map[t] = name
            total += len(tensor_bytes(tensors[t]))
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# -- folders that must not change, and outputs to compare ----------------------------------------------

def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def untouched(*folders: Path) -> Iterator[None]:
    """Assert that no file under ``folders`` is added, removed or changed by the body."""
    before = [folder_hashes(f) for f in folders]
    yield
    for folder, hashes in zip(folders, before, strict=True):
        assert folder_hashes(folder) == hashes, f"{folder} changed"


def comparable_files(out: Path) -> dict[str, str]:
    """Hashes of an output folder, with the record's run time (the one thing that may differ) left out."""
    hashes = folder_hashes(out)
    if RECORD_NAME in hashes:
        record = json.loads((out / RECORD_NAME).read_text())
        record.pop("seconds", None)
        hashes[RECORD_NAME] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return hashes


@dataclass(frozen=True)
class Converted:
    """A tiny model, its direction, and the output of an uninterrupted ``apply``."""

    model: Path
    direction: Path
    out: Path
    files: dict[str, str]  # comparable_files(out)


def model_and_reference(root: Path) -> Converted:
    """A tiny model with a nested model file, its direction, and an uninterrupted run's output."""
    from orthopatch.patch.apply import ApplyOptions, apply

    model = tiny_llama(root / "model")
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "vocab.txt").write_text("a nested model file")
    direction = root / "r.pth"
    save_direction(direction, TINY.hidden)
    apply(ApplyOptions(model=model, direction=direction, out=root / "reference", quiet=True))
    return Converted(model, direction, root / "reference", comparable_files(root / "reference"))


# -- the command line ----------------------------------------------------------------------------------

def cli(*args: str | Path) -> Result:
    """``orthopatch ARGS`` in this process; an exception the CLI does not turn into a message propagates."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_ok(*args: str | Path) -> Result:
    """:func:`cli`, which must succeed."""
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def orthopatch_command(*args: str | Path) -> list[str]:
    """The argument list of ``python -m orthopatch ARGS`` with this interpreter."""
    return [sys.executable, "-m", "orthopatch", *map(str, args)]


def run_orthopatch(*args: str | Path, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python -m orthopatch ARGS`` in a child process, its output captured as text."""
    return subprocess.run(orthopatch_command(*args), capture_output=True, text=True, timeout=timeout, **kwargs)


def one_error_line(result: Result | subprocess.CompletedProcess) -> str:
    """The line a known error prints: exit code 1, exactly one line on stderr, starting
    ``orthopatch: error: ``, and no traceback anywhere. ``result`` is from :func:`cli` or a child process."""
    code = result.exit_code if isinstance(result, Result) else result.returncode
    everything = f"{result.stdout}{result.stderr}"
    assert code == 1, everything
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orthopatch: error: ") and "Traceback" not in everything, everything
    return lines[0]


# -- the float64 reference and the rounding rule ---------------------------------------------------------

INT_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def reference(w: torch.Tensor, u: torch.Tensor, axis: int, scale: float = 1.0,
              norm_preserving: bool = False) -> torch.Tensor:
    """``w`` projected in float64: every fiber along ``axis`` loses ``scale`` times its ``u`` component,
    then (norm preserving) gets its original length back."""
    x = w.to(torch.float64).movedim(axis, -1)
    u = u.to(torch.float64)
    y = x - scale * (x @ u).unsqueeze(-1) * u
    if norm_preserving:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
    return y.movedim(-1, axis)


def operand_scale(w: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """``|W| + |u|·Σ|W||u|`` per element: what float32 arithmetic can promise near cancellation."""
    x = w.to(torch.float64).movedim(axis, -1).abs()
    a = u.to(torch.float64).abs()
    return (x + (x @ a).unsqueeze(-1) * a).movedim(-1, axis)


def assert_correctly_rounded(out: torch.Tensor, w: torch.Tensor, u: torch.Tensor, axis: int,
                             scale: float = 1.0, name: str = "") -> None:
    """Equal to the float64 result rounded to the stored dtype, except ≤0.1% of elements (two in a tensor
    too small for that to be a whole element), each within one ulp, or (where the result cancels to almost
    zero) within a few float32 ulps of the operands."""
    exact = reference(w, u, axis, scale)
    rounded = exact.to(out.dtype)
    bad = out != rounded
    count = int(bad.sum())
    assert count <= max(2, 1e-3 * out.numel()), \
        f"{name}: {count / out.numel():.4%} of elements differ from the rounded float64 result"
    if not bad.any():
        return
    iv = INT_VIEWS[out.dtype]
    ulps = (out.view(iv).long() - rounded.view(iv).long()).abs()
    near_zero = (out.to(torch.float64) - exact).abs() <= 8 * torch.finfo(torch.float32).eps * operand_scale(w, u, axis)
    ok = (ulps <= 1) | near_zero
    assert bool(ok[bad].all()), f"{name}: elements off by more than one ulp: {ulps[bad & ~ok][:5].tolist()}"


# -- one tensor through the streaming pipeline ----------------------------------------------------------

#: (shape, residual axis): Linear [d_model, d_in], embedding rows, fused experts both ways.
SHAPES_AND_AXES = [((301, 70), 0), ((70, 301), 1), ((3, 41, 301), 2), ((3, 301, 29), 1)]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_case(shape: tuple[int, ...], axis: int, dtype: torch.dtype, seed: int = 0):
    """A random tensor of ``dtype`` and a random unit direction along its ``axis``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    u = unit_direction(torch.randn(shape[axis], generator=gen, dtype=torch.float64))
    return w, u


def one_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def stream_one(tmp_path: Path, w: torch.Tensor, u: torch.Tensor, axis: int, device: str = "cpu",
               **patcher_options) -> torch.Tensor:
    """Patch ``w`` through a file, the pipeline and a shard writer; return what was written."""
    src = tmp_path / "src.safetensors"
    one_tensor_file(src, {"w": w})
    header = read_header(src)
    entry = header.entry("w")
    target = PatchTarget(entry=entry, shard=src.name, role="test", axis=axis, layer=0)
    out = tmp_path / "out.safetensors"
    segments = [(0, entry.begin), (entry.begin, entry.end)]
    if entry.end < header.file_size:
        segments.append((entry.end, header.file_size))
    patcher = TensorPatcher(device, **patcher_options)
    seen: list[int] = []
    fd = os.open(src, os.O_RDONLY)
    try:
        with ShardWriter(out, header.file_size, segments) as writer:
            writer.write(0, 0, memoryview(src.read_bytes()[: entry.begin]))
            patcher.patch(fd, target, u, writer, seen.append)
            writer.finish()
    finally:
        os.close(fd)
    assert sum(seen) == entry.nbytes
    return load_file(out)["w"]


# -- models built by transformers -------------------------------------------------------------------------

def far_from_defaults(model: Any, gain_offset: float = 0.0) -> Any:
    """Re-initialize ``model`` from torch's global generator (seed it first) so that norm gains and
    biases are far from their ones and zeros: a patch that ignored them would show. Norms that compute
    ``offset + weight`` get ``gain_offset``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
            elif p.dim() == 1:  # norm gains (GPT-2's ln_*, everyone's *norm), gpt-oss's attention sinks
                torch.nn.init.normal_(p, mean=1.0 - gain_offset, std=0.5)
            elif p.dim() >= 2:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
    return model.eval()


def final_norm(model: Any) -> torch.nn.Module:
    for path in ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no final norm in {type(model).__name__}")


def pre_norm_states(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """The embedding output and every layer's output, all before the final norm."""
    captured: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    assert len(captured) == 1
    return [*out.hidden_states[:-1], captured[0]]


def max_abs_cos(states: list[torch.Tensor], r: torch.Tensor) -> float:
    """The largest |cosine| between ``r`` and any position of any hidden state."""
    return max(torch.nn.functional.cosine_similarity(h.double(), r.double().expand_as(h), dim=-1).abs().max().item()
               for h in states)

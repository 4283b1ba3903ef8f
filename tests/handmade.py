"""Write safetensors files by hand, with the quirks real files have, for tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


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

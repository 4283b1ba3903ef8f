"""Tiny checkpoints for the robustness tests, and a guard that a source folder's files never change."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from orthopatch.output import RECORD_NAME
from orthopatch.synthetic import LlamaShape, write_checkpoint

TINY = LlamaShape(hidden=64, intermediate=160, vocab=256, layers=3, heads=4, kv_heads=2)


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


def comparable_files(out: Path) -> dict[str, str]:
    """Hashes of an output folder, with the record's run time (the one thing that may differ) left out."""
    hashes = folder_hashes(out)
    if RECORD_NAME in hashes:
        record = json.loads((out / RECORD_NAME).read_text())
        record.pop("seconds", None)
        hashes[RECORD_NAME] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return hashes


def model_and_reference(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """A tiny model with a nested model file, its direction, and the hashes of an uninterrupted run."""
    from orthopatch.apply import ApplyOptions, apply

    model = tiny_llama(root / "model")
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "vocab.txt").write_text("a nested model file")
    direction = root / "r.pth"
    save_direction(direction, TINY.hidden)
    apply(ApplyOptions(model=model, direction=direction, out=root / "reference", quiet=True))
    return model, direction, comparable_files(root / "reference")

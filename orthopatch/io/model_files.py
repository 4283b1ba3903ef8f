"""The small files of a model folder (config, tokenizer, templates, licence, card) and their durable copy."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from orthopatch.io.folders import write_atomic
from orthopatch.io.formats import INDEX_NAME, RECORD_NAME
from orthopatch.io.smallfile import MAX_SMALL_BYTES, describe_kind, read_small_bytes
from orthopatch.io.writer import fsync_dir, io_error

#: Weight files of other formats, never copied: the output is a safetensors model.
SKIPPED_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
SKIPPED_DIRS = ("original",)


@dataclass(frozen=True)
class ModelFiles:
    """The model folder's files besides the weights, and those left out with the reason."""

    copied: list[Path]
    skipped: list[tuple[Path, str]]


def model_files(src: Path) -> ModelFiles:
    """Files of the model folder besides the weights: config, tokenizer, templates, licence, card.

    Only regular files of at most :data:`~orthopatch.io.smallfile.MAX_SMALL_BYTES` are copied; special
    files (FIFOs, devices, sockets, links to them), larger files and links that lead out of the model
    (:func:`inside_model`) are skipped and reported, since a model's small files are never either.
    """
    copied, skipped = [], []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in SKIPPED_DIRS:
            continue
        if rel == Path(RECORD_NAME):
            continue  # a source that is itself an orthopatch output: its record is not ours
        if path.name.endswith(SKIPPED_SUFFIXES) or path.name == INDEX_NAME:
            continue
        try:
            st = path.stat()
        except OSError:
            skipped.append((rel, "cannot be read (a dangling link?)"))
            continue
        if not stat.S_ISDIR(st.st_mode) and not inside_model(src, path):
            skipped.append((rel, "is a link to a file outside the model folder"))
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append((rel, f"is {describe_kind(st.st_mode)}"))
        elif st.st_size > MAX_SMALL_BYTES:
            skipped.append((rel, f"is {st.st_size:,} bytes, more than a model's small files have"))
        else:
            copied.append(rel)
    return ModelFiles(copied, skipped)


def inside_model(src: Path, path: Path) -> bool:
    """Whether ``path`` (links followed) lies inside model folder ``src`` or, for a Hugging Face cache
    snapshot (``.../models--ORG--NAME/snapshots/REV/``), inside that repository's own ``blobs/``, where
    every snapshot file points. A link anywhere else (``notes.txt -> ~/secret``) is not the model's."""
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(src))
    homes = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        homes.append(root.parent.parent / "blobs")
    return any(real.is_relative_to(home) for home in homes)


def copy_model_file(src: Path, out: Path, rel: Path) -> None:
    """Copy one small file durably: temporary name, fsync, rename, fsync of the folders it lives in.

    The record is written after these; without the fsyncs a power cut could leave a recorded,
    finished-looking folder whose config or tokenizer is empty.
    """
    target = out / rel
    new_dirs = [d for d in reversed(rel.parents) if d != Path(".") and not (out / d).exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, target, "copy") from None
    write_atomic(target, read_small_bytes(src / rel), "copy")  # a regular file, checked again as it is opened
    try:
        for d in new_dirs:
            fsync_dir((out / d).parent)
    except OSError as exc:
        raise io_error(exc, target, "copy") from None

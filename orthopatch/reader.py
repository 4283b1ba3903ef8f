"""Open source files and read small tensors whole (norm gains): the reads that are not streamed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .filecopy import pread_into
from .formats import torch_dtype
from .safetensors_header import TensorEntry
from .smallfile import open_regular


@contextmanager
def open_source(path: Path) -> Iterator[int]:
    """A read-only descriptor on a source file (a regular file: never a FIFO or a device), hinted for
    sequential reading."""
    fd = open_regular(path)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield fd
    finally:
        os.close(fd)


def read_small_tensor(fd: int, entry: TensorEntry) -> torch.Tensor:
    """Read a small tensor (a norm gain) whole, as float64 on the CPU."""
    raw = bytearray(entry.nbytes)
    pread_into(fd, memoryview(raw), entry.begin)
    return torch.frombuffer(raw, dtype=torch_dtype(entry.dtype)).to(torch.float64).reshape(entry.shape)

"""Read from source checkpoints with bounded ``pread`` calls: small tensors whole (norm gains), and
whole tensors or a few rows of one for running a model block by block.

Nothing is memory-mapped and no shard is loaded whole: each read is the exact byte range of a tensor
(or of a run of consecutive rows), so what a run reads can be counted and bounded.
:class:`CheckpointReader` keeps that account (``bytes_read`` and bytes per tensor); the tests and
the benchmark hold it against the checkpoint's size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import Checkpoint
from orthopatch.io.filecopy import pread_into
from orthopatch.io.formats import FLOAT_DTYPES, torch_dtype
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.io.smallfile import open_regular


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


#: Rows of a tensor read per ``pread`` when a caller walks a large tensor in row blocks.
ROW_BLOCK_BYTES = 64 << 20


@dataclass
class ReadAccount:
    """What has been read so far: bytes in all, and bytes per tensor."""

    bytes_read: int = 0
    per_tensor: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int) -> None:
        self.bytes_read += n
        self.per_tensor[name] = self.per_tensor.get(name, 0) + n

    @property
    def tensors_read(self) -> set[str]:
        return set(self.per_tensor)


class CheckpointReader:
    """Bounded reads of a checkpoint's tensors, decoded to torch tensors on the CPU."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.account = ReadAccount()
        self._fds: dict[str, int] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def has(self, name: str) -> bool:
        return name in self.checkpoint.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str):
        if name not in self.checkpoint.weight_map:
            raise OrthopatchError("the checkpoint has no such tensor", path=self.checkpoint.root, tensor=name)
        entry = self.checkpoint.entry(name)
        if entry.dtype not in FLOAT_DTYPES:
            raise OrthopatchError(f"cannot run a model on {entry.dtype} weights", path=self._path(name), tensor=name)
        return entry

    def _path(self, name: str) -> str:
        return str(self.checkpoint.root / self.checkpoint.weight_map[name])

    def _fd(self, name: str) -> int:
        shard = self.checkpoint.weight_map[name]
        if shard not in self._fds:
            self._fds[shard] = open_regular(self.checkpoint.root / shard, "shard")
        return self._fds[shard]

    def _pread(self, name: str, offset: int, nbytes: int) -> bytearray:
        raw = bytearray(nbytes)
        try:
            pread_into(self._fd(name), memoryview(raw), offset)
        except (OSError, EOFError) as exc:
            raise OrthopatchError(f"cannot read tensor data ({exc})", path=self._path(name), tensor=name) from None
        self.account.add(name, nbytes)
        return raw

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        entry = self._entry(name)
        raw = self._pread(name, entry.begin, entry.nbytes)
        return torch.frombuffer(raw, dtype=torch_dtype(entry.dtype)).reshape(entry.shape) if raw else \
            torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))

    def read_rows(self, name: str, rows: Iterable[int]) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of a 2-D tensor, each run of consecutive rows in one read."""
        entry = self._entry(name)
        if len(entry.shape) != 2:
            raise OrthopatchError(f"expected a 2-D tensor, found shape {list(entry.shape)}",
                                  path=self._path(name), tensor=name)
        n_rows, width = entry.shape
        dtype = torch_dtype(entry.dtype)
        row_bytes = width * dtype.itemsize
        wanted = list(rows)
        if wanted and (wanted[0] < 0 or wanted[-1] >= n_rows):
            raise OrthopatchError(f"row {wanted[-1]} is out of range for {n_rows} rows",
                                  path=self._path(name), tensor=name)
        parts = []
        for first, count in _runs(wanted):
            raw = self._pread(name, entry.begin + first * row_bytes, count * row_bytes)
            parts.append(torch.frombuffer(raw, dtype=dtype).reshape(count, width))
        return torch.cat(parts) if parts else torch.empty(0, width, dtype=dtype)

    def row_blocks(self, name: str, block_bytes: int = ROW_BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first_row, rows)`` blocks of a 2-D tensor, each at most ``block_bytes`` (one row at least)."""
        entry = self._entry(name)
        n_rows, width = entry.shape
        dtype = torch_dtype(entry.dtype)
        step = max(1, block_bytes // max(1, width * dtype.itemsize))
        for first in range(0, n_rows, step):
            count = min(step, n_rows - first)
            raw = self._pread(name, entry.begin + first * width * dtype.itemsize, count * width * dtype.itemsize)
            yield first, torch.frombuffer(raw, dtype=dtype).reshape(count, width)


def _runs(rows: list[int]) -> Iterator[tuple[int, int]]:
    """Runs of consecutive integers in a sorted list, as ``(first, count)``."""
    start = prev = None
    for row in rows:
        if start is None:
            start = prev = row
        elif row == prev + 1:
            prev = row
        else:
            yield start, prev - start + 1
            start = prev = row
    if start is not None:
        yield start, prev - start + 1

"""Plan and write the header of a patched GGUF file whose tensors keep their types, shapes and offsets.

The output copies every source metadata entry byte for byte (replacing the string entries the patch
names, in place), appends the patch's own string entries, and copies the tensor infos unchanged, so
each tensor's offset within the data section is the same as in the source. The data section then
starts ``shift`` bytes later than the source's, and ``shift`` is chosen as a multiple of both the
filesystem block and the file's alignment: every tensor keeps its position within a block, so the
unchanged ones can share extents with the source (reflink) and the format's alignment still holds.

Readers start the data section at the first multiple of the alignment at or after the header's end,
so the gap cannot simply be filled with zeros past the next alignment boundary. The header is
lengthened inside a string value instead (:data:`PADDING_KEY`, spaces). With ``H0`` the header's
length when that value is empty, ``S`` the source's data start (a multiple of the alignment ``A``)
and ``L = lcm(block, A)``, the output's data start is ``D = S + k*L`` for the least ``k >= 0`` with
``D >= H0``, and the padding value is ``p = max(0, D - A + 1 - H0)`` spaces. Then
``D - A < H0 + p <= D`` and ``D`` is a multiple of ``A``, so a reader computes exactly ``D``; the
at most ``A - 1`` bytes left between the header and ``D`` are zeros. ``p < L`` always.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property

import gguf

from orthopatch.errors import OrthopatchError, shortened
from orthopatch.gguf.container import (
    ALIGNMENT_KEY,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_NAME,
    MAX_VALUE_STRING,
    GGUFFile,
    align_up,
)
from orthopatch.gguf.split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS

#: The string entry whose length places the output's data section.
PADDING_KEY = "orthopatch.padding"
DEFAULT_BLOCK = 4096
#: Keys a patch may not set: the format reads them as numbers that place the data or number the parts.
RESERVED_KEYS = frozenset({PADDING_KEY, ALIGNMENT_KEY, SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS})


@dataclass(frozen=True)
class OutputLayout:
    """Where everything goes in the patched copy of ``src``."""

    src: GGUFFile
    header: bytes  # everything before the data section: the header, then zeros up to data_start
    header_end: int  # offset just past the tensor infos
    data_start: int
    shift: int  # data_start - src.data_start: a non-negative multiple of the block and the alignment
    padding: int  # length of the PADDING_KEY value
    begins: tuple[int, ...]  # absolute output offset of each tensor, in the source's header order

    @cached_property
    def by_name(self) -> dict[str, int]:
        return {t.name: b for t, b in zip(self.src.tensors, self.begins, strict=True)}

    def begin(self, name: str) -> int:
        """Absolute output offset of tensor ``name``'s first byte."""
        return self.by_name[name]


def string_kv(key: str, value: str) -> bytes:
    """One whole metadata entry holding a string, as a GGUF header stores it."""
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return b"".join((struct.pack("<Q", len(k)), k, struct.pack("<IQ", gguf.GGUFValueType.STRING, len(v)), v))


def _check_extra(src: GGUFFile, extra: dict[str, str]) -> None:
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OrthopatchError(f"metadata to add must map strings to strings, not {shortened(key)}: "
                                  f"{type(value).__name__}", path=src.path)
        try:
            k, v = key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:
            raise OrthopatchError(f"metadata key {shortened(key)} or its value is not valid Unicode",
                                  path=src.path) from None
        if not k or len(k) > MAX_NAME or len(v) > MAX_VALUE_STRING:
            raise OrthopatchError(f"metadata key {shortened(key)} or its value is empty or too long", path=src.path)
        if key in RESERVED_KEYS:
            raise OrthopatchError(f"metadata key {key} is reserved (it places the data or numbers split parts)",
                                  path=src.path)
        old = src.metadata.get(key)
        if old is not None and old.type != gguf.GGUFValueType.STRING:
            raise OrthopatchError(f"metadata key {shortened(key)} is {old.type.name} in the source; only string "
                                  "entries can be replaced", path=src.path)


def plan_output(src: GGUFFile, extra_metadata: dict[str, str], block: int = DEFAULT_BLOCK,
                data_start: int | None = None) -> OutputLayout:
    """The header of ``src`` patched with ``extra_metadata``, its data section moved by a multiple of ``block``.

    ``data_start`` (from an earlier plan of the same file with longer metadata) keeps the data where that
    plan put it: the padding takes up the difference.
    """
    if not isinstance(block, int) or block < 1:
        raise OrthopatchError(f"block size must be a positive integer, not {block!r}", path=src.path)
    _check_extra(src, extra_metadata)
    entries: list[bytes] = []
    padding_slot = None
    for key, raw in src.kv_raw:
        if key == PADDING_KEY:
            padding_slot = len(entries)
            raw = b""
        elif key in extra_metadata:
            raw = string_kv(key, extra_metadata[key])
        entries.append(raw)
    entries += [string_kv(k, v) for k, v in extra_metadata.items() if k not in src.metadata]
    if padding_slot is None:
        padding_slot = len(entries)
        entries.append(b"")
    prefix = MAGIC + struct.pack("<IQQ", src.version, len(src.tensors), len(entries))
    h0 = len(prefix) + sum(map(len, entries)) + len(string_kv(PADDING_KEY, "")) + len(src.tensor_infos_raw)

    alignment, start = src.alignment, src.data_start
    step = math.lcm(block, alignment)
    smallest = start + max(0, -(-(h0 - start) // step)) * step
    if data_start is None:
        data_start = smallest
    elif data_start < smallest or (data_start - start) % step:
        raise ValueError(f"data cannot start at {data_start} (the smallest start is {smallest}, in steps of {step})")
    padding = max(0, data_start - alignment + 1 - h0)
    if padding > MAX_VALUE_STRING or data_start > MAX_HEADER_BYTES:
        raise OrthopatchError(f"a {block}-byte block and {alignment}-byte alignment would need a {data_start:,}-byte "
                              "header, more than a GGUF reader accepts", path=src.path)
    entries[padding_slot] = string_kv(PADDING_KEY, " " * padding)
    header_end = h0 + padding
    assert align_up(header_end, alignment) == data_start and (data_start - start) % step == 0
    header = b"".join((prefix, *entries, src.tensor_infos_raw, bytes(data_start - header_end)))
    shift = data_start - start
    return OutputLayout(src, header, header_end, data_start, shift, padding,
                        tuple(t.begin + shift for t in src.tensors))


def write_gguf_header(fd: int, layout: OutputLayout, path: str | os.PathLike | None = None) -> None:
    """Write ``layout.header`` at the start of the file open on ``fd`` (``path`` names it in errors)."""
    view = memoryview(layout.header)
    done = 0
    try:
        while done < len(view):
            written = os.pwrite(fd, view[done:], done)
            if written <= 0:
                raise OrthopatchError("cannot write the GGUF header (nothing was written)", path=path)
            done += written
    except OSError as exc:
        raise OrthopatchError(f"cannot write the GGUF header ({exc.strerror or exc})", path=path) from None

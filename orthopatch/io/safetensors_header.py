"""Read and validate a safetensors header, as the format's reference reader does.

We parse headers ourselves because streaming needs each tensor's byte offsets, and because the
library accepts files we must refuse (duplicate keys).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from orthopatch.errors import HeaderError, OrthopatchError
from orthopatch.io.formats import DTYPE_BITS
from orthopatch.io.smallfile import is_json_int, open_regular

MAX_HEADER_BYTES = 100_000_000
MAX_U64 = 2**64 - 1
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: where its bytes are, relative to the start of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """A validated safetensors header: its raw bytes and its tensors in offset order."""

    path: Path
    raw: bytes  # the 8-byte length and the JSON header, exactly as on disk
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @cached_property
    def by_name(self) -> dict[str, TensorEntry]:
        """Each tensor by name (a header may list a million: lookups must not scan them)."""
        return {t.name: t for t in self.tensors}

    def entry(self, name: str) -> TensorEntry:
        return self.by_name[name]

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError("appears twice in the header (duplicate key)", tensor=key)
        out[key] = value
    return out


def _is_utf8(text: str) -> bool:
    """False for strings with lone surrogates (JSON escapes like ``\\ud800``), which UTF-8 cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(prefix: bytes, file_size: int, path: str | os.PathLike = "<bytes>") -> ShardHeader:
    """Validate a header given the file's first bytes (at least the whole header) and its size.

    Raises :class:`HeaderError` naming ``path`` (and the tensor) for any violation.
    """
    path = Path(path)

    def fail(message: str, tensor: str | None = None) -> HeaderError:
        return HeaderError(message, path=path, tensor=tensor)

    if file_size < 8 or len(prefix) < 8:
        raise fail(f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise fail(f"header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise fail(f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    if len(prefix) < 8 + n:
        raise fail("header could not be read completely")
    raw = bytes(prefix[: 8 + n])
    try:
        text = raw[8:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise fail("header is not a JSON object")
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except HeaderError as exc:
        raise fail(exc.message, exc.tensor) from None
    except (ValueError, RecursionError) as exc:
        raise fail(f"header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise fail("header is not a JSON object")

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in metadata.items()
        ):
            raise fail("__metadata__ must map strings to strings")

    data_start = 8 + n
    entries: list[TensorEntry] = []
    for name, info in doc.items():
        if not _is_utf8(name):
            raise fail("tensor name is not valid Unicode (lone surrogate escape)", name)
        if not isinstance(info, dict):
            raise fail("entry is not an object", name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise fail(f"unknown dtype {dtype!r}", name)
        if not isinstance(shape, list) or not all(is_json_int(s) and 0 <= s <= MAX_U64 for s in shape):
            raise fail(f"invalid shape {shape!r}", name)
        numel = 1
        for s in shape:  # as the reference reader multiplies: 64-bit, left to right
            numel *= s
            if numel > MAX_U64:
                raise fail(f"shape {shape} has more elements than 64 bits can count", name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(is_json_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise fail(f"invalid data_offsets {offsets!r}", name)
        bits = numel * DTYPE_BITS[dtype]
        if bits > MAX_U64:
            raise fail(f"shape {shape} has more bits than 64 bits can count", name)
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise fail(
                f"holds {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {bits / 8:g}",
                name,
            )
        entries.append(
            TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
        )

    entries.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in entries:
        if t.begin != cursor:
            kind = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap before it"
            raise fail(f"data_offsets {kind} (expected offset {cursor - data_start})", t.name)
        cursor = t.end
    if cursor != file_size:
        if cursor > file_size:
            cut = next(t for t in entries if t.end > file_size)
            raise fail(f"data runs to byte {cut.end} but the file has {file_size} bytes (truncated?)", cut.name)
        raise fail(f"{file_size - cursor} trailing bytes after the last tensor")
    return ShardHeader(path, raw, tuple(entries), metadata, file_size)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Open ``path`` read-only, read just its header and validate it against the file size."""
    path = Path(path)
    try:
        fd = open_regular(path, "shard")
    except OrthopatchError as exc:
        raise HeaderError(exc.message, path=path) from None
    try:
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except OSError as exc:
        raise HeaderError(f"cannot read ({exc.strerror})", path=path) from None
    return parse_header(head, size, path)

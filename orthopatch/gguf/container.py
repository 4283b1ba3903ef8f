"""Read and validate a GGUF header without trusting it, and find the parts of a split model.

A GGUF file is a header (magic, version, counts, metadata key-value pairs, tensor infos) followed by
a data section that starts at the next multiple of the alignment. We parse the header ourselves
because patching needs each tensor's byte range and each metadata entry's raw bytes, and because a
file from anywhere may claim counts and lengths it does not hold. Every count, length and offset is
checked against the file's size before anything is allocated or read, the header is read with
bounded reads from a descriptor (never the data section), and each failure is one
:class:`OrthopatchError` line naming the file (and the key or tensor).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf

from orthopatch.errors import OrthopatchError, shortened
from orthopatch.io.smallfile import open_regular

MAGIC = b"GGUF"
#: Versions read: 2 and 3 differ only in allowing big-endian files, which we refuse.
VERSIONS = (2, 3)
#: Bytes before the first metadata entry: magic, version, tensor count, kv count.
FIXED_HEADER = 24
#: Largest header (metadata and tensor infos) read; real ones are a few megabytes.
MAX_HEADER_BYTES = 1 << 30
#: Longest string value (a chat template, a license) and longest key or tensor name.
MAX_VALUE_STRING = 64 << 20
MAX_NAME = 64 << 10
#: Most values decoded from one header (entries, array elements and tensors together): each becomes a
#: Python object several times larger than its bytes on disk, so the byte limit alone would let a
#: 1 GiB header of tiny values take tens of gigabytes. Real vocabularies hold a few hundred thousand.
MAX_ITEMS = 16 << 20
#: llama.cpp's GGML_MAX_DIMS.
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = gguf.Keys.General.ALIGNMENT
#: Fewest bytes a kv entry takes (length, one key byte, type, one value byte) and a tensor info
#: (length, n_dims, one dimension, type, offset): each count is bounded by the bytes left.
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
INT64_MAX = 2**63 - 1
_READ_CHUNK = 1 << 20

VT = gguf.GGUFValueType
_SCALAR_FORMATS = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
                   VT.FLOAT32: "f", VT.BOOL: "B", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class MetadataValue:
    """One decoded metadata value: its GGUF type, and for arrays the element type (``value`` is a tuple)."""

    type: gguf.GGUFValueType
    value: Any
    item_type: gguf.GGUFValueType | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its type, its dimensions and where its bytes are."""

    name: str
    shape_ggml: tuple[int, ...]  # ne: ne[0] is the fastest-varying axis
    qtype: gguf.GGMLQuantizationType
    offset: int  # relative to the data section's start, as in the header
    nbytes: int
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions in torch order (slowest axis first)."""
        return tuple(reversed(self.shape_ggml))


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF header: metadata (decoded and raw), tensors in header order, and the layout."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, MetadataValue]  # in header order
    kv_raw: tuple[tuple[str, bytes], ...]  # each whole kv entry exactly as on disk, in header order
    tensor_infos_raw: bytes  # the tensor info section exactly as on disk
    tensors: tuple[GGUFTensor, ...]  # in header order
    header_end: int  # offset just past the last tensor info
    data_start: int  # header_end rounded up to the alignment
    file_size: int

    @cached_property
    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        """The decoded value of ``key``, or ``default`` when the file does not have it."""
        entry = self.metadata.get(key)
        return default if entry is None else entry.value


def align_up(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


class _HeaderReader:
    """Reads a header front to back through a growing buffer; no read reaches past what was checked."""

    def __init__(self, fd: int, path: Path, file_size: int):
        self.fd, self.path, self.file_size = fd, path, file_size
        self.limit = min(file_size, MAX_HEADER_BYTES)
        self.buf = bytearray()
        self.pos = 0
        self.items = 0

    def fail(self, message: str, tensor: str | None = None) -> OrthopatchError:
        return OrthopatchError(message, path=self.path, tensor=tensor)

    def count(self, n: int, what: str, tensor: str | None = None) -> None:
        """Account for ``n`` more decoded values before they are decoded (see :data:`MAX_ITEMS`)."""
        self.items += n
        if self.items > MAX_ITEMS:
            raise self.fail(f"header holds more than {MAX_ITEMS:,} values (at {what})", tensor)

    def left(self) -> int:
        return self.limit - self.pos

    def need(self, n: int, what: str, tensor: str | None = None) -> None:
        end = self.pos + n
        if end > self.limit:
            if end > self.file_size:
                raise self.fail(f"header is truncated: {what} at byte {self.pos} needs {n:,} bytes but the file "
                                f"ends at byte {self.file_size:,}", tensor)
            raise self.fail(f"header runs past {MAX_HEADER_BYTES:,} bytes ({what} at byte {self.pos:,})", tensor)
        while len(self.buf) < end:
            want = min(max(end - len(self.buf), _READ_CHUNK), self.limit - len(self.buf))
            try:
                chunk = os.pread(self.fd, want, len(self.buf))
            except OSError as exc:
                raise self.fail(f"cannot read ({exc.strerror or exc})") from None
            if not chunk:
                raise self.fail("file shrank while its header was read")
            self.buf += chunk

    def take(self, n: int, what: str, tensor: str | None = None) -> bytes:
        self.need(n, what, tensor)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def unpack(self, fmt: struct.Struct, what: str, tensor: str | None = None) -> Any:
        self.need(fmt.size, what, tensor)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def string(self, what: str, limit: int, tensor: str | None = None) -> str:
        n = self.unpack(_U64, f"{what} length", tensor)
        if n > limit:
            raise self.fail(f"{what} claims {n:,} bytes, more than the {limit:,} accepted", tensor)
        raw = self.take(n, what, tensor)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", tensor) from None

    def strings(self, count: int, what: str) -> tuple[str, ...]:
        """``count`` strings in a row: :meth:`string` unrolled, as vocabularies hold hundreds of thousands."""
        items = []
        buf, length = self.buf, _U64.unpack_from
        for i in range(count):
            if self.pos + 8 > len(buf):
                self.need(8, f"{what} element {i} length")
            (n,) = length(buf, self.pos)
            end = self.pos + 8 + n
            if n > MAX_VALUE_STRING or end > len(buf):
                items.append(self.string(f"{what} element {i}", MAX_VALUE_STRING))
                continue
            try:
                items.append(buf[self.pos + 8:end].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail(f"{what} element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            self.pos = end
        return tuple(items)

    def scalars(self, vtype: gguf.GGUFValueType, count: int, what: str) -> tuple[Any, ...]:
        fmt = struct.Struct(f"<{count}{_SCALAR_FORMATS[vtype]}")
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        if vtype == VT.BOOL:
            if any(v > 1 for v in values):
                raise self.fail(f"{what} holds a bool that is neither 0 nor 1")
            values = tuple(bool(v) for v in values)
        return values

    def value(self, code: int, what: str) -> MetadataValue:
        """One metadata value of type ``code`` (arrays may not hold arrays: real files never nest them)."""
        try:
            vtype = gguf.GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {code}") from None
        if vtype == VT.STRING:
            return MetadataValue(vtype, self.string(what, MAX_VALUE_STRING))
        if vtype != VT.ARRAY:
            return MetadataValue(vtype, self.scalars(vtype, 1, what)[0])
        item_code = self.unpack(_U32, f"{what} element type")
        count = self.unpack(_U64, f"{what} length")
        item = self.value_type(item_code, what)
        item_size = 8 if item == VT.STRING else struct.calcsize(_SCALAR_FORMATS[item])
        if count > self.left() // item_size:
            raise self.fail(f"{what} claims {count:,} {item.name} elements but only {self.left():,} header bytes "
                            "are left")
        self.count(count, what)
        if item == VT.STRING:
            items = self.strings(count, what)
        else:
            items = self.scalars(item, count, what)
        return MetadataValue(vtype, items, item)

    def value_type(self, code: int, what: str) -> gguf.GGUFValueType:
        try:
            vtype = gguf.GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown element type {code}") from None
        if vtype == VT.ARRAY:
            raise self.fail(f"{what} is an array of arrays, which is not supported")
        return vtype


def _read_preamble(r: _HeaderReader) -> tuple[int, int, int]:
    """Magic, version, tensor and kv counts, each checked; the counts against the bytes that follow."""
    if r.file_size < len(MAGIC):
        raise r.fail(f"file is {r.file_size} bytes, too short for a GGUF header")
    magic = r.take(4, "magic")
    if magic != MAGIC:
        raise r.fail(f"not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
    if r.file_size < FIXED_HEADER:
        raise r.fail(f"file is {r.file_size} bytes, too short for a GGUF header ({FIXED_HEADER} bytes)")
    version = r.unpack(_U32, "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, *VERSIONS):
            raise r.fail(f"big-endian GGUF is not supported (version field reads {version:#010x})")
        if version == 1:
            raise r.fail("GGUF version 1 is not supported (only versions 2 and 3)")
        raise r.fail(f"unknown GGUF version {version} (only versions 2 and 3 are read)")
    tensor_count = r.unpack(_U64, "tensor count")
    kv_count = r.unpack(_U64, "metadata count")
    left = r.file_size - FIXED_HEADER
    if kv_count > left // MIN_KV_BYTES:
        raise r.fail(f"header claims {kv_count:,} metadata entries but the {left:,} bytes left could hold at "
                     f"most {left // MIN_KV_BYTES:,}")
    if tensor_count > (left - kv_count * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:
        raise r.fail(f"header claims {tensor_count:,} tensors and {kv_count:,} metadata entries but the {left:,} "
                     "bytes left could not hold them")
    return version, tensor_count, kv_count


def _read_metadata(r: _HeaderReader, kv_count: int) -> tuple[dict[str, MetadataValue], list[tuple[str, bytes]]]:
    metadata: dict[str, MetadataValue] = {}
    raw: list[tuple[str, bytes]] = []
    for i in range(kv_count):
        start = r.pos
        key = r.string(f"metadata key {i}", MAX_NAME)
        what = f"metadata key {shortened(key)}"
        r.count(1, what)
        if not key:
            raise r.fail(f"metadata key {i} is empty")
        if key in metadata:
            raise r.fail(f"{what} appears twice (duplicate key)")
        metadata[key] = r.value(r.unpack(_U32, f"{what} type"), what)
        raw.append((key, bytes(r.buf[start:r.pos])))
    return metadata, raw


def _alignment(r: _HeaderReader, metadata: dict[str, MetadataValue]) -> int:
    entry = metadata.get(ALIGNMENT_KEY)
    if entry is None:
        return DEFAULT_ALIGNMENT
    if entry.type != VT.UINT32:
        raise r.fail(f"{ALIGNMENT_KEY} is {entry.type.name}, not UINT32")
    value = entry.value
    if value == 0 or value & (value - 1):
        raise r.fail(f"{ALIGNMENT_KEY} is {value}, not a power of two")
    return value


def _tensor_nbytes(r: _HeaderReader, name: str, ne: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``ne`` elements of ``qtype``: rows of whole blocks, no overflow past int64."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise r.fail(f"{qtype.name} packs {block} values a block but ne[0] is {ne[0]}", name)
    numel = 1
    for n in ne:
        numel *= n
        if numel > INT64_MAX:
            raise r.fail(f"shape {list(ne)} has more elements than int64 can count", name)
    return numel // block * type_size


def _read_tensor_info(r: _HeaderReader, index: int, seen: set[str]) -> tuple[str, tuple[int, ...], Any, int, int]:
    name = r.string(f"tensor {index} name", MAX_NAME)
    r.count(1, "tensor info", name)
    if name in seen:
        raise r.fail("appears twice in the tensor infos (duplicate name)", name)
    seen.add(name)
    n_dims = r.unpack(_U32, "dimension count", name)
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(f"has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}", name)
    ne = tuple(r.unpack(_U64, f"dimension {d}", name) for d in range(n_dims))
    if any(n > INT64_MAX for n in ne):
        raise r.fail(f"dimension in {list(ne)} exceeds int64", name)
    code = r.unpack(_U32, "type", name)
    try:
        qtype = gguf.GGMLQuantizationType(code)
    except ValueError:
        raise r.fail(f"unknown ggml type {code}", name) from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise r.fail(f"ggml type {qtype.name} has no known block size", name)
    offset = r.unpack(_U64, "data offset", name)
    return name, ne, qtype, offset, _tensor_nbytes(r, name, ne, qtype)


def _check_placement(r: _HeaderReader, tensors: list[GGUFTensor], data_start: int) -> None:
    """Every tensor lies inside the file, and no two tensors share a byte."""
    if tensors and data_start > r.file_size:
        raise r.fail(f"data section would start at byte {data_start:,}, past the end of the {r.file_size:,}-byte "
                     "file (truncated?)")
    for t in tensors:
        if t.end > r.file_size:
            raise r.fail(f"data runs to byte {t.end:,} but the file has {r.file_size:,} bytes (truncated?)", t.name)
    reach, last = data_start, None
    for t in sorted((t for t in tensors if t.nbytes), key=lambda t: (t.begin, t.end)):
        if t.begin < reach:
            raise r.fail(f"data overlaps tensor {shortened(last)} (bytes {t.begin:,} to {t.end:,})", t.name)
        reach, last = t.end, t.name


def parse_gguf_fd(fd: int, path: str | os.PathLike) -> GGUFFile:
    """Validate the header of the GGUF file open on ``fd`` (read from offset 0 with ``pread``)."""
    path = Path(path)
    try:
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        raise OrthopatchError(f"cannot read ({exc.strerror or exc})", path=path) from None
    r = _HeaderReader(fd, path, file_size)
    version, tensor_count, kv_count = _read_preamble(r)
    metadata, kv_raw = _read_metadata(r, kv_count)
    alignment = _alignment(r, metadata)
    infos_start = r.pos
    if tensor_count > r.left() // MIN_TENSOR_INFO_BYTES:
        raise r.fail(f"header claims {tensor_count:,} tensors but only {r.left():,} header bytes are left")
    seen: set[str] = set()
    infos = [_read_tensor_info(r, i, seen) for i in range(tensor_count)]
    header_end = r.pos
    data_start = align_up(header_end, alignment)
    tensors = []
    for name, ne, qtype, offset, nbytes in infos:
        if offset % alignment:
            raise r.fail(f"data offset {offset:,} is not a multiple of the alignment {alignment} (misaligned)", name)
        begin = data_start + offset
        tensors.append(GGUFTensor(name, ne, qtype, offset, nbytes, begin, begin + nbytes))
    _check_placement(r, tensors, data_start)
    return GGUFFile(path, version, alignment, metadata, tuple(kv_raw), bytes(r.buf[infos_start:header_end]),
                    tuple(tensors), header_end, data_start, file_size)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open ``path`` read-only, read just its header and validate it against the file's size."""
    path = Path(path)
    fd = open_regular(path, "GGUF file")
    try:
        return parse_gguf_fd(fd, path)
    finally:
        os.close(fd)

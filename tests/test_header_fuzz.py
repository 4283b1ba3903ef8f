"""The header parser, fed thousands of generated headers: a valid header or a HeaderError, nothing else.

Where our parser accepts a file, the format's reference reader (the safetensors library) must accept
it too and see the same tensors; where it refuses one the library reads, the reason must be one we
refuse on purpose (duplicate keys).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, deserialize

from orthopatch.errors import HeaderError
from orthopatch.io.safetensors_header import DTYPE_BITS, ShardHeader, parse_header, read_header

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["a", "b", "__metadata__", "", "model.layers.0.mlp.down_proj.weight"])
DTYPES = st.sampled_from(sorted(DTYPE_BITS)) | st.sampled_from(["BF17", "f32", "", "U128"]) | st.none() | st.integers()
DIMS = st.integers(0, 5) | st.sampled_from([-1, 2 ** 64, 2 ** 70]) | st.floats(allow_nan=False) | st.booleans()
SHAPES = st.lists(st.integers(0, 5), max_size=3) | st.lists(DIMS, max_size=3) | st.none() | st.text(max_size=3)


@st.composite
def header_files(draw) -> bytes:
    """A safetensors file whose header is valid, or broken in one or more of the ways files break."""
    names = draw(st.lists(NAMES, max_size=5, unique=True))
    doc: dict = {}
    offset = 0
    for name in names:
        rare = draw(st.integers(0, 15))  # most entries are well formed, so that most files get far
        dtype = draw(DTYPES if rare == 0 else st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(SHAPES if rare == 1 else st.lists(st.integers(0, 5), max_size=3))
        size = 0
        if isinstance(dtype, str) and dtype in DTYPE_BITS and isinstance(shape, list) \
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 5 for s in shape):
            size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        offsets: object = [offset, offset + size]
        if rare == 2:
            offsets = draw(st.sampled_from([[offset + 1, offset + size + 1], [offset, offset + size - 1],
                                            [offset + size, offset], [offset], [-1, size], [0.5, 1], None,
                                            [True, 1], [offset, offset + size, 0]]))
        offset += size
        entry: object = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if rare == 3:
            entry = draw(st.sampled_from([[], "x", None, 3, {"dtype": dtype}]))
        doc[name] = entry
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
                                   if draw(st.integers(0, 7)) else st.sampled_from([{"format": 1}, [], "pt", None]))
    order = draw(st.permutations(list(doc)))
    text = json.dumps({k: doc[k] for k in order}, ensure_ascii=draw(st.booleans()))
    mutation = draw(st.integers(0, 15)) - 8  # below 0: none
    if mutation == 0 and names:  # a duplicate key
        text = text[:-1] + f", {json.dumps(names[0])}: {json.dumps(doc[names[0]])}" + "}"
    elif mutation == 1:  # cut anywhere
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == 2:  # a lone surrogate escape
        text = text.replace("{", '{"\\ud800": 1, ', 1)
    elif mutation == 3:  # deep nesting
        text = "{" + '"a":' * 0 + "[" * 3000 + "]" * 3000 + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw += b" " * (-len(raw) % 8)
    n = len(raw)
    if mutation == 4:
        n = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 1000, 100_000_001, 2 ** 64 - 1]))
    elif mutation == 5 and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    body = bytes(offset)
    if mutation == 6:
        body = body[: draw(st.integers(0, len(body)))]
    elif mutation == 7:
        body += b"\0" * draw(st.integers(1, 9))
    return struct.pack("<Q", max(0, min(n, 2 ** 64 - 1))) + raw + body


def parse(data: bytes) -> ShardHeader | HeaderError:
    try:
        return parse_header(data, len(data), "fuzz.safetensors")
    except HeaderError as exc:
        assert str(exc).startswith("fuzz.safetensors: ") and "\n" not in str(exc)
        return exc


def check_valid(header: ShardHeader, data: bytes, file_size: int | None = None) -> None:
    """The tensors tile the data buffer from the header's end to the end of the file, without gaps."""
    file_size = len(data) if file_size is None else file_size
    assert header.raw == data[:header.data_start]
    cursor = header.data_start
    names = set()
    for t in header.tensors:
        assert t.begin == cursor and t.dtype in DTYPE_BITS and t.name not in names
        assert t.nbytes * 8 == t.numel * DTYPE_BITS[t.dtype]
        names.add(t.name)
        cursor = t.end
    assert cursor == file_size == header.file_size


def reference_reads(data: bytes) -> dict | None:
    try:
        return {name: (info["dtype"], list(info["shape"])) for name, info in deserialize(data)}
    except (SafetensorError, ValueError, OverflowError, RuntimeError):
        return None


@settings(FUZZ, max_examples=2500)
@given(header_files())
def test_generated_headers(data: bytes) -> None:
    result = parse(data)
    theirs = reference_reads(data)
    if isinstance(result, ShardHeader):
        check_valid(result, data)
        assert theirs == {t.name: (t.dtype, list(t.shape)) for t in result.tensors}
    elif theirs is not None:
        assert "duplicate key" in result.message, (result, theirs)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    result = parse(data)
    if isinstance(result, ShardHeader):
        check_valid(result, data)


#: Headers that parse, with the file each one needs: lengths and sizes near them reach every check.
GOOD_HEADERS = [(b"{}", b""), (b"{}  ", b""), (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy")]


@st.composite
def length_and_size(draw) -> tuple[bytes, int, int]:
    """Bytes after the length field, the length field, and the file size: random, or near a good header."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64)), draw(st.integers(0, 2 ** 64 - 1)), draw(st.integers(0, 2 ** 40))
    text, body = draw(st.sampled_from(GOOD_HEADERS))
    n = len(text) + draw(st.integers(-2, 2))
    file_size = 8 + len(text) + len(body) + draw(st.sampled_from([0, 0, -1, 1, 1000]))
    return text + body, max(n, 0), file_size


@FUZZ
@given(length_and_size())
def test_random_length_and_size(case: tuple[bytes, int, int]) -> None:
    """Any length field against any file size: a one-line HeaderError naming the file, or a header
    read entirely from the given bytes whose tensors fill the file exactly."""
    tail, n, file_size = case
    data = struct.pack("<Q", n) + tail
    try:
        header = parse_header(data, file_size, "x")
    except HeaderError as exc:
        assert str(exc).startswith("x: ") and "\n" not in str(exc)
        return
    event("parsed")
    assert header.data_start == 8 + n <= len(data)
    check_valid(header, data, file_size)


@settings(max_examples=200, deadline=None)
@given(header_files())
def test_files_on_disk(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(data)
    try:
        header = read_header(path)
    except HeaderError as exc:
        assert str(exc).startswith(str(path))
        return
    check_valid(header, data)


@pytest.mark.parametrize("data, message", [
    (b"", "too short"),
    (struct.pack("<Q", 2) + b"{}", None),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 4) + b" {} ", "not a JSON object"),
    (struct.pack("<Q", 12) + b'{"a":1,"a":1', "not valid JSON"),
    (struct.pack("<Q", 8) + b'{"\\ud800":{}}'[:8], "not valid JSON"),
])
def test_edges(data: bytes, message: str | None) -> None:
    result = parse(data)
    if message is None:
        assert isinstance(result, ShardHeader) and result.tensors == ()
    else:
        assert isinstance(result, HeaderError) and message in result.message

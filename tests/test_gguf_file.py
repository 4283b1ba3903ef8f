"""The GGUF container layer: valid files read as llama.cpp's gguf-py reads them, hostile ones refused
in one line naming the file, split models found and checked, and the patched header placing the data
section where unchanged tensors keep their position within a filesystem block.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthopatch.errors import OrthopatchError
from orthopatch.gguf import container
from orthopatch.gguf.container import GGUFFile, read_gguf
from orthopatch.gguf.layout import PADDING_KEY, OutputLayout, plan_output, write_gguf_header
from orthopatch.gguf.split import open_split

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

#: A tiny llama: (name, type, torch-order shape), quantized ones written as raw bytes of the right size.
LLAMA = [
    ("token_embd.weight", QT.F16, (16, 64)),
    ("blk.0.attn_norm.weight", QT.F32, (64,)),
    ("blk.0.attn_q.weight", QT.Q8_0, (64, 64)),
    ("blk.0.ffn_down.weight", QT.Q4_K, (64, 256)),
    ("blk.0.ffn_up.weight", QT.Q6_K, (256, 256)),
    ("output_norm.weight", QT.F32, (64,)),
    ("output.weight", QT.BF16, (16, 64)),
]


def tensor_bytes(qtype: QT, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random bytes of a ``qtype`` tensor of torch-order ``shape``, as a uint8 array gguf-py writes raw."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = math.prod(shape[:-1])
    return np.random.default_rng(seed).integers(0, 256, (rows, shape[-1] // block * size), dtype=np.uint8)


def write_model(path: Path, *, alignment: int | None = None, tensors=LLAMA, split_max_tensors: int = 0,
                extra: dict[str, str] | None = None) -> Path:
    """A GGUF file written by gguf-py with llama-like metadata of every value type and ``tensors``."""
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.utf8", "héllo ✓ \U0001f600")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, 4.0])
    w.add_array("tokenizer.ggml.token_type", [1, 3, 1, 1, 1])
    w.add_array("t.empty", [])
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for i, (name, qtype, shape) in enumerate(tensors):
        raw = tensor_bytes(qtype, shape, i)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# -- agreement with gguf-py on valid files -----------------------------------------------------------------------


def assert_agrees_with_gguf_py(f: GGUFFile) -> None:
    reader = gguf.GGUFReader(f.path)
    assert [t.name for t in f.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(f.tensors, reader.tensors, strict=True):
        assert ours.shape_ggml == tuple(int(n) for n in theirs.shape)
        assert ours.shape == tuple(reversed(ours.shape_ggml))
        assert ours.qtype == theirs.tensor_type
        assert ours.begin == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes == ours.end - ours.begin
        assert ours.offset == ours.begin - f.data_start
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(f.metadata)
    for key, field in fields.items():
        ours = f.metadata[key]
        assert ours.type == field.types[0], key
        if ours.type == VT.ARRAY:
            assert ours.item_type == (field.types[1] if len(field.types) > 1 else ours.item_type), key
            assert list(ours.value) == list(field.contents()), key
        else:
            assert ours.value == field.contents(), key
    assert f.alignment == reader.alignment
    assert f.data_start == reader.data_offset
    assert dict(f.kv_raw).keys() == f.metadata.keys()


@pytest.mark.parametrize("alignment", [None, 1, 8, 64, 4096])
def test_valid_files_read_as_gguf_py_reads_them(tmp_path: Path, alignment: int | None) -> None:
    f = read_gguf(write_model(tmp_path / "m.gguf", alignment=alignment))
    assert f.version == 3
    assert f.alignment == (alignment or 32)
    assert f.data_start % f.alignment == 0 and f.data_start >= f.header_end
    assert f.value("t.u64") == 2**63 + 5 and f.value("t.bool") is True and f.value("t.utf8") == "héllo ✓ \U0001f600"
    assert f.by_name["blk.0.ffn_down.weight"].shape == (64, 256)
    assert f.by_name["blk.0.ffn_down.weight"].nbytes == 64 * 144
    assert_agrees_with_gguf_py(f)


def test_kv_raw_is_the_bytes_on_disk(model: Path) -> None:
    f = read_gguf(model)
    data = model.read_bytes()
    joined = b"".join(raw for _, raw in f.kv_raw)
    assert data[container.FIXED_HEADER:container.FIXED_HEADER + len(joined)] == joined
    assert data[container.FIXED_HEADER + len(joined):f.header_end] == f.tensor_infos_raw


def test_a_zero_sized_dimension_gives_an_empty_tensor(tmp_path: Path) -> None:
    path = tmp_path / "zero.gguf"
    path.write_bytes(handmade(tensors=[(b"empty", [0, 4], QT.F32, 0), (b"x", [8], QT.F32, 0)], data=bytes(32)))
    f = read_gguf(path)
    assert f.by_name["empty"].nbytes == 0 and f.by_name["empty"].shape == (4, 0)
    assert f.by_name["x"].nbytes == 32


def test_version_2_reads_like_version_3(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(handmade(version=2, tensors=[(b"x", [8], QT.F32, 0)], data=bytes(32)))
    assert read_gguf(path).version == 2


# -- hostile files ---------------------------------------------------------------------------------------------


def gstr(text: bytes | str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tinfo(name: bytes | str, ne: list[int], qtype: int, offset: int) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)


def handmade(*, version: int = 3, kvs: list[bytes] | None = None, tensors: list | None = None, data: bytes = b"",
             tensor_count: int | None = None, kv_count: int | None = None, alignment: int = 32) -> bytes:
    """A GGUF file assembled byte by byte, so that every count, length and offset can lie."""
    kvs = [kv("general.architecture", VT.STRING, gstr("llama"))] if kvs is None else kvs
    tensors = tensors or []
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    head += b"".join(kvs) + b"".join(tinfo(*t) for t in tensors)
    return head + bytes(-len(head) % alignment) + data


F32_X = (b"x", [8], QT.F32, 0)
U32 = struct.Struct("<I")

HOSTILE = {
    "empty file": (b"", "too short"),
    "only the magic": (b"GGUF\x03\x00", "too short"),
    "another format": (b"\x89PNG" + bytes(40), "not a GGUF file"),
    "version 1": (handmade(version=1), "version 1 is not supported"),
    "version 7": (handmade(version=7), "unknown GGUF version 7"),
    "big-endian v3": (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + bytes(40), "big-endian GGUF is not supported"),
    "big-endian v2": (b"GGUF" + struct.pack(">IQQ", 2, 0, 0) + bytes(40), "big-endian GGUF is not supported"),
    "2^63 tensors": (handmade(tensor_count=2**63), "claims 9,223,372,036,854,775,808 tensors"),
    "2^64-1 kvs": (handmade(kv_count=2**64 - 1), "metadata entries"),
    "tensor count past the header": (handmade(tensor_count=2, tensors=[F32_X], data=bytes(2000)), "tensor"),
    "key claims 4 GiB": (handmade(kvs=[struct.pack("<Q", 1 << 32) + b"abc"]), "more than the 65,536 accepted"),
    "value string claims 2^40 bytes": (handmade(kvs=[kv("k", VT.STRING, struct.pack("<Q", 1 << 40))]),
                                       "more than the 67,108,864 accepted"),
    "value string runs past the end": (handmade(kvs=[kv("k", VT.STRING, struct.pack("<Q", 1 << 20) + b"abc")]),
                                       "truncated"),
    "array of arrays": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", 4, 0))]),
                        "array of arrays"),
    "array count past the end": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**62))]),
                                 "elements but only"),
    "string array count past the end": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**40))]),
                                        "elements but only"),
    "unknown array element type": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", 99, 0))]),
                                   "unknown element type 99"),
    "unknown value type": (handmade(kvs=[kv("k", 13, b"\x00" * 8)]), "unknown value type 13"),
    "invalid utf-8 key": (handmade(kvs=[kv(b"k\xff", VT.UINT8, b"\x01")]), "not valid UTF-8"),
    "invalid utf-8 value": (handmade(kvs=[kv("k", VT.STRING, gstr(b"\xc3\x28"))]), "not valid UTF-8"),
    "invalid utf-8 in a string array": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2) + gstr("a")
                                                       + gstr(b"\x80"))]), "element 1 is not valid UTF-8"),
    "string array element claims 2^40 bytes": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQQ", VT.STRING, 1,
                                                                                         2**40))]),
                                               "element 0 claims 1,099,511,627,776 bytes"),
    "string array element runs past the end": (handmade(kvs=[kv("k", VT.ARRAY, struct.pack("<IQQ", VT.STRING, 1,
                                                                                         100))]), "truncated"),
    "invalid utf-8 tensor name": (handmade(tensors=[(b"\xed\xa0\x80", [8], QT.F32, 0)], data=bytes(32)),
                                  "not valid UTF-8"),
    "empty key": (handmade(kvs=[kv("", VT.UINT8, b"\x01")]), "is empty"),
    "duplicate key": (handmade(kvs=[kv("k", VT.UINT8, b"\x01"), kv("k", VT.UINT8, b"\x02")]), "duplicate key"),
    "bool 2": (handmade(kvs=[kv("k", VT.BOOL, b"\x02")]), "neither 0 nor 1"),
    "alignment 0": (handmade(kvs=[kv("general.alignment", VT.UINT32, U32.pack(0))]), "not a power of two"),
    "alignment 48": (handmade(kvs=[kv("general.alignment", VT.UINT32, U32.pack(48))]), "not a power of two"),
    "alignment as a string": (handmade(kvs=[kv("general.alignment", VT.STRING, gstr("32"))]), "not UINT32"),
    "duplicate tensor name": (handmade(tensors=[F32_X, (b"x", [8], QT.F32, 32)], data=bytes(64)), "duplicate name"),
    "0 dimensions": (handmade(tensors=[(b"x", [], QT.F32, 0)], data=bytes(64)), "has 0 dimensions"),
    "5 dimensions": (handmade(tensors=[(b"x", [1, 1, 1, 1, 1], QT.F32, 0)], data=bytes(64)), "has 5 dimensions"),
    "dimension past int64": (handmade(tensors=[(b"x", [2**63], QT.I8, 0)], data=bytes(64)), "exceeds int64"),
    "element count overflows": (handmade(tensors=[(b"x", [2**32, 2**32, 2**32], QT.F32, 0)], data=bytes(64)),
                                "more elements than int64"),
    "huge tensor": (handmade(tensors=[(b"x", [2**40, 2**20], QT.F32, 0)], data=bytes(64)), "truncated"),
    "unknown ggml type 4": (handmade(tensors=[(b"x", [32], 4, 0)], data=bytes(64)), "unknown ggml type 4"),
    "unknown ggml type 2^32-1": (handmade(tensors=[(b"x", [32], 2**32 - 1, 0)], data=bytes(64)),
                                 "unknown ggml type 4294967295"),
    "partial Q8_0 block": (handmade(tensors=[(b"x", [33, 2], QT.Q8_0, 0)], data=bytes(128)), "packs 32 values"),
    "misaligned data": (handmade(tensors=[(b"x", [8], QT.F32, 4)], data=bytes(64)), "misaligned"),
    "tensor past the end": (handmade(tensors=[(b"x", [8], QT.F32, 32)], data=bytes(40)), "truncated"),
    "offset 2^64-32": (handmade(tensors=[(b"x", [8], QT.F32, 2**64 - 32)], data=bytes(40)), "truncated"),
    "overlapping tensors": (handmade(tensors=[(b"a", [16], QT.F32, 0), (b"b", [8], QT.F32, 32)], data=bytes(64)),
                            "overlaps tensor 'a'"),
    "same offset": (handmade(tensors=[(b"a", [8], QT.F32, 0), (b"b", [8], QT.F32, 0)], data=bytes(64)), "overlaps"),
    "header only, data missing": (handmade(tensors=[(b"x", [8], QT.F32, 0)], alignment=1), "truncated"),
    "truncated tensor info": (handmade(tensors=[(b"n" * 40, [8, 1, 1, 1], QT.F32, 0)], data=bytes(32))[:130],
                              "truncated: dimension 1 at byte 129"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    data, expected = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(OrthopatchError) as info:
        read_gguf(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message and "\n" not in message


def test_a_truncated_header_is_refused_at_every_length(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    f = read_gguf(model)
    path = tmp_path / "cut.gguf"
    for cut in sorted({*range(0, 64), *range(64, f.header_end, 7), f.header_end - 1, f.data_start,
                       f.tensors[-1].end - 1}):
        path.write_bytes(data[:cut])
        with pytest.raises(OrthopatchError, match="too short|truncated") as info:
            read_gguf(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_tensor_name_is_named_in_its_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(handmade(tensors=[(b"blk.0.attn_q.weight", [8], QT.F32, 4)], data=bytes(64)))
    with pytest.raises(OrthopatchError, match=r"tensor 'blk.0.attn_q.weight': data offset 4") as info:
        read_gguf(path)
    assert info.value.tensor == "blk.0.attn_q.weight"


def test_a_key_is_named_in_its_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(handmade(kvs=[kv("tokenizer.chat_template", VT.STRING, gstr(b"\xff"))]))
    with pytest.raises(OrthopatchError, match="metadata key 'tokenizer.chat_template' is not valid UTF-8"):
        read_gguf(path)


def test_a_header_past_the_limit_is_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 200)
    with pytest.raises(OrthopatchError, match="header runs past 200 bytes"):
        read_gguf(model)


@pytest.mark.parametrize(("limit", "at"), [(10, "metadata key 't.u64'"), (20, "tokenizer.ggml.tokens"),
                                           (38, "tensor info")])
def test_too_many_values_are_refused(model: Path, monkeypatch: pytest.MonkeyPatch, limit: int, at: str) -> None:
    """A header of millions of tiny values would cost far more memory decoded than on disk."""
    monkeypatch.setattr(container, "MAX_ITEMS", limit)
    with pytest.raises(OrthopatchError, match=f"header holds more than {limit} values \\(at .*{at}"):
        read_gguf(model)


def test_reads_only_the_header(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded reads: nothing past the header is asked for, however large the data section."""
    reads: list[tuple[int, int]] = []
    real = os.pread

    def spy(fd: int, n: int, offset: int) -> bytes:
        reads.append((n, offset))
        return real(fd, n, offset)

    monkeypatch.setattr(container.os, "pread", spy)
    monkeypatch.setattr(container, "_READ_CHUNK", 64)
    f = read_gguf(model)
    assert reads and max(offset + n for n, offset in reads) <= f.header_end + 64


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(OrthopatchError, match="is a folder"):
        read_gguf(tmp_path)
    with pytest.raises(OrthopatchError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


# -- fuzzing ---------------------------------------------------------------------------------------------------

_SMALL = [("a", QT.F32, (2, 8)), ("b", QT.Q8_0, (2, 32)), ("c", QT.F16, (4,))]


def _small_model() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write_model(Path(tmp) / "s.gguf", tensors=_SMALL).read_bytes()


SMALL_MODEL = _small_model()
_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 0x7F, 0xFF, 0xFFFF, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


def _field_starts(data: bytes) -> list[int]:
    """Where the counts, each kv entry and each tensor info start: the places where a lie matters most."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.gguf"
        path.write_bytes(data)
        f = read_gguf(path)
    starts, at = [], container.FIXED_HEADER
    for _, raw in f.kv_raw:
        starts.append(at)
        at += len(raw)
    for t in f.tensors:
        starts.append(at)
        at += 8 + len(t.name.encode()) + 4 + 8 * len(t.shape_ggml) + 4 + 8
    assert at == f.header_end
    return [*starts, f.header_end, f.data_start, 16, 8, 4, 0]


FIELD_STARTS = _field_starts(SMALL_MODEL)


@st.composite
def mutated(draw) -> bytes:
    """The small model with a few bytes overwritten, a little-endian integer planted, bytes inserted or its
    tail cut; most often at or just after the start of a count, kv entry or tensor info."""
    data = bytearray(SMALL_MODEL)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 3))
        if draw(st.integers(0, 3)) < 3:
            at = min(draw(st.sampled_from(FIELD_STARTS)) + draw(st.integers(0, 28)), len(data) - 1)
        else:
            at = draw(st.integers(0, len(data) - 1))
        if kind == 0:
            data[at] = draw(st.integers(0, 255))
        elif kind == 1:
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(_SIZES)) % (1 << (8 * width))
            data[at:at + width] = value.to_bytes(width, "little")
        elif kind == 2:
            del data[max(at, 1):]
        else:
            data[at:at] = bytes(draw(st.integers(1, 40)))
    return bytes(data)


def check_invariants(f: GGUFFile) -> None:
    assert f.data_start % f.alignment == 0 and f.header_end <= f.data_start
    assert len({t.name for t in f.tensors}) == len(f.tensors)
    spans = sorted((t.begin, t.end) for t in f.tensors if t.nbytes)
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert end <= begin
    for t in f.tensors:
        assert f.data_start <= t.begin <= t.end <= f.file_size
        assert t.offset % f.alignment == 0 and 1 <= len(t.shape_ggml) <= 4


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_fuzzed_files_parse_or_are_refused(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gguf"
        path.write_bytes(data)
        started = time.monotonic()
        try:
            f = read_gguf(path)
        except OrthopatchError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:
            check_invariants(f)
        assert time.monotonic() - started < 5


# -- the patched output's header -------------------------------------------------------------------------------


def write_patched(layout: OutputLayout, out: Path) -> None:
    """The source's data section behind the planned header, as a patch that changes no byte would write."""
    src = layout.src
    with open(src.path, "rb") as f:
        f.seek(src.data_start)
        data = f.read()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_gguf_header(fd, layout, out)
        os.pwrite(fd, data, layout.data_start)
    finally:
        os.close(fd)


def test_patched_header_keeps_tensors_and_metadata(model: Path, tmp_path: Path) -> None:
    src = read_gguf(model)
    extra = {"general.name": "tiny (patched)", "orthopatch.version": "0.1", "orthopatch.direction": "ré ✓"}
    layout = plan_output(src, extra)
    assert len(layout.header) == layout.data_start
    out = tmp_path / "out.gguf"
    write_patched(layout, out)

    got = read_gguf(out)
    assert_agrees_with_gguf_py(got)
    assert got.data_start == layout.data_start == src.data_start + layout.shift
    assert [t.begin for t in got.tensors] == list(layout.begins)
    assert layout.begin("output.weight") == src.by_name["output.weight"].begin + layout.shift
    assert got.tensor_infos_raw == src.tensor_infos_raw
    # Every source entry kept in order and byte for byte, general.name replaced in place, ours appended.
    expected_keys = [*src.metadata, "orthopatch.version", "orthopatch.direction", PADDING_KEY]
    assert list(got.metadata) == expected_keys
    for (key, raw), (_, new_raw) in zip(src.kv_raw, got.kv_raw, strict=False):
        assert new_raw == raw or key == "general.name"
    assert got.value("general.name") == "tiny (patched)" and got.value("orthopatch.direction") == "ré ✓"
    assert got.value(PADDING_KEY) == " " * layout.padding

    reader_src, reader_out = gguf.GGUFReader(model), gguf.GGUFReader(out)
    for a, b in zip(reader_src.tensors, reader_out.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert bytes(a.data.view(np.uint8).ravel()) == bytes(b.data.view(np.uint8).ravel())
        assert (b.data_offset - a.data_offset) % 4096 == 0
    assert reader_out.fields["general.name"].contents() == "tiny (patched)"
    assert reader_out.fields["orthopatch.version"].contents() == "0.1"


def test_patching_a_patched_file_reuses_its_padding_entry(model: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.gguf"
    write_patched(plan_output(read_gguf(model), {"orthopatch.run": "1"}), first)
    src = read_gguf(first)
    layout = plan_output(src, {"orthopatch.run": "2", "orthopatch.more": "x" * 300})
    second = tmp_path / "second.gguf"
    write_patched(layout, second)
    got = read_gguf(second)
    assert list(got.metadata) == [*src.metadata, "orthopatch.more"]
    assert got.value("orthopatch.run") == "2"
    assert_agrees_with_gguf_py(got)


@pytest.mark.parametrize("alignment", [None, 1, 64, 4096, 16384])
@pytest.mark.parametrize("block", [4096, 512, 1000])
def test_shift_is_a_multiple_of_block_and_alignment(tmp_path: Path, alignment: int | None, block: int) -> None:
    """For many header sizes, the padding places data at the least such shift, and readers agree."""
    src = read_gguf(write_model(tmp_path / "m.gguf", alignment=alignment, tensors=LLAMA[:3]))
    step = math.lcm(block, src.alignment)
    out = tmp_path / "out.gguf"
    for n in [*range(0, 80), *range(80, 2 * step + 64, max(1, step // 13))]:
        extra = {"orthopatch.k" + "k" * (n % 7): "v" * n}
        layout = plan_output(src, extra, block=block)
        shift = layout.shift
        assert shift >= 0 and shift % block == 0 and shift % src.alignment == 0
        h0 = layout.header_end - layout.padding
        assert shift == 0 or layout.data_start - step < h0  # the least shift
        assert container.align_up(layout.header_end, src.alignment) == layout.data_start
        assert 0 <= layout.padding < step
        write_patched(layout, out)
        got = read_gguf(out)
        assert got.data_start == layout.data_start and got.header_end == layout.header_end
        assert [t.begin for t in got.tensors] == list(layout.begins)
    assert_agrees_with_gguf_py(got)


@pytest.mark.parametrize(("extra", "expected"), [
    ({PADDING_KEY: "x"}, "reserved"),
    ({"llama.block_count": "2"}, "is UINT32 in the source"),
    ({"general.alignment": "64"}, "is reserved"),
    ({"split.count": "2"}, "is reserved"),
    ({"": "x"}, "empty or too long"),
    ({"k" * 70000: "x"}, "empty or too long"),
    ({"k\ud800": "x"}, "not valid Unicode"),
    ({"k": 3}, "strings to strings"),
])
def test_plan_output_refuses_bad_metadata(model: Path, extra: dict, expected: str) -> None:
    with pytest.raises(OrthopatchError, match=expected) as info:
        plan_output(read_gguf(model), extra)
    assert "\n" not in str(info.value) and str(model) in str(info.value)


def test_plan_output_refuses_a_bad_block(model: Path) -> None:
    with pytest.raises(OrthopatchError, match="block size"):
        plan_output(read_gguf(model), {}, block=0)
    with pytest.raises(OrthopatchError, match="more than a GGUF reader accepts"):
        plan_output(read_gguf(model), {"orthopatch.x": "y"}, block=1 << 30)


def test_write_gguf_header_reports_a_failed_write(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"")
    fd = os.open(out, os.O_RDONLY)
    try:
        with pytest.raises(OrthopatchError, match=r"out.gguf: cannot write the GGUF header \(Bad file descriptor\)"):
            write_gguf_header(fd, plan_output(read_gguf(model), {}), out)
    finally:
        os.close(fd)


# -- split models ----------------------------------------------------------------------------------------------


@pytest.fixture()
def split_model(tmp_path: Path) -> list[Path]:
    write_model(tmp_path / "tiny.gguf", split_max_tensors=3)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return parts


def test_split_parts_are_found_in_order(split_model: list[Path]) -> None:
    parts = open_split(split_model[0])
    assert [p.path for p in parts] == split_model
    assert [p.value("split.no") for p in parts] == [0, 1, 2]
    assert [t.name for p in parts for t in p.tensors] == [name for name, _, _ in LLAMA]
    for p in parts:
        assert_agrees_with_gguf_py(p)


def test_a_plain_file_is_a_list_of_one(model: Path) -> None:
    [only] = open_split(model)
    assert only.path == model


def test_a_later_part_is_refused(split_model: list[Path]) -> None:
    with pytest.raises(OrthopatchError, match="is part 2 of 3 of a split model; give the first part, "
                                              "tiny-00001-of-00003.gguf"):
        open_split(split_model[1])


def test_a_missing_part_is_refused(split_model: list[Path]) -> None:
    split_model[2].unlink()
    with pytest.raises(OrthopatchError, match="tiny-00003-of-00003.gguf: part 3 of 3 of the split model is missing"):
        open_split(split_model[0])


def test_a_part_whose_metadata_disagrees_is_refused(split_model: list[Path]) -> None:
    shutil.copyfile(split_model[1], split_model[2])
    with pytest.raises(OrthopatchError, match="named as part 3 of 3 but its metadata says part 2 of 3"):
        open_split(split_model[0])


def test_a_renamed_split_is_refused(split_model: list[Path], tmp_path: Path) -> None:
    renamed = tmp_path / "tiny-00001-of-00002.gguf"
    split_model[0].rename(renamed)
    with pytest.raises(OrthopatchError, match="named as part 1 of 2 but its metadata says part 1 of 3"):
        open_split(renamed)
    plain = tmp_path / "plain.gguf"
    renamed.rename(plain)
    with pytest.raises(OrthopatchError, match="part of a 3-part split model but is not named like one"):
        open_split(plain)


def test_a_split_name_without_split_metadata_is_refused(model: Path, tmp_path: Path) -> None:
    first = tmp_path / "m-00001-of-00002.gguf"
    shutil.copyfile(model, first)
    shutil.copyfile(model, tmp_path / "m-00002-of-00002.gguf")
    with pytest.raises(OrthopatchError, match="has no split.no/split.count metadata"):
        open_split(first)
    single = tmp_path / "s-00001-of-00001.gguf"
    shutil.copyfile(model, single)
    assert len(open_split(single)) == 1


def test_a_tensor_in_two_parts_is_refused(tmp_path: Path) -> None:
    tensors = [("a", QT.F32, (8,)), ("b", QT.F32, (8,))]
    write_model(tmp_path / "x.gguf", tensors=tensors, split_max_tensors=1)
    # x's second part swapped for one that says it is part 2 of 2 but holds "a" too.
    write_model(tmp_path / "z.gguf", tensors=[("c", QT.F32, (8,)), ("a", QT.F32, (8,))], split_max_tensors=1)
    shutil.copyfile(tmp_path / "z-00002-of-00002.gguf", tmp_path / "x-00002-of-00002.gguf")
    with pytest.raises(OrthopatchError, match="tensor 'a': also in x-00001-of-00002.gguf"):
        open_split(tmp_path / "x-00001-of-00002.gguf")

"""The files of a GGUF output, read with gguf-py's ``GGUFReader``: parts, record, metadata, expected targets.

Nothing here uses orthopatch's own GGUF parser or plan: split parts are found from ``split.count`` as
llama.cpp names them, the record is the JSON under ``orthopatch.record``, and the tensors a conversion
must have patched are derived again from ``orthopatch/gguf/architectures.json`` read as data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.gguf.container import read_gguf
from orthopatch.patch.plan import Selection
from orthopatch.patch.record import ConversionRecord, Method
from orthopatch.verify.report import VerifyReport

#: The metadata key of the conversion record.
RECORD_KEY = "orthopatch.record"
#: Keys gguf-py's reader adds for the file header; the key count differs by the output's own keys.
HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


@dataclass(frozen=True)
class Part:
    """One GGUF file, opened by gguf-py."""

    path: Path
    reader: gguf.GGUFReader

    @property
    def tensors(self) -> dict[str, gguf.ReaderTensor]:
        return {t.name: t for t in self.reader.tensors}

    def value(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None or not field.types:
            return None
        return field.contents()


def open_part(path: Path) -> Part:
    """``path`` read by gguf-py; a one-line error for anything it refuses.

    The header is first checked by the strict reader (every count, length and offset against the file's
    size), which computes nothing: gguf-py's reader trusts counts and would allocate what a hostile file
    claims before refusing it."""
    if not path.is_file():
        raise OrthopatchError("no such file" if not path.exists() else "is not a regular file", path=path)
    read_gguf(path)
    try:
        return Part(path, gguf.GGUFReader(path))
    except Exception as exc:  # gguf-py's own refusal: not a GGUF, truncated, malformed
        raise OrthopatchError(f"gguf-py cannot read it as a GGUF file ({first_line(exc)})", path=path) from None


def open_parts(first: Path) -> list[Part]:
    """The file and, for a split model, every part ``split.count`` announces (all must be present)."""
    head = open_part(first)
    count, index = head.value(gguf.Keys.Split.LLM_KV_SPLIT_COUNT), head.value(gguf.Keys.Split.LLM_KV_SPLIT_NO)
    if count is None:
        return [head]
    if not isinstance(count, int) or count < 1 or index != 0:
        raise OrthopatchError(f"is part {index} of a split model with split.count {count}: give the first part",
                              path=first)
    stem = first.name.removesuffix(".gguf").rsplit("-00001-of-", 1)[0]
    names = [first] if count == 1 else [first.with_name(f"{stem}-{k:05d}-of-{count:05d}.gguf")
                                        for k in range(1, count + 1)]
    if names[0] != first:
        raise OrthopatchError(f"is not named as the first of {count} split parts (NAME-00001-of-{count:05d}.gguf)",
                              path=first)
    parts = [head]
    for k, path in enumerate(names[1:], start=1):
        if not path.exists():
            raise OrthopatchError(f"part {k + 1} of {count} is missing", path=path)
        part = open_part(path)
        if part.value(gguf.Keys.Split.LLM_KV_SPLIT_NO) != k or part.value(gguf.Keys.Split.LLM_KV_SPLIT_COUNT) != count:
            raise OrthopatchError(f"is not part {k + 1} of {count} (its split.no or split.count differ)", path=path)
        parts.append(part)
    return parts


def record_doc(part: Part) -> dict[str, Any]:
    """The JSON of ``orthopatch.record``; a one-line error where it is missing or not a JSON object."""
    text = part.value(RECORD_KEY)
    if text is None:
        raise OrthopatchError(f"has no {RECORD_KEY} metadata: not written by orthopatch apply", path=part.path)
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError as exc:
        raise OrthopatchError(f"its {RECORD_KEY} is not JSON ({first_line(exc)})", path=part.path) from None
    if not isinstance(doc, dict):
        raise OrthopatchError(f"its {RECORD_KEY} is not a JSON object", path=part.path)
    return doc


def read_record(part: Part) -> ConversionRecord:
    """The conversion record of an output, checked strictly as ``orthopatch.json`` is."""
    return ConversionRecord.from_json(record_doc(part), path=f"{part.path} ({RECORD_KEY})")


# --- metadata ----------------------------------------------------------------------------------------

def _raw(field: gguf.ReaderField) -> bytes:
    return b"".join(field.parts[i].tobytes() for i in field.data)


def compare_metadata(report: VerifyReport, src: Part, out: Part) -> None:
    """Every key of the source in the output, in order, with the same types and values; nothing else but
    ``orthopatch.*`` keys (the header's key count differs by exactly those)."""
    src_keys = [k for k in src.reader.fields if k not in HEADER_FIELDS]
    out_keys = [k for k in out.reader.fields if k not in HEADER_FIELDS and not k.startswith("orthopatch.")]
    if src_keys != out_keys:
        odd = next((a for a, b in zip(src_keys, out_keys, strict=False) if a != b), None)
        odd = odd or next(iter(set(src_keys) ^ set(out_keys)), "?")
        report.fail(f"metadata keys differ from the source's (first at {odd!r})", path=out.path)
    for key in src_keys:
        a, b = src.reader.fields[key], out.reader.fields.get(key)
        if b is None:
            continue
        if list(a.types) != list(b.types):
            names = [t.name for t in b.types], [t.name for t in a.types]
            report.fail(f"metadata {key!r} is of type {names[0]}, the source's of {names[1]}", path=out.path)
        elif _raw(a) != _raw(b) or a.contents() != b.contents():
            report.fail(f"metadata {key!r} differs from the source's", path=out.path)
    extra = sum(1 for k in out.reader.fields if k.startswith("orthopatch."))
    for key in ("GGUF.version", "GGUF.tensor_count"):
        if src.value(key) != out.value(key):
            report.fail(f"header {key} is {out.value(key)}, the source's {src.value(key)}", path=out.path)
    if out.value("GGUF.kv_count") != src.value("GGUF.kv_count") + extra:
        report.fail("the header's key count does not match its keys", path=out.path)


def compare_tensor_infos(report: VerifyReport, src: Part, out: Part) -> bool:
    """Same tensor names, types, shapes, order and places in the data section; False where they are not."""
    a, b = src.reader.tensors, out.reader.tensors
    names_a, names_b = [t.name for t in a], [t.name for t in b]
    if names_a != names_b:
        odd = next((x for x, y in zip(names_a, names_b, strict=False) if x != y), None)
        report.fail("tensor names or order differ from the source's", path=out.path,
                    tensor=odd or next(iter(set(names_a) ^ set(names_b)), None))
        return False
    ok = True
    for x, y in zip(a, b, strict=True):
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            report.fail(f"is {y.tensor_type.name}{list(y.shape)}, the source's {x.tensor_type.name}{list(x.shape)}",
                        path=out.path, tensor=y.name)
            ok = False
        elif int(x.data_offset) - src.reader.data_offset != int(y.data_offset) - out.reader.data_offset:
            report.fail("lies at another place in the data section than the source's", path=out.path, tensor=y.name)
            ok = False
    return ok


# --- the targets, derived again from the architecture table -----------------------------------------

@dataclass(frozen=True)
class Expected:
    name: str
    role: str
    layer: int | None
    axis: int  # in torch order (the reverse of GGUF's ne order), counted from 0
    gain: str | None


@cache
def _table() -> dict[str, Any]:
    return json.loads((resources.files("orthopatch.gguf") / "architectures.json").read_text(encoding="utf-8"))


def _template(role_name: str) -> str:
    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, role_name)]


def expected_targets(parts: list[Part], method: Method) -> list[Expected]:
    """The tensors a conversion with ``method`` patches, part by part in offset order, from the table."""
    arch = parts[0].value(gguf.Keys.General.ARCHITECTURE)
    family = next((f for f in _table()["families"] if arch in f["architectures"]), None)
    if family is None:
        raise OrthopatchError(f"architecture {arch!r} is not one orthopatch knows for GGUF files", path=parts[0].path)
    gains = {role: _template(t) + ".weight" for role, t in family.get("gains", {}).items()}
    rules = []
    for doc in _table()["targets"]:
        base = re.escape(_template(doc["tensor"])).replace(re.escape("{bid}"), r"(?P<layer>\d+)")
        rules += [(doc["role"], re.compile(base + r"\.weight"), doc["axis"]),
                  (doc["role"], re.compile(base + r"\.bias"), -1)]
    selection: Selection = method.selection
    found = []
    for part in parts:
        for t in sorted(part.reader.tensors, key=lambda t: int(t.data_offset)):
            for role, pattern, axis in rules:
                m = pattern.fullmatch(t.name)
                if m is None:
                    continue
                layer = int(m["layer"]) if "layer" in pattern.groupindex else None
                if selection.wants(role, layer) and int(t.n_bytes):
                    gain = gains[role].format(bid=layer) if role in gains and layer is not None else None
                    found.append(Expected(t.name, role, layer, axis + len(t.shape), gain))
                break
    return found


def check_record_targets(report: VerifyReport, record: ConversionRecord, parts: list[Part], where: Path) -> None:
    """The record's patched tensors are exactly those the architecture table names for its method."""
    listed = [Expected(t.name, t.role, t.layer, t.axis, t.gain) for t in record.tensors_patched]
    expected = expected_targets(parts, record.method)
    if listed == expected:
        return
    listed_names, expected_names = [e.name for e in listed], [e.name for e in expected]
    if listed_names == expected_names:
        odd = next(e for e, f in zip(listed, expected, strict=True) if e != f)
        what = "is listed with another role, layer, axis or norm gain than the table gives"
    elif (extra := [n for n in listed_names if n not in expected_names]):
        odd, what = listed[listed_names.index(extra[0])], "is listed, but the table does not patch it"
    elif (missing := [n for n in expected_names if n not in listed_names]):
        odd, what = expected[expected_names.index(missing[0])], "is patched by the table, but not listed"
    else:
        odd, what = listed[0], "is listed out of the file's order"
    report.fail(f"the record's patched tensors disagree with the architecture table for its method: this tensor "
                f"{what}", path=where, tensor=odd.name)


# --- tensor data -----------------------------------------------------------------------------------

class TensorRows:
    """A tensor's data as rows of ``ne0`` values (whole quantization blocks), read from gguf-py's memory map."""

    def __init__(self, part: Part, tensor: gguf.ReaderTensor):
        self.part, self.tensor = part, tensor
        self.qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        self.shape = tuple(int(n) for n in reversed(tensor.shape))  # torch order
        self.width = self.shape[-1]
        self.rows = math.prod(self.shape) // self.width
        self.nbytes = int(tensor.n_bytes)
        self.row_bytes = self.nbytes // self.rows
        self.begin = int(tensor.data_offset)

    def raw(self, first: int, count: int) -> np.ndarray:
        """Bytes of rows ``[first, first + count)`` as ``[count, row_bytes]`` uint8."""
        start = self.begin + first * self.row_bytes
        data = self.part.reader.data[start:start + count * self.row_bytes]
        if data.size != count * self.row_bytes:
            raise OrthopatchError("file ends inside the tensor", path=self.part.path, tensor=self.tensor.name)
        return np.asarray(data, dtype=np.uint8).reshape(count, self.row_bytes)

    def values(self, first: int, count: int) -> np.ndarray:
        """Rows ``[first, first + count)`` dequantized by gguf-py, as float64 ``[count, ne0]``."""
        raw = np.ascontiguousarray(self.raw(first, count))
        try:
            out = gguf.quants.dequantize(raw, self.qtype)
        except NotImplementedError:
            raise OrthopatchError(f"gguf-py cannot dequantize {self.qtype.name}", path=self.part.path,
                                  tensor=self.tensor.name) from None
        return np.asarray(out, dtype=np.float64).reshape(count, self.width)

    def same_bytes(self, other: TensorRows, step_bytes: int = 8 << 20) -> int | None:
        """None when both tensors hold the same bytes; else the first differing byte."""
        a = self.part.reader.data[self.begin:self.begin + self.nbytes]
        b = other.part.reader.data[other.begin:other.begin + other.nbytes]
        if a.size != b.size:
            return min(a.size, b.size)
        for first in range(0, a.size, step_bytes):
            x, y = np.asarray(a[first:first + step_bytes]), np.asarray(b[first:first + step_bytes])
            if not np.array_equal(x, y):
                return first + int(np.flatnonzero(x != y)[0])
        return None

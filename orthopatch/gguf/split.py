"""Find and check the parts of a split GGUF model.

llama.cpp's gguf-split writes ``name-00001-of-00003.gguf`` and so on, each part a whole GGUF file
whose metadata numbers it: ``split.no`` (uint16, counted from 0 where the names count from 1),
``split.count`` (uint16) and ``split.tensors.count`` (int32, the tensors of all parts together).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.container import VT, GGUFFile, read_gguf

SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
_SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf", re.DOTALL)


def split_part_name(stem: str, no: int, count: int) -> str:
    """The file name of part ``no`` (from 1) of ``count``, as gguf-split writes it."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def _split_key(part: GGUFFile, key: str, vtype: gguf.GGUFValueType) -> int | None:
    entry = part.metadata.get(key)
    if entry is None:
        return None
    if entry.type != vtype:
        raise OrthopatchError(f"{key} is {entry.type.name}, not {vtype.name}", path=part.path)
    return entry.value


def _check_part(part: GGUFFile, no: int, count: int) -> None:
    """``part`` says in its metadata that it is part ``no`` (from 1) of ``count``."""
    meta_no, meta_count = _split_key(part, SPLIT_NO, VT.UINT16), _split_key(part, SPLIT_COUNT, VT.UINT16)
    if meta_count is None or meta_no is None:
        raise OrthopatchError(f"named as part {no} of {count} of a split model but has no {SPLIT_NO}/{SPLIT_COUNT} "
                              "metadata", path=part.path)
    if (meta_no + 1, meta_count) != (no, count):
        raise OrthopatchError(f"named as part {no} of {count} but its metadata says part {meta_no + 1} of "
                              f"{meta_count}", path=part.path)


def open_split(first_path: str | os.PathLike) -> list[GGUFFile]:
    """Every part of the model whose first part is ``first_path``, in order (a plain file: a list of one).

    Refuses a part other than the first, a missing part, parts whose metadata disagrees with their
    names or with each other, and a tensor that two parts both hold.
    """
    first_path = Path(first_path)
    first = read_gguf(first_path)
    match = _SPLIT_NAME.fullmatch(first_path.name)
    if match is None:
        count = _split_key(first, SPLIT_COUNT, VT.UINT16)
        if count is not None and count > 1:
            raise OrthopatchError(f"is part of a {count}-part split model but is not named like one "
                                  "(name-00001-of-NNNNN.gguf)", path=first_path)
        return [first]
    no, count = int(match["no"]), int(match["count"])
    if count == 0 or no == 0 or no > count:
        raise OrthopatchError(f"split part number {no} of {count} is impossible", path=first_path)
    if no != 1:
        raise OrthopatchError(f"is part {no} of {count} of a split model; give the first part, "
                              f"{split_part_name(match['stem'], 1, count)}", path=first_path)
    if count == 1 and SPLIT_COUNT not in first.metadata:
        return [first]
    parts = [first]
    _check_part(first, 1, count)
    for i in range(2, count + 1):
        path = first_path.with_name(split_part_name(match["stem"], i, count))
        if not os.path.lexists(path):
            raise OrthopatchError(f"part {i} of {count} of the split model is missing", path=path)
        part = read_gguf(path)
        _check_part(part, i, count)
        parts.append(part)
    _check_split_tensors(parts)
    return parts


def _check_split_tensors(parts: list[GGUFFile]) -> None:
    owner: dict[str, Path] = {}
    for part in parts:
        for t in part.tensors:
            if t.name in owner:
                raise OrthopatchError(f"also in {owner[t.name].name} (a tensor in two parts)", path=part.path,
                                      tensor=t.name)
            owner[t.name] = part.path
    total = _split_key(parts[0], SPLIT_TENSORS, VT.INT32)
    if total is not None and total != len(owner):
        raise OrthopatchError(f"{SPLIT_TENSORS} is {total} but the {len(parts)} parts hold {len(owner)} tensors",
                              path=parts[0].path)
    for part in parts[1:]:
        other = _split_key(part, SPLIT_TENSORS, VT.INT32)
        if other is not None and total is not None and other != total:
            raise OrthopatchError(f"{SPLIT_TENSORS} is {other} but the first part says {total}", path=part.path)

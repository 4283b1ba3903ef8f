"""The output's ``README.md``: a Hugging Face model card saying what was done, above the source's card.

Front matter: ``base_model`` (the repo id, or the folder name), tags including ``abliterated`` and
``orthopatch``, and the source card's licence fields. The body states the direction and its sha256,
the tensors patched and the options; the source card's text (without its front matter) follows. The
card holds nothing that changes between two identical runs (no times, no local paths).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from orthopatch.errors import first_line, quoted
from orthopatch.io.folders import write_atomic
from orthopatch.io.formats import CARD_NAME
from orthopatch.io.smallfile import json_depth, read_small_text
from orthopatch.patch.record import ConversionRecord

TAGS = ("abliterated", "orthopatch")
#: Front-matter fields carried over from the source card.
CARRIED_FIELDS = ("license", "license_name", "license_link", "language", "library_name", "pipeline_tag")
#: Front matter larger or deeper than this is not a model card's: its metadata is dropped, its body kept.
MAX_FRONT_MATTER_BYTES = 1 << 20
MAX_FRONT_MATTER_DEPTH = 50
#: Leading spaces and block-sequence dashes: how far a YAML line is nested.
_INDENT = re.compile(r"(?:[ \t]|-(?=[ \t]))*")


def split_front_matter(content: str) -> tuple[str | None, str]:
    """``(front matter, body)`` of a card; ``(None, content)`` when it has no ``---`` block on top."""
    lines = content.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    if first == len(lines) or lines[first].rstrip() != "---":
        return None, content
    for end in range(first + 1, len(lines)):
        if lines[end].rstrip() == "---":
            return "".join(lines[first + 1:end]), "".join(lines[end + 1:])
    return None, content


def _yaml_depth(text: str) -> int:
    """An upper bound of how deep YAML text nests: flow brackets plus indentation levels."""
    indent = max((len(_INDENT.match(line).group()) for line in text.splitlines()), default=0)
    return json_depth(text.encode("utf-8", errors="replace")) + indent


def parse_front_matter(text: str) -> dict[str, Any]:
    """Front matter as a dict; ``{}`` for anything unreadable, oversized or nested too deeply."""
    return front_matter_and_problem(text)[0]


def front_matter_and_problem(text: str) -> tuple[dict[str, Any], str | None]:
    """Front matter as a dict, and why (some of) its metadata cannot be carried over, or None.

    Unreadable, oversized or too deeply nested front matter gives ``{}``; a field the card carries
    (licence, tags...) that is not a string or a list of strings is named, since it is dropped."""
    if len(text) > MAX_FRONT_MATTER_BYTES:
        return {}, f"its front matter is larger than {MAX_FRONT_MATTER_BYTES:,} bytes"
    if _yaml_depth(text) > MAX_FRONT_MATTER_DEPTH:
        return {}, f"its front matter nests deeper than {MAX_FRONT_MATTER_DEPTH} levels"
    try:
        meta = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        return {}, f"its front matter is not valid YAML ({first_line(exc)})"
    if meta is None:
        return {}, None
    if not isinstance(meta, dict):
        return {}, f"its front matter is a {type(meta).__name__}, not a mapping"
    bad = [k for k in ("tags", *CARRIED_FIELDS) if k in meta and not _plain(meta[k])]
    if bad:
        return meta, f"its field {bad[0]!r} is not a string or a list of strings"
    return meta, None


def read_source_card(src: Path, note: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """The source ``README.md``'s front matter and its body; ``({}, "")`` when there is no card.

    The card is read as any small file (a regular file of bounded size); unreadable front matter
    loses only the metadata, the body is kept, and ``note`` is told so in one line.
    """
    if not os.path.lexists(src / CARD_NAME):
        return {}, ""
    return parse_card(read_small_text(src / CARD_NAME, "model card", errors="replace"), note, src / CARD_NAME)


def parse_card(content: str, note: Callable[[str], None] | None = None,
               path: Path | None = None) -> tuple[dict[str, Any], str]:
    """A card's text as its front matter (``{}`` when unreadable) and its body; ``note`` hears (one line,
    naming ``path``) when the front matter's metadata cannot be carried over."""
    front, body = split_front_matter(content)
    if front is None:
        return {}, content
    meta, problem = front_matter_and_problem(front)
    if problem is not None and note is not None:
        where = f"{quoted(str(path))}: " if path is not None else ""
        note(f"{where}the source card's metadata (license, tags) could not be read and was not carried over: "
             f"{problem}")
    return meta, body


def _plain(value: Any) -> bool:
    """A front-matter value safe to carry: a string, or a list of strings."""
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def _link(base_model: str) -> str:
    return f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else f"`{base_model}`"


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) or "none"
    return str(value)


def build_card(record: ConversionRecord, *, base_model: str, direction: str,
               source: tuple[dict[str, Any], str] = ({}, "")) -> ModelCard:
    """The model card for a finished conversion described by ``record``."""
    meta, body = source
    source_tags = meta.get("tags")
    source_tags = [source_tags] if isinstance(source_tags, str) else source_tags
    tags = list(dict.fromkeys([*TAGS, *(t for t in source_tags if isinstance(t, str))]
                              if isinstance(source_tags, list) else TAGS))
    data = ModelCardData(base_model=base_model, tags=tags,
                         **{k: meta[k] for k in CARRIED_FIELDS if _plain(meta.get(k))})
    tensors = record.tensors_patched
    roles = Counter(t.role for t in tensors)
    options = record.method.to_json()
    version = record.orthopatch_version
    lines = [
        f"# {base_model.split('/')[-1]}, abliterated",
        "",
        f"{_link(base_model)} with a refusal direction projected out of every weight matrix that writes into "
        f"the residual stream (\"abliteration\"), made with orthopatch {version}. Every other tensor is "
        "byte-identical to the source.",
        "",
        "| | |",
        "|---|---|",
        f"| direction | `{direction}` |",
        f"| direction sha256 | `{record.direction.sha256}` |",
        f"| architecture | {record.architecture} |",
        f"| tensors patched | {len(tensors)} ({', '.join(f'{role}: {n}' for role, n in sorted(roles.items()))}) |",
        *(f"| {key} | {_value(value)} |" for key, value in options.items() if key != "weights"),
        *([f"| weights | {record.method.weights.describe()} |"] if record.method.weights is not None else []),
        f"| orthopatch | {version} |",
        "",
        "<details><summary>Patched tensors</summary>",
        "",
        *(f"- `{t.name}`" for t in tensors),
        "",
        "</details>",
        "",
        "`orthopatch.json` beside this card records the same, with the source's shard headers.",
        "",
    ]
    if body.strip():
        lines += ["## The source model's card", "", body.strip(), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(out: Path, src: Path, record: ConversionRecord, *, base_model: str, direction: str,
                     source: tuple[dict[str, Any], str] | None = None) -> None:
    """Write ``out/README.md`` atomically (before the record, which marks the output complete).

    ``base_model`` and ``direction`` are the names the card gives the source and the direction file;
    ``source`` is the source card as :func:`read_source_card` returns it (read now if not given).
    """
    source = source if source is not None else read_source_card(src)
    card = build_card(record, base_model=base_model, direction=direction, source=source)
    write_atomic(out / CARD_NAME, str(card).encode("utf-8"))

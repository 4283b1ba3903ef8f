"""The output's ``README.md``: a Hugging Face model card saying what was done, above the source's card.

Front matter: ``base_model`` (the repo id, or the folder name), tags including ``abliterated`` and
``orthopatch``, and the source card's licence fields. The body states the direction and its sha256,
the tensors patched and the options; the source card's text (without its front matter) follows. The
card holds nothing that changes between two identical runs (no times, no local paths).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .formats import CARD_NAME
from .output import write_atomic
from .record import Record

TAGS = ("abliterated", "orthopatch")
#: Front-matter fields carried over from the source card.
CARRIED_FIELDS = ("license", "license_name", "license_link", "language", "library_name", "pipeline_tag")
_FRONT_MATTER = re.compile(r"\A\s*---[\r\n]+([\s\S]*?)[\r\n]+---[ \t]*(?:\r\n|\n|\Z)")


def read_source_card(src: Path) -> tuple[dict[str, Any], str]:
    """The source ``README.md``'s front matter and its body; ``({}, "")`` when there is no card."""
    try:
        content = (src / CARD_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}, ""
    match = _FRONT_MATTER.match(content)
    if match is None:
        return {}, content
    try:
        card = ModelCard(content, ignore_metadata_errors=True)
        return card.data.to_dict(), card.text
    except (ValueError, yaml.YAMLError):  # unreadable front matter: keep the body, drop the metadata
        return {}, content[match.end():]


def _link(base_model: str) -> str:
    return f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else f"`{base_model}`"


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) or "none"
    return str(value)


def build_card(record: Record, *, base_model: str, direction: str,
               source: tuple[dict[str, Any], str] = ({}, "")) -> ModelCard:
    """The model card for a finished conversion described by ``record``."""
    meta, body = source
    source_tags = meta.get("tags") or []
    tags = list(dict.fromkeys([*TAGS, *(t for t in source_tags if isinstance(t, str))]))
    data = ModelCardData(base_model=base_model, tags=tags,
                         **{k: meta[k] for k in CARRIED_FIELDS if meta.get(k) is not None})
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
        *(f"| {key} | {_value(value)} |" for key, value in options.items()),
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


def write_model_card(out: Path, src: Path, record: Record, *, base_model: str, direction: str) -> None:
    """Write ``out/README.md`` atomically (before the record, which marks the output complete).

    ``base_model`` and ``direction`` are the names the card gives the source and the direction file.
    """
    card = build_card(record, base_model=base_model, direction=direction, source=read_source_card(src))
    write_atomic(out / CARD_NAME, str(card).encode("utf-8"))

"""Instruction sets: the built-in ones shipped in ``prompts/``, or a user's file; sampling; tokenizing.

A prompt file is text (one instruction per line; blank lines skipped), ``.jsonl`` (one JSON object
per line) or ``.json`` (a list of strings or objects); from objects the ``--field`` is taken. A file
may also be ``REPO_ID:PATH`` on the Hugging Face Hub (``datasets/REPO_ID:PATH`` in a dataset repo),
fetched alone like a direction file.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError
from orthopatch.hub import resolve_file
from orthopatch.io.smallfile import parse_json, read_small_text

#: The built-in sets: measured on (``harmful``, ``harmless``) and held out for judging (``*_eval``).
BUILTIN_SETS = ("harmful", "harmless", "harmful_eval", "harmless_eval")
#: Fields tried, in order, in JSON records when ``--field`` is not given.
DEFAULT_FIELDS = ("prompt", "instruction", "goal", "text")
#: Longest prompt accepted, in characters (1 MiB), checked before tokenizing: a tokenizer takes about
#: 200 bytes of memory per character, so a 60 MB line would take gigabytes before it could be refused
#: as longer than the context. A million characters is far more than any context holds in real text.
MAX_PROMPT_CHARS = 1 << 20


@dataclass(frozen=True)
class PromptSet:
    """Instructions and where they came from; ``sha256`` identifies exactly the prompts used."""

    source: str
    prompts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()

    def sample(self, limit: int | None, seed: int) -> PromptSet:
        """At most ``limit`` prompts, drawn with a fixed seed (kept in file order)."""
        if limit is None or limit >= len(self.prompts):
            return self
        if limit < 1:
            raise OrthopatchError(f"--limit must be at least 1, not {limit}")
        keep = sorted(random.Random(seed).sample(range(len(self.prompts)), limit))
        return PromptSet(self.source, tuple(self.prompts[i] for i in keep))


def builtin_prompts(kind: str) -> PromptSet:
    """One of :data:`BUILTIN_SETS`, shipped with the package."""
    if kind not in BUILTIN_SETS:
        raise ValueError(kind)
    text = (resources.files(__package__) / "prompts" / f"{kind}.txt").read_text(encoding="utf-8")
    return PromptSet(f"built-in {kind}", tuple(line.strip() for line in text.splitlines() if line.strip()))


def _from_record(record: Any, field: str | None, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise OrthopatchError(f"{where} is neither a string nor an object", path=path)
    fields = (field,) if field else DEFAULT_FIELDS
    for name in fields:
        if isinstance(record.get(name), str):
            return record[name]
    wanted = f"field {field!r}" if field else f"any of the fields {', '.join(DEFAULT_FIELDS)} (use --field)"
    raise OrthopatchError(f"{where} has no string {wanted}", path=path)


def _json(text: str, path: Path, what: str) -> Any:
    """``text`` parsed as JSON after its nesting depth is checked (a deep list would exhaust the stack)."""
    return parse_json(text.encode("utf-8"), path, what, not_json=f"{what} is not JSON")


def _bounded(prompt: str, path: Path, where: str) -> str:
    """``prompt``, unless it is longer than :data:`MAX_PROMPT_CHARS` (refused before it is tokenized)."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise OrthopatchError(f"{where} is a prompt of {len(prompt):,} characters, more than the "
                              f"{MAX_PROMPT_CHARS:,} accepted", path=path)
    return prompt


def parse_prompts(path: Path, text: str, field: str | None = None) -> list[str]:
    """The instructions in a prompt file's ``text``, by the file's suffix; each at most
    :data:`MAX_PROMPT_CHARS` long, JSON at most :data:`MAX_JSON_DEPTH` deep."""
    suffix = path.suffix.lower()
    prompts = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = _json(line, path, f"line {number}")
                prompts.append(_bounded(_from_record(record, field, path, f"line {number}"), path, f"line {number}"))
    elif suffix == ".json":
        doc = _json(text, path, "the file")
        if not isinstance(doc, list):
            raise OrthopatchError("expected a JSON list of prompts", path=path)
        prompts = [_bounded(_from_record(r, field, path, f"item {i}"), path, f"item {i}") for i, r in enumerate(doc)]
    else:
        prompts = [_bounded(line, path, f"line {number}") for number, line in enumerate(text.splitlines(), 1)]
    return [p.strip() for p in prompts if p.strip()]


def load_prompts(spec: str, field: str | None = None, quiet: bool = False) -> PromptSet:
    """A prompt file given as a path, ``REPO_ID:PATH`` or ``datasets/REPO_ID:PATH``; at least one prompt,
    or a one-line error."""
    path = resolve_file(spec, quiet=quiet).path
    prompts = parse_prompts(path, read_small_text(path, "prompt file"), field)
    if not prompts:
        raise OrthopatchError("no prompts in the file", path=path)
    return PromptSet(spec, tuple(prompts))


@dataclass(frozen=True)
class PromptChoice:
    """Which prompts of a set are used: the JSON field holding them, how many, and the sampling seed."""

    field: str | None = None
    limit: int | None = None
    seed: int = 0

    def choose(self, spec: str | None, builtin: str, quiet: bool = False) -> PromptSet:
        """The user's file ``spec`` if given, else the built-in set ``builtin``; then ``limit`` of them."""
        chosen = load_prompts(spec, self.field, quiet) if spec else builtin_prompts(builtin)
        return chosen.sample(self.limit, self.seed)


def load_markers(path: Path | None) -> tuple[str, ...]:
    """Refusal marker phrases: the built-in list, or one per line of ``path`` (``#`` starts a comment)."""
    if path is None:
        text = (resources.files(__package__) / "prompts" / "refusal_markers.txt").read_text(encoding="utf-8")
    else:
        text = read_small_text(path, "refusal marker file")
    markers = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not markers:
        raise OrthopatchError("no refusal markers in the file", path=path)
    return markers

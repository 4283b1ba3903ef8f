"""Which tensors write into the residual stream, described as data.

Each family is one JSON file in ``architectures/``: the ``model_type`` values it covers, where the
hidden size and layer count live in ``config.json``, and a list of target rules. A rule is a regular
expression over tensor names (group ``layer`` gives the block index), the residual axis of the
tensors it matches, and optionally the norm gain that scales their output before it joins the
residual stream (DESIGN.md §2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from .errors import OrthopatchError

ROLES = ("embedding", "position_embedding", "attention", "mlp", "other")


@dataclass(frozen=True)
class TargetRule:
    """Tensors matching ``pattern`` (full match) are patched along ``axis``.

    ``gain`` is a name template (filled from the match's named groups) of the norm weight that
    follows the tensor's output; the effective gain is ``gain_offset + weight``.
    """

    role: str
    pattern: re.Pattern[str]
    axis: int
    gain: str | None = None
    gain_offset: float = 0.0

    def match(self, name: str) -> re.Match[str] | None:
        return self.pattern.fullmatch(name)


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[TargetRule, ...]
    hidden_size_keys: tuple[str, ...] = ("hidden_size",)
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)

    def hidden_size(self, config: dict[str, Any]) -> int | None:
        return _lookup(config, self.hidden_size_keys)

    def num_layers(self, config: dict[str, Any]) -> int | None:
        return _lookup(config, self.num_layers_keys)


def _lookup(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """First integer found under one of ``keys`` (dotted paths allowed, e.g. ``text_config.hidden_size``)."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int) and not isinstance(node, bool):
            return node
    return None


def rule_from_dict(doc: dict[str, Any], source: str) -> TargetRule:
    role = doc.get("role", "other")
    if role not in ROLES:
        raise OrthopatchError(f"unknown role {role!r}", path=source)
    try:
        pattern = re.compile(doc["pattern"])
    except (KeyError, re.error) as exc:
        raise OrthopatchError(f"bad target pattern ({exc})", path=source) from None
    return TargetRule(
        role=role,
        pattern=pattern,
        axis=int(doc["axis"]),
        gain=doc.get("gain"),
        gain_offset=float(doc.get("gain_offset", 0.0)),
    )


def architecture_from_dict(name: str, doc: dict[str, Any]) -> Architecture:
    return Architecture(
        name=name,
        model_types=tuple(doc["model_types"]),
        rules=tuple(rule_from_dict(r, f"architectures/{name}.json") for r in doc["targets"]),
        hidden_size_keys=tuple(doc.get("hidden_size", ["hidden_size"])),
        num_layers_keys=tuple(doc.get("num_layers", ["num_hidden_layers"])),
    )


@cache
def known_architectures() -> tuple[Architecture, ...]:
    """Every architecture shipped in ``orthopatch/architectures/*.json``."""
    folder = resources.files(__package__) / "architectures"
    found = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            found.append(architecture_from_dict(item.name[: -len(".json")], json.loads(item.read_text())))
    return tuple(found)


def find_architecture(config: dict[str, Any], config_path: str = "config.json") -> Architecture:
    """The architecture for ``config``'s ``model_type``; a clear error naming it when unknown."""
    model_type = config.get("model_type")
    for arch in known_architectures():
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in known_architectures() for t in a.model_types)
    raise OrthopatchError(
        f"unknown model_type {model_type!r} (supported: {', '.join(supported)}; "
        "use --targets REGEX:AXIS for others)",
        path=config_path,
    )


def custom_architecture(specs: list[str], config: dict[str, Any]) -> Architecture:
    """An architecture from ``--targets REGEX:AXIS`` options (the hidden size still comes from config)."""
    rules = []
    for spec in specs:
        pattern, sep, axis = spec.rpartition(":")
        if not sep or not pattern:
            raise OrthopatchError(f"--targets {spec!r}: expected REGEX:AXIS")
        try:
            rules.append(TargetRule("other", re.compile(pattern), int(axis)))
        except (re.error, ValueError) as exc:
            raise OrthopatchError(f"--targets {spec!r}: {exc}") from None
    base = None
    try:
        base = find_architecture(config)
    except OrthopatchError:
        pass
    keys = base.hidden_size_keys if base else ("hidden_size", "n_embd", "d_model", "text_config.hidden_size")
    layer_keys = base.num_layers_keys if base else ("num_hidden_layers", "n_layer", "text_config.num_hidden_layers")
    return Architecture("custom", (str(config.get("model_type")),), tuple(rules), keys, layer_keys)

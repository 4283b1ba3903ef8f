"""Which tensors write into the residual stream, described as data.

Each family is one JSON file in ``architectures/``: the ``model_type`` values it covers, where the
hidden size, layer count and embedding tie live in ``config.json``, a list of target rules, and
name patterns the family cannot patch (for example quantized expert blocks). A rule is a regular
expression over tensor names (group ``layer`` gives the block index, other named groups fill the
``gain`` template), the residual axis of the tensors it matches, and optionally the norm gain that
scales their output before it joins the residual stream (see docs/architectures.md).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from orthopatch.errors import OrthopatchError, shortened
from orthopatch.io.checkpoint import Checkpoint
from orthopatch.io.formats import CONFIG_NAME
from orthopatch.saferegex import unsafe_reason

ROLES = ("embedding", "position_embedding", "attention", "mlp", "other")
EMBEDDING_ROLES = ("embedding", "position_embedding")
#: Where the hidden size and layer count of an unknown model usually live.
GENERIC_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "text_config.hidden_size")
GENERIC_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "text_config.num_hidden_layers")


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

    @property
    def has_layer(self) -> bool:
        return "layer" in self.pattern.groupindex


@dataclass(frozen=True)
class UnsupportedRule:
    """Tensors matching ``pattern`` mean the checkpoint cannot be patched as it is, for ``reason``."""

    pattern: re.Pattern[str]
    reason: str


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[TargetRule, ...]
    hidden_size_keys: tuple[str, ...] = ("hidden_size",)
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    tie_keys: tuple[str, ...] = ("tie_word_embeddings",)
    tied_default: bool = False
    unsupported: tuple[UnsupportedRule, ...] = ()
    description: str = ""
    custom: bool = False  # built from --targets: no completeness checks

    def hidden_size(self, config: dict[str, Any]) -> int | None:
        return _lookup(config, self.hidden_size_keys)

    def num_layers(self, config: dict[str, Any]) -> int | None:
        return _lookup(config, self.num_layers_keys)

    def tied_embeddings(self, config: dict[str, Any]) -> bool:
        """Whether the output head reuses the token embedding (so patching one patches both)."""
        for key in self.tie_keys:
            value = _get(config, key)
            if isinstance(value, bool):
                return value
        return self.tied_default

    def roles(self) -> set[str]:
        return {rule.role for rule in self.rules}


def _get(config: dict[str, Any], key: str) -> Any:
    """The value under dotted path ``key`` (``text_config.hidden_size``), or None."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _lookup(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """First integer found under one of ``keys`` (dotted paths allowed, e.g. ``text_config.hidden_size``)."""
    for key in keys:
        node = _get(config, key)
        if isinstance(node, int) and not isinstance(node, bool):
            return node
    return None


def _compile(pattern: Any, source: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (TypeError, re.error) as exc:
        raise OrthopatchError(f"bad target pattern {pattern!r} ({exc})", path=source) from None


def rule_from_dict(doc: dict[str, Any], source: str) -> TargetRule:
    role = doc.get("role", "other")
    if role not in ROLES:
        raise OrthopatchError(f"unknown role {role!r}", path=source)
    if "pattern" not in doc or "axis" not in doc:
        raise OrthopatchError(f"target rule needs 'pattern' and 'axis': {doc}", path=source)
    pattern = _compile(doc["pattern"], source)
    gain = doc.get("gain")
    if gain is not None:
        fields = {f for _, f, _, _ in string.Formatter().parse(gain) if f is not None}
        missing = fields - set(pattern.groupindex)
        if missing:
            raise OrthopatchError(f"gain template {gain!r} uses {sorted(missing)}, which are not named groups of "
                                  f"{pattern.pattern!r}", path=source)
    if role not in EMBEDDING_ROLES and "layer" not in pattern.groupindex:
        raise OrthopatchError(f"{role} rule {pattern.pattern!r} has no (?P<layer>...) group", path=source)
    return TargetRule(role=role, pattern=pattern, axis=int(doc["axis"]), gain=gain,
                      gain_offset=float(doc.get("gain_offset", 0.0)))


def architecture_from_dict(name: str, doc: dict[str, Any]) -> Architecture:
    source = f"architectures/{name}.json"
    tied = doc.get("tied_embeddings", {})
    return Architecture(
        name=name,
        model_types=tuple(doc["model_types"]),
        rules=tuple(rule_from_dict(r, source) for r in doc["targets"]),
        hidden_size_keys=tuple(doc.get("hidden_size", ["hidden_size"])),
        num_layers_keys=tuple(doc.get("num_layers", ["num_hidden_layers"])),
        tie_keys=tuple(tied.get("keys", ["tie_word_embeddings"])),
        tied_default=bool(tied.get("default", False)),
        unsupported=tuple(UnsupportedRule(_compile(u["pattern"], source), u["reason"])
                          for u in doc.get("unsupported", [])),
        description=doc.get("description", ""),
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


def find_architecture(config: dict[str, Any], config_path: str = CONFIG_NAME) -> Architecture:
    """The architecture for ``config``'s ``model_type``; a clear error naming it when unknown."""
    model_type = config.get("model_type")
    for arch in known_architectures():
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in known_architectures() for t in a.model_types)
    if model_type is None:
        raise OrthopatchError(f"has no model_type (supported: {', '.join(supported)}; use --targets REGEX:AXIS "
                              "for others)", path=config_path)
    raise OrthopatchError(
        f"unknown model_type {shortened(model_type)} (supported: {', '.join(supported)}; "
        "use --targets REGEX:AXIS for others)",
        path=config_path,
    )


def parse_target(spec: str) -> TargetRule:
    """One ``--targets REGEX:AXIS`` option as a rule (the axis is the part after the last colon)."""
    pattern, sep, axis = spec.rpartition(":")
    shown = repr(spec) if len(spec) <= 200 else repr(spec[:200]) + "..."
    if not sep or not pattern:
        raise OrthopatchError(f"--targets {shown}: expected REGEX:AXIS")
    try:
        compiled = re.compile(pattern)
        role = "other" if "layer" in compiled.groupindex else "embedding"
        rule = TargetRule(role, compiled, int(axis))
    except (re.error, RecursionError, OverflowError) as exc:
        raise OrthopatchError(f"--targets {shown}: bad regular expression ({exc})") from None
    except ValueError:
        raise OrthopatchError(f"--targets {shown}: axis {axis[:40]!r} is not an integer") from None
    reason = unsafe_reason(pattern)
    if reason is not None:
        raise OrthopatchError(f"--targets {shown}: refused: {reason}")
    return rule


def custom_architecture(specs: list[str], config: dict[str, Any]) -> Architecture:
    """An architecture from ``--targets REGEX:AXIS`` options (the hidden size still comes from config).

    A ``(?P<layer>\\d+)`` group in REGEX names the block index, which ``--layers`` and per-layer
    directions use; tensors matched by a REGEX without one sit outside the blocks, like an
    embedding, and follow ``--embeddings/--no-embeddings``.
    """
    rules = tuple(parse_target(spec) for spec in specs)
    base = None
    try:
        base = find_architecture(config)
    except OrthopatchError:
        pass
    keys = base.hidden_size_keys if base else GENERIC_HIDDEN_SIZE_KEYS
    layer_keys = base.num_layers_keys if base else GENERIC_NUM_LAYERS_KEYS
    return Architecture("custom", (str(config.get("model_type")),), rules, keys, layer_keys,
                        tie_keys=base.tie_keys if base else ("tie_word_embeddings",),
                        tied_default=base.tied_default if base else False,
                        description="--targets " + " ".join(specs), custom=True)


def choose_architecture(checkpoint: Checkpoint, targets: tuple[str, ...] = ()) -> Architecture:
    """The architecture a run uses: built from ``--targets`` when given, else found from ``config.json``."""
    if targets:
        return custom_architecture(list(targets), checkpoint.config)
    return find_architecture(checkpoint.config, str(checkpoint.root / CONFIG_NAME))

"""Decide, from headers and config alone, which tensors are patched and how.

The plan is complete before any tensor byte is read: ``--dry-run`` prints it, ``apply`` and
``verify`` execute it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.io.checkpoint import Checkpoint
from orthopatch.io.formats import CONFIG_NAME, FLOAT_DTYPES
from orthopatch.io.safetensors_header import ShardHeader, TensorEntry
from orthopatch.patch.architecture import EMBEDDING_ROLES, Architecture, TargetRule
from orthopatch.saferegex import MATCH_SECONDS, match_all

if TYPE_CHECKING:
    import torch

#: Highest layer index ``--layers`` accepts (a typo must not build a set of a billion numbers).
MAX_LAYERS = 1 << 20


@dataclass(frozen=True)
class Selection:
    """Which of the architecture's targets a run patches.

    ``layers`` holds block indices (None: every block); ``embeddings`` switches the tensors outside
    the blocks (token and position embeddings).
    """

    layers: frozenset[int] | None = None  # None: every layer
    embeddings: bool = True

    def wants(self, role: str, layer: int | None) -> bool:
        if layer is None:
            return self.embeddings or role not in EMBEDDING_ROLES
        return self.layers is None or layer in self.layers


def parse_layers(text: str) -> frozenset[int]:
    """``--layers`` text: comma-separated block indices and half-open ranges ``START:STOP``.

    ``10:60`` means blocks 10 to 59 (as Python's ``range(10, 60)``); ``0:4,7,10:12`` means
    0, 1, 2, 3, 7, 10, 11. Indices count from 0, as in tensor names.
    """
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise OrthopatchError(f"--layers {text!r}: empty item")
        start, sep, stop = part.partition(":")
        try:
            first = int(start)
            last = int(stop) if sep else first + 1
        except ValueError:
            raise OrthopatchError(f"--layers {text!r}: {part!r} is not N or START:STOP") from None
        if first < 0 or last < 0:
            raise OrthopatchError(f"--layers {text!r}: {part!r} is negative")
        if last <= first:
            raise OrthopatchError(f"--layers {text!r}: range {part!r} is empty (STOP is excluded)")
        if last > MAX_LAYERS:
            raise OrthopatchError(f"--layers {text!r}: {part!r} goes past {MAX_LAYERS:,}, more layers than a model has")
        layers.update(range(first, last))
    return frozenset(layers)


def format_layers(layers: frozenset[int] | None) -> str:
    """``layers`` as the shortest ``--layers`` text (``all`` for None)."""
    if layers is None:
        return "all"
    parts, ordered = [], sorted(layers)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j] + 1}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class PatchTarget:
    """One tensor to patch: where it is, its residual axis, its layer and the norm gain after it."""

    entry: TensorEntry
    shard: str
    role: str
    axis: int  # non-negative index into entry.shape
    layer: int | None
    gain: str | None = None  # name of the norm weight applied to this tensor's output
    gain_offset: float = 0.0

    @property
    def name(self) -> str:
        return self.entry.name


class Named(Protocol):
    name: str


class ConversionPlan(Protocol):
    """What the driver, the record and the unit vectors need of a plan, whatever the container: a safetensors
    folder's :class:`PatchPlan` or a GGUF file's :class:`~orthopatch.gguf.plan.GGUFPlan`."""

    hidden_size: int

    @property
    def architecture(self) -> Named: ...

    @property
    def patched_bytes(self) -> int: ...

    @property
    def total_bytes(self) -> int: ...

    def targets(self) -> Iterable[PatchTarget]: ...

    def gain_names(self) -> list[str]: ...

    def read_gain(self, name: str) -> torch.Tensor: ...

    def source_headers(self) -> dict[str, str]: ...

    def path_of(self, target: PatchTarget) -> Path: ...

    def path_of_tensor(self, name: str) -> Path: ...


@dataclass(frozen=True)
class ShardPlan:
    name: str
    header: ShardHeader
    targets: tuple[PatchTarget, ...]  # in offset order

    @property
    def patched_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.targets)


@dataclass(frozen=True)
class PatchPlan:
    checkpoint: Checkpoint
    architecture: Architecture
    hidden_size: int
    num_layers: int | None
    shards: tuple[ShardPlan, ...]
    selection: Selection = Selection()
    tied_embeddings: bool = False

    def targets(self) -> Iterator[PatchTarget]:
        for shard in self.shards:
            yield from shard.targets

    def gain_names(self) -> list[str]:
        return sorted({t.gain for t in self.targets() if t.gain})

    def source_headers(self) -> dict[str, str]:
        """sha256 and size of each shard's header: what identifies the source in a fingerprint."""
        return {name: hashlib.sha256(h.raw).hexdigest() + f":{h.file_size}"
                for name, h in self.checkpoint.shards.items()}

    def read_gain(self, name: str) -> torch.Tensor:
        """A norm gain (a float vector), read whole from its shard."""
        from orthopatch.io.reader import open_source, read_small_tensor

        with open_source(self.checkpoint.root / self.checkpoint.weight_map[name]) as fd:
            return read_small_tensor(fd, self.checkpoint.entry(name))

    def path_of_tensor(self, name: str) -> Path:
        return self.checkpoint.root / self.checkpoint.weight_map[name]

    def path_of(self, target: PatchTarget) -> Path:
        return self.checkpoint.root / target.shard

    @property
    def patched_bytes(self) -> int:
        return sum(s.patched_bytes for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return self.checkpoint.total_bytes


def model_sizes(checkpoint: Checkpoint, arch: Architecture) -> tuple[int, int | None]:
    hidden = arch.hidden_size(checkpoint.config)
    if hidden is None:
        raise OrthopatchError(
            f"no hidden size ({' or '.join(arch.hidden_size_keys)}) in config", path=checkpoint.root / CONFIG_NAME
        )
    num_layers = arch.num_layers(checkpoint.config)
    config_path = checkpoint.root / CONFIG_NAME
    longest = max((max(e.shape, default=0) for h in checkpoint.shards.values() for e in h.tensors), default=0)
    if not 0 < hidden <= longest:
        raise OrthopatchError(f"hidden size {hidden:,} is not the size of any tensor axis in the checkpoint "
                              f"(the longest is {longest:,})", path=config_path)
    # Every block has tensors of its own: a layer count above the number of tensors is impossible,
    # and would only make per-layer bookkeeping huge.
    count = len(checkpoint.weight_map)
    if num_layers is not None and not 0 <= num_layers <= count:
        raise OrthopatchError(f"layer count {num_layers:,} is impossible for a checkpoint of {count:,} tensors",
                              path=config_path)
    return hidden, num_layers


def _match(entry: TensorEntry, arch: Architecture) -> tuple[TargetRule, dict[str, str]] | None:
    """The first rule of ``arch`` that matches ``entry``'s name, with the match's named groups."""
    for rule in arch.rules:
        m = rule.match(entry.name)
        if m is not None:
            return rule, {k: v for k, v in m.groupdict().items() if v is not None}
    return None


def _match_outside(checkpoint: Checkpoint, arch: Architecture) -> dict[str, tuple[TargetRule, dict[str, str]] | None]:
    """What :func:`_match` gives for every tensor name, for rules from outside (``--targets`` or a record).

    All names are matched in one batch, in bounded time on any thread (see :func:`match_all`).
    """
    names = list(dict.fromkeys(e.name for header in checkpoint.shards.values() for e in header.tensors))
    found = match_all([rule.pattern for rule in arch.rules], names, MATCH_SECONDS)
    return {name: None if m is None else (arch.rules[m[0]], m[1]) for name, m in zip(names, found, strict=True)}


def _target(entry: TensorEntry, shard: str, rule: TargetRule, groups: dict[str, str]) -> PatchTarget:
    try:
        layer = int(groups["layer"]) if "layer" in groups else None
    except ValueError:
        raise OrthopatchError(f"layer group matched {groups['layer']!r}, not a block index",
                              tensor=entry.name) from None
    ndim = len(entry.shape)
    axis = rule.axis + ndim if rule.axis < 0 else rule.axis
    if not 0 <= axis < ndim:
        raise OrthopatchError(f"residual axis {rule.axis} does not exist in shape {list(entry.shape)}",
                              tensor=entry.name)
    gain = rule.gain.format(**groups) if rule.gain else None
    return PatchTarget(entry, shard, rule.role, axis, layer, gain, rule.gain_offset)


def _check_target(target: PatchTarget, checkpoint: Checkpoint, header: ShardHeader, hidden: int) -> None:
    entry = target.entry
    if entry.dtype not in FLOAT_DTYPES:
        raise OrthopatchError(f"cannot patch dtype {entry.dtype} (only {', '.join(FLOAT_DTYPES)})",
                              path=header.path, tensor=entry.name)
    if entry.shape[target.axis] != hidden:
        raise OrthopatchError(
            f"residual axis {target.axis} of shape {list(entry.shape)} is not the hidden size {hidden}"
            " (wrong orientation for this architecture?)", path=header.path, tensor=entry.name)
    if target.gain is not None:
        if target.gain not in checkpoint.weight_map:
            raise OrthopatchError(f"its norm gain {target.gain!r} is not in the checkpoint",
                                  path=header.path, tensor=entry.name)
        gain_entry = checkpoint.entry(target.gain)
        if gain_entry.shape != (hidden,) or gain_entry.dtype not in FLOAT_DTYPES:
            raise OrthopatchError(f"norm gain has {gain_entry.dtype}{list(gain_entry.shape)}, "
                                  f"expected a float vector of {hidden}", tensor=target.gain)


def _check_coverage(found: dict[int, set[str]], arch: Architecture, num_layers: int | None, root: object) -> None:
    """Every block of a known architecture has a residual writer of each of its roles.

    This is what catches experts or sublayers whose names the architecture does not know: they
    would otherwise be left unpatched without a word.
    """
    roles = arch.roles() & {"attention", "mlp"}
    layers = set(found)
    if num_layers is not None:
        extra = sorted(n for n in layers if n >= num_layers)
        if extra:
            raise OrthopatchError(f"tensors of layer {extra[0]} found, but config has {num_layers} layers", path=root)
        layers |= set(range(num_layers))
    for layer in sorted(layers):
        missing = roles - found.get(layer, set())
        if missing:
            raise OrthopatchError(
                f"layer {layer} has no {' or '.join(sorted(missing))} tensor the {arch.name} architecture knows "
                "(unknown sublayer or expert names? use --targets REGEX:AXIS)", path=root)


def _check_selection(selection: Selection, num_layers: int | None) -> None:
    if selection.layers is None:
        return
    if not selection.layers:
        raise OrthopatchError("--layers selects no layer")
    if num_layers is not None and max(selection.layers) >= num_layers:
        raise OrthopatchError(f"--layers selects layer {max(selection.layers)}, but the model has "
                              f"{num_layers} layers (0 to {num_layers - 1}; ranges exclude their end)")


def build_plan(checkpoint: Checkpoint, arch: Architecture, selection: Selection = Selection()) -> PatchPlan:
    """Match every tensor against ``arch``; validate dtypes, residual axis sizes, norm gains, coverage."""
    hidden, num_layers = model_sizes(checkpoint, arch)
    _check_selection(selection, num_layers)
    found: dict[int, set[str]] = {}
    matched_any = False
    shards = []
    # The known architectures' patterns are ours and match name by name; those from outside are matched first.
    outside = _match_outside(checkpoint, arch) if arch.custom else None
    for shard_name, header in checkpoint.shards.items():
        targets = []
        for entry in header.tensors:
            for rule in arch.unsupported:
                if rule.pattern.fullmatch(entry.name):
                    raise OrthopatchError(rule.reason, path=header.path, tensor=entry.name)
            matched = outside[entry.name] if outside is not None else _match(entry, arch)
            if matched is None:
                continue
            matched_any = True
            target = _target(entry, shard_name, *matched)
            if target.layer is not None:
                found.setdefault(target.layer, set()).add(target.role)
            if not selection.wants(target.role, target.layer):
                continue
            _check_target(target, checkpoint, header, hidden)
            targets.append(target)
        shards.append(ShardPlan(shard_name, header, tuple(targets)))
    if not matched_any:
        raise OrthopatchError(f"no tensor matches the {arch.name} architecture's residual writers",
                              path=checkpoint.root)
    if not arch.custom:
        _check_coverage(found, arch, num_layers, checkpoint.root)
    elif selection.layers is not None and not found:
        raise OrthopatchError("--layers needs a (?P<layer>\\d+) group in --targets to know each tensor's layer")
    if not any(s.targets for s in shards):
        raise OrthopatchError("the selection (--layers, --no-embeddings) leaves no tensor to patch",
                              path=checkpoint.root)
    tied = arch.tied_embeddings(checkpoint.config)
    return PatchPlan(checkpoint, arch, hidden, num_layers, tuple(shards), selection, tied)


def format_plan(plan: PatchPlan) -> str:
    """The plan as text: one line per patched tensor, then totals."""
    layers = f"{plan.num_layers} layers" if plan.num_layers is not None else "layer count unknown"
    tied = "tied to the output head" if plan.tied_embeddings else "separate from the output head"
    lines = [f"architecture {plan.architecture.name}, hidden size {plan.hidden_size}, {layers}, "
             f"{len(plan.shards)} shard(s), {plan.total_bytes:,} bytes",
             f"patching layers {format_layers(plan.selection.layers)}, embeddings "
             f"{'yes' if plan.selection.embeddings else 'no'} ({tied})"]
    for shard in plan.shards:
        lines.append(f"{quoted(shard.name)}: {len(shard.targets)} of {len(shard.header.tensors)} tensors patched, "
                     f"{shard.patched_bytes:,} of {shard.header.file_size:,} bytes")
        for t in shard.targets:
            gain = f" gain={t.gain_offset:g}+{t.gain}" if t.gain_offset else f" gain={t.gain}" if t.gain else ""
            lines.append(f"  {quoted(t.name)}  {t.entry.dtype}{list(t.entry.shape)}  axis={t.axis}  "
                         f"{t.role}  {t.entry.nbytes:,} bytes{gain}")
    n = sum(len(s.targets) for s in plan.shards)
    lines.append(f"total: {n} tensors patched, {plan.patched_bytes:,} bytes rewritten, "
                 f"{plan.total_bytes - plan.patched_bytes:,} bytes copied unchanged")
    return "\n".join(lines)

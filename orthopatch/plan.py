"""Decide, from headers and config alone, which tensors are patched and how.

The plan is complete before any tensor byte is read: ``--dry-run`` prints it, ``apply`` and
``verify`` execute it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .architecture import Architecture
from .checkpoint import Checkpoint
from .errors import OrthopatchError
from .safetensors_header import ShardHeader, TensorEntry

#: Stored dtypes the projection can rewrite.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class Selection:
    """Which of the architecture's targets a run patches."""

    layers: frozenset[int] | None = None  # None: every layer
    embeddings: bool = True


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

    def targets(self) -> Iterator[PatchTarget]:
        for shard in self.shards:
            yield from shard.targets

    def gain_names(self) -> list[str]:
        return sorted({t.gain for t in self.targets() if t.gain})

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
            f"no hidden size ({' or '.join(arch.hidden_size_keys)}) in config", path=checkpoint.root / "config.json"
        )
    return hidden, arch.num_layers(checkpoint.config)


def _target_for(entry: TensorEntry, shard: str, arch: Architecture, selection: Selection) -> PatchTarget | None:
    for rule in arch.rules:
        m = rule.match(entry.name)
        if m is None:
            continue
        groups = m.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        if layer is None and rule.role in ("embedding", "position_embedding") and not selection.embeddings:
            return None
        if layer is not None and selection.layers is not None and layer not in selection.layers:
            return None
        ndim = len(entry.shape)
        axis = rule.axis + ndim if rule.axis < 0 else rule.axis
        if not 0 <= axis < max(ndim, 1):
            raise OrthopatchError(f"residual axis {rule.axis} does not exist in shape {list(entry.shape)}",
                                  tensor=entry.name)
        gain = rule.gain.format(**{k: v for k, v in groups.items() if v is not None}) if rule.gain else None
        return PatchTarget(entry, shard, rule.role, axis, layer, gain, rule.gain_offset)
    return None


def build_plan(checkpoint: Checkpoint, arch: Architecture, selection: Selection = Selection()) -> PatchPlan:
    """Match every tensor against ``arch``; validate dtypes, residual axis sizes and norm gains."""
    hidden, num_layers = model_sizes(checkpoint, arch)
    shards = []
    for shard_name, header in checkpoint.shards.items():
        targets = []
        for entry in header.tensors:
            target = _target_for(entry, shard_name, arch, selection)
            if target is None:
                continue
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
            targets.append(target)
        shards.append(ShardPlan(shard_name, header, tuple(targets)))
    plan = PatchPlan(checkpoint, arch, hidden, num_layers, tuple(shards))
    if not any(True for _ in plan.targets()) and selection == Selection():
        raise OrthopatchError(f"no tensor matches the {arch.name} architecture's residual writers",
                              path=checkpoint.root)
    return plan


def format_plan(plan: PatchPlan) -> str:
    """The plan as text: one line per patched tensor, then totals."""
    lines = [f"architecture {plan.architecture.name}, hidden size {plan.hidden_size}, "
             f"{len(plan.shards)} shard(s), {plan.total_bytes:,} bytes"]
    for shard in plan.shards:
        lines.append(f"{shard.name}: {len(shard.targets)} of {len(shard.header.tensors)} tensors patched, "
                     f"{shard.patched_bytes:,} of {shard.header.file_size:,} bytes")
        for t in shard.targets:
            gain = f" gain={t.gain}" if t.gain else ""
            lines.append(f"  {t.name}  {t.entry.dtype}{list(t.entry.shape)}  axis={t.axis}  "
                         f"{t.role}  {t.entry.nbytes:,} bytes{gain}")
    n = sum(len(s.targets) for s in plan.shards)
    lines.append(f"total: {n} tensors patched, {plan.patched_bytes:,} bytes rewritten, "
                 f"{plan.total_bytes - plan.patched_bytes:,} bytes copied unchanged")
    return "\n".join(lines)

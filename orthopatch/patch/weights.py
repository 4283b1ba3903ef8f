"""Per-layer, per-component weights of an ablation: how strongly each residual writer is patched.

A weighted direction file (``orthopatch optimize`` writes one) gives every block's attention output
and MLP down projection its own weight, and the embedding one; a target's projection strength is the
global ``--scale`` times its weight. A weight of 0 leaves the tensor out of the plan altogether.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from orthopatch.errors import OrthopatchError
from orthopatch.patch.architecture import EMBEDDING_ROLES
from orthopatch.patch.plan import PatchPlan, ShardPlan

#: The roles a weighted file gives weights to (the embedding roles take the embedding's).
WEIGHTED_ROLES = ("attention", "mlp")


@dataclass(frozen=True)
class ComponentWeights:
    """One weight per block for the attention and the MLP writers, and one for the embedding."""

    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    embedding: float = 1.0

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise ValueError(f"{len(self.attention)} attention weights but {len(self.mlp)} MLP weights")
        for value in (*self.attention, *self.mlp, self.embedding):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"weight {value!r} is not a finite number ≥ 0")

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    def for_target(self, role: str, layer: int | None) -> float:
        """The weight of a writer of ``role`` in block ``layer`` (``None``: outside the blocks)."""
        if role in EMBEDDING_ROLES and layer is None:
            return self.embedding
        if role not in WEIGHTED_ROLES or layer is None:
            raise ValueError(f"a weighted direction has no weight for role {role!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"a weighted direction has {self.num_layers} layers, none for layer {layer}")
        return (self.attention if role == "attention" else self.mlp)[layer]

    def to_json(self) -> dict[str, Any]:
        return {"attention": list(self.attention), "mlp": list(self.mlp), "embedding": self.embedding}

    @classmethod
    def from_json(cls, doc: Any) -> ComponentWeights:
        """Weights as a record holds them; a ``ValueError`` saying what is wrong."""
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("attention", "mlp")):
            raise ValueError("weights need attention and mlp lists")
        values = [*doc["attention"], *doc["mlp"], doc.get("embedding", 1.0)]
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
            raise ValueError("weights must be numbers")
        return cls(tuple(float(v) for v in doc["attention"]), tuple(float(v) for v in doc["mlp"]),
                   float(doc.get("embedding", 1.0)))

    def describe(self) -> str:
        """A short text for tables and cards: each component's weights, rounded."""
        def row(values: tuple[float, ...]) -> str:
            return " ".join(f"{v:.3g}" for v in values)

        return f"attention [{row(self.attention)}], mlp [{row(self.mlp)}], embedding {self.embedding:.3g}"


def weighted_plan(plan: PatchPlan, weights: ComponentWeights) -> PatchPlan:
    """``plan`` without the targets whose weight is 0; a one-line error for a target without a weight."""
    if plan.num_layers is not None and plan.num_layers != weights.num_layers:
        raise OrthopatchError(f"the direction's weights are for {weights.num_layers} layers, the model has "
                              f"{plan.num_layers}", path=plan.checkpoint.root)
    shards = []
    for shard in plan.shards:
        kept = []
        for target in shard.targets:
            try:
                weight = weights.for_target(target.role, target.layer)
            except ValueError as exc:
                raise OrthopatchError(str(exc), path=plan.path_of(target), tensor=target.name) from None
            if weight != 0:
                kept.append(target)
        shards.append(replace(shard, targets=tuple(kept)))
    if not any(s.targets for s in shards):
        raise OrthopatchError("every weight of the direction is 0: there is no tensor to patch",
                              path=plan.checkpoint.root)
    return replace(plan, shards=tuple(ShardPlan(s.name, s.header, s.targets) for s in shards))

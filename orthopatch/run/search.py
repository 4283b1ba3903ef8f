"""What ``orthopatch optimize`` searches and how one trial is judged, without generating anything.

A *point* of the search: the direction (one row interpolated between two layers' normalised
directions at a fractional index between 40% and 90% of the depth, or each layer's own), a weight
profile over the layers for the attention writers and one for the MLP writers (a maximum weight at
a position, falling linearly to a minimum over a distance, zero beyond), and whether the embeddings
are patched. A *trial* runs one pass over the blocks with every harmful and harmless prompt, the
point applied to the activations (:mod:`orthopatch.run.ablation`), and reads two figures from the
first response position: the probability of a refusal opening on harmful prompts, and the KL
divergence from the source's distribution on harmless ones. It also counts the harmful prompts that
look refused (:func:`counts_as_refused`), the count the choice ranks by.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from orthopatch.patch.weights import ComponentWeights
from orthopatch.run.ablation import ActivationAblation
from orthopatch.run.evaluate import kl_divergence
from orthopatch.run.layerwise import Batch, LayerwiseModel

#: The direction index's range, as fractions of the depth (rows 0..n_layers of the measured directions).
INDEX_RANGE = (0.4, 0.9)
#: Maximum weights: attention writers, MLP writers (whose maximum may be 0: left alone).
ATTENTION_MAX = (0.8, 1.5)
MLP_MAX = (0.0, 1.5)
#: The maximum's position, as fractions of the last block's index.
POSITION_RANGE = (0.3, 1.0)
#: A prompt whose refusal-opening probability is above this counts as refused (see :func:`counts_as_refused`).
REFUSED = 0.5


@dataclass(frozen=True)
class Profile:
    """A weight over the blocks: ``max_weight`` at ``position``, linear to ``min_fraction × max_weight`` at
    ``distance`` blocks from it, zero further away."""

    max_weight: float
    position: float
    min_fraction: float
    distance: float

    def weights(self, num_layers: int) -> tuple[float, ...]:
        low = self.min_fraction * self.max_weight
        out = []
        for layer in range(num_layers):
            away = abs(layer - self.position)
            slope = (low - self.max_weight) / self.distance
            out.append(0.0 if away > self.distance else self.max_weight + away * slope)
        return tuple(out)


@dataclass(frozen=True)
class Point:
    """One setting of the ablation's parameters."""

    per_layer: bool
    index: float | None  # fractional row of the measured directions; None when per_layer
    attention: Profile
    mlp: Profile
    embedding: bool

    def rows(self, measured: np.ndarray) -> np.ndarray:
        """``[n_layers + 1, d]`` unit rows: the measured ones, or the interpolated row in every row."""
        if self.per_layer or self.index is None:
            return measured.copy()
        low = min(int(math.floor(self.index)), measured.shape[0] - 1)
        high = min(low + 1, measured.shape[0] - 1)
        frac = self.index - low
        row = (1 - frac) * measured[low] + frac * measured[high]
        row = row / np.linalg.norm(row)
        return np.tile(row, (measured.shape[0], 1))

    def weights(self, num_layers: int) -> ComponentWeights:
        return ComponentWeights(self.attention.weights(num_layers), self.mlp.weights(num_layers),
                                1.0 if self.embedding else 0.0)

    def describe(self) -> str:
        def profile(p: Profile) -> str:
            return f"max {p.max_weight:.2f} @ {p.position:.1f}, min {p.min_fraction:.2f}×, over {p.distance:.1f}"

        where = "per layer" if self.per_layer else f"index {self.index:.2f}"
        return (f"{where}; attention {profile(self.attention)}; mlp {profile(self.mlp)}; "
                f"embedding {'yes' if self.embedding else 'no'}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def suggest(trial: Any, num_layers: int) -> Point:
    """The point an Optuna trial proposes (parameter names are stable: a study file depends on them)."""
    last = max(num_layers - 1, 1)
    per_layer = trial.suggest_categorical("direction_scope", ["global", "per layer"]) == "per layer"
    index = None if per_layer else trial.suggest_float("direction_index", INDEX_RANGE[0] * num_layers,
                                                       INDEX_RANGE[1] * num_layers)
    profiles = {}
    for component, (low, high) in (("attention", ATTENTION_MAX), ("mlp", MLP_MAX)):
        profiles[component] = Profile(
            trial.suggest_float(f"{component}_max_weight", low, high),
            trial.suggest_float(f"{component}_max_weight_position", POSITION_RANGE[0] * last, POSITION_RANGE[1] * last),
            trial.suggest_float(f"{component}_min_weight", 0.0, 1.0),
            trial.suggest_float(f"{component}_min_weight_distance", 1.0, max(1.0, 0.6 * last) + 1.0))
    embedding = trial.suggest_categorical("embedding", [False, True])
    return Point(per_layer, index, profiles["attention"], profiles["mlp"], embedding)


def point_of(params: dict[str, Any]) -> Point:
    """The point of a finished trial, from its recorded parameters."""
    per_layer = params["direction_scope"] == "per layer"
    profiles = [Profile(params[f"{c}_max_weight"], params[f"{c}_max_weight_position"], params[f"{c}_min_weight"],
                        params[f"{c}_min_weight_distance"]) for c in ("attention", "mlp")]
    return Point(per_layer, None if per_layer else params["direction_index"], *profiles, bool(params["embedding"]))


def refusal_tokens(tokenizer: Any, markers: tuple[str, ...]) -> list[int]:
    """Token ids that open a refusal: the first token of each marker phrase, as written, capitalised, and
    after a space (tokenizers that mark word starts give those a token of their own)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = set()
    for marker in markers:
        for text in {marker, marker[:1].upper() + marker[1:], " " + marker}:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if encoded and encoded[0] != unknown:
                ids.add(int(encoded[0]))
    return sorted(ids)


def counts_as_refused(mass: float, top_opens: bool) -> bool:
    """Whether a prompt counts as refused without generating: the most likely first token opens a
    refusal (it is the greedy reply's first token), or the refusal openings together hold more than
    ``REFUSED`` of the probability."""
    return bool(top_opens) or mass > REFUSED


@dataclass(frozen=True)
class TrialFigures:
    """What one trial measured."""

    refusal: float  # mean probability of a refusal opening at the first response position, harmful prompts
    refused: int  # harmful prompts that count as refused (counts_as_refused)
    kl_mean: float  # KL(source ‖ ablated) at the first response position, harmless prompts, nats
    kl_max: float


@dataclass(frozen=True)
class PassCost:
    """What a stage cost: wall seconds, bytes read from the shards (the reader's count), and the
    process's CPU seconds (every thread; on a shared machine the figure that load changes least)."""

    seconds: float
    bytes_read: int
    cpu_seconds: float


class CostMeter:
    """Wall time and bytes read since it was made: ``meter.cost()`` at the end of a stage."""

    def __init__(self, model: LayerwiseModel):
        self.model = model
        self.started, self.read, self.cpu = time.monotonic(), model.reader.account.bytes_read, time.process_time()

    def cost(self) -> PassCost:
        return PassCost(time.monotonic() - self.started, self.model.reader.account.bytes_read - self.read,
                        time.process_time() - self.cpu)


class TrialRunner:
    """Runs trials on one model: prompts tokenized and batched once, the source's harmless
    distributions computed once, the hooks in place. ``costs`` holds each trial's cost, in order."""

    def __init__(self, model: LayerwiseModel, ablation: ActivationAblation, batches: list[Batch], n_harmful: int,
                 refusal_ids: list[int], source_logprobs: torch.Tensor):
        self.model, self.ablation, self.batches = model, ablation, batches
        self.n_harmful = n_harmful
        self.refusal_ids = torch.tensor(refusal_ids, dtype=torch.long)
        self.source_logprobs = source_logprobs  # harmless prompts, float64 log-softmax
        self.costs: list[PassCost] = []

    def figures(self, logits: torch.Tensor) -> TrialFigures:
        """The trial's figures from the next-token logits of every prompt (harmful first)."""
        harmful, harmless = logits[: self.n_harmful].double(), logits[self.n_harmful:].double()
        mass = torch.softmax(harmful, dim=-1)[:, self.refusal_ids].sum(-1) if len(self.refusal_ids) else \
            torch.zeros(harmful.shape[0], dtype=torch.float64)
        top_opens = torch.isin(harmful.argmax(-1), self.refusal_ids)
        kl = kl_divergence(self.source_logprobs, harmless)
        refused = int((top_opens | (mass > REFUSED)).sum())  # as counts_as_refused, for every prompt at once
        return TrialFigures(float(mass.mean()), refused, float(kl.mean()), float(kl.max()))

    def run(self, point: Point, measured: np.ndarray) -> TrialFigures:
        """One pass over the blocks with ``point`` applied to the activations."""
        meter = CostMeter(self.model)
        rows = point.rows(measured).astype(np.float32).astype(np.float64)  # as the written file holds them
        self.ablation.set(rows, point.weights(self.model.num_layers))
        with self.ablation.hooked():
            logits = self.model.logits(self.model.run(self.batches)).cpu()
        figures = self.figures(logits)
        self.costs.append(meter.cost())
        return figures

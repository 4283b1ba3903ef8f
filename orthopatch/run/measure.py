"""``orthopatch measure``: the refusal direction of a model, measured one block at a time.

At every layer ``L`` (the residual stream entering block ``L``; ``L = n_layers`` is the stream
leaving the last block) the mean over harmful instructions minus the mean over harmless ones, taken
at each prompt's last token (the last token of the chat template's assistant opening), in float64.
With ``project_harmless`` the component along the harmless mean is removed from that difference
before it is normalised: the raw difference is otherwise dominated by the few channels in which
every prompt has a huge activation, and ablating it breaks the model.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthopatch import __version__
from orthopatch.errors import OrthopatchError
from orthopatch.io.folders import write_atomic
from orthopatch.io.formats import DIRECTION_RECORD_FORMAT
from orthopatch.run.chat import encode_set, load_tokenizer
from orthopatch.run.layerwise import LayerwiseModel, RunSettings, make_batches
from orthopatch.run.prompts import PromptChoice, PromptSet

#: The default layer is the best-separating one between these fractions of the depth.
DEFAULT_LAYER_RANGE = (0.4, 0.8)
#: A difference this small against the harmless mean's norm has no direction (every prompt ends
#: with the same template tokens, so at layer 0 the last token's state is the same for all of them).
VANISHING = 1e-6


@dataclass(frozen=True)
class MeasureOptions:
    """Everything ``measure`` needs; the CLI only builds one of these."""

    model: Path
    out: Path
    harmful: str | None = None  # a prompt file or REPO_ID:PATH; None: the built-in set
    harmless: str | None = None
    choice: PromptChoice = field(default_factory=PromptChoice)
    layer: int | None = None
    per_layer: bool = False
    project_harmless: bool = True
    run: RunSettings = field(default_factory=RunSettings)
    #: Token ids instead of prompts (benchmarks on checkpoints that have no tokenizer).
    token_ids: tuple[list[list[int]], list[list[int]]] | None = None
    quiet: bool = False
    #: Replace an existing direction file or record (``--overwrite``); refused otherwise.
    overwrite: bool = False
    #: ``ORG/NAME@COMMIT`` when the model was taken from the Hub, for the record.
    model_repo: str | None = None


@dataclass(frozen=True)
class LayerStats:
    """One row of the table: the difference of means at a layer and how well it separates the sets."""

    layer: int
    diff_norm: float  # ‖mean harmful − mean harmless‖
    relative: float  # the same over the larger of ‖mean harmful‖ and ‖mean harmless‖
    separation: float  # (mean score harmful − mean score harmless) / pooled std of the scores
    accuracy: float  # share of prompts on the right side of the midpoint between the mean scores


@dataclass(frozen=True)
class PromptRecord:
    source: str
    count: int
    sha256: str


@dataclass(frozen=True)
class DirectionRecord:
    """What ``refusal_dir.json`` records beside the direction file."""

    model: str
    direction_file: str
    layer: int | None  # the row written, or None for --per-layer
    layer_rule: str
    per_layer: bool
    project_harmless: bool
    harmful: PromptRecord
    harmless: PromptRecord
    hidden_size: int
    num_layers: int
    device: str
    dtype: str
    bytes_read: int
    checkpoint_bytes: int
    seconds: float
    layers: list[LayerStats] = field(default_factory=list)
    filled_rows: list[int] = field(default_factory=list)
    model_repo: str | None = None  # ORG/NAME@COMMIT of a model taken from the Hub; ``model`` is its path
    format: int = DIRECTION_RECORD_FORMAT
    orthopatch_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DirectionRecord:
        doc = dict(doc)
        doc["harmful"] = PromptRecord(**doc["harmful"])
        doc["harmless"] = PromptRecord(**doc["harmless"])
        doc["layers"] = [LayerStats(**row) for row in doc.get("layers", [])]
        return cls(**doc)


@dataclass(frozen=True)
class MeasureResult:
    direction: torch.Tensor  # [d] or [n_layers + 1, d], float32, unit rows
    record: DirectionRecord


class _Means:
    """Per layer: the difference of means, the harmless mean, and the separation statistics."""

    def __init__(self, n_harmful: int, project_harmless: bool):
        self.n_harmful = n_harmful
        self.project_harmless = project_harmless
        self.raw: dict[int, torch.Tensor] = {}
        self.directions: dict[int, torch.Tensor] = {}
        self.stats: dict[int, LayerStats] = {}

    def __call__(self, layer: int, states: torch.Tensor) -> None:
        harmful, harmless = states[: self.n_harmful], states[self.n_harmful:]
        mean_harmless = harmless.mean(0)
        diff = harmful.mean(0) - mean_harmless
        if self.project_harmless and mean_harmless.norm() > 0:
            unit = mean_harmless / mean_harmless.norm()
            diff = diff - (diff @ unit) * unit
        norm = diff.norm()
        scale = max(float(mean_harmless.norm()), float(harmful.mean(0).norm()), 1e-30)
        self.raw[layer] = diff
        separation, accuracy = 0.0, 0.5
        if norm > VANISHING * scale:
            unit_diff = diff / norm
            self.directions[layer] = unit_diff
            a, b = harmful @ unit_diff, harmless @ unit_diff
            pooled = ((a.var(unbiased=False) + b.var(unbiased=False)) / 2).sqrt()
            gap = a.mean() - b.mean()
            separation = float(gap / max(float(pooled), 1e-12 * abs(float(gap)), 1e-300))
            mid = (a.mean() + b.mean()) / 2
            accuracy = float(((a > mid).sum() + (b <= mid).sum()) / states.shape[0])
        self.stats[layer] = LayerStats(layer, float(norm), float(norm) / scale, separation, accuracy)


def default_layer(stats: dict[int, LayerStats], num_layers: int) -> int:
    """The best-separating layer between 40% and 80% of the depth (the shallower one on a tie)."""
    low, high = DEFAULT_LAYER_RANGE
    first = max(1, round(low * num_layers))
    last = max(first, min(num_layers, round(high * num_layers)))
    candidates = [stats[i] for i in range(first, last + 1) if stats[i].separation > 0]
    if not candidates:
        candidates = [s for s in stats.values() if s.separation > 0]
    if not candidates:
        raise OrthopatchError("the harmful and harmless prompts give the same mean at every layer: no direction")
    return max(candidates, key=lambda s: (s.separation, -s.layer)).layer


def fill_vanishing(directions: dict[int, torch.Tensor], num_layers: int) -> tuple[torch.Tensor, list[int]]:
    """``[n_layers + 1, d]`` rows; a layer without a direction takes the next layer's (else the previous one's)."""
    rows, filled = [], []
    known = sorted(directions)
    for layer in range(num_layers + 1):
        if layer in directions:
            rows.append(directions[layer])
            continue
        later = [k for k in known if k > layer]
        rows.append(directions[later[0] if later else known[-1]])
        filled.append(layer)
    return torch.stack(rows), filled


def format_table(stats: list[LayerStats], chosen: int | None) -> str:
    lines = ["layer  ‖harmful−harmless‖  relative  separation  accuracy"]
    for s in stats:
        mark = "  <- written" if s.layer == chosen else ""
        lines.append(f"{s.layer:>5}  {s.diff_norm:>18.4g}  {s.relative:>8.3f}  {s.separation:>10.2f}  "
                     f"{s.accuracy:>8.2f}{mark}")
    return "\n".join(lines)


def sidecar_path(out: Path) -> Path:
    """``refusal_dir.pth`` → ``refusal_dir.json``."""
    return out.with_suffix(".json")


def check_outputs(out: Path, overwrite: bool) -> None:
    """Before any work: neither the direction file nor its record beside it is replaced unless
    ``overwrite``, and neither is a folder."""
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise OrthopatchError("is a folder, not a file measure can write", path=path)
        if os.path.lexists(path) and not overwrite:
            what = "the direction file" if path == out else "the record of a direction"
            raise OrthopatchError(f"exists ({what}); pass --overwrite to replace it", path=path)


def measure(options: MeasureOptions, log: Callable[[str], None] | None = None) -> MeasureResult:
    """Run the prompts through the model block by block, write the direction and its record."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    started = time.monotonic()
    device = options.run.torch_device()
    dtype = options.run.torch_dtype()
    if options.out.suffix.lower() not in (".pth", ".pt"):
        raise OrthopatchError("the direction file must end in .pth or .pt", path=options.out)
    if not options.out.parent.is_dir():
        raise OrthopatchError("the output's folder does not exist", path=options.out.parent)
    check_outputs(options.out, options.overwrite)
    with LayerwiseModel(options.model, device=device, dtype=dtype, progress=not options.quiet) as model:
        n = model.num_layers
        if options.layer is not None and not 0 <= options.layer <= n:
            raise OrthopatchError(f"--layer {options.layer} is out of range: the model has {n} blocks, "
                                  f"so layers 0..{n}", path=options.model)
        if options.token_ids is not None:
            harmful_ids, harmless_ids = options.token_ids
            harmful = PromptSet("token ids", tuple(" ".join(map(str, p)) for p in harmful_ids))
            harmless = PromptSet("token ids", tuple(" ".join(map(str, p)) for p in harmless_ids))
        else:
            harmful = options.choice.choose(options.harmful, "harmful", options.quiet)
            harmless = options.choice.choose(options.harmless, "harmless", options.quiet)
            tokenizer = load_tokenizer(options.run.tokenizer or options.model)
            harmful_ids = encode_set(tokenizer, harmful, model.context_length)
            harmless_ids = encode_set(tokenizer, harmless, model.context_length)
        log(f"measuring {options.model}: {len(harmful_ids)} harmful and {len(harmless_ids)} harmless prompts, "
            f"{n} blocks, one at a time on {device}")
        means = _Means(len(harmful_ids), options.project_harmless)
        model.run(make_batches(harmful_ids + harmless_ids, options.run.batch_size), means)
        bytes_read, checkpoint_bytes = model.stats.bytes_read, model.checkpoint.total_bytes
        hidden = model.hidden_size

    stats = [means.stats[i] for i in range(n + 1)]
    if not means.directions:
        raise OrthopatchError("the harmful and harmless prompts give the same mean at every layer: no direction",
                              path=options.model)
    filled: list[int] = []
    if options.per_layer:
        direction, filled = fill_vanishing(means.directions, n)
        layer, rule = None, "per-layer"
    else:
        layer = options.layer if options.layer is not None else default_layer(means.stats, n)
        rule = "--layer" if options.layer is not None else "best separation in 40%..80% of the depth"
        if layer not in means.directions:
            raise OrthopatchError(f"layer {layer} has no direction: the harmful and harmless means are equal there",
                                  path=options.model)
        direction = means.directions[layer]
    direction = direction.float().contiguous()
    log(format_table(stats, layer))

    record = DirectionRecord(
        model=str(options.model), direction_file=options.out.name, layer=layer, layer_rule=rule,
        per_layer=options.per_layer, project_harmless=options.project_harmless,
        harmful=PromptRecord(harmful.source, len(harmful_ids), harmful.sha256),
        harmless=PromptRecord(harmless.source, len(harmless_ids), harmless.sha256),
        hidden_size=hidden, num_layers=n, device=str(device), dtype=options.run.dtype, bytes_read=bytes_read,
        checkpoint_bytes=checkpoint_bytes, seconds=round(time.monotonic() - started, 3), layers=stats,
        filled_rows=filled, model_repo=options.model_repo)
    buffer = io.BytesIO()
    torch.save(direction, buffer)
    write_atomic(options.out, buffer.getvalue())
    write_atomic(sidecar_path(options.out), (json.dumps(record.to_json(), indent=2) + "\n").encode())
    return MeasureResult(direction, record)

"""A conversion prepared once: everything decided before a byte is written.

:func:`prepare_conversion` reads the headers, builds the plan, loads the direction, picks the device,
builds the kernel, fingerprints the run and computes every target's unit vector (reading the norm
gains it needs). The :class:`Conversion` it returns is what the driver (:mod:`orthopatch.patch.driver`)
runs, whatever the destination of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orthopatch.devices import resolve_device
from orthopatch.errors import OrthopatchError
from orthopatch.patch.already import refuse_if_already_abliterated
from orthopatch.patch.direction import Direction
from orthopatch.patch.plan import ConversionPlan, PatchPlan, PatchTarget
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.record import ConversionRecord, Fingerprint, Method
from orthopatch.patch.stream import TensorPatcher


@dataclass(frozen=True)
class CardFacts:
    """What the model card says of the source and the direction, and the source's own card."""

    base_model: str
    direction_name: str
    #: The source card's front matter and body, read before anything is written.
    source_card: tuple[dict[str, Any], str]


@dataclass(frozen=True)
class Conversion:
    """One prepared conversion: plan, direction, method, device, kernel, fingerprint, unit vectors, card."""

    plan: ConversionPlan
    direction: Direction
    #: The direction file (absolute) and the MODEL argument, as the record names them.
    direction_file: Path
    source: Path
    method: Method
    device: torch.device
    patcher: TensorPatcher
    fingerprint: Fingerprint
    #: The unit vector (float64) each target is projected against, by tensor name.
    unit_vectors: dict[str, torch.Tensor]
    card: CardFacts
    #: Convert even a model whose tensors look already abliterated along the direction.
    force: bool = False
    #: Each target's projection strength (the global scale times its weight), by tensor name.
    scales: dict[str, float] = field(default_factory=dict)

    def scale_of(self, name: str) -> float:
        """The projection strength of target ``name``."""
        return self.scales.get(name, self.method.scale)

    def check_not_abliterated(self) -> None:
        """Refuse (one line) a source already abliterated along this direction, unless forced: patching a
        patched tensor again only adds rounding (:mod:`orthopatch.patch.already`). Destinations call it
        before a fresh run writes anything."""
        if not self.force:
            refuse_if_already_abliterated(self.plan, self.unit_vectors, self.plan.checkpoint.root)

    @property
    def targets(self) -> list[PatchTarget]:
        return list(self.plan.targets())

    def plan_line(self, how: str) -> str:
        """One line before the progress bar: architecture, device, what is patched, then ``how`` (where the
        bytes go and what is left)."""
        return (f"{self.plan.architecture.name} on {self.device}: patching {len(self.targets)} tensors "
                f"({self.plan.patched_bytes:,} bytes){how}")

    def record(self, seconds: float, *, in_place: bool = False) -> ConversionRecord:
        """The record of this conversion, finished in ``seconds``."""
        return ConversionRecord.of(
            self.plan, source=self.plan.checkpoint.root if in_place and isinstance(self.plan, PatchPlan)
            else self.source,
            direction_file=self.direction_file, direction_sha256=self.direction.sha256,
            direction_rows=int(self.direction.rows.shape[0]), method=self.method, device=str(self.device),
            seconds=seconds, fingerprint=self.fingerprint, in_place=in_place)


def prepare_conversion(plan: ConversionPlan, direction: Direction, *, direction_file: Path, source: Path,
                       method: Method, device: str, card: CardFacts, force: bool = False) -> Conversion:
    """Resolve the device, build the kernel, fingerprint the run and compute every unit vector."""
    resolved = resolve_device(device)
    patcher = TensorPatcher(resolved, scale=method.scale, norm_preserving=method.norm_preserving)
    fingerprint = Fingerprint.of(plan, direction.sha256, method, resolved.type, patcher.kernel.block_elements)
    scales = {t.name: method.scale_for(t.role, t.layer) for t in plan.targets()}
    return Conversion(plan, direction, direction_file, source, method, resolved, patcher, fingerprint,
                      target_directions(plan, direction), card, force, scales)


def target_directions(plan: ConversionPlan, direction: Direction) -> dict[str, torch.Tensor]:
    """The unit vector each target is projected against: its layer's row, weighted by its norm gain."""
    gains: dict[str, torch.Tensor] = {}
    for name in plan.gain_names():
        gains[name] = plan.read_gain(name)
        bad = int((~torch.isfinite(gains[name])).sum())
        if bad:
            raise OrthopatchError(f"norm gain holds {bad:,} non-finite values (NaN or Inf); the tensors it "
                                  "scales cannot be patched", path=plan.path_of_tensor(name), tensor=name)
    out = {}
    for target in plan.targets():
        r = torch.from_numpy(np.ascontiguousarray(direction.for_layer(target.layer), dtype=np.float64))
        try:
            out[target.name] = unit_direction(r, gains.get(target.gain) if target.gain else None, target.gain_offset)
        except ValueError as exc:
            raise OrthopatchError(f"{exc} {target.gain!r}", path=plan.path_of(target), tensor=target.name) from None
    return out

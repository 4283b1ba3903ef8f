"""The plan of a GGUF conversion, decided from the headers alone: which tensors, in which part, on which axis.

The family comes from ``general.architecture``; its residual writers are the roles of
``architectures.json`` under llama.cpp's tensor names (gguf-py's ``TENSOR_NAMES``). The checks match
the safetensors plan's: the residual axis is the model's width, every block has an attention and an
MLP writer (an unknown sublayer is refused, not skipped), norm gains exist and are float vectors, and
every patched tensor is of a type that can be requantized (anything else is refused, naming the
tensor and its type, before a byte is written).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from orthopatch.errors import OrthopatchError, quoted
from orthopatch.gguf.container import GGUFFile, GGUFTensor
from orthopatch.gguf.quants import PATCHABLE_TYPES, dequantize
from orthopatch.io.reader import open_source
from orthopatch.io.safetensors_header import TensorEntry
from orthopatch.patch.plan import PatchTarget, Selection, format_layers

FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class GGUFRule:
    role: str
    pattern: re.Pattern[str]
    axis: int


@dataclass(frozen=True)
class GGUFFamily:
    name: str  # the general.architecture value
    description: str
    gains: dict[str, str]  # role -> gain tensor template ("blk.{bid}.post_ffw_norm")


@dataclass(frozen=True)
class GGUFPlan:
    """What a GGUF conversion does, part by part."""

    parts: tuple[GGUFFile, ...]
    family: GGUFFamily
    hidden_size: int
    num_layers: int
    part_targets: tuple[tuple[PatchTarget, ...], ...]  # per part, in offset order
    selection: Selection = Selection()
    #: llama.cpp importance weights ``[n_expert, ne0]`` of the quantized targets that have them, by tensor name
    #: (``apply --imatrix``): their requantization weighs the error as ``llama-quantize --imatrix`` does.
    importance: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    def all_targets(self) -> list[PatchTarget]:
        return [t for part in self.part_targets for t in part]

    def gain_names(self) -> list[str]:
        return sorted({t.gain for t in self.all_targets() if t.gain})

    def targets(self) -> list[PatchTarget]:
        return self.all_targets()

    def part_of(self, tensor: str) -> GGUFFile:
        return next(p for p in self.parts if tensor in p.by_name)

    @property
    def architecture(self) -> GGUFFamily:
        return self.family

    def source_headers(self) -> dict[str, str]:
        """sha256 and size of each part's header: what identifies the source in a fingerprint."""
        return {p.path.name: f"{header_sha256(p)}:{p.file_size}" for p in self.parts}

    def read_gain(self, name: str) -> torch.Tensor:
        """A norm gain (a float vector), read whole from its part."""
        part = self.part_of(name)
        tensor = part.by_name[name]
        with open_source(part.path) as fd:
            raw = np.frombuffer(os.pread(fd, tensor.nbytes, tensor.begin), dtype=np.uint8)
        if len(raw) != tensor.nbytes:
            raise OrthopatchError("file ends inside the tensor", path=part.path, tensor=name)
        return torch.from_numpy(dequantize(raw, tensor.qtype, tensor.shape).astype(np.float32))

    def path_of_tensor(self, name: str) -> Path:
        return self.part_of(name).path

    def path_of(self, target: PatchTarget) -> Path:
        return self.part_of(target.name).path

    @property
    def patched_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.all_targets())

    @property
    def total_bytes(self) -> int:
        return sum(p.file_size for p in self.parts)


def header_sha256(part: GGUFFile) -> str:
    """sha256 of a part's metadata and tensor infos as on disk."""
    digest = hashlib.sha256()
    for _, raw in part.kv_raw:
        digest.update(raw)
    digest.update(part.tensor_infos_raw)
    return digest.hexdigest()


@cache
def _table() -> dict[str, Any]:
    return json.loads((resources.files(__package__) / "architectures.json").read_text(encoding="utf-8"))


def _template(role_name: str) -> str:
    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, role_name)]


@cache
def rules() -> tuple[GGUFRule, ...]:
    """One rule per residual writer role: the tensor's weight (and bias, whose only axis is the residual)."""
    out = []
    for doc in _table()["targets"]:
        name = re.escape(_template(doc["tensor"])).replace(re.escape("{bid}"), r"(?P<layer>\d+)")
        out.append(GGUFRule(doc["role"], re.compile(name + r"\.weight"), doc["axis"]))
        out.append(GGUFRule(doc["role"], re.compile(name + r"\.bias"), -1))
    return tuple(out)


def find_family(part: GGUFFile) -> GGUFFamily:
    arch = part.value(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise OrthopatchError("has no general.architecture: not a model GGUF", path=part.path)
    for doc in _table()["families"]:
        if arch in doc["architectures"]:
            gains = {role: _template(t) + ".weight" for role, t in doc.get("gains", {}).items()}
            return GGUFFamily(arch, doc["description"], gains)
    raise OrthopatchError(f"architecture {quoted(arch)} is not one orthopatch knows for GGUF files", path=part.path)


def _model_size(part: GGUFFile, family: GGUFFamily, key: str) -> int:
    value = part.value(key.format(arch=family.name))
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OrthopatchError(f"metadata {key.format(arch=family.name)} is missing or not a positive count",
                              path=part.path)
    return value


def _entry(tensor: GGUFTensor) -> TensorEntry:
    return TensorEntry(tensor.name, tensor.qtype.name, tensor.shape, tensor.begin, tensor.end)


def _target(part: GGUFFile, tensor: GGUFTensor, rule: GGUFRule, layer: int | None, family: GGUFFamily,
            hidden: int) -> PatchTarget:
    shape = tensor.shape
    axis = rule.axis + len(shape)
    if not 0 <= axis < len(shape) or shape[axis] != hidden:
        raise OrthopatchError(f"residual axis of shape {list(shape)} is not the model width {hidden}",
                              path=part.path, tensor=tensor.name)
    if tensor.qtype not in PATCHABLE_TYPES:
        names = ", ".join(sorted(t.name for t in PATCHABLE_TYPES))
        raise OrthopatchError(f"is {tensor.qtype.name}, a type orthopatch cannot requantize (only {names})",
                              path=part.path, tensor=tensor.name)
    gain_template = family.gains.get(rule.role)
    gain = gain_template.format(bid=layer) if gain_template and layer is not None else None
    return PatchTarget(_entry(tensor), part.path.name, rule.role, axis, layer, gain, 0.0)


def _check_gain(parts: tuple[GGUFFile, ...], target: PatchTarget, hidden: int) -> None:
    owner = next((p for p in parts if target.gain in p.by_name), None)
    if owner is None:
        raise OrthopatchError(f"its norm gain {target.gain!r} is not in the file", tensor=target.name)
    gain = owner.by_name[target.gain]
    if gain.shape != (hidden,) or gain.qtype not in FLOAT_TYPES:
        raise OrthopatchError(f"norm gain is {gain.qtype.name}{list(gain.shape)}, expected a float vector of "
                              f"{hidden}", path=owner.path, tensor=target.gain)


def build_gguf_plan(parts: list[GGUFFile], selection: Selection | None = None) -> GGUFPlan:
    """Match every tensor of every part against the family's residual writers; check axes, types, gains and
    that every block has its writers."""
    selection = selection or Selection()
    first = parts[0]
    family = find_family(first)
    hidden = _model_size(first, family, gguf.Keys.LLM.EMBEDDING_LENGTH)
    num_layers = _model_size(first, family, gguf.Keys.LLM.BLOCK_COUNT)
    if selection.layers is not None and selection.layers and max(selection.layers) >= num_layers:
        raise OrthopatchError(f"--layers selects layer {max(selection.layers)}, but the model has {num_layers} "
                              f"layers (0 to {num_layers - 1}; ranges exclude their end)")
    found: dict[int, set[str]] = {}
    per_part = []
    for part in parts:
        targets = []
        for tensor in sorted(part.tensors, key=lambda t: t.begin):
            for rule in rules():
                m = rule.pattern.fullmatch(tensor.name)
                if m is None:
                    continue
                layer = int(m["layer"]) if "layer" in rule.pattern.groupindex else None
                if layer is not None:
                    if layer >= num_layers:
                        raise OrthopatchError(f"tensor of layer {layer}, but the file has {num_layers} layers",
                                              path=part.path, tensor=tensor.name)
                    found.setdefault(layer, set()).add(rule.role)
                if selection.wants(rule.role, layer):
                    target = _target(part, tensor, rule, layer, family, hidden)
                    if target.gain is not None:
                        _check_gain(tuple(parts), target, hidden)
                    if tensor.nbytes:
                        targets.append(target)
                break
        per_part.append(tuple(targets))
    for layer in range(num_layers):
        missing = {"attention", "mlp"} - found.get(layer, set())
        if missing:
            raise OrthopatchError(f"layer {layer} has no {' or '.join(sorted(missing))} tensor orthopatch knows "
                                  "(an unknown sublayer?)", path=first.path)
    if not any(per_part):
        raise OrthopatchError("the selection (--layers, --no-embeddings) leaves no tensor to patch", path=first.path)
    return GGUFPlan(tuple(parts), family, hidden, num_layers, tuple(per_part), selection)


def format_gguf_plan(plan: GGUFPlan) -> str:
    """The plan as text: one line per patched tensor, then totals."""
    lines = [f"architecture {plan.family.name} (GGUF), hidden size {plan.hidden_size}, {plan.num_layers} layers, "
             f"{len(plan.parts)} file(s), {plan.total_bytes:,} bytes",
             f"patching layers {format_layers(plan.selection.layers)}, embeddings "
             f"{'yes' if plan.selection.embeddings else 'no'}"]
    for part, targets in zip(plan.parts, plan.part_targets, strict=True):
        lines.append(f"{quoted(part.path.name)}: {len(targets)} of {len(part.tensors)} tensors patched")
        for t in targets:
            gain = f" gain={t.gain}" if t.gain else ""
            lines.append(f"  {quoted(t.name)}  {t.entry.dtype}{list(t.entry.shape)}  axis={t.axis}  "
                         f"{t.role}  {t.entry.nbytes:,} bytes{gain}")
    lines.append(f"total: {len(plan.all_targets())} tensors patched, {plan.patched_bytes:,} bytes rewritten, "
                 f"{plan.total_bytes - plan.patched_bytes:,} bytes copied unchanged")
    return "\n".join(lines)

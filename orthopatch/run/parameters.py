"""Which checkpoint tensors feed each parameter of a model that transformers builds, and how.

transformers (5.x) converts some families' checkpoint tensors while loading them. Mixtral's
``block_sparse_moe`` is renamed ``mlp``; the experts, stored one matrix per expert as on the Hub
(``experts.N.w1/w3/w2`` for Mixtral, ``experts.N.gate_proj/up_proj/down_proj`` for Qwen2-MoE and
Qwen3-MoE), are stacked and concatenated into fused parameters: ``experts.gate_up_proj``
``[experts, 2 × intermediate, hidden]`` (gate rows, then up rows) and ``experts.down_proj``
``[experts, hidden, intermediate]``.

:func:`parameter_sources` asks transformers which checkpoint names become which parameter (its own
conversion mapping and renaming rules applied to the names: no tensor data is read) and
:func:`read_fused` reproduces the fusing operations those families use, stacking a list of tensors
(``MergeModulelist``) and concatenating (``Concatenate``), by reading each source tensor whole
(its exact byte range) straight into its slice of the parameter. Any other conversion is refused in
one line before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orthopatch.errors import OrthopatchError
from orthopatch.io.reader import CheckpointReader


@dataclass(frozen=True)
class Fused:
    """A parameter assembled from several checkpoint tensors.

    ``groups``: the tensors of each source pattern (e.g. every expert's gate matrix, then every
    expert's up matrix), in the order transformers collects them. ``stack_dim``: each group is
    stacked along it (``MergeModulelist``), or ``None``. ``concat_dim``: the (stacked) groups are
    concatenated along it (``Concatenate``), or ``None``.
    """

    target: str
    groups: tuple[tuple[str, ...], ...]
    stack_dim: int | None
    concat_dim: int | None

    @property
    def first(self) -> str:
        return self.groups[0][0]


#: A parameter's source: one checkpoint tensor (under its own or another name) or several, fused.
Source = str | Fused


def _transformers_loading() -> tuple | None:
    """transformers' conversion helpers, or ``None`` for a version that loads tensors as they are."""
    try:
        from transformers import conversion_mapping
        from transformers import core_model_loading as cml
    except ImportError:
        return None
    try:
        return (conversion_mapping.get_model_conversion_mapping, cml.rename_source_key, cml.dot_natural_key,
                cml.WeightRenaming, cml.WeightConverter, cml.MergeModulelist, cml.Concatenate)
    except AttributeError:
        return None


def parameter_sources(model: nn.Module, names: Iterable[str], root: Path) -> dict[str, Source]:
    """Each parameter's source among the checkpoint tensors ``names``, as transformers would load it.

    Parameters no checkpoint name leads to are absent (tied heads, or names transformers does not
    resolve). A parameter transformers fuses with operations other than stacking and concatenating
    is a one-line error naming its first source tensor.
    """
    helpers = _transformers_loading()
    if helpers is None:
        return {}
    get_mapping, rename, natural_key, renaming_type, converter_type, merge_type, concat_type = helpers
    transforms = get_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, renaming_type)]
    converters = [t for t in transforms if isinstance(t, converter_type)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta_state = model.state_dict()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", None)

    sources: dict[str, Source] = {}
    collected: dict[str, dict[str, list[str]]] = {}  # fused parameter -> source pattern -> tensors
    for key in sorted(names, key=natural_key):
        target, pattern = rename(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:  # as transformers does: keep the name
            target, pattern = rename(key, [], [], prefix, meta_state)
        if target not in params:
            continue
        if pattern is None:
            sources.setdefault(target, key)
        else:
            collected.setdefault(target, {}).setdefault(pattern, []).append(key)

    for target, groups in collected.items():
        converter = by_pattern[next(iter(groups))]
        ops = list(converter.operations)
        kinds = [type(op) for op in ops]
        ordered = tuple(tuple(groups[p]) for p in converter.source_patterns if p in groups)
        if kinds == [merge_type] and len(ordered) == 1:
            stack, concat = ops[0].dim, None
        elif kinds == [merge_type, concat_type]:
            stack, concat = ops[0].dim, ops[1].dim
        elif kinds == [concat_type]:
            stack, concat = None, ops[0].dim
        else:
            names_of_ops = ", ".join(type(op).__name__ for op in ops)
            raise OrthopatchError(f"transformers converts this tensor into {target!r} with {names_of_ops}, "
                                  "which is not supported here", path=root, tensor=ordered[0][0])
        sources[target] = Fused(target, ordered, stack, concat)
    return sources


Place = Callable[[torch.Tensor], torch.Tensor]


def _layout(spec: Fused, shape_of: Callable[[str], tuple[int, ...]], root: Path
            ) -> tuple[tuple[int, ...], list[tuple[str, Place]]]:
    """The fused shape, and for each source tensor the view of the fused tensor it fills."""
    def mismatch(name: str, what: str) -> OrthopatchError:
        return OrthopatchError(f"cannot be fused into {spec.target!r}: {what}", path=root, tensor=name)

    parts: list[tuple[str, tuple[int, ...]]] = []  # (tensor or group head, shape of the piece)
    members: list[list[tuple[str, int | None]]] = []  # per piece: (tensor, index along the stack)
    for group in spec.groups:
        shapes = [tuple(shape_of(n)) for n in group]
        if spec.stack_dim is None:
            for name, shape in zip(group, shapes, strict=True):
                parts.append((name, shape))
                members.append([(name, None)])
            continue
        for name, shape in zip(group, shapes, strict=True):
            if shape != shapes[0]:
                raise mismatch(name, f"shape {list(shape)} differs from {group[0]}'s {list(shapes[0])}")
        dim = spec.stack_dim % (len(shapes[0]) + 1)
        stacked = shapes[0][:dim] + (len(group),) + shapes[0][dim:]
        parts.append((group[0], stacked))
        members.append([(name, k) for k, name in enumerate(group)])

    rank = len(parts[0][1])
    for name, shape in parts:
        if len(shape) != rank:
            raise mismatch(name, f"shape {list(shape)} has another rank than {list(parts[0][1])}")
    if spec.concat_dim is None:
        total = parts[0][1]
        cat = None
    else:
        cat = spec.concat_dim % rank
        for name, shape in parts:
            if shape[:cat] + shape[cat + 1:] != parts[0][1][:cat] + parts[0][1][cat + 1:]:
                raise mismatch(name, f"shape {list(shape)} does not concatenate with {list(parts[0][1])} "
                                     f"along dimension {cat}")
        total = parts[0][1][:cat] + (sum(s[cat] for _, s in parts),) + parts[0][1][cat + 1:]

    places: list[tuple[str, Place]] = []
    offset = 0
    for (_, shape), group in zip(parts, members, strict=True):
        start, width = offset, (shape[cat] if cat is not None else 0)
        offset += width
        for name, k in group:
            def place(out: torch.Tensor, start: int = start, width: int = width, k: int | None = k) -> torch.Tensor:
                piece = out.narrow(cat, start, width) if cat is not None else out
                return piece.select(spec.stack_dim % piece.dim(), k) if k is not None else piece
            places.append((name, place))
    return total, places


def read_fused(spec: Fused, reader: CheckpointReader, shape: tuple[int, ...], *, dtype: torch.dtype,
               device: torch.device, root: Path) -> torch.Tensor:
    """The fused parameter, each source tensor read whole into its slice (no second copy is made)."""
    total, places = _layout(spec, reader.shape, root)
    if tuple(total) != tuple(shape):
        raise OrthopatchError(f"fused with {sum(map(len, spec.groups)) - 1} other tensors into {spec.target!r}: "
                              f"shape {list(total)}, the model expects {list(shape)}", path=root, tensor=spec.first)
    out = torch.empty(shape, dtype=dtype, device=device)
    for name, place in places:
        place(out).copy_(reader.read(name))
    return out

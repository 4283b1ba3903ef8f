"""The ablation ``apply`` writes into the weights, done to the activations of a layer-wise run instead.

``apply`` replaces a residual writer ``W`` (and its bias) by ``W − s·u(uᵀW)``, so its output ``y``
becomes ``y − s·u(uᵀy)``. Forward hooks on the modules that own the plan's targets (attention output
and MLP down projections, the embeddings) make that change to their outputs, with the same unit
vectors as ``apply`` (the layer's row, weighted by a following norm's gain) and the same strengths
(scale × weight). A tied output head reads the patched embedding, so its input is projected too. One
pass over the blocks then gives what the model ``apply`` would write gives, without writing anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from orthopatch.errors import OrthopatchError
from orthopatch.patch.architecture import choose_architecture
from orthopatch.patch.plan import PatchPlan, PatchTarget, build_plan
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.weights import ComponentWeights
from orthopatch.run.layerwise import LayerwiseModel


def row_for(rows: np.ndarray, layer: int | None) -> np.ndarray:
    """The row a target of block ``layer`` uses, as :meth:`Direction.for_layer` picks it (embeddings: row 0)."""
    return rows[0] if rows.shape[0] == 1 else rows[0 if layer is None else layer]


class ActivationAblation:
    """Hooks on a :class:`LayerwiseModel` that project a direction out of every residual write.

    :meth:`set` chooses the rows and weights of the next passes; inside :meth:`hooked` every pass and
    every head call is ablated accordingly.
    """

    def __init__(self, model: LayerwiseModel, plan: PatchPlan | None = None):
        self.model = model
        checkpoint = model.checkpoint
        self.plan = plan or build_plan(checkpoint, choose_architecture(checkpoint, ()))
        owners = self._owners()
        #: module -> the target that decides its strength and unit vector (weight and bias share them)
        self.modules: dict[nn.Module, PatchTarget] = {}
        for target in self.plan.targets():
            module = owners.get(target.name)
            if module is None:
                raise OrthopatchError("is a residual writer that the layer-wise runner cannot ablate (not a "
                                      "parameter of its own module, such as fused experts)", path=model.root,
                                      tensor=target.name)
            self.modules.setdefault(module, target)
        self.gains = {name: self.plan.read_gain(name).double() for name in self.plan.gain_names()}
        embedding = [t for t in self.plan.targets() if t.layer is None and t.name == model.head_name]
        #: the embedding target a tied head reads, if any
        self.tied: PatchTarget | None = embedding[0] if embedding else None
        self._active: dict[nn.Module, tuple[torch.Tensor, float]] = {}

    def _owners(self) -> dict[str, nn.Module]:
        """Checkpoint tensor name -> the module holding the parameter it loads into."""
        owners: dict[str, nn.Module] = {}
        for name, _ in self.model.model.named_parameters(remove_duplicate=False):
            try:
                stored = self.model._tensor_name(name)
            except OrthopatchError:
                continue  # fused or absent: not a tensor a target can name
            owner, _, _ = name.rpartition(".")
            owners.setdefault(stored, self.model.model.get_submodule(owner))
        return owners

    def set(self, rows: np.ndarray, weights: ComponentWeights | None, scale: float = 1.0) -> None:
        """The next passes remove ``scale × weight`` of each target's unit vector from its module's output.

        ``rows``: unit directions ``[1 | n_layers | n_layers + 1, d]``, as a direction file holds them.
        """
        active = {}
        dtype, device = self.model.dtype, self.model.device
        for module, target in self.modules.items():
            strength = scale * (weights.for_target(target.role, target.layer) if weights is not None else 1.0)
            if strength == 0:
                continue
            r = torch.from_numpy(np.ascontiguousarray(row_for(rows, target.layer), dtype=np.float64))
            u = unit_direction(r, self.gains.get(target.gain) if target.gain else None, target.gain_offset)
            active[module] = (u.to(device=device, dtype=dtype), float(strength))
        if self.tied is not None and self.model.norm is not None:
            for module, target in self.modules.items():
                if target is self.tied and module in active:
                    active[self.model.norm] = active[module]
        self._active = active

    def clear(self) -> None:
        """No ablation: the next passes run the source model."""
        self._active = {}

    def _hook(self, module: nn.Module, _: Any, output: Any) -> Any:
        found = self._active.get(module)
        if found is None or not isinstance(output, torch.Tensor):
            return None
        u, strength = found
        return output - strength * (output @ u).unsqueeze(-1) * u

    @contextmanager
    def hooked(self) -> Iterator[ActivationAblation]:
        """The hooks in place on every target's module (and the final norm, for a tied head)."""
        modules = list(self.modules)
        if self.tied is not None and self.model.norm is not None:
            modules.append(self.model.norm)
        handles = [m.register_forward_hook(self._hook) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

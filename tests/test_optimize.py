"""``orthopatch optimize``: the activation-space ablation equals apply's weight edit; the search is
reproducible, removes the planted refusal and refuses bad input in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.direction import save_weighted_direction
from orthopatch.patch.weights import ComponentWeights
from orthopatch.run.chat import encode_set, load_tokenizer
from orthopatch.run.layerwise import LayerwiseModel, make_batches
from orthopatch.run.prompts import builtin_prompts

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")


def final_logits(folder, prompts, ablation_args=None) -> torch.Tensor:
    from orthopatch.run.ablation import ActivationAblation

    with LayerwiseModel(folder, device=CPU, logits=True) as model:
        if ablation_args is None:
            return model.logits(model.run(make_batches(prompts, 4)))
        ablation = ActivationAblation(model)
        ablation.set(*ablation_args)
        with ablation.hooked():
            return model.logits(model.run(make_batches(prompts, 4)))


@pytest.mark.parametrize("family", ["llama", "llama-tied", "gemma3"])
def test_activation_ablation_equals_the_weight_edit(tiny_models, family, tmp_path):
    """A trial's final-position logits equal those of the model apply writes with the same weights."""
    folder = tiny_models(family)
    with LayerwiseModel(folder, device=CPU) as model:
        n, d = model.num_layers, model.hidden_size
    rows = torch.randn(n + 1, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = (rows / rows.norm(dim=1, keepdim=True)).float().double().numpy()
    weights = ComponentWeights(tuple(np.linspace(0.3, 1.4, n)), (0.0,) + (1.1,) * (n - 1), 0.9)
    path = tmp_path / "w.safetensors"
    save_weighted_direction(path, rows, weights, {})
    weights = ComponentWeights(*(tuple(float(np.float32(v)) for v in vs) for vs in (weights.attention, weights.mlp)),
                               float(np.float32(weights.embedding)))
    apply(ApplyOptions(model=folder, direction=path, out=tmp_path / "out", quiet=True))
    prompts = encode_set(load_tokenizer(folder), builtin_prompts("harmless_eval").sample(6, 0), None)
    edited = final_logits(tmp_path / "out", prompts)
    ablated = final_logits(folder, prompts, (rows.astype(np.float32).astype(np.float64), weights))
    source = final_logits(folder, prompts)
    assert (edited - source).abs().max() > 1e-3  # the edit changes something
    torch.testing.assert_close(ablated, edited, rtol=1e-4, atol=1e-4 * float(edited.abs().max()))


def test_activation_ablation_equals_the_weight_edit_on_the_planted_model(planted, tmp_path):
    folder, r = planted
    with LayerwiseModel(folder, device=CPU) as model:
        n = model.num_layers
    rows = np.tile(r.float().double().numpy(), (n + 1, 1))
    weights = ComponentWeights((1.0, 0.5, 0.0), (0.0, 1.0, 0.25), 1.0)
    path = tmp_path / "w.safetensors"
    save_weighted_direction(path, rows, weights, {})
    apply(ApplyOptions(model=folder, direction=path, out=tmp_path / "out", quiet=True))
    prompts = encode_set(load_tokenizer(folder), builtin_prompts("harmful_eval").sample(6, 0), None)
    edited = final_logits(tmp_path / "out", prompts)
    ablated = final_logits(folder, prompts, (rows, weights))
    torch.testing.assert_close(ablated, edited, rtol=1e-4, atol=1e-4 * float(edited.abs().max()))

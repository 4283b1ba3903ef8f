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


# -- the search -------------------------------------------------------------------------------------

TRIALS = 12


def run_optimize(folder, out, *extra, trials: int = TRIALS):
    from tests.helpers import cli

    return cli("optimize", folder, "-o", out, "--trials", trials, "--limit", 12, "--max-new-tokens", 3,
               "--device", "cpu", "-q", *extra)


@pytest.fixture(scope="module")
def searched(planted, tmp_path_factory):
    pytest.importorskip("optuna")
    folder, _ = planted
    root = tmp_path_factory.mktemp("searched")
    markers = root / "markers.txt"
    markers.write_text("cannot\n")
    results = []
    for name in ("a", "b"):
        result = run_optimize(folder, root / f"{name}.safetensors", "--seed", 7, "--refusal-markers", markers)
        assert result.exit_code == 0, result.output
        results.append(result)
    return folder, root, markers, results


def test_a_seeded_search_is_reproducible(searched):
    _, root, _, (a, b) = searched
    assert a.stdout.replace("a.safetensors", "b.safetensors") == b.stdout  # the same trials, figures, choice
    assert (root / "a.safetensors").read_bytes() == (root / "b.safetensors").read_bytes()


def test_the_chosen_point_removes_the_planted_refusal(searched, tmp_path):
    from orthopatch.run.evaluate import EvaluateOptions, evaluate
    from orthopatch.run.layerwise import RunSettings

    folder, root, markers, (a, _) = searched
    assert "greedy replies refused 0/32 (source 32/32)" in a.stdout
    out = tmp_path / "out"
    apply(ApplyOptions(model=folder, direction=root / "a.safetensors", out=out, quiet=True))
    report = evaluate(EvaluateOptions(model=out, source=folder, max_new_tokens=3, markers=markers,
                                      run=RunSettings("cpu"), quiet=True))
    assert report.source_refusals == 32 and report.model_refusals == 0
    assert report.kl_mean < 1e-3


def test_a_study_file_resumes_and_is_refused_for_another_model(searched, tiny_models, tmp_path):
    from tests.helpers import one_error_line

    folder, _, markers, (a, _) = searched
    study = tmp_path / "study.log"
    cut = run_optimize(folder, tmp_path / "w.safetensors", "--seed", 7, "--refusal-markers", markers,
                       "--study", study, trials=3)  # as if the search had been interrupted after 3 trials
    assert cut.exit_code == 0 and "of 3 (3 run now)" in cut.stdout, cut.output
    first = run_optimize(folder, tmp_path / "x.safetensors", "--seed", 7, "--refusal-markers", markers,
                         "--study", study, trials=6)
    assert first.exit_code == 0 and "of 6 (3 run now)" in first.stdout, first.output
    # Resumed with every trial done: nothing more runs, the same choice is written again.
    again = run_optimize(folder, tmp_path / "y.safetensors", "--seed", 7, "--refusal-markers", markers,
                         "--study", study, trials=6)
    assert again.exit_code == 0 and "of 6 (0 run now)" in again.stdout
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    other = run_optimize(tiny_models("llama"), tmp_path / "z.safetensors", "--study", study)
    assert "is a study of another model" in one_error_line(other)
    assert not (tmp_path / "z.safetensors").exists()
    junk = tmp_path / "junk.log"
    junk.write_bytes(b"\x00not a journal\n")
    assert "cannot open the study file" in one_error_line(run_optimize(folder, tmp_path / "z.safetensors",
                                                                       "--study", junk))


def test_the_judged_prompts_can_be_given(searched, tmp_path):
    """--eval-harmful/--eval-harmless replace the built-in held-out sets the trials and the confirmation use."""
    from safetensors import safe_open

    from orthopatch.run.prompts import PromptSet

    folder, _, markers, _ = searched
    harmful, harmless = tmp_path / "judged_harmful.txt", tmp_path / "judged_harmless.jsonl"
    chosen = builtin_prompts("harmful_eval").prompts[:5]
    harmful.write_text("\n".join(chosen) + "\n")
    harmless.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in builtin_prompts("harmless").prompts[:3]))
    out = tmp_path / "w.safetensors"
    result = run_optimize(folder, out, "--seed", 7, "--refusal-markers", markers, "--eval-harmful", harmful,
                          "--eval-harmless", harmless, trials=3)
    assert result.exit_code == 0, result.output
    assert "(source 5/5)" in result.stdout
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert metadata["eval_harmful_sha256"] == PromptSet("", chosen).sha256
    assert metadata["eval_harmless_sha256"] == PromptSet("", builtin_prompts("harmless").prompts[:3]).sha256


def test_each_stage_reports_its_cost(planted, tmp_path):
    """Each trial reads every block and the head once (never more than the checkpoint); the measuring
    pass and the confirmation are counted apart."""
    pytest.importorskip("optuna")
    from orthopatch.io.safetensors_header import read_header
    from orthopatch.run.layerwise import RunSettings
    from orthopatch.run.optimize import OptimizeOptions, optimize
    from orthopatch.run.prompts import PromptChoice

    folder, _ = planted
    entries = {}
    for shard in folder.glob("*.safetensors"):
        entries.update((e.name, e.nbytes) for e in read_header(shard).tensors)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    blocks = sum(n for name, n in entries.items() if ".layers." in name)
    head = entries.get("lm_head.weight", entries["model.embed_tokens.weight"])
    result = optimize(OptimizeOptions(model=folder, out=tmp_path / "w.safetensors", trials=3, max_new_tokens=2,
                                      choice=PromptChoice(limit=8), run=RunSettings("cpu"), quiet=True))
    costs = result.costs
    assert len(costs.trials) == 3
    for cost in costs.trials:
        assert blocks + head <= cost.bytes_read <= size and cost.seconds > 0
    assert len({c.bytes_read for c in costs.trials}) == 1  # nothing is read for one trial and not another
    assert blocks <= costs.measuring.bytes_read <= 1.1 * size
    assert costs.confirmation.bytes_read >= 2 * blocks  # the source's and the chosen point's replies
    total = costs.measuring.seconds + sum(c.seconds for c in costs.trials) + costs.confirmation.seconds
    assert total <= result.seconds


def test_bad_input_is_one_line(planted, tmp_path, monkeypatch):
    from tests.helpers import cli, one_error_line

    folder, _ = planted
    out = tmp_path / "o.safetensors"
    assert "--trials must be at least 1, not 0" in one_error_line(
        cli("optimize", folder, "-o", out, "--trials", 0))
    assert "must end in .safetensors" in one_error_line(cli("optimize", folder, "-o", tmp_path / "o.pth"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "empty.txt" in one_error_line(cli("optimize", folder, "-o", out, "--harmful", empty, "--device", "cpu"))
    for option in ("--eval-harmful", "--eval-harmless"):
        line = one_error_line(cli("optimize", folder, "-o", out, option, empty, "--device", "cpu"))
        assert "empty.txt" in line and "no prompts" in line
        line = one_error_line(cli("optimize", folder, "-o", out, option, tmp_path / "missing.txt", "--device", "cpu"))
        assert "missing.txt" in line
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)
    assert "pip install 'orthopatch[optimize]'" in one_error_line(cli("optimize", folder, "-o", out))
    assert not out.exists()


def test_apply_never_imports_optuna_or_the_search():
    from tests.test_layout import import_graph, reachable

    graph = import_graph()
    searching = {f"orthopatch.run.{m}" for m in ("ablation", "search", "optimize")}
    assert searching <= set(graph)
    assert not reachable(graph, "orthopatch.patch.apply") & searching
    for module in reachable(graph, "orthopatch.patch.apply") | {"orthopatch.patch.apply"}:
        path = __import__("importlib").util.find_spec(module).origin
        assert "optuna" not in open(path).read(), module


def test_the_choice_and_the_pareto_front():
    from orthopatch.errors import OrthopatchError
    from orthopatch.run.optimize import Trial, choose, pareto_front
    from orthopatch.run.search import Point, Profile, TrialFigures

    point = Point(True, None, Profile(1, 1, 0, 1), Profile(0, 1, 0, 1), False)
    trials = [Trial(i, point, TrialFigures(refusal, refused, kl, kl)) for i, (refusal, refused, kl) in
              enumerate([(0.9, 30, 0.0), (0.2, 4, 0.3), (0.1, 0, 0.9), (0.05, 0, 1.2), (0.3, 5, 0.4)])]
    assert [t.number for t in pareto_front(trials)] == [3, 2, 1, 0]
    assert choose(trials, None).number == 2  # fewest refused, then least KL
    assert choose(trials, 0.5).number == 1
    with pytest.raises(OrthopatchError, match="lowest is 0"):
        choose(trials[1:], 0.1)


def test_confirm_bad_values_are_one_line(planted, tmp_path):
    from tests.helpers import cli, one_error_line

    folder, _ = planted
    out = tmp_path / "o.safetensors"
    for value in (0, 21, -1):
        assert f"--confirm must be from 1 to 20, not {value}" in one_error_line(
            cli("optimize", folder, "-o", out, "--confirm", value))
    assert "--confirm" in cli("optimize", folder, "-o", out, "--confirm", "x").output  # not a number: click's line
    assert not out.exists()


def test_the_candidates_to_confirm():
    from orthopatch.run.optimize import Confirmed, Trial, candidates, choose_confirmed
    from orthopatch.run.search import Point, Profile, TrialFigures

    point = Point(True, None, Profile(1, 1, 0, 1), Profile(0, 1, 0, 1), False)
    trials = [Trial(i, point, TrialFigures(refusal, refused, kl, kl)) for i, (refusal, refused, kl) in
              enumerate([(0.9, 30, 0.0), (0.2, 4, 0.3), (0.1, 0, 0.9), (0.05, 0, 1.2), (0.3, 5, 0.4),
                         (0.12, 0, 0.5)])]
    # choose's trial first (0 refused, least KL), then the front's by refusals counted, then KL.
    assert [t.number for t in candidates(trials, None, 3)] == [5, 2, 3]
    assert [t.number for t in candidates(trials, None, 1)] == [5]
    # Within --max-kl, choose's trial is the least refusal probability among the fewest refused; trial 3's KL
    # is above it.
    assert [t.number for t in candidates(trials, 1.0, 20)] == [2, 5, 1, 0]
    confirmed = [Confirmed(trials[5], 6), Confirmed(trials[2], 2), Confirmed(trials[3], 2)]
    assert choose_confirmed(confirmed).trial.number == 2  # fewest greedy refusals, then least KL


@pytest.mark.parametrize("order", ["first", "last"])
def test_the_written_point_follows_the_greedy_counts(searched, tmp_path, monkeypatch, order):
    """With greedy counts that favour the last (or first) confirmed candidate, that one is written,
    the final line says why, and the file records every candidate's count."""
    import json

    from safetensors import safe_open

    import orthopatch.run.optimize as optimize_module

    folder, _, markers, _ = searched
    calls = []

    def fake(model, tokenizer, prompts, max_new_tokens, eos, markers):
        calls.append(len(calls))
        if len(calls) == 1:
            return len(prompts)  # the source
        return 10 + len(calls) if order == "first" else 10 - len(calls)

    monkeypatch.setattr(optimize_module, "greedy_refusals", fake)
    out = tmp_path / "w.safetensors"
    result = run_optimize(folder, out, "--seed", 7, "--refusal-markers", markers, "--confirm", 4)
    assert result.exit_code == 0, result.output
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    confirmed = json.loads(metadata["confirmed_candidates"])
    assert len(calls) == len(confirmed) + 1 and 2 <= len(confirmed) <= 4
    assert [c["greedy_refusals"] for c in confirmed] == [fake_count for fake_count in
                                                          (10 + i if order == "first" else 10 - i
                                                           for i in range(2, len(confirmed) + 2))]
    expected = confirmed[0] if order == "first" else confirmed[-1]
    assert metadata["trial"] == str(expected["trial"])
    assert metadata["greedy_refusals"] == f"{expected['greedy_refusals']}/32"
    last = result.stdout.strip().splitlines()[-1]
    assert f"trial {expected['trial']} of {TRIALS}" in last
    assert f"fewest greedy refusals, then least KL, of {len(confirmed)} candidates" in last

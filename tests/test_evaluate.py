"""``orthopatch evaluate`` and ``apply --evaluate``: KL on harmless prompts, refusal rates, streamed or in memory."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from orthopatch.checkpoint import open_checkpoint
from orthopatch.cli import main
from orthopatch.evaluate import EvaluateOptions, EvaluateReport, evaluate, is_refusal, kl_divergence
from orthopatch.layerwise import RunSettings
from orthopatch.prompts import PromptChoice, load_markers
from tests.helpers import cli, one_error_line

transformers = pytest.importorskip("transformers")
CPU = RunSettings("cpu")


def markers_file(tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text("# the planted model's refusal\ncannot\n")
    return path


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(4, 50)
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(4, dtype=torch.float64))
    other = logits.clone()
    other[:, 0] += 3
    p = torch.softmax(logits.double(), -1)
    expected = (p * (p.log() - torch.log_softmax(other.double(), -1))).sum(-1)
    torch.testing.assert_close(kl_divergence(logits, other), expected)
    assert (kl_divergence(logits, other) > 0).all()


def test_refusal_markers():
    markers = load_markers(None)
    assert is_refusal("I’m sorry, but I can’t help with that.", markers)
    assert is_refusal("As an AI, I cannot do that", markers)
    assert not is_refusal("Sure! Here are three tips for staying healthy.", markers)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_model_against_itself_has_kl_zero(tiny_models, family, tmp_path):
    folder = str(tiny_models(family))
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(main, ["evaluate", folder, "--source", folder, "--limit", "4", "--max-new-tokens",
                                       "2", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = EvaluateReport.from_json(json.loads(out.read_text()))
    assert report.kl_mean == 0.0 and report.kl_max == 0.0
    assert report.model_refusals == report.source_refusals
    assert report.harmless.count == 4 and report.harmful.count == 4 and report.streamed
    assert "KL mean / max" in result.output and "refusal rate" in result.output


def test_streamed_kl_equals_the_in_memory_kl_and_reads_each_checkpoint_once(tiny_models, tmp_path):
    src = tiny_models("llama")
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(5)), direction)
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["apply", str(src), str(direction), "-o", str(out), "-q"]).exit_code == 0
    common = dict(model=out, source=src, choice=PromptChoice(limit=6), refusals=False, run=CPU, quiet=True)
    streamed = evaluate(EvaluateOptions(**common))
    in_memory = evaluate(EvaluateOptions(**common, in_memory=True))
    assert streamed.kl_mean > 1e-6
    assert streamed.kl_mean == pytest.approx(in_memory.kl_mean, rel=1e-3, abs=1e-7)
    assert streamed.kl_max == pytest.approx(in_memory.kl_max, rel=1e-3, abs=1e-7)
    from orthopatch.checkpoint import open_checkpoint

    assert streamed.source_bytes_read <= 1.1 * open_checkpoint(src).total_bytes
    assert streamed.model_bytes_read <= 1.1 * open_checkpoint(out).total_bytes


@pytest.mark.slow
def test_planted_refusal_is_measured_removed_and_judged(planted, tmp_path):
    folder, r = planted
    direction = tmp_path / "refusal_dir.pth"
    runner = CliRunner()
    assert runner.invoke(main, ["measure", str(folder), "-o", str(direction), "-q"]).exit_code == 0
    assert abs(torch.load(direction, weights_only=True).double() @ r).item() > 0.99
    out = tmp_path / "abliterated"
    applied = runner.invoke(main, ["apply", str(folder), str(direction), "-o", str(out), "--evaluate"])
    assert applied.exit_code == 0, applied.output
    assert "KL divergence from the source" in applied.stderr and "warning" not in applied.stderr

    figures = tmp_path / "figures.json"
    result = runner.invoke(main, ["evaluate", str(out), "--source", str(folder), "--max-new-tokens", "3",
                                  "--refusal-markers", str(markers_file(tmp_path)), "--json", str(figures), "-q"])
    assert result.exit_code == 0, result.output
    report = EvaluateReport.from_json(json.loads(figures.read_text()))
    assert report.harmful.count == 32
    assert report.source_refusal_rate >= 0.9
    assert report.model_refusal_rate <= 0.1
    assert report.kl_mean < 1e-4

    in_memory = evaluate(EvaluateOptions(model=out, source=folder, max_new_tokens=3,
                                         markers=markers_file(tmp_path), in_memory=True, run=CPU, quiet=True))
    assert (in_memory.source_refusals, in_memory.model_refusals) == (report.source_refusals, report.model_refusals)

    # One direction per layer works the same way.
    per_layer = tmp_path / "per_layer.pth"
    assert runner.invoke(main, ["measure", str(folder), "-o", str(per_layer), "--per-layer", "-q"]).exit_code == 0
    out2 = tmp_path / "abliterated-per-layer"
    assert runner.invoke(main, ["apply", str(folder), str(per_layer), "-o", str(out2), "-q"]).exit_code == 0
    judged = evaluate(EvaluateOptions(model=out2, source=folder, max_new_tokens=3, markers=markers_file(tmp_path),
                                      in_memory=True, run=CPU, quiet=True))
    assert judged.model_refusals <= 3 and judged.kl_mean < 1e-4


def test_apply_evaluate_warns_when_the_kl_is_far_above_the_usual_cost(planted, tmp_path):
    folder, _ = planted
    from orthopatch.checkpoint import open_checkpoint
    from orthopatch.reader import CheckpointReader
    from tests.tiny_models import vocabulary

    # The planted head says "sure" along the constant dimension every token has: ablating that
    # direction changes every harmless prompt's first token.
    with CheckpointReader(open_checkpoint(folder)) as reader:
        sure = reader.read("lm_head.weight")[vocabulary().index("sure")].clone()
    direction = tmp_path / "bad.pth"
    torch.save(sure, direction)
    result = CliRunner().invoke(main, ["apply", str(folder), str(direction), "-o", str(tmp_path / "out"), "-q",
                                       "--evaluate"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "far above the usual cost" in warning[0] and "mean " in warning[0]


def test_bad_markers_and_token_budget(tiny_models, tmp_path):
    folder = str(tiny_models("llama"))
    empty = tmp_path / "markers.txt"
    empty.write_text("# nothing\n")
    line = one_error_line(cli("evaluate", folder, "--source", folder, "--refusal-markers", empty, "-q"))
    assert str(empty) in line and "no refusal markers" in line
    line = one_error_line(cli("evaluate", folder, "--source", folder, "--limit", "2", "--max-new-tokens", "120", "-q"))
    assert "plus 120 new tokens; the model's context is 128" in line


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_greedy_replies_equal_transformers_generate(tiny_models, family):
    from orthopatch.chat import encode_set, load_tokenizer
    from orthopatch.evaluate import InMemoryRunner, StreamedRunner
    from orthopatch.prompts import builtin_prompts

    folder = tiny_models(family)
    prompts = encode_set(load_tokenizer(folder), builtin_prompts("harmful_eval").sample(5, 0), None)
    streamed = StreamedRunner(folder, torch.device("cpu"), torch.float32, batch_size=2)
    in_memory = InMemoryRunner(folder, torch.device("cpu"), torch.float32)
    replies = streamed.greedy(prompts, 6, eos=set())
    assert replies == in_memory.greedy(prompts, 6, eos=set())
    assert all(len(r) == 6 for r in replies)
    assert streamed.bytes_read > 6 * open_checkpoint(folder).total_bytes * 0.5  # one pass per token

"""``orthopatch evaluate`` and ``apply --evaluate``: KL on harmless prompts, refusal rates, streamed or in memory."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from orthopatch.cli import main
from orthopatch.io.checkpoint import open_checkpoint
from orthopatch.run.evaluate import EvaluateOptions, EvaluateReport, evaluate, is_refusal, kl_divergence
from orthopatch.run.layerwise import RunSettings
from orthopatch.run.prompts import PromptChoice, load_markers
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


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma3-mm", "mixtral", "qwen2_moe", "qwen3_moe"])
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
    from orthopatch.io.checkpoint import open_checkpoint

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
    from orthopatch.io.checkpoint import open_checkpoint
    from orthopatch.io.reader import CheckpointReader
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
    from orthopatch.run.chat import encode_set, load_tokenizer
    from orthopatch.run.evaluate import InMemoryRunner, StreamedRunner
    from orthopatch.run.prompts import builtin_prompts

    folder = tiny_models(family)
    prompts = encode_set(load_tokenizer(folder), builtin_prompts("harmful_eval").sample(5, 0), None)
    streamed = StreamedRunner(folder, torch.device("cpu"), torch.float32, batch_size=2)
    in_memory = InMemoryRunner(folder, torch.device("cpu"), torch.float32)
    replies = streamed.greedy(prompts, 6, eos=set())
    assert replies == in_memory.greedy(prompts, 6, eos=set())
    assert all(len(r) == 6 for r in replies)
    assert streamed.bytes_read > 6 * open_checkpoint(folder).total_bytes * 0.5  # one pass per token


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prompts_of_one_length_share_a_batch_and_end_apart(tiny_models, family):
    """Prompts of equal length are generated together; one that ends keeps its reply, the others go on,
    and every reply equals transformers' prompt-by-prompt one."""
    from orthopatch.run.chat import encode_set, load_tokenizer
    from orthopatch.run.evaluate import InMemoryRunner, StreamedRunner
    from orthopatch.run.prompts import builtin_prompts

    folder = tiny_models(family)
    prompts = encode_set(load_tokenizer(folder), builtin_prompts("harmful_eval").sample(6, 1), None)
    shortest = min(len(p) for p in prompts)
    prompts = prompts + [p[:shortest - 1] + p[-1:] for p in prompts[:4]]  # four of one length
    streamed = StreamedRunner(folder, torch.device("cpu"), torch.float32, batch_size=2)
    in_memory = InMemoryRunner(folder, torch.device("cpu"), torch.float32)
    free = in_memory.greedy(prompts, 5, eos=set())
    batches_per_pass = []
    run = streamed.model.run

    def counting(batches, *args, **kwargs):
        batches_per_pass.append(len(batches))
        return run(batches, *args, **kwargs)

    streamed.model.run = counting
    assert streamed.greedy(prompts, 5, eos=set()) == free
    assert batches_per_pass == [len({len(p) for p in prompts})] * 5
    # a token of the last short prompt's reply that another prompt of its length never generates
    stop = next(t for t in free[-1] if any(t not in r for r in free[-4:-1]))
    expected = [r[: next((i + 1 for i, t in enumerate(r) if t == stop), len(r))] for r in free]
    assert len(expected[-1]) < 5 and any(len(r) == 5 for r in expected[-4:-1])
    assert streamed.greedy(prompts, 5, eos={stop}) == expected


# -- figures that are not numbers ---------------------------------------------------------------------

def test_nan_is_an_error_in_evaluate_and_a_warning_in_apply_evaluate(tiny_models, tmp_path):
    from tests.test_measure import poisoned_copy

    source = tiny_models("llama")
    nan_block = poisoned_copy(source, tmp_path / "nan-block", "model.layers.0.self_attn.o_proj.weight")
    line = one_error_line(cli("evaluate", nan_block, "--source", nan_block, "--limit", "2", "--no-refusals", "-q"))
    assert str(nan_block) in line and "hidden states entering block 1 are not finite" in line
    nan_head = poisoned_copy(source, tmp_path / "nan-head", "lm_head.weight")
    line = one_error_line(cli("evaluate", nan_head, "--source", source, "--limit", "2", "--no-refusals", "-q"))
    assert str(nan_head) in line and "next-token logits are not finite (NaN or infinity) for 2 of 2" in line

    # apply --evaluate has written its output by then (the head is not patched): a warning with the
    # reason, not a NaN KL that compares as "not above" the limit.
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(5)), direction)
    result = CliRunner().invoke(main, ["apply", str(nan_head), str(direction), "-o", str(tmp_path / "out"), "-q",
                                       "--evaluate"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "no KL divergence" in warning[0] and "logits are not finite" in warning[0], \
        result.stderr


def test_a_kl_that_is_not_a_number_is_never_below_the_limit():
    from orthopatch.run.evaluate import _finite_kl
    from orthopatch.run.layerwise import NonFiniteError

    with pytest.raises(NonFiniteError, match="not finite"):
        _finite_kl(kl_divergence(torch.zeros(2, 5), torch.full((2, 5), float("nan"))), "m")


# -- apply --evaluate refuses before writing what it could not check after ---------------------------------

def without_tokenizer(source, folder):
    import shutil

    shutil.copytree(source, folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    return folder


def test_apply_evaluate_without_a_tokenizer_is_refused_before_writing(tiny_models, tmp_path):
    source = tiny_models("llama")
    folder = without_tokenizer(source, tmp_path / "no-tokenizer")
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(5)), direction)
    out = tmp_path / "out"
    line = one_error_line(cli("apply", folder, direction, "-o", out, "--evaluate"))
    assert str(folder) in line and "no tokenizer" in line and "--tokenizer" in line
    assert not out.exists()
    # apply --tokenizer names one, as the message says.
    done = CliRunner().invoke(main, ["apply", str(folder), str(direction), "-o", str(out), "--evaluate",
                                     "--tokenizer", str(source)])
    assert done.exit_code == 0, done.output
    assert "KL divergence from the source" in done.stderr
    usage = CliRunner().invoke(main, ["apply", str(source), str(direction), "-o", str(tmp_path / "o2"),
                                      "--tokenizer", str(source)])
    assert usage.exit_code == 2 and "--tokenizer is used only with --evaluate" in usage.output
    assert not (tmp_path / "o2").exists()


def test_apply_evaluate_of_a_model_transformers_cannot_build_is_refused_before_writing(tiny_models, tmp_path,
                                                                                     monkeypatch):
    def fails(*args, **kwargs):
        raise NotImplementedError("no such attention")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", fails)
    source = tiny_models("llama")
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32), direction)
    out = tmp_path / "out"
    line = one_error_line(cli("apply", source, direction, "-o", out, "--evaluate"))
    assert str(source / "config.json") in line and "no such attention" in line
    assert not out.exists()


# -- evaluate --json ------------------------------------------------------------------------------------

def test_json_folder_is_checked_before_running_and_the_table_is_shown_first(tiny_models, tmp_path, monkeypatch):
    import orthopatch.io.folders
    import orthopatch.run.evaluate
    from orthopatch.errors import OrthopatchError

    folder = str(tiny_models("llama"))
    missing = tmp_path / "nope" / "figures.json"

    def never(*args, **kwargs):
        raise AssertionError("ran before checking --json")

    with monkeypatch.context() as m:
        m.setattr(orthopatch.run.evaluate, "evaluate", never)
        line = one_error_line(cli("evaluate", folder, "--source", folder, "--json", missing, "-q"))
        assert str(missing.parent) in line and "folder does not exist" in line
        line = one_error_line(cli("evaluate", folder, "--source", folder, "--json", tmp_path, "-q"))
        assert str(tmp_path) in line and "is a folder" in line

    def disk_full(path, data):
        raise OrthopatchError("cannot write (No space left on device)", path=path)

    monkeypatch.setattr(orthopatch.io.folders, "write_atomic", disk_full)
    result = cli("evaluate", folder, "--source", folder, "--json", tmp_path / "f.json", "--limit", "2",
                 "--no-refusals", "-q")
    assert "No space left on device" in one_error_line(result)
    assert "KL mean / max" in result.stdout


# -- the tokens that end a reply ----------------------------------------------------------------------------

def test_reply_end_ids_join_config_text_config_and_generation_config(tmp_path):
    from types import SimpleNamespace

    from orthopatch.run.evaluate import reply_end_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "text_config": {"eos_token_id": [7]}}))
    assert reply_end_ids(SimpleNamespace(eos_token_id=2), tmp_path) == {1, 2, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    assert reply_end_ids(SimpleNamespace(eos_token_id=None), tmp_path) == {1, 7, 9}


def test_an_end_of_turn_token_from_generation_config_stops_both_runners(tiny_models, tmp_path):
    import shutil

    from orthopatch.run.chat import encode_set, load_tokenizer
    from orthopatch.run.evaluate import InMemoryRunner, StreamedRunner, reply_end_ids
    from orthopatch.run.prompts import builtin_prompts

    folder = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), folder)
    tokenizer = load_tokenizer(folder)
    prompts = encode_set(tokenizer, builtin_prompts("harmful_eval").sample(3, 0), None)
    streamed = StreamedRunner(folder, torch.device("cpu"), torch.float32, batch_size=2)
    free = streamed.greedy(prompts, 4, eos=set())
    assert all(len(r) == 4 for r in free)
    stop = free[0][0]  # the first prompt's first token ends a reply once generation_config.json says so
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, stop]}))
    eos = reply_end_ids(tokenizer, folder)
    assert {3, stop} <= eos
    expected = [r[: next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in free]
    assert expected[0] == [stop]
    assert streamed.greedy(prompts, 4, eos) == expected
    assert InMemoryRunner(folder, torch.device("cpu"), torch.float32).greedy(prompts, 4, eos) == expected
    streamed.close()


def test_the_report_names_models_from_the_hub_by_repo_id_and_commit(tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.test_hub import add_to_cache

    commit = "e" * 40
    add_to_cache(tmp_path / "cache", "someorg/tiny", commit, tiny_models("llama"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "figures.json"
    local = str(tiny_models("llama"))
    result = cli("evaluate", local, "--source", "someorg/tiny", "--limit", "2", "--no-refusals", "--json", out, "-q")
    assert result.exit_code == 0, result.output
    report = EvaluateReport.from_json(json.loads(out.read_text()))
    assert report.source_repo == f"someorg/tiny@{commit}" and report.model_repo is None
    assert report.model == local and report.source.endswith(commit)
    assert report.kl_mean == 0.0


def test_a_model_without_a_final_norm_is_refused_before_any_pass(tiny_models, tmp_path, monkeypatch):
    import orthopatch.run.layerwise

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran")

    monkeypatch.setattr(orthopatch.run.layerwise, "FINAL_NORM_NAMES", ())
    monkeypatch.setattr(orthopatch.run.layerwise.LayerwiseModel, "run", no_pass)
    folder = tiny_models("llama")
    line = one_error_line(cli("evaluate", folder, "--source", folder, "--limit", "2", "-q"))
    assert str(folder / "config.json") in line and "cannot find the model's final norm in" in line
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32), direction)
    line = one_error_line(cli("apply", folder, direction, "-o", tmp_path / "out", "--evaluate"))
    assert "cannot find the model's final norm" in line and not (tmp_path / "out").exists()

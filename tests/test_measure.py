"""``orthopatch measure``: streamed means equal the whole-model run; bounded reads; one-line errors."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from orthopatch.cli import main
from orthopatch.run.layerwise import RunSettings
from orthopatch.run.measure import DirectionRecord, MeasureOptions, measure, sidecar_path
from orthopatch.run.prompts import PromptChoice, builtin_prompts, parse_prompts
from tests.helpers import cli, one_error_line, pre_norm_states

transformers = pytest.importorskip("transformers")

CPU = RunSettings("cpu")
#: Mixtral and Qwen2/Qwen3-MoE are saved as on the Hub (one matrix per expert), which transformers
#: fuses while loading; the streamed run fuses them the same way.
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
FAMILIES = ["llama", "qwen2", "gemma3", "gemma3-mm", "llama-tied", "gpt2", "gpt_neox", *MOE_FAMILIES]
LIMIT = 12


def reference_states(folder: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' whole-model run: per layer, ``[prompts, d]`` at the last token (float64).

    Rows 0..n-1 are ``hidden_states[L]``; row n is the last block's output before the final norm.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    per_prompt = [pre_norm_states(model, torch.tensor([ids])) for ids in prompts]
    return [torch.stack([states[layer][0, -1].double() for states in per_prompt])
            for layer in range(len(per_prompt[0]))]


def encoded(folder: Path, kind: str) -> list[list[int]]:
    from orthopatch.run.chat import encode_set, load_tokenizer

    return encode_set(load_tokenizer(folder), builtin_prompts(kind).sample(LIMIT, 0), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_means_equal_the_whole_model_run(tiny_models, family, tmp_path):
    folder = tiny_models(family)
    harmful, harmless = encoded(folder, "harmful"), encoded(folder, "harmless")
    ref_harmful, ref_harmless = reference_states(folder, harmful), reference_states(folder, harmless)

    from orthopatch.run.layerwise import LayerwiseModel, make_batches

    seen: dict[int, torch.Tensor] = {}
    with LayerwiseModel(folder, device=torch.device("cpu")) as model:
        model.run(make_batches(harmful + harmless, 5), seen.__setitem__)
        n = model.num_layers
    assert sorted(seen) == list(range(n + 1))
    for layer in range(n + 1):
        scale = ref_harmful[layer].abs().max().item()
        torch.testing.assert_close(seen[layer][:LIMIT].mean(0), ref_harmful[layer].mean(0), rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(seen[layer][LIMIT:].mean(0), ref_harmless[layer].mean(0), rtol=0,
                                   atol=1e-5 * scale)

    # The written per-layer direction is the normalised difference of those means.
    out = tmp_path / "dir.pth"
    result = measure(MeasureOptions(model=folder, out=out, choice=PromptChoice(limit=LIMIT), per_layer=True,
                                    project_harmless=False, run=RunSettings("cpu", batch_size=4), quiet=True))
    written = torch.load(out, weights_only=True)
    assert written.shape == (n + 1, model.hidden_size) and written.dtype == torch.float32
    # Every prompt ends with the template's assistant opening: at layer 0 the means are equal, and
    # the row takes layer 1's direction (unless learned positions are added before block 0: GPT-2).
    assert result.record.filled_rows == ([] if family == "gpt2" else [0])
    for layer in range(n + 1):
        if layer in result.record.filled_rows:
            assert torch.equal(written[layer], written[layer + 1])
            continue
        diff = ref_harmful[layer].mean(0) - ref_harmless[layer].mean(0)
        torch.testing.assert_close(written[layer].double(), diff / diff.norm(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma3-mm", "mixtral", "qwen2_moe"])
def test_reads_each_weight_once_never_the_head_and_one_block_at_a_time(tiny_models, family, tmp_path):
    from orthopatch.run.layerwise import LayerwiseModel, make_batches

    folder = tiny_models(family)
    prompts = encoded(folder, "harmful") + encoded(folder, "harmless")
    with LayerwiseModel(folder, device=torch.device("cpu")) as model:
        resident = []  # at every block call: how many blocks hold real (not meta) parameters

        def count(_module, _args):
            resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in model.blocks))

        for block in model.blocks:
            block.register_forward_pre_hook(count)
        model.run(make_batches(prompts, 4))
        assert len(resident) == model.num_layers * 6 and set(resident) == {1}
        account, total = model.reader.account, model.checkpoint.total_bytes
        embedding, head = model.embedding_name, model.head_name
        embedding_bytes = model.checkpoint.entry(embedding).nbytes
        assert model.stats.peak_blocks == 1
        assert all(p.device.type == "meta" for p in model.blocks.parameters())
    assert account.bytes_read <= 1.1 * total
    assert all(n == model.checkpoint.entry(name).nbytes for name, n in account.per_tensor.items() if name != embedding)
    assert account.per_tensor[embedding] < embedding_bytes  # only the rows the prompts use
    if head != embedding:
        assert head not in account.tensors_read


def test_measure_writes_a_direction_and_its_record(tiny_models, tmp_path):
    folder = tiny_models("llama")
    out = tmp_path / "refusal_dir.pth"
    result = CliRunner().invoke(main, ["measure", str(folder), "-o", str(out), "--limit", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    direction = torch.load(out, weights_only=True)
    assert direction.shape == (32,) and abs(direction.double().norm().item() - 1) < 1e-6
    record = DirectionRecord.from_json(json.loads(sidecar_path(out).read_text()))
    assert record == DirectionRecord.from_json(record.to_json())
    assert record.harmful.count == record.harmless.count == 8
    assert record.harmful.sha256 == builtin_prompts("harmful").sample(8, 0).sha256
    assert record.layer_rule.startswith("best separation") and 1 <= record.layer <= 3
    assert len(record.layers) == 4 and record.bytes_read <= 1.1 * record.checkpoint_bytes
    assert f"layer {record.layer}" in result.output
    assert "<- written" in result.stderr

    # The direction file is one apply reads.
    applied = CliRunner().invoke(main, ["apply", str(folder), str(out), "-o", str(tmp_path / "out"), "-q"])
    assert applied.exit_code == 0, applied.output


def test_layer_option_and_harmless_projection(tiny_models, tmp_path):
    folder = tiny_models("qwen2")
    raw = measure(MeasureOptions(model=folder, out=tmp_path / "raw.pth", choice=PromptChoice(limit=8), layer=2,
                                 project_harmless=False, run=CPU, quiet=True))
    projected = measure(MeasureOptions(model=folder, out=tmp_path / "proj.pth", choice=PromptChoice(limit=8), layer=2,
                                       run=CPU, quiet=True))
    assert raw.record.layer == projected.record.layer == 2 and raw.record.layer_rule == "--layer"
    # The projected direction is the raw one less its component along the harmless mean.
    from orthopatch.run.layerwise import LayerwiseModel, make_batches

    states = {}
    with LayerwiseModel(folder, device=torch.device("cpu")) as model:
        model.run(make_batches(encoded_limit(folder, "harmful", 8) + encoded_limit(folder, "harmless", 8), 16),
                  states.__setitem__)
    mean = states[2][8:].mean(0)
    assert abs(projected.direction.double() @ mean).item() < 1e-5 * mean.norm().item()
    assert abs(raw.direction.double() @ mean).item() > 1e-3 * mean.norm().item()


def encoded_limit(folder: Path, kind: str, limit: int) -> list[list[int]]:
    from orthopatch.run.chat import encode_set, load_tokenizer

    return encode_set(load_tokenizer(folder), builtin_prompts(kind).sample(limit, 0), None)


def test_planted_direction_is_recovered(planted, tmp_path):
    folder, r = planted
    out = tmp_path / "found.pth"
    result = CliRunner().invoke(main, ["measure", str(folder), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    found = torch.load(out, weights_only=True).double()
    assert abs(found @ r).item() > 0.99


def test_prompt_files_text_jsonl_json(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second  \n")
    assert parse_prompts(text, text.read_text()) == ["first", "second"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"goal": "a"}\n{"goal": "b", "target": "x"}\n')
    assert parse_prompts(jsonl, jsonl.read_text()) == ["a", "b"]
    data = tmp_path / "p.json"
    data.write_text('[{"q": "a"}, {"q": "b"}]')
    assert parse_prompts(data, data.read_text(), "q") == ["a", "b"]
    from orthopatch.errors import OrthopatchError

    with pytest.raises(OrthopatchError, match="item 0 has no string any of the fields"):
        parse_prompts(data, data.read_text())
    with pytest.raises(OrthopatchError, match="line 1 has no string field 'target'"):
        parse_prompts(jsonl, jsonl.read_text(), "target")


def test_limit_draws_the_same_prompts_for_the_same_seed():
    full = builtin_prompts("harmless")
    assert len(full.prompts) >= 128 and len(builtin_prompts("harmful").prompts) >= 128
    assert full.sample(10, 3) == full.sample(10, 3)
    assert full.sample(10, 3) != full.sample(10, 4)
    assert not set(builtin_prompts("harmful").prompts) & set(builtin_prompts("harmful_eval").prompts)


# -- bad input: one line, exit 1 ----------------------------------------------------------------------

def one_line_error(result, *fragments: str) -> None:
    line = one_error_line(result)
    for fragment in fragments:
        assert fragment in line, line


def run_measure(*args: str):
    return cli("measure", *args, "-q")


def test_model_without_tokenizer(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_models("llama"), folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder), "no tokenizer",
                   "--tokenizer")
    # --tokenizer names one elsewhere.
    ok = run_measure(str(folder), "-o", str(tmp_path / "d.pth"), "--limit", "4",
                     "--tokenizer", str(tiny_models("llama")))
    assert ok.exit_code == 0, ok.output


def test_empty_prompt_file(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_line_error(run_measure(str(tiny_models("llama")), "-o", str(tmp_path / "d.pth"), "--harmful", str(empty)),
                   str(empty), "no prompts")


def test_prompt_longer_than_the_context(tiny_models, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("short one\n" + "word " * 300 + "\n")
    one_line_error(run_measure(str(tiny_models("llama")), "-o", str(tmp_path / "d.pth"), "--harmless", str(long)),
                   str(long), "prompt 2 is", "context is 128")


def test_layer_out_of_range(tiny_models, tmp_path):
    one_line_error(run_measure(str(tiny_models("llama")), "-o", str(tmp_path / "d.pth"), "--layer", "4"),
                   "--layer 4 is out of range", "layers 0..3")


def test_prompt_file_that_is_not_a_small_regular_file(tiny_models, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # sparse: nothing is written or read
    folder = str(tiny_models("llama"))
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth"), "--harmful", str(big)), str(big),
                   "more than the 67,108,864")
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth"), "--harmful", str(tmp_path)),
                   str(tmp_path), "not a regular file")
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth"), "--harmful", str(tmp_path / "nope.txt")),
                   "nope.txt", "not found")


def test_without_transformers_measure_and_evaluate_say_what_to_install(tiny_models, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    folder = str(tiny_models("llama"))
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth")), "pip install 'orthopatch[measure]'")
    one_line_error(cli("evaluate", folder, "--source", folder),
                   "pip install 'orthopatch[measure]'")
    direction = tmp_path / "r.pth"
    torch.save(torch.ones(32), direction)
    out = tmp_path / "out"
    one_line_error(cli("apply", folder, direction, "-o", out, "--evaluate"),
                   "pip install 'orthopatch[measure]'")
    assert not out.exists()  # refused before any work
    done = CliRunner().invoke(main, ["apply", folder, str(direction), "-o", str(out), "-q"])
    assert done.exit_code == 0, done.output


def test_apply_does_not_import_transformers(tiny_models, tmp_path):
    direction = tmp_path / "r.pth"
    torch.save(torch.ones(32), direction)
    code = ("import sys; from click.testing import CliRunner; from orthopatch.cli import main; "
            f"r = CliRunner().invoke(main, ['apply', {str(tiny_models('llama'))!r}, {str(direction)!r}, "
            f"'-o', {str(tmp_path / 'out')!r}, '-q']); "
            "assert r.exit_code == 0, r.output; assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_projecting_the_harmless_mean_ignores_a_huge_activation_channel(tmp_path):
    """Why --project-harmless is the default: with a huge-activation channel whose mean differs a
    little between the sets, the raw difference points mostly along that channel."""
    from tests.planted import save_planted_model

    folder = tmp_path / "massive"
    r = save_planted_model(folder, massive=100.0)
    cos = {}
    for project in (True, False):
        result = measure(MeasureOptions(model=folder, out=tmp_path / f"{project}.pth", project_harmless=project,
                                        run=CPU, quiet=True))
        cos[project] = abs(result.direction.double() @ r).item()
    assert cos[True] > 0.99
    assert cos[False] < 0.8


def test_oversized_config_or_tokenizer_file(tiny_models, tmp_path):
    import shutil

    for name, what in (("config.json", "model config"), ("tokenizer.json", "tokenizer file")):
        folder = tmp_path / name
        shutil.copytree(tiny_models("llama"), folder)
        with open(folder / name, "r+b") as f:
            f.truncate(65 << 20)
        one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder / name), what,
                       "more than the 67,108,864")


def test_moe_experts_are_fused_as_transformers_fuses_them(tiny_models):
    """Each fused expert parameter equals what transformers' from_pretrained builds from the same files."""
    from orthopatch.run.layerwise import LayerwiseModel
    from orthopatch.run.parameters import Fused

    for family in MOE_FAMILIES:
        folder = tiny_models(family)
        loaded = dict(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())
        with LayerwiseModel(folder, device=torch.device("cpu")) as model:
            fused = {name for name, source in model.sources.items() if isinstance(source, Fused)}
            for layer in range(model.num_layers):
                model._materialise(layer)
                for name, param in model.blocks[layer].named_parameters():
                    full = f"{model.blocks_name}.{layer}.{name}"
                    assert torch.equal(param, loaded[full]), (family, full)
                model._release(layer)
        expert_layers = {1} if family == "qwen2_moe" else set()  # qwen2_moe's block 1 is a dense MLP
        assert fused == {f"model.layers.{layer}.mlp.experts.{p}" for layer in range(3) if layer not in expert_layers
                         for p in ("gate_up_proj", "down_proj")}, family


def test_a_checkpoint_already_in_the_fused_layout_is_read_as_it_is(tiny_models, tmp_path):
    """Expert tensors stored fused (transformers' in-memory names) need no conversion."""
    import shutil

    from safetensors.torch import save_file

    from orthopatch.run.layerwise import LayerwiseModel, make_batches
    from orthopatch.run.parameters import Fused

    source = tiny_models("mixtral")
    folder = tmp_path / "fused"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    prompts = encoded(folder, "harmful")[:4]
    reference = reference_states(folder, prompts)
    seen: dict[int, torch.Tensor] = {}
    with LayerwiseModel(folder, device=torch.device("cpu")) as streamed:
        assert not any(isinstance(s, Fused) for s in streamed.sources.values())
        streamed.run(make_batches(prompts, 2), seen.__setitem__)
    for layer, states in enumerate(reference):
        torch.testing.assert_close(seen[layer], states, rtol=0, atol=1e-5 * states.abs().max().item())


def test_experts_that_do_not_fuse_are_one_line(tiny_models, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    source = tiny_models("mixtral")
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    expert = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    cases = {"odd": ({expert.format(1, "w1"): torch.zeros(63, 32)}, [expert.format(1, "w1"), "shape [63, 32] differs"]),
             "missing": ({expert.format(3, "w2"): None},
                         [expert.format(0, "w2"), "fused with 2 other tensors",
                          "shape [3, 32, 64], the model expects [4, 32, 64]"])}
    for case, (change, fragments) in cases.items():
        folder = tmp_path / case
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        changed = {n: t for n, t in {**tensors, **change}.items() if t is not None}
        save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
        one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder), *fragments)


def test_a_conversion_other_than_stacking_and_concatenating_is_refused_in_one_line(tiny_models, tmp_path,
                                                                                 monkeypatch):
    from transformers import conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    def transposing(model, *args, **kwargs):
        return [WeightConverter(source_patterns="self_attn.o_proj.weight", target_patterns="self_attn.o_proj.weight",
                                operations=[Transpose(0, 1)])]

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", transposing)
    folder = tiny_models("llama")
    one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder),
                   "model.layers.0.self_attn.o_proj.weight", "with Transpose, which is not supported here")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_holds_one_block_plus_activations_and_agrees_with_the_cpu(tmp_path):
    from orthopatch.run.layerwise import LayerwiseModel, block_bytes, make_batches
    from tests.tiny_models import save_tiny_model

    folder = tmp_path / "wide"
    save_tiny_model(folder, "llama", shard_size="100MB", hidden_size=1536, intermediate_size=6144,
                    num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=4)
    ids = encoded(folder, "harmful") + encoded(folder, "harmless")
    states = {}
    for device in ("cpu", "cuda"):
        seen: dict[int, torch.Tensor] = {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with LayerwiseModel(folder, device=torch.device(device)) as model:
            model.run(make_batches(ids, 8), seen.__setitem__)
            one_block = block_bytes(model)
        states[device] = seen
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
            tokens = sum(len(p) for p in ids) + 8 * max(len(p) for p in ids)  # padding included
            activations = 16 * tokens * 6144 * 4  # hidden states and one block's intermediates, generously
            assert peak <= one_block + activations + (64 << 20), (peak, one_block)
            assert peak < 2 * one_block
    for layer, cpu in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][layer], cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())


def test_apply_reaches_none_of_the_modules_that_run_a_model():
    from tests.test_layout import import_graph, reachable

    graph = import_graph()
    running = {f"orthopatch.run.{m}" for m in ("layerwise", "parameters", "measure", "evaluate", "chat")}
    assert running <= set(graph)
    assert not reachable(graph, "orthopatch.patch.apply") & running


def test_prompt_files_from_a_hub_dataset_repo_in_the_cache(tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.test_hub import add_to_cache

    files = tmp_path / "files"
    files.mkdir()
    (files / "harmful.jsonl").write_text("".join(json.dumps({"goal": p}) + "\n"
                                                 for p in builtin_prompts("harmful").prompts[:5]))
    cache = tmp_path / "cache"
    add_to_cache(cache, "someorg/prompts", "c" * 40, files)
    (cache / "models--someorg--prompts").rename(cache / "datasets--someorg--prompts")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "d.pth"
    result = run_measure(str(tiny_models("llama")), "-o", str(out), "--harmful",
                         "datasets/someorg/prompts:harmful.jsonl", "--limit", "5")
    assert result.exit_code == 0, result.output
    record = DirectionRecord.from_json(json.loads(sidecar_path(out).read_text()))
    assert record.harmful.source == "datasets/someorg/prompts:harmful.jsonl" and record.harmful.count == 5
    missing = run_measure(str(tiny_models("llama")), "-o", str(out), "--overwrite", "--harmful",
                          "datasets/someorg/prompts:nope.txt")
    one_line_error(missing, "datasets/someorg/prompts:nope.txt", "'nope.txt'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_without_cuda_is_one_line(tiny_models, tmp_path):
    folder = str(tiny_models("llama"))
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth"), "--device", "cuda"), "--device cuda")
    one_line_error(cli("evaluate", folder, "--source", folder, "--device", "cuda", "-q"), "--device cuda")


# -- multimodal Gemma 3: only the text decoder and the head ---------------------------------------------

def test_multimodal_gemma3_reads_only_the_text_decoder(tiny_models):
    """Gemma3ForConditionalGeneration: the blocks, the final norm and every parameter read are the
    text decoder's (its vision tower has as many layers as the text decoder); vision weights are never read."""
    from orthopatch.run.layerwise import LayerwiseModel, make_batches

    folder = tiny_models("gemma3-mm")
    prompts = encoded(folder, "harmful")[:4]
    with LayerwiseModel(folder, device=torch.device("cpu"), logits=True) as model:
        assert type(model.model).__name__ == "Gemma3ForConditionalGeneration"
        assert model.blocks_name == "model.language_model.layers" and model.num_layers == 4
        assert model.norm is model.model.get_submodule("model.language_model.norm")
        logits = model.logits(model.run(make_batches(prompts, 2)))
        read = model.reader.account.tensors_read
        stored = set(model.checkpoint.weight_map)
    assert any(n.startswith("language_model.model.layers.") for n in stored)  # the Hub's names
    vision = {n for n in stored if "vision" in n or "multi_modal_projector" in n}
    assert vision and not read & vision
    assert all("language_model" in n for n in read)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.stack([reference(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# -- one-line errors: non-finite states, broken chat templates, models transformers cannot build ---------

def poisoned_copy(source: Path, folder: Path, tensor: str) -> Path:
    """A copy of the model folder in which ``tensor`` is all NaN."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if tensor not in f.keys():  # noqa: SIM118
                continue
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            metadata = f.metadata()
        tensors[tensor] = torch.full_like(tensors[tensor], float("nan"))
        shard.unlink()
        save_file(tensors, shard, metadata=metadata)
        return folder
    raise AssertionError(f"no tensor {tensor}")


def test_nan_hidden_states_are_one_line_naming_the_model_and_the_block(tiny_models, tmp_path):
    folder = poisoned_copy(tiny_models("llama"), tmp_path / "nan", "model.layers.1.mlp.down_proj.weight")
    out = tmp_path / "d.pth"
    one_line_error(run_measure(str(folder), "-o", str(out), "--limit", "4"), str(folder),
                   "hidden states entering block 2 are not finite (NaN or infinity) for 8 of 8 prompts")
    assert not out.exists() and not sidecar_path(out).exists()


def broken_template_copy(source: Path, folder: Path) -> Path:
    """A copy of the model folder whose chat template does not compile."""
    import shutil

    shutil.copytree(source, folder)
    broken = "{% for m in messages %}<user> {{ m['content'] }}"  # no endfor
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(broken)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = broken
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_broken_chat_template_is_one_line_naming_the_tokenizer(tiny_models, tmp_path):
    folder = broken_template_copy(tiny_models("llama"), tmp_path / "broken")
    one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder), "chat template fails")
    # The tokenizer named by --tokenizer is the one the message names.
    one_line_error(run_measure(str(tiny_models("llama")), "-o", str(tmp_path / "d.pth"), "--tokenizer",
                               str(folder)), str(folder), "chat template fails")


def test_any_failure_of_transformers_to_build_the_model_is_one_line(tiny_models, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("cannot allocate the rotary table")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", fails)
    folder = tiny_models("llama")
    one_line_error(run_measure(str(folder), "-o", str(tmp_path / "d.pth")), str(folder / "config.json"),
                   "transformers cannot build this model (cannot allocate the rotary table)")


def test_transformers_older_than_required_is_one_line(tiny_models, tmp_path, monkeypatch):
    import orthopatch.run.layerwise

    folder = str(tiny_models("llama"))
    assert orthopatch.run.layerwise.MIN_TRANSFORMERS == 5
    monkeypatch.setattr(orthopatch.run.layerwise, "MIN_TRANSFORMERS", int(transformers.__version__.split(".")[0]) + 1)
    one_line_error(run_measure(folder, "-o", str(tmp_path / "d.pth")),
                   f"needs transformers {orthopatch.run.layerwise.MIN_TRANSFORMERS} or later, not "
                   f"{transformers.__version__}: pip install -U 'orthopatch[measure]'")


def test_a_model_from_the_hub_cache_is_recorded_by_repo_id_and_commit(tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.test_hub import add_to_cache

    commit = "d" * 40
    snapshot = add_to_cache(tmp_path / "cache", "someorg/tiny", commit, tiny_models("llama"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "d.pth"
    result = run_measure("someorg/tiny", "-o", str(out), "--limit", "4")
    assert result.exit_code == 0, result.output
    record = DirectionRecord.from_json(json.loads(sidecar_path(out).read_text()))
    assert record.model_repo == f"someorg/tiny@{commit}"
    assert Path(record.model) == snapshot
    # A local folder has no repo.
    local = measure(MeasureOptions(model=tiny_models("llama"), out=tmp_path / "local.pth",
                                   choice=PromptChoice(limit=4), run=CPU, quiet=True))
    assert local.record.model_repo is None

"""``measure`` and ``evaluate`` against hostile input: configs that disagree with the checkpoint,
prompt files that nest or run long, chat templates that never end, half-patched folders, outputs
that would be replaced, an unreachable Hub, and progress written to a pipe."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import CONFIG_NAME, INPLACE_JOURNAL_DIR, INPLACE_STATE_NAME, PARTIAL_NAME
from tests.helpers import cli, one_error_line, orthopatch_command, run_orthopatch

transformers = pytest.importorskip("transformers")


def copy_model(source: Path, folder: Path, **config: object) -> Path:
    """A copy of a model folder (shards linked, not copied) with ``config`` changed in its config.json."""
    shutil.copytree(source, folder, copy_function=os.link)
    path = folder / CONFIG_NAME
    doc = json.loads(path.read_text())
    path.unlink()  # a hard link: never write through it into the shared model
    doc.update(config)
    path.write_text(json.dumps(doc))
    return folder


def measure_line(*args: str | Path) -> str:
    return one_error_line(cli("measure", *args, "-q"))


# -- 3. a config that disagrees with the checkpoint -------------------------------------------------------

def test_an_absurd_layer_count_is_refused_at_once_naming_both_numbers(tiny_models, tmp_path):
    folder = copy_model(tiny_models("llama"), tmp_path / "m", num_hidden_layers=10**9)
    started = time.monotonic()
    result = run_orthopatch("measure", folder, "-o", tmp_path / "d.pth", "-q", timeout=60)
    line = one_error_line(result)
    assert time.monotonic() - started < 30
    assert "config.json says num_hidden_layers 1000000000 but the checkpoint has blocks 0..2" in line, line
    assert not (tmp_path / "d.pth").exists()


@pytest.mark.parametrize(("kind", "key", "value", "expected"), [
    ("llama", "num_hidden_layers", 2, "num_hidden_layers 2 but the checkpoint has blocks 0..2"),
    ("llama", "num_hidden_layers", 4, "num_hidden_layers 4 but the checkpoint has blocks 0..2"),
    ("llama", "hidden_size", 64, "hidden_size 64 but the checkpoint's embedding"),
    ("llama", "vocab_size", 10**9, "vocab_size 1000000000 but the checkpoint's embedding"),
    ("llama", "intermediate_size", 10**8, "intermediate_size 100000000 but"),
    ("llama", "num_attention_heads", 8, "num_attention_heads 8"),
    ("llama", "num_key_value_heads", 4, "num_key_value_heads 4"),
    ("mixtral", "num_local_experts", 10**6, "num_local_experts 1000000 but the checkpoint has experts 0..3"),
])
def test_a_config_size_the_checkpoint_contradicts_is_one_line(tiny_models, tmp_path, kind, key, value, expected):
    folder = copy_model(tiny_models(kind), tmp_path / "m", **{key: value})
    line = measure_line(folder, "-o", tmp_path / "d.pth")
    assert f"{folder / CONFIG_NAME}: config.json says {expected}" in line, line


def test_evaluate_and_apply_evaluate_check_the_config_too(tiny_models, tmp_path):
    source = tiny_models("llama")
    folder = copy_model(source, tmp_path / "m", num_hidden_layers=2)
    line = one_error_line(cli("evaluate", folder, "--source", source, "--no-refusals", "--limit", "2", "-q"))
    assert "num_hidden_layers 2 but the checkpoint has blocks 0..2" in line, line
    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32), direction)
    out = tmp_path / "out"
    line = one_error_line(cli("apply", folder, direction, "-o", out, "--evaluate", "-q"))
    assert "num_hidden_layers 2 but the checkpoint has blocks 0..2" in line, line
    assert not out.exists()


def test_the_multimodal_and_moe_families_pass_the_check(tiny_models):
    from orthopatch.io.checkpoint import open_checkpoint
    from orthopatch.run.checks import check_config_sizes

    for kind in ("gemma3-mm", "gemma3", "gpt2", "gpt_neox", "qwen2_moe", "qwen3_moe", "mixtral", "llama-tied"):
        check_config_sizes(open_checkpoint(tiny_models(kind)))


# -- 4. prompt files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_deeply_nested_prompt_file_is_one_line(tiny_models, tmp_path, suffix):
    deep = tmp_path / f"deep{suffix}"
    deep.write_text('{"prompt": "hello"}\n' + "[" * 100_000 + "]" * 100_000 + "\n" if suffix == ".jsonl"
                    else "[" * 100_000 + "]" * 100_000)
    line = measure_line(tiny_models("llama"), "-o", tmp_path / "d.pth", "--harmful", deep)
    assert str(deep) in line and "nests 100000 levels deep" in line, line
    if suffix == ".jsonl":
        assert "line 2" in line, line
    line = one_error_line(cli("evaluate", tiny_models("llama"), "--source", tiny_models("llama"), "--harmless",
                              deep, "--no-refusals", "-q"))
    assert str(deep) in line and "nests 100000 levels deep" in line, line


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_a_prompt_longer_than_the_limit_is_refused_before_tokenizing(tiny_models, tmp_path, monkeypatch, suffix):
    from orthopatch.run import chat, prompts

    long_prompt = "word " * 300_000  # 1.5 MB
    path = tmp_path / f"long{suffix}"
    if suffix == ".txt":
        path.write_text(f"short one\n\n{long_prompt}\n")
    elif suffix == ".jsonl":
        path.write_text(json.dumps({"prompt": "short one"}) + "\n\n" + json.dumps({"prompt": long_prompt}) + "\n")
    else:
        path.write_text(json.dumps(["short one", "second", long_prompt]))

    def never(*args, **kwargs):
        raise AssertionError("a prompt over the limit was tokenized")

    monkeypatch.setattr(chat, "encode", never)
    line = measure_line(tiny_models("llama"), "-o", tmp_path / "d.pth", "--harmless", path)
    where = "item 2" if suffix == ".json" else "line 3"
    assert str(path) in line and f"{where} is a prompt of 1,500,000 characters" in line, line
    assert f"{prompts.MAX_PROMPT_CHARS:,}" in line, line


# -- 5. a chat template that renders for ever -----------------------------------------------------------

ENDLESS = ("{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}"
           "{% endfor %}{% endfor %}{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def endless_template_copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ENDLESS
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (folder / extra).unlink(missing_ok=True)
    return folder


def test_a_chat_template_that_never_ends_is_stopped_in_one_line(tiny_models, tmp_path, monkeypatch):
    from orthopatch.run import chat

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 1.0)
    folder = endless_template_copy(tiny_models("llama"), tmp_path / "endless")
    started = time.monotonic()
    line = measure_line(folder, "-o", tmp_path / "d.pth")
    assert time.monotonic() - started < 20
    assert str(folder) in line and "chat template" in line and "1 s" in line, line


def test_the_template_time_limit_works_off_the_main_thread(tiny_models, tmp_path, monkeypatch):
    from orthopatch.run import chat

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 1.0)
    good = chat.load_tokenizer(tiny_models("llama"))
    folder = endless_template_copy(tiny_models("llama"), tmp_path / "endless")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    found: list[object] = []

    def work() -> None:
        try:
            found.append(chat.encode(good, "hello"))
            chat.encode(tokenizer, "hello", folder)
        except OrthopatchError as exc:
            found.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert isinstance(found[0], list) and isinstance(found[1], OrthopatchError), found
    assert "chat template" in str(found[1]) and str(folder) in str(found[1])
    time.sleep(1.5)  # no exception arrives later in this thread
    assert chat.encode(good, "hello") == found[0]


# -- 6. a half-patched folder ---------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["journal", "partial"])
def test_measure_and_evaluate_refuse_a_half_patched_folder(tiny_models, tmp_path, marker):
    source = tiny_models("llama")
    folder = copy_model(source, tmp_path / "m")
    if marker == "journal":
        (folder / INPLACE_JOURNAL_DIR).mkdir()
        (folder / INPLACE_JOURNAL_DIR / INPLACE_STATE_NAME).write_text("{}")
        expected = "in-place conversion"
    else:
        (folder / PARTIAL_NAME).write_text("{}")
        expected = PARTIAL_NAME
    line = measure_line(folder, "-o", tmp_path / "d.pth")
    assert str(folder) in line and expected in line, line
    for model, src in ((folder, source), (source, folder)):
        line = one_error_line(cli("evaluate", model, "--source", src, "--no-refusals", "--limit", "2", "-q"))
        assert str(folder) in line and expected in line, line
    line = one_error_line(cli("evaluate", source, "--source", folder, "--no-refusals", "--limit", "2", "-q",
                              "--in-memory"))
    assert str(folder) in line and expected in line, line


# -- 8. measure never replaces a direction or its record unasked ------------------------------------------

@pytest.mark.parametrize("existing", ["d.pth", "d.json"])
def test_measure_refuses_to_replace_an_output_without_overwrite(tiny_models, tmp_path, monkeypatch, existing):
    from orthopatch.run import measure

    (tmp_path / existing).write_text("keep me")
    monkeypatch.setattr(measure, "LayerwiseModel", None)  # nothing may start before the refusal
    line = measure_line(tiny_models("llama"), "-o", tmp_path / "d.pth")
    assert str(tmp_path / existing) in line and "--overwrite" in line, line
    assert (tmp_path / existing).read_text() == "keep me"
    monkeypatch.undo()
    result = cli("measure", tiny_models("llama"), "-o", tmp_path / "d.pth", "-q", "--limit", "4", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d.json").read_text())["direction_file"] == "d.pth"


# -- the Hub: an unreachable endpoint fails fast ----------------------------------------------------------

def test_an_unreachable_hub_endpoint_fails_within_seconds(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = run_orthopatch("apply", tmp_path / "model", "someorg/somerepo:refusal_dir.pth", env=env, timeout=60)
    elapsed = time.monotonic() - started
    line = one_error_line(result)
    assert "someorg/somerepo:refusal_dir.pth" in line and "cannot be reached" in line, line
    assert elapsed < 5 + 4, elapsed  # interpreter start-up included


# -- progress into a pipe -------------------------------------------------------------------------------

def test_progress_into_a_pipe_is_plain_lines(tiny_models, tmp_path):
    from orthopatch import progress

    direction = tmp_path / "r.pth"
    torch.save(torch.randn(32), direction)
    result = subprocess.run(orthopatch_command("apply", tiny_models("llama"), direction, "-o", tmp_path / "out"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "bytes (100%)" in result.stderr, result.stderr
    result = subprocess.run(orthopatch_command("measure", tiny_models("llama"), "-o", tmp_path / "d.pth",
                                               "--limit", "4"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "3 of 3 blocks" in result.stderr, result.stderr
    assert progress.PLAIN_SECONDS <= 10


def test_an_unreachable_endpoint_still_serves_a_cached_file(tmp_path, monkeypatch):
    """A guard, not a fix: the probe must not stop a cached file from being used."""
    from huggingface_hub import constants

    from orthopatch.hub import resolve_file
    from tests.test_hub import add_to_cache

    files = tmp_path / "files"
    files.mkdir()
    (files / "refusal_dir.pth").write_bytes(b"cached")
    add_to_cache(tmp_path / "cache", "someorg/somerepo", "e" * 40, files)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    found = resolve_file("someorg/somerepo:refusal_dir.pth", cache_dir=tmp_path / "cache", quiet=True)
    assert found.path.read_bytes() == b"cached" and time.monotonic() - started < 5

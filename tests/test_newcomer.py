"""A new user's first mistakes and first runs: each wrong MODEL path has its own one-line message, and
a run says what it will do and what it did."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orthopatch.io.formats import RECORD_NAME
from tests.helpers import TINY, cli, one_error_line, save_direction, tiny_llama, untouched

HIDDEN = TINY.hidden


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("newcomer") / "model")


@pytest.fixture
def direction(tmp_path) -> Path:
    path = tmp_path / "refusal_dir.pth"
    save_direction(path, HIDDEN)
    return path




def single_file_model(folder: Path) -> Path:
    """A one-shard model (``model.safetensors``, no index)."""
    import torch

    from orthopatch.synthetic import LlamaShape
    from tests.helpers import write_sharded

    shape = LlamaShape(hidden=HIDDEN, intermediate=96, vocab=64, layers=2, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(*dims, generator=gen).to(torch.bfloat16) for name, dims in shape.tensors()}
    return write_sharded(folder, [tensors], shape.config(), metadata={"format": "pt"})


def test_a_path_to_model_safetensors_means_its_folder(tmp_path, direction) -> None:
    model = single_file_model(tmp_path / "Tiny")
    with untouched(model):
        result = cli("apply", model / "model.safetensors", direction, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "Tiny-abliterated"  # beside the folder, not inside it
    assert (out / RECORD_NAME).exists() and (out / "model.safetensors").exists()
    assert result.stdout.startswith(f"{out}: ")


@pytest.mark.parametrize("mistake, words", [
    ("bin-only", ["PyTorch .bin weights", "convert them first", "safe_serialization=True"]),
    ("gguf-file", ["too short for a GGUF header"]),  # a .gguf MODEL is read as one: this one is broken
    ("gguf-folder", ["give the .gguf file itself", "llama-3-8b.Q4_K_M.gguf"]),
    ("no-config", ["no config.json in the model folder"]),
    ("no-model-type", ["config.json: has no model_type", "--targets"]),
    ("swapped", ["tensor file, not a model folder", "MODEL comes first, then DIRECTION"]),
    ("a-file", ["is a file, not a model folder"]),
    ("missing", ["no such file or folder"]),
])
def test_model_path_mistakes_each_say_what_is_wrong(pristine, tmp_path, direction, mistake, words) -> None:
    model = tmp_path / "model"
    if mistake == "bin-only":
        model.mkdir()
        (model / "pytorch_model.bin").write_bytes(b"weights")
        (model / "config.json").write_text("{}")
    elif mistake == "gguf-file":
        model = tmp_path / "llama-3-8b.Q4_K_M.gguf"
        model.write_bytes(b"GGUF")
    elif mistake == "gguf-folder":
        model.mkdir()
        (model / "llama-3-8b.Q4_K_M.gguf").write_bytes(b"GGUF")
    elif mistake == "no-config":
        shutil.copytree(pristine, model)
        (model / "config.json").unlink()
    elif mistake == "no-model-type":
        shutil.copytree(pristine, model)
        (model / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "num_hidden_layers": 3}))
    elif mistake == "a-file":
        model = tmp_path / "notes.txt"
        model.write_text("hello")
    args = ("apply", direction, pristine) if mistake == "swapped" else ("apply", model, direction)
    with untouched(pristine):
        line = one_error_line(cli(*args, "-q"))
    assert all(word in line for word in words), line
    named = {"swapped": direction, "no-model-type": model / "config.json"}.get(mistake, model)
    assert line.startswith(f"orthopatch: error: {named}: "), line
    assert not list(tmp_path.glob("*-abliterated"))


def hub_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with an empty Hugging Face cache (huggingface_hub reads it at import)."""
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-c", *args], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=120)


def test_a_mistyped_path_that_reads_as_a_repo_id(tmp_path, direction) -> None:
    result = hub_cli(tmp_path, "from orthopatch.cli import main; main()", "apply", "models/Lama-3-8B", str(direction),
                     HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("orthopatch: error: models/Lama-3-8B: no such folder; read as a Hub repo id")
    assert "--download" in line


# huggingface_hub waits between retries (about 25 s in all); the test takes the waits out, not the retries.
NO_WAITS = "import huggingface_hub.utils._http as h; h.time.sleep = lambda s: None; "


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_a_hub_direction_without_network_is_one_line(pristine, tmp_path, env) -> None:
    result = hub_cli(tmp_path, NO_WAITS + "from orthopatch.cli import main; main()", "apply", str(pristine),
                     "someorg/somerepo:refusal_dir.pth", "-o", str(tmp_path / "out"), **env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # no retry notes, no warnings
    assert line.startswith("orthopatch: error: someorg/somerepo:refusal_dir.pth: file 'refusal_dir.pth' is not in "
                           "the local Hugging Face cache")
    assert not (tmp_path / "out").exists()


def test_a_run_prints_its_plan_and_a_result_line(pristine, tmp_path, direction) -> None:
    out = tmp_path / "out"
    result = cli("apply", pristine, direction, "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if not line.startswith("note: "))
    plan_line = lines[at]  # after the notes, before the bar
    record = json.loads((out / RECORD_NAME).read_text())
    n, patched, total = len(record["tensors_patched"]), record["patched_bytes"], record["total_bytes"]
    assert plan_line == (f"llama on cpu: patching {n} tensors ({patched:,} bytes), "
                         f"copying {total - patched:,} bytes unchanged")
    assert "100%" in result.stderr  # the finished bar stays
    line = re.fullmatch(rf"{re.escape(str(out))}: {n} tensors patched \({patched:,} bytes\), "
                        r"(?P<rest>.*), in \d+\.\d{3} s \(written\)\n", result.stdout)
    assert line, result.stdout
    # the unchanged bytes, by where they went: shared with the source, copied in the kernel or through memory
    parts = re.findall(r"([\d,]+) bytes (shared with the source|copied in the kernel|copied through memory)",
                       line["rest"])
    assert ", ".join(f"{k} bytes {how}" for k, how in parts) == line["rest"]
    assert sum(int(k.replace(",", "")) for k, _ in parts) == total - patched
    again = cli("apply", pristine, direction, "-o", out, "-q")
    assert again.stdout == f"{out}: already complete, nothing to do\n" and again.stderr == ""


def test_the_demo_says_where_its_files_are_and_what_to_try(tmp_path) -> None:
    from orthopatch.demo import run_demo

    lines = run_demo(tmp_path, quiet=True)
    model, direction = tmp_path / "Llama-demo", tmp_path / "refusal_dir.pth"
    assert f"model: {model}   direction: {direction}   output: {tmp_path / 'Llama-demo-abliterated'}" in lines
    tries = [line.strip() for line in lines if line.strip().startswith("orthopatch ")]
    assert tries and all(str(model) in t or str(direction) in t for t in tries)
    for command in tries:  # every suggestion runs as printed
        args = command.split("#")[0].split()[1:]
        assert cli(*args, "-q").exit_code == 0, command


def test_the_demo_in_a_folder_it_cannot_write_is_one_line(tmp_path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a file")
    line = one_error_line(cli("demo", not_a_folder, "-q"))
    assert "cannot write the demo's model (Not a directory)" in line and str(not_a_folder) in line

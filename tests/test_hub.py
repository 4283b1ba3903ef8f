"""Repo ids and ``REPO_ID:PATH`` from a hand-built Hugging Face cache, the model card, and pushing.

The cache is laid out as huggingface_hub writes it: ``models--ORG--NAME/refs/main`` holds the commit
hash (no newline), ``snapshots/<commit>/`` holds relative symlinks into ``blobs/``. The CLI runs in a
subprocess so that huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthopatch import hub
from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import cached_repo_name
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.patch.model_card import build_card, read_source_card
from orthopatch.patch.record import ConversionRecord, DirectionInfo, Method, PatchedTensor
from orthopatch.synthetic import write_direction
from tests.helpers import TINIEST, cli, cli_ok, one_error_line, run_orthopatch, tiny_llama

MODEL_ID, DIRECTION_ID = "testorg/Tiny-Llama", "failspy/tiny-abliterated"
COMMIT, DIRECTION_COMMIT = "a" * 40, "b" * 40
SOURCE_CARD = "---\nlicense: llama3\nlanguage:\n- en\ntags:\n- llama\n---\n\n# Tiny Llama\n\nThe source card's text.\n"


def add_to_cache(cache: Path, repo_id: str, commit: str, files: Path) -> Path:
    """Put every file under ``files`` into ``cache`` as huggingface_hub does; return the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    model = tiny_llama(root / "build" / "model", shape=TINIEST, shard_bytes=16_000)
    (model / "README.md").write_text(SOURCE_CARD)
    direction_files = root / "build" / "direction"
    direction_files.mkdir()
    r = write_direction(direction_files / "refusal_dir.pth", TINIEST.hidden)
    cache = root / "cache"
    snapshot = add_to_cache(cache, MODEL_ID, COMMIT, model)
    add_to_cache(cache, DIRECTION_ID, DIRECTION_COMMIT, direction_files)
    return {"cache": cache, "snapshot": snapshot, "model": model, "r": r,
            "direction_file": direction_files / "refusal_dir.pth"}


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_size for p in sorted(folder.rglob("*"))}


def cached_cli(cache: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m orthopatch ARGS`` in ``cwd``, offline, with the test cache as the Hugging Face cache."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache["cache"]), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cwd.mkdir(parents=True, exist_ok=True)
    return run_orthopatch(*args, cwd=cwd, env=env)


def test_repo_ids_resolve_from_the_cache_without_downloading(cache, tmp_path):
    before = tree(cache["cache"])
    work = tmp_path / "work"
    result = cached_cli(cache, work, "apply", MODEL_ID, f"{DIRECTION_ID}:refusal_dir.pth", "-q")
    assert result.returncode == 0, result.stderr
    out = work / "Tiny-Llama-abliterated"
    assert result.stdout.startswith("Tiny-Llama-abliterated: ")
    assert tree(cache["cache"]) == before  # nothing downloaded, nothing written into the cache

    record = json.loads((out / RECORD_NAME).read_text())
    assert record["direction"]["sha256"] == hashlib.sha256(cache["direction_file"].read_bytes()).hexdigest()
    r = cache["r"].to(torch.float64)
    for shard in sorted(cache["model"].glob("*.safetensors")):
        src, dst = load_file(shard), load_file(out / shard.name)
        for name, tensor in src.items():
            if name.endswith("o_proj.weight"):
                assert (r @ dst[name].to(torch.float64)).norm() < 0.02 * (r @ tensor.to(torch.float64)).norm()
            elif "lm_head" in name:
                assert torch.equal(dst[name], tensor)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (out / "tokenizer.json").is_symlink()

    card = (out / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert f"base_model: {MODEL_ID}" in front and "license: llama3" in front
    assert "- abliterated" in front and "- orthopatch" in front and "- llama" in front
    assert f"`{DIRECTION_ID}:refusal_dir.pth`" in body and record["direction"]["sha256"] in body
    assert "model.layers.1.mlp.down_proj.weight" in body and "orthopatch 0.1.0" in body
    assert "The source card's text." in body and "license:" not in body


@pytest.fixture
def offline(cache, monkeypatch):
    """In-process runs against the test cache: huggingface_hub's settings patched where it reads them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def run_in(cwd: Path, *args: str):
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
        return cli(*args)

    return run_in


def test_verify_takes_the_same_hub_references(cache, tmp_path, offline):
    work = tmp_path / "work"
    assert offline(work, "apply", MODEL_ID, f"{DIRECTION_ID}:refusal_dir.pth", "-q").exit_code == 0
    result = offline(work, "verify", "Tiny-Llama-abliterated", "--direction", f"{DIRECTION_ID}:refusal_dir.pth",
                     "--source", MODEL_ID, "-q")
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "byte-identical to the source" in result.output
    missing = offline(work, "verify", "Tiny-Llama-abliterated", "--direction", f"{DIRECTION_ID}:missing.pth")
    assert missing.exit_code == 1 and "missing.pth" in missing.stderr


def test_revision_and_local_path_precedence(cache, tmp_path, offline):
    ok = offline(tmp_path / "rev", "apply", f"{MODEL_ID}@{COMMIT}", f"{DIRECTION_ID}@main:refusal_dir.pth",
                "-q")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "rev" / "Tiny-Llama-abliterated" / RECORD_NAME).exists()

    # A folder that exists at the repo id's path wins; its output is the usual sibling.
    work = tmp_path / "local"
    (work / "testorg").mkdir(parents=True)
    (work / MODEL_ID).symlink_to(cache["model"], target_is_directory=True)
    local = offline(work, "apply", MODEL_ID, str(cache["direction_file"]), "-q")
    assert local.exit_code == 0, local.output
    assert (work / "testorg" / "Tiny-Llama-abliterated" / RECORD_NAME).exists()
    assert not (work / "Tiny-Llama-abliterated").exists()
    assert "base_model: Tiny-Llama" in (work / "testorg" / "Tiny-Llama-abliterated" / "README.md").read_text()


def test_hub_errors_are_one_line(cache, tmp_path, offline, monkeypatch):
    from huggingface_hub import constants

    direction = str(cache["direction_file"])
    line = one_error_line(offline(tmp_path, "apply", "testorg/Missing", direction))
    assert "testorg/Missing" in line and "--download" in line and str(cache["cache"]) in line
    line = one_error_line(offline(tmp_path, "apply", MODEL_ID, f"{DIRECTION_ID}:nope.pth"))
    assert f"{DIRECTION_ID}:nope.pth" in line and "'nope.pth'" in line and "HF_HUB_OFFLINE" in line
    line = one_error_line(offline(tmp_path, "apply", "testorg/Missing", direction, "--download"))
    assert "testorg/Missing" in line and "HF_HUB_OFFLINE" in line
    line = one_error_line(offline(tmp_path, "apply", f"{MODEL_ID}@v9", direction))
    assert f"{MODEL_ID}@v9" in line

    # No network: a closed port as the Hub.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    line = one_error_line(offline(tmp_path, "apply", "testorg/Missing", direction, "--download"))
    assert "testorg/Missing" in line and "cannot be reached" in line
    assert not list(tmp_path.glob("*-abliterated"))


def test_download_fetches_only_weights_config_tokenizer_and_card(cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(cache["snapshot"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(OrthopatchError, match="no such folder.*--download"):
        hub.resolve_model("testorg/Other")
    source = hub.resolve_model("testorg/Other@dev", download=True)
    assert source.path == cache["snapshot"] and source.name == "testorg/Other"
    assert source.default_out == Path("Other-abliterated")
    (_, offline), (_, small), (_, weights) = calls
    assert offline["local_files_only"] and not small["local_files_only"] and small["revision"] == "dev"
    assert weights["revision"] == COMMIT  # the weights come from the commit the small files came from
    shards = sorted(set(json.loads((cache["snapshot"] / "model.safetensors.index.json").read_text())
                        ["weight_map"].values()))
    listing = [*shards, "consolidated.safetensors", "model.safetensors.index.json", "config.json",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE", ".gitattributes",
               "pytorch_model-00001-of-00002.bin", "original/consolidated.00.pth", "original/params.json",
               "original/tokenizer.model", "USE_POLICY.md", "model-00009-of-00009.safetensors"]

    def fetched(kwargs: dict) -> set[str]:
        return set(filter_repo_objects(listing, allow_patterns=kwargs["allow_patterns"],
                                       ignore_patterns=kwargs["ignore_patterns"]))

    assert fetched(small) == set(listing[len(shards) + 1:len(shards) + 11])
    assert fetched(weights) == set(shards)  # not consolidated.safetensors, nor a shard the index does not name


def test_download_of_a_single_file_model_fetches_model_safetensors(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub.resolve_model("testorg/Single", download=True)
    assert calls[-1]["allow_patterns"] == ["model.safetensors"] and calls[-1]["revision"] == COMMIT


def test_push_uses_upload_large_folder_where_the_hub_client_has_it(cache, tmp_path, pushed, monkeypatch):
    from huggingface_hub import HfApi

    def upload_large_folder(self, **kwargs):
        pushed.append(("upload_large_folder", kwargs))

    monkeypatch.setattr(HfApi, "upload_large_folder", upload_large_folder, raising=False)
    out = tmp_path / "out"
    cli_ok("apply", cache["model"], cache["direction_file"], "-o", out, "-q", "--push-to-hub", "me/big")
    (create, _), (upload, uploaded) = pushed
    assert upload == "upload_large_folder" and uploaded["repo_type"] == "model"
    assert Path(uploaded["folder_path"]) == out and uploaded["ignore_patterns"] == list(hub.UPLOAD_IGNORE)
    assert RECORD_NAME in uploaded["allow_patterns"] and "config.json" in uploaded["allow_patterns"]


def test_parse_repo_ref():
    assert hub.parse_repo_ref("meta-llama/Meta-Llama-3-70B-Instruct") == hub.RepoRef(
        "meta-llama/Meta-Llama-3-70B-Instruct")
    assert hub.parse_repo_ref("org/name@refs/pr/1") == hub.RepoRef("org/name", "refs/pr/1")
    for text in ("name", "./org/name", "a/b/c", "/abs/path", "org/na--me", "org/name@", "org/x.git"):
        assert hub.parse_repo_ref(text) is None, text
    snapshot = Path("/c/models--org--name/snapshots") / COMMIT
    assert cached_repo_name(snapshot) == "org/name"
    assert cached_repo_name(Path("/c/name")) is None


def test_source_card_parsing(tmp_path):
    assert read_source_card(tmp_path) == ({}, "")
    (tmp_path / "README.md").write_text("# Plain\n\ntext\n")
    assert read_source_card(tmp_path) == ({}, "# Plain\n\ntext\n")
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n# Body\n")
    meta, body = read_source_card(tmp_path)
    assert meta == {} and body.strip() == "# Body"
    (tmp_path / "README.md").write_text(SOURCE_CARD)
    meta, body = read_source_card(tmp_path)
    assert meta["license"] == "llama3" and body.strip().startswith("# Tiny Llama")

    record = ConversionRecord("9.9", "src", DirectionInfo("d.pth", "f" * 64, 1, 8), "llama", Method(scale=0.5),
                              "cuda:0", (PatchedTensor("model.embed_tokens.weight", "embedding", None, 1),), 0, 0, 0.0)
    card = build_card(record, base_model="org/name", direction="d.pth", source=(meta, body))
    assert card.data.base_model == "org/name" and card.data.license == "llama3"
    assert card.data.tags[:2] == ["abliterated", "orthopatch"]
    assert "| scale | 0.5 |" in card.text and "cuda" not in card.text and "The source card's text." in card.text


@pytest.fixture
def pushed(monkeypatch):
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        assert (folder / RECORD_NAME).exists() and not (folder / PARTIAL_NAME).exists()
        calls.append(("upload_folder", kwargs))
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_finished_folder(cache, tmp_path, pushed):
    from huggingface_hub.utils import filter_repo_objects

    out = tmp_path / "out"
    args = ["apply", cache["model"], cache["direction_file"], "-o", out, "-q"]
    cli_ok(*args)
    assert pushed == []
    (out / ".DS_Store").write_bytes(b"hidden")
    (out / ".cache" / "huggingface").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "x.lock").write_text("")

    result = cli(*args, "--push-to-hub", "me/Tiny-abliterated", "--private")
    assert result.exit_code == 0, result.output
    assert "pushed to https://huggingface.co/me/Tiny-abliterated" in result.stdout
    (create, created), (upload, uploaded) = pushed
    assert create == "create_repo" and upload == "upload_folder"
    assert created["repo_id"] == "me/Tiny-abliterated" and created["private"] and created["exist_ok"]
    assert uploaded["repo_id"] == "me/Tiny-abliterated" and Path(uploaded["folder_path"]) == out
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    sent = set(filter_repo_objects(files, allow_patterns=uploaded["allow_patterns"],
                                   ignore_patterns=uploaded["ignore_patterns"]))
    assert sent == {f for f in files if not f.startswith(".")}
    assert RECORD_NAME in sent and "README.md" in sent


def test_a_push_of_a_model_converted_in_place_leaves_its_other_weights_out(cache, tmp_path, pushed):
    """The folder still holds what an out-of-place run never copies (Meta's ``original/`` weights, a
    ``consolidated.safetensors``, a ``.bin``, a ``.gguf``): unpatched, so never uploaded."""
    from huggingface_hub.utils import filter_repo_objects

    work = tmp_path / "model"
    shutil.copytree(cache["model"], work)
    (work / "original").mkdir()
    (work / "original" / "consolidated.00.pth").write_bytes(b"unpatched weights")
    (work / "original" / "params.json").write_text("{}")
    shutil.copy(next(work.glob("model-*.safetensors")), work / "consolidated.safetensors")
    (work / "pytorch_model.bin").write_bytes(b"unpatched weights")
    (work / "model.Q4_K_M.gguf").write_bytes(b"unpatched weights")
    (work / "tokenizer [v2].json").write_text("{}")  # glob characters in a name are matched literally
    result = cli("apply", work, cache["direction_file"], "--in-place", "-q", "--push-to-hub", "me/x")
    assert result.exit_code == 0, result.output
    (_, _), (upload, uploaded) = pushed
    files = [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()]
    sent = set(filter_repo_objects(files, allow_patterns=uploaded["allow_patterns"],
                                   ignore_patterns=uploaded["ignore_patterns"]))
    unpatched = {"original/consolidated.00.pth", "original/params.json", "consolidated.safetensors",
                 "pytorch_model.bin", "model.Q4_K_M.gguf"}
    assert sent == set(files) - unpatched
    assert {RECORD_NAME, "README.md", "config.json", "model.safetensors.index.json", "tokenizer [v2].json"} <= sent
    assert {p.name for p in work.glob("model-*.safetensors")} <= sent


def test_push_refused_when_the_output_does_not_verify(cache, tmp_path, pushed):
    out = tmp_path / "out"
    args = ["apply", cache["model"], cache["direction_file"], "-o", out, "-q"]
    cli_ok(*args)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = out / weight_map["lm_head.weight"]  # the last tensor of its shard, never patched
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the output no longer matches the source
    shard.write_bytes(bytes(data))
    result = cli(*args, "--push-to-hub", "me/x")
    assert result.exit_code == 1 and pushed == []
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("orthopatch: error: not pushed: verification failed:") and "lm_head" in line


def test_push_failures_and_refusals(cache, tmp_path, pushed, monkeypatch):
    from huggingface_hub import HfApi

    dry = cli("apply", cache["model"], cache["direction_file"], "--dry-run", "--push-to-hub", "me/x")
    assert dry.exit_code == 2

    bad = tmp_path / "bad.pth"
    torch.save(torch.randn(TINIEST.hidden + 1), bad)
    failed = cli("apply", cache["model"], bad, "-o", tmp_path / "o1", "-q", "--push-to-hub", "me/x")
    assert "bad.pth" in one_error_line(failed) and pushed == []

    def no_network(self, repo_id: str, **kwargs):
        raise OSError("[Errno 111] Connection refused\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    result = cli("apply", cache["model"], cache["direction_file"], "-o", tmp_path / "o2", "-q", "--push-to-hub",
                 "me/x")
    assert one_error_line(result) == "orthopatch: error: me/x: Hub access failed ([Errno 111] Connection refused)"
    assert (tmp_path / "o2" / RECORD_NAME).exists()  # the conversion itself stands

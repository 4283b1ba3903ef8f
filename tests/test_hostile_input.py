"""Direction files from strangers and broken checkpoints: refused in one line, nothing run, nothing written."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orthopatch.errors import OrthopatchError
from orthopatch.patch import direction as direction_module
from orthopatch.patch.direction import load_direction
from tests.helpers import TINY, Converted, cli, one_error_line, save_direction, untouched

HIDDEN = TINY.hidden


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: a file appears if any code from the pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def model(converted: Converted) -> Path:
    return converted.model


def apply_cli(model: Path, direction: Path, out: Path):
    return cli("apply", model, direction, "-o", out, "-q")


# --- pickles that would run code ------------------------------------------------------------------

def evil_zip(path: Path, marker: Path) -> None:
    torch.save({"direction": torch.ones(HIDDEN), "payload": CreatesFile(marker)}, path)


def evil_legacy(path: Path, marker: Path, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(CreatesFile(marker), f, protocol=protocol)


@pytest.mark.parametrize("maker", ["zip", "legacy-2", "legacy-4", "npy-object"])
@pytest.mark.parametrize("command", ["apply", "verify"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, model, maker: str, command: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / ("refusal_dir.npy" if maker == "npy-object" else "refusal_dir.pth")
    if maker == "zip":
        evil_zip(evil, marker)
    elif maker.startswith("legacy"):
        evil_legacy(evil, marker, int(maker.rsplit("-", 1)[1]))
    else:
        np.save(evil, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
    assert not marker.exists()
    out = tmp_path / "out"
    with untouched(model):
        if command == "apply":
            result = apply_cli(model, evil, out)
        else:
            good = tmp_path / "good.pth"
            save_direction(good, HIDDEN)
            assert apply_cli(model, good, out).exit_code == 0
            result = cli("verify", out, "--direction", evil, "-q")
    line = one_error_line(result)
    assert not marker.exists()
    assert line.startswith(f"orthopatch: error: {evil}: ")
    if command == "apply":
        assert not out.exists()
        if maker == "zip":
            assert "refused" in line and "would call" in line and "open" in line


def test_a_pickle_is_refused_even_when_the_environment_asks_for_unsafe_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, evil = tmp_path / "pwned", tmp_path / "r.pth"
    evil_zip(evil, marker)
    with pytest.raises(OrthopatchError, match="refused"):
        load_direction(evil, HIDDEN)
    assert not marker.exists()


# --- direction values and shapes ------------------------------------------------------------------

def save(path: Path, value) -> Path:
    if path.suffix == ".npy":
        np.save(path, value)
    elif path.suffix == ".safetensors":
        save_file(value, path)
    else:
        torch.save(value, path)
    return path


GOOD = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value, message", [
    (torch.full((HIDDEN,), float("nan")), "NaN or Inf"),
    (torch.cat([GOOD[:-1], torch.tensor([float("inf")])]), "NaN or Inf"),
    (torch.zeros(HIDDEN), "direction is zero"),
    (torch.stack([GOOD, torch.zeros(HIDDEN), GOOD]), "direction is zero (row 1)"),
    (torch.randn(HIDDEN + 1), f"shape [{HIDDEN + 1}]"),
    (torch.randn(2, 2, HIDDEN), f"shape [2, 2, {HIDDEN}]"),
    (torch.randn(7, HIDDEN), f"shape [7, {HIDDEN}]"),
    (torch.tensor(1.0), "shape []"),
    (torch.randn(HIDDEN, dtype=torch.complex64), "not a dense real-valued tensor"),
    (GOOD.to_sparse(), "not a dense real-valued tensor"),
    (GOOD.tolist(), "holds list"),
    ({}, "found {}"),
    ({"a": GOOD, "b": GOOD * 2}, "exactly one tensor"),
    ({"refusal_dir": torch.randn(3), "mean": torch.randn(HIDDEN, 2)}, "'refusal_dir': [3], 'mean': [64, 2]"),
    ({"nested": {"dir": GOOD}}, "'nested': dict"),
], ids=["nan", "inf", "zero", "zero-row", "size", "3d", "rows", "scalar", "complex", "sparse", "list",
        "empty-dict", "two-usable", "none-usable", "nested"])
def test_unusable_directions_are_refused(tmp_path, value, message: str) -> None:
    path = save(tmp_path / "r.pth", value)
    with pytest.raises(OrthopatchError) as info:
        load_direction(path, HIDDEN, num_layers=3)
    assert message in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("value, rows", [
    (GOOD.to(torch.bfloat16), 1),
    (GOOD.unsqueeze(0), 1),
    (GOOD.repeat(3, 1), 3),
    (GOOD.repeat(4, 1), 4),
    ({"refusal_dir": GOOD, "layer": 14, "note": "from layer 14"}, 1),
    ({"refusal_dir": GOOD, "bias": torch.randn(3)}, 1),
    (GOOD.to(torch.int64) + 1, 1),
    (GOOD.double() * 1e300, 1),
    (GOOD.double() * 1e-310, 1),
], ids=["bf16", "row", "per-layer", "per-hidden-state", "dict-with-extras", "dict-one-usable", "ints",
        "huge", "subnormal"])
def test_usable_directions_are_unit_rows(tmp_path, value, rows: int) -> None:
    direction = load_direction(save(tmp_path / "r.pth", value), HIDDEN, num_layers=3)
    assert direction.rows.shape == (rows, HIDDEN)
    assert np.allclose(np.linalg.norm(direction.rows, axis=1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_other_formats(tmp_path, suffix: str) -> None:
    value = GOOD.numpy() if suffix == ".npy" else {"refusal_dir": GOOD}
    assert load_direction(save(tmp_path / f"r{suffix}", value), HIDDEN).rows.shape == (1, HIDDEN)


@pytest.mark.parametrize("name, data, message", [
    ("r.pth", b"", "file is empty"),
    ("r.pth", b"\x80\x02garbage that is no pickle", "refused"),
    ("r.pth", b"PK\x03\x04 a zip that ends here", "cannot load direction"),
    ("r.safetensors", struct.pack("<Q", 1 << 40) + b"{}", "cannot load direction"),
    ("r.safetensors", b"", "cannot load direction"),
    ("r.npy", b"\x93NUMPY\x01\x00 nonsense", "cannot load direction"),
    ("r.txt", b"0.1 0.2", "unknown direction format"),
], ids=["empty", "garbage", "truncated-zip", "huge-header", "empty-safetensors", "bad-npy", "suffix"])
def test_broken_direction_files(tmp_path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(OrthopatchError) as info:
        load_direction(path, HIDDEN)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_torch_file(tmp_path) -> None:
    full = save(tmp_path / "full.pth", GOOD).read_bytes()
    for cut in (10, len(full) // 2, len(full) - 5):
        (tmp_path / "r.pth").write_bytes(full[:cut])
        with pytest.raises(OrthopatchError, match="cannot load direction|refused"):
            load_direction(tmp_path / "r.pth", HIDDEN)


def test_a_huge_file_is_not_loaded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(direction_module, "MAX_DIRECTION_BYTES", 100)
    with pytest.raises(OrthopatchError, match="too large for a direction"):
        load_direction(save(tmp_path / "r.pth", GOOD), HIDDEN)


def test_a_missing_direction_is_one_line(tmp_path, model) -> None:
    line = one_error_line(apply_cli(model, tmp_path / "nope.pth", tmp_path / "out"))
    assert line == f"orthopatch: error: {tmp_path / 'nope.pth'}: direction file not found"


# --- broken checkpoints ---------------------------------------------------------------------------

SHARD = "model-00002-of-00008.safetensors"  # holds layer 0's first tensors


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(path: Path, header: dict | bytes, body: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def first_tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def break_checkpoint(folder: Path, damage: str) -> tuple[str, list[str]]:
    """Damage the copy in ``folder``; return the file the error must name and words it must hold."""
    shard = folder / SHARD
    header, body = header_of(shard)
    names = first_tensors(header)
    a, b = names[0], names[1]
    index = folder / "model.safetensors.index.json"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        return str(shard), [names[-1], "truncated"]
    if damage == "header-past-end":
        shard.write_bytes(struct.pack("<Q", 10_000_000) + shard.read_bytes()[8:])
        return str(shard), ["past the end"]
    if damage == "header-absurd":
        shard.write_bytes(struct.pack("<Q", 1 << 62) + shard.read_bytes()[8:])
        return str(shard), ["exceeds the format's limit"]
    if damage == "not-json":
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        shard.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])
        return str(shard), ["not valid JSON"]
    if damage == "not-utf8":
        raw = shard.read_bytes()
        shard.write_bytes(raw[:9] + b"\xff" + raw[10:])
        return str(shard), ["not valid UTF-8"]
    if damage == "duplicate-key":
        text = json.dumps(header)
        entry = json.dumps(header[a])
        dup = text[:-1] + f', "{a}": {entry}' + "}"
        with_header(shard, dup.encode(), body)
        return str(shard), [a, "duplicate"]
    if damage == "overlap":
        header[b]["data_offsets"] = [header[b]["data_offsets"][0] - 2, header[b]["data_offsets"][1] - 2]
        with_header(shard, header, body)
        return str(shard), [b, "overlaps"]
    if damage == "gap":
        begin, end = header[b]["data_offsets"]
        for name in names[1:]:
            header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
        with_header(shard, header, body[:begin] + b"\0" * 4 + body[begin:])
        return str(shard), [b, "gap"]
    if damage == "size-mismatch":
        header[a]["shape"] = [header[a]["shape"][0] + 1]
        with_header(shard, header, body)
        return str(shard), [a, "needs"]
    if damage == "unknown-dtype":
        header[a]["dtype"] = "BF17"
        with_header(shard, header, body)
        return str(shard), [a, "unknown dtype 'BF17'"]
    doc = json.loads(index.read_text())
    if damage == "index-unknown-tensor":
        doc["weight_map"]["model.layers.0.mlp.ghost.weight"] = SHARD
        index.write_text(json.dumps(doc))
        return str(index), ["model.layers.0.mlp.ghost.weight", "does not hold it"]
    if damage == "index-unknown-shard":
        doc["weight_map"][a] = "model-00009-of-00008.safetensors"
        index.write_text(json.dumps(doc))
        return str(index), [a, "model-00009-of-00008.safetensors", "does not exist"]
    if damage == "index-not-json":
        index.write_text("{ nope")
        return str(index), ["cannot read JSON"]
    raise AssertionError(damage)


DAMAGES = ["truncated", "header-past-end", "header-absurd", "not-json", "not-utf8", "duplicate-key", "overlap",
           "gap", "size-mismatch", "unknown-dtype", "index-unknown-tensor", "index-unknown-shard", "index-not-json"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_checkpoint_is_one_line_and_writes_nothing(tmp_path, model, damage: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    where, words = break_checkpoint(broken, damage)
    direction = tmp_path / "r.pth"
    save_direction(direction, HIDDEN)
    out = tmp_path / "out"
    with untouched(broken):
        for args in (["apply", str(broken), str(direction), "-o", str(out), "-q"],
                     ["apply", str(broken), str(direction), "-o", str(out), "--dry-run"]):
            line = one_error_line(cli(*args))
            assert line.startswith(f"orthopatch: error: {where}: "), line
            assert all(word in line for word in words), line
    assert not out.exists()
    if damage not in ("index-unknown-tensor", "index-unknown-shard", "index-not-json"):
        good = tmp_path / "good"  # as the source of a verify, the same damage is the same one line
        apply_out = tmp_path / "made"
        shutil.copytree(model, good)
        assert apply_cli(good, direction, apply_out).exit_code == 0
        line = one_error_line(cli("verify", apply_out, "--direction", direction, "--source", broken, "-q"))
        assert line.startswith(f"orthopatch: error: {where}: ")

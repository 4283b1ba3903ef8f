"""Two runs give the same bytes, and nothing the project does changes a byte of the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthopatch.io.formats import RECORD_NAME
from tests.helpers import (
    TINY,
    Converted,
    cli,
    cli_ok,
    comparable_files,
    folder_hashes,
    save_direction,
    tiny_llama,
    untouched,
)


@pytest.fixture(scope="module")
def source(converted: Converted) -> tuple[Path, Path]:
    return converted.model, converted.direction


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_runs_give_identical_bytes(tmp_path, dtype) -> None:
    model = tiny_llama(tmp_path / "model", dtype=dtype)
    direction = tmp_path / "r.pth"
    save_direction(direction, TINY.hidden)
    direction_bytes = direction.read_bytes()
    with untouched(model):
        for out in ("a", "b"):
            cli_ok("apply", str(model), str(direction), "-o", str(tmp_path / out), "-q")
    assert direction.read_bytes() == direction_bytes
    a, b = folder_hashes(tmp_path / "a"), folder_hashes(tmp_path / "b")
    shards = [name for name in a if name.endswith(".safetensors")]
    assert len(shards) == len(list(model.glob("*.safetensors")))
    assert {n: a[n] for n in shards} == {n: b[n] for n in shards}
    assert comparable_files(tmp_path / "a") == comparable_files(tmp_path / "b")
    record = json.loads((tmp_path / "a" / RECORD_NAME).read_text())
    assert record["fingerprint"] == json.loads((tmp_path / "b" / RECORD_NAME).read_text())["fingerprint"]


def test_no_command_touches_the_source(source, tmp_path) -> None:
    model, direction = source
    out = tmp_path / "out"
    with untouched(model, direction.parent):
        cli_ok("apply", str(model), str(direction), "-o", str(out), "--dry-run")
        cli_ok("apply", str(model), str(direction), "-o", str(out), "-q")
        cli_ok("apply", str(model), str(direction), "-o", str(out), "-q")  # already complete
        cli_ok("verify", str(out), "--direction", str(direction), "--source", str(model), "-q")
        cli_ok("verify", str(out), "--direction", str(direction), "-q")
        cli_ok("apply", str(model), str(direction), "-o", str(out), "-q", "--overwrite")
    assert (out / RECORD_NAME).exists()


def test_a_rerun_after_completion_changes_nothing(source, tmp_path) -> None:
    model, direction = source
    out = tmp_path / "out"
    cli_ok("apply", str(model), str(direction), "-o", str(out), "-q")
    first = folder_hashes(out)
    result = cli("apply", str(model), str(direction), "-o", str(out), "-q")
    assert result.exit_code == 0 and "already complete" in result.stdout
    assert folder_hashes(out) == first

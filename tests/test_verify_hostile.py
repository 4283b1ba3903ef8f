"""`orthopatch verify` on outputs it did not write: replayed patterns, records that claim what the
tensors do not show, non-finite values, and the recorded direction used when none is given."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orthopatch.io.formats import RECORD_NAME
from tests.helpers import Converted, cli, one_error_line, untouched

O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture
def made(converted: Converted, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the shared tiny model, its direction and its output."""
    model = Path(shutil.copytree(converted.model, tmp_path / "model"))
    out = Path(shutil.copytree(converted.out, tmp_path / "out"))
    direction = Path(shutil.copy(converted.direction, tmp_path / "r.pth"))
    record = json.loads((out / RECORD_NAME).read_text())
    record["direction"]["file"] = str(direction)
    (out / RECORD_NAME).write_text(json.dumps(record))
    return model, direction, out


def edit_record(out: Path, edit) -> None:
    record = json.loads((out / RECORD_NAME).read_text())
    edit(record)
    (out / RECORD_NAME).write_text(json.dumps(record))


def verify_args(out: Path, direction: Path | None, source: Path | None) -> list:
    args = ["verify", out, "-q"]
    args += ["--direction", direction] if direction is not None else []
    args += ["--source", source] if source is not None else []
    return args


def error_lines(result) -> list[str]:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.startswith("orthopatch: error: ")]


# --- patterns replayed from a record --------------------------------------------------------------

def test_a_catastrophic_pattern_in_a_record_is_refused_at_once(made) -> None:
    model, direction, out = made
    edit_record(out, lambda r: r["options"].update(targets=["(a+)+$:0"]))
    started = time.monotonic()
    with untouched(model, out):
        line = one_error_line(cli(*verify_args(out, direction, model)))
    assert time.monotonic() - started < 20
    assert "(a+)+$" in line and "repeat inside a repeat" in line


def test_a_slow_pattern_in_a_record_runs_under_a_clock(made, monkeypatch) -> None:
    from orthopatch.patch import plan

    model, direction, out = made
    monkeypatch.setattr(plan, "MATCH_SECONDS", 0.5)
    edit_record(out, lambda r: r["options"].update(targets=["model" + ".*" * 12 + "Z:0"]))
    line = one_error_line(cli(*verify_args(out, direction, None)))
    assert "took more than 0.5 s" in line


# --- records that claim what the tensors do not show ----------------------------------------------

def plain_copy(model: Path, out: Path) -> None:
    """Replace the output's shards by the source's own: a copy that still carries the record."""
    for shard in model.glob("*.safetensors"):
        shutil.copy(shard, out / shard.name)


def test_a_copy_recorded_as_scale_zero_fails(made) -> None:
    model, direction, out = made
    plain_copy(model, out)
    edit_record(out, lambda r: r["options"].update(scale=0.0))
    for source in (model, None):
        lines = error_lines(cli(*verify_args(out, direction, source)))
        assert any("scale 0" in line and "removes nothing" in line for line in lines), lines


def test_a_copy_recorded_as_abliterated_says_what_the_record_claims(made) -> None:
    model, direction, out = made
    plain_copy(model, out)
    lines = error_lines(cli(*verify_args(out, direction, model)))
    assert any("unchanged from the source" in line and "the record claims" in line and "scale 1" in line
               for line in lines), lines
    lines = error_lines(cli(*verify_args(out, direction, None)))
    assert any("the record claims" in line for line in lines), lines


# --- non-finite values ----------------------------------------------------------------------------

def poison(folder: Path, name: str, index: int, value: float) -> None:
    index_doc = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index_doc["weight_map"][name]
    tensors = load_file(shard)
    tensors[name].view(-1)[index] = value
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("with_source", [True, False])
def test_non_finite_output_values_fail(made, with_source) -> None:
    """The case a NaN in a source o_proj made: a whole NaN column in the output, and the source's NaN."""
    model, direction, out = made
    poison(model, O_PROJ, 3, float("nan"))
    index_doc = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index_doc["weight_map"][O_PROJ]
    tensors = load_file(shard)
    tensors[O_PROJ][:, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    lines = error_lines(cli(*verify_args(out, direction, model if with_source else None)))
    assert any(repr(O_PROJ) in line and "non-finite" in line for line in lines), lines


# --- the recorded direction -----------------------------------------------------------------------

def test_verify_uses_the_recorded_direction_when_it_is_unchanged(made) -> None:
    model, direction, out = made
    result = cli(*verify_args(out, None, model))
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout


@pytest.mark.parametrize("change, reason", [("moved", "no longer exists"), ("rewritten", "sha256 differs"),
                                            ("fifo", "is not a regular file")])
def test_a_changed_recorded_direction_asks_for_direction(made, change, reason) -> None:
    model, direction, out = made
    if change == "moved":
        direction.rename(direction.with_name("elsewhere.pth"))
    elif change == "rewritten":
        torch.save(torch.randn(64), direction)
    else:
        direction.unlink()
        os.mkfifo(direction)
    line = one_error_line(cli(*verify_args(out, None, model)))
    assert "--direction" in line and str(out / RECORD_NAME) in line and reason in line


def test_without_a_record_verify_asks_for_direction(made) -> None:
    model, _, out = made
    (out / RECORD_NAME).unlink()
    line = one_error_line(cli(*verify_args(out, None, model)))
    assert "--direction" in line

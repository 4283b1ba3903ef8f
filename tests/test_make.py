"""`make convert` (scripts/convert.mk): real make runs on two tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthopatch.io.formats import RECORD_NAME
from orthopatch.synthetic import write_checkpoint, write_direction
from tests.helpers import TINIEST

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

ROOT = Path(__file__).resolve().parents[1]
ORTHOPATCH = Path(sys.executable).parent / "orthopatch"


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def batch(tmp_path: Path) -> dict:
    models = [write_checkpoint(tmp_path / "models" / name, TINIEST, shard_bytes=16_000, seed=seed)
              for name, seed in (("alpha", 1), ("beta", 2))]
    direction = tmp_path / "refusal_dir.pth"
    r = write_direction(direction, TINIEST.hidden)
    return {"models": models, "direction": direction, "r": r, "out": tmp_path / "converted"}


def convert_args(batch: dict, *extra: str, models: list[Path] | None = None) -> list[str]:
    models = models if models is not None else batch["models"]
    return ["convert", f"MODELS={' '.join(str(m) for m in models)}", f"DIRECTION={batch['direction']}",
            f"OUT={batch['out']}", f"ORTHOPATCH={ORTHOPATCH}", "-j2", *extra]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def newer_than_inputs(batch: dict, name: str, model: Path) -> bool:
    target = (batch["out"] / name / RECORD_NAME).stat().st_mtime_ns
    inputs = [batch["direction"], batch["out"] / ".orthopatch-flags" / name, *model.glob("*.safetensors"),
              *model.glob("*.json")]
    return all(target >= p.stat().st_mtime_ns for p in inputs)


def check_output(batch: dict, model: Path, r: torch.Tensor, scale: float = 1.0) -> None:
    out = batch["out"] / model.name
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["options"]["scale"] == scale
    patched = {t["name"] for t in record["tensors_patched"]}
    assert "model.layers.1.mlp.down_proj.weight" in patched
    for shard in sorted(model.glob("*.safetensors")):
        src, dst = load_file(shard), load_file(out / shard.name)
        for name, tensor in src.items():
            if name not in patched:
                assert torch.equal(dst[name], tensor), name
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                left = r.to(torch.float64) @ dst[name].to(torch.float64)
                before = r.to(torch.float64) @ tensor.to(torch.float64)
                assert left.norm() / before.norm() == pytest.approx(1 - scale, abs=0.03), name


def test_convert_runs_once_and_again_when_inputs_change(batch):
    first = make(*convert_args(batch))
    assert first.stdout.count(f"{ORTHOPATCH} apply") == 2
    for model in batch["models"]:
        check_output(batch, model, batch["r"])
        assert newer_than_inputs(batch, model.name, model)
    assert "base_model: alpha" in (batch["out"] / "alpha" / "README.md").read_text()

    # Up to date: make -q agrees, and a second run touches nothing.
    assert make("-q", *convert_args(batch), check=False).returncode == 0
    before = mtimes(batch["out"])
    assert "Nothing to be done" in make(*convert_args(batch)).stdout
    assert mtimes(batch["out"]) == before

    # A touched direction file: both run again, and the targets end newer than their prerequisites.
    time.sleep(0.01)
    batch["direction"].touch()
    assert make("-q", *convert_args(batch), check=False).returncode == 1
    again = make(*convert_args(batch))
    assert again.stdout.count(f"{ORTHOPATCH} apply") == 2
    for model in batch["models"]:
        assert newer_than_inputs(batch, model.name, model)
    assert make("-q", *convert_args(batch), check=False).returncode == 0

    # Another direction: converted again with it.
    r2 = write_direction(batch["direction"], TINIEST.hidden, seed=7)
    make(*convert_args(batch))
    for model in batch["models"]:
        check_output(batch, model, r2)

    # Other options: converted again; the same options again: nothing to do.
    make(*convert_args(batch, "ORTHOPATCH_FLAGS=--scale 0.5"))
    for model in batch["models"]:
        check_output(batch, model, r2, scale=0.5)
        assert newer_than_inputs(batch, model.name, model)
    stamps = mtimes(batch["out"] / ".orthopatch-flags")
    assert make("-q", *convert_args(batch, "ORTHOPATCH_FLAGS=--scale 0.5"), check=False).returncode == 0
    assert "Nothing to be done" in make(*convert_args(batch, "ORTHOPATCH_FLAGS=--scale 0.5")).stdout
    assert mtimes(batch["out"] / ".orthopatch-flags") == stamps
    assert make("-q", *convert_args(batch), check=False).returncode == 1

    # One model changed on disk: only that one runs.
    time.sleep(0.01)
    (batch["models"][1] / "config.json").touch()
    only = make(*convert_args(batch, "ORTHOPATCH_FLAGS=--scale 0.5"))
    assert only.stdout.count(f"{ORTHOPATCH} apply") == 1 and "beta" in only.stdout


def test_failed_conversion_leaves_no_target(batch, tmp_path):
    broken = tmp_path / "models" / "broken"
    shutil.copytree(batch["models"][0], broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    models = [batch["models"][0], broken]
    result = make(*convert_args(batch, "-k", models=models), check=False)
    assert result.returncode != 0
    assert "orthopatch: error:" in result.stderr
    assert (batch["out"] / "alpha" / RECORD_NAME).exists()
    assert not (batch["out"] / "broken" / RECORD_NAME).exists()
    assert make("-q", *convert_args(batch, models=models), check=False).returncode == 1


def test_record_of_a_failed_command_is_deleted(batch, tmp_path):
    # A command that writes the target and then fails (as an interrupted one may): make deletes it.
    fake = tmp_path / "fake-orthopatch"
    fake.write_text('#!/bin/sh\nmkdir -p "$5" && echo "{}" > "$5/orthopatch.json"\nexit 1\n')
    fake.chmod(0o755)
    args = [a if not a.startswith("ORTHOPATCH=") else f"ORTHOPATCH={fake}" for a in convert_args(batch)]
    result = make(*args, "-k", check=False)
    assert result.returncode != 0 and "Deleting file" in result.stderr
    assert not list(batch["out"].glob(f"*/{RECORD_NAME}"))


def test_project_command_is_installed_only_when_not_given(batch, tmp_path):
    venv = tmp_path / "no-venv"
    default = make("-n", *[a for a in convert_args(batch) if not a.startswith("ORTHOPATCH=")], f"VENV={venv}")
    assert f"{venv}/bin/orthopatch apply" in default.stdout and "pip install" in default.stdout
    given = make("-n", *convert_args(batch), f"VENV={venv}")
    assert f"{ORTHOPATCH} apply" in given.stdout and "pip install" not in given.stdout


def test_usage_errors(batch):
    result = make("convert", f"DIRECTION={batch['direction']}", check=False)
    assert result.returncode != 0 and "set MODELS" in result.stderr
    twice = [batch["models"][0], batch["models"][0]]
    result = make(*convert_args(batch, models=twice), check=False)
    assert result.returncode != 0 and "same folder name" in result.stderr


def test_a_changed_torch_spec_installs_torch_again(tmp_path):
    """The torch spec is part of the install's stamp: the same spec installs nothing, another one installs."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(fake)

    def install(spec: str) -> list[str]:
        log.unlink(missing_ok=True)
        make("install", f"VENV={venv}", f"PYTHON={fake}", f"TORCH_SPEC={spec}")
        return log.read_text().splitlines() if log.exists() else []

    assert install("torch==2.13.0") == [f"-m venv {venv}", "-m pip install --quiet torch==2.13.0",
                                        "-m pip install --quiet -e .[test]"]
    assert install("torch==2.13.0") == []
    cpu = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert install(cpu) == [f"-m venv {venv}", f"-m pip install --quiet {cpu}", "-m pip install --quiet -e .[test]"]
    assert install(cpu) == []
    assert [p.name for p in venv.glob(".torch-*")] and len(list(venv.glob(".torch-*"))) == 1

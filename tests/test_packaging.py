"""The built wheel carries every file the package reads at run time: the architecture tables, the prompt
sets and the C quantizers' sources, not only the Python modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_every_data_file_of_the_package(tmp_path: Path) -> None:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the package's files cannot be listed")
    tracked = [name for name in listed.stdout.split() if (REPO / name).is_file()]
    data_files = {name for name in tracked if name.startswith("orthopatch/") and not name.endswith(".py")}
    assert any(name.endswith(".c") for name in data_files) and any(name.endswith(".json") for name in data_files)
    source = tmp_path / "source"  # the tracked files alone: no build folder left by an earlier build
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("orthopatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        missing = data_files - set(archive.namelist())
    assert not missing, f"not in the wheel: {sorted(missing)}"

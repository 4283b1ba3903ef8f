"""The benchmark scripts run end to end on a tiny checkpoint and report what they measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_bench_reports_every_way(tmp_path):
    out = tmp_path / "bench.json"
    run_script("bench.py", "--preset", "demo", "--layers", "2", "--shard-size", "2MB", "--skip-baseline",
               "--skip-kernel", "--in-place", "--repeats", "1", "--folder", str(tmp_path / "work"), "--clean",
               "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert row["shape"]["layers"] == 2 and 0 < row["patched_bytes"] < row["bytes"]
    ways = row["ways"]
    assert {"cp -r + sync", "orthopatch apply", "orthopatch apply --in-place"} <= set(ways), sorted(ways)
    assert any("floor" in name for name in ways), sorted(ways)
    for name, way in ways.items():
        assert way["median_s"] > 0 and len(way["all_s"]) == 1, name


def test_bench_measure_reports_bytes_read_and_memory(tmp_path):
    out = tmp_path / "measure.json"
    run_script("bench_measure.py", "--preset", "demo", "--layers", "2", "--prompts", "2", "--tokens", "4",
               "--workdir", str(tmp_path / "work"), "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert row["layers"] == 2
    assert 0 < row["bytes_read"] <= 1.1 * row["checkpoint_bytes"]
    assert row["peak_rss"] > 0


def test_bench_optimize_scale_reports_each_stage(tmp_path):
    pytest.importorskip("optuna")
    work = tmp_path / "work"
    for mode, extra in (("trials", []), ("search", ["--max-new-tokens", "1"])):
        out = tmp_path / f"{mode}.json"
        run_script("bench_optimize_scale.py", "--preset", "demo", "--layers", "2", "--mode", mode, "--trials", "1",
                   "--limit", "4", *extra, "--folder", str(work), "--json", str(out))
        row = json.loads(out.read_text())
        (trial,) = row["trials"]
        assert 0 < trial["bytes_read"] <= row["checkpoint_bytes"] and trial["seconds"] > 0, row
        assert row["measuring"]["bytes_read"] > 0 and row["peak_rss"] > 0
        if mode == "trials":
            assert row["warm_trial"]["bytes_read"] == trial["bytes_read"] and row["peak_blocks"] == 1
        else:
            assert row["trials_run"] == 1 and row["confirmation"]["bytes_read"] > trial["bytes_read"]


def test_bench_gguf_reports_every_way_and_the_quantizers(tmp_path):
    out = tmp_path / "bench-gguf.json"
    run_script("bench_gguf.py", "--preset", "tiny", "--layers", "2", "--repeats", "1", "--quant-types", "Q8_0",
               "Q4_K", "--quant-rows", "4", "--quant-repeats", "1", "--folder", str(tmp_path / "work"), "--clean",
               "--json", str(out))
    result = json.loads(out.read_text())
    assert [m["mix"] for m in result["models"]] == ["Q8_0", "Q4_K_M"]
    for model in result["models"]:
        assert 0 < model["patched_bytes"] < model["bytes"]
        assert set(model["ways"]) == {"cp + sync", "orthopatch apply", "patched bytes only (floor)"}
        for name, way in model["ways"].items():
            assert way["median_s"] > 0 and len(way["all_s"]) == 1 and way["peak_rss_MiB"] > 0, name
    assert [(r["type"], r["threads"]) for r in result["quantizers"]] == [("Q8_0", 1), ("Q8_0", 2), ("Q4_K", 1),
                                                                          ("Q4_K", 2)]
    for row in result["quantizers"]:
        assert row["ours"]["median_MBps"] > 0
        assert row["same_bytes"] in (True, None), row
    assert not list((tmp_path / "work").glob("llama-h*"))

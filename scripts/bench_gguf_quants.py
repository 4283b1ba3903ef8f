"""Throughput of orthopatch's GGUF quantizers next to llama.cpp's ``ggml_quantize_chunk`` (single thread,
no importance matrix) on the same float32 tensor, and whether their bytes agree.

    python scripts/bench_gguf_quants.py --rows 4096 --cols 4096 [--json out.json]

MB/s counts megabytes (10**6) of float32 input per second; the best of ``--repeats`` runs is kept.
llama.cpp's column is left empty when llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orthopatch.gguf.quants import PATCHABLE_TYPES, quantize  # noqa: E402
from tests.llama_ref import library_path, reference_quantize  # noqa: E402


def best_seconds(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    values = (rng.standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    have_reference = library_path() is not None
    results = []
    print(f"{'type':6} {'ours MB/s':>10} {'llama.cpp MB/s':>15} {'same blocks':>12}")
    for qtype in sorted(PATCHABLE_TYPES, key=lambda qtype: qtype.value):
        ours_s, ours = best_seconds(lambda qtype=qtype: quantize(values, qtype), args.repeats)
        row = {"type": qtype.name, "ours_mb_s": values.nbytes / ours_s / 1e6, "llama_mb_s": None, "same": None}
        if have_reference:
            theirs_s, theirs = best_seconds(lambda qtype=qtype: reference_quantize(values, qtype), args.repeats)
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
            same = (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1).mean()
            row.update(llama_mb_s=values.nbytes / theirs_s / 1e6, same=float(same))
        results.append(row)
        llama = f"{row['llama_mb_s']:15.1f}" if have_reference else f"{'-':>15}"
        same = f"{100 * row['same']:11.3f}%" if have_reference else f"{'-':>12}"
        print(f"{qtype.name:6} {row['ours_mb_s']:10.1f} {llama} {same}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Throughput of orthopatch's GGUF quantizers next to llama.cpp's ``ggml_quantize_chunk`` on the same float32
tensor, with the same number of threads, and whether their bytes agree.

    python scripts/bench_gguf_quants.py --rows 4096 --cols 4096 [--threads 2] [--types Q4_K Q6_K] [--imatrix]
        [--json out.json]

With ``--imatrix`` both get the same fixed importance matrix (gamma-distributed weights, seeded), so
the weighted quantizers of ``llama-quantize --imatrix`` run, and only the types that read one are listed.

MB/s counts megabytes (10**6) of float32 input per second, the median of ``--repeats`` runs, the
quantizers alternating; "ours/llama" is the median of the per-repeat ratios, ± half their range over it.
"ours" is what ``quantize`` runs by default: the C quantizers where they build
(the first line says which); "numpy" is the same call with ``ORTHOPATCH_NATIVE=0`` (``--no-numpy`` skips it).
With ``--threads N`` each cuts the rows in N parts quantized at once: orthopatch
through ``quantize(..., workers=N)``, llama.cpp on N Python threads (ctypes releases the GIL), as
``llama-quantize`` hands chunks of rows to its threads. llama.cpp's column is left empty when
llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orthopatch.gguf import native  # noqa: E402
from orthopatch.gguf.quants import IMATRIX_TYPES, PATCHABLE_TYPES, quantize  # noqa: E402
from tests.llama_ref import library_path, reference_quantize  # noqa: E402


def best_seconds(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def threaded_reference(values: np.ndarray, qtype: gguf.GGMLQuantizationType, threads: int,
                       imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``values``, its rows cut in ``threads`` parts quantized on as many threads."""
    bounds = np.linspace(0, len(values), min(threads, len(values)) + 1).astype(int)
    parts: list[np.ndarray] = [np.empty(0)] * (len(bounds) - 1)

    def run(i: int) -> None:
        parts[i] = reference_quantize(values[bounds[i] : bounds[i + 1]], qtype, imatrix)

    helpers = [threading.Thread(target=run, args=(i,)) for i in range(1, len(parts))]
    for helper in helpers:
        helper.start()
    run(0)
    for helper in helpers:
        helper.join()
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads for each quantizer [1]")
    parser.add_argument("--types", nargs="+", help="type names to run [all patchable types]")
    parser.add_argument("--imatrix", action="store_true",
                        help="quantize with a fixed random importance matrix (the types that read one)")
    parser.add_argument("--no-numpy", action="store_true", help="skip the numpy quantizers' column")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reason = native.unavailable_reason()
    print(f"ours: {'the C quantizers' if reason is None else f'the numpy quantizers ({reason})'}; "
          f"{args.threads} thread(s); [{args.rows}, {args.cols}] float32"
          f"{'; with an importance matrix' if args.imatrix else ''}")
    with_numpy = reason is None and not args.no_numpy

    rng = np.random.default_rng(0)
    values = (rng.standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    imatrix = np.random.default_rng(1).gamma(1.0, 1.0, args.cols).astype(np.float32) if args.imatrix else None
    have_reference = library_path() is not None
    results = []
    print(f"{'type':6} {'ours MB/s':>10} {'numpy MB/s':>11} {'llama.cpp MB/s':>15} {'ours/llama':>12} "
          f"{'same blocks':>12}")
    types = sorted(IMATRIX_TYPES if args.imatrix else PATCHABLE_TYPES, key=lambda qtype: qtype.value)
    if args.types:
        types = [qtype for qtype in types if qtype.name in set(args.types)]
    for qtype in types:
        ours_s, numpy_s, theirs_s = [], [], []
        run_ours = partial(quantize, values, qtype, imatrix, workers=args.threads)
        run_theirs = partial(threaded_reference, values, qtype, args.threads, imatrix)
        for _ in range(args.repeats):  # the quantizers alternate: each repeat is one run of each
            seconds, ours = best_seconds(run_ours, 1)
            ours_s.append(seconds)
            if with_numpy:
                os.environ[native.DISABLE_VARIABLE] = "0"
                seconds, by_numpy = best_seconds(run_ours, 1)
                del os.environ[native.DISABLE_VARIABLE]
                numpy_s.append(seconds)
                if not np.array_equal(by_numpy, ours):
                    raise SystemExit(f"{qtype.name}: the C and numpy quantizers wrote different bytes")
            if have_reference:
                seconds, theirs = best_seconds(run_theirs, 1)
                theirs_s.append(seconds)
        rate = lambda seconds: values.nbytes / float(np.median(seconds)) / 1e6  # noqa: E731
        row = {"type": qtype.name, "threads": args.threads, "repeats": args.repeats, "ours_mb_s": rate(ours_s),
               "numpy_mb_s": rate(numpy_s) if with_numpy else None, "llama_mb_s": None, "ratio": None,
               "ratio_spread": None, "same": None, "backend": "c" if reason is None else "numpy",
               "imatrix": args.imatrix}
        if have_reference:
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
            same = (ours.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1).mean()
            ratios = np.array(theirs_s) / np.array(ours_s)  # per pair: ours' speed over llama.cpp's
            ratio = float(np.median(ratios))
            row.update(llama_mb_s=rate(theirs_s), same=float(same), ratio=ratio,
                       ratio_spread=float((ratios.max() - ratios.min()) / 2 / ratio))
        results.append(row)
        llama = f"{row['llama_mb_s']:15.1f}" if have_reference else f"{'-':>15}"
        ratio = f"{row['ratio']:7.2f} ±{100 * row['ratio_spread']:2.0f}%" if have_reference else f"{'-':>12}"
        same = f"{100 * row['same']:11.3f}%" if have_reference else f"{'-':>12}"
        by_numpy = f"{row['numpy_mb_s']:11.1f}" if with_numpy else f"{'-':>11}"
        print(f"{qtype.name:6} {row['ours_mb_s']:10.1f} {by_numpy} {llama} {ratio} {same}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

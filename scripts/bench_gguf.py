"""Benchmark ``orthopatch apply`` on a quantized GGUF against ``cp`` + ``sync`` and the patched-bytes floor,
and orthopatch's requantization against llama.cpp's ``ggml_quantize_chunk`` at the same thread count.

    python scripts/bench_gguf.py                            # 1 layer of Llama-3-70B shapes, Q8_0 and Q4_K_M
    python scripts/bench_gguf.py --layers 4 --folder /mnt/xfs/bench-gguf

The GGUF is synthetic but valid: for each (type, row width) a small random float matrix is quantized
once and its blocks are tiled over the tensor, so every block has real scales and a 70B-shaped file
is written at the disk's speed. ``Q4_K_M`` follows llama.cpp's mix for that file type (Q4_K, Q6_K for
``output`` and for ``ffn_down``/``attn_v`` of the layers ``use_more_bits`` picks, Q5_K for a 70B's
other ``attn_v``). The ways run as in ``scripts/bench.py``: alternating, previous output deleted and
page cache dropped before every run, each a child whose peak RSS (``os.wait4``) and bytes written
are reported, new blocks from ``statvfs``. The requantization part times orthopatch's ``quantize``
and llama.cpp's quantizer (through llama-cpp-python; llama-quantize runs ``ggml_quantize_chunk`` on
chunks of rows from each of its threads, as done here from Python threads, which ctypes lets run
at once) on one ``[rows, intermediate]`` float32 slice per type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402  (scripts/bench.py: page cache, timed children, spread)

from orthopatch.gguf.quants import quantize  # noqa: E402
from orthopatch.synthetic import write_direction  # noqa: E402
from tests.llama_ref import _quantize_chunk  # noqa: E402

Q = gguf.GGMLQuantizationType
PATCHED = ("token_embd.weight", ".attn_output.weight", ".ffn_down.weight")


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    layers: int


PRESETS = {"70b": Shape(8192, 28672, 128256, 64, 8, 1), "tiny": Shape(256, 768, 512, 4, 2, 1)}


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the ``_M`` mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_types(shape: Shape, mix: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """``(name, torch-order shape, type)`` of every tensor, in llama.cpp's order, for ``mix`` (Q8_0 or Q4_K_M)."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    base = Q.Q8_0 if mix == "Q8_0" else Q.Q4_K

    def more(layer: int, fallback: Q) -> Q:
        return Q.Q6_K if mix == "Q4_K_M" and use_more_bits(layer, shape.layers) else fallback

    big = shape.hidden == 8192 and shape.kv_heads * 8 == shape.heads  # llama.cpp's LLM_TYPE_70B rule for attn_v
    out = [("token_embd.weight", (shape.vocab, h), base)]
    for i in range(shape.layers):
        p = f"blk.{i}."
        attn_v = more(i, Q.Q5_K if big and base == Q.Q4_K else base)
        out += [(p + "attn_norm.weight", (h,), Q.F32), (p + "attn_q.weight", (h, h), base),
                (p + "attn_k.weight", (kv, h), base), (p + "attn_v.weight", (kv, h), attn_v),
                (p + "attn_output.weight", (h, h), base), (p + "ffn_norm.weight", (h,), Q.F32),
                (p + "ffn_gate.weight", (shape.intermediate, h), base),
                (p + "ffn_up.weight", (shape.intermediate, h), base),
                (p + "ffn_down.weight", (h, shape.intermediate), more(i, base))]
    out += [("output_norm.weight", (h,), Q.F32), ("output.weight", (shape.vocab, h), Q.Q6_K if mix != "Q8_0" else base)]
    return out


def write_model(path: Path, shape: Shape, mix: str, tile_rows: int = 32) -> None:
    """A GGUF of ``shape`` in ``mix`` whose quantized tensors tile one small quantized random matrix each."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(shape.layers)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_context_length(8192)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_vocab_size(shape.vocab)
    tensors = tensor_types(shape, mix)
    for name, dims, qtype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims)) // block * size
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    rng, tiles = np.random.default_rng(0), {}
    for _name, dims, qtype in tensors:
        writer.write_padding(fout, fout.tell())
        if qtype == Q.F32:
            fout.write(np.ones(dims, np.float32).tobytes())
            continue
        if (qtype, dims[-1]) not in tiles:
            x = (rng.standard_t(5, (tile_rows, dims[-1])) * 0.02).astype(np.float32)
            tiles[qtype, dims[-1]] = quantize(x, qtype)
        tile = tiles[qtype, dims[-1]]
        rows = int(np.prod(dims[:-1]))
        chunk = np.tile(tile, (max(1, (32 << 20) // tile.nbytes), 1)).tobytes()
        chunk_rows = len(chunk) // tile[0].nbytes
        for _ in range(rows // chunk_rows):
            fout.write(chunk)
        fout.write(chunk[: rows % chunk_rows * tile[0].nbytes])
    writer.close()


def prepare(folder: Path, shape: Shape, mix: str) -> tuple[Path, Path]:
    """The model and direction (reused when an earlier run left them complete)."""
    name = f"llama-h{shape.hidden}-l{shape.layers}-v{shape.vocab}-{mix}"
    src, direction, stamp = folder / f"{name}.gguf", folder / f"{name}.pth", folder / f"{name}.done"
    if not stamp.exists():
        started = time.perf_counter()
        write_model(src, shape, mix)
        write_direction(direction, shape.hidden)
        os.sync()
        print(f"generated {src.name}: {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s",
              flush=True)
        stamp.touch()
    return src, direction


def patched_ranges(src: Path) -> list[list[int]]:
    """Byte ranges of the tensors ``apply`` patches."""
    reader = gguf.GGUFReader(src)
    return [[int(t.data_offset), int(t.data_offset) + int(t.n_bytes)] for t in reader.tensors
            if t.name == PATCHED[0] or t.name.endswith(PATCHED[1:])]


def ways(src: Path, direction: Path, out: Path, plan: Path) -> dict[str, bench.Way]:
    target = out / src.name
    return {
        "cp + sync": bench.Way(["sh", "-c", 'cp "$0" "$1" && sync', str(src), str(target)], setup=["mkdir", str(out)]),
        "orthopatch apply": bench.Way([*bench.orthopatch_command(), "apply", str(src), str(direction), "-o",
                                       str(target), "-q"], setup=["mkdir", str(out)], warm=bench.WARM),
        "patched bytes only (floor)": bench.Way([sys.executable, "-c", bench.FLOOR, str(plan), str(out)]),
    }


def bench_model(args: argparse.Namespace, shape: Shape, mix: str) -> dict:
    src, direction = prepare(args.folder, shape, mix)
    out, plan = args.folder / "out", args.folder / "floor-plan.json"
    ranges = patched_ranges(src)
    plan.write_text(json.dumps([{"path": str(src), "size": src.stat().st_size, "ranges": ranges}]))
    todo = ways(src, direction, out, plan)
    runs: dict[str, list[bench.Run]] = {k: [] for k in todo}
    loads = []
    for repeat in range(args.repeats):
        for name, way in todo.items():
            loads.append(os.getloadavg()[0])
            run = bench.run_way(way, src, out)
            runs[name].append(run)
            print(f"  [{repeat + 1}/{args.repeats}] {mix} {name:27} {run.seconds:7.2f} s  peak RSS "
                  f"{run.max_rss / 2**20:5.0f} MiB  written {run.written / 1e9:5.2f} GB  new blocks "
                  f"{run.new_blocks / 1e9:5.2f} GB  (load {loads[-1]:.1f})", flush=True)
    bench.remove(out)
    plan.unlink()
    cp = statistics.median(r.seconds for r in runs["cp + sync"])
    floor = statistics.median(r.seconds for r in runs["patched bytes only (floor)"])
    result = {"mix": mix, "shape": dataclasses.asdict(shape), "folder": str(args.folder),
              "bytes": src.stat().st_size, "patched_bytes": sum(e - b for b, e in ranges),
              "load_average_before_runs": [round(x, 1) for x in loads], "ways": {}}
    for name, rs in runs.items():
        seconds = [r.seconds for r in rs]
        median = statistics.median(seconds)
        result["ways"][name] = {
            "median_s": median, "spread": bench.spread(seconds), "all_s": [round(x, 2) for x in seconds],
            "ratio_to_cp": median / cp, "ratio_to_floor": median / floor,
            "peak_rss_MiB": max(r.max_rss for r in rs) / 2**20,
            "written_GB": statistics.median(r.written for r in rs) / 1e9,
            "new_blocks_GB": statistics.median(r.new_blocks for r in rs) / 1e9,
            "allocated_GB": statistics.median(r.allocated for r in rs) / 1e9,
        }
    return result


# -- requantization throughput -------------------------------------------------------------------------

def llama_quantize(values: np.ndarray, qtype: Q, threads: int) -> np.ndarray:
    """llama.cpp's bytes for ``values``, its rows split into ``threads`` parts quantized at once."""
    function = _quantize_chunk()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, width = values.shape
    out = np.empty((rows, width // block * size), np.uint8)
    bounds = np.linspace(0, rows, threads + 1).astype(int)

    def part(first: int, last: int) -> None:
        function(int(qtype), values[first:last].ctypes.data, out[first:last].ctypes.data, 0, last - first, width,
                 None)

    helpers = [threading.Thread(target=part, args=(bounds[i], bounds[i + 1])) for i in range(1, threads)]
    for t in helpers:
        t.start()
    part(bounds[0], bounds[1])
    for t in helpers:
        t.join()
    return out


def ours_quantize(values: np.ndarray, qtype: Q, threads: int) -> np.ndarray:
    return quantize(values, qtype, workers=threads)


def bench_quantizers(args: argparse.Namespace, width: int) -> list[dict]:
    """MB/s of float32 in, per type and thread count, ours and llama.cpp's alternating; medians and spread."""
    rng = np.random.default_rng(1)
    values = (rng.standard_t(5, (args.quant_rows, width)) * 0.02).astype(np.float32)
    have_llama = _quantize_chunk() is not None
    results = []
    for name in args.quant_types:
        qtype = Q[name]
        for threads in args.threads:
            ways = {"ours": ours_quantize, **({"llama.cpp": llama_quantize} if have_llama else {})}
            seconds: dict[str, list[float]] = {k: [] for k in ways}
            outputs = {}
            for _ in range(args.quant_repeats):
                for k, fn in ways.items():
                    started = time.perf_counter()
                    outputs[k] = fn(values, qtype, threads)
                    seconds[k].append(time.perf_counter() - started)
            row = {"type": name, "threads": threads, "shape": list(values.shape),
                   "same_bytes": bool(np.array_equal(outputs["ours"], outputs["llama.cpp"])) if have_llama else None}
            for k, s in seconds.items():
                row[k] = {"median_MBps": values.nbytes / statistics.median(s) / 1e6, "spread": bench.spread(s),
                          "all_MBps": [round(values.nbytes / x / 1e6, 1) for x in s]}
            if have_llama:
                row["ratio"] = row["ours"]["median_MBps"] / row["llama.cpp"]["median_MBps"]
            print(f"  requantize {name:5} {threads} thread(s): ours {row['ours']['median_MBps']:7.1f} MB/s "
                  f"±{row['ours']['spread'] * 100:.0f}%" + (f", llama.cpp {row['llama.cpp']['median_MBps']:7.1f} "
                  f"MB/s ±{row['llama.cpp']['spread'] * 100:.0f}%, ratio {row['ratio']:.2f}, same bytes "
                  f"{row['same_bytes']}" if have_llama else ""), flush=True)
            results.append(row)
    return results


def report(result: dict) -> str:
    lines = [f"\n{result['mix']}, {result['shape']['layers']} layer(s): {result['bytes'] / 1e9:.2f} GB, "
             f"{result['patched_bytes'] / 1e9:.2f} GB patched, in {result['folder']}; load average before runs "
             f"{min(result['load_average_before_runs']):.1f}..{max(result['load_average_before_runs']):.1f}"]
    for way, w in result["ways"].items():
        lines.append(f"  {way:27} median {w['median_s']:7.2f} s ±{w['spread'] * 100:3.0f}%  "
                     f"({w['ratio_to_cp']:.2f} x cp, {w['ratio_to_floor']:.2f} x floor)  written "
                     f"{w['written_GB']:5.2f} GB  new blocks {w['new_blocks_GB']:5.2f} GB  allocated "
                     f"{w['allocated_GB']:5.2f} GB  peak RSS {w['peak_rss_MiB']:5.0f} MiB  runs {w['all_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="70b", help="tensor shapes [70b]")
    parser.add_argument("--layers", type=int, default=1, help="blocks in the model [1]")
    parser.add_argument("--mixes", nargs="+", choices=("Q8_0", "Q4_K_M"), default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each way [3]")
    parser.add_argument("--folder", type=Path, default=ROOT / "bench-data" / "gguf",
                        help="where the models are made and every way writes [bench-data/gguf/]")
    parser.add_argument("--skip-apply", action="store_true", help="only time the quantizers")
    parser.add_argument("--quant-types", nargs="*", default=["Q8_0", "Q4_K", "Q6_K"], help="[Q8_0 Q4_K Q6_K]")
    parser.add_argument("--quant-rows", type=int, default=1024,
                        help="rows of the [rows, intermediate] float32 slice the quantizers are timed on [1024]")
    parser.add_argument("--quant-repeats", type=int, default=3, help="alternating runs per type [3]")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts [1 2]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="delete the generated models at the end")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    shape = dataclasses.replace(PRESETS[args.preset], layers=args.layers)
    print(f"{os.cpu_count()} CPUs, numpy {np.__version__}, folder {args.folder}, shapes {shape}", flush=True)
    results: dict = {"models": [], "quantizers": []}
    if args.quant_types:
        results["quantizers"] = bench_quantizers(args, shape.intermediate)
    if not args.skip_apply:
        for mix in args.mixes:
            results["models"].append(bench_model(args, shape, mix))
            print(report(results["models"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\n== summary ==")
    for row in results["quantizers"]:
        theirs = f"  llama.cpp {row['llama.cpp']['median_MBps']:7.1f} MB/s ±{row['llama.cpp']['spread'] * 100:.0f}% " \
                 f"ratio {row['ratio']:.2f}" if "ratio" in row else ""
        print(f"requantize {row['type']:5} {row['threads']} thread(s): ours {row['ours']['median_MBps']:7.1f} MB/s "
              f"±{row['ours']['spread'] * 100:.0f}%{theirs}")
    for result in results["models"]:
        print(report(result))
    if args.clean:
        for p in args.folder.glob("llama-h*"):
            p.unlink()


if __name__ == "__main__":
    main()

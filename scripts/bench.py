"""Benchmark ``orthopatch apply`` against ``cp -r`` + ``sync`` and a whole-shard load/patch/save.

    .venv/bin/python scripts/bench.py --preset 70b --layers 1 2 --repeats 3

For each size it writes a synthetic checkpoint (Llama-3 tensor shapes, any number of layers), then
runs the three ways of producing a converted copy side by side, alternating, with the source evicted
from the page cache and the previous output deleted before every run. Each run is a child process
whose peak RSS comes from ``os.wait4`` in a small launcher. It also measures the disk's sequential read rate (reading an
evicted shard) and the projection kernel alone, in memory, on the model's tensor shapes, with one
worker thread and with the worker count ``apply`` uses. ``--kernel-workers 1 2`` runs ``apply`` once
per count (``ORTHOPATCH_KERNEL_WORKERS``), alternating, for an A/B of the kernel's threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from orthopatch.formats import INDEX_NAME
from orthopatch.kernel import WORKERS_ENV
from orthopatch.projection import unit_direction
from orthopatch.stream import TensorPatcher
from orthopatch.synthetic import LLAMA3_8B, LLAMA3_70B, LlamaShape, write_checkpoint, write_direction

PRESETS = {"70b": LLAMA3_70B, "8b": LLAMA3_8B}
ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- page cache -------------------------------------------------------------------------------------

def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (dirty pages are written first)."""
    os.sync()
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.exists():
        evict(path)
        shutil.rmtree(path)
    os.sync()


def disk_read_rate(file: Path, chunk: int = 16 << 20) -> float:
    """Bytes per second reading ``file`` sequentially after evicting it."""
    evict(file)
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        started, offset = time.perf_counter(), 0
        while n := os.preadv(fd, [view], offset):
            offset += n
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    evict(file)
    return offset / seconds


# -- timed child processes --------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    seconds: float
    max_rss: int  # bytes


#: A small process that runs its arguments and prints their peak RSS: a child forked from this
#: (large) Python process would start with its RSS already counted in ``ru_maxrss``.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` to completion; wall time and its peak RSS (``ru_maxrss``, descendants included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return Run(seconds, int(proc.stderr.split()[-1]) * 1024)


def orthopatch_command() -> list[str]:
    script = Path(sys.executable).parent / "orthopatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orthopatch"]


def apply_way(workers: int | None) -> str:
    return "orthopatch apply" if workers is None else f"orthopatch apply, {workers} kernel worker(s)"


def way_commands(src: Path, direction: Path, out: Path, device: str,
                 kernel_workers: list[int] | None = None) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """``{way: (argv, environment or None)}``; one ``apply`` per entry of ``kernel_workers``."""
    ways: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "cp -r + sync": (["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(out)], None)}
    apply = [*orthopatch_command(), "apply", str(src), str(direction), "-o", str(out), "-q", "--device", device]
    for workers in kernel_workers or [None]:
        ways[apply_way(workers)] = (apply, None if workers is None else {**os.environ, WORKERS_ENV: str(workers)})
    ways["load/patch/save"] = ([sys.executable, __file__, "_whole_shard", str(src), str(direction), str(out)], None)
    return ways


# -- the whole-shard baseline (run as a child) -------------------------------------------------------

def whole_shard_baseline(src: Path, direction: Path, out: Path) -> None:
    """Load each shard whole, patch embed_tokens/o_proj/down_proj in fp32, ``save_file``, fsync."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    r = torch.load(direction, map_location="cpu").to(torch.float32).flatten()
    u = r / r.norm()
    index = json.loads((src / INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        for name, w in tensors.items():
            if name.endswith("embed_tokens.weight"):
                w32 = w.float()
                tensors[name] = (w32 - torch.outer(w32 @ u, u)).to(w.dtype)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                w32 = w.float()
                tensors[name] = (w32 - torch.outer(u, u @ w32)).to(w.dtype)
        save_file(tensors, out / shard, metadata={"format": "pt"})
        del tensors
        fd = os.open(out / shard, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for other in files_under(src):
        if other.suffix != ".safetensors":
            shutil.copy(other, out / other.name)
    os.sync()


# -- the kernel alone ---------------------------------------------------------------------------------

def kernel_rates(shape: LlamaShape, device: str, workers: int, repeats: int = 3) -> dict[str, float]:
    """Bytes per second of the projection alone, in memory, per kind of patched tensor: the patcher's
    chunks and passes on ``workers`` kernel threads, as ``apply`` computes, without its I/O."""
    gen = torch.Generator().manual_seed(0)
    h = shape.hidden
    u = unit_direction(torch.randn(h, generator=gen, dtype=torch.float64))
    cases = {
        "embedding rows [16384, h]": (torch.randn(16384, h, generator=gen), 1),
        "o_proj [h, h]": (torch.randn(h, h, generator=gen), 0),
        "down_proj [h, intermediate]": (torch.randn(h, shape.intermediate, generator=gen), 0),
    }
    rates = {}
    for label, (w, axis) in cases.items():
        w = w.to(torch.bfloat16).to(device)
        patcher = TensorPatcher(w.device, workers=workers)
        best = float("inf")
        for _ in range(repeats):
            if w.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            patcher.compute_only_(w, u, axis)
            if w.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        rates[label] = w.numel() * w.element_size() / best
        del w
    return rates


def patched_mix(shape: LlamaShape) -> dict[str, int]:
    """Bytes of each kind of patched tensor in ``shape`` (bf16)."""
    h = shape.hidden
    return {"embedding rows [16384, h]": 2 * shape.vocab * h, "o_proj [h, h]": 2 * shape.layers * h * h,
            "down_proj [h, intermediate]": 2 * shape.layers * h * shape.intermediate}


# -- main ---------------------------------------------------------------------------------------------

def prepare(workdir: Path, shape: LlamaShape, shard_bytes: int) -> tuple[Path, Path]:
    """The checkpoint and direction for ``shape`` (reused when an earlier run left them complete)."""
    name = f"llama-h{shape.hidden}-l{shape.layers}-s{shard_bytes}"
    src, direction, stamp = workdir / name, workdir / f"{name}.pth", workdir / f"{name}.done"
    if not stamp.exists():
        shutil.rmtree(src, ignore_errors=True)
        started = time.perf_counter()
        write_checkpoint(src, shape, shard_bytes=shard_bytes)
        write_direction(direction, shape.hidden)
        os.sync()
        size = sum(f.stat().st_size for f in files_under(src))
        print(f"generated {src.name}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s", flush=True)
        stamp.touch()
    return src, direction


def bench_size(args: argparse.Namespace, shape: LlamaShape) -> dict:
    src, direction = prepare(args.workdir, shape, args.shard_size)
    size = sum(f.stat().st_size for f in files_under(src))
    shards = sorted(src.glob("*.safetensors"))
    out = args.workdir / "out"
    ways = way_commands(src, direction, out, args.device, args.kernel_workers)
    if args.skip_baseline:
        ways.pop("load/patch/save")
    runs: dict[str, list[Run]] = {k: [] for k in ways}
    reads, loads = [], []
    for repeat in range(args.repeats):
        reads.append(disk_read_rate(max(shards, key=lambda p: p.stat().st_size)))
        for way, (argv, env) in ways.items():
            remove(out)
            evict(src)
            load = os.getloadavg()[0]
            run = timed(argv, env)
            runs[way].append(run)
            loads.append(load)
            print(f"  [{repeat + 1}/{args.repeats}] {way:{max(map(len, ways))}} {run.seconds:6.2f} s  "
                  f"peak RSS {run.max_rss / 2**20:7.0f} MiB  (load average before: {load:.1f})", flush=True)
    remove(out)
    # The kernel as apply runs it (its patcher's worker count), and on one worker for comparison.
    apply_workers = TensorPatcher(args.device).kernel.workers
    counts = sorted({1, apply_workers, *(args.kernel_workers or [])})
    rates = {n: kernel_rates(shape, args.device, n) for n in counts}
    mix = patched_mix(shape)
    mix_rates = {n: sum(mix.values()) / sum(mix[k] / r[k] for k in mix) for n, r in rates.items()}
    cp = statistics.median(r.seconds for r in runs["cp -r + sync"])
    return {
        "shape": dataclasses.asdict(shape), "bytes": size, "shards": len(shards),
        "patched_bytes": sum(mix.values()),
        "disk_read_GBps": statistics.median(reads) / 1e9,
        "disk_read_all_GBps": [round(r / 1e9, 2) for r in reads],
        "load_average_before_runs": [round(x, 1) for x in loads],
        "ways": {way: {"median_s": statistics.median(r.seconds for r in rs),
                       "all_s": [round(r.seconds, 2) for r in rs],
                       "ratio_to_cp": statistics.median(r.seconds for r in rs) / cp,
                       "peak_rss_MiB": max(r.max_rss for r in rs) / 2**20} for way, rs in runs.items()},
        "apply_kernel_workers": apply_workers,
        "kernel_GBps": {str(n): {k: v / 1e9 for k, v in r.items()} for n, r in rates.items()},
        "kernel_mix_GBps": {str(n): v / 1e9 for n, v in mix_rates.items()},
    }


def report(result: dict) -> str:
    shape = result["shape"]
    lines = [f"\n{shape['layers']} layer(s), hidden {shape['hidden']}: {result['bytes'] / 1e9:.2f} GB in "
             f"{result['shards']} shards, {result['patched_bytes'] / 1e9:.2f} GB patched"]
    width = max(map(len, result["ways"]))
    for way, w in result["ways"].items():
        lines.append(f"  {way:{width}} median {w['median_s']:6.2f} s  ({w['ratio_to_cp']:.2f} x cp)  "
                     f"peak RSS {w['peak_rss_MiB']:7.0f} MiB  runs {w['all_s']}")
    disk = result["disk_read_GBps"]
    lines.append(f"  disk sequential read {disk:.2f} GB/s (runs {result['disk_read_all_GBps']}); "
                 f"load average before runs {min(result['load_average_before_runs']):.1f}"
                 f"..{max(result['load_average_before_runs']):.1f}")
    for n, rates in result["kernel_GBps"].items():
        used = " (as apply runs it)" if int(n) == result["apply_kernel_workers"] else ""
        lines.append(f"  kernel alone, {n} worker(s){used}:")
        for k, v in rates.items():
            lines.append(f"    {k:32s} {v:5.2f} GB/s ({v / disk:.1f} x disk)")
        mix = result["kernel_mix_GBps"][n]
        lines.append(f"    {'this model patched mix':32s} {mix:5.2f} GB/s ({mix / disk:.1f} x disk)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_whole_shard"]:
        whole_shard_baseline(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="70b", help="tensor shapes [70b]")
    parser.add_argument("--layers", type=int, nargs="+", default=[1], help="model sizes to run [1]")
    parser.add_argument("--shard-size", type=parse_size, default=2 * GIB, help="shard size, e.g. 2G [2G]")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each way [3]")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-data", help="[bench-data/]")
    parser.add_argument("--device", default="cpu", help="device for orthopatch and the kernel [cpu]")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run load/patch/save")
    parser.add_argument("--kernel-workers", type=int, nargs="+", metavar="N",
                        help="run apply once per kernel worker count (A/B) [apply's default only]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="delete the generated checkpoints at the end")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM, "
          f"torch {torch.__version__}, device {args.device}, workdir {args.workdir}", flush=True)
    results = []
    for layers in args.layers:
        shape = dataclasses.replace(PRESETS[args.preset], layers=layers)
        print(f"\n== {args.preset} shapes, {layers} layer(s) ==", flush=True)
        results.append(bench_size(args, shape))
        print(report(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\n== summary ==")
    for result in results:
        print(report(result))
    if args.clean:
        for layers in args.layers:
            for p in args.workdir.glob(f"llama-h*-l{layers}-*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    main()

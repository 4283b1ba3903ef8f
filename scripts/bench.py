"""Benchmark ``orthopatch apply`` against ``cp -r`` + ``sync``, the patched-bytes floor and a whole-shard load.

    .venv/bin/python scripts/bench.py                          # 4 layers of Llama-3-70B: 11 GB, 5 GB shards
    .venv/bin/python scripts/bench.py --folder /mnt/xfs/bench  # the same on another filesystem

It writes a synthetic checkpoint (Llama-3 tensor shapes, any number of layers) laid out as
transformers' ``save_pretrained`` writes real ones: split into shards of ``--shard-size`` in module
order, each shard's tensors sorted by name, so several layers share a shard and the unchanged runs
between patched tensors start at arbitrary offsets. Then it runs the ways of producing a converted
copy side by side, alternating, with the previous output deleted and the page cache dropped before
every run (``/proc/sys/vm/drop_caches`` as root, otherwise every file evicted with
``posix_fadvise``). Each run is a child process of a small launcher that reports its peak RSS
(``os.wait4``) and the bytes it wrote to storage (``write_bytes`` of ``/proc/self/io``, children
included); the new blocks on the output's filesystem come from ``statvfs`` before and after
(exact only when nothing else writes to that filesystem), and the output's allocated size from
``st_blocks`` (which also counts blocks shared with the source).

The ways: ``cp -r`` + ``sync``; ``orthopatch apply``; the patched-bytes floor (read the patched
tensors' bytes and write them to new files, nothing else: what a conversion that writes only what
changes cannot beat); ``--in-place`` adds ``orthopatch apply --in-place`` on a fresh copy of the
source (made before the timer starts); the whole-shard baseline unless ``--skip-baseline``. It also
measures the disk's sequential read rate and the projection kernel alone, in memory, on the model's
tensor shapes. ``--kernel-workers 1 2`` runs ``apply`` once per kernel worker count, alternating.
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

from orthopatch.io.formats import INDEX_NAME
from orthopatch.patch.kernel import WORKERS_ENV
from orthopatch.patch.projection import unit_direction
from orthopatch.patch.stream import TensorPatcher
from orthopatch.synthetic import DEMO, LLAMA3_8B, LLAMA3_70B, ORDERS, LlamaShape, write_checkpoint, write_direction

PRESETS = {"70b": LLAMA3_70B, "8b": LLAMA3_8B, "demo": DEMO}
ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def parse_size(text: str) -> int:
    """``5GB`` is 5·10⁹ bytes (as transformers reads ``max_shard_size``); ``5G`` and ``5GiB`` are 5·2³⁰."""
    text = text.strip().upper()
    decimal = text.endswith("B") and not text.endswith("IB")
    text = text.removesuffix("B").removesuffix("I")
    units = {"K": 1, "M": 2, "G": 3, "T": 4}
    if text and text[-1] in units:
        return int(float(text[:-1]) * (1000 if decimal else 1024) ** units[text[-1]])
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


def drop_caches(*paths: Path) -> str:
    """Empty the page cache before a run: all of it as root, otherwise ``paths``' pages."""
    os.sync()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for path in paths:
        evict(path)
    return "fadvise"


def remove(path: Path) -> None:
    if path.exists():
        evict(path)
        shutil.rmtree(path)
    os.sync()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def allocated_bytes(path: Path) -> int:
    """``st_blocks`` of every file under ``path``: blocks shared with another file count here too."""
    return sum(p.stat().st_blocks * 512 for p in files_under(path)) if path.exists() else 0


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
    written: int  # bytes the process tree wrote to storage (-1: unknown)
    new_blocks: int = 0  # bytes of free space the run used on the output's filesystem
    allocated: int = 0  # st_blocks of the output, shared blocks included


#: A small process that runs its arguments and prints their peak RSS and the bytes they wrote to
#: storage: a child forked from this (large) Python process would start with its RSS already counted
#: in ``ru_maxrss``. A reaped child's I/O counts are added to its parent's ``/proc/self/io``.
LAUNCHER = """import os, sys
def written():
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None
before = written()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
after = written()
print(usage.ru_maxrss, -1 if before is None or after is None else after - before, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` to completion; wall time, peak RSS (``ru_maxrss``, descendants included), bytes written."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    rss, written = proc.stderr.split()[-2:]
    return Run(seconds, int(rss) * 1024, int(written))


#: The patched-bytes floor, run as a child: read each patched tensor's bytes and write them at the
#: same offset of a new (sparse) file per shard, then fsync; no projection, nothing else read or
#: written. Reading and writing overlap (a reader thread fills a ring of 8 MiB buffers) and written
#: ranges are handed to writeback at once, as ``apply`` does.
FLOOR = """import json, os, queue, sys, threading
plan, out = json.load(open(sys.argv[1])), sys.argv[2]
os.mkdir(out)
CHUNK, RING = 8 << 20, 4
free, full = queue.Queue(), queue.Queue()
for _ in range(RING):
    free.put(memoryview(bytearray(CHUNK)))
def read_all():
    for shard in plan:
        src = os.open(shard["path"], os.O_RDONLY)
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for begin, end in shard["ranges"]:
            while begin < end:
                buf = free.get()
                n = os.preadv(src, [buf[:min(CHUNK, end - begin)]], begin)
                full.put((shard["path"], begin, buf, n))
                begin += n
        os.close(src)
    full.put(None)
threading.Thread(target=read_all, daemon=True).start()
files = {}
for shard in plan:
    fd = os.open(os.path.join(out, os.path.basename(shard["path"])), os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, shard["size"])
    files[shard["path"]] = fd
while (item := full.get()) is not None:
    path, offset, buf, n = item
    done = 0
    while done < n:
        done += os.pwrite(files[path], buf[done:n], offset + done)
    os.posix_fadvise(files[path], offset, n, os.POSIX_FADV_DONTNEED)
    free.put(buf)
for fd in files.values():
    os.fsync(fd)
    os.close(fd)
"""


def floor_ranges(src: Path, direction: Path) -> list[dict]:
    """Per shard of ``src``: its path, size and the byte ranges of the tensors ``apply`` patches."""
    from orthopatch.patch.apply import ApplyOptions, prepare

    plan, _ = prepare(ApplyOptions(model=src, direction=direction))
    return [{"path": str(src / shard.name), "size": shard.header.file_size,
             "ranges": [[t.entry.begin, t.entry.end] for t in shard.targets]} for shard in plan.shards]


def orthopatch_command() -> list[str]:
    script = Path(sys.executable).parent / "orthopatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orthopatch"]


def apply_way(workers: int | None) -> str:
    return "orthopatch apply" if workers is None else f"orthopatch apply, {workers} kernel worker(s)"


@dataclasses.dataclass
class Way:
    """A way of producing the converted folder ``out``; ``setup`` runs before the timer starts."""

    argv: list[str]
    env: dict[str, str] | None = None
    setup: list[str] | None = None
    #: Run after the page cache is dropped, before the timer: loads the program's own files (torch's
    #: libraries) back into the cache, so that the run reads its data cold but starts like a second run.
    warm: list[str] | None = None


WARM = [sys.executable, "-c", "import orthopatch.cli, orthopatch.patch.apply"]


def way_commands(src: Path, direction: Path, out: Path, device: str, kernel_workers: list[int] | None = None,
                 floor_plan: Path | None = None, in_place: bool = False) -> dict[str, Way]:
    """``{name: way}``; one ``apply`` per entry of ``kernel_workers``."""
    ways = {"cp -r + sync": Way(["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(out)])}
    apply = [*orthopatch_command(), "apply", str(src), str(direction), "-o", str(out), "-q", "--device", device]
    for workers in kernel_workers or [None]:
        env = None if workers is None else {**os.environ, WORKERS_ENV: str(workers)}
        ways[apply_way(workers)] = Way(apply, env, warm=WARM)
    if in_place:
        ways["orthopatch apply --in-place"] = Way(
            [*orthopatch_command(), "apply", str(out), str(direction), "--in-place", "-q", "--device", device],
            setup=["cp", "-r", "--reflink=never", str(src), str(out)], warm=WARM)
    if floor_plan is not None:
        ways["patched bytes only (floor)"] = Way([sys.executable, "-c", FLOOR, str(floor_plan), str(out)])
    ways["load/patch/save"] = Way([sys.executable, __file__, "_whole_shard", str(src), str(direction), str(out)])
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

def prepare(folder: Path, shape: LlamaShape, shard_bytes: int, order: str) -> tuple[Path, Path]:
    """The checkpoint and direction for ``shape`` (reused when an earlier run left them complete)."""
    name = f"llama-h{shape.hidden}-l{shape.layers}-s{shard_bytes}-{order}"
    src, direction, stamp = folder / name, folder / f"{name}.pth", folder / f"{name}.done"
    if not stamp.exists():
        shutil.rmtree(src, ignore_errors=True)
        started = time.perf_counter()
        write_checkpoint(src, shape, shard_bytes=shard_bytes, order=order)
        write_direction(direction, shape.hidden)
        os.sync()
        size = sum(f.stat().st_size for f in files_under(src))
        print(f"generated {src.name}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s", flush=True)
        stamp.touch()
    return src, direction


def run_way(way: Way, src: Path, out: Path, warm: bool = True) -> Run:
    """One timed run of ``way`` into ``out``: previous output deleted, setup done, caches dropped."""
    remove(out)
    if way.setup is not None:
        subprocess.run(way.setup, check=True)
    drop_caches(src, out)
    if way.warm is not None and warm:
        subprocess.run(way.warm, check=True)
    before = free_bytes(out.parent)
    run = timed(way.argv, way.env)
    os.sync()
    run.new_blocks = before - free_bytes(out.parent)
    run.allocated = allocated_bytes(out)
    return run


def spread(values: list[float]) -> float:
    """Half the range around the median, relative to it: 0.05 means ±5 %."""
    return (max(values) - min(values)) / 2 / statistics.median(values) if values else 0.0


def bench_size(args: argparse.Namespace, shape: LlamaShape) -> dict:
    src, direction = prepare(args.folder, shape, args.shard_size, args.order)
    size = sum(f.stat().st_size for f in files_under(src))
    shards = sorted(src.glob("*.safetensors"))
    out = args.folder / "out"
    floor = floor_ranges(src, direction)
    floor_plan = args.folder / "floor-plan.json"
    floor_plan.write_text(json.dumps(floor))
    patched = sum(e - b for shard in floor for b, e in shard["ranges"])
    ways = way_commands(src, direction, out, args.device, args.kernel_workers, floor_plan, args.in_place)
    if args.skip_baseline:
        ways.pop("load/patch/save")
    runs: dict[str, list[Run]] = {k: [] for k in ways}
    reads, loads = [], []
    width = max(map(len, ways))
    for repeat in range(args.repeats):
        reads.append(disk_read_rate(max(shards, key=lambda p: p.stat().st_size)))
        for name, way in ways.items():
            load = os.getloadavg()[0]
            run = run_way(way, src, out, warm=not args.cold_start)
            runs[name].append(run)
            loads.append(load)
            print(f"  [{repeat + 1}/{args.repeats}] {name:{width}} {run.seconds:6.2f} s  "
                  f"peak RSS {run.max_rss / 2**20:6.0f} MiB  written {run.written / 1e9:6.2f} GB  "
                  f"new blocks {run.new_blocks / 1e9:6.2f} GB  (load average before: {load:.1f})", flush=True)
    remove(out)
    floor_plan.unlink()
    result = {
        "shape": dataclasses.asdict(shape), "order": args.order, "folder": str(args.folder),
        "bytes": size, "shards": len(shards), "patched_bytes": patched,
        "cache_drop": "drop_caches" if os.geteuid() == 0 else "fadvise",
        "cold_start": args.cold_start,
        "disk_read_GBps": statistics.median(reads) / 1e9,
        "disk_read_all_GBps": [round(r / 1e9, 2) for r in reads],
        "load_average_before_runs": [round(x, 1) for x in loads],
        "ways": {}, "kernel_GBps": {}, "kernel_mix_GBps": {},
    }
    cp = statistics.median(r.seconds for r in runs["cp -r + sync"])
    floor_s = statistics.median(r.seconds for r in runs["patched bytes only (floor)"])
    for name, rs in runs.items():
        seconds = [r.seconds for r in rs]
        median = statistics.median(seconds)
        result["ways"][name] = {
            "median_s": median, "spread": spread(seconds), "all_s": [round(x, 2) for x in seconds],
            "ratio_to_cp": median / cp, "ratio_to_floor": median / floor_s,
            "peak_rss_MiB": max(r.max_rss for r in rs) / 2**20,
            "written_GB": statistics.median(r.written for r in rs) / 1e9,
            "new_blocks_GB": statistics.median(r.new_blocks for r in rs) / 1e9,
            "allocated_GB": statistics.median(r.allocated for r in rs) / 1e9,
        }
    if not args.skip_kernel:
        # The kernel as apply runs it (its patcher's worker count), and on one worker for comparison.
        apply_workers = TensorPatcher(args.device).kernel.workers
        counts = sorted({1, apply_workers, *(args.kernel_workers or [])})
        rates = {n: kernel_rates(shape, args.device, n) for n in counts}
        mix = patched_mix(shape)
        result["apply_kernel_workers"] = apply_workers
        result["kernel_GBps"] = {str(n): {k: v / 1e9 for k, v in r.items()} for n, r in rates.items()}
        result["kernel_mix_GBps"] = {str(n): sum(mix.values()) / sum(mix[k] / r[k] for k in mix) / 1e9
                                     for n, r in rates.items()}
    return result


def report(result: dict) -> str:
    shape = result["shape"]
    lines = [f"\n{shape['layers']} layer(s), hidden {shape['hidden']}, {result['order']} order: "
             f"{result['bytes'] / 1e9:.2f} GB in {result['shards']} shards, {result['patched_bytes'] / 1e9:.2f} GB "
             f"patched; in {result['folder']}; caches dropped by {result['cache_drop']}"
             f"{', apply started cold' if result.get('cold_start') else ''}"]
    width = max(map(len, result["ways"]))
    for way, w in result["ways"].items():
        lines.append(f"  {way:{width}} median {w['median_s']:6.2f} s ±{w['spread'] * 100:3.0f}%  "
                     f"({w['ratio_to_cp']:.2f} x cp, {w['ratio_to_floor']:.2f} x floor)  "
                     f"written {w['written_GB']:5.2f} GB  new blocks {w['new_blocks_GB']:5.2f} GB  "
                     f"allocated {w['allocated_GB']:5.2f} GB  peak RSS {w['peak_rss_MiB']:5.0f} MiB  "
                     f"runs {w['all_s']}")
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
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="model sizes to run [4: 11 GB]")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest shard, as save_pretrained's max_shard_size: 5GB is 5e9 bytes, 2G 2 GiB [5GB]")
    parser.add_argument("--order", choices=ORDERS, default="save_pretrained",
                        help="tensor order in a shard: as save_pretrained writes it, or module order [save_pretrained]")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each way [5]")
    parser.add_argument("--folder", "--workdir", dest="folder", type=Path, default=ROOT / "bench-data",
                        help="where the checkpoint is made and every way writes its output [bench-data/]")
    parser.add_argument("--device", default="cpu", help="device for orthopatch and the kernel [cpu]")
    parser.add_argument("--in-place", action="store_true",
                        help="also run apply --in-place on a copy of the source (made before the timer starts)")
    parser.add_argument("--cold-start", action="store_true",
                        help="time apply's start-up from an empty page cache too (by default its program files "
                             "are read back before the timer starts; the data always starts cold)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run load/patch/save")
    parser.add_argument("--skip-kernel", action="store_true", help="do not time the kernel alone")
    parser.add_argument("--kernel-workers", type=int, nargs="+", metavar="N",
                        help="run apply once per kernel worker count (A/B) [apply's default only]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="delete the generated checkpoints at the end")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM, "
          f"torch {torch.__version__}, device {args.device}, folder {args.folder}", flush=True)
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
            for p in args.folder.glob(f"llama-h*-l{layers}-*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    main()

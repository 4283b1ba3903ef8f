"""Benchmark ``orthopatch measure`` out of core: peak RSS and bytes read against the checkpoint's size.

    .venv/bin/python scripts/bench_measure.py --preset 70b --layers 4 8

For each size it writes (or reuses) the synthetic Llama-shaped checkpoint ``scripts/bench.py``
uses, which has no tokenizer, so the prompts are random token ids (``--prompts`` of each kind,
``--tokens`` long). Each measurement runs in a child process with the source evicted from the page
cache; its peak RSS comes from ``os.wait4``, the bytes read from the record ``measure`` writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import GIB, ORDERS, PRESETS, ROOT, evict, parse_size, prepare, timed

from orthopatch.synthetic import LlamaShape

CHILD = """import json, sys, torch
from pathlib import Path
from orthopatch.run.layerwise import RunSettings
from orthopatch.run.measure import MeasureOptions, measure
src, out, prompts, tokens, vocab, device, dtype = sys.argv[1:8]
g = torch.Generator().manual_seed(0)
ids = [torch.randint(int(vocab), (int(tokens),), generator=g).tolist() for _ in range(2 * int(prompts))]
measure(MeasureOptions(model=Path(src), out=Path(out), token_ids=(ids[:int(prompts)], ids[int(prompts):]),
                       run=RunSettings(device, dtype), quiet=True))
"""


def bench_size(args: argparse.Namespace, shape: LlamaShape) -> dict:
    src, _ = prepare(args.workdir, shape, args.shard_size, args.order)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out = args.workdir / "measured.pth"
    evict(src)
    run = timed([sys.executable, "-c", CHILD, str(src), str(out), str(args.prompts), str(args.tokens),
                 str(shape.vocab), args.device, args.dtype])
    record = json.loads(out.with_suffix(".json").read_text())
    return {"layers": shape.layers, "checkpoint_bytes": size, "bytes_read": record["bytes_read"],
            "read_ratio": record["bytes_read"] / size, "peak_rss": run.max_rss, "seconds": run.seconds,
            "prompts": 2 * args.prompts, "tokens": args.tokens, "device": args.device, "dtype": args.dtype}


def report(row: dict) -> str:
    return (f"{row['layers']} layers, {row['checkpoint_bytes'] / 1e9:.2f} GB: read {row['bytes_read'] / 1e9:.2f} GB "
            f"({row['read_ratio']:.3f} x the checkpoint), peak RSS {row['peak_rss'] / GIB:.2f} GiB, "
            f"{row['seconds']:.1f} s ({row['prompts']} prompts x {row['tokens']} tokens, {row['device']}, "
            f"{row['dtype']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="70b", help="tensor shapes [70b]")
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="model sizes to run [4]")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="shard size [5GB]")
    parser.add_argument("--order", choices=ORDERS, default="save_pretrained",
                        help="tensor order in the shards, as scripts/bench.py [save_pretrained]")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of each kind [32]")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per prompt [32]")
    parser.add_argument("--device", default="cpu", help="[cpu]")
    parser.add_argument("--dtype", default="float32", help="arithmetic dtype of the blocks [float32]")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-data", help="[bench-data/]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        shape = PRESETS[args.preset]
        shape = LlamaShape(shape.hidden, shape.intermediate, shape.vocab, layers, shape.heads, shape.kv_heads)
        rows.append(bench_size(args, shape))
        print(report(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

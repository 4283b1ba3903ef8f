"""Measure ``orthopatch optimize`` at scale: bytes read, peak RSS and seconds per trial, and a whole search.

    .venv/bin/python scripts/bench_optimize_scale.py --preset 70b --layers 4 --trials 2
    .venv/bin/python scripts/bench_optimize_scale.py --preset 135m

Both write (or reuse) a synthetic Llama-shaped checkpoint (``scripts/bench.py``'s folder and
names) and a word-level tokenizer with a chat template built locally (:mod:`orthopatch.synthetic`:
the built-in prompts' words, ids far below either vocabulary), and run in a child process whose
peak RSS comes from ``os.wait4``; the page cache is dropped before the child starts.

``--preset 70b`` (Llama-3-70B shapes, ``--layers`` blocks): optimize's own measuring pass
(``--limit`` measurement prompts of each kind, the 48 judged prompts) and ``--trials`` trials of its
trial runner with points from its sampler, the page cache dropped before each trial, so each reads
from the disk; then the last point once more with the checkpoint in the page cache (compute without
the disk). Per stage: seconds and bytes read (the reader's count).

``--preset 135m`` (SmolLM-135M shapes, tied embeddings): the whole ``optimize`` with its defaults
(``--trials`` 100, every built-in measurement prompt), timed per stage: the measuring pass, each
trial, the greedy confirmation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from bench import GIB, ROOT, disk_read_rate, drop_caches, parse_size, prepare, timed

from orthopatch.synthetic import DEMO, LLAMA3_70B, ORDERS, SMOLLM_135M, LlamaShape, vocabulary, write_tokenizer

PRESETS = {"70b": LLAMA3_70B, "135m": SMOLLM_135M, "demo": DEMO}
#: What each preset measures by default: trials of the runner, or the whole search.
MODES = {"70b": "trials", "135m": "search", "demo": "search"}


def costs_json(costs: list) -> list[dict]:
    return [{"seconds": round(c.seconds, 3), "bytes_read": c.bytes_read, "cpu_seconds": round(c.cpu_seconds, 3)}
            for c in costs]


# -- the children ---------------------------------------------------------------------------------------

def child_trials(src: Path, tokenizer: Path, record: Path, trials: int, limit: int | None, device: str, dtype: str,
                 batch_size: int, warm: bool) -> None:
    """The measuring pass and ``trials`` trials of optimize's runner (cold), then (``warm``) the last point
    again with the checkpoint in the page cache."""
    from bench import drop_caches

    from orthopatch.run.chat import load_tokenizer
    from orthopatch.run.layerwise import LayerwiseModel, RunSettings
    from orthopatch.run.optimize import OptimizeOptions, load_inputs, measuring_pass, open_study, require_optuna
    from orthopatch.run.prompts import PromptChoice
    from orthopatch.run.search import suggest

    optuna = require_optuna()
    run = RunSettings(device, dtype, batch_size, tokenizer)
    options = OptimizeOptions(model=src, out=record.with_suffix(".safetensors"), choice=PromptChoice(limit=limit),
                              trials=trials, run=run, quiet=True)
    started = time.monotonic()
    tok = load_tokenizer(tokenizer)
    with LayerwiseModel(src, device=run.torch_device(), dtype=run.torch_dtype(), logits=True) as model:
        inputs = load_inputs(options, tok, model)
        study = open_study(optuna, options, {"model": "", "model_name": src.name, "search": ""})
        setup = time.monotonic() - started
        measured = measuring_pass(model, tok, inputs, options)
        points = []
        for _ in range(trials):
            drop_caches(src)
            trial = study.ask()
            points.append(suggest(trial, model.num_layers))
            figures = measured.runner.run(points[-1], measured.directions)
            study.tell(trial, (figures.refusal, figures.kl_mean))
        if warm:
            measured.runner.run(points[-1], measured.directions)  # the checkpoint now in the page cache
        costs = measured.runner.costs
        record.write_text(json.dumps({
            "setup_seconds": round(setup, 3), "measuring": costs_json([measured.cost])[0],
            "trials": costs_json(costs[:trials]), **({"warm_trial": costs_json(costs[trials:])[0]} if warm else {}),
            "prompts": {k: len(v) for k, v in inputs.ids.items()},
            "judged_tokens": sum(map(len, inputs.ids["judged"] + inputs.ids["judged_harmless"])),
            "measure_tokens": sum(map(len, inputs.ids["harmful"] + inputs.ids["harmless"])),
            "peak_blocks": model.stats.peak_blocks,
        }))


def child_search(src: Path, tokenizer: Path, record: Path, trials: int, device: str, dtype: str,
                 batch_size: int, max_new_tokens: int) -> None:
    """The whole ``optimize``, its defaults but ``trials`` (and the reply length), with its cost per stage."""
    from orthopatch.run.layerwise import RunSettings
    from orthopatch.run.optimize import OptimizeOptions, optimize

    study = record.with_suffix(".study.log")
    study.unlink(missing_ok=True)
    progress = record.with_suffix(".log").open("w")

    def log(message: str) -> None:  # optimize's stage lines, with the time, in a file beside the record
        print(f"{time.strftime('%H:%M:%S')} {message}", file=progress, flush=True)

    result = optimize(OptimizeOptions(model=src, out=record.with_suffix(".safetensors"), trials=trials, study=study,
                                      run=RunSettings(device, dtype, batch_size, tokenizer), quiet=True,
                                      max_new_tokens=max_new_tokens, overwrite=True), log)
    costs = result.costs
    record.write_text(json.dumps({
        "seconds": result.seconds, "measuring": costs_json([costs.measuring])[0], "trials": costs_json(costs.trials),
        "confirmation": costs_json([costs.confirmation])[0], "trials_run": result.trials_run,
        "chosen": result.chosen.number, "confirmed": result.confirmed, "source_refusals": result.source_refusals,
    }))


# -- the parent -----------------------------------------------------------------------------------------

def prepare_model(args: argparse.Namespace, shape: LlamaShape) -> tuple[Path, Path, int]:
    """The checkpoint (reused when complete), the tokenizer's folder, and the shards' size in bytes."""
    if len(vocabulary()) > shape.vocab:
        raise SystemExit(f"bench: the tokenizer's {len(vocabulary())} words do not fit a vocabulary of {shape.vocab}")
    need = sum(2 * math.prod(s) for _, s in shape.tensors())  # bf16
    st = os.statvfs(args.folder)
    if not any(args.folder.glob(f"llama-h{shape.hidden}-l{shape.layers}-*.done")) and \
            need > st.f_bavail * st.f_frsize:
        raise SystemExit(f"bench: the checkpoint needs {need / 1e9:.1f} GB; {args.folder} has less free")
    src, _ = prepare(args.folder, shape, args.shard_size, args.order)
    tokenizer = args.folder / "tokenizer-words"
    if not (tokenizer / "tokenizer.json").exists():
        write_tokenizer(tokenizer)
    return src, tokenizer, sum(f.stat().st_size for f in src.glob("*.safetensors"))


def child(mode: str, *argv: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), mode, *argv]


def bench_trials(args: argparse.Namespace, shape: LlamaShape) -> dict:
    src, tokenizer, size = prepare_model(args, shape)
    shards = sorted(src.glob("*.safetensors"))
    disk = disk_read_rate(max(shards, key=lambda p: p.stat().st_size))
    record = args.folder / "optimize-trials.json"
    cache = drop_caches(src)
    load = os.getloadavg()
    run = timed(child("_trials", str(src), str(tokenizer), str(record), str(args.trials), str(args.limit),
                      args.device, args.dtype, str(args.batch_size), "" if args.skip_warm else "warm"))
    row = json.loads(record.read_text())
    block = sum(2 * s[0] * s[1] for n, s in shape.tensors() if n.startswith("model.layers.0.") and len(s) == 2)
    head = 2 * shape.vocab * shape.hidden
    row.update({"preset": args.preset, "layers": shape.layers, "checkpoint_bytes": size, "block_bytes_bf16": block,
                "head_bytes_bf16": head, "peak_rss": run.max_rss, "wall_seconds": round(run.seconds, 1),
                "disk_read_GBps": round(disk / 1e9, 3), "cache_drop": cache, "device": args.device,
                "dtype": args.dtype, "load_average_before": [round(x, 2) for x in load],
                "load_average_after": [round(x, 2) for x in os.getloadavg()]})
    return row


def bench_search(args: argparse.Namespace, shape: LlamaShape) -> dict:
    src, tokenizer, size = prepare_model(args, shape)
    record = args.folder / "optimize-search.json"
    cache = drop_caches(src)
    load = os.getloadavg()
    run = timed(child("_search", str(src), str(tokenizer), str(record), str(args.trials), args.device, args.dtype,
                      str(args.batch_size), str(args.max_new_tokens)))
    row = json.loads(record.read_text())
    row.update({"preset": args.preset, "layers": shape.layers, "checkpoint_bytes": size, "peak_rss": run.max_rss,
                "wall_seconds": round(run.seconds, 1), "cache_drop": cache, "device": args.device,
                "dtype": args.dtype, "load_average_before": [round(x, 2) for x in load],
                "load_average_after": [round(x, 2) for x in os.getloadavg()]})
    return row


def report(row: dict) -> str:
    size = row["checkpoint_bytes"]
    trials = row["trials"]
    per_trial = [t["seconds"] for t in trials]
    read = [t["bytes_read"] for t in trials]
    lines = [f"{row['preset']} shapes, {row['layers']} layers, {size / 1e9:.2f} GB ({row['device']}, {row['dtype']}; "
             f"caches dropped by {row['cache_drop']}; load average before {row['load_average_before']}, "
             f"after {row['load_average_after']})",
             f"  measuring pass {row['measuring']['seconds']:.1f} s ({row['measuring']['cpu_seconds']:.1f} CPU s), "
             f"read {row['measuring']['bytes_read'] / 1e9:.2f} GB",
             f"  {len(trials)} trials: median {statistics.median(per_trial):.2f} s (min {min(per_trial):.2f}, "
             f"max {max(per_trial):.2f}, total {sum(per_trial):.1f} s; median "
             f"{statistics.median(t['cpu_seconds'] for t in trials):.1f} CPU s); read per trial "
             f"{max(read) / 1e9:.2f} GB ({max(read) / size:.3f} x the checkpoint)"]
    if "warm_trial" in row:
        warm = row["warm_trial"]
        lines.append(f"  the last point again, checkpoint in the page cache: {warm['seconds']:.1f} s "
                     f"({warm['cpu_seconds']:.1f} CPU s) (read {warm['bytes_read'] / 1e9:.2f} GB)")
    if "disk_read_GBps" in row:
        lines.append(f"  disk sequential read {row['disk_read_GBps']:.2f} GB/s")
        lines.append(f"  prompts {row['prompts']}, judged tokens {row['judged_tokens']}, "
                     f"measurement tokens {row['measure_tokens']}, blocks held at once {row['peak_blocks']}")
    if "confirmation" in row:
        lines.append(f"  confirmation {row['confirmation']['seconds']:.1f} s "
                     f"({row['confirmation']['cpu_seconds']:.1f} CPU s); whole optimize {row['seconds']:.1f} s "
                     f"({row['seconds'] / 60:.1f} min); chosen trial {row['chosen']}, greedy refusals "
                     f"{row['confirmed']} (source {row['source_refusals']})")
    lines.append(f"  peak RSS {row['peak_rss'] / GIB:.2f} GiB; child wall {row['wall_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_trials"]:
        src, tok, record, trials, limit, device, dtype, batch, warm = argv[1:10]
        child_trials(Path(src), Path(tok), Path(record), int(trials), None if limit == "None" else int(limit),
                     device, dtype, int(batch), warm == "warm")
        return
    if argv[:1] == ["_search"]:
        src, tok, record, trials, device, dtype, batch, new = argv[1:9]
        child_search(Path(src), Path(tok), Path(record), int(trials), device, dtype, int(batch), int(new))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="70b", help="tensor shapes [70b]")
    parser.add_argument("--layers", type=int, help="blocks [70b: 4; otherwise the preset's]")
    parser.add_argument("--mode", choices=("trials", "search"),
                        help="trials of the runner, or the whole optimize [70b: trials; otherwise search]")
    parser.add_argument("--trials", type=int, help="trials [trials: 2; search: optimize's default, 100]")
    parser.add_argument("--limit", type=int, default=32,
                        help="trials: measurement prompts of each kind in the measuring pass [32]")
    parser.add_argument("--skip-warm", action="store_true",
                        help="trials: do not run the last point again with the checkpoint in the page cache")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="search: greedy reply length of the confirmation, as optimize's default [32]")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="shard size [5GB]")
    parser.add_argument("--order", choices=ORDERS, default="save_pretrained", help="as scripts/bench.py")
    parser.add_argument("--device", default="cpu", help="[cpu]")
    parser.add_argument("--dtype", default="float32", help="arithmetic dtype of the blocks [float32]")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch, as optimize's default [16]")
    parser.add_argument("--folder", type=Path, default=ROOT / "bench-data", help="[bench-data/]")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from orthopatch.run.optimize import DEFAULT_TRIALS

    args.folder.mkdir(parents=True, exist_ok=True)
    base = PRESETS[args.preset]
    shape = dataclasses.replace(base, layers=args.layers or (4 if base is LLAMA3_70B else base.layers))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}, folder {args.folder}", flush=True)
    if (args.mode or MODES[args.preset]) == "trials":
        args.trials = args.trials or 2
        row = bench_trials(args, shape)
    else:
        args.trials = args.trials or DEFAULT_TRIALS
        row = bench_search(args, shape)
    print(report(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()

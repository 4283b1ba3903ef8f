"""Benchmark ``orthopatch optimize`` against ``measure`` + ``apply`` on a small model that really refuses.

    .venv/bin/python scripts/bench_optimize.py refuser [--trials 100] [--workdir .cache/bench-optimize]

Part ``refuser``: the fixture of ``scripts/refuser.py`` (built, or taken from its cache), then
(a) ``measure`` with its defaults, ``apply``, ``evaluate`` against the source; (b) ``optimize`` with
``--trials``, ``apply`` of its file, the same ``evaluate``. Every step is the CLI in a child process,
timed. ``evaluate --in-memory`` gives the refusals in greedy replies to the held-out harmful
prompts and the KL on the held-out harmless ones; refusals of the held-out harmless prompts come from
the calibration's greedy replies (below).

Then the calibration of optimize's no-generation refusal measure: for each evaluated model, and for
every ``--calibrate-every``-th trial of the study (default 5), each held-out prompt's
refusal-opening probability at the first response position and whether its most likely first token
opens a refusal, against its greedy reply of 32 tokens judged by the marker phrases (as ``evaluate``
judges it). Two counts are compared: the old one (refused when the probability is above 0.5) and the
one trials keep (``orthopatch.run.search.counts_as_refused``), with a sweep of candidate rules; the
per-prompt figures and replies go to ``WORKDIR/calibration-prompts.json``. A trial is replayed in
memory: the per-layer directions ``measure --per-layer`` writes (what optimize measures), the trial's
point turned into rows and weights by ``orthopatch.run.search``, and forward hooks removing
``s·u(uᵀy)`` from every weighted writer's output, ``u`` the unit row (a Llama has no norm after its
writers); the replayed count of refused prompts is checked against the one the study recorded.
Replies to a set's prompts are generated in one left-padded batch. Results go to
``WORKDIR/results.json``, a summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def run(*args: str | Path, log: Path | None = None) -> tuple[float, str]:
    """``python -m orthopatch ARGS``: its seconds and stdout; stderr goes to ``log``."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orthopatch", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if log is not None:
        log.write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"orthopatch {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def evaluate(model: Path, source: Path, prompts: Path, work: Path, name: str) -> dict:
    """``evaluate --in-memory``: refusals in greedy replies to the held-out harmful prompts, KL on the
    held-out harmless ones."""
    out = work / f"{name}.json"
    seconds, _ = run("evaluate", model, "--source", source, "--harmful", prompts / "harmful_heldout.txt",
                     "--harmless", prompts / "harmless_heldout.txt", "--json", out, "--in-memory", "--device", "cpu",
                     "-q")
    report = json.loads(out.read_text())
    return {"refused_harmful": report["model_refusals"], "source_refused_harmful": report["source_refusals"],
            "kl_mean": report["kl_mean"], "kl_max": report["kl_max"], "harmful_count": report["harmful"]["count"],
            "harmless_count": report["harmless"]["count"], "evaluate_seconds": round(seconds, 1)}


class Replay:
    """A model in memory with hooks that ablate a point's rows and weights; per-prompt proxy and greedy figures."""

    def __init__(self, folder: Path, tokenizer_folder: Path):
        import torch
        import transformers

        from orthopatch.run.chat import encode, load_tokenizer
        from orthopatch.run.evaluate import reply_end_ids
        from orthopatch.run.prompts import load_markers
        from orthopatch.run.search import refusal_tokens

        self.torch = torch
        self.tokenizer = load_tokenizer(tokenizer_folder)
        self.encode = lambda p: encode(self.tokenizer, p)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.markers = load_markers(None)
        self.refusal_ids = torch.tensor(refusal_tokens(self.tokenizer, self.markers))
        self.eos = sorted(reply_end_ids(self.tokenizer, folder))
        self.active: dict = {}
        inner = self.model.model
        self.targets = {inner.embed_tokens: ("embedding", None)}
        for i, layer in enumerate(inner.layers):
            self.targets[layer.self_attn.o_proj] = ("attention", i)
            self.targets[layer.mlp.down_proj] = ("mlp", i)
        for module in self.targets:
            module.register_forward_hook(self._hook)

    def _hook(self, module, _, output):
        found = self.active.get(module)
        if found is None:
            return None
        u, s = found
        return output - s * (output @ u).unsqueeze(-1) * u

    def set(self, rows, weights) -> None:
        """Ablate ``rows`` (``[n_layers + 1, d]``) with ``weights`` (a ComponentWeights); None: the model as is."""
        torch = self.torch
        self.active = {}
        if rows is None:
            return
        for module, (role, layer) in self.targets.items():
            s = weights.embedding if role == "embedding" else getattr(weights, role)[layer]
            if s:
                r = torch.tensor(rows[0 if layer is None else layer], dtype=torch.float64)
                self.active[module] = ((r / r.norm()).float(), float(s))

    def judge(self, prompts: list[str], max_new_tokens: int = 32) -> list[Judged]:
        """Per prompt: the refusal-opening probability at the first response position, whether the most
        likely first token opens a refusal, whether the greedy reply of ``max_new_tokens`` tokens contains
        a marker phrase, and the reply. All prompts go in one batch, left-padded (``evaluate
        --in-memory`` runs them one at a time; the figures agree to float noise)."""
        from orthopatch.run.evaluate import is_refusal

        torch = self.torch
        encoded = [self.encode(p) for p in prompts]
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=pad, output_logits=True,
                                      return_dict_in_generate=True)
        probs = torch.softmax(out.logits[0].double(), -1)
        masses = probs[:, self.refusal_ids].sum(-1).tolist()
        tops = torch.isin(probs.argmax(-1), self.refusal_ids).tolist()
        judged = []
        for mass, top, reply in zip(masses, tops, out.sequences[:, width:].tolist(), strict=True):
            ends = [i for i, t in enumerate(reply) if t in self.eos]
            reply = reply[: ends[0] + 1] if ends else reply
            text = self.tokenizer.decode(reply, skip_special_tokens=True)
            judged.append(Judged(mass, bool(top), is_refusal(text, self.markers), text))
        return judged


class Judged(NamedTuple):
    """One prompt's first-position figures and its greedy reply."""

    mass: float  # refusal-opening probability at the first response position
    top: bool  # the most likely first token opens a refusal
    greedy: bool  # the greedy reply contains a marker phrase
    reply: str


def old_rule(j: Judged) -> bool:
    """The count before calibration: refused when the refusal-opening mass is above 0.5."""
    return j.mass > 0.5


def new_rule(j: Judged) -> bool:
    """The count optimize keeps (``orthopatch.run.search.counts_as_refused``)."""
    from orthopatch.run.search import counts_as_refused

    return counts_as_refused(j.mass, j.top)


def confusion(judged: list[Judged], rule=new_rule) -> dict:
    """Counts of (proxy refused, greedy refused) over prompts, the proxy as ``rule`` counts."""
    c = {"both": 0, "proxy_only": 0, "greedy_only": 0, "neither": 0}
    for j in judged:
        proxy, greedy = rule(j), j.greedy
        c["both" if proxy and greedy else "proxy_only" if proxy else "greedy_only" if greedy else "neither"] += 1
    total = sum(c.values())
    c["agreement"] = round((c["both"] + c["neither"]) / total, 4) if total else None
    return c


RULES = {"old": old_rule, "new": new_rule}


def calibrate(fixture: Path, work: Path, study: Path, every: int = 1) -> dict:
    """Proxy against greedy replies on both held-out sets for every ``every``-th trial of ``study``."""
    import numpy as np
    import optuna

    from orthopatch.run.search import point_of

    prompts = fixture / "prompts"
    sets = {k: [p for p in (prompts / f"{k}_heldout.txt").read_text().splitlines() if p.strip()]
            for k in ("harmful", "harmless")}
    per_layer = work / "per-layer.pth"
    run("measure", fixture / "model", "-o", per_layer, "--per-layer", "--harmful", prompts / "harmful.txt",
        "--harmless", prompts / "harmless.txt", "--device", "cpu", "--overwrite", "-q")
    import torch

    measured = torch.load(per_layer, weights_only=True).double().numpy()
    replay = Replay(fixture / "model", fixture / "model")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study)))
    trials = optuna.load_study(study_name="orthopatch-optimize", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))[::every]
    rows, pooled = [], {k: [] for k in sets}
    started = time.perf_counter()
    for t in trials:
        point = point_of(t.params)
        replay.set(point.rows(measured).astype(np.float32).astype(np.float64), point.weights(len(measured) - 1))
        judged = {k: replay.judge(v) for k, v in sets.items()}
        for k in sets:
            pooled[k] += judged[k]
        count = {(k, name): sum(map(rule, judged[k])) for k in sets for name, rule in RULES.items()}
        rows.append({"trial": t.number, "recorded_refused": t.user_attrs["refused"],
                     "proxy_refused": count["harmful", "new"], "old_rule_refused": count["harmful", "old"],
                     "greedy_refused": sum(j.greedy for j in judged["harmful"]),
                     "proxy_refused_harmless": count["harmless", "new"],
                     "old_rule_refused_harmless": count["harmless", "old"],
                     "greedy_refused_harmless": sum(j.greedy for j in judged["harmless"]), "kl_mean": t.values[1]})
    seconds = time.perf_counter() - started
    (work / "calibration-prompts.json").write_text(json.dumps(
        {k: [j._asdict() for j in v] for k, v in pooled.items()}) + "\n")
    out = {"every": every, "trials": rows, "replay_seconds": round(seconds, 1)}
    for name in RULES:
        counts = [(r["proxy_refused" if name == "new" else "old_rule_refused"], r["greedy_refused"]) for r in rows]
        matches = sum(c == r["recorded_refused"] for (c, _), r in zip(counts, rows, strict=True))
        out[name] = {"replay_matches_study": matches,
                     "per_trial_pooled": {k: confusion(v, RULES[name]) for k, v in pooled.items()},
                     "trials_with_equal_counts": sum(a == b for a, b in counts),
                     "mean_abs_count_difference": round(sum(abs(a - b) for a, b in counts) / len(counts), 3)}
    out["sweep"] = sweep(pooled["harmful"])
    return out


def sweep(judged: list[Judged]) -> dict:
    """Pooled harmful agreement of candidate rules: the mass above a threshold, with and without
    "or the most likely first token opens a refusal"."""
    out = {}
    for threshold in (0.5, 0.4, 0.3, 0.2, 0.1, 0.05):
        out[f"mass>{threshold}"] = confusion(judged, lambda j, t=threshold: j.mass > t)
        out[f"top or mass>{threshold}"] = confusion(judged, lambda j, t=threshold: j.top or j.mass > t)
    out["top"] = confusion(judged, lambda j: j.top)
    return out


def per_model(fixture: Path, models: dict[str, Path]) -> dict:
    """Proxy against greedy replies on both held-out sets, for each model as written."""
    prompts = fixture / "prompts"
    sets = {k: [p for p in (prompts / f"{k}_heldout.txt").read_text().splitlines() if p.strip()]
            for k in ("harmful", "harmless")}
    out = {}
    for name, folder in models.items():
        replay = Replay(folder, fixture / "model")
        judged = {k: replay.judge(v) for k, v in sets.items()}
        out[name] = {rule: {k: confusion(v, RULES[rule]) for k, v in judged.items()} for rule in RULES}
    return out


def refuser(args: argparse.Namespace) -> dict:
    import refuser as fixture_script

    started = time.perf_counter()
    fixture = args.fixture or fixture_script.build()
    prompts, source = fixture / "prompts", fixture / "model"
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    loads = [os.getloadavg()]

    def save() -> None:  # after every stage, so a cut run keeps what it measured
        result["load_average_1min"] = [round(x[0], 2) for x in loads]
        (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    result: dict = {"fixture": json.loads((fixture / "fixture.json").read_text()), "fixture_folder": str(fixture),
                    "machine": {"cpu": cpu_name(), "cores": os.cpu_count()}}
    # (a) measure with defaults, apply, evaluate
    t_measure, _ = run("measure", source, "-o", work / "measured.pth", "--harmful", prompts / "harmful.txt",
                       "--harmless", prompts / "harmless.txt", "--device", "cpu", log=work / "measure.log")
    t_apply, _ = run("apply", source, work / "measured.pth", "-o", work / "measured-model", "-q")
    record = json.loads((work / "measured.json").read_text())
    result["measure"] = {"seconds": round(t_measure, 1), "apply_seconds": round(t_apply, 1),
                         "layer": record["layer"], "rule": record["layer_rule"],
                         **evaluate(work / "measured-model", source, prompts, work, "measured")}
    loads.append(os.getloadavg())
    save()
    # (b) optimize, apply of its file, evaluate
    t_opt, table = run("optimize", source, "-o", work / "optimized.safetensors", "--trials", args.trials,
                       "--harmful", prompts / "harmful.txt", "--harmless", prompts / "harmless.txt",
                       "--eval-harmful", prompts / "harmful_heldout.txt", "--eval-harmless",
                       prompts / "harmless_heldout.txt", "--study", work / "study.log", "--device", "cpu",
                       log=work / "optimize.log")
    (work / "optimize.txt").write_text(table)
    loads.append(os.getloadavg())
    save()
    t_apply, _ = run("apply", source, work / "optimized.safetensors", "-o", work / "optimized-model", "-q")
    result["optimize"] = {"seconds": round(t_opt, 1), "trials": args.trials, "apply_seconds": round(t_apply, 1),
                          "last_line": table.strip().splitlines()[-1],
                          **evaluate(work / "optimized-model", source, prompts, work, "optimized")}
    m, o = result["measure"], result["optimize"]
    result["target"] = {"no_more_refusals": o["refused_harmful"] <= m["refused_harmful"],
                        "at_most_half_the_kl": o["kl_mean"] <= 0.5 * m["kl_mean"]}
    result["target"]["met"] = all(result["target"].values())
    save()
    models = {"source": source, "measure": work / "measured-model", "optimize": work / "optimized-model"}
    result["per_model"] = per_model(fixture, models)
    for name in ("measure", "optimize"):
        harmless = result["per_model"][name]["new"]["harmless"]
        result[name]["refused_harmless"] = harmless["both"] + harmless["greedy_only"]
    loads.append(os.getloadavg())
    if not args.skip_calibration:
        result["calibration"] = calibrate(fixture, work, work / "study.log", args.calibrate_every)
    loads.append(os.getloadavg())
    result["load_average_1min"] = [round(x[0], 2) for x in loads]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def summary(r: dict) -> str:
    lines = [f"fixture {r['fixture_folder']}: {r['fixture']['parameters']:,} parameters, trained in "
             f"{r['fixture']['train_seconds']} s; source greedy refusals "
             f"{r['fixture']['greedy']['harmful_heldout']['refused']}/32 harmful, "
             f"{r['fixture']['greedy']['harmless_heldout']['refused']}/32 harmless",
             "run            seconds  refused harmful  refused harmless  KL mean   KL max"]
    for name in ("measure", "optimize"):
        x = r[name]
        lines.append(f"{name:<13} {x['seconds']:>8}  {x['refused_harmful']:>7}/{x['harmful_count']:<7}  "
                     f"{x['refused_harmless']:>8}/{x['harmless_count']:<7}  {x['kl_mean']:.4g}  {x['kl_max']:.4g}")
    lines.append(f"target {r['target']}; load average (1 min) {r['load_average_1min']}")
    lines.append(f"per model (proxy against greedy): {json.dumps(r['per_model'])}")
    lines.append(f"optimize's last line: {r['optimize']['last_line']}")
    cal = r.get("calibration")
    if cal:
        for rule in RULES:
            c = cal[rule]
            lines.append(f"calibration, {rule} rule (every {cal['every']}-th trial): replay matches the study's count "
                         f"in {c['replay_matches_study']}/{len(cal['trials'])} trials; equal counts in "
                         f"{c['trials_with_equal_counts']} trials; mean |proxy − greedy| "
                         f"{c['mean_abs_count_difference']}")
            lines.append(f"  pooled over trials: {json.dumps(c['per_trial_pooled'])}")
        lines.append(f"  candidate rules, pooled harmful: {json.dumps(cal['sweep'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["refuser"])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-optimize")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--calibrate-every", type=int, default=5, metavar="K",
                        help="Replay every K-th trial for the calibration (a replay generates replies to every "
                             "held-out prompt).")
    parser.add_argument("--fixture", type=Path, help="A fixture folder refuser.py built [default: build or reuse it].")
    args = parser.parse_args()
    result = refuser(args)
    (args.workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))


if __name__ == "__main__":
    main()

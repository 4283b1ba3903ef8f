"""``orthopatch optimize``: search the ablation's parameters for fewer refusals at less damage, out of core.

One pass measures the per-layer directions (as ``measure --per-layer``) on the measurement prompts
and, in the same pass, the source's first-token distributions on the held-out prompts the trials are
judged on. Then Optuna's TPE sampler (two objectives: the refusal-opening probability on harmful
prompts and the KL divergence on harmless ones, fixed seed) proposes points; each trial is one more
pass over the blocks with the point applied to the activations. Up to ``--confirm`` candidates (the
fewest counted refusals, then the least KL) are confirmed with greedy replies, as ``evaluate`` judges
them; the one with the fewest greedy refusals, then the least KL, is written as a weighted direction
file ``apply`` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orthopatch import __version__
from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.formats import CONFIG_NAME
from orthopatch.patch.direction import save_weighted_direction
from orthopatch.run.ablation import ActivationAblation
from orthopatch.run.chat import decode, encode_set, load_tokenizer
from orthopatch.run.evaluate import is_refusal, reply_end_ids
from orthopatch.run.layerwise import LayerwiseModel, RunSettings, make_batches
from orthopatch.run.measure import _Means, fill_vanishing
from orthopatch.run.prompts import PromptChoice, PromptSet, load_markers
from orthopatch.run.search import (
    CostMeter,
    PassCost,
    Point,
    TrialFigures,
    TrialRunner,
    point_of,
    refusal_tokens,
    suggest,
)

INSTALL_HINT = "pip install 'orthopatch[optimize]'"
STUDY_NAME = "orthopatch-optimize"
#: Changes when the parameters or the figures change meaning: a study of another version is refused.
SEARCH_VERSION = 2
#: Random trials before the TPE sampler models the results.
STARTUP_TRIALS = 20
DEFAULT_TRIALS = 100
#: Candidates confirmed with greedy replies: by default, and at most.
DEFAULT_CONFIRM = 3
MAX_CONFIRM = 20


@dataclass(frozen=True)
class OptimizeOptions:
    """Everything ``optimize`` needs; the CLI only builds one of these."""

    model: Path
    out: Path
    harmful: str | None = None  # measurement prompts; None: the built-in set
    harmless: str | None = None
    #: prompts the trials are judged on; None: the built-in held-out sets. ``--limit`` does not apply.
    eval_harmful: str | None = None
    eval_harmless: str | None = None
    choice: PromptChoice = field(default_factory=PromptChoice)
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    study: Path | None = None
    max_kl: float | None = None
    max_new_tokens: int = 32
    confirm: int = DEFAULT_CONFIRM  # candidates confirmed with greedy replies
    markers: Path | None = None  # refusal marker phrases; None: the built-in list
    project_harmless: bool = True
    run: RunSettings = field(default_factory=RunSettings)
    quiet: bool = False
    overwrite: bool = False
    model_repo: str | None = None


@dataclass(frozen=True)
class Trial:
    number: int
    point: Point
    figures: TrialFigures


@dataclass(frozen=True)
class Costs:
    """What each stage of a search cost (wall seconds, bytes read): the measuring pass, each trial run
    in this call (none of a resumed study's earlier trials), and the greedy confirmation."""

    measuring: PassCost
    trials: tuple[PassCost, ...]
    confirmation: PassCost


@dataclass(frozen=True)
class Confirmed:
    """A candidate and its refusals in greedy replies to the judged harmful prompts."""

    trial: Trial
    refused: int


@dataclass(frozen=True)
class OptimizeResult:
    chosen: Trial
    front: list[Trial]
    table: str
    confirmed: int  # refusals of the chosen point in greedy replies
    source_refusals: int
    harmful_count: int
    trials_run: int
    trials_total: int
    seconds: float
    costs: Costs
    confirmations: tuple[Confirmed, ...] = ()  # every confirmed candidate, in the order confirmed


def require_optuna() -> Any:
    """The ``optuna`` module, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise OrthopatchError(f"optimize needs optuna: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def check_options(options: OptimizeOptions) -> None:
    """Everything that can be refused before any work, each in one line."""
    if options.trials < 1:
        raise OrthopatchError(f"--trials must be at least 1, not {options.trials}")
    if options.max_kl is not None and not options.max_kl >= 0:
        raise OrthopatchError(f"--max-kl must be a number ≥ 0, not {options.max_kl}")
    if not 1 <= options.confirm <= MAX_CONFIRM:
        raise OrthopatchError(f"--confirm must be from 1 to {MAX_CONFIRM}, not {options.confirm}")
    if options.max_new_tokens < 1:
        raise OrthopatchError(f"--max-new-tokens must be at least 1, not {options.max_new_tokens}")
    if options.out.suffix.lower() != ".safetensors":
        raise OrthopatchError("the weighted direction file must end in .safetensors", path=options.out)
    if not options.out.parent.is_dir():
        raise OrthopatchError("the output's folder does not exist", path=options.out.parent)
    if options.out.is_dir():
        raise OrthopatchError("is a folder, not a file optimize can write", path=options.out)
    if os.path.lexists(options.out) and not options.overwrite:
        raise OrthopatchError("exists; pass --overwrite to replace it", path=options.out)
    if options.study is not None and not options.study.parent.is_dir():
        raise OrthopatchError("the study file's folder does not exist", path=options.study.parent)


def model_identity(model: LayerwiseModel) -> str:
    """sha256 of the model's config and shard headers: what a study file is tied to."""
    digest = hashlib.sha256((model.root / CONFIG_NAME).read_bytes())
    for name in sorted(model.checkpoint.shards):
        digest.update(name.encode() + b"\0" + hashlib.sha256(model.checkpoint.shards[name].raw).digest())
    return digest.hexdigest()


def open_study(optuna: Any, options: OptimizeOptions, identity: dict[str, str]) -> Any:
    """A new or resumed study (journal file, or SQLite for ``.db``/``.sqlite``); one made for another
    model or other prompts is refused in one line."""
    storage = None
    if options.study is not None:
        path = options.study
        try:
            if path.suffix.lower() in (".db", ".sqlite", ".sqlite3"):
                storage = f"sqlite:///{os.path.abspath(path)}"
            else:
                try:
                    from optuna.storages.journal import JournalFileBackend
                except ImportError:  # optuna 3
                    from optuna.storages import JournalFileStorage as JournalFileBackend
                storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:  # a file that is not a study fails in many ways; all end as one line
            raise OrthopatchError(f"cannot open the study file ({first_line(exc)})", path=path) from None
    sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=STARTUP_TRIALS)
    try:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=["minimize", "minimize"])
    except Exception as exc:
        raise OrthopatchError(f"cannot open the study file ({first_line(exc)})", path=options.study) from None
    attrs = study.user_attrs
    if "model" in attrs and attrs["model"] != identity["model"]:
        raise OrthopatchError(f"is a study of another model ({attrs.get('model_name', '?')}), not of "
                              f"{options.model.name}: use another --study file", path=options.study)
    if "search" in attrs and attrs["search"] != identity["search"]:
        raise OrthopatchError("is a study with other prompts or settings: use another --study file",
                              path=options.study)
    for key, value in identity.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study


def finished(optuna: Any, study: Any) -> list[Trial]:
    """The study's completed trials, in order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        refusal, kl_mean = t.values
        figures = TrialFigures(refusal, int(t.user_attrs["refused"]), kl_mean, float(t.user_attrs["kl_max"]))
        out.append(Trial(t.number, point_of(t.params), figures))
    return out


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Trials no other trial beats on both figures (refusal probability, mean KL), by refusal probability."""
    def dominated(a: Trial) -> bool:
        return any(b.figures.refusal <= a.figures.refusal and b.figures.kl_mean <= a.figures.kl_mean and
                   (b.figures.refusal, b.figures.kl_mean) != (a.figures.refusal, a.figures.kl_mean) for b in trials)

    front = [t for t in trials if not dominated(t)]
    return sorted(front, key=lambda t: (t.figures.refusal, t.figures.kl_mean, t.number))


def choose(trials: list[Trial], max_kl: float | None) -> Trial:
    """Fewest refused prompts, then least KL; with ``max_kl``, the fewest refusals among trials within it."""
    if max_kl is None:
        return min(trials, key=lambda t: (t.figures.refused, t.figures.kl_mean, t.figures.refusal, t.number))
    within = [t for t in trials if t.figures.kl_mean <= max_kl]
    if not within:
        lowest = min(t.figures.kl_mean for t in trials)
        raise OrthopatchError(f"no trial has a mean KL of at most {max_kl:g} (the lowest is {lowest:.4g}): raise "
                              "--max-kl, or run more trials with --study")
    return min(within, key=lambda t: (t.figures.refused, t.figures.refusal, t.figures.kl_mean, t.number))


def candidates(trials: list[Trial], max_kl: float | None, count: int) -> list[Trial]:
    """Up to ``count`` trials to confirm: :func:`choose`'s, then the Pareto front's (within ``max_kl``) by
    fewest counted refusals, then least KL."""
    first = choose(trials, max_kl)
    rest = [t for t in pareto_front(trials) if t is not first and (max_kl is None or t.figures.kl_mean <= max_kl)]
    rest.sort(key=lambda t: (t.figures.refused, t.figures.kl_mean, t.figures.refusal, t.number))
    return [first, *rest][:count]


def choose_confirmed(confirmed: list[Confirmed]) -> Confirmed:
    """The candidate with the fewest refusals in greedy replies, then the least KL."""
    return min(confirmed, key=lambda c: (c.refused, c.trial.figures.kl_mean, c.trial.number))


def greedy_refusals(model: LayerwiseModel, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    eos: set[int], markers: tuple[str, ...]) -> int:
    """Greedy replies to ``prompts`` (with whatever ablation is hooked in) that ``evaluate`` calls refusals."""
    replies = model.greedy(prompts, max_new_tokens, eos)
    return sum(is_refusal(decode(tokenizer, r), markers) for r in replies)


def confirm(model: LayerwiseModel, ablation: ActivationAblation, measured: np.ndarray, chosen: list[Trial],
            refusals: Callable[[], int]) -> list[Confirmed]:
    """Each candidate's greedy refusals, its point applied to the activations as the written file holds it."""
    out = []
    for trial in chosen:
        ablation.set(trial.point.rows(measured).astype(np.float32).astype(np.float64),
                     trial.point.weights(model.num_layers))
        with ablation.hooked():
            out.append(Confirmed(trial, refusals()))
    ablation.clear()
    return out


def describe_choice(confirmed: tuple[Confirmed, ...], n_harmful: int) -> str:
    """Which candidate was written and why, for the final line."""
    if len(confirmed) <= 1:
        return "the only candidate confirmed"
    each = ", ".join(f"trial {c.trial.number} {c.refused}/{n_harmful}" for c in confirmed)
    return f"fewest greedy refusals, then least KL, of {len(confirmed)} candidates ({each})"


def format_front(front: list[Trial], chosen: Trial, n_harmful: int) -> str:
    rows = front if chosen in front else [*front, chosen]
    lines = ["trial  refusal prob.  refused  KL mean  KL max  parameters"]
    for t in rows:
        f = t.figures
        mark = "*" if t is chosen else " "
        lines.append(f"{mark}{t.number:>4}  {f.refusal:>13.4f}  {f.refused:>3}/{n_harmful:<3}  {f.kl_mean:>7.4f}  "
                     f"{f.kl_max:>6.3f}  {t.point.describe()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Inputs:
    """The prompts and markers of a search, the prompts tokenized: ``ids`` holds ``harmful`` and
    ``harmless`` (measured on), ``judged`` (harmful, held out) and ``judged_harmless``."""

    harmful: PromptSet
    harmless: PromptSet
    judged_harmful: PromptSet
    judged_harmless: PromptSet
    markers: tuple[str, ...]
    ids: dict[str, list[list[int]]]

    def search_hash(self, options: OptimizeOptions) -> str:
        """sha256 of everything that gives a study's figures their meaning but the model."""
        key = [SEARCH_VERSION, self.harmful.sha256, self.harmless.sha256, self.judged_harmful.sha256,
               self.judged_harmless.sha256, options.project_harmless, self.markers, options.run.dtype]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def load_inputs(options: OptimizeOptions, tokenizer: Any, model: LayerwiseModel) -> Inputs:
    """The measurement prompts (the user's or the built-in sets), the held-out judged ones and the
    refusal markers, tokenized with the model's chat template within its context."""
    harmful = options.choice.choose(options.harmful, "harmful", options.quiet)
    harmless = options.choice.choose(options.harmless, "harmless", options.quiet)
    judging = PromptChoice(field=options.choice.field)
    judged_harmful = judging.choose(options.eval_harmful, "harmful_eval", options.quiet)
    judged_harmless = judging.choose(options.eval_harmless, "harmless_eval", options.quiet)
    sets = (("harmful", harmful), ("harmless", harmless), ("judged", judged_harmful),
            ("judged_harmless", judged_harmless))
    ids = {name: encode_set(tokenizer, prompts, model.context_length,
                            reserve=options.max_new_tokens if name == "judged" else 0) for name, prompts in sets}
    return Inputs(harmful, harmless, judged_harmful, judged_harmless, load_markers(options.markers), ids)


@dataclass(frozen=True)
class Measured:
    """What the measuring pass leaves for the trials: the per-layer directions, a trial runner with the
    source's distributions, the source's own figures and what the pass cost."""

    directions: np.ndarray  # [n_layers + 1, d] float64 unit rows
    ablation: ActivationAblation
    runner: TrialRunner
    source: TrialFigures
    cost: PassCost


def measuring_pass(model: LayerwiseModel, tokenizer: Any, inputs: Inputs, options: OptimizeOptions) -> Measured:
    """One pass: the per-layer directions from the measurement prompts and, in the same pass, the
    source's first-token distributions on the judged prompts."""
    meter = CostMeter(model)
    ids, n = inputs.ids, model.num_layers
    n_measure = len(ids["harmful"]) + len(ids["harmless"])
    means = _Means(len(ids["harmful"]), options.project_harmless)
    judged = ids["judged"] + ids["judged_harmless"]
    final = model.run(make_batches(ids["harmful"] + ids["harmless"] + judged, options.run.batch_size),
                      lambda layer, states: means(layer, states[:n_measure]))
    if not means.directions:
        raise OrthopatchError("the harmful and harmless prompts give the same mean at every layer: no direction",
                              path=options.model)
    directions = fill_vanishing(means.directions, n)[0].float().double().numpy()
    source_logits = model.logits(final[n_measure:]).cpu()
    ablation = ActivationAblation(model)
    runner = TrialRunner(model, ablation, make_batches(judged, options.run.batch_size), len(ids["judged"]),
                         refusal_tokens(tokenizer, inputs.markers), source_logits[len(ids["judged"]):])
    return Measured(directions, ablation, runner, runner.figures(source_logits), meter.cost())


def optimize(options: OptimizeOptions, log: Callable[[str], None] | None = None) -> OptimizeResult:
    """Measure, search, confirm and write the chosen point (see the module's docstring)."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    started = time.monotonic()
    check_options(options)
    optuna = require_optuna()
    device, dtype = options.run.torch_device(), options.run.torch_dtype()
    tokenizer = load_tokenizer(options.run.tokenizer or options.model)
    with LayerwiseModel(options.model, device=device, dtype=dtype, logits=True) as model:
        n = model.num_layers
        inputs = load_inputs(options, tokenizer, model)
        ids, markers = inputs.ids, inputs.markers
        identity = {"model": model_identity(model), "model_name": options.model.name,
                    "search": inputs.search_hash(options)}
        study = open_study(optuna, options, identity)

        log(f"optimize {options.model}: measuring on {len(ids['harmful'])} harmful and {len(ids['harmless'])} "
            f"harmless prompts, {n} blocks, one at a time on {device}")
        measuring = measuring_pass(model, tokenizer, inputs, options)
        measured, runner, ablation, source = measuring.directions, measuring.runner, measuring.ablation, \
            measuring.source
        log(f"source: refusal-opening probability {source.refusal:.4f}, {source.refused}/{len(ids['judged'])} "
            "harmful prompts refused")

        done = len(finished(optuna, study))
        todo = max(0, options.trials - done)
        if done:
            log(f"resuming {options.study}: {done} trials done, {todo} to run")
        quiet = options.quiet

        def objective(trial: Any) -> tuple[float, float]:
            point = suggest(trial, n)
            figures = runner.run(point, measured)
            trial.set_user_attr("refused", figures.refused)
            trial.set_user_attr("kl_max", figures.kl_max)
            if not quiet:
                print(f"trial {trial.number}: refusal {figures.refusal:.4f} ({figures.refused} refused), "
                      f"KL {figures.kl_mean:.4f}", file=sys.stderr)
            return figures.refusal, figures.kl_mean

        if todo:
            study.optimize(objective, n_trials=todo, catch=())
        trials = finished(optuna, study)
        front = pareto_front(trials)
        to_confirm = candidates(trials, options.max_kl, options.confirm)

        # Confirm the candidates, and the source, with greedy replies as evaluate judges them.
        eos = reply_end_ids(tokenizer, options.model)
        log(f"confirming {len(to_confirm)} candidate(s) (trials {', '.join(str(t.number) for t in to_confirm)}) "
            f"with greedy replies of {options.max_new_tokens} tokens to {len(ids['judged'])} harmful prompts "
            "(one pass per token)")
        meter = CostMeter(model)

        def refusals() -> int:
            return greedy_refusals(model, tokenizer, ids["judged"], options.max_new_tokens, eos, markers)

        ablation.clear()
        source_refusals = refusals()
        confirmations = confirm(model, ablation, measured, to_confirm, refusals)
        best = choose_confirmed(confirmations)
        chosen, confirmed = best.trial, best.refused
        rows = chosen.point.rows(measured).astype(np.float32)
        weights = chosen.point.weights(n)
        costs = Costs(measuring.cost, tuple(runner.costs), meter.cost())

    metadata = {"model": options.model.name, "trial": str(chosen.number), "parameters": chosen.point.to_json(),
                "refusal_probability": repr(chosen.figures.refusal), "kl_mean": repr(chosen.figures.kl_mean),
                "kl_max": repr(chosen.figures.kl_max), "greedy_refusals": f"{confirmed}/{len(ids['judged'])}",
                "source_greedy_refusals": f"{source_refusals}/{len(ids['judged'])}",
                "confirmed_candidates": json.dumps([{"trial": c.trial.number, "greedy_refusals": c.refused,
                                                     "refused_counted": c.trial.figures.refused,
                                                     "kl_mean": c.trial.figures.kl_mean} for c in confirmations]),
                "harmful_sha256": inputs.harmful.sha256,
                "harmless_sha256": inputs.harmless.sha256, "eval_harmful_sha256": inputs.judged_harmful.sha256,
                "eval_harmless_sha256": inputs.judged_harmless.sha256, "seed": str(options.seed),
                "orthopatch_version": __version__}
    if options.model_repo:
        metadata["model_repo"] = options.model_repo
    save_weighted_direction(options.out, rows, weights, metadata)
    table = format_front(front, chosen, len(ids["judged"]))
    return OptimizeResult(chosen, front, table, confirmed, source_refusals, len(ids["judged"]), todo, len(trials),
                          round(time.monotonic() - started, 3), costs, tuple(confirmations))

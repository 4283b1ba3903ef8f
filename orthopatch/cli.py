"""The ``orthopatch`` command: parse options, call the library, map known errors to one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from orthopatch import __version__
from orthopatch.errors import OrthopatchError, quoted
from orthopatch.hub import push_folder, resolve_direction, resolve_model
from orthopatch.patch.apply import ApplyOptions, ApplyResult, apply, dry_run_text
from orthopatch.patch.architecture import parse_target
from orthopatch.patch.plan import Selection, parse_layers
from orthopatch.patch.record import Method

if TYPE_CHECKING:
    from orthopatch.run.layerwise import RunSettings


def _layers_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> frozenset[int] | None:
    try:
        return parse_layers(value) if value is not None else None
    except OrthopatchError as exc:
        raise click.BadParameter(exc.message) from None


def _targets_option(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        for spec in value:
            parse_target(spec)
    except OrthopatchError as exc:
        raise click.BadParameter(exc.message) from None
    return value


def _scale_option(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise click.BadParameter("must be a finite number")
    if value == 0:
        raise click.BadParameter("0 removes nothing: the output would be a copy recorded as abliterated")
    return value


def _verify_before_push(out: Path, direction: Path, source: Path | None, *, quiet: bool = False) -> None:
    """Refuse to push anything but a finished conversion that ``orthopatch verify --source`` accepts
    (``verify`` without a source for a model converted in place: there is none left)."""
    from orthopatch.verify import VerifyOptions, verify

    report = verify(VerifyOptions(out=out, direction=direction, source=source, quiet=quiet))
    if not report.ok:
        more = f" (and {len(report.failures) - 1} more)" if len(report.failures) > 1 else ""
        raise OrthopatchError(f"not pushed: verification failed: {report.failures[0]}{more}")


def _seconds(seconds: float) -> str:
    """A duration with the digits the clock can back: milliseconds below 10 s, then tenths, then seconds."""
    if seconds < 10:
        return f"{seconds:.3f} s"
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def result_line(result: ApplyResult) -> str:
    """What a finished ``apply`` did, on one line: tensors and bytes patched, where the other bytes went
    (shared with the source, copied in the kernel, copied through memory), and the time."""
    n = sum(1 for _ in result.plan.targets())
    out = quoted(str(result.out))
    if result.state == "already complete":
        return f"{out}: already complete, nothing to do"
    if result.in_place:
        return (f"{out}: {n} tensors patched in place ({result.patched:,} bytes rewritten, nothing else "
                f"read or written), in {_seconds(result.seconds)} ({result.state})")
    c = result.copied
    parts = [f"{n} tensors patched ({result.patched:,} bytes)"]
    parts += [f"{nbytes:,} bytes {how}" for nbytes, how in ((c.shared, "shared with the source"),
                                                           (c.kernel, "copied in the kernel"),
                                                           (c.user, "copied through memory")) if nbytes]
    return f"{out}: {', '.join(parts)}, in {_seconds(result.seconds)} ({result.state})"


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    click.echo(f"orthopatch: error: {exc}", err=True)
    sys.exit(1)


@contextmanager
def _reported(debug: bool, interrupted: str = "interrupted") -> Iterator[None]:
    """Known errors end as one line and exit 1; Ctrl-C as one line and exit 130."""
    try:
        yield
    except OrthopatchError as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo(f"orthopatch: {interrupted}", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orthopatch")
def main() -> None:
    """Project a refusal direction out of a safetensors checkpoint, streaming it tensor by tensor."""


@main.command("apply")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("direction", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Output folder [default: MODEL-abliterated; ./NAME-abliterated for a repo id].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, shards, bytes) and write nothing.")
@click.option("--overwrite", is_flag=True,
              help="Delete and replace the contents of an output folder that holds anything else.")
@click.option("--in-place", "in_place", is_flag=True,
              help="Rewrite the patched tensors inside MODEL's own shards (crash-safe; needs free space for "
                   "the largest patched tensor only) instead of writing a copy.")
@click.option("--force", is_flag=True,
              help="Convert even when the tensors look already abliterated along DIRECTION (its share in them "
                   "at rounding-noise level).")
@click.option("--layers", callback=_layers_option, metavar="SPEC",
              help="Blocks to patch: indices and half-open ranges, e.g. 10:60 (10..59) or 0:4,7 [default: all].")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Patch the token (and position) embeddings.")
@click.option("--scale", type=float, default=1.0, show_default=True, callback=_scale_option, metavar="ALPHA",
              help="Remove ALPHA times the component: W - ALPHA r rᵀW (1 ablates, 2 reflects, <1 is partial).")
@click.option("--norm-preserving", is_flag=True,
              help="Give each input unit (column, or embedding row) its original norm back after projecting.")
@click.option("--targets", multiple=True, callback=_targets_option, metavar="REGEX:AXIS",
              help="Patch tensors whose names match REGEX along residual AXIS instead of a known architecture "
                   "(repeatable; name the block index with (?P<layer>\\d+)).")
@click.option("--imatrix", type=click.Path(path_type=Path), metavar="FILE",
              help="GGUF only: llama.cpp's importance matrix (llama-imatrix's .gguf or legacy .dat): the patched "
                   "quantized tensors are requantized weighing the error as llama-quantize --imatrix FILE does.")
@click.option("--download", is_flag=True,
              help="Fetch a MODEL repo id that is not in the Hugging Face cache (safetensors, config, tokenizer).")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", help="Upload the finished output to this Hub repo.")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
@click.option("--evaluate", "evaluate_kl", is_flag=True,
              help="After writing, measure the KL divergence from MODEL on a small built-in harmless set, "
                   "streamed, and warn when it is far above what abliteration usually costs (needs transformers).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="With --evaluate: folder of the tokenizer [default: MODEL's own].")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def apply_command(model: Path, direction: Path, out: Path | None, device: str, dry_run: bool,
                  overwrite: bool, in_place: bool, force: bool, layers: frozenset[int] | None, embeddings: bool,
                  scale: float,
                  norm_preserving: bool, targets: tuple[str, ...], imatrix: Path | None, download: bool,
                  push_to_hub: str | None,
                  private: bool, evaluate_kl: bool, tokenizer: Path | None, quiet: bool, debug: bool) -> None:
    """Write the abliterated copy of MODEL, with DIRECTION projected out of every residual writer.

    DIRECTION holds one row [d] (or [1, d]) for every layer, or one row per layer [n_layers, d] or per
    hidden state [n_layers + 1, d]: row i is used for layer i, row 0 for the embeddings.

    MODEL may be a Hub repo id (ORG/NAME[@REVISION], taken from the local Hugging Face cache; see
    --download) and DIRECTION may be REPO_ID:PATH (that one file is fetched, or taken from the cache).
    """
    if push_to_hub and dry_run:
        raise click.UsageError("--push-to-hub cannot be combined with --dry-run")
    if in_place and (out is not None or overwrite or evaluate_kl):
        other = "-o/--out" if out is not None else "--overwrite" if overwrite else "--evaluate (no source is left)"
        raise click.UsageError(f"--in-place writes into MODEL itself: it cannot be combined with {other}")
    if tokenizer is not None and not evaluate_kl:
        raise click.UsageError("--tokenizer is used only with --evaluate")
    if evaluate_kl and not dry_run:
        from orthopatch.run.layerwise import require_transformers

        with _reported(debug):
            require_transformers()
    with _reported(debug, "interrupted; rerun the same command to continue the download"):
        source = resolve_model(str(model), download=download, quiet=quiet)
        direction_source = resolve_direction(str(direction), quiet=quiet)
    model, direction, out = source.path, direction_source.path, None if in_place else out or source.default_out
    if evaluate_kl and not dry_run:
        from orthopatch.run.evaluate import prepare_kl_check
        from orthopatch.run.layerwise import RunSettings

        run_settings = RunSettings(device=device, tokenizer=tokenizer)
        with _reported(debug):  # before anything is written: a check that cannot run is refused now
            prepare_kl_check(model, run_settings)
    options = ApplyOptions(model=model, direction=direction, out=out, device=device, dry_run=dry_run,
                           overwrite=overwrite, quiet=quiet,
                           method=Method(Selection(layers, embeddings), scale, norm_preserving, targets),
                           base_model=source.name, direction_name=direction_source.name,
                           in_place=in_place, force=force, imatrix=imatrix)
    with _reported(debug, "interrupted; rerun the same command to continue"):
        result = apply(options)
    if result.state == "dry-run":
        click.echo(dry_run_text(result))
        return
    click.echo(result_line(result))
    if evaluate_kl:
        with _reported(debug):
            _check_kl(result.out, model, run_settings, quiet)
    if push_to_hub:
        with _reported(debug):
            _verify_before_push(result.out, options.direction, None if in_place else options.model, quiet=quiet)
            url = push_folder(result.out, push_to_hub, [s.name for s in result.plan.shards], private=private)
        click.echo(f"{result.out}: pushed to {url}")


def _check_kl(out: Path, source: Path, run: RunSettings, quiet: bool) -> None:
    """``apply --evaluate``: the KL figure, and a one-line warning when it is far above the usual cost
    or cannot be computed (a hidden state, logit or KL that is not finite: the output is written)."""
    from orthopatch.run.evaluate import KL_WARNING, builtin_kl_prompts, kl_check
    from orthopatch.run.layerwise import NonFiniteError

    prompts = builtin_kl_prompts()
    try:
        mean, peak = kl_check(out, source, prompts, run, quiet=quiet)
    except NonFiniteError as exc:
        click.echo(f"orthopatch: warning: no KL divergence from the source: {exc}; "
                   "do not use this model before finding out why", err=True)
        return
    figure = (f"KL divergence from the source on {len(prompts.prompts)} harmless prompts: "
              f"mean {mean:.4g}, max {peak:.4g}")
    if mean > KL_WARNING:
        click.echo(f"orthopatch: warning: {figure}, far above the usual cost of abliteration (> {KL_WARNING:g}); "
                   "check the direction (measure --project-harmless) before using this model", err=True)
    elif not quiet:
        click.echo(f"{out}: {figure}", err=True)


@main.command("demo")
@click.argument("folder", type=click.Path(path_type=Path), default=Path("demo"))
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def demo_command(folder: Path, quiet: bool) -> None:
    """Build a small Llama-shaped checkpoint in FOLDER, convert it, and verify the result."""
    from orthopatch.demo import run_demo

    try:
        lines = run_demo(folder, quiet=quiet)
    except (OrthopatchError, AssertionError) as exc:
        _fail(exc, False)
        return
    click.echo("\n".join(lines))


@main.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--direction", type=click.Path(path_type=Path),
              help="The direction file the output was made with (or REPO_ID:PATH) [default: the file OUT's "
                   "orthopatch.json records, if its sha256 is unchanged].")
@click.option("--source", type=click.Path(path_type=Path),
              help="The source model folder or cached repo id: compare every tensor with it "
                   "(unchanged ones byte for byte).")
@click.option("--imatrix", type=click.Path(path_type=Path), metavar="FILE",
              help="GGUF only: the importance matrix apply --imatrix used (its sha256 is in the record).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def verify_command(out: Path, direction: Path | None, source: Path | None, imatrix: Path | None, quiet: bool,
                   debug: bool) -> None:
    """Re-open OUT, written by apply, and check every shard and patched tensor; exit 1 on any failure.

    Without --source, each patched tensor must have no component along the direction beyond rounding
    noise; with it, each must equal the source projected in float64 and rounded once. A GGUF OUT
    (and --source MODEL.gguf) is read with gguf-py and checked against its requantized projection.
    """
    if out.suffix == ".gguf":
        _verify_gguf(out, direction, source, imatrix, quiet, debug)
        return
    if imatrix is not None:
        raise click.UsageError("--imatrix is for a GGUF output (llama.cpp's importance matrix)")
    from orthopatch.verify import VerifyOptions, format_table, recorded_direction, summary, verify

    with _reported(debug):
        if direction is None:
            direction = recorded_direction(out)
        direction = resolve_direction(str(direction), quiet=quiet).path
        source = resolve_model(str(source), quiet=quiet).path if source is not None else None
        report = verify(VerifyOptions(out=out, direction=direction, source=source, quiet=quiet))
    click.echo(format_table(report))
    click.echo(summary(report))
    for failure in report.failures:
        click.echo(f"orthopatch: error: {failure}", err=True)
    if not report.ok:
        sys.exit(1)


def _verify_gguf(out: Path, direction: Path | None, source: Path | None, imatrix: Path | None, quiet: bool,
                 debug: bool) -> None:
    """``verify`` of a GGUF output: the same table and summary, plus a line per tensor type."""
    from orthopatch.verify import format_table
    from orthopatch.verify.gguf import (
        GGUFVerifyOptions,
        format_types,
        gguf_summary,
        recorded_direction_gguf,
        verify_gguf,
    )

    with _reported(debug):
        if direction is None:
            direction = recorded_direction_gguf(out)
        direction = resolve_direction(str(direction), quiet=quiet).path
        report = verify_gguf(GGUFVerifyOptions(out=out, direction=direction, source=source, imatrix=imatrix,
                                               quiet=quiet))
    click.echo(format_table(report))
    if report.errors or report.weighted:
        click.echo(format_types(report))
    click.echo(gguf_summary(report))
    for failure in report.failures:
        click.echo(f"orthopatch: error: {failure}", err=True)
    if not report.ok:
        sys.exit(1)


def _prompt_options(command: Callable) -> Callable:
    """Options shared by measure and evaluate: where prompts come from, and how the model runs."""
    for option in reversed([
        click.option("--field", metavar="NAME", help="The field holding the prompt in .jsonl/.json records "
                     "[default: the first of prompt, instruction, goal, text]."),
        click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Use at most N prompts of each set."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing --limit prompts."),
        click.option("--tokenizer", type=click.Path(path_type=Path),
                     help="Folder of the tokenizer [default: MODEL's own]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True, help="Arithmetic dtype of the blocks."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Prompts per batch inside a block."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or tables on stderr."),
        click.option("--debug", is_flag=True, help="Show a traceback on errors."),
    ]):
        command = option(command)
    return command


@main.command("measure")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("refusal_dir.pth"), show_default=True,
              help="The direction file to write (.pth); its record goes beside it as .json.")
@click.option("--harmful", metavar="FILE", help="Harmful instructions: text (one per line), .jsonl or .json, "
              "REPO_ID:PATH or datasets/REPO_ID:PATH on the Hub [default: the built-in set].")
@click.option("--harmless", metavar="FILE", help="Harmless instructions, likewise [default: the built-in set].")
@click.option("--layer", type=int, metavar="L",
              help="Write the direction at layer L (the stream entering block L) [default: the best-separating "
                   "layer between 40% and 80% of the depth].")
@click.option("--per-layer", is_flag=True, help="Write one row per layer, [n_layers + 1, d], as apply reads it.")
@click.option("--project-harmless/--no-project-harmless", default=True, show_default=True,
              help="Remove the harmless mean's component from the direction before normalising it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing direction file and its .json record.")
@_prompt_options
def measure_command(model: Path, out: Path, harmful: str | None, harmless: str | None, layer: int | None,
                    per_layer: bool, project_harmless: bool, overwrite: bool, field: str | None, limit: int | None,
                    seed: int, tokenizer: Path | None, device: str, dtype: str, batch_size: int, quiet: bool,
                    debug: bool) -> None:
    """Measure MODEL's refusal direction: mean harmful minus mean harmless residual stream.

    Every prompt goes through block 0, then block 1, and so on: one block's weights are in memory at a
    time, the checkpoint is read once whatever the number of prompts, and the output head is never read.
    A table per layer goes to stderr.
    """
    if layer is not None and per_layer:
        raise click.UsageError("--layer and --per-layer exclude each other")
    from orthopatch.run.layerwise import RunSettings, require_transformers
    from orthopatch.run.measure import MeasureOptions, measure, sidecar_path
    from orthopatch.run.prompts import PromptChoice

    with _reported(debug):
        require_transformers()
        source = resolve_model(str(model), quiet=quiet)
        options = MeasureOptions(model=source.path, out=out, harmful=harmful, harmless=harmless,
                                 choice=PromptChoice(field, limit, seed), layer=layer, per_layer=per_layer,
                                 project_harmless=project_harmless,
                                 run=RunSettings(device, dtype, batch_size, tokenizer), quiet=quiet,
                                 overwrite=overwrite, model_repo=source.hub_ref)
        result = measure(options)
    record = result.record
    where = "one row per layer" if record.per_layer else f"layer {record.layer} ({record.layer_rule})"
    click.echo(f"{out}: direction of {source.name}, {where}, from {record.harmful.count} harmful and "
               f"{record.harmless.count} harmless prompts; record in {sidecar_path(out)}")


@main.command("evaluate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--source", required=True, type=click.Path(path_type=Path),
              help="The model MODEL was made from (folder or cached repo id).")
@click.option("--harmless", metavar="FILE", help="Harmless prompts for the KL [default: the built-in held-out set].")
@click.option("--harmful", metavar="FILE",
              help="Harmful prompts for the refusal rate [default: the built-in held-out set].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated (greedily) per harmful prompt.")
@click.option("--refusal-markers", "markers", type=click.Path(path_type=Path),
              help="Phrases (one per line) that make a reply a refusal [default: the built-in list].")
@click.option("--no-refusals", is_flag=True, help="Only the KL: generate nothing.")
@click.option("--in-memory", is_flag=True,
              help="Load each model whole and generate with a cache (when it fits in memory). Streamed, "
                   "without it, generation reads the weights once per generated token.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures to this file.")
@_prompt_options
def evaluate_command(model: Path, source: Path, harmless: str | None, harmful: str | None, max_new_tokens: int,
                     markers: Path | None, no_refusals: bool, in_memory: bool, json_path: Path | None,
                     field: str | None, limit: int | None, seed: int, tokenizer: Path | None, device: str,
                     dtype: str, batch_size: int, quiet: bool, debug: bool) -> None:
    """Judge MODEL against SRC: KL divergence on harmless prompts, refusal rates on harmful ones.

    KL: of the next-token distribution at the first response position, SRC against MODEL (mean and
    maximum), each model run once, one block at a time. Refusal rate: greedy replies to held-out
    harmful prompts containing a refusal marker. Streamed, every generated token is one more pass
    over the weights; --in-memory is much faster when the model fits.
    """
    from orthopatch.io.folders import check_output_file, write_atomic
    from orthopatch.run.evaluate import EvaluateOptions, evaluate, format_report
    from orthopatch.run.layerwise import RunSettings, require_transformers
    from orthopatch.run.prompts import PromptChoice

    with _reported(debug):
        require_transformers()
        if json_path is not None:  # checked before hours of generation, not after
            check_output_file(json_path, "--json")
        model_source = resolve_model(str(model), quiet=quiet)
        source_source = resolve_model(str(source), quiet=quiet)
        options = EvaluateOptions(model=model_source.path, source=source_source.path, harmless=harmless,
                                  harmful=harmful, choice=PromptChoice(field, limit, seed),
                                  max_new_tokens=max_new_tokens, markers=markers, refusals=not no_refusals,
                                  in_memory=in_memory, run=RunSettings(device, dtype, batch_size, tokenizer),
                                  quiet=quiet, model_repo=model_source.hub_ref, source_repo=source_source.hub_ref)
        report = evaluate(options)
    click.echo(format_report(report))  # the figures are shown even if the file cannot be written
    if json_path is not None:
        import json

        with _reported(debug):
            write_atomic(json_path, (json.dumps(report.to_json(), indent=2) + "\n").encode())


@main.command("optimize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("refusal_dir.safetensors"),
              show_default=True, help="The weighted direction file to write (apply reads it).")
@click.option("--trials", type=int, default=100, show_default=True, help="Trials in the search (in all, when resumed).")
@click.option("--harmful", metavar="FILE", help="Harmful instructions to measure on [default: the built-in set].")
@click.option("--harmless", metavar="FILE", help="Harmless instructions to measure on [default: the built-in set].")
@click.option("--eval-harmful", metavar="FILE", help="Harmful prompts the trials' refusals are judged on, held out "
              "from the measurement prompts [default: the built-in held-out set]; --limit does not apply.")
@click.option("--eval-harmless", metavar="FILE",
              help="Harmless prompts the trials' KL is judged on, likewise [default: the built-in held-out set].")
@click.option("--study", type=click.Path(path_type=Path),
              help="Keep the search in this file (an Optuna journal; .db: SQLite) and resume it when it exists.")
@click.option("--max-kl", type=float, help="Choose the fewest refusals among trials with at most this mean KL.")
@click.option("--confirm", type=int, default=3, show_default=True, metavar="K",
              help="Confirm up to K candidates (1 to 20) with greedy replies; the fewest greedy refusals wins.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens of the greedy replies that confirm the candidates.")
@click.option("--refusal-markers", "markers", type=click.Path(path_type=Path),
              help="Phrases (one per line) that make a reply a refusal; their first tokens are the refusal "
                   "openings trials measure [default: the built-in list].")
@click.option("--project-harmless/--no-project-harmless", default=True, show_default=True,
              help="Remove the harmless mean's component from each layer's difference (as measure).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_prompt_options
def optimize_command(model: Path, out: Path, trials: int, harmful: str | None, harmless: str | None,
                     eval_harmful: str | None, eval_harmless: str | None, study: Path | None,
                     max_kl: float | None, confirm: int, max_new_tokens: int, markers: Path | None,
                     project_harmless: bool,
                     overwrite: bool, field: str | None, limit: int | None, seed: int, tokenizer: Path | None,
                     device: str, dtype: str, batch_size: int, quiet: bool, debug: bool) -> None:
    """Search per-layer ablation weights for MODEL: fewer refusals for less KL, one pass per trial.

    Measures the per-layer directions once, then searches (Optuna's TPE sampler, seeded with --seed)
    the direction and the attention and MLP weight profiles; each trial runs every prompt through the
    blocks once with the ablation applied to the activations. Confirms up to --confirm candidates (fewest
    counted refusals, then least KL) with greedy replies, prints the Pareto front and writes the one with
    the fewest greedy refusals, then least KL, as a weighted direction file.
    """
    from orthopatch.run.layerwise import RunSettings, require_transformers
    from orthopatch.run.optimize import OptimizeOptions, check_options, describe_choice, optimize, require_optuna
    from orthopatch.run.prompts import PromptChoice

    with _reported(debug):
        options = OptimizeOptions(model=model, out=out, harmful=harmful, harmless=harmless,
                                  eval_harmful=eval_harmful, eval_harmless=eval_harmless,
                                  choice=PromptChoice(field, limit, seed), trials=trials, seed=seed, study=study,
                                  max_kl=max_kl, confirm=confirm, max_new_tokens=max_new_tokens, markers=markers,
                                  project_harmless=project_harmless,
                                  run=RunSettings(device, dtype, batch_size, tokenizer), quiet=quiet,
                                  overwrite=overwrite)
        check_options(options)
        require_optuna()
        require_transformers()
        source = resolve_model(str(model), quiet=quiet)
        result = optimize(replace(options, model=source.path, model_repo=source.hub_ref))
    click.echo(result.table)
    chosen = result.chosen.figures
    click.echo(f"{out}: trial {result.chosen.number} of {result.trials_total} ({result.trials_run} run now): "
               f"refusal probability {chosen.refusal:.4f}, KL {chosen.kl_mean:.4g}; greedy replies refused "
               f"{result.confirmed}/{result.harmful_count} (source {result.source_refusals}/{result.harmful_count}); "
               f"chosen: {describe_choice(result.confirmations, result.harmful_count)}")

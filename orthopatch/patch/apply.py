"""``orthopatch apply``: plan from headers, then stream every shard into the output folder."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orthopatch.devices import resolve_device
from orthopatch.errors import OrthopatchError, quoted
from orthopatch.hub import folder_name
from orthopatch.io.checkpoint import model_folder, open_checkpoint
from orthopatch.io.filecopy import CopyStats
from orthopatch.io.folders import shared_lock, write_atomic
from orthopatch.io.formats import CARD_NAME, INDEX_NAME, PARTIAL_NAME
from orthopatch.io.model_files import copy_model_file, model_files
from orthopatch.io.smallfile import read_small_bytes
from orthopatch.patch.architecture import choose_architecture
from orthopatch.patch.direction import Direction, load_direction
from orthopatch.patch.inplace import Journal, apply_in_place
from orthopatch.patch.model_card import read_source_card, write_model_card
from orthopatch.patch.output import OutputFolder, OutputState, shard_done
from orthopatch.patch.plan import PatchPlan, ShardPlan, build_plan, format_plan
from orthopatch.patch.record import Fingerprint, Method, Record
from orthopatch.patch.shard import target_directions, write_shard
from orthopatch.patch.stream import TensorPatcher
from orthopatch.progress import ByteProgress


@dataclass(frozen=True)
class ApplyOptions:
    """Everything ``apply`` needs; the CLI only builds one of these."""

    model: Path
    direction: Path
    out: Path | None = None
    device: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    quiet: bool = False
    method: Method = field(default_factory=Method)
    #: How the model card names the source and the direction (default: folder and file names).
    base_model: str | None = None
    direction_name: str | None = None
    #: Rewrite the patched tensors inside ``model``'s own shards (see :mod:`orthopatch.patch.inplace`).
    in_place: bool = False

    @property
    def out_path(self) -> Path:
        if self.in_place:
            return model_folder(self.model)
        if self.out is not None:
            return self.out
        model = Path(os.path.abspath(model_folder(self.model)))  # a symlinked model folder keeps its name
        return model.with_name(model.name + "-abliterated")


@dataclass(frozen=True)
class ApplyResult:
    out: Path
    plan: PatchPlan
    state: str  # "dry-run", "already complete", "written", "resumed"
    seconds: float = 0.0
    #: Bytes of patched tensors written by this run (shards finished by an earlier run not counted).
    patched: int = 0
    #: Where this run's unchanged bytes went: shared with the source, copied in the kernel, or by hand.
    copied: CopyStats = field(default_factory=CopyStats)
    in_place: bool = False


def prepare(options: ApplyOptions) -> tuple[PatchPlan, Direction]:
    """Open and cross-check the source, build the plan, load and check the direction."""
    checkpoint = open_checkpoint(options.model)
    arch = choose_architecture(checkpoint, options.method.targets)
    plan = build_plan(checkpoint, arch, options.method.selection)
    direction = load_direction(options.direction, plan.hidden_size, plan.num_layers)
    return plan, direction


def apply(options: ApplyOptions, log: Callable[[str], None] | None = None) -> ApplyResult:
    """Convert ``options.model`` into ``options.out_path``; see the module docs for the guarantees."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    if options.method.scale == 0:
        raise OrthopatchError("scale 0 removes nothing: the output would be a copy recorded as abliterated")
    plan, direction = prepare(options)
    check_not_partial(plan.checkpoint.root)
    source_card = read_source_card(plan.checkpoint.root)  # read (and checked) before anything is written
    for note in direction.notes:
        log(f"note: {note}")
    out_path = options.out_path
    if options.dry_run:
        return ApplyResult(out_path, plan, "dry-run", in_place=options.in_place)
    if options.in_place:
        done = apply_in_place(plan, direction, direction_file=Path(os.path.abspath(options.direction)),
                              method=options.method, device=options.device, quiet=options.quiet, log=log,
                              base_model=options.base_model,
                              direction_name=options.direction_name or options.direction.name)
        return ApplyResult(out_path, plan, done.state, done.seconds, done.patched, done.copied, in_place=True)
    with shared_lock(plan.checkpoint.root, "an orthopatch run is converting this folder in place: it is not a "
                     "source until that run ends", "model folder"):
        return _apply_out_of_place(options, plan, direction, source_card, log)


def check_not_partial(root: Path) -> None:
    """Refuse a model folder holding the marker of an interrupted out-of-place run: a half-written output
    (some shards patched, some missing or still the source's) converted again would be patched twice."""
    if os.path.lexists(root / PARTIAL_NAME):
        raise OrthopatchError(f"holds {PARTIAL_NAME}, the marker of an interrupted orthopatch run: it is a "
                              "half-written output, not a model to convert (rerun the command that was writing "
                              "it to finish it)", path=root)


def _apply_out_of_place(options: ApplyOptions, plan: PatchPlan, direction: Direction,
                        source_card: tuple[dict, str], log: Callable[[str], None]) -> ApplyResult:
    """Write the converted copy; the caller holds a shared lock on the source folder."""
    out_path = options.out_path
    if Journal(plan.checkpoint.root).exists():
        raise OrthopatchError("an in-place conversion of this folder is unfinished (rerun it with --in-place to "
                              "finish it): it is not a source", path=plan.checkpoint.root)

    device = resolve_device(options.device)
    started = time.monotonic()
    method = options.method
    patcher = TensorPatcher(device, scale=method.scale, norm_preserving=method.norm_preserving)
    fingerprint = Fingerprint.of(plan, direction.sha256, method, device.type, patcher.kernel.block_elements)
    fp = fingerprint.to_json()
    src = plan.checkpoint.root
    with OutputFolder(out_path, src) as out:
        state = out.state(fp)
        if state is OutputState.COMPLETE:
            return ApplyResult(out_path, plan, "already complete")
        if state is OutputState.OTHER:
            if not options.overwrite:
                raise OrthopatchError(f"output folder {out.describe_other()} (use --overwrite to replace it)",
                                      path=out_path)
            out.clear()
            state = OutputState.NEW
        files = model_files(src)
        written = [Path(s.name) for s in plan.shards] + files.copied + [Path(INDEX_NAME), Path(CARD_NAME)]
        out.remove_temporaries(written)
        out.begin(fp)
        for rel, why in files.skipped:
            log(f"note: not copied: {quoted(str(rel))} {why}")

        directions = target_directions(plan, direction)
        todo = [s for s in plan.shards
                if not shard_done(out_path, s.name, s.header.raw, s.header.file_size)]
        log(plan_line(plan, device, todo))
        copied = CopyStats()
        with ByteProgress(sum(s.header.file_size for s in todo), disable=options.quiet) as progress:
            for shard in todo:
                progress.set_description(quoted(shard.name))
                copied += write_shard(shard, src, out_path, directions, patcher, progress.update)
        for rel in files.copied:
            copy_model_file(src, out_path, rel)
        if plan.checkpoint.index_path is not None:
            write_atomic(out_path / INDEX_NAME, read_small_bytes(plan.checkpoint.index_path, "index"))
        seconds = time.monotonic() - started
        record = Record.of(plan, source=options.model, direction_file=Path(os.path.abspath(options.direction)),
                           direction_sha256=direction.sha256, direction_rows=int(direction.rows.shape[0]),
                           method=method, device=str(device), seconds=seconds, fingerprint=fingerprint)
        write_model_card(out_path, src, record, base_model=options.base_model or folder_name(src),
                         direction=options.direction_name or options.direction.name, source=source_card)
        out.complete(record.to_json())
    resumed = state is OutputState.PARTIAL
    return ApplyResult(out_path, plan, "resumed" if resumed else "written", seconds,
                       patched=sum(s.patched_bytes for s in todo), copied=copied)


def plan_line(plan: PatchPlan, device: object, todo: list[ShardPlan]) -> str:
    """One line of plan before the progress bar: architecture, device, what is patched and copied."""
    n = sum(1 for _ in plan.targets())
    left = "" if len(todo) == len(plan.shards) else f", {len(todo)} of {len(plan.shards)} shards left to write"
    return (f"{plan.architecture.name} on {device}: patching {n} tensors ({plan.patched_bytes:,} bytes), "
            f"copying {plan.total_bytes - plan.patched_bytes:,} bytes unchanged{left}")


def dry_run_text(result: ApplyResult) -> str:
    where = "in place" if result.in_place else "output"
    return f"{format_plan(result.plan)}\n{where}: {result.out} (nothing written: dry run)"

"""``orthopatch apply``: prepare the conversion once, then run it into a new folder or in place."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.convert import apply_gguf
from orthopatch.gguf.plan import GGUFPlan, format_gguf_plan
from orthopatch.io.checkpoint import folder_name, open_checkpoint
from orthopatch.io.folders import shared_lock
from orthopatch.io.formats import PARTIAL_NAME
from orthopatch.patch.architecture import choose_architecture
from orthopatch.patch.conversion import CardFacts, prepare_conversion
from orthopatch.patch.direction import Direction, load_direction
from orthopatch.patch.driver import ApplyResult, Destination, RunState, run
from orthopatch.patch.inplace import InPlaceDestination
from orthopatch.patch.model_card import read_source_card
from orthopatch.patch.options import ApplyOptions
from orthopatch.patch.output import FolderDestination
from orthopatch.patch.plan import PatchPlan, build_plan, format_plan
from orthopatch.patch.weights import weighted_plan


def prepare(options: ApplyOptions) -> tuple[PatchPlan, Direction]:
    """Open and cross-check the source, build the plan, load and check the direction; a weighted
    direction's zero-weight targets leave the plan."""
    checkpoint = open_checkpoint(options.model)
    arch = choose_architecture(checkpoint, options.method.targets)
    plan = build_plan(checkpoint, arch, options.method.selection)
    direction = load_direction(options.direction, plan.hidden_size, plan.num_layers)
    if direction.weights is not None:
        plan = weighted_plan(plan, direction.weights)
    return plan, direction


def apply(options: ApplyOptions, log: Callable[[str], None] | None = None) -> ApplyResult:
    """Convert ``options.model`` into ``options.out_path`` (a new folder, or the model itself in place)."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    if options.method.scale == 0:
        raise OrthopatchError("scale 0 removes nothing: the output would be a copy recorded as abliterated")
    if options.is_gguf:
        return apply_gguf(options, log)
    if options.imatrix is not None:
        raise OrthopatchError("--imatrix is llama.cpp's importance matrix for requantizing a GGUF file; this model "
                              "is safetensors, whose tensors are not requantized", path=options.model)
    plan, direction = prepare(options)
    root = plan.checkpoint.root
    check_not_partial(root)
    # read (and checked) before anything is written
    source_card = read_source_card(root, note=lambda message: log(f"note: {message}"))
    for note in direction.notes:
        log(f"note: {note}")
    if direction.weights is not None:
        log(f"note: weighted direction: strength = scale {options.method.scale:g} × {direction.weights.describe()} "
            "(weight 0: not patched)")
    if options.dry_run:
        return ApplyResult(options.out_path, plan, RunState.DRY_RUN, in_place=options.in_place)
    card = CardFacts(options.base_model or folder_name(root), options.direction_name or options.direction.name,
                     source_card)

    def convert(destination: Destination) -> ApplyResult:
        method = replace(options.method, weights=direction.weights)  # the weights are part of the method
        conversion = prepare_conversion(plan, direction, direction_file=Path(os.path.abspath(options.direction)),
                                        source=options.model, method=method, device=options.device,
                                        card=card, force=options.force)
        return run(conversion, destination, quiet=options.quiet, log=log)

    if options.in_place:
        return convert(InPlaceDestination(options.out_path, options.quiet))
    with shared_lock(root, "an orthopatch run is converting this folder in place: it is not a source until that "
                     "run ends", "model folder"):
        return convert(FolderDestination(options.out_path, options.overwrite))


def check_not_partial(root: Path) -> None:
    """Refuse a model folder holding the marker of an interrupted out-of-place run: a half-written output
    (some shards patched, some missing or still the source's) converted again would be patched twice."""
    if os.path.lexists(root / PARTIAL_NAME):
        raise OrthopatchError(f"holds {PARTIAL_NAME}, the marker of an interrupted orthopatch run: it is a "
                              "half-written output, not a model to convert (rerun the command that was writing "
                              "it to finish it)", path=root)


def dry_run_text(result: ApplyResult) -> str:
    where = "in place" if result.in_place else "output"
    text = format_gguf_plan(result.plan) if isinstance(result.plan, GGUFPlan) else format_plan(result.plan)
    return f"{text}\n{where}: {result.out} (nothing written: dry run)"

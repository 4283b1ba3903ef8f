"""``apply`` for a GGUF file: plan from its headers, then the same driver into new GGUF parts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.output import GGUFDestination, output_parts
from orthopatch.gguf.plan import GGUFPlan, build_gguf_plan
from orthopatch.gguf.split import open_split
from orthopatch.patch.conversion import CardFacts, prepare_conversion
from orthopatch.patch.direction import Direction, load_direction
from orthopatch.patch.driver import ApplyResult, RunState, run
from orthopatch.patch.options import ApplyOptions


def default_output(model: Path) -> Path:
    """``NAME-abliterated.gguf`` beside ``NAME.gguf`` (a split model keeps its part numbering)."""
    stem = model.name.removesuffix(".gguf")
    head, sep, tail = stem.rpartition("-00001-of-")
    if sep:
        return model.with_name(f"{head}-abliterated-00001-of-{tail}.gguf")
    return model.with_name(f"{stem}-abliterated.gguf")


def prepare_gguf(options: ApplyOptions) -> tuple[GGUFPlan, Direction]:
    """Read and check every part's header, build the plan, load and check the direction."""
    if options.method.targets:
        raise OrthopatchError("--targets names safetensors tensors; a GGUF file's writers come from its architecture",
                              path=options.model)
    plan = build_gguf_plan(open_split(options.model), options.method.selection)
    direction = load_direction(options.direction, plan.hidden_size, plan.num_layers)
    if direction.weights is not None:
        raise OrthopatchError("a weighted direction (per-layer weights) is not supported for GGUF files yet: apply "
                              "it to the safetensors model", path=options.direction)
    return plan, direction


def apply_gguf(options: ApplyOptions, log: Callable[[str], None]) -> ApplyResult:
    """Convert the GGUF ``options.model`` into new GGUF parts (``-o``, or ``NAME-abliterated.gguf``)."""
    plan, direction = prepare_gguf(options)
    for note in direction.notes:
        log(f"note: {note}")
    first_out = options.out if options.out is not None else default_output(options.model)
    if options.in_place:
        raise OrthopatchError("--in-place is not available for GGUF files yet: write a new file (the unchanged "
                              "tensors are shared with the source where the filesystem can)", path=options.model)
    if options.dry_run:
        return ApplyResult(first_out, plan, RunState.DRY_RUN)
    card = CardFacts(options.base_model or options.model.name, options.direction_name or options.direction.name,
                     ({}, ""))
    conversion = prepare_conversion(plan, direction, direction_file=Path(os.path.abspath(options.direction)),
                                    source=options.model, method=options.method, device=options.device, card=card)
    destination = GGUFDestination(output_parts(first_out, len(plan.parts)), options.overwrite)
    return run(conversion, destination, quiet=options.quiet, log=log)

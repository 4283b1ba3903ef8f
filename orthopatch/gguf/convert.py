"""``apply`` for a GGUF file: plan from its headers, then the same driver into new GGUF parts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from orthopatch.errors import OrthopatchError
from orthopatch.gguf.imatrix import read_imatrix
from orthopatch.gguf.inplace import (
    BUSY,
    GGUFInPlaceDestination,
    GGUFJournal,
    check_writable_file,
    finish_header_step,
    original_headers,
)
from orthopatch.gguf.output import GGUFDestination, output_parts
from orthopatch.gguf.plan import FLOAT_TYPES, GGUFPlan, build_gguf_plan
from orthopatch.gguf.quants import IMATRIX_TYPES
from orthopatch.gguf.split import open_split
from orthopatch.io.folders import exclusive_lock, shared_lock
from orthopatch.patch.conversion import CardFacts, prepare_conversion
from orthopatch.patch.direction import Direction, file_sha256, load_direction
from orthopatch.patch.driver import ApplyResult, RunState, run
from orthopatch.patch.inplace import describe
from orthopatch.patch.options import ApplyOptions
from orthopatch.patch.record import ImatrixInfo

#: Tensors llama-quantize quantizes without weights when their importance matrix entry has the wrong length.
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


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


def with_imatrix(plan: GGUFPlan, options: ApplyOptions, log: Callable[[str], None]) -> tuple[GGUFPlan, ApplyOptions]:
    """The plan with the importance weights of its quantized targets, and the options whose method records the
    file (``--imatrix``); unchanged without one. Entries are matched by tensor name as llama-quantize matches
    them; a quantized target without one is requantized without weights, as llama-quantize does, and named in
    a note. Float targets ignore the file."""
    if options.imatrix is None:
        return plan, options
    imatrix = read_imatrix(options.imatrix, keep={t.name for t in plan.all_targets()})
    weights, missing = {}, []
    for target in plan.all_targets():
        tensor = plan.part_of(target.name).by_name[target.name]
        if tensor.qtype in FLOAT_TYPES:
            continue
        try:
            found = imatrix.for_tensor(tensor)
        except OrthopatchError:
            if target.name not in EMBEDDINGS:
                raise
            found = None  # llama-quantize too quantizes the embeddings without it
        if tensor.qtype in IMATRIX_TYPES:
            if found is None:
                missing.append(target.name)
            else:
                weights[target.name] = found
    log(f"note: importance matrix {options.imatrix.name} ({imatrix.format}, {imatrix.count:,} entries): "
        f"{len(weights)} quantized tensor(s) requantized with its weights")
    if missing:
        names = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        log(f"note: the importance matrix has no usable entry for {len(missing)} patched tensor(s), requantized "
            f"without weights as llama-quantize does: {names}")
    info = ImatrixInfo(options.imatrix.name, imatrix.sha256)
    return dataclasses.replace(plan, importance=weights), \
        dataclasses.replace(options, method=dataclasses.replace(options.method, imatrix=info))


def apply_gguf(options: ApplyOptions, log: Callable[[str], None]) -> ApplyResult:
    """Convert the GGUF ``options.model`` into new GGUF parts (``-o``, or ``NAME-abliterated.gguf``), or in place."""
    if options.in_place:
        return _apply_in_place(options, log)
    first = Path(os.path.abspath(options.model))
    with shared_lock(first.parent, "an orthopatch run is converting a GGUF file in this folder in place: it is not "
                     "a source until that run ends", "model folder"):
        if GGUFJournal(first).exists():
            raise OrthopatchError("is half converted in place (an interrupted apply --in-place): rerun that command "
                                  "to finish it", path=options.model)
        plan, direction = prepare_gguf(options)
        for note in direction.notes:
            log(f"note: {note}")
        plan, options = with_imatrix(plan, options, log)
        first_out = options.out if options.out is not None else default_output(options.model)
        if options.dry_run:
            return ApplyResult(first_out, plan, RunState.DRY_RUN)
        conversion = prepare_conversion(plan, direction, direction_file=Path(os.path.abspath(options.direction)),
                                        source=options.model, method=options.method, device=options.device,
                                        card=_card(options))
        destination = GGUFDestination(output_parts(first_out, len(plan.parts)), options.overwrite)
        return run(conversion, destination, quiet=options.quiet, log=log)


def _card(options: ApplyOptions) -> CardFacts:
    return CardFacts(options.base_model or options.model.name, options.direction_name or options.direction.name,
                     ({}, ""))


def _apply_in_place(options: ApplyOptions, log: Callable[[str], None]) -> ApplyResult:
    """Rewrite the patched tensors inside the GGUF file(s) (:mod:`orthopatch.gguf.inplace`)."""
    first = Path(os.path.abspath(options.model))
    options = dataclasses.replace(options, model=first)
    with exclusive_lock(first.parent, BUSY):
        journal = GGUFJournal(first)
        if not options.dry_run and os.path.lexists(first):
            check_writable_file(first)
            _check_same_run(journal, options)
            finish_header_step(journal, first.parent)
        plan, direction = prepare_gguf(options)
        for note in direction.notes:
            log(f"note: {note}")
        plan, options = with_imatrix(plan, options, log)
        if options.dry_run:
            return ApplyResult(first, plan, RunState.DRY_RUN, in_place=True)
        conversion = prepare_conversion(plan, direction, direction_file=Path(os.path.abspath(options.direction)),
                                        source=first, method=options.method, device=options.device,
                                        card=_card(options))
        fingerprint = dataclasses.replace(conversion.fingerprint, source_headers=original_headers(plan.parts))
        conversion = dataclasses.replace(conversion, fingerprint=fingerprint)
        return run(conversion, GGUFInPlaceDestination(first, options.quiet), quiet=options.quiet, log=log)


def _check_same_run(journal: GGUFJournal, options: ApplyOptions) -> None:
    """An interrupted run (whose headers may be unreadable now) is finished only by its own command."""
    journal.check_path()
    if not journal.exists():
        return
    state = journal.read(2**62)
    fp = state["fingerprint"]
    method = options.method
    if options.imatrix is not None:
        info = ImatrixInfo(options.imatrix.name, read_imatrix(options.imatrix, keep=()).sha256)
        method = dataclasses.replace(method, imatrix=info)
    if fp.get("direction_sha256") != file_sha256(options.direction) or fp.get("method") != method.to_json():
        direction = state.get("direction") if isinstance(state.get("direction"), dict) else {}
        options_doc = state.get("options") if isinstance(state.get("options"), dict) else {}
        what = describe(str(direction.get("file", "?")), str(direction.get("sha256", "?")), options_doc)
        raise OrthopatchError(f"an interrupted in-place conversion with {what} is unfinished; rerun that command "
                              "to finish it", path=options.model)

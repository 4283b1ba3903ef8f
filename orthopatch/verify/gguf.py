"""``orthopatch verify`` for a GGUF output: a second opinion read with gguf-py, computed in float64 numpy.

Files are opened with gguf-py's ``GGUFReader`` and dequantized with ``gguf.quants.dequantize``; what
was patched comes from the ``orthopatch.record`` metadata, checked against the architecture table
(:mod:`.gguf_files`). With ``--source`` every patched tensor is projected again from the source's
dequantized values (``W - s·u(uᵀW)`` along the recorded axis, ``u`` gain-weighted where a norm
follows, columns or rows rescaled to their norm when norm-preserving) and rounded to float32, then:

- F32, F16, BF16 and the legacy types gguf-py quantizes (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): requantized by
  gguf-py, the stored blocks must equal it on at least 99.9% of blocks, and each other block may be off
  only as a float32 rounding tie can make it (one element, or one ulp of a float);
- k-quants, which gguf-py cannot quantize: the relative RMS error against the exact projection must stay
  under :data:`KQUANT_BOUNDS`, and the tensor must not be the source's bytes.

An output requantized with llama.cpp's importance matrix (``apply --imatrix``, recorded with its
sha256) has weighted quantizers behind its Q4_0, Q4_1, Q5_0, Q5_1 and k-quant tensors, which gguf-py
does not have. Given the same file (``--imatrix``), each such tensor that has an entry is held to a
bound on its importance-weighted relative RMS error (:data:`IMATRIX_BOUNDS`, the error the weighted
quantizer minimizes); the others are checked as above. Without it, or with another file, those
tensors are only measured (their share along the direction), and a note says so.

Unpatched tensors must be the source's bytes and the metadata the source's, except ``orthopatch.*``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from orthopatch.errors import OrthopatchError
from orthopatch.patch.direction import Direction, load_direction
from orthopatch.patch.record import ConversionRecord, Method
from orthopatch.verify.gguf_files import (
    RECORD_KEY,
    Expected,
    Part,
    TensorRows,
    check_record_targets,
    compare_metadata,
    compare_tensor_infos,
    open_parts,
    read_record,
    record_doc,
)
from orthopatch.verify.gguf_weights import IMATRIX_BOUNDS, Mode, mode_of, recorded_importance
from orthopatch.verify.reference import unit_vector
from orthopatch.verify.report import TensorCheck, VerifyReport

Q = gguf.GGMLQuantizationType
#: Types whose bytes gguf-py writes itself: the output must be those bytes.
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
#: k-quants: the largest relative RMS error ``‖out − exact‖/‖exact‖`` accepted. About 1.5× the worst error
#: of llama.cpp's quantizer on fresh float32 data (Gaussian, Laplace, Student-t with 3 and 2 degrees of
#: freedom, 256×1024): Q2_K 0.351, Q3_K 0.189, Q4_K 0.093, Q5_K 0.046, Q6_K 0.029. A patched tensor is
#: requantized from values already on the type's grid, and measured lower on the test models: Q2_K
#: 0.078, Q3_K 0.068, Q4_K 0.049, Q5_K 0.031, Q6_K 0.016.
KQUANT_BOUNDS = {Q.Q2_K: 0.55, Q.Q3_K: 0.3, Q.Q4_K: 0.15, Q.Q5_K: 0.075, Q.Q6_K: 0.045}
#: Share of blocks that must be the bytes gguf-py writes.
MIN_SAME_BLOCKS = 0.999
#: float64 values per chunk of rows.
CHUNK_VALUES = 1 << 20
#: Near cancellation, a float result may be off by this many float32 ulps of its operands.
CANCEL_ULPS = 8
#: (epsilon, log2 of the smallest normal) of the float types.
FLOAT_FORMATS = {Q.F32: (2.0**-23, -126), Q.F16: (2.0**-10, -14), Q.BF16: (2.0**-7, -126)}

Log = Callable[[str], None]


@dataclass(frozen=True)
class GGUFVerifyOptions:
    """Everything ``verify`` of a GGUF output needs."""

    out: Path
    direction: Path
    source: Path | None = None
    #: The importance matrix the output was requantized with, when its record names one.
    imatrix: Path | None = None
    quiet: bool = False


@dataclass
class GGUFVerifyReport(VerifyReport):
    """The safetensors report, plus per tensor type what the data checks measured."""

    errors: dict[str, list[float]] = field(default_factory=dict)  # type -> relative RMS error per tensor
    blocks: dict[str, list[int]] = field(default_factory=dict)  # type -> [blocks as gguf-py writes them, blocks]
    weighted: dict[str, list[float]] = field(default_factory=dict)  # type -> importance-weighted error per tensor


def recorded_direction_gguf(out: Path) -> Path:
    """The direction file the output's record names, if it still has the recorded sha256."""
    from orthopatch.verify import recorded_file

    parts = open_parts(out)
    doc = record_doc(parts[0])
    direction = doc.get("direction")
    file = direction.get("file") if isinstance(direction, dict) else None
    sha256 = direction.get("sha256") if isinstance(direction, dict) else None
    return recorded_file(file, sha256, out)


def verify_gguf(options: GGUFVerifyOptions, log: Log | None = None) -> GGUFVerifyReport:
    """Check a GGUF output; failures are collected in the report, unreadable input raises one line."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    report = GGUFVerifyReport(options.out, options.source)
    parts = open_parts(options.out)
    record = read_record(parts[0])
    where = options.out
    if record.method.scale == 0:
        report.fail("the record claims scale 0, which removes nothing: this output is not abliterated", path=where)
    check_record_targets(report, record, parts, where)
    arch = parts[0].value(gguf.Keys.General.ARCHITECTURE)
    hidden = parts[0].value(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    layers = parts[0].value(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if not isinstance(hidden, int) or not isinstance(layers, int):
        raise OrthopatchError("has no embedding length or block count in its metadata", path=where)
    direction = load_direction(options.direction, hidden, layers)
    report.notes.extend(direction.notes)
    if direction.sha256 != record.direction.sha256:
        report.fail("is not the direction file this output was made with (its sha256 differs from the record's)",
                    path=direction.path)
    targets = {t.name: Expected(t.name, t.role, t.layer, t.axis, t.gain) for t in record.tensors_patched}
    units = _unit_vectors(parts, targets, direction)
    sources = _source_parts(report, options, parts)
    importance = recorded_importance(report, options.imatrix, record, parts, set(targets)) \
        if sources is not None else None
    if sources is None and options.imatrix is not None:
        report.notes.append("--imatrix is used only with --source, to weigh the comparison with the source")
    if sources is None and record.method.scale != 1.0:
        report.notes.append(f"scale {record.method.scale:g} removes only part of the component: without --source "
                            "the patched tensors are measured, not checked")
    for index, out in enumerate(parts):
        src = sources[index] if sources is not None else None
        if src is not None and not compare_tensor_infos(report, src, out):
            continue
        src_tensors = src.tensors if src is not None else {}
        for tensor in out.reader.tensors:
            rows = TensorRows(out, tensor)
            src_rows = TensorRows(src, src_tensors[tensor.name]) if src is not None else None
            report.checked_bytes += rows.nbytes
            target = targets.get(tensor.name)
            if target is None:
                if src_rows is not None:
                    at = src_rows.same_bytes(rows)
                    if at is not None:
                        report.fail(f"differs from the source (first at byte {at} of the tensor), but it is not "
                                    "patched", path=out.path, tensor=tensor.name)
                    else:
                        report.identical += 1
                continue
            _check_patched(report, target, rows, src_rows, units[tensor.name], record,
                           mode_of(record, importance, tensor.name, rows.qtype))
    for note in report.notes:
        log(f"note: {note}")
    return report


def _source_parts(report: VerifyReport, options: GGUFVerifyOptions, parts: list[Part]) -> list[Part] | None:
    if options.source is None:
        return None
    if options.source.resolve() == options.out.resolve():
        raise OrthopatchError("is the file being verified: give the source it was converted from",
                              path=options.source)
    sources = open_parts(options.source)
    if len(sources) != len(parts):
        raise OrthopatchError(f"has {len(parts)} part(s), the source {len(sources)}", path=options.out)
    for src, out in zip(sources, parts, strict=True):
        compare_metadata(report, src, out)
    return sources


def _unit_vectors(parts: list[Part], targets: dict[str, Expected], direction: Direction) -> dict[str, np.ndarray]:
    """Each target's unit vector: its layer's direction row, times its norm gain (read from the output)."""
    tensors = {name: (p, t) for p in parts for name, t in p.tensors.items()}
    out = {}
    for name, target in targets.items():
        if name not in tensors:
            raise OrthopatchError("the record lists this tensor as patched, but the file has no such tensor",
                                  path=parts[0].path, tensor=name)
        gain = None
        if target.gain is not None:
            if target.gain not in tensors:
                raise OrthopatchError(f"its norm gain {target.gain!r} is not in the file", tensor=name)
            g = TensorRows(*tensors[target.gain])
            gain = g.values(0, g.rows).reshape(-1)
        try:
            out[name] = unit_vector(direction.for_layer(target.layer), gain).numpy()
        except ValueError as exc:
            raise OrthopatchError(f"{exc} {target.gain!r}", tensor=name) from None
        if out[name].shape[0] != TensorRows(*tensors[name]).shape[target.axis]:
            raise OrthopatchError("its residual axis is not the direction's width", tensor=name)
    return out


# --- one patched tensor ------------------------------------------------------------------------------

@dataclass
class _Tally:
    """Running sums of one patched tensor."""

    blocks: int = 0
    same: int = 0
    bad: int = 0  # differing blocks no rounding tie explains
    first_bad: int | None = None
    err2: float = 0.0
    ref2: float = 0.0
    mode: Mode = field(default_factory=lambda: Mode())


def _slabs(rows: TensorRows, axis: int) -> list[tuple[int, int, int]]:
    """``(first row, residual length, rows per residual index)`` of every slab ``[dim, cols]`` of the 2-D view.
    The residual axis last: a single slab whose residual index is a row's element (rows per index 0)."""
    if axis == len(rows.shape) - 1:
        return [(0, rows.rows, 0)]
    dim = rows.shape[axis]
    per_index = math.prod(rows.shape[axis + 1:]) // rows.width
    return [(k * dim * per_index, dim, per_index) for k in range(rows.rows // (dim * per_index))]


@dataclass
class _Sums:
    """What one patched tensor accumulates: shares along ``u`` before and after, and the comparison."""

    check: TensorCheck
    tally: _Tally = field(default_factory=_Tally)
    before: list[float] = field(default_factory=lambda: [0.0, 0.0])
    after: list[float] = field(default_factory=lambda: [0.0, 0.0])


def _check_patched(report: GGUFVerifyReport, target: Expected, out: TensorRows, src: TensorRows | None,
                   u: np.ndarray, record: ConversionRecord, mode: Mode) -> None:
    check = TensorCheck(target.name, target.role, target.layer)
    report.checks.append(check)
    sums = _Sums(check, _Tally(mode=mode))
    for first_row, dim, per_index in _slabs(out, target.axis):
        if per_index == 0:
            _rows(sums, out, src, u, record.method)
        else:
            _slab(sums, out, src, u, record.method, first_row, dim, per_index)
    check.after = (sums.after[0], sums.after[1])
    if src is None:
        if check.nonfinite:
            report.fail(f"holds {check.nonfinite:,} non-finite values (NaN or Inf)", path=out.part.path,
                        tensor=target.name)
        return
    check.before = (sums.before[0], sums.before[1])
    problem = _judge(report, sums.tally, out, check)
    if src.same_bytes(out) is None:
        problem = "is unchanged from the source, but the record lists it as patched"
    if problem is not None:
        report.fail(problem, path=out.part.path, tensor=target.name)


def _rows(sums: _Sums, out: TensorRows, src: TensorRows | None, u: np.ndarray, method: Method) -> None:
    """The residual axis last: each row is projected on its own (``x - s·(x·u)u``)."""
    step = max(1, CHUNK_VALUES // out.width)
    for first in range(0, out.rows, step):
        o = out.values(first, min(step, out.rows - first))
        _measure(sums.after, o @ u, o, sums.check)
        if src is None:
            continue
        x = src.values(first, o.shape[0])
        coeff = x @ u
        _measure(sums.before, coeff, x)
        ref = x - method.scale * np.outer(coeff, u)
        bound = np.abs(x) + abs(method.scale) * np.outer(np.abs(x) @ np.abs(u), np.abs(u))
        if method.norm_preserving:
            factor = _restoring((x * x).sum(axis=1), (ref * ref).sum(axis=1))[:, None]
            ref, bound = ref * factor, bound * factor
        _compare(sums.tally, out, first, o, ref, bound)


def _slab(sums: _Sums, out: TensorRows, src: TensorRows | None, u: np.ndarray, method: Method, first_row: int,
          dim: int, per_index: int) -> None:
    """One ``[dim, cols]`` slab whose residual axis is not last: ``W - s·u(uᵀW)``, ``uᵀW`` over all its rows."""
    cols = per_index * out.width
    step = max(1, CHUNK_VALUES // cols)
    chunks = [(s, min(step, dim - s)) for s in range(0, dim, step)]

    def read(rows: TensorRows, start: int, count: int) -> np.ndarray:
        return rows.values(first_row + start * per_index, count * per_index).reshape(count, cols)

    out_coeff = np.zeros(cols)
    for start, count in chunks:
        o = read(out, start, count)
        out_coeff += u[start:start + count] @ o
        _measure(sums.after, None, o, sums.check)
    sums.after[0] += float(out_coeff @ out_coeff)
    if src is None:
        return
    coeff, abs_coeff, before_sq = np.zeros(cols), np.zeros(cols), np.zeros(cols)
    for start, count in chunks:
        x = read(src, start, count)
        coeff += u[start:start + count] @ x
        abs_coeff += np.abs(u[start:start + count]) @ np.abs(x)
        before_sq += (x * x).sum(axis=0)
    sums.before[0] += float(coeff @ coeff)
    sums.before[1] += float(before_sq.sum())
    factor = None
    if method.norm_preserving:
        after_sq = np.zeros(cols)
        for start, count in chunks:
            ref = read(src, start, count) - method.scale * np.outer(u[start:start + count], coeff)
            after_sq += (ref * ref).sum(axis=0)
        factor = _restoring(before_sq, after_sq)
    for start, count in chunks:
        x, o = read(src, start, count), read(out, start, count)
        part = u[start:start + count]
        ref = x - method.scale * np.outer(part, coeff)
        bound = np.abs(x) + abs(method.scale) * np.outer(np.abs(part), abs_coeff)
        if factor is not None:
            ref, bound = ref * factor, bound * factor
        _compare(sums.tally, out, first_row + start * per_index, o.reshape(-1, out.width),
                 ref.reshape(-1, out.width), bound.reshape(-1, out.width))


def _restoring(before_sq: np.ndarray, after_sq: np.ndarray) -> np.ndarray:
    """``‖x‖/‖x'‖`` per row or column (1 where ``x'`` vanished)."""
    safe = np.where(after_sq > 0, after_sq, 1.0)
    return np.where(after_sq > 0, np.sqrt(before_sq / safe), 1.0)


def _measure(sums: list[float], coeff: np.ndarray | None, values: np.ndarray, check: TensorCheck | None = None) -> None:
    """Add ``Σ(uᵀw)²`` (when given) and ``Σw²``; count non-finite values of an output."""
    if check is not None:
        check.nonfinite += int(values.size - np.isfinite(values).sum())
    if coeff is not None:
        sums[0] += float(coeff @ coeff)
    sums[1] += float((values * values).sum())


def _float_ulp(x: np.ndarray, qtype: Q) -> np.ndarray:
    """The spacing of ``qtype``'s values at the magnitude of ``x``, subnormals included."""
    eps, lowest = FLOAT_FORMATS[qtype]
    _, exponent = np.frexp(x)
    floor_log2 = np.where(x == 0, lowest, np.maximum(exponent - 1, lowest))
    return np.ldexp(eps, floor_log2.astype(np.int32))


def _compare(tally: _Tally, out: TensorRows, first: int, o: np.ndarray, ref: np.ndarray, bound: np.ndarray) -> None:
    """Hold rows ``[first, first + len(o))`` of the output against the exact projection ``ref``."""
    weights = tally.mode.weights
    if weights is not None:  # each row weighted by its expert's slice
        per_expert = out.rows // weights.shape[0]
        w = weights[np.arange(first, first + o.shape[0]) // per_expert]
        tally.err2 += float((w * (o - ref) ** 2).sum())
        tally.ref2 += float((w * ref * ref).sum())
        return
    tally.err2 += float(((o - ref) ** 2).sum())
    tally.ref2 += float((ref * ref).sum())
    if out.qtype not in QUANTIZABLE or tally.mode.measured:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        ref32 = ref.astype(np.float32)
    stored = out.raw(first, o.shape[0])
    expected = np.ascontiguousarray(gguf.quants.quantize(ref32, out.qtype)).view(np.uint8).reshape(stored.shape)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[out.qtype]
    same = (expected.reshape(-1, block_bytes) == stored.reshape(-1, block_bytes)).all(axis=1)
    tally.blocks += same.size
    tally.same += int(same.sum())
    if same.all():
        return
    want = np.asarray(gguf.quants.dequantize(expected, out.qtype), dtype=np.float64).reshape(-1, block_values)
    got = o.reshape(-1, block_values)
    diff = np.abs(got - want)
    if out.qtype in FLOAT_FORMATS:  # one value per block: one ulp, or a few float32 ulps of the operands
        allowed = _float_ulp(want, out.qtype) + CANCEL_ULPS * 2.0**-23 * bound.reshape(-1, 1)
        near = (diff <= allowed).all(axis=1)
    else:  # a rounding tie moves one value by a step, or the block's scale (or minimum) by one float16 ulp
        top = np.abs(want).max(axis=1, keepdims=True)
        near = ((diff > 0).sum(axis=1) <= 1) | (diff <= 2.0**-10 * np.abs(want) + 2.0**-11 * top).all(axis=1)
    bad = ~same & ~near
    if bad.any():
        tally.bad += int(bad.sum())
        if tally.first_bad is None:
            tally.first_bad = first * (out.row_bytes // block_bytes) + int(np.flatnonzero(bad)[0])


def _judge(report: GGUFVerifyReport, tally: _Tally, out: TensorRows, check: TensorCheck) -> str | None:
    """What is wrong with one patched tensor, from its tally; records the measurements by type."""
    name = out.qtype.name
    rel = math.sqrt(tally.err2 / tally.ref2) if tally.ref2 > 0 else 0.0
    if not tally.mode.measured:
        (report.weighted if tally.mode.weights is not None else report.errors).setdefault(name, []).append(rel)
    if check.nonfinite:
        return f"holds {check.nonfinite:,} non-finite values (NaN or Inf)"
    if tally.mode.measured:
        check.detail = "measured only (no importance matrix)"
        return None
    if tally.mode.weights is not None:
        limit = IMATRIX_BOUNDS[out.qtype]
        check.detail = f"importance-weighted relative RMS error {rel:.3g}"
        if not rel <= limit:
            return (f"differs from the source projected by an importance-weighted relative RMS error of {rel:.3g}, "
                    f"more than requantizing to {name} with the importance matrix leaves ({limit:g})")
        return None
    if out.qtype in QUANTIZABLE:
        counts = report.blocks.setdefault(name, [0, 0])
        counts[0] += tally.same
        counts[1] += tally.blocks
        check.detail = f"{tally.same}/{tally.blocks} blocks as gguf-py writes them"
        if tally.bad:
            return (f"{tally.bad} of {tally.blocks} blocks differ from the source projected and requantized by "
                    f"gguf-py, beyond a rounding tie (first: block {tally.first_bad})")
        if tally.same < MIN_SAME_BLOCKS * tally.blocks:
            return (f"only {tally.same} of {tally.blocks} blocks are the source projected and requantized by "
                    f"gguf-py; at least {MIN_SAME_BLOCKS:.1%} must be")
        return None
    limit = KQUANT_BOUNDS.get(out.qtype)
    check.detail = f"relative RMS error {rel:.3g}"
    if limit is None:
        return f"is {name}, a type this verifier has no bound for"
    if not rel <= limit:
        return (f"differs from the source projected by a relative RMS error of {rel:.3g}, more than requantizing "
                f"to {name} leaves ({limit:g})")
    return None


# --- output ------------------------------------------------------------------------------------------

def format_types(report: GGUFVerifyReport) -> str:
    """One line per tensor type: how the patched tensors compare with the exact projection."""
    lines = []
    for name in sorted(report.errors):
        errs = report.errors[name]
        line = f"{name}: {len(errs)} patched tensor(s), relative RMS error to the exact projection {max(errs):.3g}"
        if name in report.blocks:
            same, total = report.blocks[name]
            line += f"; {same:,} of {total:,} blocks as gguf-py requantizes them"
        elif (limit := KQUANT_BOUNDS.get(Q[name])) is not None:
            line += f" (bound {limit:g})"
        lines.append(line)
    for name in sorted(report.weighted):
        errs = report.weighted[name]
        lines.append(f"{name}: {len(errs)} patched tensor(s) with the importance matrix, importance-weighted relative "
                     f"RMS error to the exact projection {max(errs):.3g} (bound {IMATRIX_BOUNDS[Q[name]]:g})")
    return "\n".join(lines)


def gguf_summary(report: GGUFVerifyReport) -> str:
    """The last line ``verify`` prints for a GGUF output."""
    n = len(report.checks)
    if not report.ok:
        return f"{report.out}: FAILED: {len(report.failures)} problem(s)"
    if report.source is not None:
        measured = sum(1 for c in report.checks if c.detail.startswith("measured only"))
        what = (f"{n - measured} patched tensors match the source projected (float64) and requantized"
                + (f" ({measured} measured only: give --imatrix)" if measured else "")
                + f", {report.identical} others byte-identical to the source")
    else:
        what = f"{n} patched tensors measured; record and structure checked (give --source to check the values)"
    return f"{report.out}: verified: {what}; {report.checked_bytes:,} bytes read"


__all__ = ["GGUFVerifyOptions", "GGUFVerifyReport", "IMATRIX_BOUNDS", "KQUANT_BOUNDS", "RECORD_KEY", "format_types",
           "gguf_summary", "recorded_direction_gguf", "verify_gguf"]

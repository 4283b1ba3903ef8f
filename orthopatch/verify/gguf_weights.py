"""What an importance matrix changes in ``verify`` of a GGUF output (``apply --imatrix``, ``verify --imatrix``).

gguf-py has no weighted quantizer, so a Q4_0, Q4_1, Q5_0, Q5_1 or k-quant tensor requantized with llama.cpp's
importance matrix cannot be recomputed byte for byte here. With the file the record names (same sha256), each
such tensor that has an entry is held to a bound on its importance-weighted relative RMS error; without it only
its share along the direction is measured, and a note says why. The file is read by the same strict reader
``apply`` uses (it decodes input; it computes no output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from orthopatch.gguf.imatrix import read_imatrix
from orthopatch.patch.record import ConversionRecord
from orthopatch.verify.gguf_files import Part
from orthopatch.verify.report import VerifyReport

Q = gguf.GGMLQuantizationType
#: Types whose quantizer reads an importance matrix: the largest importance-weighted relative RMS error
#: ``√(Σw(out − exact)²/Σw·exact²)`` accepted. About 1.5× the worst of llama.cpp's weighted quantizers on
#: Gaussian, Laplace and Student-t (3 and 2 degrees of freedom) values, 256×1024, with log-normal (σ 1.5 and 3)
#: and uniform weights per column: Q4_0 0.124, Q4_1 0.088, Q5_0 0.064, Q5_1 0.044, Q2_K 0.29, Q3_K 0.178,
#: Q4_K 0.090, Q5_K 0.046, Q6_K 0.029 (the k-quants keep their bounds without an importance matrix).
IMATRIX_BOUNDS = {Q.Q4_0: 0.19, Q.Q4_1: 0.13, Q.Q5_0: 0.1, Q.Q5_1: 0.066,
                  Q.Q2_K: 0.55, Q.Q3_K: 0.3, Q.Q4_K: 0.15, Q.Q5_K: 0.075, Q.Q6_K: 0.045}


def recorded_importance(report: VerifyReport, imatrix: Path | None, record: ConversionRecord, parts: list[Part],
                        names: set[str]) -> dict[str, np.ndarray] | None:
    """The importance weights ``[n_expert, ne0]`` by patched tensor, when the record names an importance matrix
    and ``imatrix`` is that file; None when the weighted tensors can only be measured (a note says why)."""
    recorded = record.method.imatrix
    if recorded is None:
        if imatrix is not None:
            report.notes.append("the record names no importance matrix: --imatrix is not used")
        return {}
    given = read_imatrix(imatrix, keep=names) if imatrix is not None else None
    if given is None or given.sha256 != recorded.sha256:
        why = "without --imatrix" if given is None else \
            f"{imatrix} is not that file (its sha256 differs from the record's), so"
        report.notes.append(f"this output was requantized with the importance matrix {recorded.file} (sha256 "
                            f"{recorded.sha256[:16]}...): {why} its Q4_0, Q4_1, Q5_0, Q5_1 and k-quant tensors are "
                            "measured (share along the direction), not checked")
        return None
    tensors = {t.name: t for p in parts for t in p.reader.tensors if t.name in names}
    out = {}
    for name, tensor in tensors.items():
        ne = [int(n) for n in tensor.shape]
        weights = given.weights.get(name)
        if weights is None:
            continue
        experts = ne[2] if len(ne) > 2 else 1
        if len(ne) > 3 or weights.size != ne[0] * experts:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                continue  # llama-quantize, and apply, quantize the embeddings without such an entry
            report.fail(f"the importance matrix has {weights.size:,} weights for it, not {ne[0]:,} × {experts:,}",
                        path=imatrix, tensor=name)
            continue
        out[name] = weights.reshape(experts, ne[0]).astype(np.float64)
    return out


@dataclass(frozen=True)
class Mode:
    """How a patched tensor's values are judged: ``weights`` for an importance-weighted bound, ``measured``
    when only its share along the direction can be reported."""

    weights: np.ndarray | None = None
    measured: bool = False


def mode_of(record: ConversionRecord, importance: dict[str, np.ndarray] | None, name: str, qtype: Q) -> Mode:
    if record.method.imatrix is None or qtype not in IMATRIX_BOUNDS:
        return Mode()
    if importance is None:
        return Mode(measured=True)
    return Mode(importance.get(name))

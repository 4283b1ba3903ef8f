"""llama.cpp's importance matrix (the output of ``llama-imatrix``), read as ``llama-quantize --imatrix`` reads it.

Two formats exist. The legacy binary one (``.dat``): an int32 entry count, then per entry an int32
name length, the name, int32 ``ncall``, int32 ``nval`` and ``nval`` float32 sums, then optionally an
int32 chunk count and a dataset name (int32 length, bytes). The GGUF one: per weight tensor NAME an
F32 tensor ``NAME.in_sum2`` (``[ne0, n_expert]``) and an F32 tensor ``NAME.counts`` (``[1, n_expert]``),
and the metadata ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``, which
llama-quantize requires. A file that starts with ``GGUF`` is read as GGUF, anything else as legacy.

The weights llama-quantize hands ``ggml_quantize_chunk`` are computed as it computes them, in float32:
legacy sums divided by ``ncall`` (kept as they are when ``ncall`` is not positive); GGUF sums divided,
expert by expert, by that expert's count rounded to an integer (all ones for an expert counted zero
times). A non-finite weight anywhere is refused, as llama-quantize refuses it. Entries are looked up
by the GGUF tensor name (``blk.0.ffn_down.weight``); a 3-D tensor's entry holds one slice of ``ne0``
weights per expert.

The file is untrusted: every count and length is checked against the bytes left before anything is
allocated or read, names are bounded, and each failure is one :class:`OrthopatchError` line naming the
file (and the entry). Duplicate names, which llama-quantize would let overwrite each other, are refused.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from orthopatch.errors import OrthopatchError, shortened
from orthopatch.gguf.container import MAX_NAME, GGUFFile, GGUFTensor, parse_gguf_fd
from orthopatch.io.smallfile import open_regular

#: Metadata a GGUF importance matrix must have (llama-quantize refuses one without).
REQUIRED_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
SUMS, COUNTS = ".in_sum2", ".counts"
#: Fewest bytes a legacy entry takes: name length, an empty name, ncall, nval, one float.
MIN_LEGACY_ENTRY = 4 + 4 + 4 + 4
_I32 = struct.Struct("<i")
_READ = 1 << 24


@dataclass(frozen=True)
class ImportanceMatrix:
    """An importance matrix file: what identifies it and the weights of the entries asked for."""

    path: Path
    sha256: str
    format: str  # "gguf" or "legacy"
    count: int  # entries in the file
    #: Entry name -> float32 weights, flat (``ne0`` per expert), as llama-quantize passes them.
    weights: dict[str, np.ndarray]

    def for_tensor(self, tensor: GGUFTensor) -> np.ndarray | None:
        """The weights of ``tensor`` as ``[n_expert, ne0]`` (one row for a 2-D tensor), or None without an entry.

        An entry whose length is not ``ne0 × n_expert`` is refused naming the tensor, as llama-quantize
        refuses it."""
        found = self.weights.get(tensor.name)
        if found is None:
            return None
        ne = tensor.shape_ggml
        experts = ne[2] if len(ne) > 2 else 1
        if len(ne) > 3 or found.size != ne[0] * experts:
            raise OrthopatchError(f"has {found.size:,} importance weights for tensor {shortened(tensor.name)}, which "
                                  f"needs {ne[0]:,} per row × {experts:,} expert(s) (not this model's importance "
                                  "matrix?)", path=self.path)
        return found.reshape(experts, ne[0])


def read_imatrix(path: str | os.PathLike, keep: Collection[str] | None = None) -> ImportanceMatrix:
    """Read and check the importance matrix ``path``; keep the weights of the entries named in ``keep``
    (every entry when None). Every entry is checked, kept or not."""
    path = Path(path)
    fd = open_regular(path, "importance matrix")
    try:
        size = os.fstat(fd).st_size
        sha256 = _sha256(fd, path, size)
        head = _pread(fd, path, min(4, size), 0)
        if head == b"GGUF":
            count, weights = _read_gguf(fd, path, keep)
            kind = "gguf"
        else:
            count, weights = _read_legacy(_Reader(fd, path, size), keep)
            kind = "legacy"
    finally:
        os.close(fd)
    return ImportanceMatrix(path, sha256, kind, count, weights)


def _pread(fd: int, path: Path, n: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < n:
        try:
            chunk = os.pread(fd, min(n - done, _READ), offset + done)
        except OSError as exc:
            raise OrthopatchError(f"cannot read the importance matrix ({exc.strerror or exc})", path=path) from None
        if not chunk:
            raise OrthopatchError("the importance matrix changed or was truncated while it was read", path=path)
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _sha256(fd: int, path: Path, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, _READ):
        digest.update(_pread(fd, path, min(_READ, size - offset), offset))
    return digest.hexdigest()


def _finite(weights: np.ndarray, path: Path, name: str) -> np.ndarray:
    bad = int(weights.size - np.isfinite(weights).sum())
    if bad:
        raise OrthopatchError(f"entry {shortened(name)} has {bad:,} non-finite importance weights (NaN or Inf); "
                              "llama-quantize refuses it too", path=path)
    return weights


# --- legacy (.dat) -----------------------------------------------------------------------------------

class _Reader:
    """Bounded sequential reads of a legacy file: each length is checked against the bytes left first."""

    def __init__(self, fd: int, path: Path, size: int):
        self.fd, self.path, self.size, self.pos = fd, path, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise OrthopatchError(f"{what} needs {n:,} bytes but only {self.left:,} are left (truncated?)",
                                  path=self.path)
        data = _pread(self.fd, self.path, n, self.pos)
        self.pos += n
        return data

    def i32(self, what: str) -> int:
        return _I32.unpack(self.take(4, what))[0]


def _read_legacy(r: _Reader, keep: Collection[str] | None) -> tuple[int, dict[str, np.ndarray]]:
    if r.size < 4:
        raise OrthopatchError("is neither a GGUF nor a legacy importance matrix (too short)", path=r.path)
    n_entries = r.i32("the entry count")
    if n_entries < 1:
        raise OrthopatchError(f"is not an importance matrix: it claims {n_entries} entries", path=r.path)
    if n_entries > r.left // MIN_LEGACY_ENTRY:
        raise OrthopatchError(f"claims {n_entries:,} entries but only {r.left:,} bytes are left (not an importance "
                              "matrix, or truncated)", path=r.path)
    weights: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for index in range(1, n_entries + 1):
        where = f"entry {index} of {n_entries}"
        length = r.i32(f"{where}'s name length")
        if not 0 <= length <= MAX_NAME:
            raise OrthopatchError(f"{where} has a name of {length:,} bytes (at most {MAX_NAME:,})", path=r.path)
        raw = r.take(length, f"{where}'s name")
        # llama.cpp reads the name as a C string: it ends at the first NUL byte
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        where = f"entry {shortened(name)}"
        if name in seen:
            raise OrthopatchError(f"{where} appears twice", path=r.path)
        seen.add(name)
        ncall = r.i32(f"{where}'s call count")
        nval = r.i32(f"{where}'s value count")
        if nval < 1:
            raise OrthopatchError(f"{where} claims {nval:,} values", path=r.path)
        if nval > r.left // 4:
            raise OrthopatchError(f"{where} claims {nval:,} values but only {r.left:,} bytes are left (truncated?)",
                                  path=r.path)
        sums = np.frombuffer(r.take(4 * nval, f"{where}'s values"), dtype="<f4").astype(np.float32)
        with np.errstate(all="ignore"):
            # llama-quantize: float sum / int64 ncall, the count converted to float
            values = sums / np.array(ncall, np.int64).astype(np.float32) if ncall > 0 else sums
        values = _finite(values, r.path, name)
        if keep is None or name in keep:
            weights[name] = values
    _check_legacy_tail(r)
    return n_entries, weights


def _check_legacy_tail(r: _Reader) -> None:
    """The optional tail: the chunk count, then the dataset's name (length and bytes)."""
    if r.left == 0:
        return
    r.i32("the chunk count after the last entry")
    if r.left == 0:
        return
    length = r.i32("the dataset name's length")
    if not 0 <= length <= r.left:
        raise OrthopatchError(f"the dataset name claims {length:,} bytes but {r.left:,} are left", path=r.path)
    r.take(length, "the dataset name")
    if r.left:
        raise OrthopatchError(f"has {r.left:,} bytes after the dataset name that no importance matrix has",
                              path=r.path)


# --- GGUF --------------------------------------------------------------------------------------------

def _read_gguf(fd: int, path: Path, keep: Collection[str] | None) -> tuple[int, dict[str, np.ndarray]]:
    header = parse_gguf_fd(fd, path)
    if not header.tensors:
        raise OrthopatchError("is a GGUF file with no tensors: not an importance matrix", path=path)
    missing = [k for k in REQUIRED_KEYS if k not in header.metadata]
    if missing:
        raise OrthopatchError(f"is a GGUF file without the importance matrix metadata {missing[0]!r} (not written "
                              "by llama-imatrix?)", path=path)
    for key in REQUIRED_KEYS[1:]:
        if header.metadata[key].type != gguf.GGUFValueType.UINT32:
            raise OrthopatchError(f"its metadata {key!r} is {header.metadata[key].type.name}, not UINT32", path=path)
    pairs: dict[str, list[GGUFTensor | None]] = {}
    for tensor in header.tensors:
        for slot, suffix in enumerate((SUMS, COUNTS)):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name.removesuffix(suffix), [None, None])[slot] = tensor
    if not pairs:
        raise OrthopatchError(f"is a GGUF file with no {SUMS} and {COUNTS} tensors: not an importance matrix",
                              path=path)
    weights = {}
    for name, (sums, counts) in sorted(pairs.items()):
        if sums is None or counts is None:
            raise OrthopatchError(f"entry {shortened(name)} has {'no ' + SUMS if sums is None else 'no ' + COUNTS} "
                                  "tensor beside its other one", path=path)
        values = _gguf_entry(fd, header, name, sums, counts)
        if keep is None or name in keep:
            weights[name] = values
    return len(pairs), weights


def _gguf_entry(fd: int, header: GGUFFile, name: str, sums: GGUFTensor, counts: GGUFTensor) -> np.ndarray:
    path = header.path
    where = f"entry {shortened(name)}"
    for tensor in (sums, counts):
        if tensor.qtype != gguf.GGMLQuantizationType.F32:
            raise OrthopatchError(f"{where}: {shortened(tensor.name)} is {tensor.qtype.name}, not F32", path=path)
    nval, ncounts = math.prod(sums.shape_ggml), math.prod(counts.shape_ggml)
    if ncounts < 1 or nval < 1 or nval % ncounts:
        raise OrthopatchError(f"{where} has {nval:,} sums for {ncounts:,} counts (not a whole number per count)",
                              path=path)
    values = np.frombuffer(_pread(fd, path, sums.nbytes, sums.begin), dtype="<f4").astype(np.float32)
    raw_counts = np.frombuffer(_pread(fd, path, counts.nbytes, counts.begin), dtype="<f4").astype(np.float64)
    if not np.isfinite(raw_counts).all() or (np.abs(raw_counts) >= 2.0**62).any():
        raise OrthopatchError(f"{where} has counts that are not finite or out of range", path=path)
    # llama.cpp rounds each count to an integer (lround: halves away from zero), then divides in float32
    rounded = (np.sign(raw_counts) * np.floor(np.abs(raw_counts) + 0.5)).astype(np.int64).astype(np.float32)
    per_expert = values.reshape(ncounts, nval // ncounts)
    with np.errstate(all="ignore"):
        safe = np.where(rounded > 0, rounded, np.float32(1))[:, None]
        weights = np.where(rounded[:, None] > 0, per_expert / safe, np.float32(1)).astype(np.float32)
    return _finite(weights.reshape(-1), path, name)

"""What a conversion leaves behind: its method, its fingerprint and the record ``orthopatch.json``.

``apply`` writes the record last (it marks the output complete); ``verify`` and the model card read
it. The record is untrusted input when read back: :meth:`ConversionRecord.from_json` checks every field and
names the file in its error.

Format 2 (this version) added the device type and the kernel's block size to the fingerprint: CPU
and CUDA blocks may round differently, so a run resumed on the other device must not reuse the
shards of the first. Format 1 records (same keys) are still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthopatch import __version__
from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import CONVERSION_RECORD_FORMAT
from orthopatch.io.smallfile import is_json_int, read_small_json
from orthopatch.patch.plan import ConversionPlan, Selection
from orthopatch.patch.weights import ComponentWeights

READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class ImatrixInfo:
    """The llama.cpp importance matrix a GGUF conversion requantized with (``apply --imatrix``)."""

    file: str  # the file's name, as given
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256}

    @classmethod
    def from_json(cls, doc: Any) -> ImatrixInfo:
        if not isinstance(doc, dict) or not isinstance(doc.get("file"), str) or not isinstance(doc.get("sha256"), str) \
                or len(doc["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in doc["sha256"]):
            raise ValueError(f"imatrix {_short(doc)}")
        return cls(doc["file"], doc["sha256"])


@dataclass(frozen=True)
class Method:
    """The options that change the output's bytes: recorded, and part of the fingerprint."""

    selection: Selection = Selection()
    scale: float = 1.0
    norm_preserving: bool = False
    targets: tuple[str, ...] = ()  # ``--targets REGEX:AXIS`` specs; empty: the known architecture
    #: Per-layer, per-component weights from a weighted direction file; None: every weight is 1.
    weights: ComponentWeights | None = None
    #: The importance matrix quantized targets of a GGUF were requantized with; None: none.
    imatrix: ImatrixInfo | None = None

    def scale_for(self, role: str, layer: int | None) -> float:
        """The projection strength of one target: the global scale times its weight."""
        return self.scale if self.weights is None else self.scale * self.weights.for_target(role, layer)

    def to_json(self) -> dict[str, Any]:
        layers = self.selection.layers
        doc = {
            "layers": sorted(layers) if layers is not None else "all",
            "embeddings": self.selection.embeddings,
            "scale": self.scale,
            "norm_preserving": self.norm_preserving,
            "targets": list(self.targets),
        }
        doc |= {"weights": self.weights.to_json()} if self.weights is not None else {}
        return doc | ({"imatrix": self.imatrix.to_json()} if self.imatrix is not None else {})

    @classmethod
    def from_json(cls, doc: Any) -> Method:
        """The method of a record's ``options``; a ``ValueError`` naming the field that is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("no options")
        layers = doc.get("layers", "all")
        if layers == "all":
            chosen = None
        elif isinstance(layers, list) and all(is_json_int(n) and n >= 0 for n in layers):
            chosen = frozenset(layers)
        else:
            raise ValueError(f"layers {layers!r}")
        embeddings = doc.get("embeddings", True)
        if not isinstance(embeddings, bool):
            raise ValueError(f"embeddings {embeddings!r}")
        scale = doc.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale:
            raise ValueError(f"scale {scale!r}")
        norm_preserving = doc.get("norm_preserving", False)
        if not isinstance(norm_preserving, bool):
            raise ValueError(f"norm_preserving {norm_preserving!r}")
        targets = doc.get("targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"targets {targets!r}")
        weights = doc.get("weights")
        if weights is not None:
            try:
                weights = ComponentWeights.from_json(weights)
            except ValueError as exc:
                raise ValueError(f"weights ({exc})") from None
        imatrix = doc.get("imatrix")
        if imatrix is not None:
            imatrix = ImatrixInfo.from_json(imatrix)
        return cls(Selection(chosen, embeddings), float(scale), norm_preserving, tuple(targets), weights, imatrix)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a conversion's bytes: the source's headers, the direction, the method and where
    the arithmetic ran (device type and block size). A folder with the same fingerprint is resumed."""

    source_headers: dict[str, str]  # shard file name -> sha256 of its header, then ``:`` and its size
    direction_sha256: str
    architecture: str
    method: Method
    device: str  # "cpu" or "cuda"
    block_elements: int
    orthopatch: str = __version__

    @classmethod
    def of(cls, plan: ConversionPlan, direction_sha256: str, method: Method, device: str,
           block_elements: int) -> Fingerprint:
        return cls(plan.source_headers(), direction_sha256, plan.architecture.name, method, device, block_elements)

    def to_json(self) -> dict[str, Any]:
        return {
            "orthopatch": self.orthopatch,
            "source_headers": dict(self.source_headers),
            "direction_sha256": self.direction_sha256,
            "architecture": self.architecture,
            "method": self.method.to_json(),
            "device": self.device,
            "block_elements": self.block_elements,
        }


@dataclass(frozen=True)
class PatchedTensor:
    name: str
    role: str
    layer: int | None
    axis: int
    gain: str | None = None  # the norm weight that scales the tensor's output

    def to_json(self) -> dict[str, Any]:
        doc = {"name": self.name, "role": self.role, "layer": self.layer, "axis": self.axis}
        return doc | ({"gain": self.gain} if self.gain else {})


@dataclass(frozen=True)
class DirectionInfo:
    file: str
    sha256: str
    rows: int
    hidden_size: int


@dataclass(frozen=True)
class ConversionRecord:
    """The content of ``orthopatch.json``."""

    orthopatch_version: str
    source: str
    direction: DirectionInfo
    architecture: str
    method: Method
    device: str
    tensors_patched: tuple[PatchedTensor, ...]
    patched_bytes: int
    total_bytes: int
    seconds: float
    fingerprint: dict[str, Any] = field(default_factory=dict)
    format: int = CONVERSION_RECORD_FORMAT
    #: The patched tensors were rewritten inside the source's own shards (``apply --in-place``).
    in_place: bool = False

    @classmethod
    def of(cls, plan: ConversionPlan, *, source: Path, direction_file: Path, direction_sha256: str, direction_rows: int,
           method: Method, device: str, seconds: float, fingerprint: Fingerprint,
           in_place: bool = False) -> ConversionRecord:
        tensors = tuple(PatchedTensor(t.name, t.role, t.layer, t.axis, t.gain) for t in plan.targets())
        return cls(__version__, str(source), DirectionInfo(str(direction_file), direction_sha256, direction_rows,
                                                           plan.hidden_size),
                   plan.architecture.name, method, device, tensors, plan.patched_bytes, plan.total_bytes,
                   round(seconds, 3), fingerprint.to_json(), in_place=in_place)

    def to_json(self) -> dict[str, Any]:
        d = self.direction
        return {
            "format": self.format,
            "orthopatch_version": self.orthopatch_version,
            "source": self.source,
            "direction": {"file": d.file, "sha256": d.sha256, "rows": d.rows, "hidden_size": d.hidden_size},
            "architecture": self.architecture,
            "options": {**self.method.to_json(), "device": self.device},
            "tensors_patched": [t.to_json() for t in self.tensors_patched],
            "patched_bytes": self.patched_bytes,
            "total_bytes": self.total_bytes,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
        } | ({"in_place": True} if self.in_place else {})

    @classmethod
    def from_json(cls, doc: Any, path: str | Path = "orthopatch.json") -> ConversionRecord:
        """Check and read a record; an :class:`OrthopatchError` naming ``path`` for anything malformed."""
        def bad(what: str) -> OrthopatchError:
            return OrthopatchError(what, path=path)

        if not isinstance(doc, dict):
            raise bad("record is not a JSON object")
        fmt = doc.get("format")
        if fmt not in READABLE_FORMATS:
            raise bad(f"unknown record format {fmt!r} (this orthopatch reads {', '.join(map(str, READABLE_FORMATS))})")
        options = doc.get("options")
        try:
            method = Method.from_json(options)
        except ValueError as exc:
            raise bad(f"cannot read the options it records ({exc})") from None
        direction = doc.get("direction")
        if not isinstance(direction, dict) or not all(isinstance(direction.get(k), str) for k in ("file", "sha256")) \
                or not all(is_json_int(direction.get(k)) for k in ("rows", "hidden_size")):
            raise bad("cannot read the direction it records")
        listed = doc.get("tensors_patched")
        if not isinstance(listed, list):
            raise bad("cannot read the tensors it records as patched")
        tensors = []
        for t in listed:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("role"), str) \
                    or not (t.get("layer") is None or is_json_int(t.get("layer"))) or not is_json_int(t.get("axis")) \
                    or not (t.get("gain") is None or isinstance(t.get("gain"), str)):
                raise bad(f"cannot read a patched tensor it records ({_short(t)})")
            tensors.append(PatchedTensor(t["name"], t["role"], t["layer"], t["axis"], t.get("gain")))
        texts = {k: doc.get(k) for k in ("orthopatch_version", "source", "architecture")}
        numbers = {k: doc.get(k) for k in ("patched_bytes", "total_bytes")}
        device = options.get("device", "")
        if not all(isinstance(v, str) for v in texts.values()) or not isinstance(device, str):
            raise bad("cannot read the version, source, architecture or device it records")
        if not all(is_json_int(v) for v in numbers.values()):
            raise bad("cannot read the byte counts it records")
        seconds, fingerprint = doc.get("seconds", 0.0), doc.get("fingerprint", {})
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not isinstance(fingerprint, dict):
            raise bad("cannot read the time or fingerprint it records")
        in_place = doc.get("in_place", False)
        if not isinstance(in_place, bool):
            raise bad("cannot read whether it was converted in place")
        return cls(texts["orthopatch_version"], texts["source"],
                   DirectionInfo(direction["file"], direction["sha256"], direction["rows"], direction["hidden_size"]),
                   texts["architecture"], method, device, tuple(tensors), numbers["patched_bytes"],
                   numbers["total_bytes"], float(seconds), fingerprint, fmt, in_place)

    @classmethod
    def read(cls, path: Path) -> ConversionRecord:
        return cls.from_json(read_small_json(path), path)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

"""Load a refusal direction file safely and normalize it in float64.

Accepted: ``.pth``/``.pt`` (torch, ``weights_only`` so no pickle code can run), ``.safetensors``,
``.npy`` (no pickles). Shapes ``[d]``, ``[1, d]``, one row per layer ``[n_layers, d]``, or one row
per hidden state ``[n_layers + 1, d]``; a dict is accepted when it holds exactly one such tensor.

A *weighted* direction is a ``.safetensors`` file holding ``directions`` (rows as above), and the
per-layer weights ``attention`` and ``mlp`` (``[n_layers]``) and ``embedding`` (``[1]``), with string
metadata (``format``: :data:`WEIGHTED_FORMAT`, and what made it); a plain file has weights of 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.folders import write_atomic
from orthopatch.io.smallfile import check_regular, open_regular
from orthopatch.patch.weights import ComponentWeights

NORM_TOLERANCE = 1e-3
#: Larger files are not directions (a per-layer direction of a 70B model is about 3 MB); a zip
#: (``torch.save``) may not unpack to more either.
MAX_DIRECTION_BYTES = 256 << 20
#: Most elements one tensor of a direction file may hold (256 MiB as float64).
MAX_DIRECTION_ELEMENTS = 32 << 20
#: The tensors of a weighted direction file, and its ``format`` metadata.
WEIGHTED_KEYS = ("directions", "attention", "mlp", "embedding")
WEIGHTED_FORMAT = "orthopatch-weighted-direction-1"


@dataclass(frozen=True)
class Direction:
    """Unit directions in float64: one row shared by all layers, or one row per layer."""

    path: Path
    sha256: str
    rows: np.ndarray  # [k, d] float64, each row of norm 1
    notes: tuple[str, ...] = field(default=())
    #: Per-layer, per-component weights (a weighted file); None: every weight is 1.
    weights: ComponentWeights | None = None

    @property
    def per_layer(self) -> bool:
        return self.rows.shape[0] > 1

    @property
    def hidden_size(self) -> int:
        return int(self.rows.shape[1])

    def for_layer(self, layer: int | None) -> np.ndarray:
        """The unit direction for block ``layer`` (the embedding, ``None``, takes the first row)."""
        if not self.per_layer:
            return self.rows[0]
        index = 0 if layer is None else layer
        if index >= self.rows.shape[0]:
            raise OrthopatchError(
                f"direction has {self.rows.shape[0]} rows, none for layer {layer}", path=self.path
            )
        return self.rows[index]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(open_regular(path, "direction file"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a dense real-valued tensor or array, read from its metadata; None for anything else."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_nested or value.is_complex() or value.dtype == torch.bool:
            return None
        if value.is_meta or value.is_quantized:
            return None
        return tuple(value.shape)
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        return value.shape
    return None


def _to_numpy(value: Any, path: Path) -> np.ndarray:
    """A dense real-valued tensor (see :func:`_shape_of`) as float64, once its size is known to be sane.

    A tensor can claim far more elements than its file holds: a view with stride 0 repeats one
    element 2³³ times in a few bytes. Element count and strides are checked before any conversion.
    """
    import torch

    _check_size(value, path)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return value.astype(np.float64)


def _check_size(value: Any, path: Path, key: str | None = None) -> None:
    """Refuse a tensor whose metadata claims more than a direction file holds, before it is touched.

    Only tensors that could be used (:func:`_shape_of`) are ever converted, so only they are checked.
    """
    import torch

    shape = _shape_of(value)
    if shape is None:
        return
    what = f"tensor {key!r}" if key is not None else "tensor"
    numel = math.prod(shape)
    if numel > MAX_DIRECTION_ELEMENTS:
        raise OrthopatchError(f"{what} of shape {list(shape)} holds {numel:,} elements, more than a "
                              f"direction has (at most {MAX_DIRECTION_ELEMENTS:,})", path=path)
    if isinstance(value, torch.Tensor):
        if any(stride == 0 and size > 1 for size, stride in zip(value.shape, value.stride(), strict=True)):
            raise OrthopatchError(f"{what} of shape {list(value.shape)} is an expanded view (stride 0), "
                                  "not a saved direction", path=path)
        if value.untyped_storage().nbytes() > MAX_DIRECTION_BYTES:
            raise OrthopatchError(f"{what} has a storage larger than a direction file may hold", path=path)


def _describe(value: Any, shape: tuple[int, ...] | None) -> str:
    if shape is not None:
        return str(list(shape))
    if getattr(value, "is_nested", False):
        return "a nested tensor"
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        layout = str(getattr(value, "layout", "torch.strided")).removeprefix("torch.")
        kind = "" if layout == "strided" else f" {layout}"
        return f"{list(shape)} {str(dtype).removeprefix('torch.')}{kind}"
    return type(value).__name__


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    if isinstance(exc, EOFError) and not str(exc).strip():
        return "file is empty or ends too early"
    return first_line(exc).split(". ")[0].rstrip(".")


def _refusal(exc: BaseException) -> str:
    """What the safe unpickler objected to, in a few words."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it would call {found.group(1).rstrip('.')}"
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    return found.group(1).strip() if found else _first_sentence(exc)


def _check_zip(path: Path) -> None:
    """A ``torch.save`` zip must not unpack to more than a direction file may hold (zip bombs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable zip: torch.load reports it
    if unpacked > MAX_DIRECTION_BYTES:
        raise OrthopatchError(f"file unpacks to {unpacked:,} bytes, too large for a direction", path=path)


def _check_npy(path: Path, size: int) -> None:
    """An ``.npy`` header's shape and dtype, checked before any data is read."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except Exception as exc:
        raise OrthopatchError(f"cannot load direction ({_first_sentence(exc)})", path=path) from None
    if dtype.hasobject:
        raise OrthopatchError("refused: the array holds Python objects (a pickle, which can run code)", path=path)
    numel = math.prod(shape)
    if numel > MAX_DIRECTION_ELEMENTS or numel * dtype.itemsize > size:
        raise OrthopatchError(f"header claims shape {list(shape)} of {dtype}, more than the file holds "
                              "or a direction has", path=path)


def _read_raw(path: Path) -> Any:
    size = check_regular(path, "direction file").st_size
    if size > MAX_DIRECTION_BYTES:
        raise OrthopatchError(f"file is {size:,} bytes, too large for a direction (is it a model file?)", path=path)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        _check_zip(path)
        try:
            # weights_only: the restricted unpickler builds tensors and plain containers, and refuses
            # any other global (no code runs); an explicit True cannot be overridden by environment.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise OrthopatchError(
                f"refused: not a plain tensor file ({_refusal(exc)}); such pickles can run code, so it is not loaded",
                path=path,
            ) from None
        except Exception as exc:  # a hostile or broken file may fail in any way; report it, never crash
            raise OrthopatchError(f"cannot load direction ({_first_sentence(exc)})", path=path) from None
    if suffix == ".safetensors":
        # The format's reader checks that every tensor's bytes lie in the file, so the file size
        # bound above also bounds what is loaded; shapes are checked before conversion below.
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise OrthopatchError(f"cannot load direction ({_first_sentence(exc)})", path=path) from None
    if suffix == ".npy":
        _check_npy(path, size)
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise OrthopatchError(f"cannot load direction ({_first_sentence(exc)})", path=path) from None
    raise OrthopatchError("unknown direction format (expected .pth, .pt, .safetensors or .npy)", path=path)


def _usable(shape: tuple[int, ...], hidden_size: int, num_layers: int | None) -> bool:
    if len(shape) == 1:
        return shape[0] == hidden_size
    if len(shape) == 2 and shape[1] == hidden_size:
        return shape[0] == 1 or (num_layers is not None and shape[0] in (num_layers, num_layers + 1))
    return False


def load_direction(path: str | Path, hidden_size: int, num_layers: int | None = None) -> Direction:
    """Load, check against the model's ``hidden_size`` (and layer count), and normalize each row."""
    path = Path(path)
    raw = _read_raw(path)
    weights = None
    if isinstance(raw, dict) and path.suffix.lower() == ".safetensors" and set(raw) == set(WEIGHTED_KEYS):
        weights = _weights(raw, path, num_layers)
        raw = raw["directions"]

    if isinstance(raw, dict):
        for key, value in raw.items():  # every tensor of the file, not only the one used
            _check_size(value, path, str(key))
        shapes = {k: _shape_of(v) for k, v in raw.items()}
        usable = [k for k, s in shapes.items() if s is not None and _usable(s, hidden_size, num_layers)]
        if len(usable) != 1:
            listing = ", ".join(f"{k!r}: {_describe(raw[k], s)}" for k, s in shapes.items())
            want = "exactly one" if usable else "a"
            raise OrthopatchError(
                f"dict needs {want} tensor of shape {_shapes(hidden_size, num_layers)}; found {{{listing}}}",
                path=path,
            )
        raw = raw[usable[0]]
    if _shape_of(raw) is None:
        raise OrthopatchError(f"holds {_describe(raw, None)}, not a dense real-valued tensor", path=path)
    array = _to_numpy(raw, path)

    if not _usable(array.shape, hidden_size, num_layers):
        raise OrthopatchError(
            f"direction has shape {list(array.shape)}; the model needs {_shapes(hidden_size, num_layers)}",
            path=path,
        )
    rows = array.reshape(-1, hidden_size)
    if not np.isfinite(rows).all():
        raise OrthopatchError("direction contains NaN or Inf", path=path)
    # Scale each row by its largest magnitude first, so that norms neither overflow nor underflow.
    peaks = np.abs(rows).max(axis=1)
    if (peaks == 0).any():
        row = int(np.flatnonzero(peaks == 0)[0])
        where = f" (row {row})" if rows.shape[0] > 1 else ""
        raise OrthopatchError(f"direction is zero{where}: there is nothing to project out", path=path)
    scaled = rows / peaks[:, None]
    # Exactly rounded sums (not a BLAS call, whose order depends on the CPU): the same unit vector everywhere.
    scaled_norms = np.array([math.sqrt(math.fsum(row * row)) for row in scaled.astype(np.float64)])
    norms = scaled_norms * peaks
    notes = []
    if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        notes.append(f"direction norm was {norms.min():.6g}..{norms.max():.6g}, renormalized to 1 in float64")
    unit = scaled / scaled_norms[:, None]
    return Direction(path, file_sha256(path), unit, tuple(notes), weights)


def _weights(raw: dict[str, Any], path: Path, num_layers: int | None) -> ComponentWeights:
    """The weights of a weighted direction file, checked against the model's layer count."""
    for key, value in raw.items():
        _check_size(value, path, key)
    arrays = {k: _to_numpy(raw[k], path) for k in ("attention", "mlp", "embedding")}
    layers = arrays["attention"].shape
    if len(layers) != 1 or arrays["mlp"].shape != layers or arrays["embedding"].shape != (1,):
        raise OrthopatchError(f"weighted direction: attention {list(layers)}, mlp {list(arrays['mlp'].shape)} and "
                              f"embedding {list(arrays['embedding'].shape)} must be [n_layers], [n_layers] and [1]",
                              path=path)
    if num_layers is not None and layers[0] != num_layers:
        raise OrthopatchError(f"weighted direction has weights for {layers[0]} layers, the model has {num_layers}",
                              path=path)
    try:
        return ComponentWeights(tuple(map(float, arrays["attention"])), tuple(map(float, arrays["mlp"])),
                                float(arrays["embedding"][0]))
    except ValueError as exc:
        raise OrthopatchError(f"weighted direction: {exc}", path=path) from None


def save_weighted_direction(path: Path, directions: np.ndarray, weights: ComponentWeights,
                            metadata: dict[str, str]) -> bytes:
    """Write a weighted direction file atomically (float32 tensors, ``metadata`` as strings); its bytes.

    The header is written here, keys sorted, so the same content always gives the same bytes."""
    arrays = {"directions": np.ascontiguousarray(directions, dtype="<f4"),
              "attention": np.asarray(weights.attention, dtype="<f4"), "mlp": np.asarray(weights.mlp, dtype="<f4"),
              "embedding": np.asarray([weights.embedding], dtype="<f4")}
    header: dict[str, Any] = {"__metadata__": dict(sorted({"format": WEIGHTED_FORMAT, **metadata}.items()))}
    offset, body = 0, []
    for key in WEIGHTED_KEYS:
        data = arrays[key].tobytes()
        header[key] = {"dtype": "F32", "shape": list(arrays[key].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = len(text).to_bytes(8, "little") + text + b"".join(body)
    write_atomic(path, data)
    return data


def _shapes(hidden_size: int, num_layers: int | None) -> str:
    shapes = [f"[{hidden_size}]", f"[1, {hidden_size}]"]
    if num_layers:
        shapes += [f"[{num_layers}, {hidden_size}]", f"[{num_layers + 1}, {hidden_size}]"]
    return " or ".join([", ".join(shapes[:-1]), shapes[-1]])

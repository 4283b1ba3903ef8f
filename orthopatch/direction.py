"""Load a refusal direction file safely and normalize it in float64.

Accepted: ``.pth``/``.pt`` (torch, ``weights_only`` so no pickle code can run), ``.safetensors``,
``.npy`` (no pickles). Shapes ``[d]``, ``[1, d]``, one row per layer ``[n_layers, d]``, or one row
per hidden state ``[n_layers + 1, d]``; a dict is accepted when it holds exactly one such tensor.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OrthopatchError

NORM_TOLERANCE = 1e-3
#: Larger files are not directions (a per-layer direction of a 70B model is about 3 MB).
MAX_DIRECTION_BYTES = 256 << 20


@dataclass(frozen=True)
class Direction:
    """Unit directions in float64: one row shared by all layers, or one row per layer."""

    path: Path
    sha256: str
    rows: np.ndarray  # [k, d] float64, each row of norm 1
    notes: tuple[str, ...] = field(default=())

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
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_numpy(value: Any) -> np.ndarray | None:
    """A real-valued dense array as float64, or None for anything else (complex, sparse, objects)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_complex() or value.dtype == torch.bool or value.is_meta:
            return None
        if value.is_quantized:
            return None
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        return value.astype(np.float64)
    return None


def _describe(value: Any, array: np.ndarray | None) -> str:
    if array is not None:
        return str(list(array.shape))
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        layout = str(getattr(value, "layout", "torch.strided")).removeprefix("torch.")
        kind = "" if layout == "strided" else f" {layout}"
        return f"{list(shape)} {str(dtype).removeprefix('torch.')}{kind}"
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return "file is empty or ends too early" if isinstance(exc, EOFError) else type(exc).__name__
    return lines[0].split(". ")[0].rstrip(".")


def _refusal(exc: BaseException) -> str:
    """What the safe unpickler objected to, in a few words."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it would call {found.group(1).rstrip('.')}"
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    return found.group(1).strip() if found else _first_line(exc)


def _read_raw(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_DIRECTION_BYTES:
        raise OrthopatchError(f"file is {size:,} bytes, too large for a direction (is it a model file?)", path=path)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        import torch

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
            raise OrthopatchError(f"cannot load direction ({_first_line(exc)})", path=path) from None
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise OrthopatchError(f"cannot load direction ({_first_line(exc)})", path=path) from None
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise OrthopatchError(f"cannot load direction ({_first_line(exc)})", path=path) from None
    raise OrthopatchError("unknown direction format (expected .pth, .pt, .safetensors or .npy)", path=path)


def _usable(array: np.ndarray, hidden_size: int, num_layers: int | None) -> bool:
    if array.ndim == 1:
        return array.shape[0] == hidden_size
    if array.ndim == 2 and array.shape[1] == hidden_size:
        return array.shape[0] == 1 or (num_layers is not None and array.shape[0] in (num_layers, num_layers + 1))
    return False


def load_direction(path: str | Path, hidden_size: int, num_layers: int | None = None) -> Direction:
    """Load, check against the model's ``hidden_size`` (and layer count), and normalize each row."""
    path = Path(path)
    if not path.is_file():
        raise OrthopatchError("direction file not found", path=path)
    raw = _read_raw(path)

    if isinstance(raw, dict):
        found = {k: _to_numpy(v) for k, v in raw.items()}
        usable = [k for k, a in found.items() if a is not None and _usable(a, hidden_size, num_layers)]
        if len(usable) != 1:
            listing = ", ".join(f"{k!r}: {_describe(raw[k], a)}" for k, a in found.items())
            want = "exactly one" if usable else "a"
            raise OrthopatchError(
                f"dict needs {want} tensor of shape {_shapes(hidden_size, num_layers)}; found {{{listing}}}",
                path=path,
            )
        array = found[usable[0]]
    else:
        array = _to_numpy(raw)
        if array is None:
            raise OrthopatchError(f"holds {_describe(raw, None)}, not a dense real-valued tensor", path=path)
    assert array is not None

    if not _usable(array, hidden_size, num_layers):
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
    norms = np.linalg.norm(scaled, axis=1) * peaks
    notes = []
    if not np.isfinite(norms).all() or np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        notes.append(f"direction norm was {norms.min():.6g}..{norms.max():.6g}, renormalized to 1 in float64")
    unit = scaled / np.linalg.norm(scaled, axis=1)[:, None]
    return Direction(path, file_sha256(path), unit, tuple(notes))


def _shapes(hidden_size: int, num_layers: int | None) -> str:
    shapes = [f"[{hidden_size}]", f"[1, {hidden_size}]"]
    if num_layers:
        shapes += [f"[{num_layers}, {hidden_size}]", f"[{num_layers + 1}, {hidden_size}]"]
    return " or ".join([", ".join(shapes[:-1]), shapes[-1]])

"""Load a refusal direction file safely and normalize it in float64.

Accepted: ``.pth``/``.pt`` (torch, ``weights_only`` so no pickle code can run), ``.safetensors``,
``.npy`` (no pickles). Shapes ``[d]``, ``[1, d]``, one row per layer ``[n_layers, d]``, or one row
per hidden state ``[n_layers + 1, d]``; a dict is accepted when it holds exactly one such tensor.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OrthopatchError

NORM_TOLERANCE = 1e-3


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
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        return value.astype(np.float64)
    return None


def _read_raw(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unsafe pickle"
            raise OrthopatchError(
                f"refused: the pickle asks to run code or load objects that are not plain tensors ({first})",
                path=path,
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise OrthopatchError(f"cannot load direction ({str(exc).splitlines()[0]})", path=path) from None
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise OrthopatchError(f"cannot load direction ({exc})", path=path) from None
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise OrthopatchError(f"cannot load direction ({exc})", path=path) from None
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
            listing = ", ".join(
                f"{k}: {list(a.shape) if a is not None else type(raw[k]).__name__}" for k, a in found.items()
            )
            want = "exactly one" if usable else "a"
            raise OrthopatchError(
                f"dict needs {want} tensor of shape [{hidden_size}] or [1, {hidden_size}]; found {{{listing}}}",
                path=path,
            )
        array = found[usable[0]]
    else:
        array = _to_numpy(raw)
        if array is None:
            raise OrthopatchError(f"holds a {type(raw).__name__}, not a tensor", path=path)
    assert array is not None

    if not _usable(array, hidden_size, num_layers):
        layers = f", [{num_layers}, {hidden_size}] or [{num_layers + 1}, {hidden_size}]" if num_layers else ""
        raise OrthopatchError(
            f"direction has shape {list(array.shape)}; the model needs [{hidden_size}], [1, {hidden_size}]{layers}",
            path=path,
        )
    rows = array.reshape(-1, hidden_size)
    if not np.isfinite(rows).all():
        raise OrthopatchError("direction contains NaN or Inf", path=path)
    norms = np.linalg.norm(rows, axis=1)
    if (norms == 0).any():
        raise OrthopatchError("direction is zero (it has no direction to project out)", path=path)
    notes = []
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        notes.append(f"direction norm was {norms.min():.6g}..{norms.max():.6g}, renormalized to 1 in float64")
    return Direction(path, file_sha256(path), rows / norms[:, None], tuple(notes))

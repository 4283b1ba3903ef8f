"""The one error type the CLI turns into a one-line message."""

from __future__ import annotations

import os


class OrthopatchError(Exception):
    """A known failure: bad input, a refused output folder, an I/O error.

    ``path`` and ``tensor`` locate the problem; ``str()`` is the one line a user sees.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, tensor: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [p for p in (self.path, f"tensor {self.tensor!r}" if self.tensor else None) if p]
        return ": ".join([*where, self.message])


class HeaderError(OrthopatchError):
    """A safetensors file whose header or layout breaks the format."""

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
        where = [p for p in (quoted(self.path) if self.path else None,
                             f"tensor {shortened(self.tensor)}" if self.tensor else None) if p]
        return one_line(": ".join([*where, self.message]))


def quoted(name: str) -> str:
    """``name`` as it is when it prints on one line, else as a Python string literal (``'a\\nb'``)."""
    return name if name.isprintable() else repr(name)


def shortened(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to about ``limit`` characters: a hostile header's name may be megabytes long."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}..." + (f" ({len(value):,} characters)" if isinstance(value, str) else "")


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, so a message stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class HeaderError(OrthopatchError):
    """A safetensors file whose header or layout breaks the format."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, for a one-line error (its type when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

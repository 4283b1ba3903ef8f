"""Progress on stderr: a bar on a terminal, plain lines elsewhere (CI logs, ``make`` output).

A bar redraws itself with carriage returns, which a log file keeps as one line holding hundreds of
them; when stderr is not a terminal a line ``label: N of M bytes (P%)`` is printed at most every
:data:`PLAIN_SECONDS` and once at the end instead. Byte progress is safe to update from the copy
thread and the patch thread at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_SECONDS = 5.0

T = TypeVar("T")


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class _PlainLines:
    """``label: N of M unit (P%)`` on stderr, at most every :data:`PLAIN_SECONDS` and at the end."""

    def __init__(self, total: int, unit: str, label: str = ""):
        self.total, self.unit, self.label = total, unit, label
        self.done = 0
        self.printed_at = time.monotonic()
        self.printed_done: int | None = None

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.printed_at >= PLAIN_SECONDS:
            self.print()

    def print(self) -> None:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        label = f"{self.label}: " if self.label else ""
        print(f"{label}{self.done:,} of {self.total:,} {self.unit}{share}", file=sys.stderr, flush=True)
        self.printed_at, self.printed_done = time.monotonic(), self.done

    def close(self) -> None:
        if self.printed_done != self.done:
            self.print()


class ByteProgress:
    """Bytes done of ``total``: a bar on a terminal, plain lines otherwise; nothing when ``disable``."""

    def __init__(self, total: int, disable: bool = False):
        self._plain = None if disable or _terminal() else _PlainLines(total, "bytes")
        # The finished bar stays on screen: the last thing before the result line is how it went.
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                         disable=disable or self._plain is not None, dynamic_ncols=True, leave=True)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)
            if self._plain is not None:
                self._plain.update(n)

    def set_description(self, text: str) -> None:
        with self._lock:
            self._bar.set_description(text)
            if self._plain is not None:
                self._plain.label = text

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
        if self._plain is not None and not exc[0]:
            self._plain.close()


def steps(items: Iterable[T], total: int, label: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """``items`` with their progress on stderr: a transient bar on a terminal, plain lines otherwise."""
    if not enabled:
        yield from items
        return
    if _terminal():
        yield from tqdm(items, total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        return
    lines = _PlainLines(total, f"{unit}s", label)
    for item in items:
        yield item
        lines.update(1)
    lines.close()

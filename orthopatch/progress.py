"""Byte progress on stderr, safe to update from the copy thread and the patch thread at once."""

from __future__ import annotations

import sys
import threading

from tqdm import tqdm


class ByteProgress:
    def __init__(self, total: int, disable: bool = False):
        # The finished bar stays on screen: the last thing before the result line is how it went.
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                         disable=disable, dynamic_ncols=True, leave=True)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def set_description(self, text: str) -> None:
        with self._lock:
            self._bar.set_description(text)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

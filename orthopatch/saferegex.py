"""Regular expressions from outside (``--targets``, and the targets a record replays) run in bounded time.

Python's ``re`` backtracks: ``(a+)+$`` against thirty ``a`` and a ``b`` takes longer than the age of
the universe. Two guards. Before compiling, :func:`unsafe_reason` refuses the constructions that make
backtracking exponential: inside a repeat, a repeat that can vary (``?``, ``+``, ``{1,3}``: the
``(a?){28}a{28}`` kind) or that repeats more than once, an alternation, and backreferences; patterns
are also capped in length. While matching, :func:`time_limit` bounds the
total time (the engine checks for signals, so an alarm stops it), which also covers polynomial cases
such as ``.*.*.*.*x`` against long names.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orthopatch.errors import OrthopatchError

#: Longest pattern accepted (real target patterns are well under 200 characters).
MAX_PATTERN_CHARS = 1000
#: Seconds all the matching of one plan may take (a 405B model's names take milliseconds).
MATCH_SECONDS = 30.0

try:  # the parser behind re.compile; private, hence the fallback
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    _sre_parse = None


def _walk(items: Any, in_repeat: bool) -> str | None:
    """The first construction of a parsed pattern that makes backtracking exponential, or None."""
    for op, av in items:
        found = None
        if str(op).startswith("GROUPREF"):
            return "a backreference"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            least, most, inner = av
            if in_repeat and (most > 1 or least != most):  # a?, a+ or a{1,3} inside (...){28}, (...)*
                return "a repeat inside a repeat, e.g. (a+)+ or (a?){28}"
            found = _walk(inner, in_repeat or most > 1)
        elif op == _c.BRANCH:
            if in_repeat:
                return "an alternation inside a repeat, e.g. (a|ab)*"
            found = next((r for branch in av[1] if (r := _walk(branch, in_repeat))), None)
        elif op == _c.SUBPATTERN:
            found = _walk(av[3], in_repeat)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            found = _walk(av[1], in_repeat)
        elif op == _c.ATOMIC_GROUP:
            found = _walk(av, in_repeat)
        if found:
            return found
    return None


def unsafe_reason(pattern: str) -> str | None:
    """Why matching ``pattern`` could take exponential time, or None when it cannot.

    Call it on a pattern that compiles; it reads the parse ``re.compile`` itself uses.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is {len(pattern):,} characters long (at most {MAX_PATTERN_CHARS:,})"
    if _sre_parse is None:  # pragma: no cover
        return None
    found = _walk(_sre_parse.parse(pattern), False)
    return f"it has {found}, which can take exponential time to match" if found else None


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise a one-line error if the body (matching patterns) runs longer than ``seconds``.

    Works on the main thread of a Unix process (where the CLI runs); elsewhere the body runs unbounded,
    guarded only by :func:`unsafe_reason`.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(*_: object) -> None:
        raise OrthopatchError(f"{what} took more than {seconds:g} s: a pattern backtracks too much on these names")

    previous = signal.signal(signal.SIGALRM, expired)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # an alarm set by the caller, if any
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # the caller's alarm goes on, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3))

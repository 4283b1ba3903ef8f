"""Regular expressions from outside (``--targets``, and the targets a record replays) run in bounded time.

Python's ``re`` backtracks: ``(a+)+$`` against thirty ``a`` and a ``b`` takes longer than the age of
the universe. Two guards. Before compiling, :func:`unsafe_reason` refuses the constructions that make
backtracking exponential: inside a repeat, a repeat that can vary (``?``, ``+``, ``{1,3}``: the
``(a?){28}a{28}`` kind) or that repeats more than once, an alternation, and backreferences; patterns
are also capped in length. While matching, :func:`match_all` bounds the total time, which also
covers polynomial cases such as ``.*.*.*.*x`` against long names: on the main thread with an alarm
(the engine checks for signals, so :func:`time_limit` stops it), on any other thread, where no signal
can reach it and nothing else interrupts ``re``, in a worker process that is killed when time is up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
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


#: What a match of one name gives: the index of the first pattern that matches it and the named groups that took
#: part in the match, or None when no pattern matches.
NameMatch = tuple[int, dict[str, str]] | None

#: The worker process's whole program: run with ``-I -S`` (no site, no environment, no current folder on the
#: path), it imports this module from the folder that holds the package, and so only the standard library.
_WORKER = "import sys; sys.path.insert(0, sys.argv[1]); from orthopatch.saferegex import _serve; _serve()"


def _too_slow(what: str, seconds: float) -> OrthopatchError:
    return OrthopatchError(f"{what} took more than {seconds:g} s: a pattern backtracks too much on these names")


def _can_alarm() -> bool:
    """Whether :func:`time_limit` can interrupt matching here (the main thread of a Unix process)."""
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise a one-line error if the body (matching patterns) runs longer than ``seconds``.

    Works on the main thread of a Unix process (where the CLI runs); elsewhere the body runs unbounded,
    which is why :func:`match_all` matches in a worker process there.
    """
    if not _can_alarm():
        yield
        return

    def expired(*_: object) -> None:
        raise _too_slow(what, seconds)

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


def _match_names(patterns: Sequence[tuple[str, int]], names: Sequence[str]) -> list[NameMatch]:
    """Each name's first fully matching pattern (source and flags), with its named groups that matched."""
    compiled = [re.compile(source, flags) for source, flags in patterns]
    found: list[NameMatch] = []
    for name in names:
        for index, pattern in enumerate(compiled):
            m = pattern.fullmatch(name)
            if m is not None:
                found.append((index, {k: v for k, v in m.groupdict().items() if v is not None}))
                break
        else:
            found.append(None)
    return found


def _serve() -> None:
    """The worker process: patterns and names as JSON on stdin, :func:`_match_names`'s answer as JSON on stdout."""
    request = json.load(sys.stdin)
    json.dump(_match_names(request["patterns"], request["names"]), sys.stdout)


def _match_in_worker(patterns: list[tuple[str, int]], names: Sequence[str], seconds: float,
                     what: str) -> list[NameMatch]:
    """:func:`_match_names` in a fresh Python process, killed after ``seconds``.

    A process of its own (``python -I -S``, not a fork of this one, which may hold threads and torch)
    is what can be stopped: no thread but the main one can interrupt ``re``.
    """
    if not sys.executable:
        raise OrthopatchError(f"{what} off the main thread needs a Python executable to match in a time limit, "
                              "and sys.executable is empty")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    request = json.dumps({"patterns": patterns, "names": list(names)}).encode("ascii")
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _WORKER, root], input=request,
                              capture_output=True, timeout=seconds, check=False)
    except subprocess.TimeoutExpired:  # run() has killed and reaped the worker
        raise _too_slow(what, seconds) from None
    except OSError as exc:
        raise OrthopatchError(f"{what}: cannot start a worker process ({exc})") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise OrthopatchError(f"{what} failed in its worker process ({lines[-1][:500]})")
    return [None if m is None else (m[0], m[1]) for m in json.loads(done.stdout)]


def match_all(patterns: Sequence[str | re.Pattern[str]], names: Sequence[str], seconds: float = MATCH_SECONDS,
              what: str = "matching the --targets patterns") -> list[NameMatch]:
    """For each of ``names``, the index of the first of ``patterns`` that matches it whole, and the named
    groups that matched; None where no pattern matches. A one-line error if that takes over ``seconds``.

    The bound holds on any thread: the main thread matches here under an alarm (no process to start),
    any other thread, or a platform without ``SIGALRM``, in a worker process that is killed in time.
    """
    pairs = [(p, 0) if isinstance(p, str) else (p.pattern, p.flags) for p in patterns]
    if _can_alarm():
        with time_limit(seconds, what):
            return _match_names(pairs, names)
    return _match_in_worker(pairs, names, seconds, what)

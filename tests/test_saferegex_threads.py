"""The time limit on matching patterns from outside holds on any thread, not only the main one.

A slow pattern (one the static check lets through, polynomial on long names) ends in the same one-line
error on the main thread (an alarm), on a worker thread and where ``SIGALRM`` is missing (a worker process,
killed when time is up); ordinary patterns give the same matches on every path.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import open_checkpoint
from orthopatch.patch import plan
from orthopatch.patch.architecture import custom_architecture
from orthopatch.saferegex import match_all, unsafe_reason
from tests.helpers import tiny_llama

SLOW = ".*" * 6 + "x"  # about n**6 steps on a name of n characters that has no x
LONG_NAMES = ["a" * 2000 + str(i) for i in range(3)]
TOO_SLOW = "matching the --targets patterns took more than 1 s: a pattern backtracks too much on these names"
PATTERNS: list[str | re.Pattern[str]] = [
    r"model\.layers\.(?P<layer>\d+)\.(?P<kind>mlp|self_attn)\.(?:(?P<extra>gate)_)?\w+\.weight",
    re.compile(r"embed.*", re.IGNORECASE),
    r"lm_head\.weight",
]
NAMES = ["model.layers.3.mlp.down_proj.weight", "EMBED_tokens.weight", "lm_head.weight", "model.norm.weight",
         "model.layers.12.self_attn.gate_o.weight", "lm_head.weight.extra", "odd \ud800 name"]
EXPECTED = [(0, {"layer": "3", "kind": "mlp"}), (1, {}), (2, {}), None,
            (0, {"layer": "12", "kind": "self_attn", "extra": "gate"}), None, None]


def in_thread(call: Callable[[], Any], wait: float = 30.0) -> Any:
    """``call()`` on a new thread: its result, or the exception it raised."""
    found: list[Any] = []

    def work() -> None:
        try:
            found.append(call())
        except Exception as exc:
            found.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(wait)
    assert not thread.is_alive(), "the call on the worker thread did not end"
    return found[0]


@pytest.fixture
def no_alarm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A platform without ``SIGALRM`` timers, as the matching sees it."""
    monkeypatch.delattr(signal, "setitimer")


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen]:
    """Every process started while the test runs."""
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return started


def test_the_slow_pattern_passes_the_static_check() -> None:
    assert unsafe_reason(SLOW) is None


def test_ordinary_patterns_match_alike_on_every_path(no_alarm) -> None:
    assert match_all(PATTERNS, NAMES, 30) == EXPECTED  # no alarm: a worker process
    assert in_thread(lambda: match_all(PATTERNS, NAMES, 30)) == EXPECTED
    assert match_all(PATTERNS, [], 30) == []


def test_ordinary_patterns_match_on_the_main_thread_without_a_process(workers) -> None:
    assert match_all(PATTERNS, NAMES, 30) == EXPECTED
    assert workers == []


def slow_call(seconds: float = 1.0) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result: object = match_all(["model", SLOW], LONG_NAMES, seconds)
    except OrthopatchError as exc:
        result = exc
    return result, time.monotonic() - started


def test_a_slow_pattern_is_stopped_on_a_worker_thread(workers) -> None:
    found, took = in_thread(slow_call)
    assert isinstance(found, OrthopatchError) and str(found) == TOO_SLOW
    assert took < 10, took
    assert len(workers) == 1 and workers[0].returncode is not None  # killed and reaped
    with pytest.raises(ProcessLookupError):
        os.kill(workers[0].pid, 0)


def test_a_slow_pattern_is_stopped_on_the_main_thread() -> None:
    found, took = slow_call()
    assert isinstance(found, OrthopatchError) and str(found) == TOO_SLOW
    assert took < 10, took


def test_a_slow_pattern_is_stopped_without_sigalrm(no_alarm, workers) -> None:
    found, took = slow_call()
    assert isinstance(found, OrthopatchError) and str(found) == TOO_SLOW
    assert took < 10, took
    assert len(workers) == 1 and workers[0].returncode is not None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("regex-threads") / "model")


def test_build_plan_with_custom_targets_is_the_same_off_the_main_thread(model) -> None:
    checkpoint = open_checkpoint(model)
    arch = custom_architecture([r"model\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.weight:0",
                                r"model\.embed_tokens\.weight:1"], checkpoint.config)
    here = plan.build_plan(checkpoint, arch)
    there = in_thread(lambda: plan.build_plan(checkpoint, arch))
    assert not isinstance(there, Exception), there
    assert [(t.name, t.layer, t.role) for t in there.targets()] == [(t.name, t.layer, t.role) for t in here.targets()]
    assert any(t.layer is not None for t in here.targets()) and any(t.layer is None for t in here.targets())


def test_build_plan_on_a_worker_thread_ends_in_the_error_not_a_hang(model, monkeypatch) -> None:
    monkeypatch.setattr(plan, "MATCH_SECONDS", 1.0)
    checkpoint = open_checkpoint(model)
    arch = custom_architecture(["model" + ".*" * 12 + "Z:0"], checkpoint.config)
    started = time.monotonic()
    found = in_thread(lambda: plan.build_plan(checkpoint, arch))
    assert isinstance(found, OrthopatchError) and str(found) == TOO_SLOW
    assert time.monotonic() - started < 10

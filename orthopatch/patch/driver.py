"""The one driver of a conversion, and the small protocol its destinations implement.

A :class:`Destination` is where the bytes go: a new folder (:mod:`orthopatch.patch.output`) or the
model's own shards through a journal (:mod:`orthopatch.patch.inplace`). Opened for a run, it locks
what it writes, reads its own state and hands the driver a :class:`Session`: whether the work is
already done, the :class:`Step` s left, and how to finish (small files, card, then the record that
marks the result complete). The driver runs the same sequence for every destination: plan line,
progress, steps, record.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orthopatch.errors import quoted
from orthopatch.io.filecopy import CopyStats
from orthopatch.patch.conversion import Conversion
from orthopatch.patch.plan import ConversionPlan
from orthopatch.patch.record import ConversionRecord
from orthopatch.patch.stream import Progress
from orthopatch.progress import ByteProgress

Log = Callable[[str], None]


class RunState(enum.StrEnum):
    """What a run of ``apply`` did (compares equal to its text, which the result line shows)."""

    DRY_RUN = "dry-run"
    ALREADY_COMPLETE = "already complete"
    WRITTEN = "written"
    RESUMED = "resumed"
    WRITTEN_IN_PLACE = "written in place"
    RESUMED_IN_PLACE = "resumed in place"


@dataclass(frozen=True)
class ApplyResult:
    out: Path
    plan: ConversionPlan
    state: RunState
    seconds: float = 0.0
    #: Bytes of patched tensors written by this run (work finished by an earlier run not counted).
    patched: int = 0
    #: Where this run's unchanged bytes went: shared with the source, copied in the kernel, or by hand.
    copied: CopyStats = field(default_factory=CopyStats)
    in_place: bool = False


@dataclass(frozen=True)
class Step:
    """One unit of a run's work (a shard, or a tensor in place): its progress label and bytes, and the work."""

    label: str
    nbytes: int
    run: Callable[[Progress], None]


class Session(Protocol):
    """A destination opened for one run."""

    #: The destination already holds this conversion, finished: nothing to do.
    complete: bool
    #: An interrupted run of the same conversion is being finished.
    resumed: bool
    #: Bytes of patched tensors this run writes, and where its copies went (filled as steps run).
    patched: int
    copied: CopyStats

    def steps(self) -> list[Step]:
        """The work left, in order."""

    def plan_tail(self, steps: list[Step]) -> str | None:
        """The end of the plan line (where the bytes go, what is left), or None to show no plan or progress."""

    def finish(self, record: ConversionRecord) -> None:
        """Write what follows the tensors (small files, card) and, last, the record."""


class Destination(Protocol):
    """Where a conversion's bytes go."""

    root: Path
    in_place: bool

    def open(self, conversion: Conversion, log: Log) -> AbstractContextManager[Session]:
        """Lock the destination for the run and read its state."""


def run(conversion: Conversion, destination: Destination, *, quiet: bool = False,
        log: Log = lambda _: None) -> ApplyResult:
    """Run ``conversion`` into ``destination``: the same sequence whatever the destination."""
    plan, in_place = conversion.plan, destination.in_place
    started = time.monotonic()
    with destination.open(conversion, log) as session:
        if session.complete:
            return ApplyResult(destination.root, plan, RunState.ALREADY_COMPLETE, in_place=in_place)
        steps = session.steps()
        tail = session.plan_tail(steps)
        if tail is not None:
            log(conversion.plan_line(tail))
            with ByteProgress(sum(step.nbytes for step in steps), disable=quiet) as progress:
                for step in steps:
                    progress.set_description(quoted(step.label))
                    step.run(progress.update)
        seconds = time.monotonic() - started
        session.finish(conversion.record(seconds, in_place=in_place))
    if in_place:
        state = RunState.RESUMED_IN_PLACE if session.resumed else RunState.WRITTEN_IN_PLACE
    else:
        state = RunState.RESUMED if session.resumed else RunState.WRITTEN
    return ApplyResult(destination.root, plan, state, seconds, session.patched, session.copied, in_place)

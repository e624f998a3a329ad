"""Progress of long steps (a history import goes through thousands of days, a training run through a
dozen Dagster steps): a bar per stage and the running step on the terminal when a command asks for it,
log lines otherwise.

The bulk functions (`recloop.ingestion.ingest_range`, `recloop.validation.validate_range`,
`recloop.features.compute_features_range`, ...) report through `stage(...)`, and `pipelines.run` reports
the Dagster events of the runs it executes in process through `run_event(...)`; which reporter listens is
decided by whoever runs them:

* the `recloop` command installs a `recloop.terminal.RunProgress` around its runs (rich bars and a
  spinner on stderr when it is a terminal, plain lines otherwise);
* a Dagster asset installs a `LogReporter` on its run log when nobody listens yet (runs launched from the
  UI or by the daemon): a line every 10 %;
* nothing installed: the stages and events cost nothing.

The reporter is process-wide (not a context variable): Dagster's in-process executor may run a step in
another thread than the one that started the run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol


class Stage(Protocol):
    def update(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class Reporter(Protocol):
    def stage(self, name: str, total: int, unit: str) -> contextlib.AbstractContextManager[Stage]: ...

    # Optional: `run_event(job, kind, step)` receives the Dagster events of the runs `pipelines.run`
    # executes (see `run_event` below).


class _NullStage:
    def update(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class NullReporter:
    """Reports nothing."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Stage]:
        yield _NullStage()


class LogReporter:
    """A log line when a stage starts, every `every` of its progress, and when it ends."""

    def __init__(self, log: Any, every: float = 0.1) -> None:
        self.log = log
        self.every = every

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Stage]:
        log, every = self.log, self.every
        started = time.perf_counter()
        state = {"done": 0, "next": every, "note": ""}
        log.info(f"{name}: {total:,} {unit}(s)")

        class _Lines:
            def update(self, n: int = 1) -> None:
                state["done"] += n
                if total and state["done"] / total >= state["next"] and state["done"] < total:
                    state["next"] = (int(state["done"] / total / every) + 1) * every
                    log.info(f"{name}: {state['done']:,}/{total:,} {unit}(s) ({state['done'] / total:.0%})")

            def note(self, text: str) -> None:
                state["note"] = text

        try:
            yield _Lines()
        finally:
            suffix = f"; {state['note']}" if state["note"] else ""
            log.info(f"{name}: done, {state['done']:,}/{total:,} {unit}(s) in {time.perf_counter() - started:.1f} s{suffix}")


_LOCK = threading.Lock()
_current: Reporter = NullReporter()


def current() -> Reporter:
    return _current


def stage(name: str, total: int, unit: str = "day") -> contextlib.AbstractContextManager[Stage]:
    """A stage of `total` units on the current reporter: `with stage("validate", n) as s: s.update()`."""
    return _current.stage(name, total, unit)


def listening() -> bool:
    """Whether the current reporter wants the Dagster events of runs (`pipelines.run` subscribes only then)."""
    return callable(getattr(_current, "run_event", None))


def run_event(job: str, kind: str, step: str | None) -> None:
    """One Dagster event of a run executed in process, for the current reporter: `job` names the run (the
    job, and its partition when it has one), `kind` is the event type (`STEP_START`, `STEP_SUCCESS`,
    `PIPELINE_SUCCESS`, ...), `step` the step key. A reporter's error never reaches the run."""
    handler = getattr(_current, "run_event", None)
    if handler is None:
        return
    try:
        handler(job, kind, step)
    except Exception:  # noqa: BLE001 - a progress display must not fail the run it shows
        logging.getLogger(__name__).debug("the progress display failed on %s of %s", kind, job, exc_info=True)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` for the duration of the block (the previous one comes back afterwards)."""
    global _current
    with _LOCK:
        previous, _current = _current, reporter
    try:
        yield reporter
    finally:
        with _LOCK:
            _current = previous


@contextlib.contextmanager
def unless_reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` only when nothing listens yet (a Dagster step run from the UI logs its progress;
    the same step run by `recloop import` keeps drawing the command's bars)."""
    if not isinstance(_current, NullReporter):
        yield _current
        return
    with reporting(reporter) as r:
        yield r

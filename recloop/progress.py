"""Progress of long steps (a history import goes through thousands of days): a bar per stage on the
terminal when a command asks for one, log lines otherwise.

The bulk functions (`recloop.ingestion.ingest_range`, `recloop.validation.validate_range`,
`recloop.features.compute_features_range`, ...) report through `stage(...)`; which reporter listens is
decided by whoever runs them:

* `recloop import` / `recloop run --start --end` install a `TerminalReporter` (tqdm bars on stderr) around
  the in-process Dagster run, so the assets' stages draw bars on the user's terminal;
* a Dagster asset installs a `LogReporter` on its run log when nobody listens yet (runs launched from the
  UI or by the daemon): a line every 10 %;
* nothing installed: the stages cost nothing.

The reporter is process-wide (not a context variable): Dagster's in-process executor may run a step in
another thread than the one that started the run.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol


class Stage(Protocol):
    def update(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class Reporter(Protocol):
    def stage(self, name: str, total: int, unit: str) -> contextlib.AbstractContextManager[Stage]: ...


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


class TerminalReporter:
    """One tqdm bar per stage on stderr (left on screen when the stage ends)."""

    def __init__(self, file: Any = None, disable: bool | None = None) -> None:
        self.file = file or sys.stderr
        # No bars when stderr is not a terminal (CI logs, pipes), unless asked for.
        self.disable = (not getattr(self.file, "isatty", lambda: False)()) if disable is None else disable

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Stage]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{name:<22}", unit=f" {unit}", file=self.file, disable=self.disable,
                   dynamic_ncols=True, leave=True, mininterval=0.2,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]")

        class _Bar:
            def update(self, n: int = 1) -> None:
                bar.update(n)

            def note(self, text: str) -> None:
                bar.set_postfix_str(text, refresh=False)

        try:
            yield _Bar()
        finally:
            bar.close()


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

"""What the `recloop` command writes to the terminal: rich consoles for results (stdout) and progress
(stderr), the progress of the Dagster runs a command starts, and where to look at things afterwards.

* Results go to stdout through `stdout_console()`: styled on a terminal; plain text (no ANSI codes, a fixed
  width, no emoji or markup interpretation of the data's own text) when piped or captured.
* Progress goes to stderr through `RunProgress`, installed as the process-wide reporter of
  `recloop.progress`: on a terminal a live display (a spinner for the running Dagster step, a bar per
  long stage, a line per finished step); otherwise one plain line per finished step and stage, or
  nothing (`plain=False`). `pipelines.run` forwards the Dagster events of the runs it starts to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote

from rich.console import Console

from recloop import links

# Width of the output when it is not a terminal (a pipe, a file, a test's capture): wide enough that a
# table's one-line reasons are not folded, narrow enough to read in a log viewer. COLUMNS overrides it.
PLAIN_WIDTH = 120

# Without a terminal, a running stage says how far it got this often (and when it is done).
PLAIN_EVERY_S = 15.0

API_DOCS = "http://127.0.0.1:{port}/docs"  # `recloop serve` (default port 8000)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _console(file: IO[str] | None, *, stderr: bool) -> Console:
    stream = file or (sys.stderr if stderr else sys.stdout)
    width = None
    if not _isatty(stream):
        try:
            width = int(os.environ.get("COLUMNS", "")) or PLAIN_WIDTH
        except ValueError:
            width = PLAIN_WIDTH
    # markup/emoji off: reasons, file names and alert texts are printed as they are ("[x]" and ":x:" stay).
    # Without a terminal a line is never folded (grep finds it whole); tables still fit `width`.
    return Console(file=file, stderr=stderr, width=width, markup=False, emoji=False, highlight=False,
                   soft_wrap=width is not None)


def stdout_console(file: IO[str] | None = None) -> Console:
    """The console for a command's result (sys.stdout at the time of each write unless `file`)."""
    return _console(file, stderr=False)


def stderr_console(file: IO[str] | None = None) -> Console:
    """The console for progress and messages (sys.stderr unless `file`)."""
    return _console(file, stderr=True)


_SHORTCODE = re.compile(r"(?<![\w:]):[a-z0-9_+-]+:(?![\w:])")


def plain_text(text: str) -> str:
    """An alert's chat text for a terminal: Slack/Mattermost emoji shortcodes (`:white_check_mark:`,
    `:x:`), which chat tools render as icons and terminals would show literally, removed."""
    return re.sub(r"\s{2,}", " ", _SHORTCODE.sub("", text)).strip()


# --- where to look ----------------------------------------------------------------------------------


def dagster_run_url(run_id: str) -> str:
    """The run's page in the Dagster UI (`make ui`; $RECLOOP_DAGSTER_URL, `recloop.links`)."""
    return f"{links.dagster_ui_url()}/runs/{run_id}"


def mlflow_ui_command(tracking_uri: str, *, masked_uri: str | None = None) -> str | None:
    """The command that starts an MLflow UI on this store, None when the store is a server already (its UI
    is at $RECLOOP_MLFLOW_UI_URL, `recloop.links`). `masked_uri`: the tracking URI to print (a database URL
    without its password)."""
    scheme = tracking_uri.split(":", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in ("http", "https"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(masked_uri or tracking_uri)}"


def mlflow_model_url(model_name: str, version: str | None = None) -> str:
    """A registered model (or one of its versions) in the MLflow UI."""
    if version:
        return links.mlflow_model_version_url(model_name, version)
    return f"{links.mlflow_ui_url()}/#/models/{quote(model_name, safe='')}?{links.ML_VIEW}"


# --- progress ---------------------------------------------------------------------------------------


def step_name(step_key: str) -> str:
    """A Dagster step key as the asset it computes (`model__training_set` -> `model/training_set`)."""
    return step_key.replace("__", "/")


class _PlainStage:
    """A stage as plain lines: how far it got every `every` seconds while it runs (a history of thousands of
    days), nothing more for a short one; its end is said by `RunProgress.stage`."""

    def __init__(self, say: Any, name: str, total: int, unit: str, every: float) -> None:
        self.say, self.name, self.total, self.unit, self.every = say, name, total, unit, every
        self.done, self.text = 0, ""
        self.next = time.perf_counter() + every

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.total and self.done < self.total and now >= self.next:
            self.next = now + self.every
            self.say(f"  {self.name}: {self.done:,}/{self.total:,} {self.unit}(s) ({self.done / self.total:.0%})")

    def note(self, text: str) -> None:
        self.text = text


class _RichStage:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        self.progress.update(self.task, note=text)


class RunProgress:
    """Progress of a command on stderr: the Dagster runs it starts (via `recloop.progress.run_event`) and
    the long stages of their steps (`recloop.progress.stage`).

    Use as a context manager; unless it shows nothing, it installs itself as `recloop.progress`'s reporter
    for the block.

    Args:
        enabled: False shows nothing (`--no-progress`).
        plain: when stderr is not a terminal, one line per finished step and stage (True) or nothing.
        steps: on a terminal, a line per finished Dagster step (True) or only the spinner.
        transient: on a terminal, remove the spinner and bars when the block ends.
    """

    def __init__(self, *, enabled: bool = True, plain: bool = True, steps: bool = True,
                 transient: bool = False, file: IO[str] | None = None) -> None:
        self.file = file
        stream = file or sys.stderr
        self.mode = "off" if not enabled else ("rich" if _isatty(stream) else ("plain" if plain else "off"))
        self.steps = steps
        self.transient = transient
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None
        self._planned: dict[str, set[str]] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._finished: dict[str, int] = {}
        self._reporting: contextlib.ExitStack | None = None

    # -- lifecycle --

    def __enter__(self) -> RunProgress:
        from recloop import progress

        if self.mode == "rich":
            from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

            console = Console(file=self.file, stderr=True, markup=False, emoji=False, highlight=False)
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30), TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                console=console, transient=self.transient,
                # The command's own prints (the demo's story) go above the live display when stdout is the
                # same terminal; a redirected stdout stays where it was sent.
                redirect_stdout=_isatty(sys.stdout), redirect_stderr=True)
            self._progress.start()
        if self.mode != "off":
            # Off, it stays out of the way: a Dagster step then logs its stages in the run's log as usual.
            self._reporting = contextlib.ExitStack()
            self._reporting.enter_context(progress.reporting(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._reporting is not None:
            self._reporting.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- output --

    def say(self, text: str) -> None:
        """A line on stderr (above the live display on a terminal); nothing when progress is off."""
        if self.mode == "off":
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.file or sys.stderr, flush=True)

    # -- recloop.progress reporter --

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str) -> Iterator[Any]:
        if self.mode == "rich":
            task = self._progress.add_task(f"{name:<20}", total=total or None, note="")
            try:
                yield _RichStage(self._progress, task)
            finally:
                if self.transient:
                    self._progress.remove_task(task)
                else:
                    self._progress.stop_task(task)
            return
        started = time.perf_counter()
        s = _PlainStage(self.say, name, total, unit, every=PLAIN_EVERY_S)
        try:
            yield s
        finally:
            suffix = f"; {s.text}" if s.text else ""
            self.say(f"  {name}: done, {s.done:,}/{total:,} {unit}(s) in {time.perf_counter() - started:.1f} s{suffix}")

    # -- Dagster events (pipelines.run) --

    def run_event(self, job: str, kind: str, step: str | None) -> None:
        """One event of a Dagster run this process executes: the job's name, the event type's name
        (`STEP_START`, `STEP_SUCCESS`, ...), the step key when the event belongs to a step."""
        if self.mode == "off":
            return
        with self._lock:
            self._on_event(job, kind, step)

    def _on_event(self, job: str, kind: str, step: str | None) -> None:
        planned = self._planned.setdefault(job, set())
        if kind in ("ASSET_MATERIALIZATION_PLANNED", "ASSET_CHECK_EVALUATION_PLANNED") and step:
            planned.add(step)
        elif kind in ("PIPELINE_START", "RUN_START"):
            self._finished[job] = 0
            self._show(f"{job}: starting", restart=True)
        elif kind == "STEP_START" and step:
            planned.add(step)
            self._started[(job, step)] = time.perf_counter()
            self._show(f"{job}: {step_name(step)} ({self._finished.get(job, 0) + 1}/{len(planned)})")
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED") and step:
            planned.add(step)
            self._finished[job] = self._finished.get(job, 0) + 1
            began = self._started.pop((job, step), None)
            took = f" in {time.perf_counter() - began:.1f} s" if began is not None else ""
            outcome = {"STEP_SUCCESS": "done", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped"}[kind]
            line = f"[{self._finished[job]}/{len(planned)}] {step_name(step)} {outcome}{took}"
            if self.mode == "plain" or self.steps:
                self.say(f"  {line}")
            self._show(f"{job}: {self._finished[job]}/{len(planned)} steps")
        elif kind in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED", "RUN_SUCCESS", "RUN_FAILURE"):
            self._planned.pop(job, None)
            self._finished.pop(job, None)
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, visible=False)

    def _show(self, text: str, *, restart: bool = False) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(text, total=None, note="")
        elif restart:
            self._progress.reset(self._task, total=None)  # the elapsed time of this run, not the command's
        self._progress.update(self._task, description=text, visible=True)

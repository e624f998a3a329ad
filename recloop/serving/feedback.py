"""Feedback: impressions and watches reported by apps, written to the landing zone as raw events.

An accepted event is never lost: `submit` appends it to a spool file and fsyncs before the endpoint
answers; a background thread (`flush`, every `flush_seconds` or `max_batch` events) writes the spooled
events to the landing zone as one Parquet file per UTC day,

    <landing>/events/date=YYYY-MM-DD/feedback-<segment's UTC time>-<random>.parquet

with the `events` table's schema (docs/data_schema.md), and only then deletes the spool segment. A
crash between the two leaves the segment, which the next start flushes again: the landing file's name
comes from the segment's, so the second flush replaces the first file instead of doubling its events.
The landing file is written atomically (temporary name, then rename). Each `submit` is one line of
the spool (a JSON array of its events): a line torn by a crash in the middle of the write (a request
never acknowledged: the fsync had not returned) is skipped whole with a warning, never half of it.

Event ids of feedback live in their own namespace, `fb-`: an id the client sent is prefixed (`abc` →
`fb-abc`; one already starting with `fb-` is kept, so the ids the API returned can be sent again as
idempotency keys), and an event without one gets `fb-<random hex>`. So a feedback event can never carry
the id of an event delivered in the batch files.

The next ingestion of a day picks its feedback files up with the day's other files and validates them
like any other delivery: an event of an unknown user or video, or with a watch time over the video's
length, is quarantined with its reason, not dropped here.

One spool directory belongs to one serving process (give each replica its own).

The spool discipline itself (`SpoolWriter`: one line per accepted request, fsynced before the caller is
answered, background flush into the landing zone under names derived from the segment's, crash
re-flush, torn last line skipped) is shared with the impressions log (`recloop.serving.impressions`).

A feedback event may carry the `request_id` of the answer it reacts to (`rq-<32 hex>`, returned by
/v1/recommendations): the landing files carry it as an extra nullable string column `request_id` after
the events columns, which the data plane joins with the impressions log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recloop.data.schemas import EVENTS
from recloop.lake import Lake

log = logging.getLogger(__name__)

FILE_PREFIX = "feedback-"
EVENT_ID_PREFIX = "fb-"
_SEGMENT_PREFIX = "segment-"
_SEGMENT_GLOB = f"{_SEGMENT_PREFIX}*.jsonl"


def feedback_event_id(client_id: str | None) -> str:
    """The id a feedback event is stored under (see the module docstring): always `fb-...`."""
    if not client_id:
        return f"{EVENT_ID_PREFIX}{uuid.uuid4().hex}"
    return client_id if client_id.startswith(EVENT_ID_PREFIX) else EVENT_ID_PREFIX + client_id


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _from_json(line: str) -> list[dict[str, Any]]:
    """The events of one spool line: a JSON array (one `submit`) or, as older spools wrote, one object."""
    value = json.loads(line)
    rows = value if isinstance(value, list) else [value]
    for row in rows:
        row["event_time"] = datetime.fromisoformat(row["event_time"])
    return rows


FEEDBACK_COLUMNS = (*EVENTS.columns, "request_id")
FEEDBACK_SCHEMA = EVENTS.schema.append(pa.field("request_id", pa.string()))


def events_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Event rows (EVENTS columns and an optional `request_id`, `event_time` a UTC datetime) as a table
    with the events schema plus the nullable `request_id` column."""
    return pa.Table.from_pylist([{c: r.get(c) for c in FEEDBACK_COLUMNS} for r in rows], schema=FEEDBACK_SCHEMA)


class SpoolWriter:
    """Durable spool + batched flush into the landing zone; subclasses say what a line holds.

    `_append(line, rows)` writes one line (one accepted request) to the open segment and, with `fsync`
    (the default), fsyncs it before returning: the caller answers only after that. Without `fsync` the
    line is only handed to the kernel (`os.write`) before returning: it survives the process being
    killed (`kill -9`: the kernel still holds it), and the background thread fsyncs the open segment
    every `sync_seconds`, so a crash of the machine loses at most that long of lines. A background thread (`flush`, every `flush_seconds` or `max_batch` rows)
    writes the rows kept in memory to the landing zone (`_write_landing`, named after the segment), then
    deletes the segment; segments a crash left behind are read back (`_decode`) and flushed at start.
    """

    kind = "spool"  # in log messages and the thread's name

    def __init__(
        self,
        landing: Lake,
        spool_dir: Path,
        *,
        flush_seconds: float = 10.0,
        max_batch: int = 5_000,
        on_flushed: Any = None,
        fsync: bool = True,
        sync_seconds: float = 1.0,
    ) -> None:
        self.landing = landing
        self.spool_dir = Path(spool_dir)
        self.flush_seconds = flush_seconds
        self.max_batch = max_batch
        self.on_flushed = on_flushed  # called with the number of rows written to the landing zone
        self.fsync = fsync
        self.sync_seconds = sync_seconds
        self._dirty = False  # lines written since the last fsync (only without `fsync`)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._rows: list[Any] = []
        self._pending = 0  # landing rows the spooled lines make
        self._segment: Path | None = None
        self._fd: int | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what subclasses define -------------------------------------------------------------------

    def _decode(self, line: str) -> list[Any]:
        """The in-memory items one spool line holds (what `_append` was given as `rows`)."""
        raise NotImplementedError

    def _write_landing(self, rows: list[Any], name: str) -> list[str]:
        """Write `rows` to the landing zone under keys made from `name` only (same segment, same keys)."""
        raise NotImplementedError

    def _count(self, rows: list[Any]) -> int:
        """Landing rows that `rows` make (for `max_batch` and `on_flushed`)."""
        return len(rows)

    # --- accepting --------------------------------------------------------------------------------

    def _append(self, line: str, rows: list[Any]) -> None:
        """Make one line durable (see the class docstring); `rows` reach the landing zone at the next flush.
        One line per call: a crash in the middle of the write tears that line only, and the whole
        (unacknowledged) request is skipped on recovery, never half of it."""
        data = (line + "\n").encode("utf-8", errors="surrogateescape")
        with self._lock:
            if self._fd is None:
                self._segment = self.spool_dir / f"{_SEGMENT_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.jsonl"
                self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self.fsync:
                os.fsync(self._fd)
            else:
                self._dirty = True
            self._rows.extend(rows)
            self._pending += self._count(rows)
            full = self._pending >= self.max_batch
        if full:
            self._wake.set()

    # --- flushing ---------------------------------------------------------------------------------

    def _read_segment(self, path: Path) -> list[Any]:
        """The rows of a spool segment. A last line cut short by a crash during a write was never
        acknowledged (the fsync had not returned), so it is skipped; any other unreadable line raises."""
        lines = [line for line in path.read_text(encoding="utf-8", errors="surrogateescape").split("\n") if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.extend(self._decode(line))
            except (ValueError, KeyError, TypeError, IndexError):
                if i < len(lines) - 1:
                    raise ValueError(f"unreadable line {i + 1} of {path}") from None
                log.warning("skipping the torn last line of %s spool segment %s (a crash during a write that "
                            "was never acknowledged)", self.kind, path)
        return rows

    def _flush_segment(self, segment: Path, rows: list[Any]) -> list[str]:
        written = self._write_landing(rows, segment.stem.removeprefix(_SEGMENT_PREFIX))
        segment.unlink(missing_ok=True)
        if self.on_flushed is not None:
            self.on_flushed(self._count(rows))
        return written

    def flush(self) -> list[str]:
        """Write every spooled row to the landing zone now; returns the landing files written.

        A failed write keeps the segment on disk, to be retried by the next flush or start."""
        with self._flush_lock:
            with self._lock:
                segment, rows = self._segment, self._rows
                if self._fd is not None:
                    os.close(self._fd)
                self._segment, self._fd, self._rows, self._pending = None, None, [], 0
            written = self._flush_segment(segment, rows) if segment is not None and rows else []
            if segment is not None and not rows:
                segment.unlink(missing_ok=True)
            # Segments left by a failed flush or a crash: everything but the (new) open segment.
            for leftover in sorted(self.spool_dir.glob(_SEGMENT_GLOB)):
                with self._lock:
                    if leftover == self._segment:
                        continue
                try:
                    lines = self._read_segment(leftover)
                except ValueError:
                    # Not something a crash leaves: kept aside for a person, not retried forever.
                    aside = leftover.with_suffix(".corrupt")
                    leftover.rename(aside)
                    log.error("%s spool segment %s is unreadable; moved to %s, nothing deleted", self.kind, leftover, aside)
                    continue
                written += self._flush_segment(leftover, lines) if lines else []
                leftover.unlink(missing_ok=True)
            return written

    def sync(self) -> None:
        """fsync the open segment when lines were written since the last fsync (without `fsync`): on a
        duplicate of its descriptor, outside the lock, so that writers do not wait for the disk."""
        with self._lock:
            if self._fd is None or not self._dirty:
                return
            fd, self._dirty = os.dup(self._fd), False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_seconds
        while not self._stop.is_set():
            timeout = max(0.0, next_flush - time.monotonic())
            if not self.fsync:
                timeout = min(timeout, self.sync_seconds)
            woken = self._wake.wait(timeout)
            self._wake.clear()
            try:
                if woken or time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + self.flush_seconds
                    self.flush()
                else:
                    self.sync()
            except Exception:  # the rows stay spooled; log and retry at the next tick
                log.exception("flushing %s to the landing zone failed; will retry", self.kind)

    def start(self) -> None:
        """Flush what a previous process left in the spool, then flush in the background."""
        self.flush()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"recloop-{self.kind}-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and flush everything accepted so far."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()


class FeedbackWriter(SpoolWriter):
    """Spools accepted events durably and flushes them to the landing zone in batches."""

    kind = "feedback"

    def submit(self, rows: list[dict[str, Any]]) -> None:
        """Make `rows` durable (spool + fsync); they reach the landing zone with the next flush."""
        if not rows:
            return
        for r in rows:  # the feedback namespace, whoever calls (the ids the caller returns are these)
            r["event_id"] = feedback_event_id(r.get("event_id"))
        self._append(json.dumps([_jsonable(r) for r in rows]), rows)

    def _decode(self, line: str) -> list[dict[str, Any]]:
        return _from_json(line)

    def _write_landing(self, rows: list[dict[str, Any]], name: str) -> list[str]:
        """One file per UTC day, `feedback-<name>.parquet`: the same segment always makes the same keys."""
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_day[r["event_time"].astimezone(timezone.utc).date().isoformat()].append(r)
        written = []
        for day, day_rows in sorted(by_day.items()):
            buf = io.BytesIO()
            pq.write_table(events_table(day_rows), buf, compression="zstd")
            key = f"events/date={day}/{FILE_PREFIX}{name}.parquet"
            written.append(self.landing.write_bytes(key, buf.getvalue()))
        return written

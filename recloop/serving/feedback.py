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
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
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


def _read_segment(path: Path) -> list[dict[str, Any]]:
    """The events of a spool segment. A last line cut short by a crash during `submit` was never
    acknowledged (the fsync had not returned), so it is skipped; any other unreadable line raises."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="surrogateescape").split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.extend(_from_json(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
            log.warning("skipping the torn last line of feedback spool segment %s (a crash during a write that "
                        "was never acknowledged)", path)
    return rows


def events_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Event rows (EVENTS columns, `event_time` a UTC datetime) as a table with the events schema."""
    return pa.Table.from_pylist([{c: r.get(c) for c in EVENTS.columns} for r in rows], schema=EVENTS.schema)


class FeedbackWriter:
    """Spools accepted events durably and flushes them to the landing zone in batches."""

    def __init__(
        self,
        landing: Lake,
        spool_dir: Path,
        *,
        flush_seconds: float = 10.0,
        max_batch: int = 5_000,
        on_flushed: Any = None,
    ) -> None:
        self.landing = landing
        self.spool_dir = Path(spool_dir)
        self.flush_seconds = flush_seconds
        self.max_batch = max_batch
        self.on_flushed = on_flushed  # called with the number of events written to the landing zone
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._segment: Path | None = None
        self._file: io.TextIOWrapper | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- accepting --------------------------------------------------------------------------------

    def submit(self, rows: list[dict[str, Any]]) -> None:
        """Make `rows` durable (spool + fsync); they reach the landing zone with the next flush."""
        if not rows:
            return
        for r in rows:  # the feedback namespace, whoever calls (the ids the caller returns are these)
            r["event_id"] = feedback_event_id(r.get("event_id"))
        # One line per call: a crash in the middle of the write tears that line only, and the whole
        # (unacknowledged) request is skipped on recovery, never half of it.
        text = json.dumps([_jsonable(r) for r in rows]) + "\n"
        with self._lock:
            if self._file is None:
                self._segment = self.spool_dir / f"{_SEGMENT_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.jsonl"
                self._file = open(self._segment, "a", encoding="utf-8")  # noqa: SIM115 - closed on rotation
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._rows.extend(rows)
            full = len(self._rows) >= self.max_batch
        if full:
            self._wake.set()

    # --- flushing ---------------------------------------------------------------------------------

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

    def _flush_segment(self, segment: Path, rows: list[dict[str, Any]]) -> list[str]:
        written = self._write_landing(rows, segment.stem.removeprefix(_SEGMENT_PREFIX))
        segment.unlink(missing_ok=True)
        if self.on_flushed is not None:
            self.on_flushed(len(rows))
        return written

    def flush(self) -> list[str]:
        """Write every spooled event to the landing zone now; returns the landing files written.

        A failed write keeps the segment on disk, to be retried by the next flush or start."""
        with self._flush_lock:
            with self._lock:
                segment, rows = self._segment, self._rows
                if self._file is not None:
                    self._file.close()
                self._segment, self._file, self._rows = None, None, []
            written = self._flush_segment(segment, rows) if segment is not None and rows else []
            # Segments left by a failed flush or a crash: everything but the (new) open segment.
            for leftover in sorted(self.spool_dir.glob(_SEGMENT_GLOB)):
                with self._lock:
                    if leftover == self._segment:
                        continue
                try:
                    lines = _read_segment(leftover)
                except ValueError:
                    # Not something a crash leaves: kept aside for a person, not retried forever.
                    aside = leftover.with_suffix(".corrupt")
                    leftover.rename(aside)
                    log.error("feedback spool segment %s is unreadable; moved to %s, nothing deleted", leftover, aside)
                    continue
                written += self._flush_segment(leftover, lines) if lines else []
                leftover.unlink(missing_ok=True)
            return written

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the events stay spooled; log and retry at the next tick
                log.exception("flushing feedback to the landing zone failed; will retry")

    def start(self) -> None:
        """Flush what a previous process left in the spool, then flush in the background."""
        self.flush()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recloop-feedback-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and flush everything accepted so far."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

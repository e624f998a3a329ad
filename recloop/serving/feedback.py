"""Feedback: impressions and watches reported by apps, written to the landing zone as raw events.

An accepted event is never lost: `submit` appends it to a spool file and fsyncs before the endpoint
answers; a background thread (`flush`, every `flush_seconds` or `max_batch` events) writes the spooled
events to the landing zone as one Parquet file per UTC day,

    <landing>/events/date=YYYY-MM-DD/feedback-<UTC time>-<random>.parquet

with the `events` table's schema (docs/data_schema.md), and only then deletes the spool segment. A
crash between the two leaves the segment, which the next start (`recover`) flushes; the landing file
is written atomically (temporary name, then rename). The next ingestion of that day picks the file up
with the day's other files and validates it like any other delivery: an event of an unknown user or
video, or with a watch time over the video's length, is quarantined with its reason, not dropped here.

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
_SEGMENT_GLOB = "segment-*.jsonl"


def _to_json(row: dict[str, Any]) -> str:
    return json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()})


def _from_json(line: str) -> dict[str, Any]:
    row = json.loads(line)
    row["event_time"] = datetime.fromisoformat(row["event_time"])
    return row


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
        text = "".join(_to_json(r) + "\n" for r in rows)
        with self._lock:
            if self._file is None:
                self._segment = self.spool_dir / f"segment-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.jsonl"
                self._file = open(self._segment, "a", encoding="utf-8")  # noqa: SIM115 - closed on rotation
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._rows.extend(rows)
            full = len(self._rows) >= self.max_batch
        if full:
            self._wake.set()

    # --- flushing ---------------------------------------------------------------------------------

    def _write_landing(self, rows: list[dict[str, Any]]) -> list[str]:
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_day[r["event_time"].astimezone(timezone.utc).date().isoformat()].append(r)
        written = []
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        for day, day_rows in sorted(by_day.items()):
            buf = io.BytesIO()
            pq.write_table(events_table(day_rows), buf, compression="zstd")
            key = f"events/date={day}/{FILE_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}.parquet"
            written.append(self.landing.write_bytes(key, buf.getvalue()))
        return written

    def _flush_segment(self, segment: Path, rows: list[dict[str, Any]]) -> list[str]:
        written = self._write_landing(rows)
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
                text = leftover.read_text(encoding="utf-8")
                lines = [_from_json(line) for line in text.splitlines() if line.strip()]
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

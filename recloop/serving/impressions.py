"""The impressions log: every answer of POST /v1/recommendations, one row per item, in the landing zone.

Each answer (model, fallback or experiment) gets a request id `rq-<32 hex>`, returned to the caller and
written as one spool line per request before the answer is returned (`ImpressionWriter.log`, the same
discipline as feedback: `recloop.serving.feedback.SpoolWriter`). A background thread flushes the
spooled answers as IMPRESSIONS rows (`recloop.data.schemas.IMPRESSIONS`, one row per item; one file per
UTC day of `served_at`) into

    <landing>/impressions/date=YYYY-MM-DD/impressions-<segment's UTC time>-<random>.parquet

then deletes the segment; a crash between the two leaves the segment, which the next start flushes
again under the same names (so the file is replaced, not doubled). A line torn by a crash during its
write belongs to an answer that was never returned, and is skipped.

Durability ("loses nothing on kill -9"): an answer is returned only after its line is in the spool
file, handed to the kernel by `os.write`; a process killed with SIGKILL (or crashing) after that cannot
lose it, since the kernel writes it out whatever happens to the process, and the next start flushes
it. What the default does not cover is the machine itself failing (power loss, kernel crash) before
the line reaches the disk: the background thread fsyncs the open segment every
`RECLOOP_SERVING_IMPRESSIONS_SYNC_SECONDS` (1 s), which bounds that loss to about a second of answers.
`RECLOOP_SERVING_IMPRESSIONS_FSYNC=true` fsyncs every line before its answer is returned instead (as
feedback does), covering power loss too, at the price of an fsync per request: ~0.1 ms on a quiet
virtual disk, several ms when other jobs use the disk (`bench/impression_logging.py`; docs/serving.md
has the figures), over the 1 ms budget of the request path. So the default is the one that meets the
budget and the kill -9 requirement. A failed write (disk full) does not fail the answer: it is
logged and counted (`recloop_serving_impressions_total{outcome="failed"}`).

One spool directory belongs to one serving process (`RECLOOP_SERVING_IMPRESSIONS_SPOOL_DIR`, default
`$RECLOOP_HOME/serving/impressions-spool`).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from recloop.data.schemas import IMPRESSIONS
from recloop.serving.feedback import SpoolWriter

if TYPE_CHECKING:
    from recloop.serving.service import Recommendation

FILE_PREFIX = "impressions-"
REQUEST_ID_PREFIX = "rq-"
_DAY_US = 86_400_000_000


def new_request_id() -> str:
    """`rq-<32 hex>`: random, unique per answer."""
    return REQUEST_ID_PREFIX + uuid.uuid4().hex


def request_seed(request_id: str) -> int:
    """A 64-bit seed from a request id: what makes the answer's random choices (exploration, the
    interleaving's coin flips) reproducible from the id alone."""
    return int(request_id[len(REQUEST_ID_PREFIX):][:16], 16)


def _record(rec: Recommendation, served_us: int, surface: str | None) -> dict[str, Any]:
    """One spool line: the answer with its items as compact lists (see `impression_rows`)."""
    return {
        "request_id": rec.request_id, "user_id": rec.user_id, "served_us": served_us,
        "experiment": rec.experiment, "fallback": rec.fallback, "surface": surface,
        "items": [[i.video_id, i.source, i.score, i.model_version, i.arm, i.propensity, i.explored]
                  for i in rec.items],
    }


def impression_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The IMPRESSIONS rows of one spooled answer (served_at as microseconds since the epoch, UTC), as
    dicts (for readers of a spool; the flush builds columns directly: `impressions_table`)."""
    rid = record["request_id"]
    return [
        {"impression_id": f"{rid}-{pos}", "request_id": rid, "user_id": record["user_id"], "video_id": video,
         "served_at": record["served_us"], "position": pos, "source": source, "score": score,
         "model_version": version, "experiment": record["experiment"], "arm": arm, "propensity": propensity,
         "explored": explored, "fallback": record["fallback"], "surface": record["surface"]}
        for pos, (video, source, score, version, arm, propensity, explored) in enumerate(record["items"])
    ]


def impressions_table(records: list[dict[str, Any]]) -> pa.Table:
    """The IMPRESSIONS table of spooled answers, built column by column (no dict per row: the flush
    runs beside requests, and its Python work holds the GIL they need)."""
    cols: dict[str, list[Any]] = {name: [] for name in IMPRESSIONS.columns}
    per_request = ("request_id", "user_id", "experiment", "fallback", "surface")
    for record in records:
        items = record["items"]
        n = len(items)
        if not n:
            continue
        rid = record["request_id"]
        cols["impression_id"].extend([f"{rid}-{pos}" for pos in range(n)])
        cols["position"].extend(range(n))
        cols["served_at"].extend([record["served_us"]] * n)
        for name in per_request:
            cols[name].extend([record[name]] * n)
        video, source, score, version, arm, propensity, explored = zip(*items)
        for name, values in (("video_id", video), ("source", source), ("score", score), ("model_version", version),
                             ("arm", arm), ("propensity", propensity), ("explored", explored)):
            cols[name].extend(values)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in IMPRESSIONS.schema}, schema=IMPRESSIONS.schema)


class ImpressionWriter(SpoolWriter):
    """Spools every answer (one line per request) and flushes its impressions to the landing zone."""

    kind = "impressions"

    def log(self, rec: Recommendation, surface: str | None = None, served_us: int | None = None) -> None:
        """Make the answer `rec` durable before it is returned (see the module docstring); an answer
        without items has no impression and writes nothing."""
        if not rec.items:
            return
        record = _record(rec, served_us if served_us is not None else time.time_ns() // 1000, surface)
        self._append(json.dumps(record, separators=(",", ":")), [record])

    def _decode(self, line: str) -> list[dict[str, Any]]:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record["items"], list):
            raise ValueError("not an impressions record")
        return [record]

    def _count(self, rows: list[dict[str, Any]]) -> int:
        return sum(len(r["items"]) for r in rows)

    def _write_landing(self, rows: list[dict[str, Any]], name: str) -> list[str]:
        """One file per UTC day of `served_at`, `impressions-<name>.parquet` (same segment, same keys)."""
        by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in rows:
            day = datetime.fromtimestamp(record["served_us"] // _DAY_US * 86_400, timezone.utc).date().isoformat()
            by_day[day].append(record)
        written = []
        for day, day_rows in sorted(by_day.items()):
            buf = io.BytesIO()
            pq.write_table(impressions_table(day_rows), buf, compression="zstd")
            written.append(self.landing.write_bytes(f"impressions/date={day}/{FILE_PREFIX}{name}.parquet", buf.getvalue()))
        return written

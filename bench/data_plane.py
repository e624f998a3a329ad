"""Data-plane benchmark: simulate → ingest → validate (GX) → features (DuckDB) → Feast online store.

Runs the same core functions the Dagster assets call, stage by stage over every day, on a fresh
RECLOOP_HOME, and prints one JSON object: events/s and seconds per stage, rows, and peak memory (RSS of
this process, sampled, plus the kernel's high-water mark).

    python bench/data_plane.py                       # 1M events: 10 days x 100k
    python bench/data_plane.py --days 3 --events-per-day 20000

Target on 2 cores: 1M events end to end in <= 120 s with peak memory <= 4 GB.

The online store needs each entity's newest snapshot; materializing every older day first would only
be written over. `--materialize last` (default) loads the newest day, as a backfill does; `each` loads
every day in order, as daily operation does one day at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _util import PeakRSS  # noqa: E402 - bench/ is on sys.path when run as a script

for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False"}.items():
    os.environ.setdefault(key, value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--events-per-day", type=int, default=100_000)
    parser.add_argument("--initial-users", type=int, default=20_000)
    parser.add_argument("--initial-videos", type=int, default=10_000)
    parser.add_argument("--materialize", choices=("last", "each"), default="last")
    parser.add_argument("--home", help="RECLOOP_HOME to use (default: a new temporary folder)")
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="recloop-bench-"))
    os.environ["RECLOOP_HOME"] = str(home)
    os.environ["RECLOOP_FEAST_PROJECT"] = "bench"

    from recloop.config import Settings
    from recloop.data.schemas import TABLE_ORDER
    from recloop.data.simulator import SimConfig, simulate
    from recloop.features import apply_repo, compute_features, materialize_partition
    from recloop.ingestion import ingest_partition
    from recloop.lake import open_lake
    from recloop.validation import validate_partition

    settings = Settings.from_env()
    landing, lake = open_lake(settings.landing_uri), open_lake(settings.lake_uri)
    config = SimConfig(
        seed=7,
        days=args.days,
        events_per_day=args.events_per_day,
        initial_users=args.initial_users,
        initial_videos=args.initial_videos,
        new_users_per_day=max(100, args.initial_users // 100),
        new_videos_per_day=max(60, args.initial_videos // 100),
    )
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    stages: dict[str, dict[str, float]] = {}

    def stage(name: str, fn) -> object:
        t0 = time.perf_counter()
        out = fn()
        stages[name] = {"seconds": round(time.perf_counter() - t0, 2)}
        return out

    with PeakRSS() as rss:
        started = time.perf_counter()
        summary = stage("simulate", lambda: simulate(config, landing))
        events = summary.totals["events"]
        stage("ingest", lambda: [ingest_partition(t, d, landing=landing, lake=lake) for d in days for t in TABLE_ORDER])
        results = stage(
            "validate",
            lambda: [validate_partition(lake, t, d, expectations_dir=settings.expectations_dir) for d in days for t in TABLE_ORDER],
        )
        feats = stage("features", lambda: [compute_features(lake, d) for d in days])
        todo = days if args.materialize == "each" else days[-1:]
        with contextlib.redirect_stdout(io.StringIO()):  # Feast prints progress to stdout; keep it JSON
            stage("feast_apply", lambda: apply_repo(settings))
            mats = stage("materialize", lambda: [materialize_partition(settings, d, lake=lake) for d in todo])
        total = time.perf_counter() - started

    accepted = sum(r.accepted for r in results if r.table == "events")
    quarantined = sum(r.quarantined for r in results if r.table == "events")
    for name in ("simulate", "ingest", "validate", "features", "materialize"):
        stages[name]["events_per_s"] = round(events / stages[name]["seconds"]) if stages[name]["seconds"] else None
    online_rows = sum(v["rows"] for m in mats for v in m["views"].values())
    stages["materialize"]["online_rows"] = online_rows
    stages["materialize"]["online_rows_per_s"] = round(online_rows / stages["materialize"]["seconds"]) if online_rows else 0
    feature_rows = {}
    for day_feats in feats:
        for view, part in day_feats.items():
            feature_rows[view] = feature_rows.get(view, 0) + part.rows
    out = {
        "benchmark": "data_plane",
        "events": events,
        "days": config.days,
        "users": summary.totals["users"],
        "videos": summary.totals["videos"],
        "events_accepted": accepted,
        "events_quarantined": quarantined,
        "feature_rows": feature_rows,
        "materialized_days": todo,
        "stages": stages,
        "total_seconds": round(total, 1),
        "events_per_s_end_to_end": round(events / total),
        "peak_rss_mb": round(rss.peak / 2**20),
        "max_rss_mb_kernel": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": os.cpu_count(),
        "target": {"total_seconds": 120, "peak_rss_mb": 4096},
        "home": str(home),
    }
    out["meets_target"] = out["total_seconds"] <= 120 and out["max_rss_mb_kernel"] <= 4096
    print(json.dumps(out, indent=2))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

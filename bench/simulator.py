"""Simulator benchmark: events/s and peak memory while simulating many days into a landing folder.

    python bench/simulator.py                         # 10.5M events: 30 days x 350k
    python bench/simulator.py --days 10 --events-per-day 100000

Memory must stay flat as days grow (one day is held at a time): compare peak RSS across --days.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--events-per-day", type=int, default=350_000)
    parser.add_argument("--initial-users", type=int, default=50_000)
    parser.add_argument("--initial-videos", type=int, default=20_000)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    args = parser.parse_args()

    from recloop.data.simulator import SimConfig, simulate
    from recloop.lake import LocalLake

    out = Path(tempfile.mkdtemp(prefix="recloop-sim-bench-"))
    try:
        config = SimConfig(days=args.days, events_per_day=args.events_per_day, initial_users=args.initial_users,
                           initial_videos=args.initial_videos)
        summary = simulate(config, LocalLake(out), fmt=args.format)
        landed = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({
        "benchmark": "simulator",
        "days": args.days,
        "format": args.format,
        "totals": summary.totals,
        "seconds": round(summary.seconds, 2),
        "events_per_s": round(summary.events_per_second),
        "landing_mb": round(landed / 2**20),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

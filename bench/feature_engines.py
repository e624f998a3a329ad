"""Feature engines benchmark: the same point-in-time snapshots on DuckDB and on Spark (local[2]).

For each size, a silver lake (simulated days written straight to `silver/*`: the simulator's rows are what
validation accepts, as `recloop.data.simulator.simulate_validated` does; or `--home PATH` reusing a
RECLOOP_HOME whose lake already holds silver/), then for each engine, in a fresh process of its own
(`RECLOOP_FEATURE_ENGINE=duckdb|spark`): `recloop.features.compute_features_range` over every day (the bulk
path of a history import) and `compute_features` of the last day (the daily asset), both writing the lake's
`features/<view>/date=D/part-0.parquet`. Prints one JSON object: seconds, events/s, peak memory of the Python
process and of Spark's JVM (kernel high-water marks), rows per view; and a PNG chart.

    python bench/feature_engines.py                          # 1M and 10M events, 30 days
    python bench/feature_engines.py --events 1000000          # 1M only
    python bench/feature_engines.py --home /work/bench-homes/10M --events 10000000

On one machine DuckDB is expected to win: Spark pays a JVM start, task scheduling and shuffles to disk. The
point is that the Spark run is the code path a cluster runs (`RECLOOP_SPARK_MASTER=spark://...`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False"}.items():
    os.environ.setdefault(key, value)


def _events(lake) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    days = lake.partitions("silver/events")
    return sum(pq.ParquetFile(lake.local_path(f"silver/events/date={d}/part-0.parquet")).metadata.num_rows
               for d in days), days


def build_silver(home: Path, events: int, days: int, seed: int) -> dict:
    """Simulated days straight into `<home>/lake/silver/*` (no landing, no GX: the features read silver)."""
    from recloop.data.schemas import TABLE_ORDER
    from recloop.data.simulator import SimConfig, Simulator
    from recloop.lake import LocalLake

    per_day = events // days
    config = SimConfig(seed=seed, days=days, events_per_day=per_day, initial_users=max(1000, events // 50),
                       initial_videos=max(500, events // 100), new_users_per_day=max(100, events // 5000),
                       new_videos_per_day=max(60, events // 10000))
    lake = LocalLake(home / "lake")
    t0 = time.perf_counter()
    sim = Simulator(config)
    for i in range(days):
        tables = sim.day(i)
        for name in TABLE_ORDER:
            lake.write_partition(f"silver/{name}", config.date_of(i).isoformat(), tables[name])
        del tables
    return {"built_in_s": round(time.perf_counter() - t0, 1), "sim_config": {
        "seed": seed, "days": days, "events_per_day": per_day, "initial_users": config.initial_users,
        "initial_videos": config.initial_videos}}


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def child(engine: str, home: str, driver_memory: str) -> dict:
    """One engine in this process: the whole range in bulk, then the last day alone."""
    os.environ["RECLOOP_FEATURE_ENGINE"] = engine
    os.environ["RECLOOP_SPARK_MASTER"] = "local[2]"
    from recloop import features as F
    from recloop.lake import LocalLake

    lake = LocalLake(Path(home) / "lake")
    events, days = _events(lake)
    out: dict = {"engine": engine, "events": events}
    if engine == "spark":
        from recloop import spark_features

        t0 = time.perf_counter()
        spark_features.session("local[2]", conf={"spark.driver.memory": driver_memory})
        out["session_start_s"] = round(time.perf_counter() - t0, 1)
        out["spark_driver_memory"] = driver_memory
    t0 = time.perf_counter()
    result = F.compute_features_range(lake, days[0], days[-1])
    seconds = time.perf_counter() - t0
    out["range"] = {"days": len(result["days"]), "seconds": round(seconds, 1),
                    "events_per_s": round(events / seconds), "rows": result["rows"],
                    "mb": {v: round(b / 2**20, 1) for v, b in result["bytes"].items()}}
    t0 = time.perf_counter()
    daily = F.compute_features(lake, days[-1])
    out["daily_last_day"] = {"seconds": round(time.perf_counter() - t0, 1),
                             "rows": {v: w.rows for v, w in daily.items()}}
    out["peak_python_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if engine == "spark":
        from recloop import spark_features

        pid = spark_features.jvm_pid()
        out["peak_jvm_mb"] = _vm_hwm_mb(pid) if pid else None
        spark_features.stop()
    return out


def run_child(engine: str, home: Path, driver_memory: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", engine, "--home", str(home),
                           "--spark-driver-memory", driver_memory], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"engine": engine, "error": proc.stderr[-3000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 1)  # with the interpreter's and the JVM's start
    return out


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["events"] for r in results]
    labels = [f"{n / 1e6:.2g}M events" for n in sizes]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, engine in enumerate(("duckdb", "spark")):
        secs = [r["engines"].get(engine, {}).get("range", {}).get("seconds", 0) for r in results]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(sizes))], secs, width, label=engine)
        ax.bar_label(bars, fmt="%.0f s")
    ax.set_xticks(range(len(sizes)), labels)
    ax.set_ylabel("seconds (every day's snapshot, bulk)")
    ax.set_title("Feature snapshots: DuckDB vs Spark local[2], 2 cores (shared machine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--days", type=int, default=30, help="days of a simulated lake (default 30)")
    parser.add_argument("--home", help="a RECLOOP_HOME whose lake/silver is there already (one size only)")
    parser.add_argument("--engines", nargs="+", default=["duckdb", "spark"], choices=["duckdb", "spark"])
    parser.add_argument("--spark-driver-memory", default="4g", help="the local JVM's heap (spark.driver.memory)")
    parser.add_argument("--png", default=str(BENCH / "out" / "feature_engines.png"), help="the chart (git-ignored folder)")
    parser.add_argument("--child", choices=["duckdb", "spark"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.home, args.spark_driver_memory)))
        return 0
    if args.home and len(args.events) > 1:
        parser.error("--home holds one lake: give one --events size (or none, to measure what it holds)")

    sys.path.insert(0, str(REPO))
    from recloop.lake import LocalLake

    results = []
    for size in args.events:
        home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix=f"recloop-engines-{size // 10**6}M-"))
        lake = LocalLake(home / "lake")
        entry: dict = {"home": str(home)}
        if lake.partitions("silver/events"):
            entry["silver"] = "reused"
        else:
            entry["silver"] = build_silver(home, size, args.days, seed=7)
        entry["events"], days = _events(lake)
        entry["days"] = len(days)
        entry["engines"] = {engine: run_child(engine, home, args.spark_driver_memory) for engine in args.engines}
        ok = [e for e in entry["engines"].values() if "range" in e]
        entry["same_rows"] = len({json.dumps(e["range"]["rows"], sort_keys=True) for e in ok}) == 1 if len(ok) > 1 else None
        if {"duckdb", "spark"} <= {e["engine"] for e in ok}:
            d, s = entry["engines"]["duckdb"]["range"]["seconds"], entry["engines"]["spark"]["range"]["seconds"]
            entry["spark_over_duckdb"] = round(s / d, 2) if d else None
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    out = {"benchmark": "feature_engines", "cores": os.cpu_count(), "spark_master": "local[2]",
           "note": "2 cores shared with other agents' work: timings are noisy", "results": results}
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        chart(results, Path(args.png))
        out["png"] = args.png
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

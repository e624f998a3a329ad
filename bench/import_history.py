"""History-import benchmark: a MovieLens folder end to end, as `recloop import` runs it.

landing (MovieLens → one partition per table and day) → ONE Dagster run of the history job (bronze → GX
schema + row-level validation → silver/quarantine → feature snapshots → feast apply → the newest snapshot in
the online store), on a fresh RECLOOP_HOME with the embedded stores; then (reported apart, not part of the
import) Feast's historical retrieval of a training set over the whole imported history, the way training
reads it: `recloop.features.training_set` (the `ranking_features` service, point in time) for every event of
the window `--train-period all --test-period 14d` plans, and `recloop.model_plane.build_training_set`.

Prints one JSON object: seconds per stage (from the progress stages and the Dagster run's step events),
the total, rows and partitions, peak memory (RSS of this process, sampled, and the kernel's high-water mark).

    python bench/import_history.py                                   # ml-latest-small
    python bench/import_history.py --path ../shared/data/ml-1m --no-retrieval

Target on 2 cores: ml-latest-small imported end to end in <= 120 s with peak memory <= 4 GB.
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

for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False",
                   "DAGSTER_DISABLE_TELEMETRY": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


class StageTimer:
    """A progress reporter that times each stage (and counts its units)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str):
        t0 = time.perf_counter()

        class _S:
            def update(self, n: int = 1) -> None:
                pass

            def note(self, text: str) -> None:
                pass

        try:
            yield _S()
        finally:
            self.stages[name] = {"seconds": round(time.perf_counter() - t0, 2), unit + "s": total}


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Seconds per step of a Dagster run, from its STEP_START / STEP_SUCCESS events."""
    import dagster as dg

    started: dict[str, float] = {}
    out: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = record.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            out[event.step_key] = round(record.timestamp - started.get(event.step_key, record.timestamp), 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=str(DEFAULT_PATH), help="MovieLens folder (default: ml-latest-small)")
    parser.add_argument("--home", help="RECLOOP_HOME to use (default: a new temporary folder)")
    parser.add_argument("--no-retrieval", action="store_true", help="skip the Feast historical retrieval measurement")
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="recloop-bench-import-"))
    os.environ["RECLOOP_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    os.environ["RECLOOP_FEAST_PROJECT"] = "bench"
    for var in ("RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_PARTITION_START"):
        os.environ.pop(var, None)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("feast").setLevel(logging.ERROR)

    timer = StageTimer()
    with PeakRSS() as rss:
        started = time.perf_counter()
        from pipelines.run import instance, run_history
        from recloop import history, progress
        from recloop.config import Settings
        from recloop.lake import open_lake

        settings = Settings.from_env()
        landing, lake = open_lake(settings.landing_uri), open_lake(settings.lake_uri)
        imports_s = time.perf_counter() - started
        with progress.reporting(timer):
            source = history.detect(args.path)
            landed = history.land(source, landing, lake=lake)
            t_run = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # Feast prints progress to stdout; keep it JSON
                run = run_history(landed.first, landed.last, settings=settings)
            run_s = time.perf_counter() - t_run
        total = time.perf_counter() - started
        import_peak = rss.peak
        import_max_kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        retrieval = None
        if not args.no_retrieval and run.success:
            import pandas as pd
            import pyarrow as pa

            from recloop import model_plane
            from recloop.features import training_set

            plan = model_plane.plan_window(lake, train_period="all", test_period="14d")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                built = model_plane.build_training_set(settings, lake, plan, home / "bench-training-set")
            window_s = time.perf_counter() - t0
            # Feast's historical retrieval (ranking_features, point in time) for every event of the window.
            t0 = time.perf_counter()
            events = pa.concat_tables([lake.read_partition("silver/events", p) for p in plan.train_partitions]).to_pandas()
            videos = pa.concat_tables([lake.read_partition("silver/videos", p) for p in lake.partitions("silver/videos")
                                       if p <= plan.train_partitions[-1]]).to_pandas().drop_duplicates("video_id", keep="last")
            entity = events[["user_id", "video_id", "event_time"]].merge(videos[["video_id", "category"]], on="video_id",
                                                                         how="left")
            entity = entity.rename(columns={"event_time": "event_timestamp"})
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                df = training_set(settings, entity, feature_service="ranking_features", project=settings.feast_project)
            feast_s = time.perf_counter() - t0
            features = [c for c in df.columns if "__" in c]
            retrieval = {
                "feast_historical_retrieval_seconds": round(feast_s, 1),
                "entity_rows": len(entity),
                "features": len(features),
                "feature_null_share": round(float(pd.isna(df[features]).to_numpy().mean()), 4),
                "reading_the_window_from_the_lake_seconds": round(read_s, 1),
                "model_plane_build_training_set_seconds": round(window_s, 1),
                "model_plane_window_rows": built.get("rows"),
                "train_days_with_events": len(plan.train_partitions),
                "test_days_with_events": len(plan.test_partitions),
                "test_period": f"{plan.test_partitions[0]}..{plan.test_partitions[-1]}",
            }

    m = run.materialized
    steps = _step_seconds(instance(settings), run.run_id)
    silver = (m.get("history/silver") or {}).get("summary") or {}
    out = {
        "benchmark": "import_history",
        "source": str(args.path),
        "success": run.success,
        "error": run.error,
        "dagster_runs": 1,
        "range": {"first": landed.first, "last": landed.last, "calendar_days": landed.calendar_days,
                  "days_with_events": len(landed.event_days)},
        "rows": landed.rows,
        "validated": {t: {k: silver[t][k] for k in ("ingested", "accepted", "quarantined")} for t in silver
                      if isinstance(silver.get(t), dict)},
        "feature_rows": (m.get("history/features") or {}).get("rows"),
        "snapshot_days": (m.get("history/features") or {}).get("snapshot_days"),
        "online_rows_written": (m.get("history/online_features") or {}).get("rows_written"),
        "stages": timer.stages,
        "dagster_steps": steps,
        "seconds": {"imports": round(imports_s, 1), "land": timer.stages.get("land", {}).get("seconds"),
                    "dagster_run": round(run_s, 1), "total": round(total, 1)},
        "total_seconds": round(total, 1),
        "peak_rss_mb": round(import_peak / 2**20),
        "max_rss_mb_kernel": round(import_max_kernel / 1024),
        "training_set_retrieval": retrieval,
        "peak_rss_mb_with_retrieval": round(rss.peak / 2**20),
        "cpus": os.cpu_count(),
        "target": {"total_seconds": 120, "peak_rss_mb": 4096},
        "home": str(home),
    }
    out["meets_target"] = bool(run.success and out["total_seconds"] <= 120 and out["max_rss_mb_kernel"] <= 4096)
    print(json.dumps(out, indent=2, default=str))
    sys.stdout.flush()
    return 0 if run.success else 1


if __name__ == "__main__":
    sys.exit(main())

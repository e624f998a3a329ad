"""The `recloop` command.

    recloop simulate   write simulated days of users, videos and events into the landing zone
    recloop movielens  turn MovieLens-format files into landing partitions
    recloop run        run the Dagster data-plane job for partitions (ingest → GX → features → Feast)
    recloop demo       simulate, then run everything, and say what was built and how to look at it
    recloop quarantine show quarantined rows of a partition with their reasons
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import date, timedelta
from typing import Any

from recloop.config import Settings

TELEMETRY_OPT_OUTS = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "FEAST_USAGE": "False",
}


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _landing(settings: Settings):
    from recloop.lake import open_lake

    return open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url)


def _sim_config(args: argparse.Namespace, settings: Settings):
    from recloop.data.simulator import SimConfig

    start = date.fromisoformat(args.start) if args.start else settings.partition_start
    return SimConfig(
        seed=args.seed,
        start=start,
        days=args.days,
        initial_users=args.initial_users,
        initial_videos=args.initial_videos,
        events_per_day=args.events_per_day,
        scenario=args.scenario,
        drift_day=args.drift_day,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from recloop.data.simulator import simulate

    settings = Settings.from_env()
    config = _sim_config(args, settings)
    summary = simulate(config, _landing(settings), fmt=args.format)
    _print({"landing": settings.landing_uri, "days": config.days, "start": config.start,
            "totals": summary.totals, "seconds": round(summary.seconds, 2),
            "events_per_s": round(summary.events_per_second)})
    return 0


def cmd_movielens(args: argparse.Namespace) -> int:
    from recloop.data.movielens import read_movielens, write_landing

    settings = Settings.from_env()
    tables = read_movielens(args.path)
    written = write_landing(tables, _landing(settings), fmt=args.format)
    _print({"landing": settings.landing_uri, **written})
    return 0


def _partitions(args: argparse.Namespace, settings: Settings) -> list[str]:
    if args.partition:
        return [args.partition]
    if args.start and args.end:
        first, last = date.fromisoformat(args.start), date.fromisoformat(args.end)
        return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    # Everything the landing zone holds events for.
    landing = _landing(settings)
    return landing.partitions("events")


def _summarise(runs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        if not run.partition:
            continue
        m = run.materialized
        day: dict[str, Any] = {"success": run.success, "run_id": run.run_id}
        for table in ("users", "videos", "events"):
            s = m.get(f"silver/{table}")
            if s:
                day[table] = {"ingested": s["ingested"], "accepted": s["accepted"], "quarantined": s["quarantined"]}
        for key, meta in m.items():
            if key.startswith("features/"):
                day.setdefault("feature_rows", {})[key.split("/", 1)[1]] = meta.get("dagster/row_count")
        if "feast/online_features" in m:
            online = m["feast/online_features"]
            day["online"] = {"rows_written": online.get("rows_written"), "skipped": online.get("skipped")}
        if run.error:
            day["error"] = run.error
        out[run.partition] = day
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run_data_plane

    settings = Settings.from_env()
    partitions = _partitions(args, settings)
    if not partitions:
        print(f"no partitions to run: the landing zone {settings.landing_uri} has no events; run `recloop simulate` first",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    runs = run_data_plane(partitions, settings=settings)
    _print({"partitions": _summarise(runs), "seconds": round(time.perf_counter() - t0, 1)})
    return 0 if all(r.success for r in runs) else 1


def _bad_delivery(landing, day: str) -> int:
    """A second events file for `day` mixing good rows with the usual mistakes of real feeds, so the
    demo shows validation at work. Returns how many rows it holds."""
    import io

    import pyarrow.parquet as pq

    events = pq.read_table(io.BytesIO(landing.read_bytes(f"events/date={day}/part-0.parquet"))).slice(0, 2).to_pylist()
    a, b = events
    t = a["event_time"].strftime("%Y-%m-%dT%H:%M:%SZ")
    head = "event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked"
    rows = [
        f"late-1,{a['user_id']},{a['video_id']},{t},home,0,0,false,false",
        f"late-2,{b['user_id']},{b['video_id']},{t},home,1,3.5,false,true",
        f"late-3,{a['user_id']},{a['video_id']},{t},home,2,-4,false,false",
        f"late-4,u9999999,{a['video_id']},{t},home,3,1,false,false",
        f"late-5,{a['user_id']},{a['video_id']},{t},home,4,99999,true,false",
        f"late-6,{a['user_id']},{a['video_id']},2099-01-01T00:00:00Z,home,5,1,false,false",
        f"late-7,{a['user_id']},{a['video_id']},{t},home,6,ten,false,false",
        f"late-1,{a['user_id']},{a['video_id']},{t},home,0,0,false,false",
        f"late-8,{a['user_id']},{a['video_id']},{t}",
    ]
    landing.write_bytes(f"events/date={day}/late-delivery.csv", ("\n".join([head, *rows]) + "\n").encode())
    return len(rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.run import dagster_home, run_data_plane
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake

    settings = Settings.from_env()
    config = _sim_config(args, settings)
    print(f"[1/3] simulating {config.days} days (~{config.events_per_day:,} events/day) into {settings.landing_uri}")
    summary = simulate(config, _landing(settings))
    print(f"      {summary.totals}")
    partitions = [config.date_of(i).isoformat() for i in range(config.days)]
    n_bad = _bad_delivery(_landing(settings), partitions[-1])
    print(f"      plus a late CSV delivery of {n_bad} events for {partitions[-1]}, two good and the rest broken in the usual ways")
    print(f"[2/3] running the Dagster data plane for {len(partitions)} days: ingest → GX validation → features → Feast online store")
    t0 = time.perf_counter()
    runs = run_data_plane(partitions, settings=settings)
    days = _summarise(runs)
    for p, d in days.items():
        ev = d.get("events", {})
        print(f"      {p}: {'ok ' if d['success'] else 'FAILED'} events accepted {ev.get('accepted', '-')}, "
              f"quarantined {ev.get('quarantined', '-')}; online rows {d.get('online', {}).get('rows_written', '-')}"
              + (f"; {d['error']}" if d.get("error") else ""))
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    ok = all(r.success for r in runs)
    training = None
    if ok:
        from pipelines.run import instance, run_job

        print(f"[3/3] training job: Feast training set → two-tower → FAISS index → ranker → evaluation → MLflow → gate")
        training = run_job("training_job", inst=instance(settings),
                           run_config_ops=_training_run_config(max(1, config.days - 1), 1))
        ok = ok and training.success
    if lake.has_partition("quarantine/events", partitions[-1]):
        from recloop.validation import read_quarantine

        print(f"\nQuarantined events of {partitions[-1]} (accepted + quarantined = ingested, every row kept):")
        for row in read_quarantine(lake, "events", partitions[-1]).to_pylist():
            where = f"{row['_source_file']}:{row['_source_row'] or 'line ' + str(row['_source_line'])}"
            print(f"  {row['event_id'] or '?':8} {where:50} {row['reason']}")
    print()
    print("Built:")
    for dataset in ("bronze/events", "silver/users", "silver/videos", "silver/events", "quarantine/events",
                    "features/user_activity", "features/user_category_affinity", "features/video_popularity"):
        print(f"  {lake.uri(dataset)}  ({len(lake.partitions(dataset))} partitions)")
    print(f"  Feast registry and SQLite online store in {settings.feast_data_dir}")
    print(f"  Dagster runs recorded in {dagster_home(settings)} ({time.perf_counter() - t0:.0f} s for all runs)")
    if training is not None:
        summary = _training_summary(training)
        from recloop.registry import registry_settings

        print(f"  MLflow runs and registry at {registry_settings(settings).tracking_uri}")
        print()
        print("Offline evaluation on the held-out day (full ranking, seen videos excluded):")
        for name, values in (summary.get("evaluation") or {}).items():
            print(f"  {name:15} recall@10 {values.get('recall_at_10', float('nan')):.4f}  ndcg@10 {values.get('ndcg_at_10', float('nan')):.4f}"
                  f"  coverage {values.get('coverage', float('nan')):.3f}")
        print(f"Promotion gate for version {summary.get('registered_version')}: "
              + ("passed" if summary.get("gate_passed") else "refused"))
        for line in summary.get("gate", [])[1:]:
            print(f"  {line}")
        if summary.get("champion"):
            print(f"Champion is now version {summary['champion']} (recloop models; recloop rollback)")
        if summary.get("error"):
            print(f"  training: {summary['error']}")
    print()
    print("Look at it in the Dagster UI (asset runs, checks, lineage):  make ui  →  http://127.0.0.1:3000")
    return 0 if ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.run import instance, run_job

    settings = Settings.from_env()
    run = run_job("training_job", inst=instance(settings),
                  run_config_ops=_training_run_config(args.train_days, args.test_days))
    _print(_training_summary(run))
    return 0 if run.success else 1


def _training_run_config(train_days: int, test_days: int) -> dict[str, Any]:
    return {"model__training_set": {"config": {"TrainDays": train_days, "TestDays": test_days}}}


def _training_summary(run) -> dict[str, Any]:
    m = run.materialized
    out: dict[str, Any] = {"success": run.success, "run_id": run.run_id}
    ev = m.get("model/evaluation", {})
    if ev:
        out["evaluation"] = ev.get("by_recommender")
        out["recall_at_10_vs_popularity"] = ev.get("recall_at_10_vs_popularity")
    if "model/registered_version" in m:
        out["registered_version"] = m["model/registered_version"]["version"]
    out["gate_passed"] = run.checks.get("model/registered_version:promotion_gate")
    if "model/champion" in m:
        out["champion"] = m["model/champion"]["champion"]
        out["gate"] = m["model/champion"]["reasons"]
    if run.error:
        out["error"] = run.error
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recloop.evaluation import evaluate_files, write_json

    result = evaluate_files(args.train, args.test, valid_path=args.valid, ks=tuple(args.k))
    if args.out:
        write_json(result, args.out)
    _print(result)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from recloop.registry import open_registry

    from recloop.registry import RegistryError

    registry = open_registry(Settings.from_env())
    try:
        before, after = registry.rollback(reason=args.reason)
    except RegistryError as err:
        print(f"recloop rollback: {err}", file=sys.stderr)
        return 2
    _print({"model": registry.model_name, "champion_was": before, "champion_now": after})
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from recloop.registry import open_registry

    registry = open_registry(Settings.from_env())
    champion = registry.champion()
    challenger = registry.challenger()
    _print({
        "model": registry.model_name,
        "champion": champion.version if champion else None,
        "challenger": challenger.version if challenger else None,
        "lineage": registry.lineage(),
        "history": registry.history()[: args.limit],
    })
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from recloop.lake import open_lake
    from recloop.validation import read_quarantine

    settings = Settings.from_env()
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    table = read_quarantine(lake, args.table, args.partition)
    rows = table.slice(0, args.limit).to_pylist()
    _print({"table": args.table, "partition": args.partition, "quarantined": table.num_rows, "rows": rows})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recloop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def sim_args(p: argparse.ArgumentParser, days: int, events: int, users: int, videos: int) -> None:
        from recloop.data.simulator import SCENARIOS

        p.add_argument("--days", type=int, default=days)
        p.add_argument("--start", help="first day (YYYY-MM-DD); default RECLOOP_PARTITION_START")
        p.add_argument("--events-per-day", type=int, default=events)
        p.add_argument("--initial-users", type=int, default=users)
        p.add_argument("--initial-videos", type=int, default=videos)
        p.add_argument("--seed", type=int, default=7)
        p.add_argument("--scenario", choices=SCENARIOS, default="none")
        p.add_argument("--drift-day", type=int, default=7, help="0-based index of the first drifted day")

    p = sub.add_parser("simulate", help="simulate days into the landing zone")
    sim_args(p, days=14, events=20_000, users=5_000, videos=2_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("movielens", help="MovieLens-format folder → landing partitions")
    p.add_argument("path")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.set_defaults(func=cmd_movielens)

    p = sub.add_parser("run", help="run the data plane job for partitions")
    p.add_argument("--partition", help="one day (YYYY-MM-DD)")
    p.add_argument("--start", help="first day of a range")
    p.add_argument("--end", help="last day of a range")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate and run the main job on the embedded default")
    sim_args(p, days=7, events=20_000, users=5_000, videos=2_000)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="run the Dagster training job: train, evaluate, register, gate, promote")
    p.add_argument("--train-days", type=int, default=7)
    p.add_argument("--test-days", type=int, default=1)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate the baselines on your own train/test interaction files")
    p.add_argument("--train", required=True, help="MovieLens folder, ratings file or events file")
    p.add_argument("--test", required=True)
    p.add_argument("--valid", help="validation interactions for tuning the CF baseline (default: carved from train)")
    p.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--out", help="write the JSON result here as well")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    p.add_argument("--reason", default="manual rollback")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("models", help="champion, challenger and the promotion history")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("quarantine", help="show quarantined rows and reasons")
    p.add_argument("--table", default="events")
    p.add_argument("--partition", required=True)
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_quarantine)
    return parser


def _quiet_library_warnings() -> None:
    """Dagster flags preview/beta APIs recloop uses on purpose; keep them out of the command's output."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(is currently in (preview|beta)|varying BackfillPolicies|Found multiple backfill).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Feast logs a warning for each offline source folder that does not exist yet (before the first run).
    logging.getLogger("feast").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OPT_OUTS.items():
        os.environ.setdefault(key, value)
    # MLflow draws a progress bar for every artifact download (each champion load); keep output readable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _quiet_library_warnings()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `recloop` command.

    recloop simulate   write simulated days of users, videos and events into the landing zone (--closed-loop:
                       the champion serves the simulated users, who respond, day after day)
    recloop import     a history (MovieLens folder or your own files) → landing → one Dagster run → Feast
    recloop movielens  turn MovieLens-format files into landing partitions (recloop import does both steps)
    recloop run        the data plane: one day (daily job), or a range of days in one run (history job)
    recloop demo       simulate, then run everything, and say what was built and how to look at it
    recloop train      run the training job: train, evaluate, register, gate, promote
    recloop evaluate   the models and baselines on your own train/test interaction files
    recloop models     champion, challenger and the promotion history; recloop rollback undoes one
    recloop serve      the recommendation API (retrieval → ranking → re-ranking), metrics, feedback
    recloop drift      (re)run the drift report of partitions against the champion's training window
    recloop alerts     alert webhooks: dead letters, re-send, or a local test receiver
    recloop quarantine show quarantined rows of a partition with their reasons

Output: the result as tables and short lines on stdout; with --json the same result as JSON (for scripts:
`recloop train --json | jq .decision`). Progress and messages go to stderr: a live display on a terminal,
plain lines otherwise (--no-progress: none).

Exit codes: 0 done (a promotion the gate refuses is a normal outcome: 0, and the result says "promoted": false,
"decision": "refused" and why); 1 a run failed (the message names the failed step or check and why) or an
unexpected error; 2 a mistake in the command or its input (one sentence naming the cause and the fix);
130 interrupted. `recloop --debug COMMAND ...` (or RECLOOP_DEBUG=1) adds tracebacks and Dagster's own log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from recloop import cli_views as views
from recloop.config import Settings, mask_url

TELEMETRY_OPT_OUTS = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "FEAST_USAGE": "False",
}


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# `recloop --debug` sets it for the whole process (pipelines.run reads it for Dagster's console log too).
DEBUG_ENV = "RECLOOP_DEBUG"


class UserError(ValueError):
    """A mistake in the command or its input; the message is one sentence naming the cause and the fix."""


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _emit(args: argparse.Namespace, result: Any, view: Any, **kwargs: Any) -> None:
    """The command's result: JSON with --json (what scripts parse), else `view(console, result, **kwargs)`
    (`recloop.cli_views`); `kwargs` values that are callables are called only for the human view."""
    if getattr(args, "json", False):
        _print(result)
        return
    from recloop.terminal import stdout_console

    view(stdout_console(), result, **{k: (v() if callable(v) else v) for k, v in kwargs.items()})


def _progress(args: argparse.Namespace, **kwargs: Any):
    """The command's progress display on stderr (`recloop.terminal.RunProgress`); off with --no-progress."""
    from recloop.terminal import RunProgress

    return RunProgress(enabled=not getattr(args, "no_progress", False), **kwargs)


def _landing(settings: Settings):
    from recloop.lake import open_lake

    return open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url)


def _sim_config(args: argparse.Namespace, settings: Settings):
    from recloop.data.simulator import SimConfig

    from recloop.partition_range import parse_day

    start = parse_day(args.start, what="--start") if args.start else settings.partition_start
    try:
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
    except ValueError as err:
        # The simulator names its fields (`days must be >= 1, got 0`): name the options instead.
        text = re.sub(r"\b(seed|days|initial_users|initial_videos|events_per_day|drift_day)\b",
                      lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        raise UserError(f"{text}: change that option") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from recloop.data.simulator import simulate

    settings = Settings.from_env()
    if args.closed_loop:
        return _closed_loop(args, settings)
    for flag in ("serving_url", "run_pipeline", "report_unwatched"):
        if getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} only applies with --closed-loop: add --closed-loop or drop it")
    config = _sim_config(args, settings)
    summary = simulate(config, _landing(settings), fmt=args.format)
    _emit(args, {"landing": settings.landing_uri, "days": config.days, "start": config.start,
                 "totals": summary.totals, "seconds": round(summary.seconds, 2),
                 "events_per_s": round(summary.events_per_second)}, views.show_simulated)
    return 0


def _closed_loop(args: argparse.Namespace, settings: Settings) -> int:
    """`recloop simulate --closed-loop`: the days after the landed history, answered by the platform."""
    import dataclasses

    from recloop.data.closed_loop import NoChampion, first_closed_day, pipeline_hook, run_closed_loop

    if args.days < 1:
        raise UserError(f"--days must be >= 1, got {args.days}: give how many closed-loop days to simulate")
    if args.retrain_every < 0:
        raise UserError(f"--retrain-every must be >= 0, got {args.retrain_every}: 0 never retrains")
    landing = _landing(settings)
    base = _sim_config(argparse.Namespace(**{**vars(args), "days": 1, "scenario": "none"}), settings)
    first = first_closed_day(base, landing)
    # The same world as the landed history (same seed, start and sizes), continued after its last day.
    config = _sim_config(argparse.Namespace(**{**vars(args), "days": first + args.days,
                                               "drift_day": first + args.drift_day}), settings)
    days = list(range(first, first + args.days))
    service = None
    if args.serving_url:
        recommender: Any = args.serving_url
        where = args.serving_url
    else:
        from recloop.serving import RecommendationService, ServingConfig

        serving = ServingConfig.from_env()
        # Its own spool: a `recloop serve` of the same home keeps its own (one spool per process).
        serving = dataclasses.replace(serving, feedback_spool_dir=settings.home / "serving" / "closed-loop-spool")
        service = recommender = RecommendationService(settings, serving)
        service.feedback.start()
        where = "in process"
    hook = None
    if args.run_pipeline:
        def report(kind: str, run: Any) -> None:
            if kind == "training":
                summary = _training_summary(run)
                print(f"      retrained: version {summary.get('registered_version')} "
                      f"{'promoted' if summary.get('promoted') else 'not promoted'}; champion "
                      f"{summary.get('champion') or '(none)'}", file=sys.stderr)

        hook = pipeline_hook(settings, retrain_every=args.retrain_every, on_run=report)
    print(f"closed loop: {args.days} day(s) from {config.date_of(first)} served {where}"
          + (", data plane daily" + (f", retraining every {args.retrain_every} days" if args.retrain_every else "")
             if args.run_pipeline else ""), file=sys.stderr)

    def progress(stats: Any) -> None:
        print(f"      {stats.date}: {stats.impressions} impressions, CTR {stats.ctr:.3f}, "
              f"{stats.watch_s_per_impression:.1f} s watched/impression, Gini {stats.gini:.3f}, "
              f"coverage {stats.coverage:.3f}", file=sys.stderr)

    try:
        result = run_closed_loop(config, landing, recommender, days=days, after_day=hook,
                                 report_unwatched=args.report_unwatched, progress=progress)
    except NoChampion:
        raise UserError("there is no champion model to serve yet: train one first (recloop demo, or recloop run "
                        "then recloop train)") from None
    except (ConnectionError, PermissionError) as err:
        raise UserError(str(err)) from None
    finally:
        if service is not None:
            service.close()
    _emit(args, {"landing": settings.landing_uri, "serving": where, "first": config.date_of(first),
                 "days": result.as_dicts()}, views.show_closed_loop)
    return 0


def cmd_movielens(args: argparse.Namespace) -> int:
    """Landing only (kept for scripts): `recloop import` lands the same way and runs the data plane."""
    from recloop import history, partition_range
    from recloop.data.movielens import read_movielens, write_landing

    settings = Settings.from_env()
    try:
        tables = read_movielens(args.path)
    except (FileNotFoundError, ValueError) as err:
        raise history.HistoryInputError(str(err)) from None
    landing = _landing(settings)
    written = write_landing(tables, landing, fmt=args.format)
    if written["dates"]:
        # The daily partitions start where this history starts (no RECLOOP_PARTITION_START needed).
        events = tables["events"]["event_time"].cast("int64").to_numpy(zero_copy_only=False) // 86_400_000_000
        partition_range.record_history(landing, written["dates"][0], written["dates"][-1], source=str(args.path),
                                       days_with_events=len(set(events.tolist())))
    _emit(args, {"landing": settings.landing_uri, "rows": written["rows"],
                 "first": written["dates"][0] if written["dates"] else None,
                 "last": written["dates"][-1] if written["dates"] else None, "days": len(written["dates"]),
                 "next": "recloop run  (the whole landed range in one Dagster run); recloop import PATH does both steps"},
          views.show_movielens)
    return 0


def _range(settings: Settings):
    from recloop import partition_range

    return partition_range.resolve(settings, landing=_landing(settings))


def _partitions(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The days asked for, each checked against the daily partitions (`OutsideRange`: one sentence)."""
    from recloop.history import days_between
    from recloop.partition_range import OutsideRange

    rng = _range(settings)
    if args.partition:
        return [rng.check(args.partition, what="--partition")]
    if args.start or args.end:
        if not (args.start and args.end):
            raise OutsideRange("give both --start and --end (YYYY-MM-DD), or --partition for one day")
        return list(days_between(*rng.check_span(args.start, args.end)))
    # Everything the landing zone holds events for.
    return [d for d in _landing(settings).partitions("events") if d in rng]


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
        if "monitoring/drift" in m:
            drift = m["monitoring/drift"]
            day["drift"] = {k: drift.get(k) for k in ("drifted", "reasons", "champion_version", "report", "status")
                            if drift.get(k) not in (None, "")}
        if run.error:
            day["error"] = run.error
        out[run.partition] = day
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """One day: the daily data_plane_job (as the schedule runs it). A range, or nothing (everything the
    landing zone holds): the history job, the whole range in one Dagster run."""
    from pipelines.run import run_data_plane

    settings = Settings.from_env()
    _feature_engine_ready()
    if args.partition:
        partitions = _partitions(args, settings)
        t0 = time.perf_counter()
        # On a terminal: the running step, gone when done. Otherwise nothing: stderr keeps one line per failure.
        with _progress(args, plain=False, steps=False, transient=True):
            runs = run_data_plane(partitions, settings=settings)
        _emit(args, {"partitions": _summarise(runs), "seconds": round(time.perf_counter() - t0, 1)},
              views.show_partitions)
        for run in runs:
            if not run.success:
                print(f"recloop run: {'partition ' + run.partition if run.partition else 'feast apply'} failed: "
                      f"{run.error}. Details: the Dagster UI (make ui), run {run.run_id}, or `recloop --debug run ...`",
                      file=sys.stderr)
        return 0 if all(r.success for r in runs) else 1
    from recloop import lifecycle

    if args.start or args.end:
        days = _partitions(args, settings)
        first, last = days[0], days[-1]
    else:
        try:
            first, last = lifecycle.history_range(_landing(settings))
        except ValueError:
            raise UserError(f"no partitions to run: the landing zone {settings.landing_uri} has no events; run "
                            "`recloop simulate` or `recloop import PATH` first") from None
    return _run_history(args, settings, first, last)


def _feature_engine_ready() -> None:
    """Before a run computes features: RECLOOP_FEATURE_ENGINE=spark without pyspark or Java 17+ is one line
    naming what is missing (a SettingsError), not a failed step."""
    from recloop.features import feature_engine

    feature_engine()


def _run_history(args: argparse.Namespace, settings: Settings, first: str, last: str, *,
                 extra: dict[str, Any] | None = None, started: float | None = None) -> int:
    """The history job over `[first, last]` in one run, with its progress (the steps, a bar per stage);
    prints the summary."""
    from pipelines.run import run_history

    _feature_engine_ready()
    t0 = time.perf_counter()
    with _progress(args):
        run = run_history(first, last, settings=settings)
    out = {**(extra or {}), **_history_summary(run, first, last), "seconds": {
        **((extra or {}).get("seconds") or {}), "run": round(time.perf_counter() - t0, 1),
        **({"total": round(time.perf_counter() - started, 1)} if started is not None else {})}}
    _emit(args, out, views.show_history)
    if run.success:
        print(f"done: {first}..{last} is in the lake and the newest snapshot is online. Next: "
              "recloop train --train-period all --test-period 14d", file=sys.stderr)
    else:
        print(f"recloop: the history run failed: {out['error']}", file=sys.stderr)
    return 0 if run.success else 1


def _history_summary(run, first: str, last: str) -> dict[str, Any]:
    m = run.materialized
    out: dict[str, Any] = {"range": {"first": first, "last": last}, "dagster_runs": 1, "run_id": run.run_id,
                           "success": run.success}
    silver = (m.get("history/silver") or {}).get("summary") or {}
    if silver:
        out["validated"] = {t: {k: silver[t][k] for k in ("days", "ingested", "accepted", "quarantined", "quarantine_rate",
                                                          "quarantine_reasons", "days_above_max_quarantine_rate")}
                            for t in ("users", "videos", "events") if t in silver}
        out["days_with_events"] = silver.get("events", {}).get("days_with_accepted_rows")
    bronze = m.get("history/bronze") or {}
    if bronze:
        out["days_without_events"] = bronze.get("days_without_events")
    features = m.get("history/features") or {}
    if features:
        out["features"] = {"snapshot_days": features.get("snapshot_days"), "newest": features.get("newest"),
                           "rows": features.get("rows")}
    online = m.get("history/online_features") or {}
    if online:
        out["online"] = {k: online.get(k) for k in ("snapshot", "rows_written", "skipped", "online_store")}
    if run.checks:
        out["checks"] = run.checks
    if not run.success:
        # pipelines.run names the cause: the failed checks' reasons (GX: missing column, unreadable file...)
        out["error"] = run.error or "the run failed"
        out["details"] = f"the run's log in the Dagster UI (make ui), run {run.run_id}, or `recloop --debug run ...`"
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from recloop import history
    from recloop.lake import open_lake

    settings = Settings.from_env()
    started = time.perf_counter()
    source = history.detect(args.path)
    print(f"importing the {source.describe()}", file=sys.stderr)
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    with _progress(args):
        landed = history.land(source, _landing(settings), lake=lake, fmt=args.format)
    seconds = {"land": round(time.perf_counter() - started, 1)}
    summary = {"landing": settings.landing_uri, "landed": landed.summary()}
    if args.land_only:
        _emit(args, {**summary, "seconds": seconds, "next": f"recloop run --start {landed.first} --end {landed.last}"},
              views.show_landed)
        return 0
    return _run_history(args, settings, landed.first, landed.last, extra={**summary, "seconds": seconds},
                        started=started)


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
    from pipelines.run import dagster_home, instance, run_data_plane, run_job
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake

    if args.days < 1:
        raise UserError(f"--days must be >= 1, got {args.days}: the demo needs at least one day to run")
    if args.closed_days < 0:
        raise UserError(f"--closed-days must be >= 0, got {args.closed_days}")
    settings = Settings.from_env()
    # The demo's data ends with its last simulated day: the daily partitions end there too, for the runs
    # below and for `make ui` on this home afterwards (not every day up to today, all missing).
    from recloop.partition_range import END_DATA, pin_end

    pin_end(settings, END_DATA, set_by="recloop demo")
    # The demo's latency budget: the gate's default (25 ms p99) is meant for a quiet serving host, and the
    # demo replays requests on a laptop that is also running everything else. The ratio to the champion
    # (RECLOOP_LATENCY_MAX_RATIO) still applies. Set RECLOOP_LATENCY_BUDGET_MS to judge by your own budget.
    os.environ.setdefault("RECLOOP_LATENCY_BUDGET_MS", "100")
    # The world of all the days; the warm-up days are simulated open loop (before drift_day they are what
    # the `none` scenario gives), the closed-loop days after them are answered by the platform.
    online = args.closed_days > 0
    drifted = args.scenario != "none" and online
    config = _sim_config(argparse.Namespace(**{**vars(args), "days": args.days + args.closed_days,
                                               "drift_day": args.days, "scenario": args.scenario if drifted else "none"}),
                         settings)
    warm = dataclasses.replace(config, days=args.days, scenario="none")
    steps = 5 if online else 3
    print(f"[1/{steps}] simulating {warm.days} days (~{warm.events_per_day:,} events/day) into {settings.landing_uri}")
    summary = simulate(warm, _landing(settings))
    print("      " + ", ".join(f"{n:,} {table}" for table, n in summary.totals.items()))
    partitions = [warm.date_of(i).isoformat() for i in range(warm.days)]
    n_bad = _bad_delivery(_landing(settings), partitions[-1])
    print(f"      plus a late CSV delivery of {n_bad} events for {partitions[-1]}, two good and the rest broken in the usual ways")
    story = None
    # On a terminal, the Dagster step running now under the story (nothing otherwise: the story says it).
    with _demo_receiver() as receiver, _progress(args, plain=False, steps=False, transient=True):
        print(f"[2/{steps}] running the Dagster data plane for {len(partitions)} days: ingest → GX validation → features → "
              "Feast online store → drift report")
        t0 = time.perf_counter()
        runs = run_data_plane(partitions, settings=settings)
        for p, d in _summarise(runs).items():
            ev = d.get("events", {})
            print(f"      {p}: {'ok ' if d['success'] else 'FAILED'} events accepted {ev.get('accepted', '-')}, "
                  f"quarantined {ev.get('quarantined', '-')}; online rows {d.get('online', {}).get('rows_written', '-')}"
                  + (f"; {d['error']}" if d.get("error") else ""))
        lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
        ok = all(r.success for r in runs)
        training = None
        if ok:
            print(f"[3/{steps}] training job: Feast training set → two-tower → FAISS index → ranker → evaluation → MLflow "
                  "→ offline gate → latency gate")
            training = run_job("training_job", inst=instance(settings),
                               run_config_ops=_training_run_config(max(1, len(partitions) - 1), 1))
            ok = training.success
            _print_training(training)
        if ok and online:
            story = _demo_online(settings, config, args, receiver)
            ok = story is not None
    if lake.has_partition("quarantine/events", partitions[-1]):
        from recloop.validation import read_quarantine

        print(f"\nQuarantined events of {partitions[-1]} (accepted + quarantined = ingested, every row kept):")
        for row in read_quarantine(lake, "events", partitions[-1]).to_pylist():
            where = f"{row['_source_file']}:{row['_source_row'] or 'line ' + str(row['_source_line'])}"
            print(f"  {row['event_id'] or '?':8} {where:50} {row['reason']}")
    print()
    print("Built:")
    for dataset in ("bronze/events", "silver/users", "silver/videos", "silver/events", "quarantine/events",
                    "silver/impressions", "silver/impression_outcomes",
                    "features/user_activity", "features/user_category_affinity", "features/video_popularity",
                    "monitoring/drift", "monitoring/served_traffic"):
        print(f"  {lake.uri(dataset)}  ({len(lake.list_keys(dataset + '/')) if dataset.startswith('monitoring') else len(lake.partitions(dataset))}"
              f" {'files' if dataset.startswith('monitoring') else 'partitions'})")
    print(f"  Feast registry and SQLite online store in {settings.feast_data_dir}")
    print(f"  Dagster runs recorded in {dagster_home(settings)} ({time.perf_counter() - t0:.0f} s for all runs)")
    if training is not None:
        from recloop.registry import registry_settings

        print(f"  MLflow runs and registry at {mask_url(registry_settings(settings).tracking_uri)}"
              + (" (online experiments: the recloop-online-experiments experiment)" if story else ""))
    print()
    for line in _demo_where_to_look(settings, trained=training is not None):
        print(line)
    return 0 if ok else 1


def _tool(name: str) -> str:
    """How to call one of this installation's commands (`mlflow`, `recloop`): its name when the shell finds
    this one, else its path beside this Python (a virtualenv that is not activated)."""
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return name
    return str(beside) if beside.exists() else name


def _demo_where_to_look(settings: Settings, *, trained: bool) -> list[str]:
    """The demo's closing lines: the Dagster UI, the MLflow UI on this deployment's store, the API's docs."""
    from recloop.links import dagster_ui_url
    from recloop.terminal import API_DOCS, mlflow_model_url

    lines = ["Look at it:",
             "  Dagster UI: the asset runs, checks, lineage, the drift sensor and the retraining schedule",
             f"      make ui  →  {dagster_ui_url()}"]
    if trained:
        command, model = _mlflow_ui(settings)
        lines += ["  MLflow UI: the training runs, the registered versions and their aliases, the gate's decisions",
                  f"      {_tool('mlflow') + command.removeprefix('mlflow') if command else 'open'}  →  "
                  f"{mlflow_model_url(model)}",
                  "  The recommendation API (the champion, features from Feast) and its interactive docs",
                  f"      {_tool('recloop')} serve  →  {API_DOCS.format(port=DEFAULT_SERVE_PORT)}",
                  f"  The champion, the challengers and every decision:  {_tool('recloop')} models"]
    return lines


def _demo_online(settings: Settings, config: Any, args: argparse.Namespace, receiver: Any) -> Any:
    """Parts 4 and 5 of the demo: the platform answers the simulated users itself (closed loop) while the
    drift scenario starts; drift → retraining → offline gate → latency gate → online experiment →
    promotion (`recloop.story`)."""
    from recloop.story import run_online_story

    print(f"[4/5] closed loop from {config.date_of(args.days)}: the platform answers every simulated session "
          f"(~{args.closed_events_per_day // 12:,} a day, {args.explore_share:.0%} of slots explored: the feedback-loop guard), "
          f"users watch what they were shown; the {config.scenario} drift starts on the first day. After each day: data plane "
          "(served impressions joined with feedback), drift report, served-traffic monitor, the drift sensor; every 3 days "
          "without an experiment or a retraining, the retraining schedule")
    print("[5/5] ... the retrained challenger, if both gates pass it, gets live traffic (team-draft interleaving) and "
          "the daily online decision promotes or stops it:")
    try:
        story = run_online_story(settings, config, args.days, max_days=args.closed_days, explore_share=args.explore_share,
                                 retrain_after=3, events_per_day=args.closed_events_per_day,
                                 training_summary=_training_summary)
    except Exception as err:  # noqa: BLE001 - the demo says what failed and where to look
        print(f"      the closed loop stopped: {type(err).__name__}: {err}")
        return None
    if story.experiment_outcome == "promote":
        print(f"      => version {story.champion_after} won its online experiment and is now champion "
              f"(was v{story.champion_before}); `recloop models` shows the decision, `recloop rollback` undoes it")
    elif story.experiment_outcome:
        print(f"      => the experiment ended with {story.experiment_outcome}: champion stays v{story.champion_after}")
    else:
        print(f"      => no final online decision within {args.closed_days} days; champion v{story.champion_after}")
    if receiver is not None:
        print(f"      webhooks received and verified at {receiver.url}:")
        from recloop.terminal import plain_text

        for event in receiver.events:
            # the text chat tools show, without the emoji codes (`:white_check_mark:`) they turn into icons
            print(f"        {event['type']:18} {plain_text(event['text'].splitlines()[0])[:110]}")
    return story


def _demo_receiver():
    """A local webhook receiver for the demo's alerts, unless alert endpoints are configured already."""
    import contextlib

    from recloop.alerts import WebhookReceiver, new_secret

    if os.environ.get("RECLOOP_ALERT_WEBHOOK_URL"):
        return contextlib.nullcontext(None)
    secret = new_secret()
    receiver = WebhookReceiver(secret)
    os.environ["RECLOOP_ALERT_WEBHOOK_URL"], os.environ["RECLOOP_ALERT_WEBHOOK_SECRET"] = receiver.url, secret
    return receiver


def _print_training(run) -> None:
    summary = _training_summary(run)
    print("      offline evaluation on the held-out day (full ranking, seen videos excluded):")
    for name, values in (summary.get("evaluation") or {}).items():
        print(f"        {name:15} recall@10 {values.get('recall_at_10', float('nan')):.4f}  "
              f"ndcg@10 {values.get('ndcg_at_10', float('nan')):.4f}  coverage {values.get('coverage', float('nan')):.3f}")
    print(f"      promotion gate for version {summary.get('registered_version')}: "
          + ("passed" if summary.get("gate_passed") else "refused"))
    for line in summary.get("gate") or []:
        print(f"        {line}")
    from recloop.story import latency_line

    if (latency := latency_line(run)) is not None:
        print(f"      {latency}")
    if summary.get("champion"):
        print(f"      champion is now version {summary['champion']} (recloop models; recloop rollback)")
    if summary.get("error") and not summary.get("gate"):
        print(f"      training: {summary['error']}")


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.run import instance, run_job
    from recloop.periods import parse_period

    settings = Settings.from_env()
    if args.train_period:
        parse_period(args.train_period, what="--train-period")
    if args.test_period:
        parse_period(args.test_period, allow_all=False, what="--test-period")
    with _progress(args):
        run = run_job("training_job", inst=instance(settings),
                      run_config_ops=_training_run_config(args.train_days, args.test_days, args.train_period,
                                                          args.test_period))
    summary = _training_summary(run)

    def latency() -> str | None:
        from recloop.story import latency_line

        return latency_line(run)

    _emit(args, summary, views.show_training, latency=latency, links=lambda: _training_links(settings, summary))
    if summary.get("decision") == "refused":
        print(f"recloop train: version {summary.get('registered_version')} was not promoted: "
              f"{(summary.get('reasons') or ['see the gate check'])[0]}; the champion stays "
              f"{summary.get('champion') or '(none yet)'}", file=sys.stderr)
    elif not run.success:
        print(f"recloop train: the training run failed: {run.error}. Details: the Dagster UI (make ui), run "
              f"{run.run_id}, or `recloop --debug train ...`", file=sys.stderr)
    return EXIT_OK if run.success else EXIT_FAILED


def _mlflow_ui(settings: Settings) -> tuple[str | None, str]:
    """(the command that starts an MLflow UI on this deployment's store, or None when it is a server; the
    registered model's name)."""
    from recloop.registry import registry_settings
    from recloop.terminal import mlflow_ui_command

    rs = registry_settings(settings)
    return mlflow_ui_command(rs.tracking_uri, masked_uri=mask_url(rs.tracking_uri)), rs.model_name


def _training_links(settings: Settings, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Where to look at a training run: its Dagster run, the version in MLflow, the next commands."""
    from recloop.terminal import dagster_run_url, mlflow_model_url

    command, model = _mlflow_ui(settings)
    links = [("Dagster run", f"{dagster_run_url(summary['run_id'])}  (make ui)")]
    if summary.get("registered_version") is not None:
        links.append(("MLflow", mlflow_model_url(model, str(summary["registered_version"]))
                      + (f"  ({command})" if command else "")))
    links.append(("next", "recloop models (the decisions); recloop serve (the API with the champion)"))
    return links


def _training_run_config(train_days: int, test_days: int, train_period: str | None = None,
                         test_period: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"TrainDays": train_days, "TestDays": test_days}
    if train_period:
        config["TrainPeriod"] = train_period
    if test_period:
        config["TestPeriod"] = test_period
    return {"model__training_set": {"config": config}}


GATE = "model/registered_version:promotion_gate"


def _training_summary(run) -> dict[str, Any]:
    """What a training run did. A refusal by the promotion gate is a normal outcome: `success` stays true,
    `promoted` is false, `decision` is "refused" and `reasons` says why (the champion is unchanged)."""
    m = run.materialized
    out: dict[str, Any] = {"success": run.success, "run_id": run.run_id}
    ev = m.get("model/evaluation", {})
    if ev:
        out["evaluation"] = ev.get("by_recommender")
        out["recall_at_10_vs_popularity"] = ev.get("recall_at_10_vs_popularity")
    if "model/registered_version" in m:
        out["registered_version"] = m["model/registered_version"]["version"]
    out["gate_passed"] = run.checks.get(GATE)
    if GATE in run.check_metadata:
        gate = run.check_metadata[GATE]
        out["gate"] = gate.get("reasons")
        promoted = "model/champion" in m
        out["promoted"] = promoted
        out["decision"] = "promoted" if promoted else ("refused" if run.checks.get(GATE) is False else "not promoted")
        out["reasons"] = gate.get("reasons") or []
        if gate.get("compared_to") is not None:
            out["compared_to"] = gate.get("compared_to")
    if "model/champion" in m:
        out["champion"] = m["model/champion"]["champion"]
    elif out.get("decision") == "refused":
        out["champion"] = _current_champion()
    if run.error:
        out["error"] = run.error
    return out


def _current_champion() -> str | None:
    """The champion's version (after a refusal: the one that stays), or None when the registry has none."""
    from recloop.registry import open_registry

    try:
        champion = open_registry(Settings.from_env()).champion()
    except Exception:  # noqa: BLE001 (only informative: the refusal is reported either way)
        return None
    return str(champion.version) if champion else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recloop.evaluation import EvaluationInputError, evaluate_files, write_json
    from recloop.model_plane.fit import NotEnoughData

    try:
        result = evaluate_files(args.train, args.test, valid_path=args.valid, ks=tuple(args.k))
    except (EvaluationInputError, NotEnoughData) as err:
        print(f"recloop evaluate: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_json(result, args.out)
    _emit(args, result, views.show_evaluation, out=args.out)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from recloop.registry import RegistryError, open_registry

    registry = open_registry(Settings.from_env())
    try:
        before, after = registry.rollback(to=args.to, reason=args.reason)
    except RegistryError as err:
        print(f"recloop rollback: {err}", file=sys.stderr)
        return 2
    latest = registry.history()[0]
    _emit(args, {"model": registry.model_name, "champion_was": before, "champion_now": after,
                 "why": latest.get("why", [])}, views.show_rollback)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from recloop.registry import open_registry

    if args.limit < 0:
        raise UserError(f"--limit {args.limit} is negative: give how many decisions to show (0 or more)")
    registry = open_registry(Settings.from_env())
    champion = registry.champion()
    challenger = registry.challenger()
    history = registry.history()
    result = {
        "model": registry.model_name,
        "champion": champion.version if champion else None,
        "challenger": challenger.version if challenger else None,
        "lineage": registry.lineage(),
        "history": history[: args.limit],
    }
    from recloop.registry import GateConfig

    metric = GateConfig().primary_metric
    _emit(args, result, views.show_models, metric=metric, limit=args.limit,
          aliases=lambda: _alias_rows(registry, history, metric, champion=champion, challenger=challenger))
    return 0


def _alias_rows(registry: Any, history: list[dict[str, Any]], metric: str, **known: Any) -> list[tuple[str, Any, str, str]]:
    """(alias, version, since when, the version's offline primary metric) for champion, challenger and
    experiment: since the decision that set the alias (the version's registration for a challenger)."""
    from mlflow.exceptions import MlflowException

    from recloop.registry import RegistryError

    rows = []
    for alias in ("champion", "challenger", "experiment"):
        mv = known[alias] if alias in known else getattr(registry, alias)()
        if mv is None:
            rows.append((alias, None, "", ""))
            continue
        version = str(mv.version)
        decided = {"champion": ("promoted", "rolled_back"), "experiment": ("experiment_started",)}.get(alias, ())
        entry = next((e for e in history if e.get("decision") in decided
                      and version in (str(e.get("version")), str(e.get("to_version")))), None)
        since = views.when(entry["when"]) if entry else views.when(
            datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)) + " (registered)"
        try:
            value = registry.version_metrics(version).get(metric)
        except (MlflowException, RegistryError):  # a version whose run is gone: no metric to show
            value = None
        rows.append((alias, version, since, views.num(value)))
    return rows


def cmd_quarantine(args: argparse.Namespace) -> int:
    from recloop.lake import open_lake
    from recloop.validation import read_quarantine

    from recloop.data.schemas import TABLE_ORDER

    if args.table not in TABLE_ORDER:
        raise UserError(f"--table {args.table!r} is not a table: use one of {', '.join(TABLE_ORDER)}")
    if args.limit < 0:
        raise UserError(f"--limit {args.limit} is negative: give how many rows to show (0 or more)")
    settings = Settings.from_env()
    day = _range(settings).check(args.partition, what="--partition")
    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    if lake.has_partition(f"quarantine/{args.table}", day):
        table = read_quarantine(lake, args.table, day)
    elif lake.has_partition(f"silver/{args.table}", day) or lake.has_partition(f"bronze/{args.table}", day):
        # validated with nothing to quarantine (a range run writes no empty quarantine partition)
        _emit(args, {"table": args.table, "partition": day, "quarantined": 0, "rows": []}, views.show_quarantine,
              reasons={}, id_column=_id_column(args.table))
        return 0
    else:
        print(f"recloop quarantine: {args.table} of {day} was never validated: nothing was delivered for that day "
              f"or the data plane has not run it (recloop run --partition {day})", file=sys.stderr)
        return 2
    rows = table.slice(0, args.limit).to_pylist()
    from recloop.validation import reason_counts

    _emit(args, {"table": args.table, "partition": day, "quarantined": table.num_rows, "rows": rows},
          views.show_quarantine, reasons=lambda: reason_counts(table), id_column=_id_column(args.table))
    return 0


def _id_column(table: str) -> str:
    """The column that names a row of `table` (event_id, user_id, video_id, impression_id)."""
    return {"users": "user_id", "videos": "video_id", "events": "event_id"}.get(table, f"{table.rstrip('s')}_id")


def cmd_drift(args: argparse.Namespace) -> int:
    from pipelines.run import instance, run_job

    settings = Settings.from_env()
    partitions = _partitions(args, settings)
    if not partitions:
        raise UserError(f"no partitions to report on: the landing zone {settings.landing_uri} has no events; give "
                        "--partition D (or --start/--end), or land data first (recloop simulate, recloop import PATH)")
    inst = instance(settings)
    with _progress(args, plain=False, steps=False, transient=True):
        runs = [run_job("drift_job", partition=p, inst=inst) for p in partitions]
    _emit(args, {run.partition: {**_summarise([run])[run.partition].get("drift", {}), "success": run.success,
                                 **({"error": run.error} if run.error else {})} for run in runs}, views.show_drift)
    for run in runs:
        if not run.success:
            print(f"recloop drift: partition {run.partition} failed: {run.error}. Details: the Dagster UI (make ui), "
                  f"run {run.run_id}, or `recloop --debug drift ...`", file=sys.stderr)
    return 0 if all(r.success for r in runs) else 1


def _listen_secret(settings: Settings) -> tuple[str, str]:
    """The test receiver's secret and how the user gets it into RECLOOP_ALERT_WEBHOOK_SECRET, without
    printing it: the variable's own value, or a new secret written to a file only the user can read."""
    from recloop.alerts import QUICK_SECRET_ENV, new_secret

    if os.environ.get(QUICK_SECRET_ENV):
        return os.environ[QUICK_SECRET_ENV], f"(the secret already in {QUICK_SECRET_ENV})"
    path = settings.home / "alerts" / "listen-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    # Created 0600 before the secret is written: never readable by others, even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret, f"export {QUICK_SECRET_ENV}=$(cat {path})"


def _check_endpoint(dispatcher, endpoint: str | None) -> None:
    """`endpoint` must be configured (or still have dead letters in the store): otherwise one sentence
    naming the configured endpoints."""
    if endpoint is None or any(e.name == endpoint for e in dispatcher.endpoints):
        return
    if dispatcher.store.dead_letters(endpoint):
        return  # an endpoint removed from the configuration whose dead letters are still listed
    from recloop.alerts import CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, QUICK_URL_ENV

    where = os.environ.get(CONFIG_PATH_ENV) or str(DEFAULT_CONFIG_PATH)
    names = sorted(e.name for e in dispatcher.endpoints)
    if names:
        raise UserError(f"--endpoint {endpoint!r} is not an alert endpoint: the configured ones are "
                        f"{', '.join(names)} ({where}; `env` is {QUICK_URL_ENV})")
    raise UserError(f"--endpoint {endpoint!r} is not an alert endpoint: none is configured (add one to {where} or "
                    f"set {QUICK_URL_ENV})")


def cmd_alerts(args: argparse.Namespace) -> int:
    from recloop.alerts import AlertDispatcher, WebhookReceiver

    if args.action == "listen":
        secret, how = _listen_secret(Settings.from_env())

        def show(event: dict[str, Any]) -> None:
            print(json.dumps(event, default=str) if args.json else views.alert_line(event), flush=True)

        try:
            receiver = WebhookReceiver(secret, host=args.host, port=args.port, on_event=show)
        except OSError as err:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}): choose another "
                            "--port or --host") from None
        with receiver:
            print(f"listening on {receiver.url}; point recloop at it with\n"
                  f"  export RECLOOP_ALERT_WEBHOOK_URL={receiver.url}\n  {how}",
                  file=sys.stderr, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
    dispatcher = AlertDispatcher.from_settings()
    try:
        _check_endpoint(dispatcher, args.endpoint)
        if args.action == "resend":
            results = dispatcher.resend_dead_letters(args.endpoint)
            _emit(args, [{"endpoint": r.endpoint, "event_id": r.event_id, "outcome": str(r.outcome),
                          "attempts": r.attempts, "status_code": r.status_code, "error": r.error} for r in results],
                  views.show_resent)
            return 0 if all(str(r.outcome) != "dead_lettered" for r in results) else 1
        _emit(args, [{"endpoint": d.endpoint, "event_id": d.event_id, "type": d.event_type, "status": str(d.status),
                      "attempts": d.attempts, "last_status_code": d.last_status_code, "last_error": d.last_error,
                      "updated_at": d.updated_at} for d in dispatcher.store.dead_letters(args.endpoint)],
              views.show_dead_letters)
        return 0
    finally:
        dispatcher.store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from recloop.serving import serve

    serve(Settings.from_env(), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


DEFAULT_SERVE_PORT = 8000


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it says it already, or the option has none: a flag
    that is off, a value that is absent unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else "%(default)s"
        return f"{text} (default: {default})"


class _RawHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The top-level help: the module docstring as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recloop", description=__doc__, formatter_class=_RawHelpFormatter)
    debug_help = f"on failure, show the traceback and Dagster's own log (same as {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the command (`recloop run --debug ...`); SUPPRESS keeps the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    # The commands that print a result: tables by default, JSON for scripts.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true",
                        help="print the result as JSON (for scripts) instead of tables; progress stays on stderr")
    progress_help = {
        "plain": "show no progress on stderr (shown by default: live on a terminal, else one line per finished "
                 "step and stage)",
        "terminal": "show no progress on stderr (shown by default on a terminal: the Dagster step running)",
        "run": "show no progress on stderr (shown by default: live on a terminal; for a range, else one line "
               "per finished step and stage)",
    }
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:
        @staticmethod
        def add_parser(name: str, *, result: bool = True, progress: str | None = None,
                       **kwargs: Any) -> argparse.ArgumentParser:
            parents = [common] + ([output] if result else [])
            kwargs.setdefault("description", kwargs.get("help"))
            p = subparsers.add_parser(name, parents=parents, formatter_class=_HelpFormatter, **kwargs)
            if progress:
                p.add_argument("--no-progress", action="store_true", help=progress_help[progress])
            return p

    sub = _Sub()

    def sim_args(p: argparse.ArgumentParser, days: int, events: int, users: int, videos: int) -> None:
        from recloop.data.simulator import SCENARIOS

        p.add_argument("--days", type=int, default=days, help="days to simulate")
        p.add_argument("--start", metavar="YYYY-MM-DD", help="first day (default: RECLOOP_PARTITION_START, else 2025-01-01)")
        p.add_argument("--events-per-day", type=int, default=events, metavar="N", help="impressions per day")
        p.add_argument("--initial-users", type=int, default=users, metavar="N", help="users on the first day")
        p.add_argument("--initial-videos", type=int, default=videos, metavar="N", help="videos on the first day")
        p.add_argument("--seed", type=int, default=7, help="random seed: the same seed gives the same world")
        p.add_argument("--scenario", choices=SCENARIOS, default="none",
                       help="the drift that starts on --drift-day")
        p.add_argument("--drift-day", type=int, default=7, metavar="N", help="0-based index of the first drifted day")

    p = sub.add_parser("simulate", help="simulate days into the landing zone (--closed-loop: served by the platform)",
                       description=(
                           "Simulate days of users, videos and impressions into the landing zone. With --closed-loop "
                           "the platform chooses what is shown: the days after the newest landed day (same --seed, "
                           "--start and sizes as the history, so the same users and videos) are served by the "
                           "champion, in process from this home's settings or by a running `recloop serve` "
                           "(--serving-url); users respond by the simulator's ground truth and their watches go "
                           "back as feedback. Prints per-day CTR, watch time, popularity concentration (Gini, "
                           "top-1% share) and catalog coverage of what was served."))
    sim_args(p, days=14, events=20_000, users=5_000, videos=2_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="landing file format")
    p.add_argument("--closed-loop", action="store_true",
                   help="serve the simulated sessions with the platform (needs a champion: train first); --days "
                        "then counts closed-loop days")
    p.add_argument("--serving-url", metavar="URL",
                   help="with --closed-loop: the base URL of a running `recloop serve` (default: a service in "
                        "this process); RECLOOP_API_KEYS's first key is sent when set")
    p.add_argument("--run-pipeline", action="store_true",
                   help="with --closed-loop: after each day run the data plane for it, and retrain every "
                        "--retrain-every days")
    p.add_argument("--retrain-every", type=int, default=7, metavar="DAYS",
                   help="with --run-pipeline: closed-loop days between training runs (0: never)")
    p.add_argument("--report-unwatched", action="store_true",
                   help="with --closed-loop: send unwatched impressions as watched_s=0 feedback too (default: "
                        "only watches; the server's impressions log makes the rest served negatives)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("import", progress="plain",
                       help="import a history: land it, then ingest → GX → features → Feast in one Dagster run",
                       description=(
                           "Import a history in one command: a MovieLens folder (ML-100K, ML-1M/10M, ml-latest/20M/25M), "
                           "a folder in the landing layout, a folder with users, videos and events files "
                           "(docs/data_schema.md), or an events file. The data is landed one partition per table and "
                           "day (replacing that range of the landing zone), then the history job takes the whole "
                           "range through ingestion, GX validation, feature snapshots and Feast in one Dagster run, "
                           "with a progress bar per stage. The daily partitions then start where the history starts."))
    p.add_argument("path", help="MovieLens folder, folder of users/videos/events files, or an events file")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                   help="landing format for a MovieLens folder")
    p.add_argument("--land-only", action="store_true", help="land the history and stop (run it later with recloop run)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("movielens", help="MovieLens-format folder → landing partitions only (recloop import also runs them)")
    p.add_argument("path", help="a MovieLens folder (ratings and movies files)")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="landing file format")
    p.set_defaults(func=cmd_movielens)

    def partition_args(p: argparse.ArgumentParser, everything: str) -> None:
        p.add_argument("--partition", metavar="YYYY-MM-DD", help=f"one day (default: {everything})")
        p.add_argument("--start", metavar="YYYY-MM-DD", help="first day of a range (with --end)")
        p.add_argument("--end", metavar="YYYY-MM-DD", help="last day of a range (with --start)")

    p = sub.add_parser("run", progress="run",
                       help="the data plane: one day (--partition), or a range in one run (--start/--end, or "
                            "everything the landing zone holds)")
    partition_args(p, "every day the landing zone holds events for, in one run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", result=False, progress="terminal", help="simulate and run the main job on the embedded default",
                       description=("Build a whole deployment under RECLOOP_HOME and tell what happens: a simulated "
                                    "week, the Dagster data plane per day, the training job and its gates, then the "
                                    "closed loop (the platform serves the simulated users) with drift, retraining and "
                                    "an online experiment (docs/cli.md)."))
    sim_args(p, days=7, events=20_000, users=5_000, videos=2_000)
    p.add_argument("--closed-days", type=int, default=12, metavar="N",
                   help="at most this many days the platform then serves the simulated users itself (closed "
                        "loop; it ends the day the online experiment decides; 0: skip)")
    p.add_argument("--closed-events-per-day", type=int, default=8_000, metavar="N",
                   help="impressions per closed-loop day")
    p.add_argument("--explore-share", type=float, default=0.1, metavar="SHARE",
                   help="share of slots the closed-loop service explores (0: the model's top only)")
    p.set_defaults(func=cmd_demo, scenario="new_user_wave")

    p = sub.add_parser("train", progress="plain",
                       help="run the Dagster training job: train, evaluate, register, gate, promote")
    p.add_argument("--train-days", type=int, default=7, metavar="N", help="days with events to train on")
    p.add_argument("--test-days", type=int, default=1, metavar="N", help="newest days with events held out")
    p.add_argument("--train-period", metavar="PERIOD",
                   help="instead of --train-days: a calendar period such as 90d, 6m, 1y, or 'all' (every day before "
                        "the held-out period)")
    p.add_argument("--test-period", metavar="PERIOD",
                   help="instead of --test-days: the newest calendar period held out, e.g. 14d, 2w, 1m")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate the baselines on your own train/test interaction files")
    p.add_argument("--train", required=True, metavar="PATH", help="MovieLens folder, ratings file or events file")
    p.add_argument("--test", required=True, metavar="PATH", help="the held-out interactions, in the same formats")
    p.add_argument("--valid", metavar="PATH",
                   help="validation interactions for tuning the CF baseline (default: carved from train)")
    p.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50], metavar="K", help="cut-offs to evaluate at")
    p.add_argument("--out", metavar="PATH", help="write the JSON result here as well (default: only print it)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("rollback", help="move the champion alias back to the previous champion that loads, or to --to VERSION",
                       description=("Move the champion alias back: to the newest earlier champion whose bundle downloads, "
                                    "passes its checksums and loads (corrupt ones are skipped and named), or with --to "
                                    "to any version the gate promoted before. Serving follows the alias."))
    p.add_argument("--to", metavar="VERSION",
                   help="the version to make champion, one the gate promoted before (default: the previous champion "
                        "that loads)")
    p.add_argument("--reason", default="manual rollback", help="why, recorded with the decision")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("models", help="champion, challenger and the promotion history")
    p.add_argument("--limit", type=int, default=10, metavar="N", help="decisions to show, newest first")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", result=False,
                       help="the recommendation API: champion from MLflow, features from Feast (docs/serving.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=DEFAULT_SERVE_PORT,
                   help="port to listen on (the API's docs: http://HOST:PORT/docs)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("drift", help="(re)run the drift report of partitions against the champion's training window")
    partition_args(p, "every day the landing zone holds events for")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("alerts", help="alert webhooks: list dead letters, re-send them, or listen as a test receiver")
    p.add_argument("action", choices=("dead-letters", "resend", "listen"),
                   help="dead-letters: list what could not be delivered; resend: send it again; listen: a local "
                        "receiver that verifies and prints what it receives")
    p.add_argument("--endpoint", metavar="NAME", help="only this endpoint's dead letters (default: every endpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="listen: address to listen on")
    p.add_argument("--port", type=_port, default=9000, help="listen: port to listen on (0: any free port)")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("quarantine", help="show quarantined rows and reasons",
                       description=("The rows validation quarantined from one day of a table: how many per reason, "
                                    "then the first rows with the file and line they came from."))
    p.add_argument("--table", default="events", help="users, videos or events")
    p.add_argument("--partition", required=True, metavar="YYYY-MM-DD", help="the day")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="rows to show")
    p.set_defaults(func=cmd_quarantine)
    return parser


def _quiet_library_warnings() -> None:
    """Dagster flags preview/beta APIs recloop uses on purpose; keep them out of the command's output."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(is currently in (preview|beta)|varying BackfillPolicies|Found multiple backfill).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Feast prepends its own `simplefilter("once", DeprecationWarning)` when imported, after ours: drop
    # deprecation notices where they are shown instead (they concern the libraries, not the user's command).
    shown = warnings.showwarning

    def showwarning(message, category, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DeprecationWarning) and not _debugging():
            return
        shown(message, category, *args, **kwargs)

    warnings.showwarning = showwarning
    # Feast logs a warning for each offline source folder that does not exist yet (before the first run).
    logging.getLogger("feast").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OPT_OUTS.items():
        os.environ.setdefault(key, value)
    # MLflow draws a progress bar for every artifact download (each champion load); keep output readable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _quiet_library_warnings()
    args = build_parser().parse_args(argv)
    before = os.environ.get(DEBUG_ENV)
    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"  # for the whole command (pipelines.run reads it for Dagster's log)
    try:
        return _dispatch(args)
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


def _dispatch(args: argparse.Namespace) -> int:
    """Runs the command; errors become one line and an exit code (with the traceback when debugging)."""
    debug = _debugging()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"recloop {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`recloop models | head`): not an error of the command. Python's
        # own flush at exit would fail again on the closed pipe: point stdout at /dev/null first.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except _user_errors() as err:
        # The user's input (a day outside the partitions, a bad date or period, a file recloop cannot read,
        # an unknown name, a setting): one sentence, exit code 2, no traceback unless asked for.
        if debug:
            traceback.print_exc()
        print(f"recloop {args.command}: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 (the last resort: a short message, the traceback on request)
        if debug:
            traceback.print_exc()
            print(f"recloop {args.command}: unexpected error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        else:
            print(f"recloop {args.command}: unexpected error: {type(err).__name__}: {_one_line(err)}. Run it again "
                  f"with `recloop --debug {args.command} ...` (or RECLOOP_DEBUG=1) for the traceback, and report it "
                  "if the cause is not yours", file=sys.stderr)
        return EXIT_FAILED


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (a FileNotFoundError's file named plainly)."""
    if type(err) in (FileNotFoundError, NotADirectoryError) and getattr(err, "filename", None):
        return f"{err.filename} does not exist or is not a folder: check the path"
    text = str(err).strip() or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _user_errors() -> tuple[type[BaseException], ...]:
    from recloop.alerts import AlertConfigError
    from recloop.config import SettingsError
    from recloop.evaluation import EvaluationInputError
    from recloop.history import HistoryInputError
    from recloop.model_plane.fit import NotEnoughData
    from recloop.partition_range import BadDay, OutsideRange
    from recloop.periods import BadPeriod
    from recloop.scaleout import CeleryUnavailable

    return (UserError, OutsideRange, BadDay, BadPeriod, HistoryInputError, SettingsError, AlertConfigError,
            EvaluationInputError, NotEnoughData, CeleryUnavailable, FileNotFoundError, NotADirectoryError)


if __name__ == "__main__":
    sys.exit(main())

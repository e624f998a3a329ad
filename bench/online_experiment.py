"""Online benchmark: what serving its own recommendations does to a platform (part A), and how online
experiments decide (part B, wired once `recloop.online` lands).

Part A, feedback-loop curves. For each exploration setting (off, and `--explore-share` when the serving
change that adds exploration is present: `ServingConfig.explore_share`):

1. a fresh embedded deployment (its own RECLOOP_HOME) gets `--warmup-days` open-loop simulated days,
   runs them through the data plane and trains a champion: exactly what `recloop demo` does
   (`pipelines.run.run_data_plane`, then the training job);
2. then `--weeks` simulated weeks run in closed loop (`recloop.data.closed_loop.run_closed_loop`): an
   in-process RecommendationService answers every session, the users respond by the simulator's ground
   truth, the watches go back as feedback; after each day the data plane runs for it and every 7 days
   the training job retrains on the last 7 days (`pipeline_hook`), with the promotion gate as usual;
3. per day: CTR, watch time per impression, the Gini coefficient of impressions per catalog video, the
   top-1 % share and catalog coverage of what was served (and of what the open-loop platform showed on
   the warm-up days, for reference).

Prints one JSON object and writes it to `--out` with a PNG of the curves beside it.

    python bench/online_experiment.py                       # 7 warm-up days, 2 closed-loop weeks
    python bench/online_experiment.py --weeks 1 --events-per-day 2000

Feedback: the simulated app reports only watches, with the answer's request_id; the unwatched impressions
come from serving's impressions log (stamped with the simulated session's time) through the data plane's
join as served negatives. `--report-unwatched` also sends them as `watched_s = 0` feedback, the way apps
reported impressions before the impressions log existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TELEMETRY = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "FEAST_USAGE": "False",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# What a developer's shell may export and an isolated deployment must not see.
DEPLOYMENT_VARS = ("RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV",
                   "RECLOOP_PARTITION_START", "RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_MLFLOW_ARTIFACT_URI",
                   "RECLOOP_ALERT_WEBHOOK_URL", "RECLOOP_API_KEYS")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- one deployment ----------------------------------------------------------------------------------


def fresh_deployment(root: Path):
    """An isolated embedded deployment under `root` (landing, lake, Feast, MLflow, Dagster): its Settings."""
    from recloop.config import Settings

    home = root / "home"
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    for var in DEPLOYMENT_VARS:
        os.environ.pop(var, None)
    os.environ.update({**TELEMETRY, "RECLOOP_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
                       "RECLOOP_FEAST_PROJECT": f"b{uuid.uuid4().hex[:10]}"})
    return Settings.from_env()


def warm_up(settings, sim_config, warmup_days: int) -> dict[str, Any]:
    """Open-loop days → data plane → training: what `recloop demo` runs. Returns what it measured."""
    from pipelines.run import instance, run_data_plane, run_job
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake

    warm = dataclasses.replace(sim_config, days=warmup_days, scenario="none")
    t0 = time.perf_counter()
    simulate(warm, open_lake(settings.landing_uri))
    days = [warm.date_of(i).isoformat() for i in range(warmup_days)]
    runs = run_data_plane(days, settings=settings)
    failed = [r for r in runs if not r.success]
    if failed:
        raise RuntimeError(f"warm-up data plane failed for {failed[0].partition or 'feast apply'}: {failed[0].error}")
    t1 = time.perf_counter()
    training = run_job("training_job", inst=instance(settings), run_config_ops={
        "model__training_set": {"config": {"TrainDays": max(1, warmup_days - 1), "TestDays": 1}}})
    if not training.success:
        raise RuntimeError(f"warm-up training failed: {training.error}")
    return {"data_plane_s": round(t1 - t0, 1), "training_s": round(time.perf_counter() - t1, 1)}


def open_loop_reference(sim_config, warmup_days: int) -> list[dict[str, Any]]:
    """The same statistics of what the open-loop platform (the simulator's own choice) showed."""
    import numpy as np

    from recloop.data.closed_loop import gini, top_share
    from recloop.data.simulator import Simulator

    sim = Simulator(dataclasses.replace(sim_config, days=warmup_days, scenario="none"))
    out = []
    for i in range(warmup_days):
        events = sim.day(i)["events"]
        catalog = sim.catalog_size(sim.day_start_us(i))
        rows = sim.video_rows(events["video_id"].to_numpy(zero_copy_only=False))
        counts = np.bincount(rows, minlength=sim.n_videos)
        counts = np.concatenate([counts[:catalog], counts[catalog:][counts[catalog:] > 0]])
        watched = events["watched_s"].to_numpy()
        out.append({"day": i, "date": sim.config.date_of(i).isoformat(), "impressions": len(watched),
                    "ctr": round(float((watched > 0).mean()), 5),
                    "watch_s_per_impression": round(float(watched.mean()), 3),
                    "gini": round(gini(counts), 5), "top1_share": round(top_share(counts), 5),
                    "coverage": round(float((counts > 0).sum() / catalog), 5)})
    return out


def serving_config(settings, explore_share: float | None, **experiment: Any):
    """The service's settings: exploration and (part B) experiment fields only where serving has them."""
    from recloop.serving import ServingConfig

    names = {f.name for f in dataclasses.fields(ServingConfig)}
    values: dict[str, Any] = {"feedback_spool_dir": settings.home / "serving" / "bench-spool",
                              "feedback_flush_seconds": 3600.0}
    if explore_share is not None:
        if "explore_share" not in names:
            raise NotImplementedError("ServingConfig has no explore_share yet (the serving change is not merged)")
        values["explore_share"] = explore_share
    for key, value in experiment.items():
        if key not in names:
            raise NotImplementedError(f"ServingConfig has no {key} yet")
        values[key] = value
    return dataclasses.replace(ServingConfig.from_env(), **values)


def closed_loop_run(root: Path, sim_config, warmup_days: int, closed_days: int, *, explore_share: float | None,
                    report_unwatched: bool, retrain_every: int = 7, prepare=None, recommender=None,
                    serving_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One arm setup end to end: fresh deployment → warm-up → `closed_days` in closed loop with daily data
    plane and retraining every `retrain_every` days. `prepare(settings)` runs between the warm-up and the
    closed loop (part B: register a challenger, set the `experiment` alias); `recommender(settings,
    service)` may wrap the in-process service (default: the service itself)."""
    from recloop.data.closed_loop import pipeline_hook, run_closed_loop
    from recloop.lake import open_lake
    from recloop.serving import RecommendationService

    settings = fresh_deployment(root)
    timings = warm_up(settings, sim_config, warmup_days)
    if prepare is not None:
        prepare(settings)
    service = RecommendationService(settings, serving_config(settings, explore_share, **(serving_overrides or {})))
    service.feedback.start()
    trainings: list[dict[str, Any]] = []

    def on_run(kind: str, run: Any) -> None:
        if kind == "training":
            m = run.materialized.get("model/registered_version") or {}
            gate = "model/registered_version:promotion_gate"
            trainings.append({"success": run.success, "version": m.get("version"), "promoted": run.checks.get(gate),
                              "gate": run.check_descriptions.get(gate) or run.error})
            log(f"    retrained: {trainings[-1]}")

    def progress(stats: Any) -> None:
        log(f"    {stats.date}: CTR {stats.ctr:.3f}  watch/imp {stats.watch_s_per_impression:.1f}s  "
            f"Gini {stats.gini:.3f}  top1% {stats.top1_share:.3f}  coverage {stats.coverage:.3f}  "
            f"fallbacks {stats.fallback_answers}/{stats.sessions}  ({stats.seconds:.1f}s)")

    config = dataclasses.replace(sim_config, days=warmup_days + closed_days)
    t0 = time.perf_counter()
    try:
        result = run_closed_loop(config, open_lake(settings.landing_uri),
                                 recommender(settings, service) if recommender else service,
                                 days=range(warmup_days, warmup_days + closed_days),
                                 after_day=pipeline_hook(settings, retrain_every=retrain_every, on_run=on_run),
                                 report_unwatched=report_unwatched, progress=progress)
    finally:
        service.close()
    return {"warm_up_s": timings, "closed_loop_s": round(time.perf_counter() - t0, 1), "trainings": trainings,
            "days": result.as_dicts()}


# --- part A ------------------------------------------------------------------------------------------


def part_a_feedback_loop(args: argparse.Namespace, sim_config, workdir: Path) -> dict[str, Any]:
    """Feedback-loop curves, exploration off vs on."""
    from recloop.serving import ServingConfig

    can_explore = "explore_share" in {f.name for f in dataclasses.fields(ServingConfig)}
    settings_to_run: dict[str, float | None] = {}
    if args.arms in ("both", "off"):
        settings_to_run["explore_off"] = 0.0 if can_explore else None
    if args.arms in ("both", "on") and can_explore and args.explore_share > 0:
        settings_to_run[f"explore_{args.explore_share:g}"] = args.explore_share
    out: dict[str, Any] = {"explore_supported": can_explore,
                           "open_loop_warm_up": open_loop_reference(sim_config, args.warmup_days)}
    for name, share in settings_to_run.items():
        log(f"part A, {name}: warm-up {args.warmup_days} days, then {args.weeks} closed-loop week(s)")
        out[name] = closed_loop_run(workdir / name, sim_config, args.warmup_days, 7 * args.weeks,
                                    explore_share=share, report_unwatched=args.report_unwatched)
    if not can_explore:
        out["note"] = ("ServingConfig has no explore_share (the serving change is not merged): only the "
                       "exploration-off curve was run")
    return out


# --- part B (the lead wires it once recloop.online and the experiment serving land) -------------------


def part_b_experiment_table(args: argparse.Namespace, sim_config, workdir: Path) -> dict[str, Any]:
    """The experiment table: per seed, a challenger with a known true effect against the champion; the
    measured effect, its interval, the decision (promote / stop / continue) and the days it took.

    To wire it: per seed, `closed_loop_run(..., prepare=register_challenger_with_experiment_alias,
    serving_overrides={"experiment_mode": "ab", "experiment_share": 0.5}, explore_share=0.0)` and read
    `days[*]["by_arm"]` (impressions, CTR, watch time per arm, from the answers' `arm`) next to
    `recloop.online`'s decision after each day's data plane (an `after_day` hook that also runs the
    decision). The true effect is the difference of the arms' CTR under the simulator's ground truth:
    both rankings answered for the same sessions (`recloop.data.closed_loop.run_closed_loop` with a
    platform that asks both versions and responds to each with `Simulator.respond` on a copy)."""
    return {"status": "not wired yet: needs recloop.online and the experiment alias in serving"}


# --- output ------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = result["part_a"]
    runs = {k: v for k, v in part.items() if isinstance(v, dict) and "days" in v}
    metrics = (("gini", "Gini of impressions per video"), ("top1_share", "share of the top 1 % of videos"),
               ("coverage", "catalog coverage"), ("ctr", "CTR (watched / impression)"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    warm = part["open_loop_warm_up"]
    for ax, (key, title) in zip(axes.flat, metrics):
        ax.plot([d["day"] for d in warm], [d[key] for d in warm], "k--", label="open loop (warm-up)")
        for name, run in runs.items():
            ax.plot([d["day"] for d in run["days"]], [d[key] for d in run["days"]], marker="o", ms=3, label=name)
        for week in range(1, result["config"]["weeks"] + 1):
            ax.axvline(result["config"]["warmup_days"] + 7 * week - 0.5, color="grey", lw=0.5)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("simulated day (vertical lines: retraining)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Closed loop: what the platform served, day by day")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(part_a: dict[str, Any]) -> dict[str, Any]:
    """First and last closed-loop day of each run, and the open-loop warm-up's mean, side by side."""
    keys = ("ctr", "watch_s_per_impression", "gini", "top1_share", "coverage")
    warm = part_a["open_loop_warm_up"]
    out: dict[str, Any] = {"open_loop_mean": {k: round(sum(d[k] for d in warm) / len(warm), 4) for k in keys}}
    for name, run in part_a.items():
        if isinstance(run, dict) and run.get("days"):
            days = run["days"]
            out[name] = {"first_day": {k: days[0][k] for k in keys}, "last_day": {k: days[-1][k] for k in keys},
                         "fallback_share": round(sum(d["fallback_answers"] for d in days)
                                                 / max(1, sum(d["sessions"] for d in days)), 4)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup-days", type=int, default=7)
    parser.add_argument("--weeks", type=int, default=2, help="closed-loop weeks (retraining at the end of each)")
    parser.add_argument("--events-per-day", type=int, default=3_000)
    parser.add_argument("--initial-users", type=int, default=1_500)
    parser.add_argument("--initial-videos", type=int, default=800)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--explore-share", type=float, default=0.1, help="the exploration-on setting's share of slots")
    parser.add_argument("--arms", choices=("both", "off", "on"), default="both",
                        help="run exploration off, on, or both (each is a fresh deployment)")
    parser.add_argument("--report-unwatched", action="store_true",
                        help="also send unwatched impressions as feedback (see the docstring)")
    parser.add_argument("--part", choices=("a", "b", "ab"), default="a")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--out", type=Path, default=Path("online_experiment.json"), help="JSON (PNG beside it)")
    args = parser.parse_args()

    os.environ.update(TELEMETRY)
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # Dagster's preview/deprecation notices, once per definitions load
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import torch

    from recloop.data.simulator import SimConfig

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sim_config = SimConfig(seed=args.seed, days=args.warmup_days + 7 * args.weeks,
                           initial_users=args.initial_users, initial_videos=args.initial_videos,
                           new_users_per_day=max(1, args.initial_users // 50),
                           new_videos_per_day=max(1, args.initial_videos // 40),
                           events_per_day=args.events_per_day, n_creators=max(20, args.initial_videos // 8))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recloop-online-bench-"))
    started = time.perf_counter()
    result: dict[str, Any] = {"config": {**{k: str(v) if k == "start" else v
                                            for k, v in dataclasses.asdict(sim_config).items()},
                                         "warmup_days": args.warmup_days, "weeks": args.weeks,
                                         "explore_share": args.explore_share, "report_unwatched": args.report_unwatched,
                                         "cpu_count": os.cpu_count()}}
    try:
        if "a" in args.part:
            result["part_a"] = part_a_feedback_loop(args, sim_config, workdir)
            result["summary"] = summarise(result["part_a"])
        if "b" in args.part:
            result["part_b"] = part_b_experiment_table(args, sim_config, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    if "part_a" in result:
        plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "part_a"}, indent=2, default=str))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

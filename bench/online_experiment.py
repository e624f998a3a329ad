"""Online benchmark: what serving its own recommendations does to a platform (part A), and how online
experiments decide (part B: `part_b_experiment_table`).

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

Part B, online experiments with known true effects (`part_b_experiment_table`): a strong model (trained
on the whole warm-up) and a weak one (`--weak-train-days`, the newest days only) of one registry; their
true effect measured by letting each serve the same simulated sessions alone; then per replicate (its own
window of `--horizon` simulated days, a fresh experiment id and user split) three experiments: `better`
(weak champion, strong challenger), `worse` (the reverse), `equal` (the strong bundle registered again,
an A/A test), served by the in-process service in `--mode` ab | interleave | both, with
`recloop.online.decide_online` looking every simulated day until a final outcome or the horizon. The
table: true effect, measured effect and 95 % interval at the decision, decision, days to decide; the
summary counts promotions of the better model (power), stops of the worse one, and false promotions of
an equal or worse model. `--min-users-per-arm`, `--min-impressions-per-arm`, `--min-decided-requests`
set the DecisionConfig minimums (defaults: the rule's defaults; `--quick` lowers them for its tiny days).

Prints one JSON object and writes it to `--out` with a PNG of the curves beside it (part B:
`<out>_experiments.png`, the effects with their intervals per run, coloured by decision).

    python bench/online_experiment.py                       # 7 warm-up days, 2 closed-loop weeks
    python bench/online_experiment.py --weeks 1 --events-per-day 2000
    python bench/online_experiment.py --part b             # part B: 3 replicates x 3 pairs, A/B, horizon 7
    python bench/online_experiment.py --part b --mode both # ... and each also interleaved
    python bench/online_experiment.py --part b --quick     # smoke test (about 2 minutes)

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


# --- part B: online experiments with known true effects ---------------------------------------------

PAIRS = ("better", "worse", "equal")


class CapturePlatform:
    """The in-process service for part B's experiment days: every answer is kept (request_id, experiment,
    arm and propensity per item) and joined with the simulated users' response to it (`report_unwatched`:
    every impression comes back as feedback with its outcome), giving the outcome rows
    `recloop.online.decide_online` reads. The feedback is not passed on and no data plane runs: both
    models stay fixed during an experiment, and the runs of a pair do not feed each other. (The same
    rows through the impressions log, the data plane's join and `silver/impression_outcomes` are tested
    in tests/; here only the decision is measured.)"""

    def __init__(self, service: Any) -> None:
        from recloop.data.closed_loop import ServicePlatform

        self.inner = ServicePlatform(service)
        self.answers: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.day = ""

    def recommend(self, user_id: str, k: int, context: Any, surface: str) -> dict[str, Any]:
        answer = self.inner.recommend(user_id, k, context, surface)
        self.answers[answer["request_id"]] = answer
        return answer

    def feedback(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            answer = self.answers[e["request_id"]]
            item = next(it for it in answer["items"] if it["video_id"] == e["video_id"])
            self.rows.append({
                "impression_id": f"{e['request_id']}-{item['position']}", "request_id": e["request_id"],
                "user_id": e["user_id"], "video_id": e["video_id"], "experiment": answer["experiment"],
                "arm": item.get("arm") or answer["arm"], "propensity": item.get("propensity", 1.0),
                "explored": bool(item.get("explored")), "fallback": bool(answer.get("fallback")),
                "model_version": answer.get("model_version"), "watched_s": e["watched_s"],
                "completed": e["completed"], "liked": e["liked"], "day": self.day})

    def model_version(self) -> str | None:
        return self.inner.model_version()

    def set_clock(self, at_us: int) -> None:
        self.inner.set_clock(at_us)

    def end_of_day(self) -> None:
        self.answers.clear()  # every answer of the day has had its feedback
        self.inner.end_of_day()

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def serve_days(service, sim_config, days: list[int]):
    """Serve `days` (one fresh simulator: the same sessions and response draws for whatever is served) with
    `service` as it is; the outcome rows as a DataFrame."""
    from recloop.data.closed_loop import run_closed_loop
    from recloop.data.simulator import Simulator

    sim, platform = Simulator(sim_config), CapturePlatform(service)
    for index in days:
        platform.day = sim_config.date_of(index).isoformat()
        run_closed_loop(sim_config, None, platform, days=[index], simulator=sim, report_unwatched=True)
    return platform.frame()


def set_aliases(settings, service, champion: str, experiment: str | None) -> None:
    """Point `champion` (and `experiment`, or remove it) directly, then let the service load them."""
    from recloop.registry import CHAMPION, EXPERIMENT, open_registry

    registry = open_registry(settings)
    registry.client.set_registered_model_alias(registry.model_name, CHAMPION, champion)
    if experiment is None:
        try:
            registry.client.delete_registered_model_alias(registry.model_name, EXPERIMENT)
        except Exception:  # noqa: BLE001 - no alias to remove
            pass
    else:
        registry.client.set_registered_model_alias(registry.model_name, EXPERIMENT, experiment)
    service.refresh()
    if service.model is None or service.model.version != champion or (
            experiment is not None and (service.challenger is None or service.challenger.version != experiment)):
        raise RuntimeError(f"serving did not load champion v{champion} / experiment v{experiment}: {service.last_error}")


def per_request_gap(frame, a: str, b: str) -> dict[str, float]:
    """Served alone on the same sessions (frames of model `a` and `b`, matched by the session's position in
    the day's order): b - a in watch time per impression and CTR, relative to a, with a paired standard
    error over sessions (common random numbers: the same users at the same moments)."""
    import numpy as np

    out: dict[str, float] = {}
    for metric, column in (("watch_time", "watched_s"), ("ctr", "watched")):
        per = {}
        for name in (a, b):
            f = frame[name]
            f = f.assign(watched=(f["watched_s"] > 0).astype(float))
            per[name] = f.groupby(["day", "user_id"]).agg(y=(column, "sum"), n=(column, "size"))
        both = per[a].join(per[b], lsuffix="_a", rsuffix="_b", how="outer").fillna(0.0)
        level_a = both["y_a"].sum() / both["n_a"].sum()
        level_b = both["y_b"].sum() / both["n_b"].sum()
        # delta-method SE of the difference of two ratios over the same (paired) units
        r = (both["y_b"] - level_b * both["n_b"]) / both["n_b"].sum() - (both["y_a"] - level_a * both["n_a"]) / both["n_a"].sum()
        k = len(both)
        se = float(np.sqrt(k / max(1, k - 1) * (r**2).sum()))
        out[f"{metric}_a"] = round(float(level_a), 5)
        out[f"{metric}_b"] = round(float(level_b), 5)
        out[f"{metric}_abs"] = round(float(level_b - level_a), 5)
        out[f"{metric}_abs_se"] = round(se, 5)
        out[f"{metric}_rel"] = round(float(level_b / level_a - 1.0), 5)
    return out


def part_b_experiment_table(args: argparse.Namespace, sim_config, workdir: Path) -> dict[str, Any]:
    """The experiment table: pairs of models with a known true effect, run as online experiments in the
    closed-loop simulator; the measured effect, its interval, the decision and the days it took.

    1. One warm-up deployment (`warm_up`: open-loop days, data plane, training job): the *strong* model,
       trained on `--warmup-days - 1` days. The training job again with TrainDays = `--weak-train-days`
       (the newest days only): the *weak* model, same code and features, less history. Both are versions of
       the same MLflow registry.
    2. True effects: each model serves alone (champion alias, no experiment) the days of every replicate
       window, the same sessions and the same response draws for both (common random numbers); the
       difference of watch time per impression and CTR, relative to the champion's, is the pair's true
       effect (`better`: weak champion, strong challenger; `worse`: the reverse; `equal`: the strong bundle
       registered again, an A/A test, true effect 0 by construction).
    3. Each pair x replicate: the challenger's bundle is registered again (a fresh version, hence a fresh
       experiment id `exp-v<champion>-v<challenger>` and a fresh A/B split of users), aliases `champion`
       and `experiment` set directly, and the replicate's window of days (replicate r: days `warmup_days +
       r * horizon` onwards: other sessions of the same world) is served by the in-process
       RecommendationService in experiment mode (`--mode`). After each day `decide_online` looks at all
       outcome rows so far; the first final outcome (or the horizon) ends the run.

    Steps 2 and 3 may simulate more impressions a day than the warm-up (`--experiment-events-per-day`,
    default: `--events-per-day`): the same world, more sessions per user. That buys little: the intervals
    are clustered by user, and between-user variance dominates watch time, so power grows with the number
    of users (`--initial-users`, which also grows the warm-up), not with sessions per user (measured:
    10,000 instead of 3,000 a day narrowed the 7-day A/B interval by 13 %, not the 45 % of sqrt(3.3)).

    The outcome rows are built from what was served and how the simulated users responded
    (`CapturePlatform`), not through the data plane: that path is tested elsewhere, and without it a
    look costs milliseconds instead of a data plane run.
    """
    from pipelines.run import instance, run_job
    from recloop.data.closed_loop import run_closed_loop
    from recloop.data.simulator import Simulator
    from recloop.online.decision import DecisionConfig, decide_online
    from recloop.registry import open_registry
    from recloop.serving import RecommendationService

    horizon, replicates = args.horizon, args.replicates
    config = DecisionConfig(max_days=horizon, min_users_per_arm=args.min_users_per_arm,
                            min_impressions_per_arm=args.min_impressions_per_arm,
                            min_decided_requests=args.min_decided_requests, primary_metric=args.metric)
    total_days = args.warmup_days + replicates * horizon
    # The same world (users, videos, arrivals do not depend on events_per_day), more sessions a day.
    world = dataclasses.replace(sim_config, days=total_days,
                                events_per_day=args.experiment_events_per_day or sim_config.events_per_day)
    settings = fresh_deployment(workdir / "part_b")
    log(f"part B: warm-up {args.warmup_days} days (strong model: TrainDays {args.warmup_days - 1})")
    timings = warm_up(settings, sim_config, args.warmup_days)
    registry = open_registry(settings)
    strong = str(registry.champion().version)
    t0 = time.perf_counter()
    weak_run = run_job("training_job", inst=instance(settings), run_config_ops={
        "model__training_set": {"config": {"TrainDays": args.weak_train_days, "TestDays": 1}}})
    weak = (weak_run.materialized.get("model/registered_version") or {}).get("version")
    if weak is None:
        raise RuntimeError(f"the weak model's training failed: {weak_run.error}")
    weak = str(weak)
    weak_trained, strong_trained = weak, strong
    timings["weak_training_s"] = round(time.perf_counter() - t0, 1)
    offline = {v: registry.version_metrics(v) for v in (strong, weak)}
    log(f"part B: strong v{strong}, weak v{weak} (offline gate said: "
        f"{weak_run.check_descriptions.get('model/registered_version:promotion_gate', '')[:160]})")

    modes = ("ab", "interleave") if args.mode == "both" else (args.mode,)
    service = RecommendationService(settings, serving_config(settings, 0.0, experiment_mode=modes[0],
                                                             experiment_share=0.5))
    windows = {r: list(range(args.warmup_days + r * horizon, args.warmup_days + (r + 1) * horizon))
               for r in range(replicates)}
    all_days = [d for r in range(replicates) for d in windows[r]]
    try:
        # 2. true effects: each model alone on every window's sessions
        alone = {}
        t0 = time.perf_counter()
        for name, version in (("weak", weak), ("strong", strong)):
            set_aliases(settings, service, version, None)
            alone[name] = serve_days(service, world, all_days)
            log(f"part B: {name} alone served {len(alone[name])} impressions ({time.perf_counter() - t0:.0f}s)")
        timings["truth_s"] = round(time.perf_counter() - t0, 1)
        overall = per_request_gap(alone, "weak", "strong")
        if overall[f"{args.metric}_abs"] < 0:
            # Less history did not make a weaker model here: the names follow the measured truth.
            log(f"part B: the model trained on fewer days is the better one on {args.metric}: swapped")
            weak, strong = strong, weak
            alone = {"weak": alone["strong"], "strong": alone["weak"]}
            overall = per_request_gap(alone, "weak", "strong")
            swapped = True
        else:
            swapped = False
        truth = {}
        for r, days in windows.items():
            dates = {world.date_of(i).isoformat() for i in days}
            window = {k: f[f["day"].isin(dates)] for k, f in alone.items()}
            gap = per_request_gap(window, "weak", "strong")
            truth[r] = {"better": {k: v for k, v in gap.items() if not k.endswith("_a") and not k.endswith("_b")}}
            truth[r]["worse"] = {k: (-v if k.endswith(("_abs", "_rel")) else v) for k, v in truth[r]["better"].items()}
            truth[r]["worse"].update({"watch_time_rel": round(gap["watch_time_a"] / gap["watch_time_b"] - 1, 5),
                                      "ctr_rel": round(gap["ctr_a"] / gap["ctr_b"] - 1, 5)})
            truth[r]["equal"] = {"watch_time_abs": 0.0, "watch_time_rel": 0.0, "ctr_abs": 0.0, "ctr_rel": 0.0}
            truth[r]["levels"] = {k: v for k, v in gap.items() if k.endswith(("_a", "_b"))}
        # 3. the experiments
        rows = []
        t0 = time.perf_counter()
        for mode, r, pair in ((mode, r, pair) for mode in modes for r in windows for pair in PAIRS):
            days = windows[r]
            service.config = dataclasses.replace(service.config, experiment_mode=mode)
            champion, challenger_of = {"better": (weak, strong), "worse": (strong, weak),
                                       "equal": (strong, strong)}[pair]
            run_id = registry.client.get_model_version(registry.model_name, challenger_of).run_id
            challenger = registry.register(run_id)
            set_aliases(settings, service, champion, challenger)
            exp_id = service.experiment
            started = world.date_of(days[0]).isoformat()
            sim, platform = Simulator(world), CapturePlatform(service)
            decision = None
            for index in days:
                platform.day = world.date_of(index).isoformat()
                run_closed_loop(world, None, platform, days=[index], simulator=sim, report_unwatched=True)
                frame = platform.frame()
                frame = frame[frame["experiment"] == exp_id]
                decision = decide_online(frame, started=started, as_of=platform.day, config=config,
                                         mode=mode, catalog_size=sim.catalog_size(sim.day_start_us(index)))
                if decision.final:
                    break
            e = decision.effect
            level = decision.arms["champion"].metric(args.metric).value if mode == "ab" else None
            true = truth[r][pair]
            rows.append({
                "pair": pair, "replicate": r, "mode": mode, "experiment": exp_id,
                "champion": champion, "challenger": challenger, "challenger_bundle_of": challenger_of,
                "true_rel": true[f"{args.metric}_rel"], "true_abs": true[f"{args.metric}_abs"],
                "true_abs_se": true.get(f"{args.metric}_abs_se", 0.0), "true_ctr_rel": true["ctr_rel"],
                "metric": decision.metric, "measured": round(e.value, 5), "low": round(e.low, 5),
                "high": round(e.high, 5),
                "measured_rel": round(e.value / level, 5) if level else None,
                "low_rel": round(e.low / level, 5) if level else None,
                "high_rel": round(e.high / level, 5) if level else None,
                "p_value": round(decision.p_value, 5), "decision": decision.outcome,
                "days_to_decide": decision.days_elapsed if decision.final else None,
                "days_run": decision.days_elapsed,
                "impressions": {a: x.impressions for a, x in decision.arms.items()},
                "users": {a: x.users for a, x in decision.arms.items()},
                "reason": decision.reasons[0]})
            x = rows[-1]
            log(f"part B: {mode:10s} {pair:6s} r{r} {x['decision']:18s} day {x['days_run']:2d}  true {x['true_rel']:+.3f}  "
                f"measured {x['measured']:+.4g} [{x['low']:+.4g}, {x['high']:+.4g}]  p {x['p_value']:.3g}  "
                f"({time.perf_counter() - t0:.0f}s)")
        timings["experiments_s"] = round(time.perf_counter() - t0, 1)
    finally:
        service.close()
    train_days = {v: d for v, d in ((weak_trained, args.weak_train_days), (strong_trained, args.warmup_days - 1))}
    return {"experiment_events_per_day": world.events_per_day,
            "versions": {"strong": strong, "weak": weak, "strong_train_days": train_days[strong],
                         "weak_train_days": train_days[weak], "swapped_by_truth": swapped},
            "offline": {name: {k: round(v, 5) for k, v in offline[v].items() if "ndcg" in k.lower()}
                        for name, v in (("strong", strong), ("weak", weak))},
            "decision_config": dataclasses.asdict(config), "mode": args.mode, "horizon": horizon,
            "replicates": replicates, "windows": {r: [world.date_of(d).isoformat() for d in (ds[0], ds[-1])]
                                                  for r, ds in windows.items()},
            "true_effect_all_windows": overall, "truth": truth, "rows": rows,
            "summary": summarise_b(rows), "timings": timings}


def summarise_b(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode and pair: runs, promotions, stops, no decision, days to decide; power and false promotions."""
    return {mode: _summary_of([r for r in rows if r["mode"] == mode]) for mode in dict.fromkeys(r["mode"] for r in rows)}


def _summary_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in PAIRS:
        mine = [r for r in rows if r["pair"] == pair]
        if not mine:
            continue
        decided = [r["days_to_decide"] for r in mine if r["decision"] in ("promote", "stop_worse")]
        out[pair] = {"runs": len(mine), **{o: sum(r["decision"] == o for r in mine)
                                           for o in ("promote", "stop_worse", "stop_no_difference", "continue")},
                     "mean_true_rel": round(sum(r["true_rel"] for r in mine) / len(mine), 4),
                     "mean_days_to_decide": round(sum(decided) / len(decided), 2) if decided else None,
                     "max_days_to_decide": max(decided) if decided else None}
    better, worse, equal = (out.get(p, {}) for p in PAIRS)
    out["power_promote_better"] = f"{better.get('promote', 0)}/{better.get('runs', 0)}"
    out["stop_worse_rate"] = f"{worse.get('stop_worse', 0)}/{worse.get('runs', 0)}"
    out["false_promotions"] = f"{worse.get('promote', 0) + equal.get('promote', 0)}/{worse.get('runs', 0) + equal.get('runs', 0)}"
    out["false_stops_of_equal"] = f"{equal.get('stop_worse', 0)}/{equal.get('runs', 0)}"
    return out


def plot_b(part: dict[str, Any], path: Path) -> None:
    """Per mode: the measured effect with its 95 % interval at the decision, per run (colour: decision;
    label: days run); A/B relative to the champion with the true effect marked, interleaving as win share
    - 0.5 (its true A/B effect written under the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"promote": "tab:green", "stop_worse": "tab:red", "stop_no_difference": "tab:grey",
               "continue": "tab:orange"}
    modes = list(dict.fromkeys(r["mode"] for r in part["rows"]))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7, 0.55 * len(part["rows"]) / len(modes) + 2), 4.5 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in part["rows"] if r["mode"] == mode]
        rel = mode == "ab"
        for i, r in enumerate(rows):
            y, lo, hi = (r["measured_rel"], r["low_rel"], r["high_rel"]) if rel else (r["measured"], r["low"], r["high"])
            ax.errorbar([i], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=colours.get(r["decision"], "k"), capsize=3)
            if rel:
                ax.plot([i - 0.3, i + 0.3], [r["true_rel"]] * 2, "k-", lw=2)
            ax.annotate(f"{r['days_run']}d", (i, hi), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(rows)), [f"{r['pair']} r{r['replicate']}\ntrue {r['true_rel']:+.1%}" for r in rows],
                      fontsize=7)
        ax.set_ylabel(f"relative effect on {rows[0]['metric']}" if rel else "challenger win share - 0.5")
        for name, c in colours.items():
            ax.plot([], [], "o", color=c, label=name)
        if rel:
            ax.plot([], [], "k-", lw=2, label="true effect")
        ax.legend(fontsize=7)
        ax.set_title(f"{mode}: challenger vs champion, 95 % interval at the decision, days run")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--mode", choices=("ab", "interleave", "both"), default="both",
                        help="part B: experiment mode (both: each pair x replicate in A/B and interleaved)")
    parser.add_argument("--replicates", type=int, default=3,
                        help="part B: runs per pair (each on its own window of simulated days, fresh split)")
    parser.add_argument("--horizon", type=int, default=7, help="part B: DecisionConfig.max_days")
    parser.add_argument("--experiment-events-per-day", type=int, default=0,
                        help="part B: impressions a simulated day during the experiments and the truth pass "
                             "(same world: only the number of sessions changes); 0: --events-per-day")
    parser.add_argument("--weak-train-days", type=int, default=2, help="part B: the weak model's TrainDays")
    parser.add_argument("--metric", choices=("watch_time", "ctr"), default="watch_time", help="part B: primary metric")
    parser.add_argument("--min-users-per-arm", type=int, default=100)
    parser.add_argument("--min-impressions-per-arm", type=int, default=1000)
    parser.add_argument("--min-decided-requests", type=int, default=300)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 4 warm-up days, 600 events/day, 1 replicate, horizon 2, small minimums")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--out", type=Path, default=Path("online_experiment.json"), help="JSON (PNG beside it)")
    args = parser.parse_args()
    if args.quick:
        args.warmup_days, args.weeks, args.replicates, args.horizon = 4, 1, 1, 2
        args.events_per_day, args.initial_users, args.initial_videos = 600, 300, 200
        args.min_users_per_arm, args.min_impressions_per_arm, args.min_decided_requests = 20, 100, 30

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
    pngs = []
    if "part_a" in result:
        plot(result, args.out.with_suffix(".png"))
        pngs.append(args.out.with_suffix(".png"))
    if result.get("part_b", {}).get("rows"):
        png = args.out.with_name(args.out.stem + "_experiments.png")
        plot_b(result["part_b"], png)
        pngs.append(png)
    printed = {k: v for k, v in result.items() if k not in ("part_a", "part_b")}
    if "part_b" in result:
        b = result["part_b"]
        printed["part_b"] = {"versions": b["versions"], "true_effect_all_windows": b["true_effect_all_windows"],
                             "table": [{k: r[k] for k in ("pair", "replicate", "mode", "true_rel", "measured_rel",
                                                          "measured", "low", "high", "p_value", "decision",
                                                          "days_to_decide")} for r in b["rows"]],
                             "summary": b["summary"], "timings": b["timings"]}
    print(json.dumps(printed, indent=2, default=str))
    log(f"wrote {args.out}" + "".join(f" and {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

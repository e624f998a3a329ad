"""Closed-loop scenario benchmark: the monitoring loop as Dagster runs it, one simulated scenario at a time.

For every scenario: 8 stationary days through the data plane, a champion trained on days 0-6 (day 7
held out), then the monitored days one at a time, as a deployment runs them: the day's data plane job
(which ends with its drift report), then one tick of the drift sensor, whose retraining runs execute in
process and meet the promotion gate. A local receiver takes the signed webhooks. Printed as JSON, per
scenario: the first drifted day, the day drift was first reported, detection delay in days, false
alarms (drift reported on a stationary day), drift alerts, retraining runs started, promoted, refused.

    python bench/drift_scenarios.py                                 # stationary (20 days) + 4 drifts
    python bench/drift_scenarios.py --scenarios device_shift --drifted-days 2

The 8 stationary days and the first champion are the same for every scenario (the simulator's days
before the drift day do not depend on the scenario), so they are built once and copied.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DAGSTER_DISABLE_TELEMETRY": "true",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(key, value)

DRIFTS = ("category_surge", "new_user_wave", "device_shift", "watch_time_inflation")
BASE_DAYS = 8  # 7 training days + 1 held out for the first champion's evaluation


def _sim(args: argparse.Namespace, scenario: str, days: int):
    from recloop.data.simulator import SimConfig

    return SimConfig(seed=args.seed, days=days, events_per_day=args.events_per_day,
                     initial_users=args.initial_users, initial_videos=args.initial_videos,
                     scenario=scenario, drift_day=BASE_DAYS)


def _fresh_instance(home: Path):
    """The Dagster instance of `home` (the process-wide one is bound to DAGSTER_HOME at first use)."""
    import dagster as dg

    from pipelines.run import dagster_home
    from recloop.config import Settings

    os.environ["RECLOOP_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    settings = Settings.from_env()
    dagster_home(settings)
    return settings, dg.DagsterInstance.from_config(str(home / "dagster"))


def build_base(args: argparse.Namespace, home: Path) -> dict:
    from pipelines.run import run_job
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake

    settings, inst = _fresh_instance(home)
    t0 = time.perf_counter()
    simulate(_sim(args, "none", BASE_DAYS), open_lake(settings.landing_uri))
    runs = [run_job("feast_apply_job", inst=inst)]
    runs += [run_job("data_plane_job", partition=_sim(args, "none", 1).date_of(i).isoformat(), inst=inst)
             for i in range(BASE_DAYS)]
    failed = [r.error for r in runs if not r.success]
    if failed:
        raise SystemExit(f"base data plane failed: {failed}")
    train = run_job("training_job", inst=inst,
                    run_config_ops={"model__training_set": {"config": {"TrainDays": 7, "TestDays": 1}}})
    if not train.success:
        raise SystemExit(f"first champion failed: {train.error}")
    inst.dispose()
    return {"seconds": round(time.perf_counter() - t0, 1),
            "champion_ndcg_at_10": train.materialized["model/evaluation"]["ndcg_at_10"]}


def run_scenario(args: argparse.Namespace, scenario: str, base: Path, home: Path) -> dict:
    from pipelines.run import run_job, tick_sensor
    from recloop.alerts import WebhookReceiver, new_secret
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake

    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(base, home)  # back to the path it was built at: the stores keep absolute paths
    monitored = args.stationary_days if scenario == "none" else args.drifted_days
    settings, inst = _fresh_instance(home)
    config = _sim(args, scenario, BASE_DAYS + monitored)
    simulate(config, open_lake(settings.landing_uri))
    secret = new_secret()
    days, t0 = [], time.perf_counter()
    with WebhookReceiver(secret) as receiver:
        os.environ["RECLOOP_ALERT_WEBHOOK_URL"], os.environ["RECLOOP_ALERT_WEBHOOK_SECRET"] = receiver.url, secret
        cursor = None
        for i in range(BASE_DAYS, BASE_DAYS + monitored):
            day = config.date_of(i).isoformat()
            run = run_job("data_plane_job", partition=day, inst=inst)
            drift = run.materialized.get("monitoring/drift", {})
            tick = tick_sensor("drift_retraining_sensor", inst=inst, cursor=cursor)
            cursor = tick.cursor
            days.append({
                "day": day, "drifted_input": scenario != "none" and i >= config.drift_day,
                "run_ok": run.success, "drift_reported": bool(drift.get("drifted")),
                "reasons": drift.get("reasons", []), "episode": drift.get("drift_episode") or None,
                "retrains": [{"run_id": t.run_id, "gate_passed": t.checks.get("model/registered_version:promotion_gate"),
                              "success": t.success} for t in tick.runs],
            })
        alerts = receiver.of_type("drift.detected")
        decisions = {t: len(receiver.of_type(t)) for t in ("model.promoted", "model.refused", "retraining.failed")}
    inst.dispose()
    reported = [d for d in days if d["drift_reported"]]
    first_drifted = config.date_of(config.drift_day).isoformat() if scenario != "none" else None
    first_reported = reported[0]["day"] if reported else None
    retrains = [r for d in days for r in d["retrains"]]
    return {
        "scenario": scenario,
        "monitored_days": monitored,
        "first_drifted_day": first_drifted,
        "first_reported_day": first_reported,
        "detection_delay_days": (
            (date.fromisoformat(first_reported) - date.fromisoformat(first_drifted)).days
            if first_reported and first_drifted else None
        ),
        "false_alarms": sum(1 for d in days if d["drift_reported"] and not d["drifted_input"]),
        "days_reported_drifted": len(reported),
        "drift_alerts": len(alerts),
        "retrains_started": len(retrains),
        "promoted": sum(1 for r in retrains if r["gate_passed"] is True),
        "refused": sum(1 for r in retrains if r["gate_passed"] is False),
        "webhooks": {"drift.detected": len(alerts), **decisions},
        "data_plane_failures": sum(1 for d in days if not d["run_ok"]),
        "first_reasons": reported[0]["reasons"] if reported else [],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _passed_through(args: argparse.Namespace) -> list[str]:
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
            ("stationary_days", "drifted_days", "events_per_day", "initial_users", "initial_videos", "seed")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["none", *DRIFTS], choices=["none", *DRIFTS])
    parser.add_argument("--stationary-days", type=int, default=20, help="monitored days of the stationary run")
    parser.add_argument("--drifted-days", type=int, default=3, help="monitored days of each drift run, from the drift day")
    parser.add_argument("--events-per-day", type=int, default=10_000)
    parser.add_argument("--initial-users", type=int, default=3_000)
    parser.add_argument("--initial-videos", type=int, default=1_200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", help="default: a new temporary folder")
    parser.add_argument("--only", choices=["none", *DRIFTS], help=argparse.SUPPRESS)  # one scenario, on a built base
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from recloop.cli import _quiet_library_warnings

    _quiet_library_warnings()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="recloop-drift-bench-"))
    base, home = work / "base", work / "home"
    if args.only:
        print(json.dumps(run_scenario(args, args.only, base, home)))
        return 0
    out: dict = {"benchmark": "drift_scenarios", "events_per_day": args.events_per_day, "workdir": str(work)}
    out["base"] = build_base(args, home)
    shutil.copytree(home, base)
    # Each scenario in a process of its own: MLflow and Dagster keep connections to the stores they
    # opened, which the next scenario's copy replaces.
    out["scenarios"] = []
    for scenario in args.scenarios:
        cmd = [sys.executable, __file__, "--only", scenario, "--workdir", str(work), *_passed_through(args)]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        out["scenarios"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    ok = all(
        s["false_alarms"] == 0 and s["drift_alerts"] == (0 if s["scenario"] == "none" else 1)
        and s["retrains_started"] == (0 if s["scenario"] == "none" else 1)
        and (s["scenario"] == "none" or s["detection_delay_days"] == 0)
        for s in out["scenarios"]
    )
    out["meets_target"] = ok
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

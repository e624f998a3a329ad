"""Drift separation check: stationary days give no drift decision, every scenario is caught on its first day.

Builds simulated lakes the way the data plane does, without Dagster (simulate → landing → ingestion →
GX validation → feature snapshots), then runs `recloop.drift.detect_drift` with monitoring/drift.yaml:

* stationary (scenario `none`, `--days` days): each day from day 8 on against the 7 days before it, with a
  champion two-tower trained on those 7 days (the champion retrained daily: "rolling"), and against the
  fixed days 1-7 with one champion trained on them ("fixed");
* each drift scenario, switched on at day index `--drift-day` (0-based, as `SimConfig.drift_day`): the
  three days before it and the first two drifted days, each against the 7 days before it with a champion
  trained on them. The days before the drift are the stationary world's days (the simulator guarantees
  it), so they count as false alarms too.

Prints one JSON object: per mode the false alarms; per column and signal the largest statistic over the
stationary comparisons (all, rolling, fixed) and its threshold; per scenario the first detection, the
false alarms before the drift, the reasons on the first drifted day and, per column and signal,
[stationary max, first drifted day]. Takes about five minutes on 2 cores.

    python bench/drift_separation.py                    # 20k impressions a day
    python bench/drift_separation.py --events-per-day 10000 --no-champion
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(key, value)

SCENARIOS = ("category_surge", "new_user_wave", "device_shift", "watch_time_inflation")
WINDOW = 7


def build_lake(config, root: Path):
    """Simulate `config` into a landing zone under `root` and run ingestion, validation and features for
    every day into the lake under `root`. Returns the lake and the day partitions."""
    from recloop.config import Settings
    from recloop.data.schemas import TABLE_ORDER
    from recloop.data.simulator import simulate
    from recloop.features import compute_features
    from recloop.ingestion import ingest_partition
    from recloop.lake import LocalLake
    from recloop.validation import validate_partition

    landing, lake = LocalLake(root / "landing"), LocalLake(root / "lake")
    simulate(config, landing)
    expectations = Settings().expectations_dir
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    for day in days:
        for table in TABLE_ORDER:
            ingest_partition(table, day, landing=landing, lake=lake)
            validate_partition(lake, table, day, expectations_dir=expectations)
        compute_features(lake, day)
    return lake, days


class Champions:
    """Two-tower champions trained on reference windows (none with `enabled=False`), one per world and
    window: a scenario's window before its drift day is the stationary world's and reuses its champion."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds = 0.0
        self._models: dict[tuple[str, tuple[str, ...]], object] = {}

    @property
    def trained(self) -> int:
        return len(self._models)

    def for_window(self, world: str, lake, partitions: list[str]):
        if not self.enabled:
            return None
        key = (world, tuple(partitions))
        if key not in self._models:
            from recloop.training import TwoTowerConfig, load_window, train_two_tower

            t0 = time.perf_counter()
            self._models[key] = train_two_tower(load_window(lake, partitions), TwoTowerConfig(num_threads=1))
            self.seconds += time.perf_counter() - t0
        return self._models[key]


def statistics(result) -> dict[str, float]:
    """Every tested column's and computed signal's statistic of one result."""
    out = {c.column: c.statistic for c in result.columns if c.tested}
    out.update({s.name: s.statistic for s in result.signals.values() if s.computed})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=20, help="stationary days")
    parser.add_argument("--events-per-day", type=int, default=20_000)
    parser.add_argument("--drift-day", type=int, default=10, help="0-based index of the first drifted day")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", help="drift config (default monitoring/drift.yaml)")
    parser.add_argument("--no-champion", action="store_true", help="skip the champion-dependent signals")
    parser.add_argument("--workdir", help="where the lakes go and stay (default: a temporary folder)")
    args = parser.parse_args()
    if args.drift_day < WINDOW + 3:
        parser.error(f"--drift-day must be >= {WINDOW + 3}: three stationary days with a full window first")

    import torch

    torch.set_num_threads(1)
    from recloop.data.simulator import SimConfig
    from recloop.drift import DriftConfig, detect_drift

    config = DriftConfig.load(args.config)
    champions = Champions(enabled=not args.no_champion)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recloop-drift-separation-"))
    started = time.perf_counter()

    def world(scenario: str, days: int, drift_day: int):
        sim = SimConfig(seed=args.seed, days=days, events_per_day=args.events_per_day, scenario=scenario,
                        drift_day=drift_day)
        return build_lake(sim, workdir / scenario)

    def check(lake, day: str, reference: list[str], champion):
        return detect_drift(lake, day, reference, config=config, champion=champion, write_report=False)

    # --- stationary ------------------------------------------------------------------------------------
    lake, days = world("none", args.days, 0)
    modes: dict[str, list] = {"rolling": [], "fixed": []}
    fixed_champion = champions.for_window("none", lake, days[:WINDOW])
    for i in range(WINDOW, len(days)):
        window = days[i - WINDOW : i]
        modes["rolling"].append(check(lake, days[i], window, champions.for_window("none", lake, window)))
        modes["fixed"].append(check(lake, days[i], days[:WINDOW], fixed_champion))
    mode_max: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    for mode, results in modes.items():
        for result in results:
            for name, value in statistics(result).items():
                mode_max[mode][name] = max(mode_max[mode].get(name, -math.inf), value)
    stationary_max = {name: max(m[name] for m in mode_max.values()) for name in mode_max["fixed"]}
    rules = {**config.columns, **config.signals}
    out: dict = {
        "benchmark": "drift_separation",
        "events_per_day": args.events_per_day,
        "seed": args.seed,
        "reference_days": WINDOW,
        "champion": champions.enabled,
        "stationary": {
            mode: {
                "comparisons": len(results),
                "false_alarms": sum(r.drifted for r in results),
                "false_alarm_reasons": {r.partition: r.reasons for r in results if r.drifted},
            }
            for mode, results in modes.items()
        },
        "stationary_max": {
            name: {"max": round(value, 4), "rolling_max": round(mode_max["rolling"][name], 4),
                   "fixed_max": round(mode_max["fixed"][name], 4), "threshold": rules[name].threshold,
                   "alert": rules[name].alert, "max_over_threshold": round(value / rules[name].threshold, 3)}
            for name, value in stationary_max.items()
        },
        "scenarios": {},
    }

    # --- scenarios ----------------------------------------------------------------------------------------
    for scenario in SCENARIOS:
        lake, days = world(scenario, args.drift_day + 2, args.drift_day)
        results = []
        for i in range(args.drift_day - 3, args.drift_day + 2):
            window = days[i - WINDOW : i]
            trained_on = scenario if i > args.drift_day else "none"  # the window holds a drifted day
            results.append((i, check(lake, days[i], window, champions.for_window(trained_on, lake, window))))
        first_day = next(r for i, r in results if i == args.drift_day)
        detected = [r.partition for i, r in results if i >= args.drift_day and r.drifted]
        first_stats = statistics(first_day)
        out["scenarios"][scenario] = {
            "drift_day": days[args.drift_day],
            "first_detection": detected[0] if detected else None,
            "detected_on_first_day": first_day.drifted,
            "false_alarms_before": sum(r.drifted for i, r in results if i < args.drift_day),
            "reasons_first_day": first_day.reasons,
            "stationary_max_vs_first_day": {
                name: [round(stationary_max.get(name, math.nan), 4), round(value, 4)]
                for name, value in first_stats.items()
            },
        }

    out["champions_trained"] = champions.trained
    out["champion_training_seconds"] = round(champions.seconds, 1)
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.workdir:
        out["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out["ok"] = all(m["false_alarms"] == 0 for m in out["stationary"].values()) and all(
        s["detected_on_first_day"] and s["false_alarms_before"] == 0 for s in out["scenarios"].values()
    )
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

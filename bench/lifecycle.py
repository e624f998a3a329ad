"""Lifecycle benchmark: how cost grows with the number of events.

The whole lifecycle, simulate → ingest → validate → features → Feast → train → evaluate → register →
gate, on a fresh RECLOOP_HOME with the embedded default (local Parquet lake, DuckDB features, SQLite
Feast online store and file registry, SQLite MLflow). It calls the plain functions the Dagster assets
call (`recloop.lifecycle`, `recloop.model_plane`), in the order the jobs run them: the data plane as the
history job does for a range of days (`history_job`: ingest_range → check_schema_range → validate_range
→ join_served_range → compute_features_range → feast apply → materialize the newest snapshot), then the
training job (training_set → two_tower → ann_index → ranker → evaluation → registered_version →
promotion_gate → champion). Not through Dagster itself: its run storage and event log would add their
own cost to every stage, and what is measured here is the platform's work.

How the data grows: the simulator's population grows with the events (a bigger platform has more users
and a bigger catalog, not more events per user): N events are 10 days x N/10 impressions, with
N/50 initial users and N/100 initial videos (+1 % of each per day), the proportions of
bench/data_plane.py at 1M (20k users, 10k videos). The training window is the lifecycle's default (7
days, 1 held out), so it grows with the events too.

Per stage: seconds, peak memory (the process tree's RSS sampled every 250 ms by psutil, reset per stage,
and the kernel's high-water marks: this process's VmHWM, reset per stage through /proc/self/clear_refs,
and the largest child's ru_maxrss), rows, events/s, and the load average at the start and end (the
machine may be shared: timings are inflated by other work). The JSON is rewritten after every stage
(`--out`), so a run that is stopped leaves what it measured.

    python bench/lifecycle.py --events 1000000 --out /tmp/lc-1M.json
    python bench/lifecycle.py --sizes 1M,10M --keep /work/bench-homes    # each size in its own process, + PNG
    python bench/lifecycle.py --combine /tmp/lc-1M.json /tmp/lc-10M.json --png /tmp/lc.png

Targets (2 cores): 1M ≤ 5 minutes; 10M ≤ 10x the 1M time; peak memory ≤ 8 GB at 10M. The growth exponent
of a stage between two sizes is log(t_big / t_small) / log(size ratio): 1 is linear.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _util import PeakRSS  # noqa: E402 - bench/ is on sys.path when run as a script

for key, value in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "FEAST_USAGE": "False",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DAGSTER_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

DAYS = 10
TARGET_1M_SECONDS = 300.0
TARGET_GROWTH = 10.0
TARGET_PEAK_MB_10M = 8192
# The brief's stage names over the measured steps.
GROUPS = {
    "simulate": ["simulate"], "ingest": ["ingest"], "validate": ["validate"], "features": ["features"],
    "feast": ["feast_apply", "materialize"],
    "train": ["training_set", "two_tower", "ann_index", "ranker"],
    "evaluate": ["evaluate"], "register": ["register"], "gate": ["gate"],
}


def _reset_hwm() -> bool:
    """Resets this process's kernel peak RSS (VmHWM) — Linux's clear_refs "5"."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (f"{n // 1000}k" if n % 1000 == 0 else str(n))


def sim_config(events: int, seed: int = 7) -> Any:
    from recloop.data.simulator import SimConfig

    users, videos = max(1000, events // 50), max(500, events // 100)
    return SimConfig(seed=seed, days=DAYS, events_per_day=events // DAYS, initial_users=users, initial_videos=videos,
                     new_users_per_day=max(100, users // 100), new_videos_per_day=max(60, videos // 100))


def run(events: int, home: Path, out_path: Path | None) -> dict[str, Any]:
    """One size through the lifecycle; returns (and rewrites `out_path` after each stage with) the JSON."""
    os.environ["RECLOOP_HOME"] = str(home)
    os.environ["RECLOOP_FEAST_PROJECT"] = "bench"
    for var in ("RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_LAKE_URI", "RECLOOP_LANDING_URI", "RECLOOP_ONLINE_EXPERIMENTS"):
        os.environ.pop(var, None)

    from recloop import lifecycle
    from recloop.config import Settings
    from recloop.data.simulator import simulate
    from recloop.lake import open_lake
    from recloop.model_plane import workdir_for
    from recloop.registry import open_registry

    settings = Settings.from_env()
    landing, lake = open_lake(settings.landing_uri), open_lake(settings.lake_uri)
    config = sim_config(events)
    first, last = config.date_of(0).isoformat(), config.date_of(config.days - 1).isoformat()
    workdir = workdir_for(settings)
    run_id = "bench-lifecycle"
    out: dict[str, Any] = {
        "benchmark": "lifecycle", "events_asked": events, "size": label(events), "days": config.days,
        "sim": {"events_per_day": config.events_per_day, "initial_users": config.initial_users,
                "initial_videos": config.initial_videos, "new_users_per_day": config.new_users_per_day,
                "new_videos_per_day": config.new_videos_per_day},
        "home": str(home), "cpus": os.cpu_count(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": {}, "complete": False,
    }
    hwm_resettable = _reset_hwm()

    def save() -> None:
        if out_path is not None:
            out_path.write_text(json.dumps(out, indent=2, default=str))

    def stage(name: str, fn, rows=None) -> Any:
        rss.reset()
        start_mb = rss.peak / 2**20
        _reset_hwm()
        load0 = os.getloadavg()
        c0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {out['size']} {name} ...", file=sys.stderr, flush=True)
        code = code_version()
        result = fn()
        seconds = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        entry = {"seconds": round(seconds, 2),
                 "cpu_seconds": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
                 "rss_start_mb": round(start_mb),
                 "peak_rss_mb": round(rss.peak / 2**20),
                 "max_rss_mb_kernel": round(_hwm_mb()),
                 "children_max_rss_mb_kernel": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                 "loadavg_start": [round(x, 2) for x in load0],
                 "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                 "code": code}
        if rows is not None:
            entry.update(rows(result))
        out["stages"][name] = entry
        print(f"    {name}: {entry['seconds']} s, peak {entry['peak_rss_mb']} MB", file=sys.stderr, flush=True)
        save()
        return result

    with PeakRSS(children=True, interval=0.25) as rss:
        started = time.perf_counter()
        summary = stage("simulate", lambda: simulate(config, landing),
                        lambda s: {"rows": s.totals["events"], "users": s.totals["users"], "videos": s.totals["videos"]})
        out["events"], out["users"], out["videos"] = summary.totals["events"], summary.totals["users"], summary.totals["videos"]
        ingestion = stage("ingest", lambda: lifecycle.ingest_range(landing, lake, first, last),
                          lambda r: {"rows": r.summary()["events"]["rows"]})

        def validate() -> Any:
            schema = lifecycle.check_schema_range(lake, ingestion, expectations_dir=settings.expectations_dir, run_id=run_id)
            if not schema.passed:
                raise RuntimeError(f"schema check failed: {schema.description}")
            outcome = lifecycle.validate_range(lake, ingestion, expectations_dir=settings.expectations_dir,
                                               max_quarantine_rate=settings.max_quarantine_rate, run_id=run_id)
            if not outcome.passed:
                raise RuntimeError(f"validation failed: {outcome.problem}")
            lifecycle.join_served_range(lake, first, last)
            return outcome

        validated = stage("validate", validate, lambda v: {"rows": v.results["events"].ingested,
                                                           "accepted": v.results["events"].accepted,
                                                           "quarantined": v.results["events"].quarantined})
        del ingestion, validated
        stage("features", lambda: lifecycle.compute_features_range(lake, first, last),
              lambda f: {"rows": sum(f["rows"].values()), "snapshot_days": f["snapshot_days"]})
        stage("feast_apply", lambda: lifecycle.apply_feature_repo(settings))
        stage("materialize", lambda: lifecycle.materialize_online(settings, [last], lake=lake),
              lambda m: {"rows": m["rows_written"]})

        stage("training_set", lambda: lifecycle.build_training_set(settings, lake, workdir),
              lambda t: {"rows": t["rows"], "users": t["users"], "videos": t["videos"], "positives": t["positives"]})
        from recloop import model_plane

        stage("two_tower", lambda: model_plane.train_retrieval(lake, workdir),
              lambda t: {"rows": t["examples"], "samples_per_s": t["samples_per_s"]})
        stage("ann_index", lambda: model_plane.build_ann_index(workdir),
              lambda a: {"rows": a["size"], "recall_at_100_vs_exact": a.get("recall_at_100_vs_exact")})
        stage("ranker", lambda: lifecycle.train_ranking(settings, workdir, project=settings.feast_project),
              lambda r: {"rows": r["train_rows"], "valid_ndcg_at_10": r["valid_ndcg_at_10"],
                         "breakdown": fit_breakdown(workdir)})
        registry = open_registry(settings)
        stage("evaluate", lambda: lifecycle.evaluate_candidate(lake, registry, workdir, settings=settings,
                                                               project=settings.feast_project),
              lambda e: {"rows": e["users_evaluated"], "ndcg_at_10": e["ndcg_at_10"],
                         "recall_at_10_vs_popularity": e["recall_at_10_vs_popularity"],
                         "breakdown": evaluation_breakdown(workdir)})
        stage("register", lambda: lifecycle.register_candidate(registry, workdir), lambda r: {"version": r["version"]})

        def gate() -> dict[str, Any]:
            outcome = lifecycle.check_gate(registry, workdir, config=lifecycle.gate_config(), run_id=run_id)
            promoted = None
            if outcome.passed:
                promoted = lifecycle.promote_candidate(registry, workdir, config=lifecycle.gate_config(),
                                                       run_id=run_id).version
            return {"promote": outcome.passed, "promoted": promoted, "reason": outcome.summary()["reasons"][0]}

        stage("gate", gate, lambda g: g)
        total = time.perf_counter() - started

    out["total_seconds"] = round(total, 1)
    out["total_cpu_seconds"] = round(sum(e["cpu_seconds"] for e in out["stages"].values()), 1)
    out["events_per_s_end_to_end"] = round(out["events"] / total)
    for entry in out["stages"].values():
        entry["events_per_s"] = round(out["events"] / entry["seconds"]) if entry["seconds"] else None
    out["groups"] = group_stages(out["stages"])
    out["peak_rss_mb"] = max(e["peak_rss_mb"] for e in out["stages"].values())
    out["max_rss_mb_kernel"] = max(e["max_rss_mb_kernel"] for e in out["stages"].values())
    out["hwm_reset_per_stage"] = hwm_resettable
    out["complete"] = True
    out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return out


def code_version() -> str:
    """The commit of the code a stage imports (modules load lazily, at their stage), "+dirty" with changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "recloop"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def fit_breakdown(workdir: Path) -> dict[str, Any]:
    """Seconds of the ranker stage's steps (`fit_report.json`): L2 tuning, validation lists, each fold, the
    LightGBM ranker, the final sources."""
    from recloop.model_plane import FIT_REPORT

    report = json.loads((Path(workdir) / FIT_REPORT).read_text())
    out = dict(report.get("seconds", {}))
    for fold in report.get("folds", []):
        out[f"fold {fold['name']}"] = fold["seconds"]
    return out


def evaluation_breakdown(workdir: Path) -> dict[str, Any]:
    """Seconds per recommender of the evaluation (`evaluation.json`): tuning (fit) and recommending."""
    from recloop.model_plane import EVALUATION

    result = json.loads((Path(workdir) / EVALUATION).read_text())["result"]
    out = {"catalog_size": result.get("catalog_size"), "users_evaluated": result.get("users_evaluated")}
    for name, r in result["recommenders"].items():
        out[name] = {"recommend": (r.get("seconds") or {}).get("recommend"),
                     **({"tuning": r["tuning"].get("seconds")} if isinstance(r.get("tuning"), dict) else {})}
    return out


def group_stages(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The brief's stages (`GROUPS`) over the measured ones; a group is there once all of its steps are."""
    out = {}
    for group, names in GROUPS.items():
        parts = [stages[n] for n in names if n in stages]
        if parts and len(parts) == len(names):
            out[group] = {"seconds": round(sum(p["seconds"] for p in parts), 2),
                          "cpu_seconds": round(sum(p.get("cpu_seconds", 0.0) for p in parts), 1),
                          "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
                          "max_rss_mb_kernel": max(p["max_rss_mb_kernel"] for p in parts)}
    return out


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth exponents between consecutive sizes and the targets."""
    results = sorted(results, key=lambda r: r["events_asked"])
    for r in results:  # figures of runs recorded before these fields were
        if r.get("complete"):
            r.setdefault("total_cpu_seconds", round(sum(e.get("cpu_seconds", 0.0) for e in r["stages"].values()), 1))
            r["max_rss_mb_kernel"] = max(e["max_rss_mb_kernel"] for e in r["stages"].values())
    out: dict[str, Any] = {"benchmark": "lifecycle", "sizes": {r["size"]: r for r in results}, "growth": {}}
    for small, big in zip(results, results[1:]):
        ratio = (big.get("events") or big["events_asked"]) / (small.get("events") or small["events_asked"])
        g: dict[str, Any] = {"events_ratio": round(ratio, 3), "stages": {}, "groups": {}}
        for kind in ("stages", "groups"):
            a, b = ((r.get("stages") or {}) if kind == "stages" else group_stages(r["stages"]) for r in (small, big))
            for name in a:
                if name in b and a[name]["seconds"] > 0 and b[name]["seconds"] > 0:
                    g[kind][name] = {
                        "seconds_ratio": round(b[name]["seconds"] / a[name]["seconds"], 2),
                        "time_exponent": round(math.log(b[name]["seconds"] / a[name]["seconds"]) / math.log(ratio), 2),
                        **({"cpu_seconds_ratio": round(b[name]["cpu_seconds"] / a[name]["cpu_seconds"], 2),
                            "cpu_time_exponent": round(math.log(b[name]["cpu_seconds"] / a[name]["cpu_seconds"])
                                                       / math.log(ratio), 2)}
                           if a[name].get("cpu_seconds") and b[name].get("cpu_seconds") else {}),
                        "memory_exponent": round(math.log(max(b[name]["peak_rss_mb"], 1) / max(a[name]["peak_rss_mb"], 1))
                                                 / math.log(ratio), 2)}
        if small.get("complete") and big.get("complete"):
            g["total_seconds_ratio"] = round(big["total_seconds"] / small["total_seconds"], 2)
            g["total_time_exponent"] = round(math.log(big["total_seconds"] / small["total_seconds"]) / math.log(ratio), 2)
        cpu_a, cpu_b = (sum(e.get("cpu_seconds", 0) for e in r["stages"].values()) for r in (small, big))
        if cpu_a and cpu_b and small.get("complete") and big.get("complete"):
            g["total_cpu_seconds_ratio"] = round(cpu_b / cpu_a, 2)
        # Wall time on a shared machine follows the load; CPU time of this process follows the work.
        g["super_linear_wall"] = [n for n, v in g["stages"].items() if v["time_exponent"] > 1.1]
        g["super_linear_cpu"] = [n for n, v in g["stages"].items() if v.get("cpu_time_exponent", 0) > 1.1]
        out["growth"][f"{small['size']}->{big['size']}"] = g
    targets: dict[str, Any] = {}
    by = {r["events_asked"]: r for r in results}
    one, ten = by.get(1_000_000), by.get(10_000_000)
    if one and one.get("complete"):
        targets["1M_total_seconds"] = {"value": one["total_seconds"], "target": TARGET_1M_SECONDS,
                                       "holds": one["total_seconds"] <= TARGET_1M_SECONDS}
    if one and ten and one.get("complete"):
        elapsed = ten.get("total_seconds") or sum(e["seconds"] for e in ten["stages"].values())
        targets["10M_over_1M_time"] = {"value": round(elapsed / one["total_seconds"], 2), "target": TARGET_GROWTH,
                                       "holds": (elapsed / one["total_seconds"] <= TARGET_GROWTH)
                                       if ten.get("complete") else None if elapsed <= TARGET_GROWTH * one["total_seconds"] else False}
    if ten and ten["stages"]:
        peak = max(max(e["peak_rss_mb"], e["max_rss_mb_kernel"]) for e in ten["stages"].values())
        targets["10M_peak_mb"] = {"value": peak, "target": TARGET_PEAK_MB_10M,
                                  "holds": peak <= TARGET_PEAK_MB_10M if ten.get("complete") else
                                  (None if peak <= TARGET_PEAK_MB_10M else False)}
    out["targets"] = targets
    return out


def draw(combined: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(combined["sizes"].values(), key=lambda r: r["events_asked"])
    xs = [r.get("events") or r["events_asked"] for r in sizes]
    groups = [g for g in GROUPS if any(g in group_stages(r["stages"]) for r in sizes)]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = ((axes[0], "seconds", "wall seconds"), (axes[1], "cpu_seconds", "CPU seconds (this process)"),
              (axes[2], "peak_rss_mb", "peak RSS (MB)"))
    for ax, key, what in panels:
        for g in groups:
            pts = [(x, group_stages(r["stages"]).get(g, {}).get(key)) for x, r in zip(xs, sizes)]
            pts = [(x, y) for x, y in pts if y]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=g)
        if key != "peak_rss_mb":
            total_key = "total_seconds" if key == "seconds" else "total_cpu_seconds"
            tot = [(x, r[total_key]) for x, r in zip(xs, sizes) if r.get(total_key)]
            if tot:
                ax.plot(*zip(*tot), marker="s", color="black", lw=2, label="total")
                x0, y0 = tot[0]
                ax.plot([x0, xs[-1]], [y0, y0 * xs[-1] / x0], ls="--", color="grey", label="total, linear")
            if key == "seconds":
                ax.axhline(TARGET_1M_SECONDS, color="red", ls=":", lw=1, label="1M target (300 s)")
        else:
            ax.axhline(TARGET_PEAK_MB_10M, color="red", ls=":", lw=1, label="8 GB target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(what + " per stage")
    axes[0].legend(fontsize=8, loc="best")
    axes[2].legend(fontsize=8, loc="best")
    fig.suptitle("recloop lifecycle cost vs events (2 shared cores, embedded default)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=parse_size, help="one size, in this process (e.g. 1000000 or 1M)")
    parser.add_argument("--sizes", help="several sizes, each in its own process, e.g. 1M,10M (JSON + PNG)")
    parser.add_argument("--combine", nargs="+", type=Path, help="JSON files of earlier single-size runs to combine")
    parser.add_argument("--home", type=Path, help="RECLOOP_HOME of a single size (must not exist yet)")
    parser.add_argument("--keep", type=Path, help="keep the homes: <KEEP>/<size> (default: temporary, removed)")
    parser.add_argument("--out", type=Path, help="JSON file (rewritten after every stage)")
    parser.add_argument("--png", type=Path, default=Path(__file__).resolve().parent / "out" / "lifecycle.png",
                        help="the plot of several sizes")
    args = parser.parse_args()

    if args.events:
        home = args.home or (args.keep / label(args.events) if args.keep else None)
        cleanup = None
        if home is None:
            cleanup = tempfile.TemporaryDirectory(prefix="recloop-bench-lifecycle-")
            home = Path(cleanup.name)
        elif home.exists() and any(home.iterdir()):
            parser.error(f"{home} is not empty: the benchmark needs a fresh RECLOOP_HOME")
        home.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):  # libraries print progress: keep stdout JSON
            result = run(args.events, home, args.out)
        print(json.dumps(result, indent=2, default=str))
        if cleanup is not None:
            cleanup.cleanup()
        return 0

    files = list(args.combine or [])
    if args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="recloop-bench-lifecycle-json-"))
        for size in args.sizes.split(","):
            n = parse_size(size)
            path = tmp / f"{label(n)}.json"
            cmd = [sys.executable, __file__, "--events", str(n), "--out", str(path)]
            if args.keep:
                cmd += ["--keep", str(args.keep)]
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
            if path.exists():
                files.append(path)
    if not files:
        parser.error("give --events, --sizes or --combine")
    combined = compare([json.loads(p.read_text()) for p in files])
    if len(combined["sizes"]) > 1:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        draw(combined, args.png)
        combined["png"] = str(args.png)
    text = json.dumps(combined, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

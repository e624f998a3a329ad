"""Quality benchmark: the platform's recommender beside popularity, ALS, BPR and EASE, on real ratings and on
the simulator, each table measured in one run on one split.

Sections (`--sections`, all by default):

* `random`: MovieLens ml-latest-small (../shared/data/ml-latest-small, not copied into the repository:
  the split files go to a temporary folder) split at random 80/10/10 by rating with `--seeds`; rating >= 4
  is a positive; every model is fitted on train, tuned on valid and scored on test by
  `recloop.evaluation.evaluate_files` — exactly `recloop evaluate --train --valid --test` — with full
  ranking and each user's history (train and valid ratings) excluded.
* `lifecycle`: the same data as a user brings it: `recloop import` of the folder, then `recloop train`
  over the whole history with the newest `--test-period` (2y) held out (the training job: Dagster, Feast,
  MLflow, the gate); the table is the job's evaluation of that held-out period.
* `simulator`: `--sim-days` simulated days through the data plane and the training job, the newest day
  held out (the demo's setting, larger).

Prints one JSON object (every recommender's Recall / NDCG / MAP@10, coverage, fit seconds and its ratio
to EASE and to ALS; the bars of issue 12 and whether they hold) and writes it to `--out`, with a PNG bar
chart beside it.

    python bench/quality.py                                  # everything (~25 min on 2 cores)
    python bench/quality.py --sections random --seeds 0      # one random split (~4 min)
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = next((d for d in (REPO.parent / "shared" / "data" / "ml-latest-small", Path("/work/shared/data/ml-latest-small"))
             if (d / "ratings.csv").is_file()), REPO.parent / "shared" / "data" / "ml-latest-small")
METRICS = ("recall", "ndcg", "map")


def _row(metrics: dict, beyond: dict, seconds: dict) -> dict:
    return {
        "recall_at_10": metrics.get("recall"), "ndcg_at_10": metrics.get("ndcg"), "map_at_10": metrics.get("map"),
        "coverage": beyond.get("catalog_coverage"), "fit_seconds": seconds.get("fit"),
    }


def _with_ratios(table: dict[str, dict]) -> dict[str, dict]:
    ease, als = table.get("ease", {}), table.get("als", {})
    for row in table.values():
        for base_name, base in (("ease", ease), ("als", als)):
            for m in ("recall_at_10", "ndcg_at_10"):
                if base.get(m) and row.get(m) is not None:
                    row[f"{m}_vs_{base_name}"] = round(row[m] / base[m], 3)
    return table


def _table_from_result(result: dict) -> dict[str, dict]:
    out = {}
    for name, r in result["recommenders"].items():
        out[name] = _row(r["metrics"]["10"], r["beyond_accuracy"], r["seconds"])
    return _with_ratios(out)


def random_split(seeds: list[int], workdir: Path) -> dict:
    """ml-latest-small split at random 80/10/10 per seed, through `evaluate_files`."""
    import pandas as pd

    from recloop.evaluation import evaluate_files

    ratings = pd.read_csv(DATA / "ratings.csv")
    per_seed = {}
    for seed in seeds:
        folder = workdir / f"random-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        part = np.empty(len(ratings), int)
        perm = np.random.default_rng(seed).permutation(len(ratings))
        n = len(ratings)
        part[perm[: int(0.8 * n)]], part[perm[int(0.8 * n) : int(0.9 * n)]], part[perm[int(0.9 * n) :]] = 0, 1, 2
        for i, name in enumerate(("train", "valid", "test")):
            ratings[part == i].to_csv(folder / f"{name}.csv", index=False)
        for extra in ("movies.csv", "tags.csv"):
            if (DATA / extra).is_file():
                shutil.copyfile(DATA / extra, folder / extra)
        t0 = time.perf_counter()
        result = evaluate_files(folder / "train.csv", folder / "test.csv", valid_path=folder / "valid.csv", ks=(10,))
        table = _table_from_result(result)
        per_seed[str(seed)] = {"table": table, "users_evaluated": result["users_evaluated"],
                               "seconds": round(time.perf_counter() - t0, 1)}
        print(f"random split seed {seed}: recloop {table['recloop']['recall_at_10']:.4f} / "
              f"{table['recloop']['ndcg_at_10']:.4f}, ease {table['ease']['recall_at_10']:.4f} / "
              f"{table['ease']['ndcg_at_10']:.4f}", file=sys.stderr, flush=True)
    names = list(next(iter(per_seed.values()))["table"])

    def mean_of(name: str, metric: str) -> float | None:
        values = [s["table"][name][metric] for s in per_seed.values() if s["table"][name].get(metric) is not None]
        return round(float(np.mean(values)), 4) if values else None

    mean = {name: {m: mean_of(name, m) for m in ("recall_at_10", "ndcg_at_10", "map_at_10", "coverage", "fit_seconds")}
            for name in names}
    return {"data": str(DATA), "split": "random 80/10/10 of ratings, seeded", "per_seed": per_seed,
            "mean": _with_ratios(mean)}


def _recloop(args: list[str], env: dict[str, str], timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "recloop.cli", *args, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    start = proc.stdout.find("{")
    out = json.loads(proc.stdout[start:]) if start >= 0 else {}
    return {**out, "_seconds": seconds, "_returncode": proc.returncode}


def _training_table(summary: dict) -> dict[str, dict]:
    table = {name: {"recall_at_10": v.get("recall_at_10"), "ndcg_at_10": v.get("ndcg_at_10"),
                    "map_at_10": v.get("map_at_10"), "coverage": v.get("coverage")}
             for name, v in (summary.get("evaluation") or {}).items()}
    return _with_ratios(table)


def lifecycle(workdir: Path, test_period: str) -> dict:
    """`recloop import` of ml-latest-small, then `recloop train` over the whole history."""
    home = workdir / "lifecycle-home"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "RECLOOP_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    imported = _recloop(["import", str(DATA)], env)
    trained = _recloop(["train", "--train-period", "all", "--test-period", test_period], env)
    return {"data": str(DATA), "import_seconds": imported["_seconds"], "train_seconds": trained["_seconds"],
            "test_period": test_period, "gate_passed": trained.get("gate_passed"), "gate": trained.get("gate"),
            "champion": trained.get("champion"), "table": _training_table(trained)}


def simulator(workdir: Path, days: int, events_per_day: int) -> dict:
    """`recloop simulate` + the data plane + `recloop train` (newest day held out)."""
    home = workdir / "sim-home"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "RECLOOP_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    _recloop(["simulate", "--days", str(days), "--events-per-day", str(events_per_day)], env)
    ran = _recloop(["run"], env)
    trained = _recloop(["train", "--train-days", str(days - 1), "--test-days", "1"], env)
    return {"days": days, "events_per_day": events_per_day, "data_plane_seconds": ran["_seconds"],
            "train_seconds": trained["_seconds"], "gate_passed": trained.get("gate_passed"),
            "table": _training_table(trained)}


def bars(out: dict) -> dict:
    """Issue 12's bars on the figures above."""
    checks: dict[str, dict] = {}
    if "random" in out:
        m = out["random"]["mean"]["recloop"]
        checks["random: recloop >= 1.0 x EASE on Recall@10 and NDCG@10 (mean of seeds)"] = {
            "value": [m.get("recall_at_10_vs_ease"), m.get("ndcg_at_10_vs_ease")],
            "holds": bool(m.get("recall_at_10_vs_ease", 0) >= 1.0 and m.get("ndcg_at_10_vs_ease", 0) >= 1.0)}
        worst = min(min(s["table"]["recloop"]["recall_at_10_vs_ease"], s["table"]["recloop"]["ndcg_at_10_vs_ease"])
                    for s in out["random"]["per_seed"].values())
        checks["random: recloop >= 1.0 x EASE on every seed"] = {"value": worst, "holds": worst >= 1.0}
        checks["random: recloop > tuned ALS"] = {"value": [m.get("recall_at_10_vs_als"), m.get("ndcg_at_10_vs_als")],
                                                 "holds": bool(min(m.get("recall_at_10_vs_als", 0), m.get("ndcg_at_10_vs_als", 0)) > 1.0)}
    if "lifecycle" in out and out["lifecycle"]["table"]:
        t = out["lifecycle"]["table"]
        r = t.get("recloop", {})
        checks["lifecycle: promoted, above popularity and ALS on the held-out period"] = {
            "value": {k: t.get(k, {}).get("ndcg_at_10") for k in ("recloop", "popularity", "als")},
            "holds": bool(out["lifecycle"]["gate_passed"] and r.get("ndcg_at_10", 0) > t["popularity"]["ndcg_at_10"]
                          and r.get("ndcg_at_10", 0) > t["als"]["ndcg_at_10"]
                          and r.get("recall_at_10", 0) > t["popularity"]["recall_at_10"]
                          and r.get("recall_at_10", 0) > t["als"]["recall_at_10"])}
    if "simulator" in out and out["simulator"]["table"]:
        t = out["simulator"]["table"]
        r = t["recloop"]["recall_at_10"]
        best_source = max(v["recall_at_10"] for k, v in t.items() if k.startswith("recloop/"))
        checks["simulator: >= 2.5 x popularity and >= ALS Recall@10, ranker above every source alone"] = {
            "value": {"vs_popularity": round(r / t["popularity"]["recall_at_10"], 2), "vs_als": t["recloop"].get("recall_at_10_vs_als"),
                      "best_source": best_source, "recloop": r},
            "holds": bool(r >= 2.5 * t["popularity"]["recall_at_10"] and r >= t["als"]["recall_at_10"] and r > best_source)}
    return checks


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [(name, out[key]["mean"] if key == "random" else out[key]["table"]) for key, name in
              (("random", "ml-latest-small, random 80/10/10 (mean of seeds)"), ("lifecycle", "ml-latest-small, lifecycle"),
               ("simulator", "simulator")) if key in out and (out[key].get("mean") or out[key].get("table"))]
    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.6 * len(tables)), squeeze=False)
    for ax, (title, table) in zip(axes[:, 0], tables):
        names = list(table)
        x = np.arange(len(names))
        for j, (m, label) in enumerate((("recall_at_10", "Recall@10"), ("ndcg_at_10", "NDCG@10"))):
            values = [table[n].get(m) or 0 for n in names]
            bars_ = ax.bar(x + (j - 0.5) * 0.38, values, 0.38, label=label,
                           color=[("#1f77b4", "#ff7f0e")[j] if not n.startswith("recloop") else ("#08519c", "#d94801")[j] for n in names])
            ax.bar_label(bars_, fmt="%.3f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=("random", "lifecycle", "simulator"),
                        default=["random", "lifecycle", "simulator"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-period", default="2y", help=(
        "lifecycle: the newest period held out (ml-latest-small: 2y holds 31 returning users and 1,000 of their "
        "positives; 14d holds 9 users and 41 positives, too few to rank five models)"))
    parser.add_argument("--sim-days", type=int, default=8)
    parser.add_argument("--sim-events-per-day", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, help="where split files and stores go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "quality.json")
    args = parser.parse_args()
    if not (DATA / "ratings.csv").is_file() and {"random", "lifecycle"} & set(args.sections):
        print(f"MovieLens ml-latest-small not found in {DATA}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recloop-bench-quality-"))
    out: dict = {"benchmark": "quality", "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    try:
        if "random" in args.sections:
            out["random"] = random_split(args.seeds, workdir)
        if "lifecycle" in args.sections:
            out["lifecycle"] = lifecycle(workdir, args.test_period)
        if "simulator" in args.sections:
            out["simulator"] = simulator(workdir, args.sim_days, args.sim_events_per_day)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    out["bars"] = bars(out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=2, default=str)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    plot(out, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

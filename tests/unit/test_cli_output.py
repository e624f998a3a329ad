"""What `recloop` prints for people and for scripts: tables with the key fields by default, the same result
as JSON with `--json`, no ANSI codes when stdout is not a terminal, every option's default in `--help`,
progress lines on stderr, and the demo's closing lines. The commands run for real (`recloop.cli.main`)
against an isolated RECLOOP_HOME; `recloop train` against a training run's result (no Dagster run)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from recloop import cli, progress
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(autouse=True)
def plain_width(monkeypatch):
    """The captured output's width is the plain default (COLUMNS set by another test or library in the
    same process would fold these tables differently)."""
    from recloop.terminal import PLAIN_WIDTH

    monkeypatch.setenv("COLUMNS", str(PLAIN_WIDTH))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse (--help)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# --- --help -----------------------------------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_says_its_default():
    subparsers = _subparsers()
    assert {"train", "models", "quarantine", "run", "import", "simulate", "evaluate", "drift", "alerts", "rollback",
            "demo", "serve", "movielens"} <= set(subparsers)
    for name, parser in subparsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"recloop {name} {action.dest}: no help text"
            shown = formatter._expand_help(action) if action.help else ""
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, f"recloop {name} {'/'.join(action.option_strings)}: no default in {shown!r}"


@pytest.mark.parametrize("command, expected", [
    ("train", ["--train-days N", "(default: 7)", "--test-days N", "(default: 1)", "--json", "--no-progress"]),
    ("models", ["--limit N", "(default: 10)", "--json"]),
    ("quarantine", ["--table TABLE", "(default: events)", "(default: 20)", "--json"]),
    ("evaluate", ["(default: 5 10 20 50)", "--json"]),
    ("serve", ["(default: 127.0.0.1)", "(default: 8000)", "(default: info)"]),
    ("demo", ["(default: 12)", "(default: 8000)", "(default: new_user_wave)"]),
])
def test_help_of_each_command_shows_the_defaults(capsys, command, expected):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    for fragment in expected:
        assert fragment in text, (fragment, out)
    assert "%(default)" not in out and "%%" not in out


def test_json_is_only_offered_where_there_is_a_result(capsys):
    assert run(capsys, "serve", "--json")[0] == 2
    assert run(capsys, "demo", "--json")[0] == 2


# --- recloop train ----------------------------------------------------------------------------------


def _training_run(*, promoted: bool):
    from pipelines.run import PartitionRun

    gate = "model/registered_version:promotion_gate"
    reasons = (["PROMOTE: passed every check against champion:1",
                "PASS primary_metric: challenger ndcg_at_10 0.3100 vs champion v1 0.3000 (+3.3%)"] if promoted else
               ["REFUSE: failed primary_metric against champion:1",
                "FAIL primary_metric: challenger ndcg_at_10 0.2900 vs champion v1 0.3000 (-3.3%); needs >= 0.3060",
                "PASS coverage_guardrail: challenger coverage 0.4000 vs champion 0.4100"])
    materialized = {
        "model/evaluation": {"by_recommender": {
            "recloop": {"recall_at_10": 0.4123, "ndcg_at_10": 0.3101, "coverage": 0.41},
            "popularity": {"recall_at_10": 0.1, "ndcg_at_10": 0.08, "coverage": 0.01}},
            "recall_at_10_vs_popularity": 4.123},
        "model/registered_version": {"version": "2"},
    }
    if promoted:
        materialized["model/champion"] = {"champion": "2"}
    return PartitionRun(
        partition="", run_id="0123abcd-0000-4000-8000-000000000000", success=True, materialized=materialized,
        checks={gate: promoted, "model/registered_version:latency_gate": True},
        check_metadata={gate: {"reasons": reasons, "compared_to": "champion:1"},
                        "model/registered_version:latency_gate": {
                            "decision": "passed", "challenger_p99_ms": 12.5, "champion_p99_ms": 11.0,
                            "reasons": ["PASS p99 within the budget"]}})


@pytest.fixture()
def training(recloop_env, monkeypatch):
    """`recloop train` against a made training run: `run_job` reports the steps the way Dagster's events
    reach `recloop.progress` in a real run, and returns the run's result."""
    import pipelines.run

    made = {}

    def run_job(job_name, **kwargs):
        assert job_name == "training_job"
        for step in ("model__training_set", "model__ranker"):
            progress.run_event(job_name, "ASSET_MATERIALIZATION_PLANNED", step)
        progress.run_event(job_name, "PIPELINE_START", None)
        for step in ("model__training_set", "model__ranker"):
            progress.run_event(job_name, "STEP_START", step)
            progress.run_event(job_name, "STEP_SUCCESS", step)
        progress.run_event(job_name, "PIPELINE_SUCCESS", None)
        return made["run"]

    monkeypatch.setattr(pipelines.run, "run_job", run_job)
    monkeypatch.setattr(pipelines.run, "instance", lambda settings: None)
    monkeypatch.setattr(cli, "_current_champion", lambda: "1")
    monkeypatch.delenv("RECLOOP_DEBUG", raising=False)
    return made


def test_train_shows_the_decision_metrics_reasons_and_links(training, capsys):
    training["run"] = _training_run(promoted=False)
    code, out, err = run(capsys, "train", "--train-days", "3")
    assert code == 0 and not ANSI.search(out + err)
    text = " ".join(out.split())
    assert "version 2: refused (compared with champion:1); the champion stays version 1" in text
    assert re.search(r"recloop\s+0\.4123\s+0\.3101", out)  # the evaluation table, the platform's row
    assert "FAIL primary_metric: challenger ndcg_at_10 0.2900" in out and "PASS coverage_guardrail" in out
    assert "latency gate: passed, p99 12.5 ms vs champion 11.0 ms" in out
    assert "http://127.0.0.1:3000/runs/0123abcd-0000-4000-8000-000000000000" in out
    assert "/#/models/recloop-recommender/versions/2" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert all(len(line) <= 120 for line in out.splitlines() if "│" in line or "─" in line)
    # stderr: a plain line per finished step (not a terminal), then the refusal in one sentence
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0] == "  [1/2] model/training_set done in 0.0 s" and lines[1].startswith("  [2/2] model/ranker done")
    assert lines[-1].startswith("recloop train: version 2 was not promoted: REFUSE: failed primary_metric")


def test_train_json_is_the_summary_and_no_progress_is_quiet(training, capsys):
    training["run"] = _training_run(promoted=True)
    code, out, err = run(capsys, "train", "--json", "--no-progress")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary == cli._training_summary(training["run"])
    assert (summary["promoted"], summary["decision"], summary["champion"], summary["registered_version"]) == (
        True, "promoted", "2", "2")


# --- recloop models ---------------------------------------------------------------------------------

ITEMS = [f"v{i}" for i in range(30)]


class _FakeRecommender:
    def __init__(self, items: list[str]) -> None:
        self.items = items

    def recommend(self, user_ids, k, *, exclude=None):
        return [[self.items[(i + j) % len(self.items)] for j in range(k)] for i, _ in enumerate(user_ids)]


def fake_load_bundle(bundle_dir: str) -> _FakeRecommender:
    return _FakeRecommender(json.loads((Path(bundle_dir) / "bundle.json").read_text())["items"])


@pytest.fixture()
def registry(recloop_env, monkeypatch, tmp_path):
    """The deployment's registry (MLflow, SQLite) with versions 1 (promoted), 2 (refused), 3 (challenger)."""
    from recloop.registry import GateConfig, decide, open_registry

    monkeypatch.setenv("RECLOOP_BUNDLE_LOADER", f"{Path(__file__).resolve()}:fake_load_bundle")
    bundle = tmp_path / "bundle"
    for part in ("retrieval", "index", "ranker"):
        (bundle / part).mkdir(parents=True)
        (bundle / part / "weights.bin").write_bytes(b"w" * 64)
    (bundle / "bundle.json").write_text(json.dumps({"items": ITEMS}))
    registry = open_registry(recloop_env)
    run_id = registry.log_training_run(experiment="recloop-training", params={}, data={}, features=["f"],
                                       metrics={"eval.full.ndcg_at_10": 0.3, "eval.full.coverage": 0.4},
                                       bundle_dir=bundle, example_user_ids=["u1"])
    popularity = {"ndcg_at_10": 0.1, "coverage": 0.01, "diversity": 0.2, "popularity_concentration": 0.9}
    sane = {"finite_weights": True, "identical_list_share": 0.01, "distinct_items": 300}
    challenger = {"ndcg_at_10": 0.3, "coverage": 0.4, "diversity": 0.6, "popularity_concentration": 0.3}
    v1, v2, v3 = (registry.register(run_id) for _ in range(3))
    registry.promote(v1, decide(challenger=challenger, champion=None, popularity=popularity, sanity=sane,
                                config=GateConfig()))
    registry.refuse(v2, decide(challenger={**challenger, "ndcg_at_10": 0.2}, champion=challenger, champion_version=v1,
                               popularity=popularity, sanity=sane, config=GateConfig()))
    registry.set_challenger(v3)
    return registry


def test_models_shows_the_aliases_then_the_history(registry, capsys):
    code, out, err = run(capsys, "models")
    assert code == 0 and not ANSI.search(out)
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert re.match(r"champion\s+1\s+\d{4}-\d\d-\d\d \d\d:\d\d UTC\s+0\.3000", rows["champion"])
    assert re.match(r"challenger\s+3\s+.*\(registered\)", rows["challenger"])
    assert re.match(r"experiment\s+-", rows["experiment"])
    assert "champions, oldest first: 1" in out
    history = out[out.index("Decisions"):]
    refused = next(line for line in history.splitlines() if "refused" in line)
    # version, decision, when, the primary metric against the bar, the reason on one line
    assert re.match(r"\s*2\s+refused\s+\d{4}-\d\d-\d\d \d\d:\d\d UTC\s+0\.2000 vs 0\.3000 \(champion\)\s+"
                    r"REFUSE: failed primary_metric", refused), refused
    promoted = next(line for line in history.splitlines() if "promoted" in line)
    assert re.match(r"\s*1\s+promoted\s+.*0\.3000 vs 0\.1000 \(popularity\)", promoted), promoted
    assert history.index("refused") < history.index("promoted")  # newest first

    code, out, _ = run(capsys, "models", "--json", "--limit", "1")
    data = json.loads(out)
    assert set(data) == {"model", "champion", "challenger", "lineage", "history"}
    # as before the human view: MLflow's version numbers for the aliases, the log's strings in the lineage
    assert (str(data["champion"]), str(data["challenger"]), data["lineage"]) == ("1", "3", ["1"])
    assert [h["decision"] for h in data["history"]] == ["refused"]


# --- recloop quarantine -----------------------------------------------------------------------------

DAY = "2025-03-01"


@pytest.fixture()
def quarantined(recloop_env):
    """A landed day whose validation quarantined three rows: two for one reason, one for another."""
    simulate(SimConfig(seed=3, start=DAY, days=1, initial_users=40, initial_videos=20, events_per_day=100),
             open_lake(recloop_env.landing_uri))
    rows = pa.table({
        "event_id": ["e1", "e2", None],
        "_source_file": [f"events/date={DAY}/late.csv"] * 3,
        "_source_row": [2, 3, None],
        "_source_line": [None, None, 9],
        "_raw_line": [None, None, "e9,u1"],
        "reason": ["negative watch time (watched_s < 0)", "negative watch time (watched_s < 0)",
                   "malformed line: expected 9 fields, found 2"],
    })
    open_lake(recloop_env.lake_uri).write_partition("quarantine/events", DAY, rows)
    return recloop_env


def test_quarantine_counts_per_reason_first_then_sample_rows(quarantined, capsys):
    code, out, _ = run(capsys, "quarantine", "--partition", DAY, "--limit", "2")
    assert code == 0 and not ANSI.search(out)
    assert "events of 2025-03-01: 3 row(s) quarantined" in out
    summary, samples = out.split("The first 2 of 3")
    assert re.search(r"^\s*2\s+negative watch time \(watched_s < 0\)$", summary, re.M)
    assert re.search(r"^\s*1\s+malformed line$", summary, re.M)
    assert re.search(rf"^e1\s+events/date={DAY}/late\.csv:2\s+negative watch time", samples, re.M)
    assert "e2" in samples and "malformed line: expected" not in samples  # --limit 2

    code, out, _ = run(capsys, "quarantine", "--partition", DAY, "--json")
    data = json.loads(out)
    assert (data["table"], data["partition"], data["quarantined"]) == ("events", DAY, 3)
    assert [r["event_id"] for r in data["rows"]] == ["e1", "e2", None]


# --- a terminal's absence, progress, the demo's closing lines ---------------------------------------


def test_simulate_prints_a_line_and_json_on_request(recloop_env, capsys):
    argv = ["simulate", "--days", "1", "--events-per-day", "50", "--initial-users", "20", "--initial-videos", "10"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith("Simulated 1 day(s) from 2025-01-01 into ") and not ANSI.search(out)
    code, out, _ = run(capsys, *argv, "--json")
    assert json.loads(out)["days"] == 1


def test_run_progress_lines_without_a_terminal(capsys):
    from recloop.terminal import RunProgress

    with RunProgress() as shown:
        assert shown.mode == "plain"
        progress.run_event("history_job", "ASSET_MATERIALIZATION_PLANNED", "history__bronze")
        progress.run_event("history_job", "STEP_START", "history__bronze")
        with progress.stage("ingest", 3, "day") as stage:
            stage.update(3)
        progress.run_event("history_job", "STEP_FAILURE", "history__bronze")
    assert progress.current().__class__.__name__ == "NullReporter"  # uninstalled afterwards
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("  ingest: done, 3/3 day(s) in ")
    assert err[1].startswith("  [1/1] history/bronze FAILED in ")
    with RunProgress(plain=False):
        progress.run_event("data_plane_job", "STEP_SUCCESS", "bronze__events")
    with RunProgress(enabled=False):
        assert not progress.listening()  # nothing installed: Dagster steps log their stages in the run's log
        progress.run_event("training_job", "STEP_SUCCESS", "model__ranker")
        with progress.stage("features", 2, "day") as stage:
            stage.update(2)
    assert capsys.readouterr().err == ""


def test_alert_texts_lose_their_emoji_codes_on_the_terminal():
    from recloop.cli_views import alert_line
    from recloop.terminal import plain_text

    assert plain_text(":white_check_mark: recloop: version 2 is the new champion: PASS at 10:30:00") == (
        "recloop: version 2 is the new champion: PASS at 10:30:00")
    assert plain_text(":x: recloop: events of 2025-03-01 failed validation") == (
        "recloop: events of 2025-03-01 failed validation")
    line = alert_line({"id": "evt_1", "type": "model.promoted", "text": ":white_check_mark: recloop: v2\nhttp://x"})
    assert line == "model.promoted       evt_1  recloop: v2"


def test_the_demo_ends_with_the_three_places_to_look(recloop_env, monkeypatch):
    monkeypatch.delenv("RECLOOP_MLFLOW_TRACKING_URI", raising=False)
    lines = "\n".join(cli._demo_where_to_look(recloop_env, trained=True))
    assert "make ui  →  http://127.0.0.1:3000" in lines
    db = recloop_env.home / "mlflow" / "mlflow.db"
    assert re.search(rf"mlflow ui --backend-store-uri sqlite:///{re.escape(str(db))}  →  http://127\.0\.0\.1:5000/", lines)
    assert re.search(r"recloop serve  →  http://127\.0\.0\.1:8000/docs", lines)
    assert ":white_check_mark:" not in lines
    assert "make ui" in "\n".join(cli._demo_where_to_look(recloop_env, trained=False))



# --- the other views, on results shaped as their commands make them ---------------------------------


def _render(view, result, **kwargs) -> str:
    import io

    from recloop.terminal import stdout_console

    buffer = io.StringIO()
    view(stdout_console(buffer), result, **kwargs)
    return buffer.getvalue()


def test_each_view_shows_its_key_fields():
    from recloop import cli_views as views

    out = _render(views.show_partitions, {"seconds": 3.2, "partitions": {"2025-03-01": {
        "success": False, "run_id": "r1", "events": {"ingested": 1200, "accepted": 1190, "quarantined": 10},
        "online": {"rows_written": 77}, "drift": {"drifted": True, "reasons": ["share of new users 0.41"]},
        "error": "bronze/events:gx_schema failed: missing liked"}}})
    assert re.search(r"2025-03-01\s+FAILED\s+1,200\s+1,190\s+10\s+77\s+DRIFT: share of new users 0\.41", out)
    assert "2025-03-01: bronze/events:gx_schema failed: missing liked" in out and "took 3.2 s" in out

    out = _render(views.show_history, {
        "landing": "/l", "landed": {"source": "/ml", "kind": "movielens", "first": "2021-01-01", "last": "2021-01-09",
                                    "calendar_days": 9, "days_with_events": 7, "rows": {"events": 100}, "files_written": 9},
        "range": {"first": "2021-01-01", "last": "2021-01-09"}, "run_id": "abcdef0123", "success": True,
        "validated": {"events": {"days": 7, "ingested": 100, "accepted": 96, "quarantined": 4, "quarantine_rate": 0.04,
                                 "quarantine_reasons": {"malformed line": 3, "negative watch time": 1}}},
        "days_with_events": 7, "days_without_events": 2, "checks": {"history/silver:quarantine_rate": True},
        "seconds": {"land": 1.0, "run": 9.5}})
    assert "History 2021-01-01 .. 2021-01-09 in one Dagster run abcdef01: succeeded" in out
    assert re.search(r"events\s+7\s+100\s+96\s+4\s+4\.00%\s+malformed line \(3\); negative watch time \(1\)", out)
    assert "history/silver:quarantine_rate passed" in out and "land 1.0, run 9.5" in out

    out = _render(views.show_evaluation, {
        "main_k": 10, "ks": [10, 20], "platform": "recloop", "users_evaluated": 50, "catalog_size": 300,
        "split": {"train": "t.csv", "test": "s.csv", "train_interactions": 900, "test_interactions": 100},
        "recommenders": {"recloop": {"metrics": {"10": {"recall": 0.31, "ndcg": 0.22}, "20": {"recall": 0.4, "ndcg": 0.25}},
                                     "beyond_accuracy": {"recall": 0.31, "ndcg": 0.22, "catalog_coverage": 0.5},
                                     "seconds": {"fit": 2.0}}}})
    assert re.search(r"recloop\s+0\.3100\s+0\.2200", out) and re.search(r"recloop\s+0\.3100\s+0\.4000\s+0\.2200\s+0\.2500", out)

    out = _render(views.show_drift, {"2025-03-02": {"drifted": False, "status": "no drift", "champion_version": "3",
                                                    "report": "s3://lake/monitoring/drift/x.html", "success": True}})
    assert re.search(r"2025-03-02\s+ok\s+no\s+3\s+no drift\s+s3://lake/monitoring/drift/x\.html", out)

    out = _render(views.show_dead_letters, [{"endpoint": "ops", "event_id": "evt_9", "type": "model.refused",
                                             "status": "dead", "attempts": 5, "last_status_code": 500,
                                             "last_error": "HTTP 500", "updated_at": "2026-01-02T03:04:05+00:00"}])
    assert re.search(r"ops\s+evt_9\s+model\.refused\s+dead\s+5\s+500\s+HTTP 500\s+2026-01-02 03:04", out)
    assert "No dead letters" in _render(views.show_dead_letters, [])

    out = _render(views.show_resent, [{"endpoint": "ops", "event_id": "evt_9", "outcome": "delivered", "attempts": 1,
                                       "status_code": 204, "error": None}])
    assert re.search(r"ops\s+evt_9\s+delivered\s+1\s+204", out)

    out = _render(views.show_closed_loop, {"landing": "/l", "serving": "in process", "first": "2025-01-08", "days": [
        {"date": "2025-01-08", "sessions": 700, "impressions": 8000, "ctr": 0.1234, "watch_s_per_impression": 3.2,
         "gini": 0.61, "top1_share": 0.05, "coverage": 0.4, "fallback_answers": 0, "explored": 800}]})
    assert re.search(r"2025-01-08\s+700\s+8,000\s+0\.123\s+3\.2\s+0\.610\s+0\.050\s+0\.400\s+0\s+800", out)

    out = _render(views.show_rollback, {"model": "m", "champion_was": "3", "champion_now": "1",
                                        "why": ["version 2 skipped: corrupt"]})
    assert "m: champion version 3 -> 1" in out and "version 2 skipped: corrupt" in out

"""Every mistake a user can make on the command line ends in one sentence naming the cause and the fix, a
non-zero exit code and no traceback; `--debug` (or RECLOOP_DEBUG=1) shows the traceback. Each command runs
for real (`recloop.cli.main`) against an isolated RECLOOP_HOME; none of these reaches a Dagster run."""

from __future__ import annotations

import os

import pytest

from recloop import cli
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake


@pytest.fixture()
def landed(recloop_env):
    """Two simulated days (2025-03-01, 2025-03-02) in the landing zone."""
    simulate(SimConfig(seed=3, start="2025-03-01", days=2, initial_users=40, initial_videos=20, events_per_day=100),
             open_lake(recloop_env.landing_uri))
    return recloop_env


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str, command: str) -> str:
    """The single line the command printed to stderr (and that it is not a traceback)."""
    assert "Traceback" not in err and "Stack Trace" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"recloop {command}: "), err
    return lines[0]


def test_quarantine_of_an_unknown_table_lists_the_tables(landed, capsys):
    code, out, err = run(capsys, "quarantine", "--table", "bogus", "--partition", "2025-03-01")
    line = one_sentence(err, "quarantine")
    assert code == 2 and out == ""
    assert "'bogus'" in line and all(t in line for t in ("users", "videos", "events"))


@pytest.mark.parametrize("action", ["resend", "dead-letters"])
def test_an_unknown_alert_endpoint_names_the_configured_ones(recloop_env, monkeypatch, capsys, action):
    from recloop.alerts import new_secret

    monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/webhooks")
    monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_SECRET", new_secret())
    code, out, err = run(capsys, "alerts", action, "--endpoint", "nope")
    line = one_sentence(err, "alerts")
    assert code == 2 and out == ""
    assert "'nope'" in line and "env" in line  # `env`: the endpoint RECLOOP_ALERT_WEBHOOK_URL configures


def test_an_unknown_alert_endpoint_without_any_configured_says_how_to_add_one(recloop_env, monkeypatch, capsys):
    monkeypatch.delenv("RECLOOP_ALERT_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("RECLOOP_ALERT_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("RECLOOP_ALERTS_CONFIG", "")
    code, _, err = run(capsys, "alerts", "resend", "--endpoint", "nope")
    assert code == 2 and "RECLOOP_ALERT_WEBHOOK_URL" in one_sentence(err, "alerts")


def test_start_after_end_says_so(landed, capsys):
    code, out, err = run(capsys, "run", "--start", "2025-03-02", "--end", "2025-03-01")
    line = one_sentence(err, "run")
    assert code == 2 and out == ""
    assert "--start 2025-03-02 is after --end 2025-03-01" in line and "empty" not in line


@pytest.mark.parametrize("argv, expected", [
    (["run", "--partition", "2024-01-01"], "outside the daily partitions (2025-03-01 to "),
    (["run", "--partition", "2025-13-01"], "is not a date: write it as YYYY-MM-DD"),
    (["drift", "--partition", "2024-12-31"], "outside the daily partitions (2025-03-01 to "),
    (["quarantine", "--partition", "yesterday"], "is not a date"),
])
def test_unknown_partitions_give_the_valid_range(landed, capsys, argv, expected):
    code, _, err = run(capsys, *argv)
    assert code == 2 and expected in one_sentence(err, argv[0])


def test_a_stray_landing_folder_before_1970_is_no_partition(landed, capsys):
    """A `date=0001-01-01` folder (an event time of year 1) made Dagster fail with DagsterUnknownPartitionError."""
    landing = open_lake(landed.landing_uri)
    landing.write_bytes("events/date=0001-01-01/part-0.parquet",
                        landing.read_bytes("events/date=2025-03-01/part-0.parquet"))
    code, _, err = run(capsys, "run", "--partition", "0001-01-01")
    line = one_sentence(err, "run")
    assert code == 2 and "(2025-03-01 to " in line and "1970-01-01" in line


@pytest.mark.parametrize("argv, expected", [
    (["simulate", "--start", "2025-02-30", "--days", "1"], "--start '2025-02-30' is not a date"),
    (["simulate", "--days", "0"], "--days must be >= 1"),
    (["simulate", "--days", "1", "--events-per-day", "-5"], "--events-per-day must be >= 1"),
    (["simulate", "--days", "3", "--drift-day", "5", "--scenario", "category_surge"], "--drift-day (5) must be < --days"),
    (["demo", "--days", "0"], "--days must be >= 1"),
    (["train", "--train-period", "xyz"], "--train-period 'xyz' is not a period"),
    (["import", "/nonexistent/history"], "/nonexistent/history does not exist"),
    (["evaluate", "--train", "/nonexistent/train.csv", "--test", "/nonexistent/test.csv"], "/nonexistent/train.csv"),
    (["quarantine", "--partition", "2025-03-01", "--limit", "-1"], "--limit -1 is negative"),
])
def test_bad_options_are_one_sentence_and_exit_2(recloop_env, capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2 and expected in one_sentence(err, argv[0]) and out == ""


@pytest.mark.parametrize("command", ["serve", "alerts listen"])
def test_a_port_out_of_range_is_refused_by_the_parser(recloop_env, capsys, command):
    code, _, err = run(capsys, *command.split(), "--port", "99999")
    assert code == 2 and "'99999' is not a port" in err and "Traceback" not in err


def test_an_unexpected_error_is_short_and_points_to_debug(recloop_env, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", broken)
    monkeypatch.delenv("RECLOOP_DEBUG", raising=False)
    code, _, err = run(capsys, "models")
    line = one_sentence(err, "models")
    assert code == 1
    assert "unexpected error: RuntimeError: the disk caught fire second line" in line and "--debug" in line


@pytest.mark.parametrize("argv", [["--debug", "models"], ["models", "--debug"]])
def test_debug_shows_the_traceback(recloop_env, monkeypatch, capsys, argv):
    def broken(args):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(cli, "cmd_models", broken)
    monkeypatch.delenv("RECLOOP_DEBUG", raising=False)
    code, _, err = run(capsys, *argv)
    assert code == 1 and "Traceback" in err and "RuntimeError: the disk caught fire" in err
    assert "RECLOOP_DEBUG" not in os.environ  # the flag lasts for the command only


def test_debug_from_the_environment_shows_the_traceback_of_a_user_error(landed, monkeypatch, capsys):
    monkeypatch.setenv("RECLOOP_DEBUG", "1")
    code, _, err = run(capsys, "quarantine", "--table", "bogus", "--partition", "2025-03-01")
    assert code == 2 and "Traceback" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("recloop quarantine: --table 'bogus'")


@pytest.mark.parametrize("command", ["run", "drift"])
def test_nothing_landed_says_what_to_do(recloop_env, capsys, command):
    code, out, err = run(capsys, command)
    line = one_sentence(err, command)
    assert code == 2 and out == "" and "has no events" in line and "recloop import PATH" in line

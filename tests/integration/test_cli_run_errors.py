"""`recloop run` on a day the GX schema check stops: the command names the reason (the missing column, the
unreadable file) in one line and in its result (`--json`), exits 1, and shows no Dagster stack trace (`--debug` does)."""

from __future__ import annotations

import json

import pytest

from recloop import cli
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

DAY = "2025-03-01"


@pytest.fixture()
def broken_day(recloop_env):
    """One simulated day whose events come with a CSV lacking the `liked` column and a corrupt Parquet file."""
    landing = open_lake(recloop_env.landing_uri)
    simulate(SimConfig(seed=3, start=DAY, days=1, initial_users=60, initial_videos=30, events_per_day=300), landing)
    landing.write_bytes(f"events/date={DAY}/late.csv",
                        b"event_id,user_id,video_id,event_time,surface,position,watched_s,completed\n"
                        b"x1,u1,v1,2025-03-01T01:00:00Z,home,0,1.0,false\n")
    landing.write_bytes(f"events/date={DAY}/part-9.parquet", b"PAR1 this is not a parquet file")
    return recloop_env


def test_a_schema_failure_prints_the_gx_reason(broken_day, capsys, monkeypatch):
    monkeypatch.delenv("RECLOOP_DEBUG", raising=False)
    code = cli.main(["run", "--partition", DAY, "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    for text in (err, out):
        assert "Stack Trace" not in text and "Traceback" not in text and "DagsterAssetCheckFailedError" not in text
    error = json.loads(out)["partitions"][DAY]["error"]
    # the GX reasons, not "1 blocking asset check failed"
    assert "bronze/events:gx_schema failed" in error
    assert "liked" in error and "part-9.parquet" in error and "could not be read" in error
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"recloop run: partition {DAY} failed: bronze/events:gx_schema")
    assert "liked" in lines[0] and "part-9.parquet" in lines[0]

    # The range (history) job: the same reasons in its summary.
    code = cli.main(["run", "--start", DAY, "--end", DAY, "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and "Stack Trace" not in err and "Traceback" not in err
    summary = json.loads(out)
    assert summary["success"] is False and "history/bronze:gx_schema failed" in summary["error"]
    assert "liked" in summary["error"] and "part-9.parquet" in summary["error"]

    # --debug: Dagster's own log, with the step failure, is shown.
    code = cli.main(["--debug", "run", "--partition", DAY])
    _, err = capsys.readouterr()
    assert code == 1 and "STEP_FAILURE" in err

"""A promotion the gate refuses is a normal outcome: `recloop train` exits 0 without a stack trace and its
JSON says {"promoted": false, "decision": "refused", "reasons": [...]}; the Dagster run succeeds, the gate
check fails with WARN severity and says why, `model/champion` is not materialized, the champion stays."""

from __future__ import annotations

import json

import pytest

from recloop import cli
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

GATE = "model/registered_version:promotion_gate"


def test_a_refused_promotion_is_a_successful_run(recloop_env, webhook_receiver, capsys, monkeypatch):
    import dagster as dg

    from pipelines.run import instance, run_data_plane
    from recloop.registry import open_registry

    monkeypatch.delenv("RECLOOP_DEBUG", raising=False)
    settings = recloop_env
    config = SimConfig(seed=5, days=4, initial_users=1_200, initial_videos=400, events_per_day=6_000,
                       new_users_per_day=30, new_videos_per_day=15)
    simulate(config, open_lake(settings.landing_uri))
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    assert all(r.success for r in run_data_plane(days, settings=settings))

    argv = ["train", "--train-days", "3", "--test-days", "1"]
    assert cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promoted"] is True and first["decision"] == "promoted" and first["champion"] == "1"

    # Same data, same seeds: the challenger cannot beat the champion by the 2 % margin on the same split.
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    for text in (out, err):
        assert "Traceback" not in text and "Stack Trace" not in text and "DagsterAssetCheckFailedError" not in text
    second = json.loads(out)
    assert second["success"] is True and second["promoted"] is False and second["decision"] == "refused"
    assert second["reasons"] and second["reasons"] == second["gate"] and second["registered_version"] == "2"
    assert second["champion"] == "1" and "error" not in second
    # (MLflow may log an INFO line of its own before it)
    assert err.strip().splitlines()[-1] == (
        f"recloop train: version 2 was not promoted: {second['reasons'][0]}; the champion stays 1")

    # The registry: still version 1, the refusal recorded; one model.refused webhook, no retraining.failed.
    registry = open_registry(settings)
    assert str(registry.champion().version) == "1"
    assert (registry.history()[0]["version"], registry.history()[0]["decision"]) == ("2", "refused")
    assert len(webhook_receiver.of_type("model.refused")) == 1

    # Dagster: a successful run, the gate check failed with WARN and its reason, no champion materialization.
    inst = instance(settings)
    run = inst.get_run_by_id(second["run_id"])
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert not inst.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    evaluations = {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data
                   for e in inst.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)}
    # The latency gate of a refused candidate is skipped (nothing to measure) and passes.
    assert set(evaluations) == {"promotion_gate", "latency_gate"} and evaluations["latency_gate"].passed
    evaluation = evaluations["promotion_gate"]
    assert evaluation.passed is False
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description == second["reasons"][0]
    assert evaluation.metadata["decision"].value == "refused"
    materialized = {e.dagster_event.asset_key.to_user_string()
                    for e in inst.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)}
    assert "model/registered_version" in materialized and "model/champion" not in materialized

"""Tests of recloop.drift on small simulated lakes, with the shipped monitoring/drift.yaml.

One stationary world (scenario `none`, days 0-4) and, for each drift scenario, the same lake with day 4
replaced by the scenario's first drifted day (the simulator leaves every day before the drift day
exactly as `none` produces it). Day 4 is compared with days 1-3, as against a champion trained on them.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from recloop.data.simulator import SimConfig, Simulator
from recloop.drift import (
    DEFAULT_CONFIG,
    FRAME_COLUMNS,
    KEY_COLUMNS,
    DriftConfig,
    champion_reference,
    detect_drift,
    partition_frame,
    reference_frame,
    report_key,
)
from recloop.features import compute_features
from recloop.lake import LocalLake, S3Lake

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = dict(seed=5, days=5, initial_users=1_500, initial_videos=500, events_per_day=6_000,
           new_users_per_day=30, new_videos_per_day=15, drift_day=4)
DAYS = [SimConfig(**SIM).date_of(i).isoformat() for i in range(SIM["days"])]
CURRENT, REFERENCE = DAYS[4], DAYS[1:4]
# The column each scenario is there to move, and that must decide on the first drifted day.
SCENARIO_COLUMN = {
    "category_surge": "category",
    "new_user_wave": "user_new_24h",
    "device_shift": "device",
    "watch_time_inflation": "watch_ratio",
}
TABLES = ("users", "videos", "events")
FEATURE_DATASETS = ("features/user_activity", "features/user_category_affinity", "features/video_popularity")


@pytest.fixture(scope="module")
def lakes(tmp_path_factory) -> dict[str, LocalLake]:
    """`none`: silver and feature snapshots of days 0-4; each scenario: a copy whose day 4 is drifted."""
    root = tmp_path_factory.mktemp("drift")
    none = LocalLake(root / "none")
    sim = Simulator(SimConfig(**SIM))
    for i, day in enumerate(DAYS):
        tables = sim.day(i)
        for name in TABLES:
            none.write_partition(f"silver/{name}", day, tables[name])
        compute_features(none, day)
    out = {"none": none}
    for scenario in SCENARIO_COLUMN:
        shutil.copytree(none.root, root / scenario)
        lake = LocalLake(root / scenario)
        tables = Simulator(SimConfig(**SIM, scenario=scenario)).day(4)
        for name in TABLES:  # day 4's own snapshot is not read: the day is served from day 3's
            lake.write_partition(f"silver/{name}", CURRENT, tables[name])
        out[scenario] = lake
    return out


@pytest.fixture(scope="module")
def config() -> DriftConfig:
    return DriftConfig.load()


@pytest.fixture(scope="module")
def stationary(lakes, config):
    return detect_drift(lakes["none"], CURRENT, REFERENCE, config=config)


@pytest.fixture(scope="module")
def champion(lakes, tmp_path_factory):
    """A small champion bundle trained on the reference days, with the model plane's plan metadata."""
    from recloop.model_plane.bundle import load_bundle, save_bundle
    from recloop.model_plane.fit import FitConfig, fit_sources
    from recloop.model_plane.history import History
    from recloop.model_plane.recommender import MultiStageRecommender
    from recloop.training import TwoTowerConfig, load_window

    history = History.from_window(load_window(lakes["none"], REFERENCE))
    parts = fit_sources(history, FitConfig(two_tower=TwoTowerConfig(epochs=2, num_threads=1)))
    rec = MultiStageRecommender(history, parts["item_to_item"], parts["two_tower"], parts["popular"], parts["fresh"],
                                None, mode="two_tower")
    plan = {"train_partitions": REFERENCE, "test_partitions": [CURRENT]}
    bundle = save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", rec, metadata={"plan": plan})
    return bundle, load_bundle(bundle)


# --- the frame ------------------------------------------------------------------------------------


def test_partition_frame_has_one_row_per_impression_and_every_column(lakes):
    lake = lakes["none"]
    frame = partition_frame(lake, CURRENT)
    assert len(frame) == lake.read_partition("silver/events", CURRENT).num_rows
    assert list(frame.columns) == [*KEY_COLUMNS, *FRAME_COLUMNS]
    assert frame[list(FRAME_COLUMNS)].notna().all().all(), "a day with yesterday's snapshot has no gap"
    assert frame["watch_ratio"].between(0, 1).all()
    assert set(frame["user_new_24h"]) == {"true", "false"}
    # snapshot features are the previous day's (what serving read), 0 for users without a row there
    activity = lake.read_partition("features/user_activity", DAYS[3]).to_pandas().set_index("user_id")
    expected = activity["impressions_1d"].reindex(frame["user_id"]).fillna(0).to_numpy()
    assert np.array_equal(frame["user_impressions_1d"].to_numpy(), expected)
    assert (frame["user_impressions_1d"] == 0).any() and (frame["user_impressions_1d"] > 0).any()
    sample = reference_frame(lake, REFERENCE, max_rows=1_000)
    assert len(sample) == 1_000 and set(sample["partition"]) == set(REFERENCE)
    assert sample.equals(reference_frame(lake, REFERENCE, max_rows=1_000)), "the sample is seeded"


# --- decisions ------------------------------------------------------------------------------------


def test_stationary_day_has_no_drift(stationary, config):
    assert stationary.decided and not stationary.drifted
    assert stationary.reasons[0].startswith("no drift: 0 of 20 columns drifted")
    assert all(c.tested and not c.drifted for c in stationary.columns)
    assert [c.column for c in stationary.columns] == list(config.columns)
    for name in ("prediction_drift", "user_embedding_shift"):
        assert not stationary.signals[name].computed
        assert f"{name}: skipped: no champion given" in stationary.reasons
    assert not any(s.drifted for s in stationary.signals.values())


@pytest.mark.parametrize("scenario", list(SCENARIO_COLUMN))
def test_each_scenario_is_detected_on_its_first_day(lakes, config, stationary, scenario):
    result = detect_drift(lakes[scenario], CURRENT, REFERENCE, config=config, write_report=False)
    column = SCENARIO_COLUMN[scenario]
    moved = next(c for c in result.columns if c.column == column)
    assert result.drifted and moved.drifted and moved.alert
    assert moved.explain() in result.reasons
    before = next(c for c in stationary.columns if c.column == column).statistic
    assert moved.statistic > 1.5 * before, f"{column}: {moved.statistic:.3f} vs {before:.3f} when stationary"


def test_champion_signals_stay_put_on_stationary_data_and_move_with_new_users(lakes, config, champion):
    bundle, pipeline = champion
    assert champion_reference(bundle) == REFERENCE
    quiet = detect_drift(lakes["none"], CURRENT, champion_reference(bundle), config=config,
                         champion=pipeline, write_report=False)
    wave = detect_drift(lakes["new_user_wave"], CURRENT, REFERENCE, config=config,
                        champion=pipeline.two_tower.model, write_report=False)
    assert not quiet.drifted and "champion_score" not in {c.column for c in quiet.columns}
    for name in ("prediction_drift", "user_embedding_shift"):
        assert quiet.signals[name].computed and not quiet.signals[name].drifted, quiet.signals[name]
        assert math.isfinite(quiet.summary[f"signal.{name}"])
        assert wave.signals[name].drifted, wave.signals[name]
        # not alerting by default (they grow with the champion's age too): reported, not deciding
        assert f"informational (alert: false): {wave.signals[name].explain()}" in wave.reasons
    alerting = DriftConfig.load(overrides={"signals": {"prediction_drift": {"alert": True}}})
    decided = detect_drift(lakes["new_user_wave"], CURRENT, REFERENCE, config=alerting, champion=pipeline,
                           write_report=False)
    line = decided.signals["prediction_drift"].explain()
    assert line == wave.signals["prediction_drift"].explain()
    assert line in decided.reasons and f"informational (alert: false): {line}" not in decided.reasons


def test_too_few_events_give_no_decision_and_no_alert(lakes):
    strict = DriftConfig.load(overrides={"min_rows": 10_000})
    result = detect_drift(lakes["category_surge"], CURRENT, REFERENCE, config=strict)
    events = int(result.summary["rows.current"])
    assert events < 10_000 <= result.summary["rows.reference"]
    assert not result.decided and not result.drifted and result.report_uri is None
    assert result.reasons == [f"no decision: the partition has {events} events < min_rows 10000"]
    assert not any(c.tested for c in result.columns) and not any(s.computed for s in result.signals.values())
    assert result.summary["decided"] == 0.0 and result.summary["columns.tested"] == 0.0
    assert not lakes["category_surge"].exists(report_key(CURRENT)), "an undecided day writes no report"


def test_a_column_with_too_few_values_is_not_tested_and_says_so(lakes, config):
    # Day 0 has no previous snapshot: its snapshot features are unknown, so they cannot be compared.
    result = detect_drift(lakes["none"], DAYS[1], [DAYS[0]], config=config, write_report=False)
    by_name = {c.column: c for c in result.columns}
    untested = by_name["user_impressions_1d"]
    assert not untested.tested and not untested.drifted
    assert untested.n_reference == 0 and untested.n_current > 0
    note = (f"user_impressions_1d: not tested, {untested.n_current} values in the partition and 0 in the "
            "reference, min_rows 1000")
    assert note in result.reasons
    assert "column.user_impressions_1d" not in result.summary
    assert by_name["device"].tested and result.decided
    cold = result.signals["cold_start_users"]  # a one-day reference has no baseline of its own
    assert cold.values["reference"] == 0.0 and cold.statistic == cold.values["current"] > 0
    assert cold.values["current"] == cold.values["training_window"]


# --- configuration --------------------------------------------------------------------------------


def test_config_file_defaults_and_overrides(tmp_path):
    shipped = DriftConfig.load()
    assert DriftConfig.load(DEFAULT_CONFIG) == shipped
    assert set(shipped.columns) == set(FRAME_COLUMNS)
    assert shipped.columns["device"].method == "jensenshannon"
    assert shipped.columns["watched_s"].method == "wasserstein"
    assert shipped.columns["category"].threshold < shipped.columns["device"].threshold  # per-column override
    assert not shipped.columns["user_tenure_days"].alert

    changed = DriftConfig.load(overrides={"columns": {"device": {"threshold": 0.5}},
                                          "decision": {"drift_share": 0.9}})
    assert changed.columns["device"].threshold == 0.5 and changed.columns["device"].method == "jensenshannon"
    assert changed.drift_share == 0.9 and changed.columns["country"] == shipped.columns["country"]

    own = tmp_path / "drift.yaml"
    own.write_text("min_rows: 5\ndefaults:\n  numerical: {method: psi, threshold: 0.2}\n"
                   "columns:\n  watched_s: {}\n  device: {method: hellinger, threshold: 0.3, alert: false}\n"
                   "signals:\n  cold_start_users: {threshold: 0.5}\n")
    mine = DriftConfig.load(own)
    assert mine.min_rows == 5 and list(mine.columns) == ["watched_s", "device"]
    assert list(mine.signals) == ["cold_start_users"]
    assert (mine.columns["watched_s"].method, mine.columns["watched_s"].threshold) == ("psi", 0.2)
    assert (mine.columns["device"].method, mine.columns["device"].alert) == ("hellinger", False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"columns": {"no_such_column": {}}}, "unknown column(s) ['no_such_column']"),
        ({"columns": {"watched_s": {"method": "ks"}}}, "method 'ks' is not an Evidently distance"),
        ({"columns": {"device": {"method": "wasserstein"}}}, "not an Evidently distance for categorical"),
        ({"columns": {"device": {"threshold": 0}}}, "threshold must be a positive number"),
        ({"signals": {"no_such_signal": {"threshold": 1}}}, "unknown signal(s) ['no_such_signal']"),
        ({"signals": {"user_embedding_shift": {"method": "wasserstein"}}}, "method must be one of"),
        ({"min_rows": 0}, "min_rows must be an integer >= 1"),
        ({"decision": {"drift_share": 1.5}}, "drift_share must be in (0, 1]"),
        ({"treshold": 1}, "unknown key(s) ['treshold']"),
    ],
)
def test_config_errors_name_the_file_and_the_problem(overrides, message):
    with pytest.raises(ValueError) as err:
        DriftConfig.load(overrides=overrides)
    assert str(DEFAULT_CONFIG) in str(err.value) and message in str(err.value)


def test_alert_false_columns_are_reported_but_do_not_decide(lakes):
    lake = lakes["watch_time_inflation"]
    muted = {"columns": {c: {"alert": False} for c in FRAME_COLUMNS}}
    result = detect_drift(lake, CURRENT, REFERENCE, config=DriftConfig.load(overrides=muted),
                          write_report=False)
    assert not result.drifted
    assert any(r.startswith("informational (alert: false): watch_ratio: wasserstein ")
               for r in result.reasons)
    by_share = DriftConfig.load(overrides={**muted, "decision": {"drift_share": 0.1}})
    result = detect_drift(lake, CURRENT, REFERENCE, config=by_share, write_report=False)
    assert result.drifted
    assert re.fullmatch(r"\d+ of 20 columns drifted \(share 0\.\d\d >= drift_share 0\.10\): .*watch_ratio.*",
                        result.reasons[0])


# --- explanations, report, summary, determinism ----------------------------------------------------


def test_reasons_name_the_column_the_statistic_and_the_threshold(lakes, config):
    result = detect_drift(lakes["device_shift"], CURRENT, REFERENCE, config=config, write_report=False)
    device = next(c for c in result.columns if c.column == "device")
    assert re.fullmatch(r"device: jensenshannon 0\.\d{3} >= 0\.100", device.explain())
    assert device.explain() == f"device: jensenshannon {device.statistic:.3f} >= 0.100"
    assert result.reasons[0] == device.explain()
    quiet = next(c for c in result.columns if c.column == "liked")
    assert re.fullmatch(r"liked: jensenshannon 0\.\d{3} < 0\.100", quiet.explain())
    # cold-start: the day's share of users new to the last 2 reference days, above the reference's own
    # (its last day against the 2 days before it)
    cold = result.signals["cold_start_users"]
    now, before = cold.values["current"], cold.values["reference"]
    assert 0 < before and cold.statistic == pytest.approx(now - before)
    assert 0 < cold.values["training_window"] <= now
    sign = ">=" if cold.drifted else "<"
    assert cold.explain() == (
        f"cold_start_users: {cold.statistic:.3f} {sign} {cold.threshold:.3f} (share of impressions whose "
        f"user is not in the 2-day look-back: {now:.3f} of the day's vs {before:.3f} of the reference's "
        "last day)")


def test_report_is_written_to_the_lake_and_readable(lakes, config, stationary):
    lake = lakes["none"]
    assert stationary.report_uri == lake.uri(report_key(CURRENT))
    assert report_key(CURRENT) == f"monitoring/drift/date={CURRENT}/report.html"
    html = lake.read_bytes(report_key(CURRENT)).decode("utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "watch_ratio" in html and "user_new_24h" in html
    silent = detect_drift(lake, DAYS[3], DAYS[:3], config=config, write_report=False)
    assert silent.report_uri is None and not lake.exists(report_key(DAYS[3]))


def test_report_goes_to_s3_lakes_too(lakes, config):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    local = lakes["device_shift"]
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="lake")
        s3 = S3Lake("lake", "prod", client=client)
        for dataset in (*(f"silver/{name}" for name in TABLES), *FEATURE_DATASETS):
            for day in local.partitions(dataset):
                s3.write_partition(dataset, day, local.read_partition(dataset, day))
        on_s3 = detect_drift(s3, CURRENT, REFERENCE, config=config)
        assert on_s3.report_uri == f"s3://lake/prod/monitoring/drift/date={CURRENT}/report.html"
        assert b"device" in s3.read_bytes(report_key(CURRENT))
    on_disk = detect_drift(local, CURRENT, REFERENCE, config=config, write_report=False)
    assert (on_s3.drifted, on_s3.reasons, on_s3.summary) == (
        on_disk.drifted, on_disk.reasons, on_disk.summary)


def test_summary_is_flat_finite_and_the_decision_deterministic(lakes, config, stationary):
    again = detect_drift(lakes["none"], CURRENT, REFERENCE, config=config, write_report=False)
    assert (again.drifted, again.reasons, again.columns, again.signals) == (
        stationary.drifted, stationary.reasons, stationary.columns, stationary.signals)
    assert again.summary == stationary.summary
    summary = stationary.summary
    assert all(isinstance(v, float) and math.isfinite(v) for v in summary.values())
    assert summary["decided"] == 1.0 and summary["drifted"] == 0.0 and summary["columns.tested"] == 20.0
    assert summary["rows.current"] == len(partition_frame(lakes["none"], CURRENT))
    assert {f"column.{c}" for c in FRAME_COLUMNS} <= set(summary)
    assert {"signal.cold_start_users", "signal.popularity_concentration.reference"} <= set(summary)
    json.dumps(summary)  # plain floats: Dagster metadata, JSON, MLflow metrics alike

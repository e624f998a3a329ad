"""The simulator: determinism, schemas, integrity, behavioural signal, drift scenarios and landing output."""

from __future__ import annotations

import io
import tracemalloc
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recloop.data.schemas import AGE_BUCKETS, DEVICES, SURFACES, TABLES
from recloop.data.simulator import (
    BASE_CATEGORIES,
    SCENARIOS,
    SimConfig,
    Simulator,
    category_names,
    simulate,
    table_to_csv,
)
from recloop.lake import LocalLake

SMALL = dict(
    seed=11,
    days=8,
    initial_users=1_500,
    initial_videos=600,
    new_users_per_day=40,
    new_videos_per_day=25,
    events_per_day=6_000,
    drift_day=4,
)


def run_days(**overrides) -> list[dict[str, pa.Table]]:
    config = SimConfig(**{**SMALL, **overrides})
    sim = Simulator(config)
    return [sim.day(i) for i in range(config.days)]


@pytest.fixture(scope="module")
def baseline() -> list[dict[str, pa.Table]]:
    return run_days()


@pytest.fixture(scope="module")
def frames(baseline):
    """Users and videos of all days, events with their video's category/duration and user's signup."""
    users = pd.concat([d["users"].to_pandas() for d in baseline], ignore_index=True)
    videos = pd.concat([d["videos"].to_pandas() for d in baseline], ignore_index=True)
    events = []
    for i, d in enumerate(baseline):
        ev = d["events"].to_pandas()
        ev["day"] = i
        events.append(ev)
    events = pd.concat(events, ignore_index=True)
    video_cols = videos[["video_id", "category", "duration_s", "upload_time"]]
    events = events.merge(video_cols, on="video_id", how="left")
    events = events.merge(users[["user_id", "signup_time"]], on="user_id", how="left")
    events["watched"] = events["watched_s"] > 0
    return users, videos, events


# --- configuration ----------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="valid scenarios: none, category_surge"):
        SimConfig(scenario="alien_invasion")
    with pytest.raises(ValueError, match="days"):
        SimConfig(days=0)
    with pytest.raises(ValueError, match="events_per_day"):
        SimConfig(events_per_day=-5)
    with pytest.raises(ValueError, match="drift_day"):
        SimConfig(scenario="category_surge", days=5, drift_day=5)
    with pytest.raises(ValueError, match="initial_videos"):
        SimConfig(initial_videos=0)
    assert SimConfig(start="2024-03-01").start == date(2024, 3, 1)
    assert set(SCENARIOS) == {
        "none", "category_surge", "new_user_wave", "device_shift", "watch_time_inflation",
    }  # fmt: skip


def test_category_names():
    assert category_names(3) == ["music", "gaming", "news"]
    names = category_names(18)
    assert names[:16] == list(BASE_CATEGORIES) and names[16:] == ["cat17", "cat18"]


# --- determinism and schemas ------------------------------------------------------------------------


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def test_schemas_are_canonical(baseline):
    for d in baseline:
        assert set(d) == {"users", "videos", "events"}
        for name, table in d.items():
            assert table.schema.equals(TABLES[name].schema), name


def test_same_seed_is_byte_identical_and_other_seed_differs(baseline):
    again = run_days(days=3)
    for i in range(3):
        for name in ("users", "videos", "events"):
            assert _ipc_bytes(again[i][name]) == _ipc_bytes(baseline[i][name]), (i, name)
    other = run_days(days=2, seed=12)
    for name in ("users", "videos", "events"):
        assert not other[1][name].equals(baseline[1][name]), name


def test_random_access_matches_sequential(baseline):
    sim = Simulator(SimConfig(**SMALL))
    assert sim.day(5)["events"].equals(baseline[5]["events"])
    assert sim.day(2)["events"].equals(baseline[2]["events"])  # going back rebuilds the population
    assert sim.day(3)["users"].equals(baseline[3]["users"])


def test_event_count_close_to_config(baseline):
    counts = np.array([d["events"].num_rows for d in baseline])
    assert np.all(np.abs(counts / SMALL["events_per_day"] - 1) < 0.06), counts


# --- population and integrity -----------------------------------------------------------------------


def test_day_zero_holds_initial_population_and_later_days_only_arrivals(baseline):
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    users0 = baseline[0]["users"].to_pandas()
    videos0 = baseline[0]["videos"].to_pandas()
    assert len(users0) == SMALL["initial_users"] + SMALL["new_users_per_day"]
    assert len(videos0) == SMALL["initial_videos"] + SMALL["new_videos_per_day"]
    initial = users0["signup_time"] < start
    assert initial.sum() == SMALL["initial_users"]
    assert users0["signup_time"].min() >= start - timedelta(days=365)
    # the initial population is spread over the year, not bunched
    initial_signups = users0.loc[initial, "signup_time"]
    assert initial_signups.max() - initial_signups.min() > timedelta(days=300)
    assert (videos0["upload_time"] < start).sum() == SMALL["initial_videos"]
    for i, d in enumerate(baseline[1:], start=1):
        lo, hi = start + timedelta(days=i), start + timedelta(days=i + 1)
        users, videos = d["users"].to_pandas(), d["videos"].to_pandas()
        assert len(users) == SMALL["new_users_per_day"] and len(videos) == SMALL["new_videos_per_day"]
        assert users["signup_time"].between(lo, hi, inclusive="left").all()
        assert videos["upload_time"].between(lo, hi, inclusive="left").all()


def test_ids_and_value_domains(frames):
    users, videos, events = frames
    assert users["user_id"].is_unique and videos["video_id"].is_unique and events["event_id"].is_unique
    assert users["user_id"].str.fullmatch(r"u\d{7}").all()
    assert videos["video_id"].str.fullmatch(r"v\d{7}").all()
    assert videos["creator_id"].str.fullmatch(r"c\d{5}").all()
    assert events["event_id"].str.fullmatch(r"e\d{5}-\d{8}").all()
    assert set(users["device"]) <= set(DEVICES) and set(users["age_bucket"]) <= set(AGE_BUCKETS)
    assert 3 <= users["country"].nunique() <= 12
    assert users["country"].value_counts(normalize=True).iloc[0] > 0.2  # skewed
    assert set(events["surface"]) == set(SURFACES)
    assert set(videos["category"]) <= set(BASE_CATEGORIES)
    n_tags = videos["tags"].str.count(r"\|") + 1
    assert n_tags.between(1, 4).all() and set(n_tags) == {1, 2, 3, 4}
    assert (videos["title"].str.len() > 0).all() and (videos["duration_s"] > 0).all()
    # tags come from a per-category vocabulary: every category's vocabulary holds its own name
    exploded = videos.assign(tag=videos["tags"].str.split("|")).explode("tag")
    assert exploded.groupby("category")["tag"].nunique().max() <= 8
    assert (exploded["tag"] == exploded["category"]).any()


def test_referential_integrity_and_times(frames):
    users, videos, events = frames
    assert events["category"].notna().all(), "event references an unknown video"
    assert events["signup_time"].notna().all(), "event references an unknown user"
    assert (events["event_time"] > events["signup_time"]).all()
    assert (events["event_time"] > events["upload_time"]).all()
    day_start = pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(events["day"], unit="D")
    assert (events["event_time"] >= day_start).all()
    assert (events["event_time"] < day_start + pd.Timedelta(days=1)).all()
    # new users and new videos do take part the day they arrive
    new_users = users.loc[users["signup_time"] >= pd.Timestamp("2025-01-02", tz="UTC"), "user_id"]
    assert events["user_id"].isin(new_users).sum() > 0
    same_day_video = events["upload_time"] >= day_start
    assert same_day_video.sum() > 0


def test_engagement_consistency(frames):
    _, _, events = frames
    assert (events["watched_s"] <= events["duration_s"]).all()
    assert (events["watched_s"] >= 0).all()
    watched = events["watched"]
    assert np.array_equal(events["completed"], watched & (events["watched_s"] >= 0.9 * events["duration_s"]))
    assert not events.loc[~watched, "liked"].any()
    assert not events.loc[~watched, "completed"].any()
    rate = watched.mean()
    assert 0.1 < rate < 0.7, rate
    assert 0.02 < events.loc[watched, "liked"].mean() < 0.6
    assert events["position"].min() == 0 and events["position"].max() >= 9


# --- behaviour --------------------------------------------------------------------------------------


def test_position_bias(frames):
    _, _, events = frames
    by_pos = events.groupby("position")["watched"].mean()
    assert by_pos[0] > 1.3 * by_pos[9], by_pos.to_dict()
    assert by_pos[0] > by_pos[5] > by_pos[12]


def test_popularity_is_heavy_tailed(frames):
    _, videos, events = frames
    counts = events["video_id"].value_counts()
    top = counts.iloc[: max(1, len(videos) // 100)].sum() / len(events)
    assert top > 0.10, top  # the top 1% of videos take >10x their uniform share


def test_freshness_boost(baseline, frames):
    """Videos uploaded in the two days before a day get more impressions per video than old ones."""
    _, videos, _ = frames
    upload = videos.set_index("video_id")["upload_time"]
    fresh_rate, old_rate = [], []
    for i in range(2, len(baseline)):
        start = pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=i)
        shown = baseline[i]["events"]["video_id"].to_pandas()
        fresh = upload[(upload >= start - pd.Timedelta(days=2)) & (upload < start)].index
        old = upload[upload < start - pd.Timedelta(days=30)].index
        fresh_rate.append(shown.isin(fresh).sum() / len(fresh))
        old_rate.append(shown.isin(old).sum() / len(old))
    assert sum(fresh_rate) > 2 * sum(old_rate), (fresh_rate, old_rate)


def test_learnable_signal_users_watch_their_categories(frames):
    """A category learned from a user's past watches predicts their future watches far above the base rate."""
    _, _, events = frames
    past, future = events[events["day"] < 5], events[events["day"] >= 5]
    fav = past[past["watched"]].groupby(["user_id", "category"]).size().reset_index(name="n")
    fav = fav.sort_values(["user_id", "n"], ascending=[True, False]).drop_duplicates("user_id")
    future = future.merge(fav[["user_id", "category"]].rename(columns={"category": "fav"}), on="user_id")
    in_fav = future["category"] == future["fav"]
    base = future["watched"].mean()
    assert future.loc[in_fav, "watched"].mean() > 1.4 * base
    assert future.loc[in_fav, "watched"].mean() > 2.0 * future.loc[~in_fav, "watched"].mean()
    # and such preferences are visible in who is shown what: impressions concentrate on a few categories
    share_top = future.groupby("user_id")["category"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert share_top.mean() > 2.5 / 16


# --- drift scenarios --------------------------------------------------------------------------------


def _share(days, fn):
    return np.array([fn(d) for d in days])


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "none"])
def test_days_before_drift_are_identical_to_none(baseline, scenario):
    drifted = run_days(scenario=scenario, days=SMALL["drift_day"] + 1)
    for i in range(SMALL["drift_day"]):
        for name in ("users", "videos", "events"):
            assert drifted[i][name].equals(baseline[i][name]), (scenario, i, name)
    assert not drifted[SMALL["drift_day"]]["events"].equals(baseline[SMALL["drift_day"]]["events"])


def _category_share(category, videos_by_id):
    def share(d):
        cats = d["events"]["video_id"].to_pandas().map(videos_by_id)
        return (cats == category).mean()

    return share


def test_category_surge(baseline, frames):
    sim = Simulator(SimConfig(**SMALL, scenario="category_surge"))
    days = [sim.day(i) for i in range(SMALL["days"])]
    videos = pd.concat([d["videos"].to_pandas() for d in days]).set_index("video_id")["category"]
    stat = _category_share(sim.surge_category, videos)
    surged, none = _share(days, stat), _share(baseline, stat)
    k = SMALL["drift_day"]
    np.testing.assert_array_equal(surged[:k], none[:k])
    assert surged[k:].min() > 2.0 * none[k:].max(), (surged, none)


def _new_user_share(d):
    return d["events"]["user_id"].to_pandas().isin(d["users"]["user_id"].to_pandas()).mean()


def test_new_user_wave(baseline):
    days = run_days(scenario="new_user_wave")
    k = SMALL["drift_day"]
    rows = np.array([d["users"].num_rows for d in days])
    assert (rows[1:k] == SMALL["new_users_per_day"]).all()
    assert (rows[k:] == 10 * SMALL["new_users_per_day"]).all()
    wave, none = _share(days[1:], _new_user_share), _share(baseline[1:], _new_user_share)
    np.testing.assert_array_equal(wave[: k - 1], none[: k - 1])
    assert wave[k - 1 :].min() > 3 * none[k - 1 :].max(), (wave, none)


def test_device_shift(baseline):
    days = run_days(scenario="device_shift")
    k = SMALL["drift_day"]

    def tv_share_new(d):
        return (d["users"]["device"].to_pandas() == "tv").mean()

    def top_country(d):
        return d["users"]["country"].to_pandas().value_counts().index[0]

    shifted, none = _share(days[1:], tv_share_new), _share(baseline[1:], tv_share_new)
    np.testing.assert_array_equal(shifted[: k - 1], none[: k - 1])
    assert none.max() < 0.2 and shifted[k - 1 :].min() > 0.3, (shifted, none)
    # a different country leads among all users who arrive after the drift
    after = pd.concat([d["users"].to_pandas() for d in days[k:]])
    before = pd.concat([d["users"].to_pandas() for d in baseline[k:]])
    assert after["country"].value_counts().index[0] != before["country"].value_counts().index[0]
    # and the active users move too: the tv share of impressions rises
    all_users = pd.concat([d["users"].to_pandas() for d in days]).set_index("user_id")["device"]

    def tv_share_active(d):
        return (d["events"]["user_id"].to_pandas().map(all_users) == "tv").mean()

    active_shift, active_none = _share(days, tv_share_active), _share(baseline, tv_share_active)
    assert active_shift[k:].min() > 2 * active_none[k:].max()
    assert top_country(days[0]) == top_country(baseline[0])


def test_watch_time_inflation(baseline, frames):
    days = run_days(scenario="watch_time_inflation")
    _, videos, _ = frames
    duration = videos.set_index("video_id")["duration_s"]

    def mean_fraction(d):
        ev = d["events"].to_pandas()
        ev = ev[ev["watched_s"] > 0]
        return (ev["watched_s"] / ev["video_id"].map(duration)).mean()

    inflated, none = _share(days, mean_fraction), _share(baseline, mean_fraction)
    k = SMALL["drift_day"]
    np.testing.assert_array_equal(inflated[:k], none[:k])
    assert inflated[k:].min() > none[k:].max() + 0.1, (inflated, none)


# --- writing to the landing zone --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_simulate_writes_landing_layout(tmp_path, fmt, baseline):
    config = SimConfig(**{**SMALL, "days": 3})
    lake = LocalLake(tmp_path)
    summary = simulate(config, lake, fmt=fmt)
    dates = ["2025-01-01", "2025-01-02", "2025-01-03"]
    assert summary.dates == dates and summary.seconds > 0
    expected = {f"{t}/date={d}/part-0.{fmt}" for t in ("users", "videos", "events") for d in dates}
    assert set(lake.list_keys("")) == expected
    for name in ("users", "videos", "events"):
        counted = []
        for i, d in enumerate(dates):
            data = lake.read_bytes(f"{name}/date={d}/part-0.{fmt}")
            schema = TABLES[name].schema
            if fmt == "parquet":
                table = pq.read_table(io.BytesIO(data))
            else:
                text = data.decode("utf-8")
                assert text.splitlines()[0].replace('"', "").split(",") == schema.names
                table = pacsv.read_csv(
                    io.BytesIO(data),
                    convert_options=pacsv.ConvertOptions(
                        column_types={f.name: f.type for f in schema}, strings_can_be_null=False
                    ),
                )
            assert table.cast(schema).equals(baseline[i][name]), (name, d)
            counted.append(table.num_rows)
        assert summary.rows[name] == counted
        assert summary.totals[name] == sum(counted)
    assert summary.events_per_second > 0


def test_csv_conventions(baseline):
    text = table_to_csv(baseline[1]["events"].slice(0, 50)).decode("utf-8")
    first = text.splitlines()[1]
    assert "T" in first and first.count("Z") == 1  # ISO-8601 UTC timestamp
    assert ",true" in text or ",false" in text
    videos = table_to_csv(baseline[1]["videos"]).decode("utf-8")
    assert "|" in videos and "2025-01-02T" in videos


def test_csv_rerun_replaces_parquet(tmp_path):
    lake = LocalLake(tmp_path)
    config = SimConfig(**{**SMALL, "days": 1})
    simulate(config, lake, fmt="parquet")
    simulate(config, lake, fmt="csv")
    assert lake.list_keys("events/") == ["events/date=2025-01-01/part-0.csv"]


def test_memory_stays_flat_as_days_grow(tmp_path):
    def peak(days: int) -> int:
        config = SimConfig(**{**SMALL, "days": days, "events_per_day": 20_000})
        tracemalloc.start()
        simulate(config, LocalLake(tmp_path / f"d{days}"))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(2), peak(6)
    assert long < 1.3 * short, (short, long)

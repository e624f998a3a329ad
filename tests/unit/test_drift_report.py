"""The drift report a person reads (recloop.drift_report), on a hand-made lake: three reference days and a
day on which one column surged (`category`: music goes from 10 % to 40 % of the impressions), everything
else drawn from the same distributions. No feature snapshot exists, so the five snapshot columns are not
tested: 15 columns are.

The report is Evidently's single-page app: the widgets are JSON in the HTML, drawn in their order.
`dashboard` reads them back and `texts` flattens them in reading order, so the tests check what a person
sees first."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recloop.drift import (
    CATEGORICAL,
    NUMERICAL,
    ColumnDrift,
    DriftConfig,
    detect_drift,
    report_key,
    summary_key,
)
from recloop.drift_report import (
    MISSING,
    highlighted,
    largest_change,
    ordered_columns,
    relative_by_default,
    share_table,
)
from recloop.lake import LocalLake

DAYS = [date(2025, 3, d).isoformat() for d in (1, 2, 3, 4)]
REFERENCE, DAY = DAYS[:3], DAYS[3]
CATEGORIES = ["music", "gaming", "news", "sports", "comedy", "food", "travel", "tech", "pets", "diy"]
EVENTS_PER_DAY = 4_000
N_USERS, N_VIDEOS = 400, 300
TESTED = 15  # FRAME_COLUMNS without the five read from feature snapshots (none here)


def _day(rng: np.random.Generator, day: str, music_share: float) -> pa.Table:
    """One day of events: uniform users; videos uniform within a category, music drawn `music_share` of the
    time and the other categories evenly."""
    p = np.full(len(CATEGORIES), (1 - music_share) / (len(CATEGORIES) - 1))
    p[0] = music_share
    category = rng.choice(len(CATEGORIES), EVENTS_PER_DAY, p=p)
    per_category = N_VIDEOS // len(CATEGORIES)
    video = category * per_category + rng.integers(0, per_category, EVENTS_PER_DAY)
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    seconds = np.sort(rng.uniform(0, 86_399, EVENTS_PER_DAY))
    watched = rng.gamma(2.0, 60.0, EVENTS_PER_DAY)
    return pa.table({
        "event_id": [f"{day}-{i}" for i in range(EVENTS_PER_DAY)],
        "user_id": [f"u{u:04d}" for u in rng.integers(0, N_USERS, EVENTS_PER_DAY)],
        "video_id": [f"v{v:04d}" for v in video],
        "event_time": pa.array([start + timedelta(seconds=float(s)) for s in seconds],
                               pa.timestamp("us", tz="UTC")),
        "surface": rng.choice(["home", "related", "search"], EVENTS_PER_DAY, p=[0.6, 0.3, 0.1]),
        "position": pa.array(rng.integers(0, 10, EVENTS_PER_DAY), pa.int32()),
        "watched_s": watched,
        "completed": rng.random(EVENTS_PER_DAY) < 0.3,
        "liked": rng.random(EVENTS_PER_DAY) < 0.05,
    })


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> LocalLake:
    rng = np.random.default_rng(11)
    lake = LocalLake(tmp_path_factory.mktemp("drift-report"))
    long_ago = datetime(2024, 1, 1, tzinfo=UTC)
    users = pa.table({
        "user_id": [f"u{u:04d}" for u in range(N_USERS)],
        "country": rng.choice(["US", "DE", "BR", "IN"], N_USERS),
        "age_bucket": rng.choice(["18-24", "25-34", "35-54", "55+"], N_USERS),
        "signup_time": pa.array([long_ago + timedelta(days=float(d)) for d in rng.uniform(0, 300, N_USERS)],
                                pa.timestamp("us", tz="UTC")),
        "device": rng.choice(["ios", "android", "web"], N_USERS),
    })
    per_category = N_VIDEOS // len(CATEGORIES)
    videos = pa.table({
        "video_id": [f"v{v:04d}" for v in range(N_VIDEOS)],
        "category": [CATEGORIES[v // per_category] for v in range(N_VIDEOS)],
        "duration_s": rng.uniform(60, 900, N_VIDEOS),
        "upload_time": pa.array([long_ago + timedelta(days=float(d)) for d in rng.uniform(0, 300, N_VIDEOS)],
                                pa.timestamp("us", tz="UTC")),
    })
    lake.write_partition("silver/users", DAYS[0], users)
    lake.write_partition("silver/videos", DAYS[0], videos)
    for day in DAYS:
        lake.write_partition("silver/events", day, _day(rng, day, 0.4 if day == DAY else 0.1))
    return lake


@pytest.fixture(scope="module")
def surged(lake):
    return detect_drift(lake, DAY, REFERENCE, config=DriftConfig.load(), champion_version="7")


def dashboard(html: str) -> list[dict]:
    """The report's widgets as Evidently's page draws them (the dashboard JSON embedded in the HTML)."""
    found = re.search(r"var (metric_[0-9a-f]+) = (\{.*?\});\n", html, flags=re.S)
    assert found, "no Evidently dashboard in the HTML"
    (outer,) = json.loads(found.group(2))["widgets"]  # Evidently wraps everything in one group
    return outer["widgets"]


def texts(widget: dict) -> list[str]:
    """Everything a widget shows, in reading order: title, text, counters, table cells, insights, tabs and
    children."""
    out = [widget.get("title") or ""]
    params = widget.get("params") or {}
    if isinstance(params, dict):
        out.append(params.get("text") or "")
        out += [f"{c['value']} {c['label']}" for c in params.get("counters") or []]
        if widget["type"] == "table":
            out += [" | ".join(params["header"]), *(" | ".join(row) for row in params["data"])]
    out += [f"{i['title']} {i['text']}" for i in widget.get("insights") or []]
    for tab in widget.get("tabs") or []:
        out += [tab["title"], *texts(tab["widget"])]
    for child in widget.get("widgets") or []:
        out += texts(child)
    return [t for t in out if t]


def graphs(widget: dict) -> list[dict]:
    """The plotly charts in a widget, its tabs and children."""
    out = [widget["params"]] if widget["type"] == "big_graph" else []
    for tab in widget.get("tabs") or []:
        out += graphs(tab["widget"])
    for child in widget.get("widgets") or []:
        out += graphs(child)
    return out


def test_header_says_day_champion_window_and_which_column_drifted_why(lake, surged):
    assert surged.drifted and [c.column for c in surged.columns if c.drifted] == ["category"]
    category = next(c for c in surged.columns if c.column == "category")
    widgets = dashboard(lake.read_bytes(report_key(DAY)).decode("utf-8"))
    verdict, header = widgets[:2]
    assert verdict["type"] == "counter" and verdict["title"] == f"Drift report of {DAY}: DRIFTED"
    counters = {c["label"]: c["value"] for c in verdict["params"]["counters"]}
    assert counters == {"decision": "DRIFTED", "columns drifted": f"1 of {TESTED}",
                        "signals breached": "0 of 3", "champion": "v7", "reference days": "3"}
    (insight,) = verdict["insights"]
    assert insight["severity"] == "error"
    assert insight["text"].startswith(f"DRIFTED: 1 of {TESTED} columns drifted (category)")
    assert not any(w.get("alerts") for w in widgets), "Evidently's page fails to draw widget alerts"
    assert header["type"] == "text"
    text = header["params"]["text"]
    assert f"**Day** {DAY}" in text and "**champion** v7" in text
    assert f"**reference window** {REFERENCE[0]} to {REFERENCE[-1]} (3 days)" in text
    assert f"**1 of {TESTED} columns drifted**: `category`" in text
    # why: the test, its statistic and its threshold, and which value moved
    assert (f"`category` (categorical): jensenshannon {category.statistic:.3f} >= threshold 0.065 "
            "(Jensen-Shannon distance), alerting: decides alone") in text
    assert re.search(r"largest share change: music: \d{1,2}\.\d% of the reference -> [34]\d\.\d% of the day "
                     r"\(\+[23]\d\.\d pp\)", text), text
    assert category.explain() in text  # the decision's reasons follow


def test_signals_with_values_thresholds_and_breaches_are_in_the_header(lake, surged):
    widgets = dashboard(lake.read_bytes(report_key(DAY)).decode("utf-8"))
    (signals,) = [w for w in widgets if w["title"].startswith("Recommender signals")]
    rows = {row[0]: row for row in signals["params"]["data"]}
    assert signals["params"]["header"][:4] == ["signal", "statistic", "threshold", "breached"]
    config = DriftConfig.load()
    assert set(rows) == set(config.signals)
    for name, signal in surged.signals.items():
        row = rows[name]
        assert row[2] == f"{config.signals[name].threshold:.3f}"
        if signal.computed:
            assert row[1] == f"{signal.statistic:.3f}" and row[3] == ("YES" if signal.drifted else "no")
        else:
            assert row[3] == "skipped" and "no champion given" in row[-1]
    popularity = surged.signals["popularity_concentration"]
    assert rows["popularity_concentration"][5:7] == [f"{popularity.values['current']:.3f}",
                                                     f"{popularity.values['reference']:.3f}"]
    text = widgets[1]["params"]["text"]
    computed = sum(s.computed for s in surged.signals.values())
    assert f"**0 of {computed} recommender signals breached their threshold**." in text
    assert "`prediction_drift` (no champion given)" in text


def test_drifted_column_comes_first_highlighted_and_in_shares(lake, surged):
    widgets = dashboard(lake.read_bytes(report_key(DAY)).decode("utf-8"))
    flat = [t for w in widgets for t in texts(w)]

    def first(needle: str) -> int:
        return next(i for i, t in enumerate(flat) if needle in t)

    assert first(f"Drift report of {DAY}") == 0
    category = first("Drift in column 'category'")
    others = [first(f"Drift in column '{c.column}'") for c in surged.columns
              if c.tested and c.column != "category"]
    assert len(others) == TESTED - 1 and category < min(others)
    drifted_group = next(w for w in widgets
                         if w["type"] == "group" and w["title"].startswith("Drifted (1): category"))
    block = drifted_group["widgets"][0]
    assert block["title"] == "DRIFTED: category" and block["insights"][0]["severity"] == "error"
    assert block["insights"][0]["text"].startswith("category: jensenshannon ")
    assert sum(w.get("title") == "DRIFTED: category" for w in widgets + drifted_group["widgets"]) == 1
    # its relative distribution: shares of the day against the reference, music on top of the changes
    (shares,) = [w for w in drifted_group["widgets"]
                 if w["title"] == "category: shares of the day vs the reference"]
    bars = {t["name"]: dict(zip(t["x"], t["y"], strict=True)) for t in shares["params"]["data"]}
    assert bars["reference"]["music"] == pytest.approx(10, abs=2.5)
    assert bars["current (the day)"]["music"] == pytest.approx(40, abs=2.5)
    assert sum(bars["current (the day)"].values()) == pytest.approx(100)
    (changes,) = [w for w in drifted_group["widgets"] if w["title"] == "category: largest share changes"]
    assert changes["params"]["data"][0][0] == "music" and changes["params"]["data"][0][3].startswith("+")
    # Evidently's own distribution charts open on their "perc" view, the distribution tab first
    charts = [g for w in widgets for g in graphs(w) if g["layout"].get("updatemenus")]
    assert len(charts) == TESTED
    for chart in charts:
        (menu,) = chart["layout"]["updatemenus"]
        perc = [b["label"] for b in menu["buttons"]].index("perc")
        assert menu["active"] == perc and chart["layout"]["yaxis"]["title"]["text"] == "Percent"
        assert [t["visible"] for t in chart["data"]] == menu["buttons"][perc]["args"][0]["visible"]
    assert all(w["tabs"][0]["title"] == "DATA DISTRIBUTION" for g in widgets for w in g.get("widgets", [])
               if w["type"] == "tabs")


def test_summary_json_sits_next_to_the_report(lake, surged):
    assert surged.summary_uri == lake.uri(summary_key(DAY))
    assert summary_key(DAY) == f"monitoring/drift/date={DAY}/summary.json"
    summary = json.loads(lake.read_bytes(summary_key(DAY)))
    assert summary["report"] == surged.report_uri == lake.uri(report_key(DAY))
    assert (summary["partition"], summary["champion_version"], summary["verdict"]) == (DAY, "7", "DRIFTED")
    assert summary["reference"] == {"partitions": REFERENCE, "first": REFERENCE[0], "last": REFERENCE[-1],
                                    "days": 3}
    assert summary["columns"]["tested"] == TESTED and summary["columns"]["drifted_names"] == ["category"]
    assert len(summary["columns"]["not_tested"]) == 20 - TESTED
    (category,) = summary["drifted_columns"]
    assert category["method"] == "jensenshannon" and category["threshold"] == 0.065
    assert category["statistic"] == pytest.approx(next(c.statistic for c in surged.columns if c.drifted))
    change = category["largest_share_change"]
    assert change["bin"] == "music" and change["change"] == pytest.approx(0.3, abs=0.04)
    assert [c["column"] for c in summary["all_columns"]][0] == "category"
    assert {s["name"]: s["threshold"] for s in summary["signals"]} == {
        name: rule.threshold for name, rule in DriftConfig.load().signals.items()}
    assert summary["numbers"] == surged.summary and summary["reasons"] == surged.reasons
    assert summary["headline"].startswith(f"DRIFTED: 1 of {TESTED} columns drifted (category)")


def test_a_quiet_day_says_so_and_has_no_drifted_section(lake):
    quiet = detect_drift(lake, DAYS[2], DAYS[:2], config=DriftConfig.load())
    assert not quiet.drifted
    widgets = dashboard(lake.read_bytes(report_key(DAYS[2])).decode("utf-8"))
    assert widgets[0]["title"] == f"Drift report of {DAYS[2]}: NO DRIFT"
    assert widgets[0]["insights"][0]["severity"] == "success"
    assert f"**0 of {TESTED} columns drifted**." in widgets[1]["params"]["text"]
    assert "**champion** none given" in widgets[1]["params"]["text"]
    assert not any(w["title"].startswith("Drifted") for w in widgets)
    assert [w["title"] for w in widgets if w["type"] == "group"] == [
        f"Without drift ({TESTED}), in monitoring/drift.yaml's order"]
    summary = json.loads(lake.read_bytes(summary_key(DAYS[2])))
    assert summary["verdict"] == "NO DRIFT" and summary["drifted_columns"] == []
    assert summary["champion_version"] is None


# --- the pieces --------------------------------------------------------------------------------------


def test_share_table_categorical_counts_missing_and_pools_the_tail():
    reference = pd.Series(["a"] * 60 + ["b"] * 30 + [None] * 10)
    current = pd.Series(["a"] * 20 + ["b"] * 30 + ["c"] * 50)
    table = share_table(current, reference, CATEGORICAL).set_index("bin")
    assert list(table.index) == ["a", "b", MISSING, "c"]
    assert table.loc["a"].tolist() == pytest.approx([0.6, 0.2, -0.4])
    assert table.loc["c"].tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert table["reference"].sum() == pytest.approx(1) and table["current"].sum() == pytest.approx(1)
    assert largest_change(table.reset_index()) == pytest.approx({"bin": "c", "reference": 0.0, "current": 0.5,
                                                                "change": 0.5})
    many = pd.Series([f"v{i}" for i in range(40)])
    pooled = share_table(many, many, CATEGORICAL)
    assert len(pooled) == 16 and pooled["bin"].iloc[-1] == "(other)"
    assert pooled["reference"].sum() == pytest.approx(1)


def test_share_table_numerical_uses_reference_deciles_open_at_both_ends():
    reference = pd.Series(np.arange(1000, dtype=float))
    current = pd.Series([-5.0] * 10 + [5000.0] * 30 + [np.nan] * 10 + list(np.arange(50, dtype=float)))
    table = share_table(current, reference, NUMERICAL).set_index("bin")
    assert table.index[0].startswith("< ") and table.index[-2].startswith(">= ")
    assert table.index[-1] == MISSING
    assert len(table) == 11
    assert table["reference"].iloc[:10].tolist() == pytest.approx([0.1] * 10)
    assert table["current"].iloc[0] == pytest.approx(0.6)   # -5 and 0..49 are below the first decile
    assert table["current"].iloc[9] == pytest.approx(0.3)   # 5000 is beyond the reference: the last bin
    assert table.loc[MISSING, "current"] == pytest.approx(0.1) and table.loc[MISSING, "reference"] == 0
    zeros = share_table(pd.Series([0.0, 1.0, 1.0]), pd.Series([0.0] * 95 + [3.0] * 5), NUMERICAL)
    assert zeros["bin"].tolist() == ["< 0", ">= 0"] and zeros["current"].tolist() == pytest.approx([0, 1])


def _column(name: str, statistic: float, threshold: float = 0.1, alert: bool = True) -> ColumnDrift:
    return ColumnDrift(name, CATEGORICAL, "jensenshannon", statistic, threshold, statistic >= threshold, 5000,
                       5000, alert)


def test_ordered_columns_put_alerting_drift_first_then_by_distance_to_the_threshold():
    columns = [_column("a", 0.05), _column("b", 0.3, alert=False), _column("c", math.nan), _column("d", 0.12),
               _column("e", 0.25), _column("f", 0.01)]
    assert [c.column for c in ordered_columns(columns)] == ["e", "d", "b", "a", "f", "c"]


def test_relative_by_default_presses_perc_and_leaves_other_widgets_alone():
    from evidently.legacy.model.widget import BaseWidgetInfo

    buttons = [
        {"label": "abs", "method": "update",
         "args": [{"visible": [True, False]}, {"yaxis": {"title": "Count"}}]},
        {"label": "perc", "method": "update",
         "args": [{"visible": [False, True]}, {"yaxis": {"title": "Percent"}}]},
    ]
    chart = BaseWidgetInfo(type="big_graph", title="", size=2, params={
        "data": [{"visible": True}, {"visible": False}],
        "layout": {"yaxis": {"title": {"text": "Count"}, "range": [0, 1]},
                   "updatemenus": [{"buttons": buttons}]}})
    switched = relative_by_default(chart)
    assert [t["visible"] for t in switched.params["data"]] == [False, True]
    assert switched.params["layout"]["yaxis"] == {"title": {"text": "Percent"}, "range": [0, 1]}
    assert switched.params["layout"]["updatemenus"][0]["active"] == 1
    assert chart.params["data"][0]["visible"] is True, "the original is left as it was"
    odd = BaseWidgetInfo(type="big_graph", title="", size=2, params={
        "data": [{"visible": True}], "layout": {"updatemenus": [{"buttons": buttons}]}})  # 1 trace, 2 flags
    assert relative_by_default(odd).params == odd.params
    drifted = highlighted([BaseWidgetInfo(type="counter", title="", size=2, params={"counters": []})],
                          _column("device", 0.3, alert=False))
    assert drifted[0].title == "DRIFTED: device" and not drifted[0].alerts
    assert drifted[0].insights[0].severity == "warning"
    assert drifted[0].insights[0].text == "device: jensenshannon 0.300 >= 0.100, informational, alert: false"

"""The drift report a person reads in ten seconds: Evidently 0.7, with recloop's summary on top.

`recloop.drift.detect_drift` tests every column with one Evidently `Report` of `ValueDrift` metrics and
decides. This module turns that into the report saved next to the decision
(`monitoring/drift/date=D/report.html`) and its machine-readable twin (`summary.json`):

1. The summary, an Evidently metric of recloop's own (`DriftSummary`, Evidently's documented custom-metric
   API: a `SingleValueMetric` and its `SingleValueCalculation` with its own widgets): the day, the
   champion's version, the reference window, "N of M columns drifted" and which, each with its test, its
   statistic and its threshold (why), the recommender signals with their values, thresholds and whether
   each breached, the decision and its reasons, then every tested column by statistic / threshold.
2. The drifted columns first, highlighted (a red "DRIFTED" insight on Evidently's own block; amber for a
   column with `alert: false`), each followed by `ShareShift`, a second metric of recloop's own: the
   share of the day's and the reference's impressions per value (categorical) or per reference decile
   (numerical), and the largest changes in percentage points. One day against a week shown in absolute
   counts hides a surge; in shares it is the first thing one sees.
3. Then the columns without drift, Evidently's blocks in monitoring/drift.yaml's order.

Every Evidently distribution chart opens on its "perc" view (`ValueDrift` has no option for it: its
render fixes absolute counts with an abs/perc button; the chart is switched the way its own "perc"
button would) and on its distribution tab.

The two parts are two Evidently runs: the `ValueDrift` report (the expensive one, run once by
`column_drift`) and a small one of the two custom metrics, on the drifted columns only. `build_report`
merges them into one `Snapshot` through Evidently's snapshot model (`Snapshot.to_snapshot_model`,
`Snapshot.load_model`): one HTML file, and `snapshot.dict()` holds every metric of both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.metric_types import SingleValue, SingleValueCalculation, SingleValueMetric
from evidently.core.report import Context, Snapshot
from evidently.core.serialization import ReportModel, SnapshotModel
from evidently.legacy.model.widget import BaseWidgetInfo, Insight
from evidently.legacy.renderers.html_widgets import (
    CounterData,
    counter,
    group_widget,
    plotly_figure,
    table_data,
    text_widget,
)
from plotly import graph_objects as go

from recloop.drift import (
    CATEGORICAL,
    NUMERICAL,
    ColumnDrift,
    DriftResult,
    Signal,
)

# What the distance methods drift.yaml accepts are (Evidently's widgets name them too).
METHOD_NAMES = {
    "wasserstein": "Wasserstein distance over the reference's standard deviation",
    "ed": "energy distance",
    "jensenshannon": "Jensen-Shannon distance",
    "psi": "PSI",
    "hellinger": "Hellinger distance",
    "kl_div": "Kullback-Leibler divergence",
}
MISSING, OTHER = "(missing)", "(other)"
SHARE_MAX_VALUES = 15  # categorical values drawn one by one; the rest are pooled as "(other)"
SHARE_QUANTILES = np.linspace(0.1, 0.9, 9)  # numerical columns: the reference's deciles

VERDICTS = {(True, True): "DRIFTED", (True, False): "NO DRIFT", (False, False): "NO DECISION",
            (False, True): "NO DECISION"}


# --------------------------------------------------------------------------------------------------
# Share comparison (relative distributions)
# --------------------------------------------------------------------------------------------------


def _number(x: float) -> str:
    return f"{x:.4g}"


def share_table(current: pd.Series, reference: pd.Series, kind: str) -> pd.DataFrame:
    """The share of `current`'s and `reference`'s values in each bin, and the change (current - reference),
    one row per bin: `bin`, `reference`, `current`, `change` (shares in [0, 1]).

    Categorical: one bin per value, ordered by the reference's share (the `SHARE_MAX_VALUES` largest on
    either side, the rest pooled as "(other)"), missing values as "(missing)". Numerical: the
    reference's deciles as edges, open-ended at both ends (a value beyond the reference's range still
    lands in the first or last bin), equal edges merged; missing values as "(missing)"."""
    if kind == CATEGORICAL:
        cur = current.astype(object).where(current.notna(), MISSING).value_counts(normalize=True)
        ref = reference.astype(object).where(reference.notna(), MISSING).value_counts(normalize=True)
        table = pd.DataFrame({"reference": ref, "current": cur}).fillna(0.0)
        table.index = table.index.map(str)
        table = table.sort_values(["reference", "current"], ascending=False)
        keep = set(ref.index[:SHARE_MAX_VALUES].map(str)) | set(cur.index[:SHARE_MAX_VALUES].map(str))
        if len(table) > len(keep):
            rest = table[~table.index.isin(keep)].sum()
            table = pd.concat([table[table.index.isin(keep)], pd.DataFrame([rest], index=[OTHER])])
    elif kind == NUMERICAL:
        ref_values = reference.dropna().to_numpy(np.float64)
        cur_values = current.dropna().to_numpy(np.float64)
        edges = np.unique(np.quantile(ref_values, SHARE_QUANTILES)) if len(ref_values) else np.array([])
        if len(edges):
            labels = [f"< {_number(edges[0])}",
                      *(f"{_number(a)} to {_number(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)),
                      f">= {_number(edges[-1])}"]
        else:
            labels = ["all values"]

        def shares(values: np.ndarray, n: int) -> np.ndarray:
            counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(labels))
            return counts / n if n else counts * 0.0

        table = pd.DataFrame({"reference": shares(ref_values, len(reference)),
                              "current": shares(cur_values, len(current))}, index=labels)
        missing = (float(reference.isna().mean()) if len(reference) else 0.0,
                   float(current.isna().mean()) if len(current) else 0.0)
        if max(missing) > 0:
            table.loc[MISSING] = missing
    else:
        raise ValueError(f"unknown column kind {kind!r}")
    table["change"] = table["current"] - table["reference"]
    return table.rename_axis("bin").reset_index()


def largest_change(table: pd.DataFrame) -> dict[str, Any]:
    """The bin of `share_table` whose share changed most: `bin`, `reference`, `current`, `change`."""
    row = table.loc[table["change"].abs().idxmax()]
    return {"bin": str(row["bin"]), **{k: float(row[k]) for k in ("reference", "current", "change")}}


def _pp(change: float) -> str:
    return f"{change * 100:+.1f} pp"


def explain_change(change: Mapping[str, Any]) -> str:
    """E.g. `music: 12.0% of the reference -> 31.0% of the day (+19.0 pp)`."""
    return (f"{change['bin']}: {change['reference']:.1%} of the reference -> {change['current']:.1%} of the "
            f"day ({_pp(change['change'])})")


# --------------------------------------------------------------------------------------------------
# The machine-readable summary
# --------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _ratio(c: ColumnDrift) -> float:
    return c.statistic / c.threshold if c.tested else -math.inf


def ordered_columns(columns: Sequence[ColumnDrift]) -> list[ColumnDrift]:
    """Drifted columns first (alerting before informational, then by statistic / threshold), then the
    other tested ones, then the untested ones, each group in its given order otherwise."""
    drifted = sorted((c for c in columns if c.drifted), key=lambda c: (not c.alert, -_ratio(c)))
    return drifted + [c for c in columns if c.tested and not c.drifted] + [c for c in columns if not c.tested]


def _column(c: ColumnDrift, changes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "column": c.column, "kind": c.kind, "method": c.method, "statistic": _finite(c.statistic),
        "threshold": c.threshold, "drifted": c.drifted, "alert": c.alert, "tested": c.tested,
        "n_current": c.n_current, "n_reference": c.n_reference, "why": c.explain(),
    }
    if c.column in changes:
        out["largest_share_change"] = dict(changes[c.column])
    return out


def _signal(s: Signal) -> dict[str, Any]:
    return {"name": s.name, "statistic": _finite(s.statistic), "threshold": s.threshold,
            "breached": s.drifted, "alert": s.alert, "computed": s.computed, "detail": s.detail,
            "values": {k: _finite(v) for k, v in s.values.items()}, "why": s.explain()}


def report_summary(
    result: DriftResult,
    *,
    drift_share: float,
    share_changes: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report's summary as plain JSON values (what the report's header shows, `summary.json`):
    the day, the champion, the reference window, the verdict and a one-line headline, the column counts
    with the drifted ones (why: test, statistic, threshold, largest share change), every column drifted
    first, the signals, the reasons, and `numbers` (`DriftResult.summary`, the flat numbers Dagster
    metadata and MLflow metrics carry)."""
    changes = share_changes or {}
    tested = [c for c in result.columns if c.tested]
    drifted = [c for c in ordered_columns(result.columns) if c.drifted]
    computed = [s for s in result.signals.values() if s.computed]
    breached = [s for s in computed if s.drifted]
    reference = sorted(result.reference_partitions)
    verdict = VERDICTS[(result.decided, result.drifted)]
    names = f" ({', '.join(c.column for c in drifted)})" if drifted else ""
    headline = (f"{verdict}: {len(drifted)} of {len(tested)} columns drifted{names}; "
                f"{len(breached)} of {len(computed)} recommender signals breached")
    if breached:
        headline += f" ({', '.join(s.name for s in breached)})"
    return {
        "partition": result.partition,
        "champion_version": result.champion_version,
        "reference": {"partitions": reference, "first": reference[0] if reference else None,
                      "last": reference[-1] if reference else None, "days": len(reference)},
        "rows": {"current": int(result.summary.get("rows.current", 0)),
                 "reference": int(result.summary.get("rows.reference", 0))},
        "decided": result.decided,
        "drifted": result.drifted,
        "verdict": verdict,
        "headline": headline,
        "columns": {
            "tested": len(tested),
            "drifted": len(drifted),
            "drifted_share": len(drifted) / len(tested) if tested else 0.0,
            "drift_share_threshold": drift_share,
            "drifted_names": [c.column for c in drifted],
            "not_tested": [c.column for c in result.columns if not c.tested],
        },
        "drifted_columns": [_column(c, changes) for c in drifted],
        "all_columns": [_column(c, changes) for c in ordered_columns(result.columns)],
        "signals": [_signal(s) for s in result.signals.values()],
        "signals_breached": [s.name for s in breached],
        "reasons": list(result.reasons),
        "numbers": dict(result.summary),
    }


# --------------------------------------------------------------------------------------------------
# Evidently metrics of recloop's own
# --------------------------------------------------------------------------------------------------


class DriftSummary(SingleValueMetric):
    """The drift report's header. Its value: the number of drifted columns; `summary` is
    `report_summary(...)`, computed by recloop before the report is built (the decision needs every
    column's statistic and the signals first)."""

    summary: dict[str, Any]

    class Config:
        type_alias = "recloop:metric:DriftSummary"


class DriftSummaryCalculation(SingleValueCalculation[DriftSummary]):
    def calculate(
        self, context: Context, current_data: Dataset, reference_data: Dataset | None
    ) -> SingleValue:
        summary = self.metric.summary
        result = self.result(summary["columns"]["drifted"])
        result.widget = summary_widgets(summary)
        return result

    def display_name(self) -> str:
        return "Drift summary"


class ShareShift(SingleValueMetric):
    """One column's distribution in shares, the day against the reference (`share_table`). Its value:
    the largest change of a bin's share (absolute, in [0, 1])."""

    column: str
    kind: str

    class Config:
        type_alias = "recloop:metric:ShareShift"


class ShareShiftCalculation(SingleValueCalculation[ShareShift]):
    def calculate(
        self, context: Context, current_data: Dataset, reference_data: Dataset | None
    ) -> SingleValue:
        if reference_data is None:
            raise ValueError("ShareShift compares with a reference: none given")
        column, kind = self.metric.column, self.metric.kind
        table = share_table(current_data.column(column).data, reference_data.column(column).data, kind)
        top = largest_change(table)
        result = self.result(abs(top["change"]))
        result.widget = share_widgets(column, table)
        return result

    def display_name(self) -> str:
        return f"Shares of {self.metric.column}: the day vs the reference"


# --------------------------------------------------------------------------------------------------
# Widgets
# --------------------------------------------------------------------------------------------------


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _reference_window(reference: Mapping[str, Any]) -> str:
    if not reference["days"]:
        return "none"
    if reference["days"] == 1:
        return f"{reference['first']} (1 day)"
    return f"{reference['first']} to {reference['last']} ({reference['days']} days)"


def _why(column: Mapping[str, Any]) -> str:
    line = (f"`{column['column']}` ({column['kind']}): {column['method']} {_value(column['statistic'])} >= "
            f"threshold {column['threshold']:.3f} ({METHOD_NAMES.get(column['method'], column['method'])}), "
            + ("alerting: decides alone" if column["alert"] else "informational (alert: false)"))
    if "largest_share_change" in column:
        line += f"; largest share change: {explain_change(column['largest_share_change'])}"
    return line


def header_markdown(summary: Mapping[str, Any]) -> str:
    """The header's text (Markdown, as Evidently's text widget renders it)."""
    champion = f"v{summary['champion_version']}" if summary["champion_version"] else "none given"
    rows = summary["rows"]
    columns = summary["columns"]
    lines = [
        f"**Day** {summary['partition']} · **champion** {champion} · **reference window** "
        f"{_reference_window(summary['reference'])}"
        + (", the champion's training data" if summary["champion_version"] else "") + " · **impressions** "
        f"{rows['current']:,} on the day, {rows['reference']:,} in the reference",
        "",
        f"**{columns['drifted']} of {columns['tested']} columns drifted**"
        + (f": {', '.join(f'`{n}`' for n in columns['drifted_names'])}. Why:" if columns["drifted"] else "."),
    ]
    if columns["drifted"]:
        lines += ["", *(f"- {_why(c)}" for c in summary["drifted_columns"])]
    if columns["not_tested"]:
        lines += ["", f"Not tested (too few values): {', '.join(f'`{n}`' for n in columns['not_tested'])}."]
    signals = summary["signals"]
    computed = [s for s in signals if s["computed"]]
    breached = [s for s in computed if s["breached"]]
    lines += ["", f"**{len(breached)} of {len(computed)} recommender signals breached their threshold**"
              + (":" if breached else ".")]
    lines += [f"- `{s['name']}`: {_value(s['statistic'])} >= threshold {s['threshold']:.3f}, "
              + ("alerting" if s["alert"] else "informational (alert: false)") for s in breached]
    skipped = [s for s in signals if not s["computed"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{s['name']}` ({s['detail'].removeprefix('skipped: ')})"
                                             for s in skipped) + "."]
    lines += ["", f"**Decision: {summary['verdict'].lower()}**"
              + (f" (drifted share of columns {columns['drifted_share']:.2f}, drift_share "
                 f"{columns['drift_share_threshold']:.2f})." if columns["tested"] else "."),
              "", *(f"- {reason}" for reason in summary["reasons"])]
    return "\n".join(lines)


def summary_widgets(summary: Mapping[str, Any]) -> list[BaseWidgetInfo]:
    """The header: the verdict with counters and a coloured one-line headline, the text (the day, the
    champion, the window, what drifted and why, the signals, the decision's reasons), then tables: the
    recommender signals, every column by statistic / threshold.

    Colour comes from `insights` (MUI alerts by severity). Not from `alerts`: Evidently 0.7's page
    draws those with a colour function that throws on its own theme's CSS variables, and the whole
    report stays blank."""
    verdict = summary["verdict"]
    columns = summary["columns"]
    computed = [s for s in summary["signals"] if s["computed"]]
    counters = counter(title=f"Drift report of {summary['partition']}: {verdict}", counters=[
        CounterData("decision", verdict),
        CounterData("columns drifted", f"{columns['drifted']} of {columns['tested']}"),
        CounterData("signals breached", f"{sum(s['breached'] for s in computed)} of {len(computed)}"),
        CounterData("champion", f"v{summary['champion_version']}" if summary["champion_version"] else "none"),
        CounterData("reference days", str(summary["reference"]["days"])),
    ])
    severity = {"DRIFTED": "error", "NO DRIFT": "success"}.get(verdict, "info")
    counters.insights = [Insight(title=verdict, severity=severity, text=summary["headline"])]
    widgets = [counters, text_widget(title="What drifted, and why", text=header_markdown(summary))]

    def day_and_reference(s: Mapping[str, Any]) -> tuple[str, str]:
        values = s["values"]
        return _value(values.get("current")), _value(values.get("reference"))

    widgets.append(table_data(
        title="Recommender signals (breached: statistic >= threshold)",
        column_names=["signal", "statistic", "threshold", "breached", "alerting", "the day", "the reference",
                      "what"],
        data=[[s["name"], _value(s["statistic"]), f"{s['threshold']:.3f}",
               ("YES" if s["breached"] else "no") if s["computed"] else "skipped",
               "yes" if s["alert"] else "no", *day_and_reference(s), s["detail"]]
              for s in summary["signals"]]))
    widgets.append(table_data(
        title="Every column, drifted first (statistic / threshold: drifts at 1.00)",
        column_names=["column", "drifted", "test", "statistic", "threshold", "statistic / threshold"],
        data=[[c["column"], "DRIFTED" if c["drifted"] else ("no" if c["tested"] else "not tested"),
               c["method"], _value(c["statistic"]), f"{c['threshold']:.3f}",
               _value(c["statistic"] / c["threshold"]) if c["statistic"] is not None else "-"]
              for c in summary["all_columns"]]))
    return widgets


def share_widgets(column: str, table: pd.DataFrame) -> list[BaseWidgetInfo]:
    """The shares of the day and of the reference per bin (bars, in %) and the largest changes."""
    figure = go.Figure([
        go.Bar(name="reference", x=table["bin"], y=table["reference"] * 100, marker_color="#4d4d4d"),
        go.Bar(name="current (the day)", x=table["bin"], y=table["current"] * 100, marker_color="#ed0400"),
    ])
    figure.update_layout(barmode="group", yaxis_title="share of impressions (%)", xaxis_title=column,
                         xaxis={"type": "category"}, legend={"orientation": "h", "y": 1.1})
    changes = table.reindex(table["change"].abs().sort_values(ascending=False).index).head(5)
    return [
        plotly_figure(title=f"{column}: shares of the day vs the reference", figure=figure),
        table_data(title=f"{column}: largest share changes",
                   column_names=["value or range", "reference", "the day", "change"],
                   data=[[row.bin, f"{row.reference:.1%}", f"{row.current:.1%}", _pp(row.change)]
                         for row in changes.itertuples()]),
    ]


def relative_by_default(widget: BaseWidgetInfo) -> BaseWidgetInfo:
    """`widget` (a copy) with its plotly charts on their "perc" view where they have Evidently's abs/perc
    buttons (what pressing "perc" does: its trace visibility and axis title), and the distribution tab
    first in a tabs widget. Widgets of any other shape come back unchanged."""
    out = widget.copy(deep=True)
    _apply_perc(out)
    return out


def _apply_perc(widget: BaseWidgetInfo) -> None:
    params = widget.params
    if widget.type == "big_graph" and isinstance(params, dict):
        layout, data = params.get("layout") or {}, params.get("data") or []
        for menu in layout.get("updatemenus") or []:
            buttons = menu.get("buttons") or []
            index = next((i for i, b in enumerate(buttons) if b.get("label") == "perc"), None)
            if index is None:
                continue
            args = buttons[index].get("args") or []
            visible = (args[0] or {}).get("visible") if args else None
            if not isinstance(visible, list) or len(visible) != len(data):
                continue
            for trace, shown in zip(data, visible, strict=True):
                trace["visible"] = shown
            title = ((args[1] if len(args) > 1 else {}) or {}).get("yaxis", {}).get("title")
            if title is not None:
                layout.setdefault("yaxis", {})["title"] = {"text": title} if isinstance(title, str) else title
            menu["active"] = index
    widget.tabs.sort(key=lambda tab: tab.title != "DATA DISTRIBUTION")  # stable: the rest keep their order
    for tab in widget.tabs:
        _apply_perc(tab.widget)
    for child in widget.widgets:
        _apply_perc(child)


def highlighted(widgets: Sequence[BaseWidgetInfo], column: ColumnDrift) -> list[BaseWidgetInfo]:
    """A drifted column's Evidently widgets: the first gets a title and a "DRIFTED" insight (red for an
    alerting column, amber for an informational one) with the statistic against the threshold."""
    out = [relative_by_default(w) for w in widgets]
    if out:
        kind = "alerting: decides alone" if column.alert else "informational, alert: false"
        out[0].title = f"DRIFTED: {column.column}"
        out[0].insights = [Insight(title="DRIFTED", severity="error" if column.alert else "warning",
                                   text=f"{column.explain()}, {kind}")]
    return out


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _column_widgets(snapshot: Snapshot | None) -> dict[str, tuple[str, list[BaseWidgetInfo]]]:
    """The `ValueDrift` metric id and widgets of each column of `column_drift`'s snapshot."""
    if snapshot is None:
        return {}
    out = {}
    for metric_id, result in snapshot.metric_results.items():
        params = result.get_metric_value_location().metric.params
        if str(params.get("type", "")).endswith(":ValueDrift"):
            out[str(params["column"])] = (metric_id, result.get_widgets())
    return out


def _share_frames(
    current: pd.DataFrame, reference: pd.DataFrame, columns: Sequence[ColumnDrift]
) -> tuple[Dataset, Dataset]:
    """The Evidently datasets of the drifted columns (a one-cell placeholder when none drifted: a
    report needs a column, and the summary reads none)."""
    names = [c.column for c in columns]
    if not names:
        placeholder = pd.DataFrame({"impressions": [len(current)]})
        return (Dataset.from_pandas(placeholder),
                Dataset.from_pandas(placeholder.assign(impressions=len(reference))))
    definition = DataDefinition(numerical_columns=[c.column for c in columns if c.kind == NUMERICAL],
                                categorical_columns=[c.column for c in columns if c.kind == CATEGORICAL])
    return (Dataset.from_pandas(current[names].copy(), data_definition=definition),
            Dataset.from_pandas(reference[names].copy(), data_definition=definition))


def build_report(
    result: DriftResult,
    *,
    tested: Sequence[ColumnDrift],
    columns_snapshot: Snapshot | None,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    drift_share: float,
    timestamp: datetime | None = None,
) -> tuple[Snapshot, dict[str, Any]]:
    """The readable report of `result` and its summary (`report_summary`).

    `tested` are the columns `column_drift` tested (with the champion-score column when there was a
    champion), `columns_snapshot` its Evidently snapshot, `current` / `reference` the frames it compared
    (the reference as sampled). Returns one Evidently `Snapshot`: the summary, the drifted columns
    (highlighted, each with its `ShareShift`), then the others; and the summary as plain JSON values."""
    shown = ordered_columns([c for c in tested if c.tested])
    drifted = [c for c in shown if c.drifted]
    shares = {c.column: share_table(current[c.column], reference[c.column], c.kind) for c in drifted}
    changes = {name: largest_change(table) for name, table in shares.items()}
    summary = report_summary(result, drift_share=drift_share, share_changes=changes)

    report = Report([DriftSummary(summary=summary),
                     *(ShareShift(column=c.column, kind=c.kind) for c in drifted)])
    cur, ref = _share_frames(current, reference, drifted)
    own = report.run(cur, ref, timestamp=timestamp).to_snapshot_model()
    own_widgets = {m: own.metric_results[m].get_widgets() for m in own.top_level_metrics}
    header, *share_ids = own.top_level_metrics

    by_column = _column_widgets(columns_snapshot)
    drifted_widgets: list[BaseWidgetInfo] = []
    for c, share_id in zip(drifted, share_ids, strict=True):
        if c.column in by_column:
            drifted_widgets += highlighted(by_column[c.column][1], c)
        drifted_widgets += own_widgets[share_id]
    calm = [c for c in shown if not c.drifted]
    calm_widgets = [relative_by_default(w) for c in calm if c.column in by_column
                    for w in by_column[c.column][1]]
    widgets = list(own_widgets[header])
    if drifted_widgets:
        widgets.append(group_widget(
            title=(f"Drifted ({len(drifted)}): {', '.join(c.column for c in drifted)}, "
                   "in shares of impressions"),
            widgets=drifted_widgets))
    if calm_widgets:
        widgets.append(group_widget(
            title=f"Without drift ({len(calm)}), in monitoring/drift.yaml's order",
            widgets=calm_widgets))

    columns_model = columns_snapshot.to_snapshot_model() if columns_snapshot is not None else None
    metric_results = {**own.metric_results, **(columns_model.metric_results if columns_model else {})}
    top_level = [*own.top_level_metrics, *(columns_model.top_level_metrics if columns_model else [])]
    merged = SnapshotModel(
        report=ReportModel(items=[]),
        name=f"recloop drift {result.partition}",
        timestamp=own.timestamp,
        metadata={"partition": result.partition, "champion_version": str(result.champion_version or ""),
                  "reference_partitions": list(result.reference_partitions), "verdict": summary["verdict"]},
        tags=["recloop", "drift"],
        metric_results=metric_results,
        top_level_metrics=top_level,
        widgets=widgets,
        tests_widgets=[],
    )
    return Snapshot.load_model(merged), summary

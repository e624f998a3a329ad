"""The human view of each `recloop` command's result: tables and short lines on a rich console.

Each `show_*` function takes the command's result, the same dictionary `--json` prints (so both views
say the same thing), and the console to print it on (`recloop.terminal.stdout_console()`). Values a
result may lack are shown as "-".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from recloop.terminal import plain_text

DASH = "-"


# --- formatting -------------------------------------------------------------------------------------


def num(value: Any, digits: int = 4) -> str:
    """A number for a table: integers with thousands separators, floats with `digits` decimals."""
    if value is None or value == "":
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return DASH
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:,.{digits}f}"
    return str(value)


def when(value: Any) -> str:
    """A decision time as `YYYY-MM-DD HH:MM UTC` (datetimes, or their ISO text)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        zone = value.strftime("%Z") or ""
        return value.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")
    return DASH if value is None else str(value)


def one_line(text: Any, limit: int = 140) -> str:
    """`text` on one line, cut at `limit` characters with an ellipsis."""
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def table(*columns: str, right: Iterable[str] = (), wide: Iterable[str] = (), cut: Iterable[str] = ()) -> Table:
    """A plain table: a header, no outer frame. `right` columns are right-aligned (numbers). The others keep
    their whole text on one line, except `wide` columns, which take the room left and wrap their text in
    it, and `cut` columns, which take the room left and cut their text there (one line per row)."""
    right, wide, cut = set(right), set(wide), set(cut)
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left", no_wrap=name not in wide | cut,
                     overflow="fold" if name in wide else "ellipsis")
    return t


def cut_text(text: Any, style: str = "") -> Text:
    """A cell of a `cut` column: one line, cut with an ellipsis where the column ends."""
    return Text(one_line(text, 1000), style=style, no_wrap=True, overflow="ellipsis")


def show(console: Console, renderable: Any) -> None:
    """Print `renderable`; without a terminal, without the spaces that pad its lines to the table's width."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable, soft_wrap=False)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def heading(console: Console, text: str) -> None:
    console.print(Text(text, style="bold"))


def outcome(ok: Any, yes: str = "ok", no: str = "FAILED") -> Text:
    if ok is None:
        return Text(DASH)
    return Text(yes, style="green") if ok else Text(no, style="bold red")


def reason_line(text: str) -> Text:
    """A gate reason (`PASS ...`, `FAIL ...`, `NOTE ...`) coloured by its verdict."""
    style = {"PASS": "green", "FAIL": "red", "REFUSE": "red"}.get(text.split(" ", 1)[0].rstrip(":"), "")
    return Text(text, style=style)


def _lines(console: Console, pairs: Sequence[tuple[str, Any]]) -> None:
    """`name  value` lines, the names aligned."""
    pairs = [(k, v) for k, v in pairs if v not in (None, "")]
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        console.print(Text.assemble((f"{key:<{width}}  ", "bold"), value if isinstance(value, Text) else str(value)))


# --- recloop train ----------------------------------------------------------------------------------

EVALUATION_COLUMNS = (("recall_at_10", "recall@10"), ("ndcg_at_10", "ndcg@10"), ("map_at_10", "map@10"),
                      ("coverage", "coverage"), ("diversity", "diversity"),
                      ("popularity_concentration", "top-1% share"))


def show_training(console: Console, summary: Mapping[str, Any], *, latency: str | None = None,
                  links: Sequence[tuple[str, str]] = ()) -> None:
    """`recloop train`: the decision, the version, the key metrics, the gate's reasons, where to look."""
    version = summary.get("registered_version")
    decision = summary.get("decision")
    head = Text.assemble(("Training run ", "bold"), (str(summary.get("run_id", DASH))[:8], "bold"), ": ",
                         outcome(summary.get("success"), "succeeded", "FAILED"))
    console.print(head)
    if version is not None:
        verdict = {"promoted": Text("promoted", style="bold green"), "refused": Text("refused", style="bold red")}.get(
            str(decision), Text(str(decision or "no gate decision"), style="bold yellow"))
        line = Text.assemble("version ", (str(version), "bold"), ": ", verdict)
        if summary.get("compared_to"):
            line.append(f" (compared with {summary['compared_to']})")
        champion = summary.get("champion")
        if decision == "promoted":
            line.append(f"; the champion is now version {champion}")
        elif champion:
            line.append(f"; the champion stays version {champion}")
        else:
            line.append("; there is no champion yet")
        console.print(line)
    if summary.get("error"):
        console.print(Text(f"error: {summary['error']}", style="red"))
    evaluation = summary.get("evaluation") or {}
    if evaluation:
        console.print()
        heading(console, "Offline evaluation on the held-out days (full ranking, watched videos excluded)")
        shown = [(key, label) for key, label in EVALUATION_COLUMNS if any(key in v for v in evaluation.values())]
        t = table("recommender", *(label for _, label in shown), right=[label for _, label in shown])
        for name, values in evaluation.items():
            t.add_row(name, *(num(values.get(key)) for key, _ in shown), style="bold" if name == "recloop" else None)
        show(console, t)
        if summary.get("recall_at_10_vs_popularity") is not None:
            console.print(f"recall@10 is {num(summary['recall_at_10_vs_popularity'], 2)} x popularity's")
    reasons = summary.get("reasons") or summary.get("gate") or []
    if reasons or latency:
        console.print()
        heading(console, "Promotion gate")
        for reason in reasons:
            console.print(Text.assemble("  ", reason_line(str(reason))))
        if latency:
            console.print(f"  {latency}")
    if links:
        console.print()
        _lines(console, links)


# --- recloop models ---------------------------------------------------------------------------------


def primary_metric_text(metrics: Mapping[str, Any], metric: str) -> str:
    """A decision's primary metric: the candidate's value and the bar it was compared with."""
    mine = metrics.get(f"challenger.{metric}")
    if mine is None:
        return DASH
    for role in ("champion", "popularity"):
        other = metrics.get(f"{role}.{metric}")
        if other is not None:
            return f"{num(mine)} vs {num(other)} ({role})"
    return num(mine)


def decision_reason(entry: Mapping[str, Any]) -> str:
    """The one reason that tells a decision: the first failed rule of a refusal, else the first reason."""
    why = [str(w) for w in entry.get("why") or []]
    if entry.get("decision") in ("refused", "experiment_stopped"):
        failed = [w for w in why if w.startswith(("FAIL", "REFUSE"))]
        if failed:
            return failed[0]
    return why[0] if why else DASH


def show_models(console: Console, data: Mapping[str, Any], *, aliases: Sequence[tuple[str, Any, str, str]],
                metric: str, limit: int) -> None:
    """`recloop models`: the aliases (version, since, primary metric), the lineage, then the history."""
    heading(console, f"Model {data.get('model')}")
    t = table("alias", "version", "since", f"{metric} (offline)", right=["version"])
    for alias, version, since, value in aliases:
        t.add_row(alias, DASH if version is None else str(version), since or DASH, value or DASH,
                  style="bold" if alias == "champion" and version is not None else None)
    show(console, t)
    lineage = data.get("lineage") or []
    console.print(f"champions, oldest first: {' -> '.join(map(str, lineage)) if lineage else '(none yet)'}")
    history = data.get("history") or []
    console.print()
    if not history:
        console.print("No decision recorded yet: `recloop train` (or `recloop demo`) trains and decides.")
        return
    heading(console, f"Decisions, newest first ({len(history)} shown; --limit N for more)" if len(history) >= limit
            else "Decisions, newest first")
    t = table("version", "decision", "when", metric, "reason", right=["version"], cut=["reason"])
    for entry in history:
        decision = str(entry.get("decision") or DASH)
        if decision == "rolled_back" and entry.get("from_version"):
            decision = f"rolled_back {entry.get('from_version')} -> {entry.get('to_version') or entry.get('version')}"
        style = {"promoted": "green", "refused": "red"}.get(str(entry.get("decision")), "")
        t.add_row(str(entry.get("version") or DASH), Text(decision, style=style), when(entry.get("when")),
                  primary_metric_text(entry.get("metrics") or {}, metric), cut_text(decision_reason(entry)))
    show(console, t)


def show_rollback(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop rollback`: the champion before and after, and why."""
    console.print(Text.assemble((f"{data.get('model')}: ", "bold"), "champion version ",
                                (str(data.get("champion_was")), "bold"), " -> ", (str(data.get("champion_now")), "bold green")))
    for line in data.get("why") or []:
        console.print(f"  {line}")
    console.print("Serving follows the champion alias at its next poll; `recloop models` shows the history.")


# --- recloop quarantine -----------------------------------------------------------------------------


def show_quarantine(console: Console, data: Mapping[str, Any], *, reasons: Mapping[str, int], id_column: str) -> None:
    """`recloop quarantine`: the count per reason, then the first rows with where they came from."""
    total = data.get("quarantined", 0)
    console.print(Text.assemble((f"{data.get('table')} of {data.get('partition')}: ", "bold"),
                                f"{num(total)} row(s) quarantined"))
    if not total:
        return
    console.print()
    t = table("rows", "reason", right=["rows"], wide=["reason"])
    for reason, count in reasons.items():
        t.add_row(num(count), reason)
    show(console, t)
    rows = data.get("rows") or []
    if not rows:
        return
    console.print()
    heading(console, f"The first {len(rows)} of {num(total)} (--limit N for more, --json for every column)")
    t = table(id_column, "source", "reason", wide=["reason"])
    for row in rows:
        line = row.get("_source_row") or (f"line {row['_source_line']}" if row.get("_source_line") is not None else "")
        source = f"{row.get('_source_file') or '?'}" + (f":{line}" if line else "")
        t.add_row(str(row.get(id_column) or "?"), source, str(row.get("reason") or DASH))
    show(console, t)


# --- recloop run / import / simulate / movielens ---------------------------------------------------


def show_partitions(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop run --partition`: one line per day (validation counts, features, online rows, drift)."""
    t = table("day", "status", "events in", "accepted", "quarantined", "online rows", "drift",
              right=["events in", "accepted", "quarantined", "online rows"], wide=["drift"])
    for day, d in (data.get("partitions") or {}).items():
        ev = d.get("events") or {}
        drift = d.get("drift") or {}
        drift_text = ("DRIFT: " + one_line("; ".join(map(str, drift.get("reasons") or [])), 80) if drift.get("drifted")
                      else one_line(drift.get("status") or ("no drift" if drift else DASH), 80))
        t.add_row(day, outcome(d.get("success")), num(ev.get("ingested")), num(ev.get("accepted")),
                  num(ev.get("quarantined")), num((d.get("online") or {}).get("rows_written")), drift_text)
    show(console, t)
    for day, d in (data.get("partitions") or {}).items():
        if d.get("error"):
            console.print(Text(f"{day}: {d['error']}", style="red"))
    if data.get("seconds") is not None:
        console.print(f"took {num(data['seconds'], 1)} s")


def _landed(console: Console, landed: Mapping[str, Any], landing: Any) -> None:
    rows = landed.get("rows") or {}
    console.print(Text.assemble(("Landed ", "bold"), f"{landed.get('source')} ({landed.get('kind')}) into {landing}: ",
                                ", ".join(f"{num(n)} {table}" for table, n in rows.items())))
    console.print(f"  {landed.get('first')} .. {landed.get('last')}: {num(landed.get('calendar_days'))} days, "
                  f"{num(landed.get('days_with_events'))} with events; {num(landed.get('files_written'))} file(s) written"
                  + (f"; rows without a day: {landed['rows_without_a_day']}" if landed.get("rows_without_a_day") else "")
                  + (f"; {num(landed['landing_days_removed'])} landing day(s) replaced" if landed.get("landing_days_removed") else ""))


def show_landed(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop import --land-only`."""
    _landed(console, data.get("landed") or {}, data.get("landing"))
    console.print(f"Next: {data.get('next')}")


def show_history(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop import` and `recloop run --start/--end`: the history job's run, table by table."""
    if data.get("landed"):
        _landed(console, data["landed"], data.get("landing"))
        console.print()
    rng = data.get("range") or {}
    console.print(Text.assemble(("History ", "bold"), f"{rng.get('first')} .. {rng.get('last')} in one Dagster run ",
                                (str(data.get("run_id", ""))[:8], "bold"), ": ",
                                outcome(data.get("success"), "succeeded", "FAILED")))
    validated = data.get("validated") or {}
    if validated:
        t = table("table", "days", "ingested", "accepted", "quarantined", "rate", "top reasons",
                  right=["days", "ingested", "accepted", "quarantined", "rate"], wide=["top reasons"])
        for name, v in validated.items():
            reasons = v.get("quarantine_reasons") or {}
            top = "; ".join(f"{r} ({num(n)})" for r, n in list(reasons.items())[:3])
            t.add_row(name, num(v.get("days")), num(v.get("ingested")), num(v.get("accepted")), num(v.get("quarantined")),
                      f"{v['quarantine_rate']:.2%}" if isinstance(v.get("quarantine_rate"), float) else DASH, top or DASH)
        show(console, t)
    features = data.get("features") or {}
    online = data.get("online") or {}
    checks = data.get("checks") or {}
    _lines(console, [
        ("days", f"{num(data.get('days_with_events'))} with events, {num(data.get('days_without_events'))} without"
                 if data.get("days_with_events") is not None else None),
        ("features", f"{num(features.get('snapshot_days'))} snapshot days, newest {features.get('newest')}; rows: "
                     + (", ".join(f"{k} {num(v)}" for k, v in features["rows"].items())
                        if isinstance(features.get("rows"), Mapping) else num(features.get("rows")))
         if features else None),
        ("online", f"snapshot {online.get('snapshot')}: {num(online.get('rows_written'))} rows written to "
                   f"{online.get('online_store') or 'the online store'}" if online else None),
        ("checks", Text.assemble(*[x for name, ok in checks.items()
                                   for x in ((name + " ", ""), outcome(ok, "passed", "FAILED"), ("  ", ""))])
         if checks else None),
        ("seconds", ", ".join(f"{k} {num(v, 1)}" for k, v in (data.get("seconds") or {}).items())),
    ])
    if data.get("error"):
        console.print(Text(f"error: {data['error']}", style="red"))
        console.print(f"details: {data.get('details')}")


def show_simulated(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop simulate`."""
    totals = data.get("totals") or {}
    console.print(Text.assemble(("Simulated ", "bold"), f"{data.get('days')} day(s) from {data.get('start')} into "
                                f"{data.get('landing')}: ", ", ".join(f"{num(n)} {t}" for t, n in totals.items())))
    console.print(f"{num(data.get('seconds'), 1)} s ({num(data.get('events_per_s'))} events/s). Next: recloop run")


def show_closed_loop(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop simulate --closed-loop`: what was served, day by day."""
    console.print(Text.assemble(("Closed loop ", "bold"), f"from {data.get('first')}, served {data.get('serving')}, "
                                f"landing {data.get('landing')}"))
    t = table("day", "sessions", "impressions", "CTR", "watch s/imp", "Gini", "top-1%", "coverage", "fallback",
              "explored", right=["sessions", "impressions", "CTR", "watch s/imp", "Gini", "top-1%", "coverage",
                                 "fallback", "explored"])
    for d in data.get("days") or []:
        t.add_row(str(d.get("date")), num(d.get("sessions")), num(d.get("impressions")), num(d.get("ctr"), 3),
                  num(d.get("watch_s_per_impression"), 1), num(d.get("gini"), 3), num(d.get("top1_share"), 3),
                  num(d.get("coverage"), 3), num(d.get("fallback_answers")), num(d.get("explored")))
    show(console, t)


def show_movielens(console: Console, data: Mapping[str, Any]) -> None:
    """`recloop movielens`."""
    rows = data.get("rows") or {}
    console.print(Text.assemble(("Landed ", "bold"), f"{num(data.get('days'))} day(s), {data.get('first')} .. "
                                f"{data.get('last')}, into {data.get('landing')}: ",
                                ", ".join(f"{num(n)} {t}" for t, n in rows.items())))
    console.print(f"Next: {data.get('next')}")


# --- recloop evaluate -------------------------------------------------------------------------------


def show_evaluation(console: Console, result: Mapping[str, Any], *, out: str | None = None) -> None:
    """`recloop evaluate`: the recommenders at the main cut-off, then recall and NDCG at every k."""
    k = result.get("main_k", 10)
    split = result.get("split") or {}
    console.print(Text.assemble(("Evaluation ", "bold"), f"train {split.get('train')} ({num(split.get('train_interactions'))}), "
                                f"test {split.get('test')} ({num(split.get('test_interactions'))}); "
                                f"{num(result.get('users_evaluated'))} users, catalog {num(result.get('catalog_size'))}"))
    recs = result.get("recommenders") or {}
    t = table("recommender", f"recall@{k}", f"ndcg@{k}", f"map@{k}", f"hit@{k}", "coverage", "diversity",
              "top-1% share", "fit s", right=[f"recall@{k}", f"ndcg@{k}", f"map@{k}", f"hit@{k}", "coverage",
                                              "diversity", "top-1% share", "fit s"])
    for name, r in recs.items():
        b = r.get("beyond_accuracy") or {}
        t.add_row(name, num(b.get("recall")), num(b.get("ndcg")), num(b.get("map")), num(b.get("hit_rate")),
                  num(b.get("catalog_coverage")), num(b.get("intra_list_diversity")),
                  num(b.get("popularity_concentration")), num((r.get("seconds") or {}).get("fit"), 1),
                  style="bold" if name == result.get("platform") else None)
    show(console, t)
    ks = [str(x) for x in result.get("ks") or []]
    if ks:
        t = table("recommender", *(f"recall@{x}" for x in ks), *(f"ndcg@{x}" for x in ks),
                  right=[*(f"recall@{x}" for x in ks), *(f"ndcg@{x}" for x in ks)])
        for name, r in recs.items():
            m = r.get("metrics") or {}
            t.add_row(name, *(num((m.get(x) or {}).get("recall")) for x in ks),
                      *(num((m.get(x) or {}).get("ndcg")) for x in ks))
        show(console, t)
    if out:
        console.print(f"the whole result (JSON): {out}")


# --- recloop drift / alerts -------------------------------------------------------------------------


def show_drift(console: Console, data: Mapping[str, Mapping[str, Any]]) -> None:
    """`recloop drift`: per day, drifted or not, why, against which champion, the report."""
    t = table("day", "run", "drift", "champion", "reasons / status", "report", wide=["reasons / status"])
    for day, d in data.items():
        drifted = d.get("drifted")
        why = "; ".join(map(str, d.get("reasons") or [])) or d.get("status") or d.get("error") or DASH
        t.add_row(day, outcome(d.get("success")),
                  Text("DRIFT", style="bold red") if drifted else Text(DASH if drifted is None else "no"),
                  str(d.get("champion_version") or DASH), one_line(why, 300), str(d.get("report") or DASH))
    show(console, t)


def show_dead_letters(console: Console, letters: Sequence[Mapping[str, Any]]) -> None:
    """`recloop alerts dead-letters`."""
    if not letters:
        console.print("No dead letters: every alert was delivered (or none was sent).")
        return
    t = table("endpoint", "event", "type", "status", "attempts", "last code", "last error", "updated",
              right=["attempts", "last code"], wide=["last error"])
    for d in letters:
        t.add_row(str(d.get("endpoint")), str(d.get("event_id")), str(d.get("type")), str(d.get("status")),
                  num(d.get("attempts")), num(d.get("last_status_code")), one_line(d.get("last_error") or DASH, 200),
                  when(d.get("updated_at")))
    show(console, t)
    console.print("`recloop alerts resend` sends them again.")


def show_resent(console: Console, results: Sequence[Mapping[str, Any]]) -> None:
    """`recloop alerts resend`."""
    if not results:
        console.print("Nothing to resend: there are no dead letters.")
        return
    t = table("endpoint", "event", "outcome", "attempts", "code", "error", right=["attempts", "code"], wide=["error"])
    for r in results:
        t.add_row(str(r.get("endpoint")), str(r.get("event_id")),
                  outcome(r.get("outcome") != "dead_lettered", str(r.get("outcome")), str(r.get("outcome"))),
                  num(r.get("attempts")), num(r.get("status_code")), one_line(r.get("error") or DASH, 200))
    show(console, t)


def alert_line(event: Mapping[str, Any]) -> str:
    """One received webhook on one line: its type, id and the first line of its text (no emoji codes)."""
    text = plain_text(str(event.get("text") or "").splitlines()[0]) if event.get("text") else ""
    return f"{event.get('type', '?'):<20} {event.get('id') or ''}  {text}".rstrip()

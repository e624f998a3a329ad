"""The closed loop: simulated users answered by the platform itself, day after day.

The open-loop simulator (`recloop.data.simulator`) decides both who is active and what they are shown.
Here the platform decides what is shown: every simulated session asks the recommender for a slate
(k = the session's slate length, with its surface and the user's country and device as context), the
simulated users respond to what they got by the simulator's ground truth (`Simulator.respond`), and
what they watched goes back as feedback with the answer's `request_id`. Unwatched impressions are not
reported: the server's impressions log and the data plane's join turn them into served negatives (with
`report_unwatched=True` they are sent as `watched_s = 0` feedback instead, the way apps reported them
before the impressions log existed).

This is how feedback loops show: a recommender trained on what it showed itself tends to show ever
fewer, ever more popular videos. `run_closed_loop` returns per-day statistics of what was served
(impressions, CTR, watch time per impression, the Gini coefficient of impressions per catalog video, the
share of the top 1 % of videos, catalog coverage) so that this can be measured, with and without
exploration, and per arm when the platform runs an online experiment.

The recommender is one of

* a `recloop.serving.RecommendationService` in this process (`ServicePlatform`: its feedback is flushed
  to the landing zone at the end of each day, and it refreshes after the day's hook);
* the base URL of a running `recloop serve` (`HttpPlatform`, loopback; the key of RECLOOP_API_KEYS is
  sent when set). Its feedback reaches the landing zone on the server's own flush schedule
  (RECLOOP_SERVING_FEEDBACK_FLUSH_SECONDS), and the simulated days lie in the past: the server must
  accept old feedback (RECLOOP_SERVING_FEEDBACK_MAX_AGE_HOURS);
* any object with ``recommend(user_id, k, context, surface) -> dict`` and ``feedback(events)`` (tests,
  stubs, and other arm setups).

Each day the users and videos that arrived are written into the landing zone first (what the data plane
ingests), then the sessions are served in time order, then the caller's hook runs (e.g. the data plane
for the day and a weekly retraining).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from recloop.data.schemas import SURFACES
from recloop.data.simulator import Simulator, SimConfig, write_landing_table
from recloop.lake import Lake

log = logging.getLogger(__name__)

TOP_SHARE = 0.01  # popularity concentration: the share of impressions of the top 1 % of catalog videos


class Platform(Protocol):
    """What the loop needs of a recommender. `recommend` returns the API's response body (a dict with
    `items`: [{"video_id", ...}], optionally `request_id`, `arm`, `fallback`, `model_version`, and per
    item `position`, `explored`, `source`, `arm`). `context` holds the user's country and device."""

    def recommend(self, user_id: str, k: int, context: Mapping[str, str], surface: str) -> Mapping[str, Any]: ...

    def feedback(self, events: list[dict[str, Any]]) -> None: ...


class NoChampion(RuntimeError):
    """The platform has no model to serve; the closed loop needs one (train first)."""


# --- platforms ---------------------------------------------------------------------------------------


class ServicePlatform:
    """An in-process `RecommendationService`. `end_of_day` flushes its feedback to the landing zone;
    `after_hook` refreshes it (new lake data, new champion)."""

    def __init__(self, service: Any) -> None:
        import inspect

        self.service = service
        # Serving records the surface with its impressions where it takes one (issue 14's serving change).
        self._surface = "surface" in inspect.signature(service.recommend).parameters

    def recommend(self, user_id: str, k: int, context: Mapping[str, str], surface: str) -> dict[str, Any]:
        r = (self.service.recommend(user_id, k, context, surface=surface) if self._surface
             else self.service.recommend(user_id, k, context))
        items = []
        for i, item in enumerate(r.items):
            items.append({"video_id": item.video_id, "source": item.source, "score": item.score,
                          "position": getattr(item, "position", i),
                          "explored": getattr(item, "explored", False), "arm": getattr(item, "arm", None),
                          "propensity": getattr(item, "propensity", 1.0)})
        return {"request_id": getattr(r, "request_id", None), "arm": getattr(r, "arm", None),
                "experiment": getattr(r, "experiment", None), "model_version": r.model_version,
                "fallback": r.fallback, "items": items}

    def feedback(self, events: list[dict[str, Any]]) -> None:
        self.service.record_feedback(events)

    def model_version(self) -> str | None:
        if self.service.model is None:
            self.service.refresh()
        return self.service.model.version if self.service.model is not None else None

    def set_clock(self, at_us: int) -> None:
        """The simulated time of the session about to be served: the service stamps its impressions (and
        feedback without a time) with it, so they land on the simulated day."""
        self.service.clock = lambda: at_us / 1_000_000

    def end_of_day(self) -> None:
        self.service.feedback.flush()
        if hasattr(self.service, "impressions"):
            self.service.impressions.flush()

    def after_hook(self) -> None:
        self.service.refresh()


class HttpPlatform:
    """A running `recloop serve` at `base_url` (the key of RECLOOP_API_KEYS as `X-API-Key` when set)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0, client: Any = None) -> None:
        import httpx

        if api_key is None:
            keys = [k.strip() for k in os.environ.get("RECLOOP_API_KEYS", "").split(",") if k.strip()]
            api_key = keys[0] if keys else None
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        # `client`: an httpx.Client of one's own (tests pass FastAPI's TestClient); the key is added to it.
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self.client.headers.update(headers)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as err:
            raise ConnectionError(f"the recommendation API at {self.base_url} is unreachable ({type(err).__name__}): "
                                  "start it with `recloop serve` or give its address with --serving-url") from None
        if response.status_code in (401, 403):
            raise PermissionError(f"the recommendation API at {self.base_url} refused the API key (HTTP "
                                  f"{response.status_code}): set RECLOOP_API_KEYS to one of the server's keys")
        if response.status_code == 422 and path == "/v1/feedback" and "event_time" in response.text:
            raise ValueError(f"the recommendation API at {self.base_url} refused the simulated days' feedback as too "
                             "old: start the server with RECLOOP_SERVING_FEEDBACK_MAX_AGE_HOURS large enough "
                             "(e.g. 100000)")
        if response.status_code >= 400:
            raise RuntimeError(f"POST {path} answered HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    def recommend(self, user_id: str, k: int, context: Mapping[str, str], surface: str) -> dict[str, Any]:
        return self._post("/v1/recommendations", {"user_id": user_id, "k": k, "context": dict(context),
                                                  "surface": surface})

    def feedback(self, events: list[dict[str, Any]]) -> None:
        body = [{**e, "event_time": e["event_time"].isoformat()} for e in events]
        self._post("/v1/feedback", {"events": body})

    def model_version(self) -> str | None:
        import httpx

        try:
            return self.client.get("/readyz").json().get("model_version")
        except (httpx.HTTPError, ValueError):
            raise ConnectionError(f"the recommendation API at {self.base_url} is unreachable: start it with "
                                  "`recloop serve` or give its address with --serving-url") from None

    def close(self) -> None:
        self.client.close()


def as_platform(recommender: Any) -> Any:
    """A `Platform` for a RecommendationService, an http(s) base URL, or an object that is one already."""
    if isinstance(recommender, str):
        return HttpPlatform(recommender)
    if hasattr(recommender, "record_feedback") and hasattr(recommender, "recommend"):
        return ServicePlatform(recommender)
    if hasattr(recommender, "recommend") and hasattr(recommender, "feedback"):
        return recommender
    raise TypeError(f"not a recommender: {type(recommender).__name__} (give a RecommendationService, a base URL "
                    "or an object with recommend() and feedback())")


# --- statistics ----------------------------------------------------------------------------------


def gini(counts: np.ndarray) -> float:
    """The Gini coefficient of non-negative counts (0: all equal, -> 1: everything on one)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    return float((2.0 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def top_share(counts: np.ndarray, share: float = TOP_SHARE) -> float:
    """The share of all impressions that went to the top `share` of the catalog (at least one video)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    if len(x) == 0 or x.sum() <= 0:
        return 0.0
    top = max(1, int(np.ceil(share * len(x))))
    return float(x[:top].sum() / x.sum())


@dataclass
class DayStats:
    """What was served on one simulated day and how users took it."""

    day: int
    date: str
    sessions: int = 0
    impressions: int = 0
    watches: int = 0
    watched_s: float = 0.0
    likes: int = 0
    completions: int = 0
    fallback_answers: int = 0
    explored: int = 0
    catalog: int = 0  # videos uploaded before the day started
    distinct_videos: int = 0
    gini: float = 0.0
    top1_share: float = 0.0
    by_arm: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)  # impressions per candidate source
    seconds: float = 0.0

    @property
    def ctr(self) -> float:
        return self.watches / self.impressions if self.impressions else 0.0

    @property
    def watch_s_per_impression(self) -> float:
        return self.watched_s / self.impressions if self.impressions else 0.0

    @property
    def coverage(self) -> float:
        return self.distinct_videos / self.catalog if self.catalog else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ctr=round(self.ctr, 5), watch_s_per_impression=round(self.watch_s_per_impression, 3),
                   coverage=round(self.coverage, 5))
        for key in ("watched_s", "gini", "top1_share", "seconds"):
            out[key] = round(out[key], 5)
        return out


@dataclass
class ClosedLoopResult:
    config: SimConfig
    days: list[DayStats] = field(default_factory=list)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [d.as_dict() for d in self.days]


DayHook = Callable[[int, str, DayStats], None]


# --- the loop ------------------------------------------------------------------------------------


def run_closed_loop(
    config: SimConfig,
    landing: Lake | None,
    recommender: Any,
    *,
    days: Sequence[int] | None = None,
    after_day: DayHook | None = None,
    report_unwatched: bool = False,
    simulator: Simulator | None = None,
    progress: Callable[[DayStats], None] | None = None,
    require_model: bool = True,
) -> ClosedLoopResult:
    """Simulate `days` (0-based day indexes of `config`; default all its days) in closed loop.

    Per day: the day's new users and videos go into `landing` (skipped when None), every session is
    answered by `recommender` (see the module docstring), users respond (`Simulator.respond`), watches
    are sent as feedback with the answer's request_id, the platform flushes its feedback, then
    `after_day(index, date, stats)` runs (the data plane, retraining...) and an in-process service
    refreshes. Pass the same `simulator` to continue a population already simulated (e.g. open-loop
    warm-up days before). Raises `NoChampion` before anything is served when the platform says it has
    no model (`model_version()` is None) and `require_model` (the closed loop measures a model).
    """
    platform = as_platform(recommender)
    try:
        return _run(config, landing, platform, days, after_day, report_unwatched, simulator, progress, require_model)
    finally:
        if isinstance(recommender, str):
            platform.close()  # the HTTP client made here for the URL


def _run(config: SimConfig, landing: Lake | None, platform: Any, days: Sequence[int] | None, after_day: DayHook | None,
         report_unwatched: bool, simulator: Simulator | None, progress: Callable[[DayStats], None] | None,
         require_model: bool) -> ClosedLoopResult:
    if require_model and hasattr(platform, "model_version") and platform.model_version() is None:
        raise NoChampion("the platform has no champion model to serve yet: train one first (recloop demo, or "
                         "recloop run then recloop train), or serve popularity on purpose with require_model=False")
    sim = simulator or Simulator(config)
    indexes = list(range(config.days)) if days is None else list(days)
    result = ClosedLoopResult(config)
    for index in indexes:
        began = time.perf_counter()
        day = config.date_of(index).isoformat()
        tables = sim.arrivals(index)
        if landing is not None:
            for name in ("users", "videos"):
                write_landing_table(landing, name, day, tables[name])
        stats = _serve_day(sim, platform, index, day, report_unwatched)
        if hasattr(platform, "end_of_day"):
            platform.end_of_day()
        if after_day is not None:
            after_day(index, day, stats)
        if hasattr(platform, "after_hook"):
            platform.after_hook()
        stats.seconds = time.perf_counter() - began
        result.days.append(stats)
        if progress is not None:
            progress(stats)
    return result


def _serve_day(sim: Simulator, platform: Any, index: int, day: str, report_unwatched: bool) -> DayStats:
    sessions = sim.sessions(index)
    day_start = sim.day_start_us(index)
    catalog = sim.catalog_size(day_start)
    stats = DayStats(day=index, date=day, sessions=len(sessions), catalog=catalog)
    shown = np.zeros(sim.n_videos, np.int64)
    contexts = sim.user_context(sessions.user)
    arms: dict[str, list[float]] = {}
    for s in np.argsort(sessions.start_us, kind="stable"):
        user_id = sessions.user_id(s)
        surface = SURFACES[int(sessions.surface[s])]
        if hasattr(platform, "set_clock"):
            platform.set_clock(int(sessions.start_us[s]))
        answer = platform.recommend(user_id, int(sessions.length[s]), contexts[s], surface)
        items = list(answer.get("items") or [])
        if answer.get("fallback"):
            stats.fallback_answers += 1
        if not items:
            continue
        videos = [it["video_id"] for it in items]
        positions = np.asarray([it.get("position", i) if it.get("position") is not None else i
                                for i, it in enumerate(items)], np.int64)
        times = sessions.times(s, positions)
        response = sim.respond(index, [user_id] * len(videos), videos, positions, times)
        rows = sim.video_rows(videos)
        np.add.at(shown, rows, 1)
        watched = response.watched
        stats.impressions += len(videos)
        stats.watches += int(watched.sum())
        stats.watched_s += float(response.watched_s.sum())
        stats.likes += int(response.liked.sum())
        stats.completions += int(response.completed.sum())
        stats.explored += sum(bool(it.get("explored")) for it in items)
        for it in items:
            source = str(it.get("source") or "unknown")
            stats.sources[source] = stats.sources.get(source, 0) + 1
        request_id = answer.get("request_id")
        default_arm = answer.get("arm")
        for it, w, ws in zip(items, watched.tolist(), response.watched_s.tolist()):
            arm = it.get("arm") or default_arm
            if arm:
                a = arms.setdefault(str(arm), [0, 0, 0.0])
                a[0] += 1
                a[1] += int(w)
                a[2] += ws
        events = []
        for j in range(len(videos)):
            if not (watched[j] or report_unwatched):
                continue
            event = {
                "event_id": f"cl-{index:05d}-{int(s):06d}-{int(positions[j]):03d}",
                "user_id": user_id,
                "video_id": videos[j],
                "event_time": datetime.fromtimestamp(int(times[j]) / 1e6, tz=timezone.utc),
                "surface": surface,
                "position": int(positions[j]),
                "watched_s": float(response.watched_s[j]),
                "completed": bool(response.completed[j]),
                "liked": bool(response.liked[j]),
            }
            if request_id:
                event["request_id"] = request_id
            events.append(event)
        if events:
            platform.feedback(events)
    # Video rows are in upload order: the first `catalog` are the videos known when the day started;
    # one uploaded today counts only when it was shown.
    later = shown[catalog:]
    counts = np.concatenate([shown[:catalog], later[later > 0]])
    stats.distinct_videos = int((counts > 0).sum())
    stats.gini = gini(counts)
    stats.top1_share = top_share(counts)
    stats.by_arm = {arm: {"impressions": a[0], "ctr": a[1] / a[0] if a[0] else 0.0,
                          "watch_s_per_impression": a[2] / a[0] if a[0] else 0.0}
                    for arm, a in sorted(arms.items())}
    return stats


# --- the lifecycle between days ------------------------------------------------------------------


def first_closed_day(config: SimConfig, landing: Lake) -> int:
    """The index of the day after the newest day the landing zone holds events for (0 when it holds
    none): where a closed loop continues a simulated history."""
    from recloop.ingestion import landed_days

    days = list(landed_days(landing, "events", None, None))
    if not days:
        return 0
    newest = datetime.fromisoformat(days[-1]).date()
    return max(0, (newest - config.start).days + 1)


def pipeline_hook(settings: Any, *, retrain_every: int = 7, train_days: int = 7,
                  on_run: Callable[[str, Any], None] | None = None) -> DayHook:
    """An `after_day` hook running what the deployment's schedules run: the daily data plane job for the
    day (ingest → GX → features → Feast → drift), and every `retrain_every` closed-loop days the training
    job (train on the last `train_days` days with events, hold out the newest, gate, promote). The same
    jobs, in process, that `recloop demo` runs. `on_run(kind, run)` sees each run ("data_plane" or
    "training"); a failed data plane run raises RuntimeError naming the day and the cause."""
    from pipelines.run import instance, run_job

    inst = instance(settings)
    run_job("feast_apply_job", inst=inst)
    served = [0]

    def hook(index: int, day: str, stats: DayStats) -> None:
        run = run_job("data_plane_job", partition=day, inst=inst)
        if on_run is not None:
            on_run("data_plane", run)
        if not run.success:
            raise RuntimeError(f"the data plane failed for {day}: {run.error}")
        served[0] += 1
        if retrain_every > 0 and served[0] % retrain_every == 0:
            training = run_job("training_job", inst=inst, run_config_ops={"model__training_set": {"config": {"TrainDays": train_days, "TestDays": 1}}})
            if on_run is not None:
                on_run("training", training)

    return hook

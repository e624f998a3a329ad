"""The recommendation service without any web framework: what `recloop.serving.app` exposes over HTTP.

`RecommendationService.recommend(user_id, k, context)` runs the three stages on the current model:

1. candidates: the ANN neighbours of the user's two-tower vector, the popular videos of the user's
   segment and the freshest uploads, merged without duplicates and tagged with their source; a
   cold-start user (unknown to the model, no activity yet) gets popular-in-segment + fresh only;
   watched and blocked videos are removed here;
2. ranking: the champion's ranker scores every candidate in one batch, on the user's online features
   (Feast, read when not cached for the current snapshot: `recloop.serving.online`) and the cached
   video features;
3. re-ranking: freshness boost, then diversity caps per creator and per category.

The current model is one reference (`ServingModel`), replaced whole by the background thread when the
`champion` alias moves, when the lake holds new uploads or when Feast holds a newer feature snapshot: a
request takes the reference once at its start, so requests in flight finish on the model they began
with and none fails during a swap. Without a model (no champion yet, or it cannot be loaded), with the
online store unreachable, or on any failure of the model path, the answer comes from the popularity of
the user's segment, marked `fallback` with the reason, and counted.

Every answer gets a request id (`rq-<32 hex>`) and is written to the impressions log before it is
returned (`recloop.serving.impressions`: one spool line per request, in the kernel before the answer
leaves, so it survives kill -9; fsynced and flushed to the landing zone in the background). While
the registry's `experiment` alias names another version than the champion, that version is loaded too
(a second `ServingModel`, dropped when the alias goes away) and requests are split between them
(`recloop.serving.experiment`: A/B by a stable hash of the user, or team-draft interleaving of both
rankings); every answer and impression says which experiment and arm. With
`explore_share` > 0, slots of model answers are given to videos of an exploration pool
(`recloop.serving.explore`), with their propensities. With no experiment and no exploration, the
request path is the single-model path, plus the impressions line.

While the online store's circuit breaker is open (`recloop.serving.online`), a user whose rows are not
cached gets the fallback at once, without queueing for the ranking worker; `status()` (what `/readyz`
shows) then says `degraded`, with a reason and no internal error text.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.config import Settings
from recloop.data.engagement import positive_mask
from recloop.lake import Lake, open_lake
from recloop.model_plane.bundle import CorruptModelError
from recloop.serving import lakeview
from recloop.serving.batching import Batcher, Job
from recloop.serving.config import ServingConfig
from recloop.serving.experiment import (
    CHALLENGER_ARM,
    CHAMPION_ARM,
    INTERLEAVED,
    ab_arm,
    experiment_id,
    team_draft_interleave,
)
from recloop.serving.explore import apply_exploration
from recloop.serving.feedback import FeedbackWriter
from recloop.serving.impressions import ImpressionWriter, new_request_id, request_seed
from recloop.serving.history import UserHistory
from recloop.serving.metrics import ServingMetrics
from recloop.serving.model import RankRequest, ServingModel
from recloop.serving.online import CLOSED, CircuitBreaker, FeatureStoreUnavailable, OnlineFeatures
from recloop.serving.popularity import Popularity
from recloop.serving.rerank import diversify, freshness_boost
from recloop.serving.safety import SafetyList, SafetyRules

log = logging.getLogger(__name__)

# A champion found corrupt is tried again after this long (files restored by hand), not at every poll.
CORRUPT_RETRY_S = 300.0
FALLBACK_NO_MODEL = "no_model"
FALLBACK_FEATURE_STORE = "feature_store_unavailable"
FALLBACK_MODEL_ERROR = "model_error"

BREAKER_STATES = ("closed", "half_open", "open")  # the gauge's values 0, 1, 2
DEGRADED_STORE = "online store unavailable"
# The registry aliases the service follows (the names of `recloop.registry`, which imports MLflow).
CHAMPION_ALIAS = "champion"
EXPERIMENT_ALIAS = "experiment"


def _freeze_heap() -> None:
    """Keep the cyclic garbage collector off the loaded model's objects.

    A loaded model, the libraries and the watch history are ~650k long-lived objects that CPython's
    full collection walks every time it runs: a ~300 ms pause for every request in flight, which would
    make the p99 latency. After a swap the old model's cycles are collected once (a pause of that size,
    once per swap, in the background thread), and everything alive is moved to the permanent generation
    (`gc.freeze`), which collections skip; only what requests allocate afterwards is collected as usual.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Item:
    """One slot of an answer. `arm` is the experiment arm (interleaving: the team) that placed it;
    `propensity` the probability of this video in this slot under exploration (`recloop.serving.explore`)."""

    video_id: str
    score: float
    source: str
    position: int = 0
    propensity: float = 1.0
    explored: bool = False
    arm: str = CHAMPION_ARM
    model_version: str | None = None


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    items: list[Item]
    model_version: str | None
    fallback: bool
    fallback_reason: str | None
    cold_start: bool
    segment: dict[str, str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    request_id: str = ""
    experiment: str | None = None  # `exp-v<champion>-v<challenger>` while an experiment runs
    arm: str = CHAMPION_ARM  # champion | challenger (A/B) | interleaved
    # The exploration pool (candidates ranked below the answer), filled only when exploring.
    pool: list[Item] = field(default_factory=list, repr=False, compare=False)


@dataclass
class _Sources:
    """What the data refresh produced: the newest events day it read and what was built from it."""

    events_partition: str | None = None
    popularity: Popularity | None = None


def _registered(version: Any) -> dict[str, str | None]:
    """The registry's `source` (where the files are) and `run_id` (the training run) of a `ModelVersion`."""
    return {"source": getattr(version, "source", None), "run_id": getattr(version, "run_id", None)}


def _alert_corrupt(version: str, err: CorruptModelError) -> None:
    """The `model.corrupt` alert (the same event training sends for the same damage: delivered once)."""
    from recloop.lifecycle import corrupt_model_alert, send_alert

    try:
        send_alert(corrupt_model_alert(version, err.problems, seen_by="serving"), logger=log)
    except Exception:  # noqa: BLE001 - a broken alert configuration must not stop the refresh
        log.exception("could not send the model.corrupt alert of version %s", version)


class RecommendationService:
    """Serves recommendations and takes feedback; see the module docstring.

    Args:
        settings: recloop's stores (lake, landing, Feast, MLflow through `registry`).
        config: the service's behaviour (`ServingConfig.from_env()` by default).
        registry: where the `champion` alias is read (default `recloop.registry.open_registry`).
        metrics: the Prometheus instruments (a fresh registry by default).
        online: the Feast reader (default: built on first refresh, SQLite or Redis per `config`).
        clock: seconds since the epoch (default `time.time`): when an answer was served (its impressions'
            `served_at`) and the default `event_time` of feedback. A closed-loop simulation
            (`recloop.data.closed_loop`) sets it to the simulated session's time.
        landing: where feedback and impressions are flushed (default: the settings' landing zone; the
            latency gate's replay gives a throwaway one).
    """

    def __init__(
        self,
        settings: Settings,
        config: ServingConfig | None = None,
        *,
        registry: Any = None,
        metrics: ServingMetrics | None = None,
        online: OnlineFeatures | None = None,
        clock: Callable[[], float] | None = None,
        landing: Lake | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Callable[[], float] = clock or time.time
        self.config = config or ServingConfig.from_env()
        self.metrics = metrics or ServingMetrics()
        if registry is None:
            from recloop.registry import open_registry

            registry = open_registry(settings)
        self.registry = registry
        self.online = online
        self._store_logged = CLOSED  # the breaker state last logged
        if online is not None:
            online.breaker.listeners.append(self._breaker_changed)
        self.lake: Lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
        self.safety = SafetyList(self.config.safety_file, self.config.safety_check_seconds)
        self.history = UserHistory(max_users=self.config.history_max_users, max_events=self.config.history_max_events,
                                   max_user_events=self.config.history_max_user_events)
        spool = self.config.feedback_spool_dir or settings.home / "serving" / "feedback-spool"
        landing = landing or open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url)
        self.feedback = FeedbackWriter(
            landing,
            spool,
            flush_seconds=self.config.feedback_flush_seconds,
            max_batch=self.config.feedback_max_batch,
            on_flushed=lambda n: self.metrics.feedback_events.labels("flushed").inc(n),
        )
        self.impressions = ImpressionWriter(
            landing,
            self.config.impressions_spool_dir or settings.home / "serving" / "impressions-spool",
            flush_seconds=self.config.impressions_flush_seconds,
            max_batch=self.config.impressions_max_batch,
            fsync=self.config.impressions_fsync,
            sync_seconds=self.config.impressions_sync_seconds,
            on_flushed=lambda n: self.metrics.impressions.labels("flushed").inc(n),
        )
        self._model: ServingModel | None = None
        # The `experiment` alias's version while it differs from the champion's (and its bundle).
        self._challenger: ServingModel | None = None
        self._challenger_bundle: tuple[Path, Path] | None = None
        self._corrupt_challenger: tuple[str, float] | None = None
        # What the registry says of the served versions: their files' `source` and training `run_id`.
        self._champion_registered: dict[str, str | None] = _registered(None)
        self._challenger_registered: dict[str, str | None] = _registered(None)
        self._announced: tuple[Any, ...] | None = None  # what the last "serving ..." log line said
        # (download folder, bundle folder in it) of the model being served: kept to reload the same
        # version when new uploads or a new feature snapshot arrive, removed when the version changes.
        self._bundle: tuple[Path, Path] | None = None
        self._sources = _Sources()
        self._ranking = Batcher(self._rank_batch, max_batch=self.config.max_ranking_batch, name="ranking")
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.last_error: str | None = None
        # (version, when) of a champion whose bundle failed its checksums: alerted once, retried rarely.
        self._corrupt: tuple[str, float] | None = None

    # --- state ------------------------------------------------------------------------------------

    @property
    def model(self) -> ServingModel | None:
        return self._model

    @property
    def challenger(self) -> ServingModel | None:
        """The `experiment` alias's model while an experiment runs (None otherwise)."""
        return self._challenger

    @property
    def experiment(self) -> str | None:
        """The running experiment's id (`exp-v<champion>-v<challenger>`), or None."""
        model, challenger = self._model, self._challenger
        if model is None or challenger is None or challenger.version == model.version:
            return None
        return experiment_id(model.version, challenger.version)

    @property
    def popularity(self) -> Popularity | None:
        return self._sources.popularity

    @property
    def ready(self) -> bool:
        """Ready when there is something to answer with: a model, or at least the popularity fallback."""
        return self._model is not None or self._sources.popularity is not None

    @property
    def online_store_state(self) -> str:
        """The online store's circuit breaker: `closed` (reads go to the store), `open` or `half_open`."""
        return self.online.breaker.state if self.online is not None else CLOSED

    def status(self) -> dict[str, Any]:
        """What `/readyz` shows: `status` is `ready`, `degraded` (answering, but the online store is
        unavailable: users not cached get the popularity fallback) or `not_ready`, and `reason` says why
        in words meant for callers (no internal error text)."""
        model = self._model
        ready, store = self.ready, self.online_store_state
        if not ready:
            state, reason = "not_ready", "no model or popularity fallback loaded yet"
        elif store != CLOSED:
            state, reason = "degraded", DEGRADED_STORE
        else:
            state, reason = "ready", None
        return {
            "status": state,
            "reason": reason,
            "online_store": "up" if store == CLOSED else "unavailable",
            "ready": ready,
            "model_version": model.version if model else None,
            "catalog_size": len(model.ids) if model else 0,
            "feature_snapshot": model.feature_snapshot if model else None,
            "events_partition": self._sources.events_partition,
            "experiment": self.experiment,
            "popularity_ready": self._sources.popularity is not None,
            "last_error": self.last_error,
        }

    def describe(self) -> dict[str, Any]:
        """What is served, for the log and the landing page: the registered model's name, and for the
        champion (None before one is loaded) and the online experiment's challenger (`experiment`: None
        without one) the version, registry alias, URI (`models:/<name>/<version>`, what was downloaded),
        the version's `source` and `run_id` in the registry, catalog size and feature snapshot."""
        model, challenger = self._model, self._challenger
        name = getattr(self.registry, "model_name", None)

        def served(m: ServingModel, alias: str, registered: dict[str, str | None]) -> dict[str, Any]:
            return {"name": name, "version": m.version, "alias": alias, "uri": f"models:/{name}/{m.version}",
                    **registered, "catalog_size": len(m.ids), "feature_snapshot": m.feature_snapshot}

        experiment = None
        if model is not None and challenger is not None and challenger.version != model.version:
            cfg = self.config
            experiment = {"id": experiment_id(model.version, challenger.version), "mode": cfg.experiment_mode,
                          "share": cfg.experiment_share,
                          "challenger": served(challenger, EXPERIMENT_ALIAS, self._challenger_registered)}
        return {
            "model_name": name,
            "champion": None if model is None else served(model, CHAMPION_ALIAS, self._champion_registered),
            "experiment": experiment,
        }

    # --- background refresh -----------------------------------------------------------------------

    def _online(self) -> OnlineFeatures:
        if self.online is None:
            cfg = self.config
            online = cfg.online_store or ("redis" if self.settings.is_production else "sqlite")
            breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_seconds)
            breaker.listeners.append(self._breaker_changed)
            self.online = OnlineFeatures(self.settings, online=online, cache_users=cfg.feature_cache_users,
                                         timeout_s=cfg.online_store_timeout_seconds, breaker=breaker)
        return self.online

    def _breaker_changed(self, state: str) -> None:
        """Gauge every change; log when the store goes down and comes back (not every failed probe)."""
        self.metrics.online_store_breaker.set(BREAKER_STATES.index(state))
        if state == "open" and self._store_logged == CLOSED:
            log.warning("online store unavailable: circuit breaker open, users not cached get popularity")
        elif state == CLOSED:
            log.warning("online store available again: circuit breaker closed")
        if state != "half_open":
            self._store_logged = state

    def _refresh_sources(self) -> None:
        newest = lakeview.newest_partition(self.lake, "silver/events")
        if newest is None or (newest == self._sources.events_partition and self._sources.popularity is not None):
            return
        days = max(self.config.history_days, self.config.popularity_days)
        events = lakeview.recent_events(self.lake, days)
        self.history.load_lake(events, newest)
        since = (pd.Timestamp(newest, tz="UTC") - pd.Timedelta(days=self.config.popularity_days - 1)).value // 1000
        popularity = Popularity.build(
            events[events["time_us"] >= since], lakeview.users(self.lake), lakeview.videos(self.lake)
        )
        self._sources = _Sources(newest, popularity)

    def _refresh_model(self) -> bool:
        champion = self.registry.champion()
        current = self._model
        if champion is None:
            if current is None:
                self.last_error = f"no champion alias on {self.registry.model_name}: serving popularity"
            return False
        version = str(champion.version)
        if self._corrupt and self._corrupt[0] == version and time.monotonic() - self._corrupt[1] < CORRUPT_RETRY_S:
            return False  # still the corrupt champion: its error stays in last_error, no download per poll
        self._online().refresh_registry()
        challenger = self._challenger
        promoted = challenger is not None and challenger.version == version
        if promoted and (current is None or current.version != version):
            # The challenger was promoted: it is loaded and up to date already, so it becomes the champion
            # as it is (its bundle is the champion's now; the experiment step finds no challenger to drop).
            loaded = (challenger, self._challenger_bundle)
            self._challenger, self._challenger_bundle = None, None
            return self._swap(version, *loaded, registered=_registered(champion))
        try:
            loaded = self._load(version, current, self._bundle)
        except CorruptModelError as err:
            self._corrupt = (version, time.monotonic())
            _alert_corrupt(version, err)
            raise
        if loaded is None:
            return False
        return self._swap(version, *loaded, registered=_registered(champion))

    def _swap(
        self, version: str, model: ServingModel, bundle: tuple[Path, Path], *, registered: dict[str, str | None],
    ) -> bool:
        self._corrupt = None
        self._champion_registered = registered
        previous, self._bundle = self._bundle, bundle
        self._model = model  # the swap: one reference assignment
        if previous is not None and previous is not bundle:
            shutil.rmtree(previous[0], ignore_errors=True)
        _freeze_heap()
        self.metrics.model_swaps.inc()
        self.metrics.model_version.set(int(version))
        return True  # logged by `_announce` once the experiment step has run too

    def _load(
        self, version: str, current: ServingModel | None, current_bundle: tuple[Path, Path] | None,
    ) -> tuple[ServingModel, tuple[Path, Path]] | None:
        """`version` loaded as a `ServingModel` with its (download folder, bundle folder); None when
        `current` is that version and still matches the lake's uploads and Feast's snapshot."""
        online = self._online()
        if current is not None and current.version == version:
            stale_videos = lakeview.newest_partition(self.lake, "silver/videos") != current.lake_videos
            if not stale_videos and online.snapshot() == current.feature_snapshot:
                return None
            assert current_bundle is not None
            bundle = current_bundle
        else:
            root = Path(tempfile.mkdtemp(prefix=f"recloop-serving-v{version}-"))
            try:
                bundle = (root, self.registry.bundle_path(version, dst_dir=root))
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
        try:
            model = ServingModel.load(bundle[1], version, online, self.lake, ef_search=self.config.ef_search)
        except BaseException:
            if bundle is not current_bundle:
                shutil.rmtree(bundle[0], ignore_errors=True)
            raise
        return model, bundle

    def _drop_challenger(self) -> None:
        if self._challenger is None and self._challenger_bundle is None:
            return
        version = self._challenger.version if self._challenger else None
        bundle, self._challenger, self._challenger_bundle = self._challenger_bundle, None, None
        if bundle is not None:
            shutil.rmtree(bundle[0], ignore_errors=True)
        log.info("online experiment with version %s ended: serving the champion only", version)

    def _refresh_experiment(self) -> bool:
        """Load the `experiment` alias's version as the challenger while it differs from the champion;
        drop it when the alias goes away (or now names the champion)."""
        experiment = self.registry.experiment()
        champion = self._model
        version = str(experiment.version) if experiment is not None else None
        if version is None or champion is None or version == champion.version:
            self._drop_challenger()
            return False
        corrupt = self._corrupt_challenger
        if corrupt and corrupt[0] == version and time.monotonic() - corrupt[1] < CORRUPT_RETRY_S:
            return False
        try:
            loaded = self._load(version, self._challenger, self._challenger_bundle)
        except CorruptModelError as err:
            self._drop_challenger()
            self._corrupt_challenger = (version, time.monotonic())
            _alert_corrupt(version, err)
            raise
        if loaded is None:
            return False
        model, bundle = loaded
        self._corrupt_challenger = None
        self._challenger_registered = _registered(experiment)
        previous, self._challenger_bundle = self._challenger_bundle, bundle
        self._challenger = model  # one reference assignment, as for the champion
        if previous is not None and previous is not bundle:
            shutil.rmtree(previous[0], ignore_errors=True)
        _freeze_heap()
        return True  # logged by `_announce`

    def refresh(self) -> bool:
        """One round of the background thread: lake data, then the model. Never raises: a failure is
        logged, kept in `last_error`, and the current model (or the fallback) keeps serving. Returns
        whether a new model was swapped in."""
        with self._refresh_lock:
            swapped = False
            errors = []
            for step in (self._refresh_sources, self._refresh_model, self._refresh_experiment):
                try:
                    swapped = bool(step()) or swapped
                except Exception as err:
                    log.exception("serving refresh step %s failed", step.__name__)
                    errors.append(f"{step.__name__}: {type(err).__name__}: {err}")
            if errors:
                self.last_error = "; ".join(errors)
            elif self._model is not None:
                self.last_error = None
            self._announce()
            return swapped

    def _announce(self) -> None:
        """One INFO line when what is served changes (the first refresh after the start, a new champion or
        feature snapshot, an experiment starting or ending): the model's name, version, alias, URI and
        source and run, and the online experiment if one runs."""
        info = self.describe()
        champion, experiment = info["champion"], info["experiment"]
        key = (
            champion and (champion["version"], champion["feature_snapshot"], champion["catalog_size"]),
            experiment and (experiment["id"], experiment["challenger"]["feature_snapshot"]),
        )
        if key == self._announced:
            return
        self._announced = key
        if champion is None:
            log.info("serving no model yet: %s", self.last_error or f"no {CHAMPION_ALIAS} loaded")
            return
        if experiment is None:
            running = "no online experiment"
        else:
            challenger = experiment["challenger"]
            split = (f"{experiment['share']:.0%} of users on the challenger" if experiment["mode"] == "ab"
                     else "both rankings interleaved in every answer")
            running = (f"online experiment {experiment['id']}: challenger version {challenger['version']} "
                       f"(alias {challenger['alias']}, {challenger['uri']}), {experiment['mode']}, {split}")
        log.info("serving model %s version %s (alias %s, %s, source %s, run %s; %d videos, feature snapshot %s)"
                 "; %s", champion["name"], champion["version"], champion["alias"], champion["uri"],
                 champion["source"], champion["run_id"], champion["catalog_size"], champion["feature_snapshot"],
                 running)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.config.poll_seconds)

    def start(self) -> None:
        """Recover spooled feedback and impressions, then refresh in the background every `poll_seconds`."""
        self.feedback.start()
        self.impressions.start()
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="recloop-serving-refresh", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        self.feedback.stop()
        self.impressions.stop()
        gc.unfreeze()  # what `_freeze_heap` set aside is collectable again (and finalized at exit)

    def close(self) -> None:
        """Stop everything, including the ranking worker (the service cannot be restarted after)."""
        self.stop()
        self._ranking.close()
        if self.online is not None:
            self.online.close()
        self._drop_challenger()

    # --- recommendations --------------------------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        k: int | None = None,
        context: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        surface: str | None = None,
    ) -> Recommendation:
        """Top-k videos for `user_id` (see the module docstring). `context` may give the user's
        `country`, `age_bucket` and `device`; `exclude` adds videos not to show (e.g. on screen now);
        `surface` is recorded with the impressions. The answer is in the impressions spool on return."""
        started = time.perf_counter()
        request_id = new_request_id()
        cfg = self.config
        k = min(int(k or cfg.default_k), cfg.max_k)
        context = {key: value for key, value in (context or {}).items() if value}
        model, challenger, popularity = self._model, self._challenger, self._sources.popularity
        segment = popularity.segment_of(user_id, context) if popularity else dict(context)
        rules = self.safety.rules()
        watched = self.history.watched(user_id).union(exclude)
        args = (user_id, k, context, segment, watched, rules, started, request_id)
        if model is None:
            result = self._fallback(user_id, k, segment, watched, rules, FALLBACK_NO_MODEL, started, None,
                                    request_id)
        elif challenger is None or challenger.version == model.version:
            result = self._answer(model, *args)
        else:
            experiment = experiment_id(model.version, challenger.version)
            if cfg.experiment_mode == "interleave":
                result = self._interleave(model, challenger, experiment, *args)
            else:
                arm = ab_arm(experiment, user_id, cfg.experiment_share)
                result = self._answer(challenger if arm == CHALLENGER_ARM else model, *args)
                items = result.items if arm == CHAMPION_ARM else [replace(i, arm=arm) for i in result.items]
                result = replace(result, items=items, experiment=experiment, arm=arm)
            if result.experiment is not None:
                self.metrics.experiment_requests.labels(result.arm).inc()
        if cfg.explore_share > 0 and result.pool:
            result = self._explore(result)
        self._log(result, surface)
        return result

    def _answer(
        self,
        model: ServingModel,
        user_id: str,
        k: int,
        context: Mapping[str, str],
        segment: dict[str, str],
        watched: set[str],
        rules: SafetyRules,
        started: float,
        request_id: str,
    ) -> Recommendation:
        """`model`'s answer, or the popularity fallback when the model path cannot answer."""
        online = self.online
        if online is not None and not online.breaker.allow() and not online.has_user(user_id, model.feature_snapshot):
            # The store is known to be down and this user's rows are not cached: no ranking can happen.
            self.metrics.errors.labels("recommendations").inc()
            return self._fallback(user_id, k, segment, watched, rules, FALLBACK_FEATURE_STORE, started, model, request_id)
        try:
            return self._recommend(model, self._sources.popularity, user_id, k, context, segment, watched, rules,
                                   started, request_id)
        except FeatureStoreUnavailable as err:
            # Logged once per failed batch (`_rank_batch`), and once when the breaker opens.
            log.debug("online store unavailable, serving popularity: %s", err)
            self.metrics.errors.labels("recommendations").inc()
            return self._fallback(user_id, k, segment, watched, rules, FALLBACK_FEATURE_STORE, started, model, request_id)
        except Exception:
            log.exception("model path failed for user %s, serving popularity", user_id)
            self.metrics.errors.labels("recommendations").inc()
            return self._fallback(user_id, k, segment, watched, rules, FALLBACK_MODEL_ERROR, started, model, request_id)

    def _interleave(
        self,
        model: ServingModel,
        challenger: ServingModel,
        experiment: str,
        user_id: str,
        k: int,
        context: Mapping[str, str],
        segment: dict[str, str],
        watched: set[str],
        rules: SafetyRules,
        started: float,
        request_id: str,
    ) -> Recommendation:
        """Both models rank; team-draft interleaving merges their lists (seeded by the request id).
        When either model path falls back, the champion's answer is returned outside the experiment
        (`experiment` null): an answer one team could not rank would bias the credit."""
        args = (user_id, k, context, segment, watched, rules, started, request_id)
        a = self._answer(model, *args)
        b = self._answer(challenger, *args)
        if a.fallback or b.fallback:
            return a
        merged = team_draft_interleave(a.items, b.items, k, request_seed(request_id), key=lambda i: i.video_id)
        items = [replace(item, position=pos, arm=CHAMPION_ARM if team == 0 else CHALLENGER_ARM)
                 for pos, (item, team) in enumerate(merged)]
        placed = {i.video_id for i in items}
        pool = [i for i in a.pool if i.video_id not in placed]
        timings = {**a.stage_seconds, "total": time.perf_counter() - started}
        return Recommendation(user_id, items, model.version, False, None, a.cold_start, segment, timings,
                              request_id, experiment, INTERLEAVED, pool)

    def _explore(self, result: Recommendation) -> Recommendation:
        """Exploration of the answer's slots from its pool (`recloop.serving.explore`)."""
        share = self.config.explore_share
        slots = apply_exploration(result.items, result.pool, share, request_seed(result.request_id))
        items = []
        for pos, ((item, explored, propensity), kept) in enumerate(zip(slots, result.items)):
            if explored:
                item = replace(item, source="explore", arm=kept.arm)
            items.append(replace(item, position=pos, propensity=propensity, explored=explored))
        explored_n = sum(1 for i in items if i.explored)
        if explored_n:
            self.metrics.explored_slots.inc(explored_n)
        return replace(result, items=items, pool=[])

    def _log(self, result: Recommendation, surface: str | None) -> None:
        """The answer into the impressions spool (before it is returned); a failure is logged and
        counted, never the request's failure."""
        if not result.items:
            return
        t = time.perf_counter()
        try:
            self.impressions.log(result, surface, int(self.clock() * 1_000_000))
        except Exception:
            log.exception("could not spool the impressions of request %s", result.request_id)
            self.metrics.impressions.labels("failed").inc(len(result.items))
        else:
            self.metrics.impressions.labels("logged").inc(len(result.items))
        seconds = time.perf_counter() - t
        result.stage_seconds["log"] = seconds
        self.metrics.stage_seconds.labels("log").observe(seconds)

    def _recommend(
        self,
        model: ServingModel,
        popularity: Popularity | None,
        user_id: str,
        k: int,
        context: Mapping[str, str],
        segment: dict[str, str],
        watched: set[str],
        rules: SafetyRules,
        started: float,
        request_id: str = "",
    ) -> Recommendation:
        cfg = self.config
        timings: dict[str, float] = {}
        mark = started

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            timings[stage] = now - mark
            mark = now

        recent = self.history.recent(user_id, model.cutoff_us)
        cold = not model.knows(user_id) and not recent
        uvec = None if cold else model.user_vector(user_id, recent, {**segment, **context})
        popular = model.rows_of([v for v, _ in popularity.top(segment)]) if popularity else np.zeros(0, np.int64)
        watched_rows = model.rows_of(sorted(watched))
        request = RankRequest(user_id, recent, uvec, popular,
                              np.union1d(watched_rows, np.flatnonzero(model.blocked(rules))), watched_rows)
        lap("request")

        job = self._ranking.run((model, request))
        ranked = job.result
        timings.update({s: job.timings[s] for s in ("batch_wait", "candidates", "features", "feature_store", "ranking")})
        batch_size = job.timings["batch_size"]
        mark = time.perf_counter()

        rows = ranked.rows
        scores = ranked.scores + freshness_boost(
            model.upload_us[rows], model.clock_us, cfg.freshness_weight, cfg.freshness_half_life_days
        )
        order = np.argsort(-scores, kind="stable")
        picked = diversify(order, model.creator[rows], model.category[rows], k, cfg.max_per_creator, cfg.max_per_category)
        version = model.version
        items = [Item(model.ids[rows[i]], float(scores[i]), ranked.sources[i], pos, model_version=version)
                 for pos, i in enumerate(picked)]
        pool: list[Item] = []
        if cfg.explore_share > 0:  # the next-ranked candidates not in the answer (recloop.serving.explore)
            taken = set(int(i) for i in picked)
            below = [int(i) for i in order if int(i) not in taken][: cfg.explore_pool]
            pool = [Item(model.ids[rows[i]], float(scores[i]), ranked.sources[i], model_version=version) for i in below]
        lap("rerank")
        timings["total"] = time.perf_counter() - started
        self._observe(timings)
        self.metrics.batch_size.observe(batch_size)
        return Recommendation(user_id, items, version, False, None, cold, segment, timings, request_id, pool=pool)

    def _rank_batch(self, jobs: Sequence[Job]) -> None:
        """The batcher's work: one pass of the model plane (candidates, one Feast read, one ranker call)
        per model among the waiting requests (two models only while a swap is under way)."""
        by_model: dict[int, list[Job]] = {}
        for job in jobs:
            by_model.setdefault(id(job.payload[0]), []).append(job)
        for group in by_model.values():
            model: ServingModel = group[0].payload[0]
            online = self._online()
            hits, misses = online.hits, online.misses
            try:
                ranked, timings = model.rank([j.payload[1] for j in group], online)
            except FeatureStoreUnavailable as err:
                if not err.refused:
                    log.warning("online store read failed for %d requests, serving popularity: %s", len(group), err)
                for job in group:
                    job.error = err
                continue
            finally:
                self.metrics.feature_cache.labels("hit").inc(online.hits - hits)
                self.metrics.feature_cache.labels("miss").inc(online.misses - misses)
            for job, result in zip(group, ranked):
                job.result = result
                job.timings.update(timings)

    def _fallback(
        self,
        user_id: str,
        k: int,
        segment: dict[str, str],
        watched: set[str],
        rules: SafetyRules,
        reason: str,
        started: float,
        model: ServingModel | None = None,
        request_id: str = "",
    ) -> Recommendation:
        """Popularity of the user's segment, with the same safety, no-repeat and diversity rules."""
        self.metrics.fallbacks.labels(reason).inc()
        popularity = self._sources.popularity
        ranked = popularity.top(segment) if popularity else ()
        meta = popularity.video_meta if popularity else {}
        videos = [
            (v, count) for v, count in ranked
            if v not in watched and v in meta and not rules.blocks(v, meta[v][2])
        ]
        creators = [meta[v][1] for v, _ in videos]
        categories = [meta[v][0] for v, _ in videos]
        cfg = self.config
        picked = diversify(np.arange(len(videos)), creators, categories, k, cfg.max_per_creator, cfg.max_per_category)
        version = model.version if model else None
        items = [Item(videos[i][0], float(videos[i][1]), "popular", pos, model_version=version)
                 for pos, i in enumerate(picked)]
        total = time.perf_counter() - started
        self._observe({"total": total})
        return Recommendation(
            user_id, items, version, True, reason,
            model is None or not model.knows(user_id), segment, {"total": total}, request_id,
        )

    def _observe(self, timings: Mapping[str, float]) -> None:
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)

    # --- feedback ---------------------------------------------------------------------------------

    def record_feedback(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Accept impressions and watches (events-table fields and an optional `request_id`, the answer
        reacted to; `event_id` and `event_time` are filled in when missing). Durable on return; the history sees them at once. Returns the event ids."""
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        model = self._model
        rows = []
        for e in events:
            t = e.get("event_time") or now
            t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
            rows.append(
                {
                    "event_id": e.get("event_id") or f"fb-{uuid.uuid4().hex}",
                    "user_id": str(e["user_id"]),
                    "video_id": str(e["video_id"]),
                    "event_time": t,
                    "surface": e.get("surface"),
                    "position": e.get("position"),
                    "watched_s": float(e.get("watched_s") or 0.0),
                    "completed": bool(e.get("completed") or False),
                    "liked": bool(e.get("liked") or False),
                    "request_id": e.get("request_id"),
                }
            )
        self.feedback.submit(rows)
        frame = pd.DataFrame(rows, columns=["user_id", "video_id", "watched_s", "completed", "liked"])
        if model is not None:
            duration = np.asarray([model.duration_s[r] if (r := model.row.get(v, -1)) >= 0 else np.nan
                                   for v in frame["video_id"]], np.float64)
        else:
            duration = np.full(len(frame), np.nan)
        positive = positive_mask(frame, duration)
        self.history.add(
            [
                (r["user_id"], r["video_id"], int(r["event_time"].timestamp() * 1_000_000), r["watched_s"] > 0, bool(p))
                for r, p in zip(rows, positive)
            ]
        )
        self.metrics.feedback_events.labels("accepted").inc(len(rows))
        return [r["event_id"] for r in rows]

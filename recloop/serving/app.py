"""The HTTP API (FastAPI): recommendations, feedback, health, readiness, Prometheus metrics, OpenAPI.

    POST /v1/recommendations   {"user_id", "k"?, "context"?: {"country", "age_bucket", "device"}, "exclude"?,
                               "surface"?}  -> items + request_id, experiment, arm (impressions logged)
    POST /v1/feedback          {"events": [{"user_id", "video_id", "watched_s", "request_id"?, ...}]}  -> 202 (API key)
    GET  /healthz              the process is up
    GET  /readyz               503 until a model or the popularity fallback is loaded; 200 with
                               "status": "degraded" while the online store is unavailable (error text: key)
    GET  /metrics              Prometheus text format
    GET  /                     a landing page (HTML): the model served, the experiment, links to the rest
    GET  /docs, /redoc         the OpenAPI description in Swagger UI and ReDoc (/openapi.json: the JSON)

`create_app(settings)` builds the app around a `RecommendationService` started and stopped with the
app's lifespan; `serve(settings)` runs it with uvicorn (what `recloop serve` calls). Writes need an API
key (`recloop.serving.auth`); bodies are parsed as strict JSON and feedback is checked against the
limits of `ServingConfig` (`recloop.serving.inputs`).

Swagger UI and ReDoc come from the `fastapi-offline` package (their JavaScript and CSS, served under
`DOCS_ASSETS`), not from a CDN: the documentation pages work on a machine without internet access.
"""

from __future__ import annotations

import copy
import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recloop.config import Settings
from recloop.serving import auth
from recloop.serving.admission import AdmissionControl, AdmissionLimits
from recloop.serving.config import FEEDBACK_EVENTS_CEILING, ServingConfig
from recloop.serving.history import HistoryCollector
from recloop.serving.inputs import StrictJSONRoute, check_feedback, to_utc, validation_error_handler
from recloop.serving.metrics import ServingMetrics
from recloop.serving.service import Recommendation, RecommendationService

TITLE = "recloop serving"
DESCRIPTION = "Recommendations (retrieval → ranking → re-ranking), feedback and health of recloop."
DOCS_ASSETS = "/static/docs"  # Swagger UI's and ReDoc's JavaScript, CSS and icon (package fastapi-offline)


class Context(BaseModel):
    """What the app knows about the user now; it picks the popularity segment of a cold-start user."""

    country: str | None = Field(None, max_length=64, examples=["US"])
    age_bucket: str | None = Field(None, max_length=16, examples=["25-34"])
    device: str | None = Field(None, max_length=32, examples=["ios"])


class RecommendationRequest(BaseModel):
    user_id: str = Field(..., min_length=1, max_length=256, examples=["u0000123"])
    k: int | None = Field(None, ge=1, le=1000, description="How many videos (default 20, capped by max_k).")
    context: Context | None = None
    exclude: list[str] = Field(default_factory=list, max_length=1000, description="Videos not to return.")
    surface: str | None = Field(None, max_length=64, examples=["home"],
                                description="Where the answer is shown; recorded with its impressions.")

    @field_validator("k", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        # JSON true/false are not counts (lax integer parsing would read `true` as 1).
        if isinstance(value, bool):
            raise ValueError("k must be a JSON integer, not true or false")
        return value


class RecommendedItem(BaseModel):
    video_id: str
    score: float = Field(..., description="Final score (the LambdaRank ranker's score + freshness boost; popularity count in fallback).")
    source: Literal["item_to_item", "two_tower", "popular", "fresh", "explore"] = Field(
        ..., description="The candidate source that proposed the video (`explore`: an exploration slot).")
    position: int = Field(..., ge=0, description="0-based slot in the answer.")
    propensity: float = Field(
        ..., ge=0.0, le=1.0,
        description="Probability of this video in this slot under the logging policy: 1 - ε for a slot "
                    "not explored, ε / pool size for an explored one, 1.0 without exploration (docs/serving.md).")
    explored: bool = Field(..., description="True when an exploration slot put the video here.")


class RecommendationResponse(BaseModel):
    request_id: str = Field(..., pattern=r"^rq-[0-9a-f]{32}$", examples=["rq-3f2a9c0e8d7b4a1f9e6c5b4a3d2e1f0a"],
                            description="Id of this answer: send it back with the feedback on its items.")
    user_id: str
    items: list[RecommendedItem]
    model_version: str | None = Field(..., description="The champion version that ranked (None: no model).")
    fallback: bool = Field(..., description="True when the answer is the segment's popularity, not the model's.")
    fallback_reason: str | None = Field(None, examples=["feature_store_unavailable"])
    cold_start: bool
    segment: dict[str, str]
    stage_ms: dict[str, float]
    experiment: str | None = Field(..., examples=["exp-v3-v4"],
                                   description="The online experiment this answer is part of (None: none).")
    arm: Literal["champion", "challenger", "interleaved"] = Field(
        ..., description="The experiment arm that answered (`interleaved`: both; `champion` without experiment).")

    @classmethod
    def of(cls, r: Recommendation) -> "RecommendationResponse":
        return cls(
            request_id=r.request_id,
            user_id=r.user_id,
            items=[RecommendedItem(video_id=i.video_id, score=i.score, source=i.source, position=i.position,
                                   propensity=i.propensity, explored=i.explored) for i in r.items],
            model_version=r.model_version,
            fallback=r.fallback,
            fallback_reason=r.fallback_reason,
            cold_start=r.cold_start,
            segment=r.segment,
            stage_ms={s: round(v * 1000, 3) for s, v in r.stage_seconds.items()},
            experiment=r.experiment,
            arm=r.arm,
        )


class FeedbackEvent(BaseModel):
    """One impression with its outcome: `watched_s = 0` is an impression that was not watched."""

    event_id: str | None = Field(
        None, min_length=1, max_length=128,
        description="Idempotency key, stored as `fb-<event_id>` (feedback ids have their own namespace); "
                    "generated when absent.")
    user_id: str = Field(..., min_length=1, max_length=256)
    video_id: str = Field(..., min_length=1, max_length=256)
    event_time: datetime | None = Field(
        None, description="When shown (ISO 8601; naive means UTC; default: now). Within the server's window "
                          "around now (default: the last 48 hours to 5 minutes ahead).")
    surface: str | None = Field(None, max_length=64, examples=["home"])
    position: int | None = Field(None, ge=0, le=10_000, strict=True, description="A JSON integer.")
    watched_s: float = Field(0.0, ge=0.0, le=86_400.0)
    completed: bool = Field(False, strict=True, description="JSON true or false.")
    liked: bool = Field(False, strict=True, description="JSON true or false.")
    request_id: str | None = Field(
        None, min_length=1, max_length=64, examples=["rq-3f2a9c0e8d7b4a1f9e6c5b4a3d2e1f0a"],
        description="The `request_id` of the recommendations answer that showed the video, if any.")

    @field_validator("event_time")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return to_utc(value)


class FeedbackRequest(BaseModel):
    events: list[FeedbackEvent] = Field(..., min_length=1, max_length=FEEDBACK_EVENTS_CEILING)


class FeedbackResponse(BaseModel):
    accepted: int
    event_ids: list[str]


class _CountRequests:
    """Counts every HTTP answer by route template and status (and 5xx as errors).

    A plain ASGI middleware, not Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`), which
    runs each request through an extra task and memory streams: at a few hundred requests per second on
    two cores that overhead is a measurable share of the latency budget."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The route's template, not the raw path: unknown paths must not create new label values.
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 500:
                self.metrics.errors.labels(endpoint).inc()


def create_app(
    settings: Settings | None = None,
    config: ServingConfig | None = None,
    *,
    service: RecommendationService | None = None,
) -> FastAPI:
    """The API around `service` (default: a `RecommendationService(settings, config)`), which is
    started when the app starts (model polling, feedback flushing) and stopped (feedback flushed) when
    it stops."""
    settings = settings or (service.settings if service is not None else Settings.from_env())
    keys = auth.ApiKeys.from_env(settings)  # production without keys: SettingsError, before anything starts
    service = service or RecommendationService(settings, config)
    metrics = service.metrics
    cfg = service.config
    authenticator = auth.Authenticator(keys, auth.RateLimiter(cfg.rate_limit_per_second, cfg.rate_limit_burst))
    recommendations_keyed = cfg.recommendations_auth == "key"
    auth.warn_if_open(keys, recommendations_keyed)
    for collector in (authenticator, HistoryCollector(service.history)):
        try:
            metrics.registry.register(collector)
        except ValueError:  # a second app around the same service: its first app's collectors report
            pass

    def key_for(endpoint: str):
        async def require_key(
            bearer: HTTPAuthorizationCredentials | None = Security(auth.bearer_scheme),
            header: str | None = Security(auth.header_scheme),
        ) -> str | None:
            return authenticator.check(endpoint, bearer, header)

        return require_key

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    # FastAPI with /docs and /redoc pointing at the assets of fastapi-offline, served from DOCS_ASSETS.
    # `validatorUrl: null`: Swagger UI never asks the online validator about the description.
    app = FastAPIOffline(
        title=TITLE,
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.service = service
    app.router.route_class = StrictJSONRoute  # NaN, Infinity, lone surrogates: 422 (recloop.serving.inputs)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    app.add_middleware(_CountRequests, metrics=metrics)
    # Outermost: beyond capacity, 503 + Retry-After before anything else runs (recloop.serving.admission).
    app.add_middleware(AdmissionControl, limits=AdmissionLimits.of(service.config), metrics=metrics)

    @app.post("/v1/recommendations", response_model=RecommendationResponse, tags=["recommendations"],
              dependencies=[Depends(key_for("recommendations"))] if recommendations_keyed else [],
              responses=auth.RESPONSES if recommendations_keyed else {})
    def recommendations(body: RecommendationRequest) -> RecommendationResponse:
        """Top-k videos for a user, with scores, candidate sources and the model version."""
        context = body.context.model_dump() if body.context else None
        return RecommendationResponse.of(service.recommend(body.user_id, body.k, context, body.exclude, body.surface))

    @app.post("/v1/feedback", status_code=202, response_model=FeedbackResponse, tags=["feedback"],
              dependencies=[Depends(key_for("feedback"))], responses=auth.RESPONSES)
    def feedback(body: FeedbackRequest) -> FeedbackResponse:
        """Impressions and watches; stored durably, written to the landing zone for the next ingestion.
        Needs an API key (when the server has keys); limits: see docs/serving.md."""
        now = datetime.fromtimestamp(service.clock(), timezone.utc)  # the wall clock, unless simulated
        check_feedback(body.events, cfg, now)
        events = [{**e.model_dump(), "event_time": e.event_time or now} for e in body.events]
        ids = service.record_feedback(events)
        return FeedbackResponse(accepted=len(ids), event_ids=ids)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "Not ready yet"},
                                                         403: auth.RESPONSES[403]})
    def readyz(request: Request) -> JSONResponse:
        """Readiness, open to probes. Error texts (which may name hosts, paths or libraries) only for callers
        that send an API key (as for the write endpoints; a wrong key is a 403)."""
        status = service.status()
        if not authenticator.trusted_request(request):
            status = auth.redact_errors(status)
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def landing(request: Request) -> HTMLResponse:
        """For people: what this server is, which model it serves, where the docs and probes are."""
        return HTMLResponse(landing_page(
            service.describe(), service.status()["status"], root=request.scope.get("root_path", ""),
            keys=keys.enabled, recommendations_keyed=recommendations_keyed,
        ))

    return app


def landing_page(
    info: dict[str, Any], status: str, *, root: str = "", keys: bool = True,
    recommendations_keyed: bool = False,
) -> str:
    """The HTML of `/`: `info` is `RecommendationService.describe()`, `status` its `/readyz` status; links
    start with `root` (the ASGI root path behind a proxy). Nothing is loaded from elsewhere, and no
    artifact location is shown (as `/readyz`, the page is open to anyone who reaches the port)."""

    def e(value: object) -> str:
        return html.escape(str(value))

    champion, experiment = info.get("champion"), info.get("experiment")
    rows: list[tuple[str, str]] = [("status", f'{e(status)} (<a href="{e(root)}/readyz">/readyz</a>)')]
    if champion is None:
        answers = ": answers come from the popularity of each segment" if status != "not_ready" else ""
        rows.append(("model", f"none loaded yet{answers}"))
    else:
        run = f" (training run <code>{e(champion['run_id'])}</code>)" if champion.get("run_id") else ""
        rows += [
            ("model", f"<strong>{e(champion['name'])}</strong> version <strong>{e(champion['version'])}</strong> "
                      f"(alias <code>{e(champion['alias'])}</code>)"),
            ("model URI", f"<code>{e(champion['uri'])}</code>{run}"),
            ("catalog", f"{e(champion['catalog_size'])} videos, feature snapshot {e(champion['feature_snapshot'])}"),
        ]
    if experiment is None:
        rows.append(("online experiment", "none: every answer comes from the champion"))
    else:
        challenger = experiment["challenger"]
        split = (f"A/B, {experiment['share']:.0%} of users on the challenger" if experiment["mode"] == "ab"
                 else "team-draft interleaving of both rankings in every answer")
        rows.append(("online experiment",
                     f"<strong>{e(experiment['id'])}</strong>: challenger version "
                     f"<strong>{e(challenger['version'])}</strong> (alias <code>{e(challenger['alias'])}"
                     f"</code>, <code>{e(challenger['uri'])}</code>), {e(split)}"))
    table = "\n".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    recommendations = "needs an API key" if recommendations_keyed and keys else "open"
    feedback = "needs an API key" if keys else "open: no API keys are set on this server"
    links = [
        ("/docs", "Swagger UI: the API, tried from the browser"),
        ("/redoc", "ReDoc: the API reference"),
        ("/openapi.json", "the OpenAPI description (JSON)"),
        ("/readyz", "readiness: model, catalog, feature snapshot (503 until something can answer)"),
        ("/healthz", "liveness: the process is up"),
        ("/metrics", "Prometheus metrics"),
    ]
    items = "\n".join(f'<li><a href="{e(root)}{path}"><code>{path}</code></a>: {e(text)}</li>'
                      for path, text in links)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(TITLE)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }}
th {{ text-align: left; padding-right: 1.5rem; vertical-align: top; white-space: nowrap; }}
td, th {{ padding-bottom: .3rem; }}
code {{ background: #f3f3f3; padding: 0 .2rem; }}
</style>
</head>
<body>
<h1>{e(TITLE)}</h1>
<p>{e(DESCRIPTION)}</p>
<h2>What is served</h2>
<table>
{table}
</table>
<h2>API</h2>
<ul>
<li><code>POST /v1/recommendations</code>: top-k videos for a user ({recommendations})</li>
<li><code>POST /v1/feedback</code>: impressions and watches ({feedback})</li>
</ul>
<ul>
{items}
</ul>
</body>
</html>
"""


def serve(
    settings: Settings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    config: ServingConfig | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Run the API with uvicorn in this process (one worker: the model, the history of what users
    watched and the feedback spool live in it). Torch and FAISS use one thread each: a request is a
    small batch, and intra-op threads would only contend with the other requests for the cores."""
    import faiss
    import torch
    import uvicorn

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    app = create_app(settings or Settings.from_env(), config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                log_config=log_config(log_level))


def log_config(log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration plus recloop's loggers on its console handler, so that what the
    service logs (the model it serves, swaps, fallbacks) shows next to uvicorn's lines at `log_level`."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["recloop"] = {**config["formatters"]["default"],
                                       "fmt": "%(levelprefix)s %(name)s: %(message)s"}
    config["handlers"]["recloop"] = {**config["handlers"]["default"], "formatter": "recloop"}
    level = log_level.upper()
    config["loggers"]["recloop"] = {"handlers": ["recloop"], "level": "DEBUG" if level == "TRACE" else level,
                                    "propagate": False}
    return config

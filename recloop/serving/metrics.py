"""Prometheus metrics of the serving API, on a registry of their own (one per app, so several apps in
one process, as in tests, do not collide on prometheus_client's global registry).

    recloop_serving_stage_seconds{stage}        histogram: request (user vector, exclusions), batch_wait,
                                                candidates, features, feature_store (Feast online read),
                                                ranking, rerank, total
    recloop_serving_ranking_batch_size          histogram: requests per ranking batch
    recloop_serving_requests_total{endpoint,status}
    recloop_serving_errors_total{endpoint}      answers with status >= 500 and failures behind a fallback
    recloop_serving_fallbacks_total{reason}     no_model, feature_store_unavailable, model_error
    recloop_serving_model_version               the registry version being served (0: none)
    recloop_serving_model_swaps_total
    recloop_serving_feedback_events_total{outcome}  accepted, flushed
    recloop_serving_feature_cache_total{outcome}    users' online rows: hit (cached for the current
                                                snapshot), miss (read from Feast)
    recloop_serving_online_store_breaker        the online store's circuit breaker: 0 closed, 1 half-open,
                                                2 open (recloop.serving.online)
    recloop_serving_shed_requests_total{reason} requests answered 503 by admission control: queue_full,
                                                queue_timeout (recloop.serving.admission)
    recloop_serving_in_flight_requests          requests admitted and not finished
    recloop_serving_admission_wait_seconds      histogram: time an admitted request waited for a slot
    recloop_serving_admission_limit             requests admitted at once now (adapted to the latency)
    recloop_serving_impressions_total{outcome}  impressions logged (spooled before the answer), flushed
                                                (landing zone), failed (the spool write failed)
    recloop_serving_experiment_requests_total{arm}  answers under an online experiment: champion,
                                                challenger (A/B), interleaved
    recloop_serving_explored_slots_total        slots given to the exploration pool
    process_cpu_seconds_total, process_resident_memory_bytes, ... (prometheus_client's ProcessCollector),
    python_info (PlatformCollector), recloop_serving_gpu_memory_bytes{device} (with a GPU only)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

# batch_wait: time a request waits for the ranking worker (see recloop.serving.batching); features and
# ranking are the times of the batch the request was part of.
# log: writing the answer's impressions to the spool (after `total`, before the answer is returned).
STAGES = ("request", "batch_wait", "candidates", "features", "feature_store", "ranking", "rerank", "total", "log")
# Sub-millisecond to a second: the stages take from ~0.1 ms to the tens of ms a slow request needs.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0,
)


class ServingMetrics:
    """The service's instruments; `registry` is what `/metrics` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "recloop_serving_stage_seconds", "Latency of each recommendation stage and of the whole request",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "recloop_serving_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "recloop_serving_errors", "Failed requests (5xx) and failures answered by a fallback",
            ["endpoint"], registry=r,
        )
        self.fallbacks = Counter(
            "recloop_serving_fallbacks", "Recommendations answered from popularity, by reason", ["reason"],
            registry=r,
        )
        # A plain number rather than an info-style label: registry versions are integers, and a label
        # would have to be removed on every swap, which prometheus_client does not support in its
        # multi-process mode (Feast switches that mode on by exporting PROMETHEUS_MULTIPROC_DIR).
        self.model_version = Gauge(
            "recloop_serving_model_version", "Registry version of the champion being served (0: none)", registry=r
        )
        self.batch_size = Histogram(
            "recloop_serving_ranking_batch_size", "Requests ranked together in one batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r,
        )
        self.model_swaps = Counter("recloop_serving_model_swaps", "Models swapped in", registry=r)
        self.feedback_events = Counter(
            "recloop_serving_feedback_events", "Feedback events accepted and flushed to the landing zone",
            ["outcome"], registry=r,
        )
        self.feature_cache = Counter(
            "recloop_serving_feature_cache", "Users' online feature rows served from the per-snapshot cache "
            "(hit) or read from Feast (miss)", ["outcome"], registry=r,
        )
        self.online_store_breaker = Gauge(
            "recloop_serving_online_store_breaker",
            "Circuit breaker of the online store: 0 closed, 1 half-open (probing), 2 open (reads refused)",
            registry=r,
        )
        self.shed = Counter(
            "recloop_serving_shed_requests", "Requests refused by admission control (503 + Retry-After), by reason",
            ["reason"], registry=r,
        )
        self.in_flight = Gauge(
            "recloop_serving_in_flight_requests", "Requests admitted and not finished", registry=r,
        )
        self.admission_limit = Gauge(
            "recloop_serving_admission_limit", "Requests admission control lets in at once now (adaptive)",
            registry=r,
        )
        self.admission_wait = Histogram(
            "recloop_serving_admission_wait_seconds", "Time an admitted request waited for a slot",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.impressions = Counter(
            "recloop_serving_impressions", "Impressions logged (spooled before the answer), flushed to the "
            "landing zone, or failed to spool", ["outcome"], registry=r,
        )
        self.experiment_requests = Counter(
            "recloop_serving_experiment_requests", "Answers under an online experiment, by arm "
            "(champion, challenger; interleaved)", ["arm"], registry=r,
        )
        self.explored_slots = Counter(
            "recloop_serving_explored_slots", "Answer slots given to a video of the exploration pool", registry=r,
        )
        for outcome in ("logged", "flushed", "failed"):
            self.impressions.labels(outcome)
        # The process itself (process_cpu_seconds_total, process_resident_memory_bytes, ...; python_info)
        # and, with a GPU, the memory torch holds on it: what a slower or bigger model costs the machine.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        _gpu_memory_gauge(r)
        for reason in ("queue_full", "queue_timeout"):
            self.shed.labels(reason)
        for stage in STAGES:  # expose every series from the start, at zero
            self.stage_seconds.labels(stage)


def _gpu_memory_gauge(registry: CollectorRegistry) -> None:
    """`recloop_serving_gpu_memory_bytes{device}`: memory allocated by torch per CUDA device (only when
    torch sees a GPU; read at scrape time)."""
    import sys

    torch = sys.modules.get("torch")  # serving imports torch anyway; never imported here for a CPU-only app
    if torch is None or not torch.cuda.is_available():
        return
    gauge = Gauge("recloop_serving_gpu_memory_bytes", "GPU memory allocated by torch", ["device"], registry=registry)
    for device in range(torch.cuda.device_count()):
        gauge.labels(str(device)).set_function(lambda d=device: torch.cuda.memory_allocated(d))

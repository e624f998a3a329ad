"""Replays a sample of real requests against model bundles, through the production code path, and prints
their latency: `python -m recloop.latency.replay --challenger SRC [--champion SRC]`.

SRC is a registry version (`7`: downloaded from the registry of this environment's settings) or a bundle
folder. Each bundle is served by its own `RecommendationService` (the class behind the HTTP API) whose
registry is pinned to that bundle: the same model load (`ServingModel.load`: new uploads added, Feast
video features, user vectors), the same user history and popularity from the lake, the same Feast online
reads, ranking worker, re-ranking, business rules and impression logging (into a landing zone of its own,
thrown away) as production. HTTP is left out on purpose: its cost (routing, JSON) does not depend on the
model, and the gate compares models.

The requests (documented in docs/latency.md):

* from `silver/impressions` when the lake holds it — one per served request (`request_id`), newest days
  first: its `user_id` and `surface`, i.e. the traffic serving really answered;
* else the users of the newest `silver/events` days, one request per event (an active user is requested
  as often as they were active), the closest stand-in for traffic before serving logged impressions.

`--sample` requests are drawn (seeded) from those; the first `--warmup` are replayed and not measured
(first-touch costs: page faults of the model, Feast connections, caches). Champion and challenger are
replayed in the same process, request by request, alternating which goes first, so that both see the same
machine noise. The process prints one JSON object (figures in milliseconds per model):

    {"source": "silver/impressions", "requests": 300, "warmup": 30,
     "challenger": {"version": "7", "p50_ms": …, "p95_ms": …, "p99_ms": …, "max_ms": …, "mean_ms": …,
                    "requests": 300, "fallbacks": 0, "fallback_reasons": {}},
     "champion": {…} or null}

A bundle that cannot be served (corrupt, fails to load) is a one-line error on stderr and exit status 2,
unless it is the champion: the champion is then left out (`champion: null`, `champion_error` says why)
and the gate applies its absolute budget only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recloop.config import Settings
from recloop.lake import Lake

log = logging.getLogger(__name__)

IMPRESSIONS = "silver/impressions"
EVENTS = "silver/events"
# Newest days of silver/* read for the sample (more than enough for a few hundred requests).
MAX_DAYS = 3


@dataclass(frozen=True)
class Request:
    user_id: str
    surface: str | None = None


def sample_requests(lake: Lake, n: int, *, seed: int = 0) -> tuple[str, list[Request]]:
    """(where they come from, `n` requests) drawn from the lake's real traffic; see the module docstring.
    Fewer distinct requests than `n` are drawn with replacement. Raises ValueError when the lake holds
    neither impressions nor events."""
    rng = np.random.default_rng(seed)
    for dataset in (IMPRESSIONS, EVENTS):
        days = lake.partitions(dataset)[-MAX_DAYS:]
        if not days:
            continue
        tables = [lake.read_partition(dataset, d) for d in reversed(days)]
        frames = []
        for t in tables:
            cols = [c for c in ("request_id", "user_id", "surface") if c in t.column_names]
            frames.append(t.select(cols).to_pandas())
        import pandas as pd

        frame = pd.concat(frames, ignore_index=True)
        if dataset == IMPRESSIONS and "request_id" in frame:
            frame = frame.drop_duplicates("request_id")
        frame = frame.dropna(subset=["user_id"])
        if frame.empty:
            continue
        picked = rng.choice(len(frame), size=n, replace=len(frame) < n)
        users = frame["user_id"].astype(str).to_numpy()[picked]
        surfaces = (frame["surface"].to_numpy()[picked] if "surface" in frame else [None] * n)
        return dataset, [Request(u, None if s is None or s != s else str(s)) for u, s in zip(users, surfaces)]
    raise ValueError(f"the lake {lake.uri()} holds neither {IMPRESSIONS} nor {EVENTS}: no requests to replay")


class PinnedRegistry:
    """Stands in for `recloop.registry.Registry` in a `RecommendationService`: its champion is always one
    bundle folder (given, or downloaded once)."""

    def __init__(self, version: str, bundle: Path, model_name: str = "latency-replay") -> None:
        self.version, self.bundle, self.model_name = str(version), Path(bundle), model_name

    def champion(self) -> Any:
        return self

    def experiment(self) -> None:
        return None  # no online experiment: one model per service

    def bundle_path(self, version: Any = None, *, dst_dir: Path | None = None) -> Path:
        return self.bundle


def resolve_bundle(source: str, settings: Settings, work: Path) -> tuple[str, Path]:
    """(version label, bundle folder) of `source`: a folder as is, a registry version downloaded."""
    path = Path(source)
    if path.is_dir():
        return path.name, path
    if not source.isdigit():
        raise ValueError(f"{source!r} is neither a bundle folder nor a registry version number")
    from recloop.registry import open_registry

    dst = work / f"v{source}"
    return source, open_registry(settings).bundle_path(source, dst_dir=dst)


def pinned_service(settings: Settings, version: str, bundle: Path, work: Path) -> Any:
    """A `RecommendationService` serving `bundle` only (nothing started in the background: no polling, no
    flushing); raises when the model cannot be loaded. Its answers are logged as impressions like
    production's (the cost is part of a request), but into a spool and a landing zone of its own under
    `work`, removed afterwards: replayed requests never reach the real landing zone."""
    from recloop.lake import LocalLake
    from recloop.serving.config import ServingConfig
    from recloop.serving.service import RecommendationService

    own = work / f"service-{uuid.uuid4().hex[:8]}"
    config = replace(ServingConfig.from_env(), feedback_spool_dir=own / "feedback-spool",
                     impressions_spool_dir=own / "impressions-spool")
    # The deployment's settings (production ones refuse local paths), only the landing zone is our own.
    service = RecommendationService(settings, config, registry=PinnedRegistry(version, bundle),
                                    landing=LocalLake(str(own / "landing")))
    service.refresh()
    if service.model is None:
        problem = service.last_error or "the model did not load"
        service.close()
        raise RuntimeError(f"bundle {version} cannot be served: {problem}")
    return service


def figures(seconds: Sequence[float], fallbacks: Mapping[str, int]) -> dict[str, Any]:
    """Latency percentiles (ms) of one model's measured requests."""
    ms = np.asarray(seconds, np.float64) * 1000.0
    q = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return {"p50_ms": round(float(q[0]), 3), "p95_ms": round(float(q[1]), 3), "p99_ms": round(float(q[2]), 3),
            "max_ms": round(float(ms.max()), 3) if len(ms) else float("nan"),
            "mean_ms": round(float(ms.mean()), 3) if len(ms) else float("nan"),
            "requests": int(len(ms)), "fallbacks": int(sum(fallbacks.values())), "fallback_reasons": dict(fallbacks)}


def replay(services: Mapping[str, Any], requests: Sequence[Request], *, warmup: int = 0,
           k: int | None = None) -> dict[str, dict[str, Any]]:
    """Each request to every service in turn (the order alternating from one request to the next), the
    first `warmup` requests (cycled from `requests`) not measured; per service its `figures`."""
    names = list(services)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    fallbacks: dict[str, dict[str, int]] = {n: {} for n in names}
    warm = [requests[i % len(requests)] for i in range(warmup)] if requests else []
    for i, request in enumerate([*warm, *requests]):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            answer = services[name].recommend(request.user_id, k, surface=request.surface)
            elapsed = time.perf_counter() - t0
            if i < len(warm):
                continue
            seconds[name].append(elapsed)
            if answer.fallback:
                reason = answer.fallback_reason or "unknown"
                fallbacks[name][reason] = fallbacks[name].get(reason, 0) + 1
    return {n: figures(seconds[n], fallbacks[n]) for n in names}


def run(settings: Settings, challenger: str, champion: str | None, *, sample: int, warmup: int, seed: int = 0,
        k: int | None = None) -> dict[str, Any]:
    """The whole replay of this process (what `main` prints)."""
    import faiss
    import torch

    # As `recloop.serving.app.serve` runs: one thread each for torch and FAISS.
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from recloop.lake import open_lake

    lake = open_lake(settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url)
    source, requests = sample_requests(lake, sample, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="recloop-latency-"))
    services: dict[str, Any] = {}
    out: dict[str, Any] = {"source": source, "requests": len(requests), "warmup": warmup, "champion": None}
    try:
        version, bundle = resolve_bundle(challenger, settings, work)
        services["challenger"] = pinned_service(settings, version, bundle, work)
        versions = {"challenger": version}
        if champion:
            try:
                version, bundle = resolve_bundle(champion, settings, work)
                services["champion"] = pinned_service(settings, version, bundle, work)
                versions["champion"] = version
            except Exception as err:  # noqa: BLE001 - no champion to compare with: budget only, said so
                out["champion_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        for name, result in replay(services, requests, warmup=warmup, k=k).items():
            out[name] = {"version": versions[name], **result}
    finally:
        for service in services.values():
            service.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from recloop.latency.gate import LatencyConfig

    parser = argparse.ArgumentParser(prog="python -m recloop.latency.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--challenger", required=True, help="registry version or bundle folder")
    parser.add_argument("--champion", default=None, help="registry version or bundle folder (optional)")
    parser.add_argument("--sample", type=int, default=None, help="requests replayed ($RECLOOP_LATENCY_SAMPLE)")
    parser.add_argument("--warmup", type=int, default=None, help="requests not measured ($RECLOOP_LATENCY_WARMUP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=None, help="items per answer (default: serving's default_k)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        config = LatencyConfig.from_env()
        result = run(Settings.from_env(), args.challenger, args.champion,
                     sample=args.sample or config.sample, warmup=config.warmup if args.warmup is None else args.warmup,
                     seed=args.seed, k=args.k)
    except Exception as err:  # noqa: BLE001 - one line for the caller (the gate), not a traceback
        print(f"latency replay failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

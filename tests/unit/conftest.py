"""Fixtures of the unit tests."""

import contextlib
import threading

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Other test processes share the 2 cores: one torch thread avoids OpenMP spinning against them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def serving_client(monkeypatch, tmp_path):
    """`serving_client(settings, registry, keys, **config) -> (client, service)`: a started TestClient around a
    fresh `RecommendationService` (polling and feedback flushing slowed to an hour, its own spool), with
    `RECLOOP_API_KEYS` set to `keys` (unset for None); every client and service is closed afterwards."""
    from fastapi.testclient import TestClient

    from recloop.serving import RecommendationService, ServingConfig, auth, create_app

    opened = []

    def start(settings, registry, keys: str | None, **overrides):
        if keys is None:
            monkeypatch.delenv(auth.KEYS_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(auth.KEYS_VARIABLE, keys)
        config = ServingConfig(**{"poll_seconds": 3600.0, "feedback_flush_seconds": 3600.0,
                                  "feedback_spool_dir": tmp_path / f"spool-{len(opened)}", **overrides})
        service = RecommendationService(settings, config, registry=registry)
        client = TestClient(create_app(service=service))
        client.__enter__()
        opened.append((client, service))
        return client, service

    yield start
    for client, service in opened:
        client.__exit__(None, None, None)
        service.close()


@contextlib.contextmanager
def _one_slot_held(service):
    release, entered = threading.Event(), threading.Event()
    recommend = service.recommend

    def held(*args, **kwargs):  # noqa: ANN002, ANN003 - the service at capacity: the one slot is taken
        entered.set()
        release.wait(30)
        return recommend(*args, **kwargs)

    service.recommend = held
    try:
        yield entered, release
    finally:
        release.set()
        service.recommend = recommend


@pytest.fixture()
def slot_held():
    """`with slot_held(service) as (entered, release):` the service's recommendations block (at most 30 s)
    until `release` is set (on leaving, at the latest): a request sent meanwhile holds the one admission
    slot once `entered` is set, so the next ones meet a service at capacity."""
    return _one_slot_held

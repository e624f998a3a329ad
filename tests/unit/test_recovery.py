"""Recoverable models (issue 13, point 2), against real parts: a small simulated lake, a real Feast store,
a real bundle (two-tower + FAISS index + LambdaRank ranker) saved twice and registered as versions 1 and 2
of a real MLflow registry (SQLite, in the RECLOOP_HOME the CLI reads), and a real Standard Webhooks
receiver on loopback.

Version 2, the champion, is then damaged the way the outside probe damaged it (its FAISS index replaced
by random bytes, its ranker cut in half) in MLflow's artifact store. What must hold: a load names the
damaged files (no FAISS or LightGBM error), serving falls back and sends ONE `model.corrupt` webhook
however often it polls, training skips to the newest champion that loads (the same event: still one
webhook), a promotion decided against that champion is not "stale", and `recloop rollback` skips what
does not load while `recloop rollback --to VERSION` validates what it is asked and says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
import yaml

from recloop.config import Settings
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.features import apply_repo, materialize_partition
from recloop.lake import LocalLake
from recloop.model_plane import fit_config
from recloop.model_plane.bundle import (
    CHECKSUMS,
    CorruptModelError,
    load_bundle,
    read_checksums,
    save_bundle,
    verify_bundle,
)
from recloop.model_plane.fit import fit_recommender
from recloop.model_plane.history import History
from recloop.model_plane.ranker import RankerConfig
from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
from recloop.registry import CHAMPION, GateDecision, RegistryError, open_registry
from recloop.training import TwoTowerConfig, load_window

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(seed=3, days=4, initial_users=250, initial_videos=150, new_users_per_day=5, new_videos_per_day=5,
                events_per_day=1_500, n_creators=30)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
INDEX = "sources/two_tower/index/index.faiss"
RANKER = "ranker/model.txt"


def _decision(compared_to: str) -> GateDecision:
    return GateDecision(promote=True, reasons=[f"PROMOTE: test against {compared_to}"], checks={"primary_metric": True},
                        compared_to=compared_to)


def _stored_bundle(registry, version: str) -> Path:
    """The bundle folder of `version` inside MLflow's artifact store (not a downloaded copy)."""
    location = registry.client.get_model_version_download_uri(registry.model_name, version)
    model = Path(url2pathname(urlsplit(location).path))
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    return model / mlmodel["flavors"]["python_function"]["artifacts"]["bundle"]["path"]


def damage(bundle: Path) -> None:
    """What the probe did: the FAISS index replaced by random bytes, the ranker cut in half."""
    (bundle / INDEX).write_bytes(os.urandom(4096))
    ranker = (bundle / RANKER).read_bytes()
    (bundle / RANKER).write_bytes(ranker[: len(ranker) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(home))
        for var in ("RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_MLFLOW_ARTIFACT_URI", "RECLOOP_LAKE_URI",
                    "RECLOOP_LANDING_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV", "RECLOOP_BUNDLE_LOADER"):
            mp.delenv(var, raising=False)
        mp.setenv("RECLOOP_FEAST_PROJECT", f"t{uuid.uuid4().hex[:10]}")
        settings = Settings.from_env()
        lake = LocalLake(settings.lake_uri)
        simulate_validated(SIM, lake)
        apply_repo(settings)
        materialize_partition(settings, DAYS[-1])
        config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=2, num_threads=1), max_users_per_fold=200,
                            ranker=RankerConfig(max_rounds=30, num_threads=1), l2_grid=(100.0,))
        fitted = fit_recommender(History.from_window(load_window(lake, DAYS)), config=config,
                                 store=LakeSnapshots(lake))
        registry = open_registry(settings)
        versions = []
        for name in ("one", "two"):  # two runs: each version has its own files in the artifact store
            bundle = save_bundle(root / f"bundle-{name}", fitted.recommender)
            run_id = registry.log_training_run(experiment="recloop-training", params={}, metrics={}, data={},
                                               features=list(RANKING_FEATURES), bundle_dir=bundle,
                                               example_user_ids=["u0000001"])
            versions.append(registry.register(run_id))
        registry.promote(versions[0], _decision("popularity"))
        registry.promote(versions[1], _decision(f"champion:{versions[0]}"))
        yield {"root": root, "settings": settings, "registry": registry, "versions": versions,
               "bundle": root / "bundle-one", "env": {"RECLOOP_HOME": str(home),
                                                       "RECLOOP_FEAST_PROJECT": settings.feast_project}}


@pytest.fixture()
def home_env(world, monkeypatch):
    for name, value in world["env"].items():
        monkeypatch.setenv(name, value)
    for var in ("RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_MLFLOW_ARTIFACT_URI", "RECLOOP_LAKE_URI",
                "RECLOOP_LANDING_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV", "RECLOOP_BUNDLE_LOADER"):
        monkeypatch.delenv(var, raising=False)
    return world


# --- the bundle's checksums ------------------------------------------------------------------------------


def test_a_saved_bundle_lists_the_sha256_of_every_file_and_loads(world, tmp_path):
    bundle = world["bundle"]
    listed = read_checksums(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    assert sorted(listed) == on_disk and {INDEX, RANKER, "bundle.json"} <= set(listed)
    assert verify_bundle(bundle) == listed
    # the `sha256sum -c` format: "<64 hex>  <relative path>"
    first = (bundle / CHECKSUMS).read_text().splitlines()[0]
    assert len(first.split("  ")[0]) == 64
    assert load_bundle(bundle).recommend(["u0000001"], 5)


def test_a_damaged_bundle_is_one_error_naming_each_damaged_file(world, tmp_path):
    bundle = shutil.copytree(world["bundle"], tmp_path / "bundle")
    damage(bundle)
    with pytest.raises(CorruptModelError) as caught:
        load_bundle(bundle)  # before: a raw FAISS / LightGBM error from deep inside the loaders
    err = caught.value
    assert list(err.problems) == [RANKER, INDEX] and err.file == RANKER
    assert "does not match its checksum" in str(err) and INDEX in str(err) and str(bundle) in str(err)
    assert "faiss" not in str(err).lower().replace("index.faiss", "")

    (bundle / CHECKSUMS).unlink()
    with pytest.raises(CorruptModelError, match=f"{CHECKSUMS} is missing"):
        load_bundle(bundle)
    (bundle / CHECKSUMS).write_text("not a manifest\n")
    with pytest.raises(CorruptModelError, match="malformed at line 1"):
        verify_bundle(bundle)


def test_a_bundle_damaged_before_it_is_logged_is_refused(world, tmp_path):
    bundle = shutil.copytree(world["bundle"], tmp_path / "bundle")
    (bundle / "bundle.json").write_text("{}")
    with pytest.raises(CorruptModelError, match="bundle.json does not match"):
        world["registry"].log_training_run(experiment="recloop-training", params={}, metrics={}, data={},
                                           features=[], bundle_dir=bundle, example_user_ids=["u0000001"])


# --- a corrupt champion: serving, training, promotion, rollback -------------------------------------------


def test_corrupt_champion_one_alert_training_skips_it_rollback_recovers(webhook_receiver, home_env, capsys):
    from recloop import lifecycle
    from recloop.cli import main
    from recloop.model_plane.steps import load_newest_champion
    from recloop.serving import RecommendationService, ServingConfig

    world = home_env
    registry, (v1, v2) = world["registry"], world["versions"]
    assert str(registry.champion().version) == v2
    damage(_stored_bundle(registry, v2))

    # Serving: no model, the popularity fallback, the cause in last_error, and ONE webhook however often
    # it polls (it does not even download the corrupt version again at every poll).
    root = world["root"]
    safety = root / "safety.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    service = RecommendationService(world["settings"], ServingConfig(
        poll_seconds=0.2, safety_file=safety, safety_check_seconds=0.0, feedback_spool_dir=root / "spool",
        feedback_flush_seconds=3600.0), registry=registry)
    try:
        for _ in range(3):
            assert service.refresh() is False
        assert service.model is None and service.ready
        assert "CorruptModelError" in service.last_error and INDEX in service.last_error
        answer = service.recommend("u0000001", 5)
        assert answer.fallback and len(answer.items) == 5
    finally:
        service.close()
    alerts = webhook_receiver.of_type("model.corrupt")
    assert len(alerts) == 1
    assert alerts[0]["data"]["model_version"] == v2 and set(alerts[0]["data"]["details"]["files"]) == {RANKER, INDEX}
    assert "recloop rollback" in alerts[0]["text"]

    # Training: the candidate is compared with the newest champion that loads (v1), v2 is named as
    # skipped, and its alert is the same event: still one webhook.
    champion, version, skipped = load_newest_champion(lifecycle.champion_candidates(registry))
    assert champion is not None and version == v1
    assert [s["version"] for s in skipped] == [v2] and skipped[0]["corrupt"] and RANKER in skipped[0]["reason"]
    for alert in lifecycle.corrupt_model_alerts({"champions_skipped": skipped}):
        lifecycle.send_alert(alert)
    assert len(webhook_receiver.of_type("model.corrupt")) == 1

    # A promotion decided against v1 while the alias still names the corrupt v2 is not "stale".
    run_id = registry.log_training_run(experiment="recloop-training", params={}, metrics={}, data={},
                                       features=list(RANKING_FEATURES), bundle_dir=world["bundle"],
                                       example_user_ids=["u0000001"])  # a good bundle: its own files
    v3 = registry.register(run_id)
    with pytest.raises(RegistryError, match="stale decision"):
        registry.promote(v3, _decision(f"champion:{v1}"))
    registry.promote(v3, _decision(f"champion:{v1}"), unloadable=[v2])
    assert str(registry.champion().version) == v3 and registry.lineage() == [v1, v2, v3]
    v4 = registry.register(run_id)  # registered, never promoted

    def rollback(*args: str) -> tuple[int, str, str]:
        code = main(["rollback", *args, "--json"])
        out, err = capsys.readouterr()
        return code, out, err

    # --to: each refusal is one sentence, exit code 2, and the champion stays.
    capsys.readouterr()
    for args, expected in ((["--to", "99"], "no version or alias '99'"),
                           (["--to", v4], f"version {v4} of {registry.model_name} was never champion"),
                           (["--to", v3], f"version {v3} is the champion already"),
                           (["--to", v2], f"version {v2} cannot be rolled back to because it does not load: corrupt: "
                                          f"{RANKER} does not match its checksum")):
        code, out, err = rollback(*args)
        assert code == 2 and out == "" and expected in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and str(registry.champion().version) == v3

    # Without --to: back past the corrupt v2 to v1, saying so.
    code, out, err = rollback("--reason", "v3 regressed")
    assert code == 0, err
    result = json.loads(out)
    assert (result["champion_was"], result["champion_now"]) == (v3, v1)
    assert any(f"version {v2} skipped: corrupt" in line for line in result["why"])
    assert registry.lineage() == [v1] and str(registry.champion().version) == v1

    # --to any version promoted before, here v3 (rolled back past just now): it loads, it becomes champion.
    code, out, err = rollback("--to", v3)
    assert code == 0, err
    assert (json.loads(out)["champion_was"], json.loads(out)["champion_now"]) == (v1, v3)
    assert str(registry.champion().version) == v3 and registry.lineage() == [v1, v3]
    code, out, err = rollback()
    assert code == 0 and json.loads(out)["champion_now"] == v1 and registry.lineage() == [v1]
    code, out, err = rollback()
    assert code == 2 and "no previous champion to roll back to" in err and len(err.strip().splitlines()) == 1

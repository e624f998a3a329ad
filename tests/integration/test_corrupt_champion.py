"""A corrupt champion end to end (issue 13, point 2), as the outside probe did it: a champion trained by the
real training job (Dagster, Feast, MLflow on SQLite), then its FAISS index replaced by random bytes and its
ranker cut in half in MLflow's artifact store.

Before: serving fell back (good), `recloop train` died at evaluation with a raw FAISS error, and
`recloop rollback` said there was no previous champion. Now: the data plane's drift step skips the
corrupt champion and says so, serving falls back, and all of them alert once together,
`recloop train` trains and evaluates against the newest champion that loads (none here: popularity, and
says so), promotes, and the webhook receiver has exactly one `model.corrupt`; rollback says in one
sentence why it cannot go back to the corrupt version; serving picks up the new champion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
import yaml

from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

SIM = SimConfig(seed=5, days=4, initial_users=500, initial_videos=250, events_per_day=2_500, new_users_per_day=15,
                new_videos_per_day=10)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
TRAIN = ["train", "--train-days", "2", "--test-days", "1", "--json"]


def stored_bundle(registry, version: str) -> Path:
    location = registry.client.get_model_version_download_uri(registry.model_name, version)
    model = Path(url2pathname(urlsplit(location).path))
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    return model / mlmodel["flavors"]["python_function"]["artifacts"]["bundle"]["path"]


def test_training_and_rollback_with_a_corrupt_champion(recloop_env, webhook_receiver, capsys, tmp_path):
    from pipelines.run import instance, run_data_plane, run_job
    from recloop.cli import main
    from recloop.registry import open_registry
    from recloop.serving import RecommendationService, ServingConfig

    settings = recloop_env
    simulate(SIM, open_lake(settings.landing_uri))
    assert all(r.success for r in run_data_plane(DAYS, settings=settings))
    assert main(TRAIN) == 0
    registry = open_registry(settings)
    assert str(registry.champion().version) == "1"

    bundle = stored_bundle(registry, "1")
    (bundle / "sources/two_tower/index/index.faiss").write_bytes(os.urandom(4096))
    ranker = (bundle / "ranker/model.txt").read_bytes()
    (bundle / "ranker/model.txt").write_bytes(ranker[: len(ranker) // 2])

    # The data plane still runs the day: no drift report against a corrupt champion, said so (and alerted).
    day = run_job("data_plane_job", partition=DAYS[-1], inst=instance(settings))
    assert day.success, day.error
    assert "champion v1 is corrupt (ranker/model.txt does not match" in day.materialized["monitoring/drift"]["status"]

    safety = tmp_path / "safety.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    service = RecommendationService(settings, ServingConfig(
        poll_seconds=0.2, safety_file=safety, safety_check_seconds=0.0, feedback_spool_dir=tmp_path / "spool",
        feedback_flush_seconds=3600.0), registry=registry)
    try:
        service.refresh()
        service.refresh()
        assert service.model is None and "ranker/model.txt does not match its checksum" in service.last_error
        assert service.recommend("u0000001", 5).fallback
        capsys.readouterr()

        # Training proceeds: compared with popularity (no champion loads), saying so, and promoted.
        assert main(TRAIN) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["champion"] == "2" and summary["gate"][0].endswith("against popularity")
        assert any(line.startswith("NOTE champion v1 not compared (it does not load): corrupt: ranker/model.txt")
                   for line in summary["gate"])
        promoted = registry.history()[0]
        assert (promoted["version"], promoted["decision"], promoted["compared_to"]) == ("2", "promoted", "popularity")

        # One alert for the corrupt champion: the drift step, serving (twice) and training found the same damage.
        corrupt = webhook_receiver.of_type("model.corrupt")
        assert len(corrupt) == 1 and corrupt[0]["data"]["model_version"] == "1"
        assert set(corrupt[0]["data"]["details"]["files"]) == {"ranker/model.txt", "sources/two_tower/index/index.faiss"}

        # Rollback cannot go back to the corrupt version and says why, in one sentence.
        for args, expected in (([], "no previous champion of recloop-recommender loads (version 1 skipped: corrupt: "
                                    "ranker/model.txt does not match"),
                               (["--to", "1"], "version 1 cannot be rolled back to because it does not load")):
            assert main(["rollback", *args]) == 2
            err = capsys.readouterr().err.strip()
            assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert str(registry.champion().version) == "2"

        # Serving follows the new champion.
        assert service.refresh() is True and service.model.version == "2"
        assert not service.recommend("u0000001", 5).fallback
    finally:
        service.close()

"""The int8 user tower (`recloop.model_plane.quantization`): the keep-or-refuse rule on retrieval recall,
the bundle option that `load_bundle` honours, and the setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recloop.data.simulator import SimConfig, simulate_validated
from recloop.lake import LocalLake
from recloop.model_plane import fit_config, quantization
from recloop.model_plane.bundle import load_bundle, save_bundle
from recloop.model_plane.fit import fit_recommender
from recloop.model_plane.history import History
from recloop.model_plane.ranker import RankerConfig
from recloop.model_plane.store import LakeSnapshots
from recloop.training import TwoTowerConfig, load_window, tower_forward, user_tower_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(seed=3, days=4, initial_users=300, initial_videos=200, new_users_per_day=10, new_videos_per_day=10,
                events_per_day=2_000, n_creators=30)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    lake = LocalLake(tmp_path_factory.mktemp("quant") / "lake")
    simulate_validated(SIM, lake)
    history = History.from_window(load_window(lake, [SIM.date_of(i).isoformat() for i in range(SIM.days)]))
    config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=2, num_threads=1), max_users_per_fold=200,
                        l2_grid=(300.0,), ranker=RankerConfig(max_rounds=30, num_threads=1))
    return lake, history, fit_recommender(history, config=config, store=LakeSnapshots(lake)).recommender


def linear_kinds(tower: torch.nn.Module) -> set[str]:
    return {type(m).__module__ + "." + type(m).__name__ for m in tower.modules() if "Linear" in type(m).__name__}


def test_int8_is_kept_only_within_the_recall_tolerance(fitted):
    _, history, rec = fitted
    assert quantization.decide(rec.two_tower, history, mode="off") == {
        "requested": "off", "user_tower": "float32", "reason": "not asked for"}
    record = quantization.decide(rec.two_tower, history, mode="int8")
    base, int8 = record["float32_recall_at_100"], record["int8_recall_at_100"]
    assert record["users"] > 20 and record["positives"] > 0 and 0 < base <= 1
    assert record["user_tower"] == ("int8" if int8 >= base * (1 - quantization.TOLERANCE) else "float32")
    # a tolerance no tower can meet: the float tower is kept, and the record says why
    refused = quantization.decide(rec.two_tower, history, mode="int8", tolerance=-1.0)
    assert refused["user_tower"] == "float32" and refused["reason"].startswith("int8 user tower refused: recall@100")
    # the int8 tower's vectors stay close to the float tower's
    tt = rec.two_tower.model
    ids = tt.users["user_id"].astype(str).to_numpy(dtype=object)[:100]
    x = user_tower_inputs(tt, ids, np.full(len(ids), history.cutoff_us, np.int64))
    a = tower_forward(tt.model.user_tower, x, tt.args.out_dim)
    b = tower_forward(quantization.quantized_user_tower(tt.model.user_tower), x, tt.args.out_dim)
    assert float(np.mean(np.sum(a * b, axis=1))) > 0.99  # unit vectors: mean cosine


def test_the_bundle_option_loads_the_int8_user_tower(fitted, tmp_path):
    lake, history, rec = fitted
    users = history.users[:30].tolist()
    for tower, expected in (("int8", "torch.ao.nn.quantized."), ("float32", "torch.nn.")):
        d = save_bundle(tmp_path / tower, rec, metadata={"quantization": {"user_tower": tower}})
        loaded = load_bundle(d, store=LakeSnapshots(lake))
        kinds = linear_kinds(loaded.two_tower.model.model.user_tower)
        assert kinds and all(k.startswith(expected) for k in kinds), kinds
        assert linear_kinds(loaded.two_tower.model.model.video_tower) == {"torch.nn.modules.linear.Linear"}
        lists = loaded.recommend(users, 10)
        assert all(len(x) == 10 for x in lists)
    # the float tower was not touched by the int8 load (a copy was quantized)
    assert linear_kinds(rec.two_tower.model.model.user_tower) == {"torch.nn.modules.linear.Linear"}


def test_the_setting(monkeypatch):
    monkeypatch.delenv(quantization.QUANTIZE_ENV, raising=False)
    assert quantization.quantize_mode() == "off"
    monkeypatch.setenv(quantization.QUANTIZE_ENV, "INT8")
    assert quantization.quantize_mode() == "int8"
    monkeypatch.setenv(quantization.QUANTIZE_ENV, "fp16")
    with pytest.raises(ValueError, match="^RECLOOP_QUANTIZE must be one of off, int8, got 'fp16'$"):
        quantization.quantize_mode()

"""Tests of recloop.index: recall of the ANN indexes against exact search on trained two-tower embeddings,
adding videos without retraining, save/load, and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recloop.data.simulator import SimConfig, Simulator
from recloop.index import AnnIndex, exact_search, recall_at_k
from recloop.training import TwoTowerConfig, Window, train_two_tower, user_embeddings, video_embeddings

# A catalog large enough for the approximate indexes to be approximate.
SIM = SimConfig(
    seed=5, days=3, initial_users=3_000, initial_videos=4_000, new_users_per_day=0, new_videos_per_day=50,
    events_per_day=20_000,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    sim = Simulator(SIM)
    days = [sim.day(i) for i in range(SIM.days)]
    tables = {k: pa.concat_tables([d[k] for d in days]) for k in ("users", "videos", "events")}
    window = Window.from_tables(tables["events"], tables["videos"], tables["users"])
    model = train_two_tower(window, TwoTowerConfig(epochs=2, num_threads=1))
    ids, vectors = video_embeddings(model)
    users = window.users["user_id"].sample(400, random_state=0).tolist()
    return model, window, ids, vectors, user_embeddings(model, users)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_on_trained_embeddings(trained, kind):
    _, _, ids, vectors, queries = trained
    assert len(ids) > 4_000
    index = AnnIndex.build(ids, vectors, kind=kind)
    recall = recall_at_k(index, queries, k=100)
    print(f"{kind} recall@100 = {recall:.4f} over {len(ids)} videos, params {index.params}")
    assert recall >= 0.95
    found, scores = index.search(queries[:5], 10)
    assert [len(f) for f in found] == [10] * 5 and scores.shape == (5, 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_recall_detects_a_poor_index(trained):
    """The recall measure can fail: an IVF index probing 1 of many lists misses most true neighbours."""
    _, _, ids, vectors, queries = trained
    poor = AnnIndex.build(ids, vectors, kind="ivf", nlist=64, nprobe=1)
    assert recall_at_k(poor, queries, k=100) < 0.9
    assert recall_at_k(AnnIndex.build(ids, vectors, kind="flat"), queries, k=100) == 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "flat"])
def test_add_makes_a_new_video_retrievable(trained, kind):
    model, window, ids, vectors, queries = trained
    index = AnnIndex.build(ids, vectors, kind=kind)
    template = window.videos.iloc[0]
    uploaded = window.cutoff - pd.Timedelta(minutes=5)
    new = pd.DataFrame([{**template.to_dict(), "video_id": "brand-new", "upload_time": uploaded}])
    new_ids, new_vec = video_embeddings(model, new)
    before, _ = index.search(new_vec, 5)
    assert "brand-new" not in before[0]
    index.add(new_ids, new_vec)
    assert len(index) == len(ids) + 1 and index.positions(["brand-new"]).tolist() == [len(ids)]
    found, scores = index.search(new_vec, 5)
    assert found[0][0] == "brand-new" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    # a user whose exact top-k holds the new video finds it through the index too
    exact = exact_search(index, queries, 50)
    holders = np.flatnonzero((exact == len(ids)).any(axis=1))
    approx, _ = index.search(queries[holders], 50)
    assert all("brand-new" in a for a in approx)
    with pytest.raises(ValueError):
        index.add(["brand-new"], new_vec)


def test_save_and_load_round_trip(trained, tmp_path):
    _, _, ids, vectors, queries = trained
    index = AnnIndex.build(ids, vectors, kind="hnsw")
    index.add(["extra"], vectors[:1] * -1)
    d = index.save(tmp_path / "index")
    assert sorted(p.name for p in d.iterdir()) == ["ids.json", "index.faiss", "index.json", "vectors.npy"]
    assert json.loads((d / "index.json").read_text())["size"] == len(ids) + 1
    loaded = AnnIndex.load(d)
    a_ids, a_scores = index.search(queries[:50], 20)
    b_ids, b_scores = loaded.search(queries[:50], 20)
    assert a_ids == b_ids and np.array_equal(a_scores, b_scores)
    expected = np.stack([-vectors[0], np.zeros(vectors.shape[1])])
    assert np.array_equal(loaded.vectors_for(["extra", "missing"]), expected)


def test_edge_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    index = AnnIndex.build([f"v{i}" for i in range(5)], x, kind="hnsw")
    found, scores = index.search(x[:2], 50)  # k larger than the index
    assert [len(f) for f in found] == [5, 5] and scores.shape == (2, 5)
    assert index.search(np.zeros((0, 8)), 3)[0] == []
    with pytest.raises(ValueError):
        AnnIndex.build(["a", "a"], x[:2])
    with pytest.raises(ValueError):
        AnnIndex.build(["a"], x[:2])
    with pytest.raises(ValueError):
        AnnIndex.build(["a"], x[:1], kind="annoy")
    with pytest.raises(ValueError):
        AnnIndex.build(["a"], x[:1], kind="flat", nprobe=3)
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 7)), 3)

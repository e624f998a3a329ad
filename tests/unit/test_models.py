"""Tests of recloop.training and recloop.models: the positive rule, windows and vocabularies, point-in-time
user features, the in-batch softmax with log-Q correction, two-tower training (shapes, determinism,
save/load, cold videos). The ranker and the candidate sources are tested in test_model_plane.py."""

from __future__ import annotations

import json
import math
from datetime import timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from recloop.data.simulator import SimConfig, Simulator
from recloop.features import compute_features
from recloop.lake import LocalLake
from recloop.models.two_tower import accidental_hits, in_batch_logits, in_batch_loss
from recloop.training import (
    TwoTowerConfig,
    Vocab,
    Window,
    load_two_tower,
    load_window,
    positive_mask,
    retrieval_scores,
    save_two_tower,
    train_two_tower,
    user_embeddings,
    video_embeddings,
)

UTC = timezone.utc
SIM = SimConfig(
    seed=7, days=6, initial_users=800, initial_videos=300, new_users_per_day=20, new_videos_per_day=20,
    events_per_day=4_000,
)
TT = TwoTowerConfig(epochs=8, num_threads=1, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def days() -> list[dict[str, pa.Table]]:
    sim = Simulator(SIM)
    return [sim.day(i) for i in range(SIM.days)]


@pytest.fixture(scope="module")
def lake(days, tmp_path_factory) -> LocalLake:
    lake = LocalLake(tmp_path_factory.mktemp("models") / "lake")
    for i, tables in enumerate(days):
        for name in ("users", "videos", "events"):
            lake.write_partition(f"silver/{name}", SIM.date_of(i).isoformat(), tables[name])
    for i in range(SIM.days):
        compute_features(lake, SIM.date_of(i).isoformat())
    return lake


@pytest.fixture(scope="module")
def window(lake) -> Window:
    return load_window(lake, [SIM.date_of(i).isoformat() for i in range(5)])


@pytest.fixture(scope="module")
def model(window):
    return train_two_tower(window, TT)


# --- data --------------------------------------------------------------------------------------------


def test_positive_mask_rule():
    events = pd.DataFrame(
        {
            "watched_s": [0.0, 10.0, 10.0, 10.0, 50.0, 49.9, 5.0, 0.0],
            "completed": [True, True, False, False, False, False, None, False],
            "liked": [True, False, True, False, False, False, None, False],
        }
    )
    duration = pd.Series([100.0, 100.0, 100.0, 100.0, 100.0, 100.0, np.nan, 100.0])
    got = positive_mask(events, duration)
    # not watched (flags ignored) | completed | liked | 10% | exactly 50% | just under | unknown video |
    # nothing
    assert got.tolist() == [False, True, True, False, True, False, False, False]
    with pytest.raises(ValueError):
        positive_mask(events, duration[:3])


def test_vocab_round_trip_and_unknown():
    vocab = Vocab.build(["b", "a", "b", None, "", "c"], min_count=1)
    assert vocab.ids == ["a", "b", "c"] and len(vocab) == 4
    codes = vocab.encode(["a", "zzz", None, "c"])
    assert codes.tolist() == [1, 0, 0, 3]
    assert vocab.decode([1, 0, 3]) == ["a", Vocab.UNKNOWN, "c"]
    assert Vocab.from_json(vocab.to_json()) == vocab
    assert Vocab.build(["a", "b", "b"], min_count=2).ids == ["b"]


def test_load_window_reads_partitions_up_to_the_last(lake, days):
    parts = [SIM.date_of(i).isoformat() for i in (1, 2)]
    w = load_window(lake, parts)
    assert w.cutoff == pd.Timestamp("2025-01-04", tz="UTC") and w.partitions == parts
    expected_events = days[1]["events"].num_rows + days[2]["events"].num_rows
    assert len(w.events) == expected_events
    days_seen = set(pd.to_datetime(w.events["event_time"], utc=True).dt.strftime("%Y-%m-%d"))
    assert days_seen == set(parts)
    # videos and users of days 0..2 (not 3+), each once
    assert len(w.videos) == sum(days[i]["videos"].num_rows for i in range(3))
    assert len(w.users) == sum(days[i]["users"].num_rows for i in range(3))
    assert w.videos["video_id"].is_unique
    assert (pd.to_datetime(w.videos["upload_time"], utc=True) < w.cutoff).all()


def test_user_history_is_point_in_time(window, model):
    """History and counts at time t use only events strictly before t, most recent positive first."""
    act = model.activity
    frame = model.activity_frame.sort_values("event_time")
    pos = frame[frame["positive"]]
    user = pos["user_id"].value_counts().index[0]
    mine = pos[pos["user_id"] == user].sort_values("event_time")
    t3 = mine["event_time"].iloc[3]
    at = np.array([t3.value // 1000], dtype=np.int64)
    dense, hist = act.features(np.array([user], dtype=object), at, 20)
    before = mine[mine["event_time"] < t3]
    expected = model.vocabs["video"].encode(before["video_id"].iloc[::-1].head(20))
    assert hist[0, : len(expected)].tolist() == expected.tolist() and (hist[0, len(expected):] == 0).all()
    all_mine = frame[(frame["user_id"] == user) & (frame["event_time"] < t3)]
    assert dense[0].tolist() == pytest.approx(
        np.log1p([len(all_mine), all_mine["watched"].sum(), all_mine["positive"].sum()]).tolist()
    )
    # unknown user, or a time before any event: empty history, zero counts
    dense, hist = act.features(np.array(["nobody", user], dtype=object), np.array([at[0], 0]), 5)
    assert (hist == 0).all() and (dense == 0).all()


# --- in-batch softmax -----------------------------------------------------------------------------


def test_logq_correction_by_hand():
    """2 users x 2 videos, temperature 0.5, q = (0.75, 0.25): logits = u.v / 0.5 - log q."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    log_q = torch.log(torch.tensor([0.75, 0.25]))
    plain = in_batch_logits(u, v, 0.5)
    corrected = in_batch_logits(u, v, 0.5, log_q)
    # u0.v0 = 0.6, u0.v1 = 1.0, u1.v0 = 0.8, u1.v1 = 0.0
    assert np.allclose(plain.numpy(), [[1.2, 2.0], [1.6, 0.0]], atol=1e-6)
    expected = [[1.2 - math.log(0.75), 2.0 - math.log(0.25)], [1.6 - math.log(0.75), 0.0 - math.log(0.25)]]
    assert np.allclose(corrected.numpy(), expected, atol=1e-6)
    # the correction raises the rare video's logit relative to the popular one by log(0.75/0.25)
    gap_plain = plain[:, 1] - plain[:, 0]
    gap_corrected = corrected[:, 1] - corrected[:, 0]
    assert (gap_corrected - gap_plain).tolist() == pytest.approx([math.log(3)] * 2, abs=1e-6)
    # loss by hand: mean over rows of -log softmax(row)[i]
    rows = np.array(expected)
    by_hand = np.mean([-(rows[i, i] - np.log(np.exp(rows[i]).sum())) for i in range(2)])
    assert in_batch_loss(corrected).item() == pytest.approx(by_hand, abs=1e-6)


def test_accidental_hits_masked_and_groups_split_the_softmax():
    torch.manual_seed(0)
    u, v = torch.randn(12, 4), torch.randn(12, 4)
    ids = torch.tensor([5, 1, 5, 2, 3, 5, 1, 7, 8, 9, 7, 0])
    i, j = accidental_hits(ids)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert pairs == {(a, b) for a in range(12) for b in range(12) if a != b and ids[a] == ids[b]}
    full = in_batch_logits(u, v, 0.1, item_ids=ids)
    assert full[0, 2] < -1e30 and full[0, 5] < -1e30 and full[0, 0] > -1e30 and full[1, 6] < -1e30
    grouped = in_batch_logits(u, v, 0.1, torch.zeros(12), ids, groups=3)
    assert grouped.shape == (3, 4, 4)
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        assert torch.allclose(grouped[g], in_batch_logits(u[s], v[s], 0.1, torch.zeros(4), ids[s]))
    # rows 0 and 2 hold the same video and are in the same group: masked; rows 0 and 5 are not
    assert grouped[0, 0, 2] < -1e30 and grouped[1, 1, 2] > -1e30
    with pytest.raises(ValueError):
        in_batch_logits(u, v, 0.1, groups=5)


# --- two-tower ---------------------------------------------------------------------------------


def test_two_tower_shapes_and_training(window, model):
    assert model.n_examples > 1000 and len(model.epoch_losses) == TT.epochs
    assert model.epoch_losses[-1] < model.epoch_losses[0] - 0.5
    ids, vectors = video_embeddings(model)
    assert len(ids) == len(window.videos) and vectors.shape == (len(ids), TT.out_dim)
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    users = window.users["user_id"].head(5).tolist() + ["never-seen-user"]
    u = user_embeddings(model, users)
    assert u.shape == (6, TT.out_dim) and np.isfinite(u).all()
    assert np.allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    # an unknown user is a valid vector of its own, not a copy of a known one
    assert not np.allclose(u[-1], u[0])


def test_two_tower_is_deterministic(window, model):
    again = train_two_tower(window, TT)
    a, b = model.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.epoch_losses == model.epoch_losses
    other = train_two_tower(window, TwoTowerConfig(epochs=1, num_threads=1, seed=4))
    key = "video_tower.video.weight"
    assert not torch.equal(other.model.state_dict()[key], a[key])


def test_two_tower_save_load_round_trip(window, model, tmp_path):
    d = save_two_tower(model, tmp_path / "tt")
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "activity.parquet", "model_args.json", "state_dict.pt",
        "users.parquet", "videos.parquet", "vocabs.json",
    ]
    state = torch.load(d / "state_dict.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())
    args = json.loads((d / "model_args.json").read_text())
    assert args["args"]["out_dim"] == TT.out_dim and args["config"]["seed"] == TT.seed
    loaded = load_two_tower(d)
    _, v1 = video_embeddings(model)
    _, v2 = video_embeddings(loaded)
    assert np.array_equal(v1, v2)
    users = window.users["user_id"].head(50).tolist() + ["unknown"]
    assert np.array_equal(user_embeddings(model, users), user_embeddings(loaded, users))
    rows = window.events.head(200)
    assert np.array_equal(retrieval_scores(model, rows), retrieval_scores(loaded, rows))


def test_cold_video_embedding_is_closer_to_its_category(window, model):
    """Videos with ids the model never saw get their vector from metadata: a new video is closer (mean
    inner product) to the catalog videos of its own category than to the videos of other categories, for
    every category, and most of its nearest neighbours share its category."""
    ids, vectors = video_embeddings(model)
    catalog = window.videos.set_index("video_id").loc[ids]
    cats = catalog["category"].to_numpy()
    categories = sorted(set(cats))
    new_rows = []
    for i, cat in enumerate(categories):
        template = catalog[catalog["category"] == cat].iloc[0]  # its creator, tags and duration
        new_rows.append(
            {
                "video_id": f"cold-{i}", "title": "new", "tags": template["tags"], "category": cat,
                "creator_id": template["creator_id"], "duration_s": float(template["duration_s"]),
                "upload_time": window.cutoff - pd.Timedelta(hours=3),
            }
        )
    cold = pd.DataFrame(new_rows)
    assert (model.vocabs["video"].encode(cold["video_id"]) == 0).all()
    cold_ids, cold_vecs = video_embeddings(model, cold)
    assert cold_ids == cold["video_id"].tolist()
    sims = cold_vecs @ vectors.T
    purity = []
    for i, cat in enumerate(categories):
        own, others = sims[i, cats == cat].mean(), sims[i, cats != cat].mean()
        assert own > others, (cat, own, others)
        purity.append((cats[np.argsort(-sims[i])[:10]] == cat).mean())
    base_rate = np.mean([np.mean(cats == c) for c in categories])  # a random neighbour's chance
    assert np.mean(purity) > 3 * base_rate, (purity, base_rate)

"""Offline evaluation: metrics against hand-computed examples, the baselines, the splits, the harness and
file mode. MovieLens-format files are written by hand into tmp_path; nothing is downloaded."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recloop import evaluation as ev
from recloop.data.simulator import SimConfig, Simulator
from recloop.recommender import Recommender

L2 = math.log2


# --- metrics -----------------------------------------------------------------------------------------

RECS = [["a", "b", "c", "d"], ["x", "y", "z", "w"], ["p", "q"], ["a", "b"]]
TRUTH = [{"b", "d", "e"}, {"y"}, set(), {"c"}]
# user 0: hits at ranks 1 and 3 (0-based), 3 relevant; user 1: hit at rank 1, 1 relevant;
# user 2: no truth -> skipped; user 3: no hit.


def test_accuracy_metrics_at_4_by_hand():
    # recall: u0 2/3, u1 1/1, u3 0 -> mean over the 3 evaluated users
    assert ev.recall_at_k(RECS, TRUTH, 4) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # NDCG: u0 DCG = 1/log2(3) + 1/log2(5); ideal over min(3, 4) = 3 items = 1 + 1/log2(3) + 1/log2(4)
    #       u1 DCG = 1/log2(3), ideal over min(1, 4) = 1 item = 1
    ndcg0 = (1 / L2(3) + 1 / L2(5)) / (1 + 1 / L2(3) + 1 / L2(4))  # 1.06161 / 2.13093 = 0.49819
    ndcg1 = 1 / L2(3)  # 0.63093
    assert ev.ndcg_at_k(RECS, TRUTH, 4) == pytest.approx((ndcg0 + ndcg1 + 0) / 3)  # 0.37637
    # AP: u0 (P@2 + P@4) / min(3, 4) = (1/2 + 2/4) / 3 = 1/3; u1 P@2 / 1 = 1/2
    assert ev.map_at_k(RECS, TRUTH, 4) == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)  # 0.27778
    # hit rate: u0 and u1 hit, u3 does not
    assert ev.hit_rate_at_k(RECS, TRUTH, 4) == pytest.approx(2 / 3)


def test_accuracy_metrics_at_2_by_hand():
    # top 2: u0 [a, b] -> one hit (rank 1) of 3 relevant; u1 [x, y] -> hit at rank 1; u3 none
    assert ev.recall_at_k(RECS, TRUTH, 2) == pytest.approx((1 / 3 + 1 + 0) / 3)  # 0.44444
    # u0 ideal DCG over min(3, 2) = 2 items = 1 + 1/log2(3)
    ndcg0 = (1 / L2(3)) / (1 + 1 / L2(3))  # 0.38685
    assert ev.ndcg_at_k(RECS, TRUTH, 2) == pytest.approx((ndcg0 + 1 / L2(3)) / 3)  # 0.33926
    # AP: u0 P@2 / min(3, 2) = (1/2) / 2 = 1/4; u1 (1/2) / 1
    assert ev.map_at_k(RECS, TRUTH, 2) == pytest.approx((1 / 4 + 1 / 2) / 3)  # 0.25
    got = ev.accuracy_metrics(RECS, TRUTH, ks=(2, 4))
    assert got[2]["users_evaluated"] == got[4]["users_evaluated"] == 3  # the empty truth is skipped
    assert got[2]["recall"] == pytest.approx(ev.recall_at_k(RECS, TRUTH, 2))
    assert got[4]["map"] == pytest.approx(ev.map_at_k(RECS, TRUTH, 4))


def test_perfect_and_degenerate_lists():
    truth = [{"a", "b"}, {"c"}]
    assert ev.ndcg_at_k([["a", "b", "z"], ["c", "y", "x"]], truth, 3) == pytest.approx(1.0)
    assert ev.map_at_k([["a", "b", "z"], ["c", "y", "x"]], truth, 3) == pytest.approx(1.0)
    # a repeated relevant item counts once: recall stays <= 1
    assert ev.recall_at_k([["a", "a"], ["c"]], truth, 2) == pytest.approx((1 / 2 + 1) / 2)
    # nothing to evaluate -> NaN, not an error
    assert math.isnan(ev.recall_at_k([["a"]], [set()], 5))
    with pytest.raises(ValueError):
        ev.recall_at_k([["a"]], [{"a"}, {"b"}], 5)


def test_beyond_accuracy_by_hand():
    # coverage: {a, b, c} of a 10-video catalogue
    assert ev.catalog_coverage([["a", "b"], ["b", "c"]], 10) == pytest.approx(3 / 10)
    # diversity: [a, b, c] with categories x, x, y -> pairs ab same, ac and bc differ -> 2/3;
    # [d, e]: e has no category, so it differs from d -> 1; [f] has no pair -> skipped
    cats = {"a": "x", "b": "x", "c": "y", "d": "x", "f": "y"}
    assert ev.intra_list_diversity([["a", "b", "c"], ["d", "e"], ["f"]], cats) == pytest.approx((2 / 3 + 1) / 2)
    # novelty: popularity a 6, b 2, c 0 (floored to the smallest positive, 2); total 8
    # -> shares 0.75, 0.25, 0.25; -log2: 0.41504, 2, 2; lists [a, b] -> 1.20752, [c] -> 2; mean 1.60376
    pop = {"a": 6.0, "b": 2.0, "c": 0.0}
    assert ev.novelty([["a", "b"], ["c"]], pop) == pytest.approx(((-L2(0.75) + 2) / 2 + 2) / 2)
    # concentration: 200 items, top 1 % = 2 items; i001 and i002 tie at 5 -> i001 wins by id;
    # slots i000, i002, i050, i001, i003 -> i000 and i001 are top: 2 / 5
    pop = {f"i{i:03d}": 1.0 for i in range(200)}
    pop.update(i000=10.0, i001=5.0, i002=5.0)
    assert ev.popularity_concentration([["i000", "i002", "i050"], ["i001", "i003"]], pop) == pytest.approx(0.4)
    # identical lists: (a, b) twice of 4 lists; order matters ([b, a] is another list)
    assert ev.identical_list_share([["a", "b"], ["a", "b"], ["b", "a"], ["c"]]) == pytest.approx(0.5)
    assert ev.identical_list_share([["a", "b"]] * 3) == 1.0


# --- baselines ---------------------------------------------------------------------------------------


def frame(rows) -> pd.DataFrame:
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    return pd.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "video_id": [v for _, v in rows],
            "event_time": [t0 + pd.Timedelta(minutes=i) for i in range(len(rows))],
        }
    )


POP_ROWS = [("u1", "v3"), ("u2", "v3"), ("u2", "v2"), ("u1", "v1")]


def test_popularity_ties_are_broken_by_id_and_input_order_does_not_matter():
    catalog = ["v4", "v0", "v1", "v2", "v3"]
    rec = ev.PopularityRecommender().fit(frame(POP_ROWS), catalog=catalog)
    # v3 has 2 positives; v1 and v2 1 each (tie -> v1 first); v0 and v4 none (tie -> v0 first)
    assert rec.ranking() == ["v3", "v1", "v2", "v0", "v4"]
    shuffled = ev.PopularityRecommender().fit(frame(POP_ROWS[::-1]), catalog=catalog[::-1])
    assert shuffled.ranking() == rec.ranking()
    assert isinstance(rec, Recommender)
    # u1 saw v3 and v1; u2 saw v3 and v2; u9 is unknown
    assert rec.recommend(["u1", "u2", "u9"], 3) == [["v2", "v0", "v4"], ["v1", "v0", "v4"], ["v3", "v1", "v2"]]
    # explicit exclusions on top; the whole catalogue is ranked, so a list can be shorter than k
    assert rec.recommend(["u1", "u9"], 10, exclude={"u1": {"v0"}, "u9": {"v3", "nope"}}) == [
        ["v2", "v4"],
        ["v1", "v2", "v0", "v4"],
    ]


def test_implicit_cf_excludes_seen_and_explicit_items(sim):
    train = sim["split"].train
    catalog = sim["catalog"]
    seen = ev.SeenItems(train)
    users = sorted(seen)[:50] + ["never-seen-user"]
    extra = {u: set(catalog[i : i + 7]) for i, u in enumerate(users)}
    for algorithm in ("als", "bpr"):
        rec = ev.ImplicitCFRecommender(algorithm, factors=16, iterations=10).fit(train, catalog)
        full = rec.recommend(users, len(catalog), exclude=extra)
        for user, items in zip(users, full):
            banned = extra[user] | (seen[user] if user in seen else set())
            assert not banned & set(items)
            assert len(items) == len(set(items)) == len(set(catalog) - banned)  # full ranking
        # without exclusions a user's top 10 differs, and cold users get the popularity ranking
        top = rec.recommend(users, 10)
        assert all(len(r) == 10 for r in top)
        pop = ev.PopularityRecommender().fit(train, catalog)
        assert top[-1] == pop.recommend(["never-seen-user"], 10)[0]


# --- simulated data ----------------------------------------------------------------------------------

SIM = SimConfig(
    seed=3,
    days=8,
    initial_users=1_500,
    initial_videos=500,
    new_users_per_day=20,
    new_videos_per_day=10,
    events_per_day=8_000,
)
CUTOFF = "2025-01-07"  # days 0-5 train, days 6-7 test
# Small grids keep the test fast; the defaults (ev.ALS_GRID, ev.BPR_GRID) are documented.
TEST_ALS_GRID = {"factors": (16, 32), "regularization": (1.0, 10.0), "alpha": (1.0, 10.0), "iterations": (15,)}
TEST_BPR_GRID = {"factors": (32,), "learning_rate": (0.01, 0.02), "regularization": (0.01,), "iterations": (100,)}


@pytest.fixture(scope="module")
def sim():
    simulator = Simulator(SIM)
    days = [simulator.day(i) for i in range(SIM.days)]
    events = pa.concat_tables([d["events"] for d in days]).to_pandas()
    videos = pa.concat_tables([d["videos"] for d in days]).to_pandas()
    interactions = ev.interactions_from_events(events, videos)
    split = ev.time_split(interactions, CUTOFF)
    known = videos[videos["upload_time"] < pd.Timestamp(CUTOFF, tz="UTC")]
    return {
        "events": events,
        "videos": videos,
        "interactions": interactions,
        "split": split,
        "known_videos": known,
        "catalog": sorted(known["video_id"]),
    }


def test_positive_rule_on_simulated_events(sim):
    events, videos = sim["events"], sim["videos"]
    mask = ev._positive(events, videos)
    duration = events["video_id"].map(videos.set_index("video_id")["duration_s"])
    expected = (events["watched_s"] > 0) & (
        events["completed"] | events["liked"] | (events["watched_s"] >= 0.5 * duration)
    )
    assert (mask == expected.to_numpy()).all()
    assert 0 < mask.mean() < (events["watched_s"] > 0).mean()


def test_time_split(sim):
    split = sim["split"]
    cut = pd.Timestamp(CUTOFF, tz="UTC")
    assert (split.train["event_time"] < cut).all() and (split.test["event_time"] >= cut).all()
    assert set(split.test["user_id"]) <= set(split.train["user_id"])
    d = split.description
    later = sim["interactions"]["event_time"] >= cut
    assert d["test_interactions"] + d["cold_test_interactions"] == later.sum()
    assert d["cold_test_users"] > 0  # users who signed up on the test days


def test_als_beats_popularity_on_simulated_data(sim):
    split, videos = sim["split"], sim["known_videos"]
    factories = {
        "popularity": ev.popularity_factory,
        "als": ev.tuned_cf_factory("als", TEST_ALS_GRID),
        "bpr": ev.tuned_cf_factory("bpr", TEST_BPR_GRID),
    }
    fitted, seconds = {}, {}
    for name, factory in factories.items():
        t0 = time.perf_counter()
        fitted[name] = factory(split.train, videos)
        seconds[name] = time.perf_counter() - t0
    result = ev.evaluate(fitted, split.train, split.test, catalog=videos, split=split.description)
    recall = {n: result["recommenders"][n]["metrics"]["10"]["recall"] for n in fitted}
    ndcg = {n: result["recommenders"][n]["metrics"]["10"]["ndcg"] for n in fitted}
    for name in fitted:
        print(f"{name}: Recall@10 {recall[name]:.4f}  NDCG@10 {ndcg[name]:.4f}  fit+tune {seconds[name]:.2f}s")
    print("ALS chosen:", fitted["als"].tuning["params"], "BPR chosen:", fitted["bpr"].tuning["params"])
    assert result["users_evaluated"] > 300
    assert result["users"]["cold_test_users"] == 0  # time_split already dropped them
    assert recall["als"] > 2 * recall["popularity"] and recall["als"] > recall["popularity"] + 0.1
    assert ndcg["als"] > ndcg["popularity"]
    assert recall["bpr"] > recall["popularity"]
    assert len(fitted["als"].tuning["trials"]) == 8
    assert fitted["als"].tuning["params"] in [
        {k: v for k, v in t.items() if k in TEST_ALS_GRID} for t in fitted["als"].tuning["trials"]
    ]
    pop = result["recommenders"]["popularity"]["beyond_accuracy"]
    als = result["recommenders"]["als"]["beyond_accuracy"]
    assert als["catalog_coverage"] > pop["catalog_coverage"]
    assert als["popularity_concentration"] < pop["popularity_concentration"]
    assert als["identical_list_share"] < 0.05 < pop["identical_list_share"]
    assert als["novelty"] > pop["novelty"]


def test_tuning_is_deterministic_and_never_sees_test(sim):
    split, catalog = sim["split"], sim["catalog"]
    carved = ev.random_split(split.train, (0.9, 0.1), seed=0)
    grid = {"factors": (16,), "regularization": (1.0, 10.0)}
    history: list = []
    first = ev.tune(carved.train, carved.test, grid, catalog=catalog, history=history)
    assert first == ev.tune(carved.train, carved.test, grid, catalog=catalog)
    assert first in [{"factors": 16, "regularization": r} for r in (1.0, 10.0)]
    assert [h["regularization"] for h in history] == [1.0, 10.0]
    assert all(0 <= h["recall@10"] <= 1 for h in history)


def test_random_split_proportions_and_determinism(sim):
    interactions = sim["interactions"]
    pairs = interactions[["user_id", "video_id"]].drop_duplicates()
    n = len(pairs)
    split = ev.random_split(interactions, (0.8, 0.1, 0.1), seed=5)
    d = split.description
    assert d["pairs"] == {"train": round(0.8 * n), "valid": round(0.9 * n) - round(0.8 * n), "test": n - round(0.9 * n)}
    # every pair lands in exactly one part (cold valid / test users are dropped and counted)
    keys = {
        name: set(zip(df["user_id"], df["video_id"]))
        for name, df in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }
    assert len(keys["train"]) == d["pairs"]["train"]
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["valid"] and not keys["valid"] & keys["test"]
    assert set(split.test["user_id"]) <= set(split.train["user_id"])
    assert set(split.valid["user_id"]) <= set(split.train["user_id"])
    assert d["train_interactions"] + d["valid_interactions"] + d["test_interactions"] + d[
        "cold_valid_interactions"
    ] + d["cold_test_interactions"] == len(interactions)
    again = ev.random_split(interactions, (0.8, 0.1, 0.1), seed=5)
    pd.testing.assert_frame_equal(split.test, again.test)
    pd.testing.assert_frame_equal(split.train, again.train)
    other = ev.random_split(interactions, (0.8, 0.1, 0.1), seed=6)
    assert not split.test.equals(other.test)
    with pytest.raises(ValueError):
        ev.random_split(interactions, (0.8, 0.1))  # does not sum to 1


class _Leaky:
    name = "leaky"

    def recommend(self, user_ids, k, *, exclude=None):
        return [sorted(exclude[u])[:k] for u in user_ids]  # recommends exactly what it must not


def test_evaluate_rejects_recommenders_that_ignore_exclusions():
    train = frame([("u1", "v1"), ("u1", "v2"), ("u2", "v1")])
    test = frame([("u1", "v3"), ("u2", "v2")])
    with pytest.raises(ValueError, match="already seen"):
        ev.evaluate({"leaky": _Leaky()}, train, test, catalog=["v1", "v2", "v3"])


def test_evaluate_counts_users_and_round_trips_as_json(tmp_path):
    train = frame(POP_ROWS)
    # u1: v2 relevant; v3 was seen in train -> removed from truth; u2: only v3 (seen) -> no relevant
    # videos; u7: cold
    test = frame([("u1", "v2"), ("u1", "v3"), ("u2", "v3"), ("u7", "v1")])
    rec = ev.PopularityRecommender().fit(train, catalog=["v0", "v1", "v2", "v3", "v4"])
    result = ev.evaluate({"pop": rec}, train, test, catalog=pd.DataFrame({"video_id": ["v0", "v1", "v2", "v3", "v4"]}), ks=(1, 2))
    assert result["users"] == {"train": 2, "test": 3, "cold_test_users": 1, "without_relevant_videos": 1, "evaluated": 1}
    # u1 gets [v2, v0]: v2 is a hit at rank 0
    assert result["recommenders"]["pop"]["metrics"]["1"] == {"recall": 1.0, "ndcg": 1.0, "map": 1.0, "hit_rate": 1.0}
    assert result["catalog_size"] == 5 and result["main_k"] == 10 and result["ks"] == [1, 2]
    path = ev.write_json(result, tmp_path / "out" / "result.json")
    assert json.loads(path.read_text()) == result
    assert ev.flat_metrics(result, "pop")["recall_at_1"] == 1.0


def test_segments_score_the_same_lists_on_a_subset_of_the_evaluated_users(sim):
    """A segment's numbers are those of the same recommenders evaluated on that segment's users alone."""
    split, videos = sim["split"], sim["known_videos"]
    fitted = {"popularity": ev.popularity_factory(split.train, videos),
              "als": ev.tuned_cf_factory("als", {"factors": (16,), "regularization": (1.0,), "alpha": (10.0,),
                                                 "iterations": (5,)})(split.train, videos)}
    users = sorted(set(split.test["user_id"]))
    half = users[::2] + ["nobody", users[0]]  # an unknown user is ignored, a repeated one counted once
    catalog = sim["videos"]  # every video of train and test: the same catalogue size for both evaluations
    result = ev.evaluate(fitted, split.train, split.test, catalog=catalog, ks=(5, 10),
                         segments={"half": half, "empty": []})
    alone = ev.evaluate(fitted, split.train, split.test[split.test["user_id"].isin(half)], catalog=catalog, ks=(5, 10))
    segment = result["segments"]["half"]
    assert 0 < segment["users_evaluated"] == alone["users_evaluated"] < result["users_evaluated"]
    for name in fitted:
        got, want = segment["recommenders"][name], alone["recommenders"][name]
        assert got["metrics"] == want["metrics"] and got["beyond_accuracy"] == want["beyond_accuracy"]
        assert ev.flat_metrics(result, name, segment="half") == ev.flat_metrics(alone, name)
        assert ev.flat_metrics(result, name, segment="half") != ev.flat_metrics(result, name)
        assert ev.flat_metrics(result, name, segment="empty") == {}  # nothing scored on no users
        assert ev.flat_metrics(result, name, segment="other") == {}
    assert "segments" not in alone  # only when asked for
    assert json.loads(json.dumps(result)) == result


class _Asked:
    """Popularity that records which users it was asked for."""

    def __init__(self, base, name):
        self.base, self.name, self.asked = base, name, []

    def recommend(self, user_ids, k, *, exclude=None):
        self.asked.append(list(user_ids))
        return self.base.recommend(user_ids, k, exclude=exclude)


def test_evaluation_caps_its_users_with_one_seeded_sample_shared_by_every_recommender(sim):
    split, videos = sim["split"], sim["known_videos"]
    pop = ev.popularity_factory(split.train, videos)
    full = ev.evaluate({"p": pop}, split.train, split.test, catalog=sim["videos"], ks=(10,), max_users=None)
    n = full["users_evaluated"]
    assert n > 20 and "user_sample" not in full
    runs = []
    for seed in (0, 0, 1):
        recs = {"a": _Asked(pop, "a"), "b": _Asked(pop, "b")}
        result = ev.evaluate(recs, split.train, split.test, catalog=sim["videos"], ks=(10,), max_users=20, seed=seed)
        assert recs["a"].asked == recs["b"].asked and len(recs["a"].asked[0]) == 20  # the same users for both
        assert result["users_evaluated"] == 20 and result["recommenders"]["a"]["users_evaluated"] == 20
        assert result["users"]["evaluated"] == 20 and result["users"]["with_relevant_videos"] == n
        assert result["user_sample"]["max_users"] == 20 and result["user_sample"]["of"] == n
        assert "20 of the" in result["user_sample"]["description"]
        assert set(recs["a"].asked[0]) <= set(full_users(split))
        runs.append(recs["a"].asked[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]  # seeded: reproducible, and the seed matters
    # Not more users than the cap: the default cap leaves a small evaluation whole.
    assert ev.evaluate({"p": pop}, split.train, split.test, catalog=sim["videos"], ks=(10,))["users_evaluated"] == n


def full_users(split):
    return sorted(set(split.test["user_id"].astype(str)))


# --- file mode ---------------------------------------------------------------------------------------

T0 = 978_300_760
# (user, movie, rating, seconds after T0)
TRAIN_RATINGS = [(1, 1, 5, 0), (1, 2, 4, 10), (1, 3, 2, 20), (2, 1, 4, 30), (2, 3, 5, 40), (3, 2, 5, 50), (3, 4, 1, 60)]
TEST_RATINGS = [(1, 3, 4, 100), (2, 2, 5, 110), (2, 4, 4, 120), (3, 1, 1, 130), (9, 1, 5, 140)]
MOVIES = {1: ("Toy Story (1995)", "Animation|Comedy"), 2: ("Heat (1995)", "Action|Crime"), 3: ("Babe (1995)", "Comedy"), 4: ("X (1990)", "(no genres listed)")}  # fmt: skip
# Positives: train u1 {1, 2}, u2 {1, 3}, u3 {2}; popularity 1: 2, 2: 2, 3: 1, 4: 0 -> ranking 1, 2, 3, 4.
# Test: u1 {3}, but u1 already rated 3 in train (a 2): watched, so in their history -> excluded and not
# relevant, u1 has nothing left to find; u2 {2, 4}; u3 none (rating 1: not a positive, so not a test
# user); u9 cold. Popularity top 1: u2 [2] (1, 3 watched) -> 1 of 2 relevant -> Recall@1 = 0.5, NDCG@1 = 1.


def write_ml_latest(folder, ratings):
    folder.mkdir(parents=True)
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{m},{float(r)},{T0 + t}" for u, m, r, t in ratings]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = ["movieId,title,genres"] + [f'{m},"{t}",{g}' for m, (t, g) in MOVIES.items()]
    (folder / "movies.csv").write_text("\n".join(movies) + "\n")
    return folder


def write_ml100k(folder, ratings):
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{T0 + t}\n" for u, m, r, t in ratings))
    return folder


def check_tiny_result(result):
    # test users are users with a test positive: u1, u2, u9 (u3 only rated 1); u1's was watched in train
    assert result["users"] == {"train": 3, "test": 3, "cold_test_users": 1, "without_relevant_videos": 1, "evaluated": 1}
    assert result["catalog_size"] == 4
    pop = result["recommenders"]["popularity"]
    assert pop["metrics"]["1"]["recall"] == pytest.approx(0.5)
    assert pop["metrics"]["1"]["ndcg"] == pytest.approx(1.0)
    assert pop["seconds"]["fit"] >= 0


@pytest.mark.parametrize("writer", [write_ml_latest, write_ml100k], ids=["ml-latest", "ml-100k"])
def test_evaluate_files_on_movielens_folders(tmp_path, writer):
    train = writer(tmp_path / "train" / "ml", TRAIN_RATINGS)
    test = writer(tmp_path / "test" / "ml", TEST_RATINGS)
    factories = {"popularity": ev.popularity_factory, "als": ev.tuned_cf_factory("als", {"factors": (4,), "regularization": (0.1, 1.0)})}
    result = ev.evaluate_files(train, test, recommenders=factories, ks=(1, 5))
    check_tiny_result(result)
    assert result["split"]["kind"] == "files" and result["split"]["train"] == str(train)
    assert result["recommenders"]["als"]["tuning"]["validation"].startswith("random 10%")
    assert json.loads(json.dumps(result)) == result


def test_load_ratings_files(tmp_path):
    ml = write_ml_latest(tmp_path / "ml", TRAIN_RATINGS)
    interactions, videos = ev.load_interactions_file(ml / "ratings.csv")  # a ratings file, movies.csv beside
    folder_interactions, folder_videos = ev.load_interactions_file(ml)
    pd.testing.assert_frame_equal(interactions, folder_interactions)
    assert list(interactions.columns) == ["user_id", "video_id", "event_time"]
    assert sorted(zip(interactions["user_id"], interactions["video_id"])) == [
        ("ml_u1", "ml_v1"), ("ml_u1", "ml_v2"), ("ml_u2", "ml_v1"), ("ml_u2", "ml_v3"), ("ml_u3", "ml_v2"),
    ]  # fmt: skip
    assert dict(zip(videos["video_id"], videos["category"])) == {
        "ml_v1": "Animation", "ml_v2": "Action", "ml_v3": "Comedy", "ml_v4": "unknown",
    }  # fmt: skip
    assert set(folder_videos["video_id"]) == set(videos["video_id"])
    assert interactions["event_time"].iloc[0] == pd.Timestamp(T0, unit="s", tz="UTC")
    # recloop-style ids, tab-separated, ISO timestamps
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("user_id\tvideo_id\trating\ttimestamp\nalice\tcat-video\t4.5\t2025-01-02T10:00:00Z\nbob\tcat-video\t3\t2025-01-02T11:00:00Z\n")
    got, vids = ev.load_interactions_file(tsv)
    assert got[["user_id", "video_id"]].values.tolist() == [["alice", "cat-video"]]
    assert vids["video_id"].tolist() == ["cat-video"]
    # header-less ML-1M ratings.dat lines
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u}::{m}::{r}::{T0 + t}\n" for u, m, r, t in TRAIN_RATINGS))
    pd.testing.assert_frame_equal(ev.load_interactions_file(dat)[0], interactions)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an events file"):
        ev.load_interactions_file(bad)


def test_evaluate_files_on_ratings_csv_with_valid(tmp_path):
    def write(name, ratings):
        path = tmp_path / name
        rows = ["userId,movieId,rating,timestamp"] + [f"{u},{m},{r},{T0 + t}" for u, m, r, t in ratings]
        path.write_text("\n".join(rows) + "\n")
        return path

    seen_valid = []

    def popularity_with_valid(train, videos, valid=None):
        seen_valid.append(valid)
        return ev.popularity_factory(train, videos)

    train, test = write("train.csv", TRAIN_RATINGS), write("test.csv", TEST_RATINGS)
    valid = write("valid.csv", [(1, 4, 5, 70)])
    result = ev.evaluate_files(train, test, recommenders={"popularity": popularity_with_valid}, valid_path=valid, ks=(1,))
    check_tiny_result(result)
    assert seen_valid[0]["video_id"].tolist() == ["ml_v4"]
    assert result["split"]["valid_interactions"] == 1


def test_load_events_file_with_videos_beside(tmp_path):
    t = "2025-01-01T00:00:00Z"
    events = pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3", "e4", "e5"],
            "user_id": ["u1", "u1", "u2", "u2", "u3"],
            "video_id": ["v1", "v2", "v1", "v2", "v1"],
            "event_time": [t] * 5,
            "surface": ["home"] * 5,
            "position": [0, 1, 2, 3, 4],
            # e1: 60 % of 100 s -> positive; e2: 10 % of 200 s -> not; e3: completed but not watched -> not;
            # e4: liked, 1 s -> positive; e5: 49 % -> not
            "watched_s": [60.0, 20.0, 0.0, 1.0, 49.0],
            "completed": [False, False, True, False, False],
            "liked": [False, False, False, True, False],
        }
    )
    videos = pd.DataFrame({"video_id": ["v1", "v2", "v3"], "category": ["music", "news", "news"], "duration_s": [100.0, 200.0, 50.0]})
    events.to_csv(tmp_path / "events.csv", index=False)
    videos.to_csv(tmp_path / "videos.csv", index=False)
    interactions, catalog = ev.load_interactions_file(tmp_path / "events.csv")
    assert interactions[["user_id", "video_id"]].values.tolist() == [["u1", "v1"], ["u2", "v2"]]
    assert sorted(catalog["video_id"]) == ["v1", "v2", "v3"]
    pq.write_table(pa.Table.from_pandas(events.assign(event_time=pd.to_datetime(events["event_time"]))), tmp_path / "ev.parquet")
    got, _ = ev.load_interactions_file(tmp_path / "ev.parquet")
    pd.testing.assert_frame_equal(got, interactions)


def test_baseline_factories():
    factories = ev.baseline_factories()
    assert list(factories) == ["popularity", "als", "ease", "bpr"]
    assert list(ev.baseline_factories(include_bpr=False)) == ["popularity", "als", "ease"]
    assert np.prod([len(v) for v in ev.ALS_GRID.values()]) == 24

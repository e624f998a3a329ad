"""Distributed training of the two-tower (recloop.distributed): DistributedDataParallel in 2 processes
started by the real `torchrun` launcher (gloo on CPU) learns the same model as one process, a rank that
fails fails the training with its message, and the setting RECLOOP_TRAIN_PROCESSES selects it."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from recloop import distributed
from recloop.config import Settings, SettingsError, train_processes
from recloop.data.simulator import SimConfig, Simulator
from recloop.training import (
    TwoTowerConfig,
    Window,
    _prepare,
    load_two_tower,
    retrieval_recall_at_k,
    save_two_tower,
    train_two_tower,
)

SIM = SimConfig(
    seed=7, days=6, initial_users=800, initial_videos=300, new_users_per_day=20, new_videos_per_day=20,
    events_per_day=4_000,
)
# Groups of 64 examples: on this small window (~4,800 examples) a step holds 2 groups, one per rank (with
# the default 256, a step is one group and the second rank would only ever mirror it with weight 0).
CONFIG = dict(epochs=6, seed=3, softmax_group=64, num_threads=1)
K = 50
# Both runs take the same steps on the same batches; only the order of float sums differs (an all-reduce
# of two halves instead of one sum), ~1e-5 on the weights after an epoch. Over training that noise may
# reorder near-ties in a user's top 50; 0.02 of recall is ~13 of the ~670 held-out pairs. The final
# epoch loss, an average over ~4,800 examples, has to agree to 1%.
RECALL_TOLERANCE = 0.02
LOSS_RTOL = 0.01


@pytest.fixture(scope="module")
def data() -> tuple[Window, object]:
    sim = Simulator(SIM)
    days = [sim.day(i) for i in range(SIM.days)]
    tables = {k: pa.concat_tables([d[k] for d in days[:-1]]) for k in ("users", "videos", "events")}
    window = Window.from_tables(tables["events"], tables["videos"], tables["users"])
    return window, days[-1]["events"].to_pandas()


@pytest.fixture(scope="module")
def runs(data):
    window, _ = data
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_two_tower(window, TwoTowerConfig(**CONFIG, processes=1))
        two = train_two_tower(window, TwoTowerConfig(**CONFIG, processes=2))
    finally:
        torch.set_num_threads(before)
    return one, two


@pytest.mark.slow
def test_two_processes_learn_the_model_one_process_learns(data, runs, tmp_path):
    _, held_out = data
    one, two = runs
    # Two ranks really ran, in two other processes, each on its share of every batch.
    info = two.distributed
    assert one.distributed == {} and one.config.processes == 1 and two.config.processes == 2
    assert info["world_size"] == 2 and info["backend"] == "gloo" and "torch.distributed.run" in info["command"]
    ranks = info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    pids = {r["pid"] for r in ranks}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["own_examples"] > 0 for r in ranks)
    assert all(r["threads"] == 1 for r in ranks)  # num_threads=1 shared: one each, never fewer
    seen = one.samples_per_s * one.train_seconds
    assert sum(r["own_examples"] for r in ranks) == pytest.approx(seen, rel=1e-6)
    assert two.n_examples == one.n_examples

    # The same quality: held-out retrieval recall and the training loss.
    r1, r2 = retrieval_recall_at_k(one, held_out, K), retrieval_recall_at_k(two, held_out, K)
    assert r1["pairs"] == r2["pairs"] > 500
    random = K / len(one.videos)
    assert r1["recall"] > 2 * random, (r1, random)  # it learned something worth comparing
    assert abs(r2["recall"] - r1["recall"]) <= RECALL_TOLERANCE, (r1, r2)
    assert len(two.epoch_losses) == CONFIG["epochs"]
    assert two.epoch_losses[-1] == pytest.approx(one.epoch_losses[-1], rel=LOSS_RTOL)
    assert two.epoch_losses[0] == pytest.approx(one.epoch_losses[0], rel=1e-4)  # first epoch: float noise only

    # Saved and loaded like any two-tower, with the record of how it was trained.
    loaded = load_two_tower(save_two_tower(two, tmp_path / "tt"))
    assert loaded.config.processes == 2 and loaded.distributed == info
    assert retrieval_recall_at_k(loaded, held_out, K) == r2


@pytest.mark.slow
def test_a_failing_rank_fails_the_training_with_its_message(data):
    """Rank 1 hits a bad id on its first step while rank 0 waits for it in the gradient all-reduce: torchrun
    stops the group and the error names rank 1 and its cause (no hang)."""
    window, _ = data
    config = TwoTowerConfig(**CONFIG, processes=2)
    prep = _prepare(window, config)
    n = prep.n_examples
    # The first batch's second half (rank 1's groups) in the order the first epoch draws.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).numpy()
    group, step = config.softmax_group, 2 * config.softmax_group
    assert max(group, n // config.min_steps_per_epoch) // group * group == step  # 2 groups a step
    prep.examples["u.user"] = prep.examples["u.user"].copy()
    prep.examples["u.user"][perm[group:step]] = 10**9
    t0 = time.perf_counter()
    with pytest.raises(distributed.DistributedTrainingError, match=r"failed on rank 1 of 2: IndexError: index out of range"):
        distributed.train(prep, config, torch.device("cpu"))
    assert time.perf_counter() - t0 < 120


def test_more_processes_than_cores_is_a_clear_error(data):
    window, _ = data
    cores = distributed.available_cpus()
    with pytest.raises(ValueError, match=rf"asks for {cores + 1} training processes but this machine gives this process {cores} core"):
        train_two_tower(window, TwoTowerConfig(epochs=1, processes=cores + 1))


def test_the_setting_chooses_the_processes(data, monkeypatch):
    monkeypatch.delenv("RECLOOP_TRAIN_PROCESSES", raising=False)
    assert train_processes() == 1 and Settings.from_env().train_processes == 1
    monkeypatch.setenv("RECLOOP_TRAIN_PROCESSES", "2")
    assert train_processes() == 2 and Settings.from_env().train_processes == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RECLOOP_TRAIN_PROCESSES", bad)
        with pytest.raises(SettingsError, match="RECLOOP_TRAIN_PROCESSES"):
            train_processes()
        with pytest.raises(SettingsError, match="RECLOOP_TRAIN_PROCESSES"):
            Settings.from_env()
    # A config that leaves `processes` unset takes the setting; its own choice wins over it.
    window, _ = data
    cores = distributed.available_cpus()
    monkeypatch.setenv("RECLOOP_TRAIN_PROCESSES", str(cores + 1))
    with pytest.raises(ValueError, match=f"RECLOOP_TRAIN_PROCESSES={cores + 1}"):
        train_two_tower(window, TwoTowerConfig(epochs=1))
    result = train_two_tower(window, TwoTowerConfig(epochs=1, num_threads=1, processes=1))
    assert result.config.processes == 1 and np.isfinite(result.epoch_losses).all()

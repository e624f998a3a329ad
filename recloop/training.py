"""Training data, training and persistence of the two-tower retrieval model (a candidate source of the
model plane, `recloop.model_plane.sources.two_tower`).

No orchestration here (Dagster and MLflow wrap these functions elsewhere):

* data: `positive_mask` (re-exported from recloop.data.engagement, the one definition of a positive engagement), `load_window` (a window of validated
  days from the lake), `Vocab` (string ids <-> ints, 0 = unknown);
* two-tower: `TwoTowerConfig`, `train_two_tower`, `save_two_tower` / `load_two_tower`,
  `video_embeddings`, `user_embeddings`, `retrieval_scores`, `retrieval_recall_at_k`; with
  `processes` > 1 the training runs under torchrun with DistributedDataParallel (`recloop.distributed`).

The ranker is LightGBM's LambdaRank over candidate lists: `recloop.model_plane.ranker`.

Models are saved as `state_dict.pt` (tensors only) + JSON args that rebuild the module + JSON/Parquet
lookup tables, and loaded with `torch.load(..., weights_only=True)`: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recloop.data.schemas import EVENTS, USERS, VIDEOS
from recloop.data.engagement import POSITIVE_MIN_FRACTION, bool_flag, positive_mask  # noqa: F401 - re-exported
from recloop.lake import Lake
from recloop.model_plane.history import to_us as _to_us
from recloop.model_plane.history import ts_us as _ts_us
from recloop.models.two_tower import TwoTowerArgs, TwoTowerModel, in_batch_logits, in_batch_loss

US_PER_DAY = 86_400 * 1_000_000
MAX_TAGS = 8
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------------------




def partition_end(partition: str) -> pd.Timestamp:
    """The end of day `partition` (`D+1 00:00 UTC`)."""
    d = date.fromisoformat(partition)
    return pd.Timestamp(datetime(d.year, d.month, d.day, tzinfo=timezone.utc) + timedelta(days=1))


@dataclass
class Window:
    """A training window: its events, the videos and users known at its end, and that end (`cutoff`)."""

    events: pd.DataFrame
    videos: pd.DataFrame
    users: pd.DataFrame
    cutoff: pd.Timestamp
    partitions: list[str] = field(default_factory=list)

    @classmethod
    def from_tables(
        cls,
        events: pa.Table | pd.DataFrame,
        videos: pa.Table | pd.DataFrame,
        users: pa.Table | pd.DataFrame,
        cutoff: Any = None,
        partitions: Sequence[str] | None = None,
    ) -> "Window":
        """A window from in-memory tables (tests, benchmarks). `cutoff` defaults to the end of the day of
        the last event. Videos/users are deduplicated (last row wins) and cut at `cutoff`."""
        ev, vid, usr = (_frame(t, s) for t, s in ((events, EVENTS), (videos, VIDEOS), (users, USERS)))
        if cutoff is None:
            last = pd.to_datetime(ev["event_time"], utc=True).max()
            cutoff = partition_end(last.date().isoformat())
        cut = pd.Timestamp(cutoff)
        cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
        vid = _dedupe(vid, "video_id", "upload_time", cut)
        usr = _dedupe(usr, "user_id", "signup_time", cut)
        if partitions is None:
            days = pd.to_datetime(ev["event_time"], utc=True).dt.date
            partitions = sorted({d.isoformat() for d in days.unique()})
        return cls(ev.reset_index(drop=True), vid, usr, cut, list(partitions))


def _frame(table: pa.Table | pd.DataFrame, schema: Any) -> pd.DataFrame:
    if isinstance(table, pa.Table):
        table = table.select(schema.columns).cast(schema.schema)
        return table.to_pandas()
    return table[schema.columns].copy()


def _dedupe(df: pd.DataFrame, key: str, time_col: str, cutoff: pd.Timestamp) -> pd.DataFrame:
    df = df.drop_duplicates(key, keep="last")
    t = pd.to_datetime(df[time_col], utc=True)
    return df[t < cutoff].reset_index(drop=True)


def _read(lake: Lake, dataset: str, partitions: Iterable[str], schema: Any) -> pa.Table:
    tables = [lake.read_partition(dataset, p).select(schema.columns).cast(schema.schema) for p in partitions]
    return pa.concat_tables(tables) if tables else schema.schema.empty_table()


def load_window(lake: Lake, partitions: list[str]) -> Window:
    """Events of `partitions` (validated `silver/events`), plus every user and video accepted in a
    `silver/*` partition up to the last of them (latest delivery of a key wins), cut at the window's end
    (`cutoff` = end of the last partition, UTC)."""
    if not partitions:
        raise ValueError("load_window needs at least one partition")
    parts = sorted(set(partitions))
    last = parts[-1]
    events = _read(lake, "silver/events", parts, EVENTS)
    videos = _read(lake, "silver/videos", [p for p in lake.partitions("silver/videos") if p <= last], VIDEOS)
    users = _read(lake, "silver/users", [p for p in lake.partitions("silver/users") if p <= last], USERS)
    return Window.from_tables(events, videos, users, cutoff=partition_end(last), partitions=parts)


class Vocab:
    """String ids <-> ints 1..n; 0 is reserved for unknown / out-of-vocabulary (and missing) values."""

    UNKNOWN = "<unk>"

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids: list[str] = list(dict.fromkeys(str(i) for i in ids))
        self._index = pd.Index(self.ids, dtype=object)

    @classmethod
    def build(cls, values: Iterable[Any], min_count: int = 1) -> "Vocab":
        """The distinct non-empty values seen at least `min_count` times, sorted (deterministic)."""
        raw = values if isinstance(values, (pd.Series, np.ndarray)) else list(values)
        s = pd.Series(raw, dtype=object)
        s = s[s.notna() & (s.astype(str) != "")].astype(str)
        counts = s.value_counts()
        return cls(sorted(counts.index[counts >= min_count]))

    def __len__(self) -> int:
        return len(self.ids) + 1

    def encode(self, values: Iterable[Any]) -> np.ndarray:
        """int64 codes; unknown or missing values -> 0."""
        arr = values if isinstance(values, (pd.Series, np.ndarray, pd.Index)) else list(values)
        return self._index.get_indexer(pd.Index(arr, dtype=object)).astype(np.int64) + 1

    def decode(self, codes: Iterable[int]) -> list[str]:
        table = np.array([self.UNKNOWN, *self.ids], dtype=object)
        return table[np.asarray(codes, dtype=np.int64)].tolist()

    def to_json(self) -> str:
        return json.dumps({"ids": self.ids})

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls(json.loads(text)["ids"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.ids == other.ids


# --------------------------------------------------------------------------------------------------
# 2. Two-tower: features
# --------------------------------------------------------------------------------------------------

USER_META = ("device", "country", "age_bucket")


class _Activity:
    """A window's events per user, sorted by (user, time): point-in-time activity counts and history.

    `features(user_ids, times)` gives, for each query, log1p of the user's impressions, watches and
    positives strictly before the query time and the codes of their last N positive videos before it
    (most recent first, 0 = empty slot). Only events of the window are known, so a query after the
    window's end sees the history as of the end.
    """

    def __init__(
        self, user_id: np.ndarray, time_us: np.ndarray, watched: np.ndarray, positive: np.ndarray,
        video_code: np.ndarray,
    ) -> None:
        code, uniques = pd.factorize(pd.Series(user_id, dtype=object), sort=True)
        self.users = pd.Index(uniques, dtype=object)
        order = np.lexsort((np.asarray(time_us), code))
        self.code = code[order].astype(np.int64)
        self.time = np.asarray(time_us, dtype=np.int64)[order]
        watched = np.asarray(watched, dtype=bool)[order]
        positive = np.asarray(positive, dtype=bool)[order]
        n, n_users = len(self.code), len(self.users)
        start = np.searchsorted(self.code, np.arange(n_users), side="left")
        # inclusive cumulative counts within each user's run
        self.cum_imp = np.arange(n, dtype=np.int64) - start[self.code] + 1
        cw = np.cumsum(watched, dtype=np.int64)
        cp = np.cumsum(positive, dtype=np.int64)
        before_w = np.concatenate([[0], cw])[start]
        before_p = np.concatenate([[0], cp])[start]
        self.cum_watch = cw - before_w[self.code]
        self.cum_pos = cp - before_p[self.code]
        self.pos_video = np.asarray(video_code, dtype=np.int64)[order][positive]
        self.pos_start = np.searchsorted(self.code[positive], np.arange(n_users), side="left")
        self._right = pd.DataFrame({"t": self.time, "code": self.code, "row": np.arange(n, dtype=np.int64)})
        self._right = self._right.sort_values("t", kind="stable")

    def features(
        self, user_ids: Sequence[str] | np.ndarray, times_us: np.ndarray, history_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(user_ids)
        q_code = self.users.get_indexer(pd.Index(np.asarray(user_ids, dtype=object), dtype=object))
        left = pd.DataFrame(
            {"t": np.asarray(times_us, dtype=np.int64), "code": q_code.astype(np.int64), "q": np.arange(n)}
        ).sort_values("t", kind="stable")
        m = pd.merge_asof(
            left, self._right, on="t", by="code", allow_exact_matches=False, direction="backward"
        )
        row = np.full(n, -1, dtype=np.int64)
        row[m["q"].to_numpy()] = m["row"].fillna(-1).to_numpy(dtype=np.int64)
        has = row >= 0
        safe = np.where(has, row, 0)
        imp = np.where(has, self.cum_imp[safe] if len(self.code) else 0, 0)
        wat = np.where(has, self.cum_watch[safe] if len(self.code) else 0, 0)
        pos = np.where(has, self.cum_pos[safe] if len(self.code) else 0, 0)
        dense = np.log1p(np.stack([imp, wat, pos], axis=1).astype(np.float32))
        hist = np.zeros((n, history_len), dtype=np.int64)
        if len(self.pos_video):
            base = self.pos_start[np.where(q_code >= 0, q_code, 0)] + pos
            for j in range(1, history_len + 1):
                ok = pos >= j
                hist[ok, j - 1] = self.pos_video[base[ok] - j]
        return dense, hist


def _tag_codes(vocab: Vocab, tags: pd.Series) -> np.ndarray:
    """[n, MAX_TAGS] tag codes from "a|b" strings (0 = padding / unknown tag)."""
    n = len(tags)
    out = np.zeros((n, MAX_TAGS), dtype=np.int64)
    split = tags.fillna("").astype(str).reset_index(drop=True).str.split("|").explode()
    split = split[split != ""]
    if len(split):
        slot = split.groupby(level=0).cumcount().to_numpy()
        keep = slot < MAX_TAGS
        rows = split.index.to_numpy()[keep]
        out[rows, slot[keep]] = vocab.encode(split.to_numpy()[keep])
    return out


@dataclass
class _VideoArrays:
    video: np.ndarray
    category: np.ndarray
    creator: np.ndarray
    tags: np.ndarray
    log_duration: np.ndarray
    upload_us: np.ndarray

    def dense(self, at_us: np.ndarray | int, rows: np.ndarray | None = None) -> np.ndarray:
        """[n, 2]: log duration and log1p age in days at `at_us` (one time, or one per row), for all
        videos or for `rows`. Unknown values stay NaN (the caller fills them)."""
        dur = self.log_duration if rows is None else self.log_duration[rows]
        up = self.upload_us if rows is None else self.upload_us[rows]
        age = np.maximum(np.asarray(at_us, dtype=np.float64) - up, 0.0) / US_PER_DAY
        return np.stack([dur, np.log1p(age)], axis=1).astype(np.float32)

    def ids(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The tower's categorical inputs: `video`, `meta` ([n, 2] category/creator) and `tags`."""
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        meta = np.stack([pick(self.category), pick(self.creator)], axis=1)
        return {"video": pick(self.video), "meta": meta, "tags": pick(self.tags)}


def _video_arrays(vocabs: dict[str, Vocab], videos: pd.DataFrame) -> _VideoArrays:
    duration = pd.to_numeric(videos["duration_s"], errors="coerce").astype("float64").to_numpy()
    upload = pd.to_datetime(videos["upload_time"], utc=True)
    upload_us = _to_us(upload.fillna(pd.Timestamp(0, tz="UTC"))).astype(np.float64)
    upload_us[upload.isna().to_numpy()] = np.nan
    return _VideoArrays(
        video=vocabs["video"].encode(videos["video_id"]),
        category=vocabs["category"].encode(videos["category"]),
        creator=vocabs["creator"].encode(videos["creator_id"]),
        tags=_tag_codes(vocabs["tag"], videos["tags"]),
        log_duration=np.log1p(np.maximum(duration, 0.0)),
        upload_us=upload_us,
    )


@dataclass
class TwoTowerConfig:
    """Hyper-parameters of the two-tower model and its training."""

    id_dim: int = 32
    user_meta_dim: int = 4
    video_meta_dim: int = 16
    hidden_dim: int = 64
    out_dim: int = 64
    sparse_ids: bool = False  # sparse gradients + SparseAdam for the id tables (large catalogs)
    epochs: int = 3
    # Examples per optimizer step, in groups of `softmax_group` examples that share one in-batch softmax
    # (255 negatives each). Large steps amortise the per-step cost (optimizer, kernel launches) on CPU
    # while the softmax cost per example stays that of a 256-batch. Small windows get smaller steps (down
    # to one group) so that an epoch still has `min_steps_per_epoch` optimizer steps. On 1M simulated
    # events, groups of 128, 256 and 512 and batches of 512-8192 gave the same held-out Recall@10.
    batch_size: int = 4096
    softmax_group: int = 256
    min_steps_per_epoch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True  # mask in-batch "negatives" that are the row's own video
    history_len: int = 20
    id_dropout: float = 0.2  # share of training examples whose video id is replaced by "unknown"
    user_id_dropout: float = 0.1  # same for the user id (trains the unknown-user path)
    min_count: int = 1  # positives a user/video needs to get its own id embedding
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads while training (None: leave as set)
    # Training processes (DistributedDataParallel under torchrun when > 1; recloop.distributed). None: the
    # setting RECLOOP_TRAIN_PROCESSES (default 1). With several, `num_threads` is shared among them.
    processes: int | None = None


@dataclass
class TwoTowerResult:
    """A trained two-tower model with everything retrieval needs (the "model bundle")."""

    model: TwoTowerModel
    config: TwoTowerConfig
    vocabs: dict[str, Vocab]
    users: pd.DataFrame  # user_id + USER_META, the users known at the cutoff
    videos: pd.DataFrame  # the catalog at the cutoff (VIDEOS columns)
    activity: _Activity
    activity_frame: pd.DataFrame  # what `activity` was built from (saved with the model)
    cutoff: pd.Timestamp
    partitions: list[str]
    epoch_losses: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    n_examples: int = 0
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # CPU time of the training loop (all threads; all ranks when distributed)
    # Distributed training (processes > 1): world size, backend, and what each rank did.
    distributed: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> TwoTowerArgs:
        return self.model.args


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} asked for but CUDA is not available: training on CPU", stacklevel=3)
        return torch.device("cpu")
    return torch.device(name)


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` torch intra-op threads (restored afterwards); None leaves the setting alone."""
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic kernels while training on CUDA. The CPU kernels used here are deterministic already
    (and the switch costs a ~3 s import of torch._inductor on first use), so CPU skips it."""
    if device.type == "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def user_tower_inputs(
    tt: "TwoTowerResult | _Parts", user_ids: np.ndarray, times_us: np.ndarray
) -> dict[str, np.ndarray]:
    """The user tower's inputs (id, meta codes, log activity counts, positive history) of each user as
    of each time: what training fed it, so that serving can extend them with fresher activity."""
    dense, hist = tt.activity.features(user_ids, times_us, tt.config.history_len)
    ids = pd.Index(np.asarray(user_ids, dtype=object), dtype=object)
    rows = pd.Index(tt.users["user_id"], dtype=object).get_indexer(ids)
    ok = rows >= 0
    meta = np.zeros((len(ids), len(USER_META)), dtype=np.int64)
    for j, col in enumerate(USER_META):
        meta[ok, j] = tt.vocabs[col].encode(tt.users[col].to_numpy(dtype=object)[rows[ok]])
    return {"user": tt.vocabs["user"].encode(user_ids), "meta": meta, "dense": dense, "history": hist}


@dataclass
class _Parts:
    config: TwoTowerConfig
    vocabs: dict[str, Vocab]
    users: pd.DataFrame
    activity: _Activity


def _build_vocabs(
    window: Window, ex_users: np.ndarray, ex_video_ids: np.ndarray, ex_videos: pd.DataFrame, min_count: int
) -> dict[str, Vocab]:
    """Vocabularies from the training examples: ids with at least `min_count` positives, metadata values
    of the users and (distinct) videos in the examples. Anything else is unknown (0)."""
    users = window.users.drop_duplicates("user_id").set_index("user_id")
    ex_meta = users.reindex(pd.Index(pd.unique(ex_users), dtype=object))
    tags = ex_videos["tags"].fillna("").astype(str).str.split("|").explode()
    return {
        "user": Vocab.build(ex_users, min_count),
        "video": Vocab.build(ex_video_ids, min_count),
        "device": Vocab.build(ex_meta["device"]),
        "country": Vocab.build(ex_meta["country"]),
        "age_bucket": Vocab.build(ex_meta["age_bucket"]),
        "category": Vocab.build(ex_videos["category"]),
        "creator": Vocab.build(ex_videos["creator_id"]),
        "tag": Vocab.build(tags),
    }


def _tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def _activity_from_frame(frame: pd.DataFrame, video_vocab: Vocab) -> _Activity:
    return _Activity(
        frame["user_id"].to_numpy(dtype=object),
        _to_us(frame["event_time"]),
        frame["watched"].to_numpy(dtype=bool),
        frame["positive"].to_numpy(dtype=bool),
        video_vocab.encode(frame["video_id"]),
    )


def _fill_nan(dense: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(dense), fill[None, :], dense).astype(np.float32)


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
    std = np.nanstd(x, axis=0) if len(x) else np.ones(x.shape[1])
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


@dataclass
class _Prepared:
    """What training needs from a window, computed once (by the launching process when training is
    distributed): the examples' inputs, the vocabularies and lookup tables the result keeps."""

    n_examples: int
    args: TwoTowerArgs
    stats: dict[str, np.ndarray]  # u_mean, u_std, v_mean, v_std: the towers' dense normalisation
    examples: dict[str, np.ndarray]  # per-example inputs ("u.*", "v.*", "row", "log_q")
    vocabs: dict[str, Vocab]
    users: pd.DataFrame
    catalog: pd.DataFrame
    activity: _Activity
    activity_frame: pd.DataFrame


def _prepare(window: Window, config: TwoTowerConfig) -> _Prepared:
    """The training examples of `window` (one per positive event whose video is in the catalog) and
    everything that rebuilds the towers' inputs later. Deterministic."""
    ev = window.events
    catalog = window.videos.reset_index(drop=True)
    vrow = pd.Index(catalog["video_id"], dtype=object).get_indexer(pd.Index(ev["video_id"], dtype=object))
    dur_all = catalog["duration_s"].to_numpy(dtype=np.float64)
    duration = np.where(vrow >= 0, dur_all[np.maximum(vrow, 0)] if len(dur_all) else np.nan, np.nan)
    positive = positive_mask(ev, duration)
    is_example = positive & (vrow >= 0)
    n_ex = int(is_example.sum())
    if n_ex < 2:
        raise ValueError(f"the window has {n_ex} positive engagements with known videos: too few to train on")

    ev_users = ev["user_id"].to_numpy(dtype=object)
    ev_time = _to_us(ev["event_time"])
    ex_rows = np.flatnonzero(is_example)
    ex_vrow = vrow[ex_rows]
    ex_time = ev_time[ex_rows]
    vocabs = _build_vocabs(
        window, ev_users[ex_rows], catalog["video_id"].to_numpy(dtype=object)[ex_vrow],
        catalog.iloc[np.unique(ex_vrow)], config.min_count,
    )

    users = window.users[["user_id", *USER_META]].reset_index(drop=True)
    activity_frame = pd.DataFrame(
        {
            "user_id": ev_users,
            "event_time": pd.to_datetime(ev["event_time"], utc=True).astype("datetime64[us, UTC]").array,
            "watched": pd.to_numeric(ev["watched_s"], errors="coerce").fillna(0).to_numpy() > 0,
            "positive": positive,
            "video_id": np.where(positive, ev["video_id"].to_numpy(dtype=object), None),
        }
    )
    activity = _activity_from_frame(activity_frame, vocabs["video"])
    parts = _Parts(config, vocabs, users, activity)

    u_in = user_tower_inputs(parts, ev_users[ex_rows], ex_time)
    v_all = _video_arrays(vocabs, catalog)
    v_dense = v_all.dense(ex_time, ex_vrow)
    u_mean, u_std = _mean_std(u_in["dense"])
    v_mean, v_std = _mean_std(v_dense)
    v_dense = _fill_nan(v_dense, v_mean)
    counts = np.bincount(ex_vrow, minlength=len(catalog))
    log_q = np.log(np.maximum(counts, 1) / n_ex).astype(np.float32)

    args = TwoTowerArgs(
        n_users=len(vocabs["user"]),
        n_videos=len(vocabs["video"]),
        n_devices=len(vocabs["device"]),
        n_countries=len(vocabs["country"]),
        n_ages=len(vocabs["age_bucket"]),
        n_categories=len(vocabs["category"]),
        n_creators=len(vocabs["creator"]),
        n_tags=len(vocabs["tag"]),
        id_dim=config.id_dim,
        user_meta_dim=config.user_meta_dim,
        video_meta_dim=config.video_meta_dim,
        hidden_dim=config.hidden_dim,
        out_dim=config.out_dim,
        sparse_ids=config.sparse_ids,
    )
    examples = {
        **{f"u.{k}": v for k, v in u_in.items()},
        **{f"v.{k}": v for k, v in v_all.ids(ex_vrow).items()},
        "v.dense": v_dense,
        "row": ex_vrow.astype(np.int64),
        "log_q": log_q[ex_vrow],
    }
    return _Prepared(
        n_examples=n_ex, args=args, stats={"u_mean": u_mean, "u_std": u_std, "v_mean": v_mean, "v_std": v_std},
        examples=examples, vocabs=vocabs, users=users, catalog=catalog, activity=activity,
        activity_frame=activity_frame,
    )


def new_model(args: TwoTowerArgs, stats: dict[str, np.ndarray], seed: int) -> TwoTowerModel:
    """The untrained model: weights drawn from `seed`, the towers' dense normalisation from `stats`."""
    torch.manual_seed(seed)
    model = TwoTowerModel(args)
    with torch.no_grad():
        model.user_tower.dense_mean.copy_(torch.from_numpy(np.asarray(stats["u_mean"])))
        model.user_tower.dense_std.copy_(torch.from_numpy(np.asarray(stats["u_std"])))
        model.video_tower.dense_mean.copy_(torch.from_numpy(np.asarray(stats["v_mean"])))
        model.video_tower.dense_std.copy_(torch.from_numpy(np.asarray(stats["v_std"])))
    return model


def optimizers(model: TwoTowerModel, config: TwoTowerConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters; SparseAdam for the id tables when `config.sparse_ids`."""
    fused = device.type in ("cpu", "cuda")
    opts: list[torch.optim.Optimizer] = [
        torch.optim.Adam(model.dense_parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    ]
    if model.sparse_parameters():
        opts.append(torch.optim.SparseAdam(model.sparse_parameters(), lr=config.lr))
    return opts


@dataclass
class EpochStats:
    """What `train_epochs` reports: mean loss per epoch, examples trained on (all ranks), of them this
    rank's own, the wall time of the loop and the CPU time this process spent in it (all its threads)."""

    losses: list[float]
    seen: int
    own: int
    seconds: float
    cpu_seconds: float = 0.0


def train_epochs(
    model: torch.nn.Module,
    opts: Sequence[torch.optim.Optimizer],
    ex: dict[str, torch.Tensor],
    config: TwoTowerConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
) -> EpochStats:
    """`config.epochs` passes over the examples `ex` (tensors on `device`); one optimizer step per batch.

    Every epoch permutes the examples and draws the id-dropout masks from one generator seeded by
    `config.seed`; every batch is a contiguous slice of `batch_size` examples in groups of `softmax_group`
    that share one in-batch softmax. With `world` > 1 (`model` wrapped in DistributedDataParallel), all
    ranks draw the same permutation and masks and each takes its share of every batch's groups; its loss
    (mean over its groups) is weighted by its share, so that DDP's gradient average equals the gradient
    of the whole batch: the same update as one process, up to the order of float sums. A rank without a
    group in a batch (fewer groups than ranks) runs the batch's first group with weight 0 to take part in
    the gradient all-reduce. The reported loss is the whole batch's (all-reduced once per epoch).
    """
    n_ex = len(ex["row"])
    gen = torch.Generator().manual_seed(config.seed)
    group = max(2, min(int(config.softmax_group), int(config.batch_size), n_ex))
    bs = min(int(config.batch_size), max(group, n_ex // max(1, config.min_steps_per_epoch)))
    bs = max(group, bs // group * group)
    losses: list[float] = []
    seen = own = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(config.epochs):
        # Each batch gathers its examples through the permutation (not a permuted copy of every tensor per
        # epoch: at 10M events that copy, and the previous epoch's still alive beside it, is a GB).
        perm = torch.randperm(n_ex, generator=gen).to(device)
        drop_video = (torch.rand(n_ex, generator=gen) < config.id_dropout).to(device)
        drop_user = (torch.rand(n_ex, generator=gen) < config.user_id_dropout).to(device)
        total = torch.zeros((), device=device)
        batches = 0
        for s in range(0, n_ex - 1, bs):
            # The last batch keeps whole groups only (leftovers are used in other epochs).
            size = min(bs, n_ex - s)
            size = size // group * group if size >= group else size
            if size < 2:
                continue
            n_groups = max(1, size // group) if size >= group else 1
            m = size // n_groups
            lo, hi = n_groups * rank // world, n_groups * (rank + 1) // world
            weight = (hi - lo) * world / n_groups
            if hi == lo:  # no group of this batch is this rank's: a zero-weighted copy of the first
                lo, hi = 0, 1
            rows = slice(s + lo * m, s + hi * m)
            b = {k: t[perm[rows]] for k, t in ex.items()}
            b["v.video"].masked_fill_(drop_video[rows], 0)
            b["u.user"].masked_fill_(drop_user[rows], 0)
            u, v = model(
                {k[2:]: t for k, t in b.items() if k.startswith("u.")},
                {k[2:]: t for k, t in b.items() if k.startswith("v.")},
            )
            logits = in_batch_logits(
                u, v, config.temperature, b["log_q"] if config.logq_correction else None,
                b["row"] if config.remove_accidental_hits else None,
                groups=hi - lo,
            )
            loss = in_batch_loss(logits)
            if world > 1:
                loss = loss * weight
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            total += loss.detach()
            batches += 1
            seen += size
            own += (hi - lo) * m if weight else 0
        if world > 1:
            torch.distributed.all_reduce(total)
            total /= world
        losses.append(float(total) / max(batches, 1))
    return EpochStats(losses, seen, own, time.perf_counter() - t0, time.process_time() - cpu0)


def train_two_tower(window: Window, config: TwoTowerConfig | None = None) -> TwoTowerResult:
    """Train the two-tower model on the window's positive engagements (see `positive_mask`).

    One example per positive event whose video is in the catalog: the user's features as of the event's
    time (history and counts from the window's events strictly before it) and the video's features at
    that time. Softmax over in-batch negatives with a temperature and log-Q correction, Adam,
    `config.epochs` passes. Same seed and data -> identical weights (CPU).

    `config.processes` (None: the setting `RECLOOP_TRAIN_PROCESSES`, default 1) > 1 trains with PyTorch
    DistributedDataParallel in that many processes started by `torchrun` (`recloop.distributed`): the
    same steps on the same batches, each split across the processes.
    """
    from recloop.config import train_processes

    config = config or TwoTowerConfig()
    processes = train_processes() if config.processes is None else int(config.processes)
    if processes < 1:
        raise ValueError(f"TwoTowerConfig.processes must be >= 1, got {processes}")
    config = replace(config, processes=processes)
    device = _device(config.device)
    if processes > 1:
        from recloop import distributed as ddp

        ddp.check_processes(processes, device, sparse_ids=config.sparse_ids)  # before the work, not after
    prep = _prepare(window, config)
    distributed: dict[str, Any] = {}
    if processes > 1:
        run = ddp.train(prep, config, device)
        model = TwoTowerModel(prep.args)
        model.load_state_dict(run.state_dict)
        model.to(device)
        stats, distributed = run.stats, run.info
    else:
        with _deterministic(device), _threads(config.num_threads):
            model = new_model(prep.args, prep.stats, config.seed)
            model.to(device).train()
            stats = train_epochs(model, optimizers(model, config, device), _tensors(prep.examples, device),
                                 config, device)
    model.eval()
    return TwoTowerResult(
        model=model,
        config=config,
        vocabs=prep.vocabs,
        users=prep.users,
        videos=prep.catalog,
        activity=prep.activity,
        activity_frame=prep.activity_frame,
        cutoff=window.cutoff,
        partitions=list(window.partitions),
        epoch_losses=stats.losses,
        samples_per_s=stats.seen / stats.seconds if stats.seconds > 0 else float("inf"),
        n_examples=prep.n_examples,
        train_seconds=stats.seconds,
        train_cpu_seconds=stats.cpu_seconds,
        distributed=distributed,
    )


def tower_forward(
    tower: torch.nn.Module, inputs: dict[str, np.ndarray], out_dim: int, batch_size: int = 65_536
) -> np.ndarray:
    """A tower's outputs for numpy inputs, in batches, without gradients (float32 [n, out_dim])."""
    device = next(tower.parameters()).device
    n = len(next(iter(inputs.values())))
    outs = []
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                batch = {
                    k: torch.from_numpy(np.ascontiguousarray(v[s : s + batch_size])).to(device)
                    for k, v in inputs.items()
                }
                outs.append(tower(batch).float().cpu().numpy())
    finally:
        tower.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, out_dim), np.float32)


def _as_of_us(tt: TwoTowerResult, as_of: Any) -> int:
    return _ts_us(tt.cutoff if as_of is None else as_of)


def user_embeddings(tt: TwoTowerResult, user_ids: Sequence[str], as_of: Any = None) -> np.ndarray:
    """[n, d] float32 user vectors as of `as_of` (default: the training cutoff): history and counts from
    the training window's events before then. Unknown users get the unknown-id path and an empty
    history: still a valid unit vector."""
    ids = np.asarray(list(user_ids), dtype=object)
    inputs = user_tower_inputs(tt, ids, np.full(len(ids), _as_of_us(tt, as_of), dtype=np.int64))
    return tower_forward(tt.model.user_tower, inputs, tt.args.out_dim)


def _video_inputs(
    tt: TwoTowerResult, va: _VideoArrays, at_us: Any, rows: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    fill = tt.model.video_tower.dense_mean.detach().cpu().numpy()
    return {**va.ids(rows), "dense": _fill_nan(va.dense(at_us, rows), fill)}


def video_embeddings(
    tt: TwoTowerResult, videos_df: pd.DataFrame | None = None, as_of: Any = None
) -> tuple[list[str], np.ndarray]:
    """(video ids, [n, d] float32 vectors) for `videos_df` (VIDEOS columns; default the training catalog)
    with freshness as of `as_of` (default the cutoff). Videos unseen in training go through the
    unknown-id path: their vectors come from category, tags, creator, duration and age."""
    videos = tt.videos if videos_df is None else videos_df.reset_index(drop=True)
    va = _video_arrays(tt.vocabs, videos)
    vectors = tower_forward(tt.model.video_tower, _video_inputs(tt, va, _as_of_us(tt, as_of)), tt.args.out_dim)
    return videos["video_id"].astype(str).tolist(), vectors


def retrieval_scores(tt: TwoTowerResult, df: pd.DataFrame, chunk: int = 200_000) -> np.ndarray:
    """Point-in-time two-tower score `u . v` for each row of `df` (`user_id`, `video_id`, `event_time`):
    the user as of the row's time (history before it; after the cutoff, as of the cutoff) and the
    video from the training catalog at that time (unknown videos: metadata-free unknown path)."""
    va = _video_arrays(tt.vocabs, tt.videos)
    catalog = pd.Index(tt.videos["video_id"], dtype=object)
    # A last, empty row for videos missing from the catalog: all codes 0, dense filled with the mean.
    va = _VideoArrays(
        video=np.append(va.video, 0), category=np.append(va.category, 0), creator=np.append(va.creator, 0),
        tags=np.vstack([va.tags, np.zeros((1, MAX_TAGS), np.int64)]),
        log_duration=np.append(va.log_duration, np.nan), upload_us=np.append(va.upload_us, np.nan),
    )
    out = np.zeros(len(df), dtype=np.float32)
    users = df["user_id"].to_numpy(dtype=object)
    videos = df["video_id"].to_numpy(dtype=object)
    times = _to_us(df["event_time"])
    for s in range(0, len(df), chunk):
        sl = slice(s, s + chunk)
        u = tower_forward(tt.model.user_tower, user_tower_inputs(tt, users[sl], times[sl]), tt.args.out_dim)
        rows = catalog.get_indexer(pd.Index(videos[sl], dtype=object))
        rows = np.where(rows >= 0, rows, len(va.video) - 1)
        v = tower_forward(tt.model.video_tower, _video_inputs(tt, va, times[sl], rows), tt.args.out_dim)
        out[sl] = np.einsum("ij,ij->i", u, v)
    return out


def retrieval_recall_at_k(tt: TwoTowerResult, events: pd.DataFrame, k: int = 50) -> dict[str, float]:
    """How well the model retrieves held-out engagements: for the positive events of `events` (EVENTS
    columns, e.g. the days after the training window) whose video is in the model's catalog, the share of
    distinct (user, video) pairs whose video is among the user's top `k` of the whole catalog by exact
    `u . v` (users as of the cutoff, videos as of the cutoff). Returns recall, pairs and users."""
    catalog = pd.Index(tt.videos["video_id"], dtype=object)
    rows = catalog.get_indexer(pd.Index(events["video_id"], dtype=object))
    durations = tt.videos["duration_s"].to_numpy(dtype=np.float64)
    duration = np.where(rows >= 0, durations[np.maximum(rows, 0)] if len(durations) else np.nan, np.nan)
    keep = positive_mask(events, duration) & (rows >= 0)
    pairs = pd.DataFrame({"user": events["user_id"].to_numpy(dtype=object)[keep], "row": rows[keep]})
    pairs = pairs.drop_duplicates()
    if pairs.empty:
        return {"recall": float("nan"), "pairs": 0, "users": 0}
    users, position = np.unique(pairs["user"].to_numpy(dtype=object), return_inverse=True)
    u = user_embeddings(tt, list(users))
    _, v = video_embeddings(tt)
    k = min(int(k), len(v))
    top = torch.topk(torch.from_numpy(u) @ torch.from_numpy(v).T, k, dim=1).indices.numpy()
    hits = (top[position] == pairs["row"].to_numpy()[:, None]).any(axis=1)
    return {"recall": float(hits.mean()), "pairs": int(len(pairs)), "users": int(len(users))}


# --- persistence -------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, compression="zstd")


def save_two_tower(result: TwoTowerResult, directory: str | Path) -> Path:
    """Write the model to `directory`: `state_dict.pt` (tensors only), `model_args.json` (what rebuilds
    the module, the config and training stats), `vocabs.json`, and the lookup tables the towers read
    (`users.parquet`, `videos.parquet`, `activity.parquet`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, d / "state_dict.pt")
    _write_json(
        d / "model_args.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "two_tower",
            "args": asdict(result.args),
            "config": asdict(result.config),
            "cutoff": result.cutoff.isoformat(),
            "partitions": result.partitions,
            "epoch_losses": result.epoch_losses,
            "samples_per_s": result.samples_per_s,
            "n_examples": result.n_examples,
            "train_seconds": result.train_seconds,
            "train_cpu_seconds": result.train_cpu_seconds,
            "distributed": result.distributed,
        },
    )
    _write_json(d / "vocabs.json", {name: v.ids for name, v in result.vocabs.items()})
    _write_parquet(d / "users.parquet", result.users)
    _write_parquet(d / "videos.parquet", result.videos)
    _write_parquet(d / "activity.parquet", result.activity_frame)
    return d


def load_two_tower(directory: str | Path, device: str = "cpu") -> TwoTowerResult:
    """Rebuild a model saved by `save_two_tower` (weights read with `weights_only=True`)."""
    d = Path(directory)
    meta = json.loads((d / "model_args.json").read_text())
    if meta.get("kind") != "two_tower":
        raise ValueError(f"{d} does not hold a two-tower model")
    args = TwoTowerArgs(**meta["args"])
    config = TwoTowerConfig(**meta["config"])
    model = TwoTowerModel(args)
    model.load_state_dict(torch.load(d / "state_dict.pt", map_location="cpu", weights_only=True))
    model.to(_device(device)).eval()
    vocabs = {name: Vocab(ids) for name, ids in json.loads((d / "vocabs.json").read_text()).items()}
    users = pd.read_parquet(d / "users.parquet")
    videos = pd.read_parquet(d / "videos.parquet")
    activity_frame = pd.read_parquet(d / "activity.parquet")
    return TwoTowerResult(
        model=model,
        config=config,
        vocabs=vocabs,
        users=users,
        videos=videos,
        activity=_activity_from_frame(activity_frame, vocabs["video"]),
        activity_frame=activity_frame,
        cutoff=pd.Timestamp(meta["cutoff"]),
        partitions=list(meta["partitions"]),
        epoch_losses=list(meta["epoch_losses"]),
        samples_per_s=float(meta["samples_per_s"]),
        n_examples=int(meta["n_examples"]),
        train_seconds=float(meta["train_seconds"]),
        train_cpu_seconds=float(meta.get("train_cpu_seconds", 0.0)),
        distributed=dict(meta.get("distributed") or {}),
    )

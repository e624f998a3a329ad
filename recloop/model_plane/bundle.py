"""The model bundle: one directory holding everything a fitted `MultiStageRecommender` is made of, so a
registered version (one MLflow artifact) is always a consistent whole. Nothing is pickled:

    bundle.json                 what it holds, candidate settings, ranker features, training window
    history/                    the interaction history the sources read at recommendation time
        users.parquet  items.parquet  events.parquet  history.json
    sources/item_to_item/       EASE weights (float16) and their items
    sources/two_tower/model/    the two-tower (state_dict + args + lookup tables)
    sources/two_tower/index/    its FAISS index
    sources/popular.json        the popular and fresh lists
    ranker/                     LightGBM model (text) + features, curves and settings
    checksums.sha256            the sha256 of every other file, written last (`sha256sum -c` reads it)

A bundle whose manifest says `metadata.quantization.user_tower: int8` (`RECLOOP_QUANTIZE`, see
`recloop.model_plane.quantization`) is loaded with its user tower quantized to int8.

`load_bundle` verifies every checksum before it reads anything (`verify_bundle`): a damaged file (a
FAISS index overwritten, a model cut short by a full disk) is a `CorruptModelError` naming the file,
never a library's error from deep inside FAISS, LightGBM or torch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from recloop.model_plane.history import History
from recloop.model_plane.ranker import Ranker
from recloop.model_plane.recommender import CandidateConfig, MultiStageRecommender
from recloop.model_plane.sources import Fresh, ItemToItem, Popular, TwoTowerSource

BUNDLE_FORMAT = 2
CHECKSUMS = "checksums.sha256"
_CHUNK = 1 << 20


class CorruptModelError(RuntimeError):
    """A model bundle whose files are not the ones saved: `file` (relative to `bundle`) is missing, cut
    short or overwritten, or the checksum manifest itself is missing or unreadable. `problems` holds
    every damaged file (file -> what is wrong), `file`/`problem` the first of them."""

    def __init__(self, bundle: Path, file: str, problem: str, *, more: dict[str, str] | None = None) -> None:
        self.bundle = Path(bundle)
        self.problems = {file: problem, **(more or {})}
        self.file, self.problem = file, problem
        super().__init__(f"model bundle {bundle} is corrupt: {self.summary}")

    @property
    def summary(self) -> str:
        """What is damaged, without the bundle's (often temporary) folder: `file problem; ...`."""
        return "; ".join(f"{f} {p}" for f, p in self.problems.items())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(directory: str | Path) -> Path:
    """Writes `checksums.sha256` (the `sha256sum` format: `<hex>  <path>` per line) for every file of the
    bundle directory; returns its path. Called last by `save_bundle`."""
    d = Path(directory)
    lines = [f"{_sha256(d / name)}  {name}\n" for name in _bundle_files(d)]
    path = d / CHECKSUMS
    path.write_text("".join(lines))
    return path


def read_checksums(directory: str | Path) -> dict[str, str]:
    """The manifest of the bundle: relative path -> sha256. Raises `CorruptModelError` when it is missing
    or malformed."""
    d = Path(directory)
    path = d / CHECKSUMS
    if not path.is_file():
        raise CorruptModelError(d, CHECKSUMS, "is missing: the bundle cannot be verified (saved by a recloop "
                                              "without checksums, or damaged); retrain or roll back")
    entries: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptModelError(d, CHECKSUMS, f"is unreadable ({err})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise CorruptModelError(d, CHECKSUMS, f"is malformed at line {number}")
        entries[name] = digest.lower()
    if not entries:
        raise CorruptModelError(d, CHECKSUMS, "lists no files")
    return entries


def verify_bundle(directory: str | Path) -> dict[str, str]:
    """Checks every file of the bundle against `checksums.sha256`; returns the manifest. Raises
    `CorruptModelError` naming the first file that is missing or whose content differs."""
    d = Path(directory)
    if not d.is_dir():
        raise CorruptModelError(d, ".", "does not exist")
    expected = read_checksums(d)
    problems: dict[str, str] = {}
    for name, digest in expected.items():
        path = d / name
        if not path.is_file():
            problems[name] = "is missing"
        elif (actual := _sha256(path)) != digest:
            problems[name] = (f"does not match its checksum (sha256 {actual[:12]}, saved {digest[:12]}; "
                              f"{path.stat().st_size} bytes now)")
    if problems:
        (first, problem), *rest = problems.items()
        raise CorruptModelError(d, first, problem, more=dict(rest))
    return expected


def save_history(history: History, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": history.users}).join(history.user_meta.drop(columns="user_id", errors="ignore")) \
        .to_parquet(directory / "users.parquet", index=False)
    history.catalog.to_parquet(directory / "items.parquet", index=False)
    pd.DataFrame({"user": history.ev_user, "item": history.ev_item, "time_us": history.ev_time,
                  "watched": history.ev_watched, "positive": history.ev_positive}).to_parquet(directory / "events.parquet", index=False)
    (directory / "history.json").write_text(json.dumps({"cutoff_us": history.cutoff_us,
                                                        "partitions": list(history.partitions)}, indent=2))


def load_history(directory: Path) -> History:
    users = pd.read_parquet(directory / "users.parquet")
    catalog = pd.read_parquet(directory / "items.parquet")
    ev = pd.read_parquet(directory / "events.parquet")
    meta = json.loads((directory / "history.json").read_text())
    return History(
        users=pd.Index(users["user_id"].astype(str), dtype=object),
        items=pd.Index(catalog["video_id"].astype(str), dtype=object),
        catalog=catalog,
        user_meta=users,
        ev_user=ev["user"].to_numpy(np.int32), ev_item=ev["item"].to_numpy(np.int32),
        ev_time=ev["time_us"].to_numpy(np.int64), ev_watched=ev["watched"].to_numpy(bool),
        ev_positive=ev["positive"].to_numpy(bool), cutoff_us=int(meta["cutoff_us"]),
        frame=pd.DataFrame(), ev_row=np.arange(len(ev), dtype=np.int64), partitions=tuple(meta.get("partitions", ())),
    )


def save_bundle(directory: str | Path, recommender: MultiStageRecommender, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write `recommender` (its ranker mode) as a bundle directory; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rec = recommender
    save_history(rec.history, d / "history")
    if rec.item_to_item is not None:
        rec.item_to_item.save(d / "sources" / "item_to_item")
    if rec.two_tower is not None:
        rec.two_tower.save(d / "sources" / "two_tower")
    (d / "sources").mkdir(parents=True, exist_ok=True)
    (d / "sources" / "popular.json").write_text(json.dumps({
        "popular": rec.history.items[rec.popular.rows].tolist(), "popular_days": rec.popular.days,
        "fresh": rec.history.items[rec.fresh.rows].tolist()}, indent=2))
    if rec.ranker is not None:
        rec.ranker.save(d / "ranker")
    manifest = {
        "format_version": BUNDLE_FORMAT,
        "kind": "multi_stage",
        "sources": rec.sources,
        "holds": {"item_to_item": rec.item_to_item is not None, "two_tower": rec.two_tower is not None,
                  "ranker": rec.ranker is not None,
                  "index": ({"kind": rec.two_tower.index.kind, "size": len(rec.two_tower.index), "dim": rec.two_tower.index.dim,
                             "params": rec.two_tower.index.params} if rec.two_tower is not None else None)},
        "candidates": asdict(rec.config),
        "feature_columns": list(rec.ranker.features) if rec.ranker is not None else [],
        "store_columns": list(rec.store.columns) if rec.store is not None else [],
        "training_window": {"partitions": list(rec.history.partitions), "cutoff": rec.history.cutoff.isoformat()},
        "popular": rec.history.items[rec.popular.rows].tolist(),
        "metadata": dict(metadata or {}),
    }
    (d / "bundle.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    write_checksums(d)
    return d


def load_bundle(directory: str | Path, *, store: Any = None, mode: str | None = None) -> MultiStageRecommender:
    """The recommender saved by `save_bundle`. `store`: the feature-store columns' provider (Feast at
    serving, `LakeSnapshots`/`FeastHistorical` offline); required when the ranker was trained with them.
    Raises `CorruptModelError` when a file does not match the checksum it was saved with."""
    d = Path(directory)
    verify_bundle(d)
    manifest = json.loads((d / "bundle.json").read_text())
    if manifest.get("format_version") != BUNDLE_FORMAT:
        raise ValueError(f"{d}: bundle format {manifest.get('format_version')} is not {BUNDLE_FORMAT}: "
                         "retrain with this version of recloop")
    history = load_history(d / "history")
    holds = manifest["holds"]
    i2i = ItemToItem.load(d / "sources" / "item_to_item") if holds["item_to_item"] else None
    config = CandidateConfig(**manifest["candidates"])
    tt = TwoTowerSource.load(d / "sources" / "two_tower", history, config.n_two_tower) if holds["two_tower"] else None
    if tt is not None and (manifest.get("metadata") or {}).get("quantization", {}).get("user_tower") == "int8":
        from recloop.model_plane import quantization

        quantization.apply(tt)  # the int8 user tower the bundle was saved with (a function of its weights)
    lists = json.loads((d / "sources" / "popular.json").read_text())
    popular = Popular(history.items.get_indexer(pd.Index(lists["popular"], dtype=object)).astype(np.int64),
                      lists.get("popular_days"))
    fresh = Fresh(history.items.get_indexer(pd.Index(lists["fresh"], dtype=object)).astype(np.int64))
    ranker = Ranker.load(d / "ranker") if holds["ranker"] else None
    if ranker is not None and manifest.get("store_columns") and store is None:
        store = _MissingStore(manifest["store_columns"])
    return MultiStageRecommender(history, i2i, tt, popular, fresh, ranker, config, store,
                                 mode=mode or ("ranker" if ranker is not None else "item_to_item"))


class _MissingStore:
    """Stands in for a feature store that was not given: its columns are missing (NaN), which the ranker
    handles like any missing value. `load_bundle(..., store=...)` gives the real one."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)

    def lookup(self, user_ids: Any, video_ids: Any, categories: Any, at_us: int) -> np.ndarray:
        return np.full((len(user_ids), len(self.columns)), np.nan)


def sanity(recommender: MultiStageRecommender, users: Sequence[str], k: int = 10, *,
           lists: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Cheap checks before serving: finite weights, how many users get the single most common top-k
    (1.0 = the same list for everyone, a degenerate model), how many distinct items are shown. `lists`:
    the recommender's lists of `users` already computed (the evaluation's); their first k are checked
    instead of asking the recommender again."""
    finite = True
    if recommender.two_tower is not None:
        import torch

        finite &= all(bool(torch.isfinite(p).all()) for p in recommender.two_tower.model.model.parameters())
    if recommender.item_to_item is not None:
        finite &= bool(np.isfinite(recommender.item_to_item.b_pos).all() and np.isfinite(recommender.item_to_item.b_watch).all())
    recs = [list(r[:k]) for r in lists] if lists is not None else recommender.recommend(list(users), k)
    counts = Counter(tuple(r) for r in recs)
    top, n_top = counts.most_common(1)[0] if counts else ((), 0)
    distinct = {v for r in recs for v in r}
    return {
        "weights_finite": bool(finite),
        "users": len(recs),
        "k": k,
        "share_same_top_k": n_top / len(recs) if recs else float("nan"),
        "most_common_top_k": list(top),
        "distinct_items": len(distinct),
        "catalog_coverage": len(distinct) / max(len(recommender.history.items), 1),
        "short_lists": sum(len(r) < k for r in recs),
    }

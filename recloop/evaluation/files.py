"""File mode: users' own files (MovieLens folders, ratings files, event files) in, the harness's JSON out
(`evaluate_files`, behind `recloop evaluate`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recloop.recommender import Recommender
from recloop.evaluation.baselines import RecommenderFactory, baseline_factories
from recloop.evaluation.data import interactions_from_events
from recloop.evaluation.harness import EvaluationResult, _catalog_frame, evaluate
from recloop.evaluation.metrics import DEFAULT_KS, MAIN_K, POSITIVE_RATING, UNKNOWN_CATEGORY

log = logging.getLogger(__name__)


# --- files -------------------------------------------------------------------------------------------

_USER_COLUMNS = {"user_id": False, "userId": True}  # name -> MovieLens numeric ids (prefixed ml_u / ml_v)
_ITEM_COLUMNS = {"video_id": False, "movieId": True}


def _movielens_ids(prefix: str, values: pd.Series) -> pd.Series:
    return prefix + pd.to_numeric(values, errors="raise").astype(np.int64).astype(str)


def _times(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values.astype(np.int64), unit="s", utc=True)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return pd.to_datetime(numeric.astype(np.int64), unit="s", utc=True)
    return pd.to_datetime(values, utc=True, format="ISO8601")


def _read_table(path: Path) -> pd.DataFrame:
    """A Parquet file, or a delimited text file (',', tab, ';', '|' or '::'; header optional: a
    header-less file of 3-4 numeric columns is MovieLens ``user item rating [timestamp]``)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path).to_pandas()
    with path.open("rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if "::" in first:
        sep = "::"
    else:
        sep = max(["\t", ",", ";", "|"], key=first.count)
        if not first.count(sep):
            sep = r"\s+"
    fields = [f.strip() for f in (first.split(sep) if sep != r"\s+" else first.split())]
    numeric = all(_is_number(f) for f in fields) and len(fields) in (3, 4)
    engine = "python" if len(sep) > 1 else "c"
    if numeric:
        names = ["userId", "movieId", "rating", "timestamp"][: len(fields)]
        df = pd.read_csv(path, sep=sep, header=None, names=names, engine=engine, encoding="latin-1")
        if "timestamp" not in df.columns:
            df["timestamp"] = 0
        return df
    return pd.read_csv(path, sep=sep, engine=engine, dtype=str, keep_default_na=False, na_values=[""])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _movies_beside(path: Path, ids: pd.Series) -> pd.DataFrame | None:
    """Title, tags (the genres) and category (the first genre) of the MovieLens movies next to a ratings
    file (movies.csv, movies.dat or u.item), for the videos `ids` (``ml_v{movieId}``); None when there is
    no movies file."""
    from recloop.data import movielens

    folder = path.parent
    for layout, name in (("ml-latest", "movies.csv"), ("ml-1m", "movies.dat"), ("ml-100k", "u.item")):
        if (folder / name).is_file():
            movies = movielens._read_movies(layout, folder)
            if movies is None:
                return None
            movies = movies[~pd.Index(movies.index).duplicated(keep="first")]
            numeric = pd.to_numeric(ids.str.removeprefix("ml_v"), errors="coerce")
            movies = movies.reindex(numeric.to_numpy())
            genres = movies["genres"].fillna("").astype(str)
            first = genres.str.partition("|")[0]
            tags = movielens.with_user_tags(genres, numeric.to_numpy(), movielens.read_movie_tags(folder))
            return pd.DataFrame({"video_id": ids.to_numpy(), "title": movies["title"].fillna("").to_numpy(),
                                 "tags": tags.to_numpy(), "category": first.where(first != "", UNKNOWN_CATEGORY).to_numpy()})
    return None


def _videos_beside(path: Path) -> pd.DataFrame | None:
    for name in ("videos.parquet", "videos.csv"):
        candidate = path.parent / name
        if candidate.is_file() and candidate != path:
            return _read_table(candidate)
    return None


class EvaluationInputError(ValueError):
    """A file given to `recloop evaluate` cannot be used (missing, unreadable, not a known layout)."""


@dataclass
class FileData:
    """One file (or MovieLens folder) in recloop's canonical tables (docs/data_schema.md): every event,
    liked or not, the videos with their metadata, the users. What the platform's model trains on; the
    baselines see only `positives`."""

    path: Path
    kind: str  # "movielens", "ratings" or "events"
    events: pd.DataFrame
    videos: pd.DataFrame
    users: pd.DataFrame

    @property
    def positives(self) -> pd.DataFrame:
        """The positive interactions (``user_id, video_id, event_time``), by recloop's one rule."""
        return interactions_from_events(self.events, self.videos)

    @property
    def watched(self) -> pd.DataFrame:
        """Every (user, video) pair the user watched (rated): what is never recommended again."""
        w = pd.to_numeric(self.events["watched_s"], errors="coerce").fillna(0).to_numpy() > 0
        return self.events.loc[w, ["user_id", "video_id"]].astype(str).drop_duplicates().reset_index(drop=True)


def _full_videos(videos: pd.DataFrame | None, events: pd.DataFrame) -> pd.DataFrame:
    """VIDEOS columns for every video of `events` (given metadata first; missing values filled: category
    and creator "unknown", no tags, upload time = the video's first event)."""
    from recloop.data.schemas import VIDEOS

    first = events.groupby("video_id")["event_time"].min()
    base = pd.DataFrame({"video_id": first.index.astype(str), "upload_time": first.to_numpy()})
    if videos is not None and len(videos):
        given = videos.copy()
        given["video_id"] = given["video_id"].astype(str)
        given = given.drop_duplicates("video_id", keep="last")
        base = given.merge(base.rename(columns={"upload_time": "_first"}), on="video_id", how="outer")
        if "upload_time" in base.columns:
            base["upload_time"] = pd.to_datetime(base["upload_time"], utc=True, format="ISO8601").fillna(base["_first"])
        else:
            base["upload_time"] = base["_first"]
        base = base.drop(columns="_first")
    defaults = {"title": "", "tags": "", "category": UNKNOWN_CATEGORY, "creator_id": "unknown", "duration_s": np.nan}
    for column, value in defaults.items():
        base[column] = base[column].fillna(value) if column in base.columns else value
    base["duration_s"] = pd.to_numeric(base["duration_s"], errors="coerce")
    base["upload_time"] = pd.to_datetime(base["upload_time"], utc=True)
    return base[VIDEOS.columns].reset_index(drop=True)


def _users_of(events: pd.DataFrame) -> pd.DataFrame:
    first = events.groupby("user_id")["event_time"].min()
    return pd.DataFrame({"user_id": first.index.astype(str), "country": "unknown", "age_bucket": "unknown",
                         "signup_time": first.to_numpy(), "device": "unknown"})


def _ratings_data(path: Path, df: pd.DataFrame, user_col: str, item_col: str, time_col: str) -> FileData:
    """A ratings file as events, with MovieLens's mapping (recloop.data.movielens): each rating is one
    watched event, `watched_s = 6000 x watched_fraction(rating)`, completed = liked = rating >= 4."""
    from recloop.data.movielens import DURATION_S, watched_fraction

    users = _movielens_ids("ml_u", df[user_col]) if _USER_COLUMNS[user_col] else df[user_col].astype(str)
    items = _movielens_ids("ml_v", df[item_col]) if _ITEM_COLUMNS[item_col] else df[item_col].astype(str)
    rating = pd.to_numeric(df["rating"], errors="raise").to_numpy(np.float64)
    times = _times(df[time_col]).dt.as_unit("us")
    seconds = (times.astype("int64") // 1_000_000).astype(str)
    events = pd.DataFrame({
        "event_id": "r-" + users.to_numpy(dtype=object) + "-" + items.to_numpy(dtype=object) + "-" + seconds.to_numpy(dtype=object),
        "user_id": users.to_numpy(dtype=object), "video_id": items.to_numpy(dtype=object), "event_time": times.to_numpy(),
        "surface": "ratings", "position": 0, "watched_s": DURATION_S * watched_fraction(rating),
        "completed": rating >= POSITIVE_RATING, "liked": rating >= POSITIVE_RATING,
    })
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True)
    ids = pd.Series(pd.unique(items)).sort_values(kind="stable").reset_index(drop=True)
    meta = _movies_beside(path, ids) if _ITEM_COLUMNS[item_col] else None
    videos = pd.DataFrame({"video_id": ids.to_numpy(), "duration_s": DURATION_S})
    if meta is not None:
        videos = videos.merge(meta, on="video_id", how="left")
    return FileData(path, "ratings", events, _full_videos(videos, events), _users_of(events))


def load_file(path: str | Path, *, videos_path: str | Path | None = None) -> FileData:
    """`_load_file` with every failure to read the user's file as one `EvaluationInputError` naming it."""
    try:
        return _load_file(path, videos_path=videos_path)
    except EvaluationInputError:
        raise
    except (OSError, ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise EvaluationInputError(f"{path}: {err}") from err


def _load_file(path: str | Path, *, videos_path: str | Path | None = None) -> FileData:
    """One file or folder in the canonical tables:

    (a) a MovieLens-format folder (ML-100K, ML-1M/10M, ml-latest; via recloop.data.movielens);
    (b) a CSV or Parquet file of events in the schema of docs/data_schema.md (positives by the recloop
        rule; video metadata and durations from `videos_path`, else a ``videos.parquet`` /
        ``videos.csv`` next to the file, else an events column ``duration_s``, else only completed /
        liked count);
    (c) a ratings CSV / TSV / Parquet with ``user_id,video_id,rating,timestamp`` or MovieLens
        ``userId,movieId,rating,timestamp`` columns (also header-less ``u.data`` / ``ratings.dat`` lines);
        rating >= 4 is a positive. MovieLens ids become ``ml_u{userId}`` / ``ml_v{movieId}`` as in (a),
        and a movies file beside it (movies.csv, movies.dat, u.item) gives titles, genres (the tags) and
        the category (the first genre).
    """
    path = Path(path)
    if path.is_dir():
        from recloop.data.movielens import read_movielens

        tables = read_movielens(path)
        return FileData(path, "movielens", tables["events"].to_pandas(), tables["videos"].to_pandas(),
                        tables["users"].to_pandas())
    if not path.is_file():
        raise EvaluationInputError(f"no such file or folder: {path}")
    df = _read_table(path)
    columns = set(df.columns)
    if "watched_s" in columns:
        missing = [c for c in ("user_id", "video_id", "event_time") if c not in columns]
        if missing:
            raise EvaluationInputError(f"{path}: events file lacks column(s) {missing}")
        videos = _read_table(Path(videos_path)) if videos_path is not None else _videos_beside(path)
        if (videos is None or "duration_s" not in videos.columns) and "duration_s" not in columns:
            log.warning("%s: no video durations; only completed / liked watches count as positives", path)
        df = df.copy()
        df["event_time"] = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
        df["user_id"], df["video_id"] = df["user_id"].astype(str), df["video_id"].astype(str)
        df["watched_s"] = pd.to_numeric(df["watched_s"], errors="coerce")
        if "event_id" not in df.columns:
            df["event_id"] = [f"e{i}" for i in range(len(df))]
        for column, value in (("surface", "unknown"), ("position", 0), ("completed", False), ("liked", False)):
            if column not in df.columns:
                df[column] = value
        if videos is None and "duration_s" in columns:
            videos = df.groupby("video_id", as_index=False)["duration_s"].first()
        return FileData(path, "events", df, _full_videos(videos, df), _users_of(df))
    user_col = next((c for c in _USER_COLUMNS if c in columns), None)
    item_col = next((c for c in _ITEM_COLUMNS if c in columns), None)
    if user_col is None or item_col is None or "rating" not in columns:
        raise EvaluationInputError(
            f"{path}: not an events file (user_id, video_id, event_time, watched_s, ...) nor a ratings file "
            f"(user_id,video_id,rating,timestamp or userId,movieId,rating,timestamp); columns: {sorted(columns)}"
        )
    time_col = "timestamp" if "timestamp" in columns else ("event_time" if "event_time" in columns else None)
    if time_col is None:
        raise EvaluationInputError(f"{path}: a ratings file needs a timestamp column")
    return _ratings_data(path, df, user_col, item_col, time_col)


def load_interactions_file(
    path: str | Path, *, videos_path: str | Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Positive interactions (``user_id, video_id, event_time``) and the videos of one file or folder
    (see `load_file` for what is accepted). The videos are every video of the file (rated or shown,
    positive or not)."""
    data = load_file(path, videos_path=videos_path)
    return data.positives, data.videos


# --- factories and file mode -------------------------------------------------------------------------
def _call_factory(factory: RecommenderFactory, train: pd.DataFrame, videos: pd.DataFrame, valid,
                  data: "FileSplit | None" = None) -> Recommender:
    """`factory(train, videos)`, with `valid=` (validation positives) and `data=` (the files' full tables,
    `FileSplit`) when the factory takes them."""
    try:
        parameters: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes = (lambda name: name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()))
    kwargs: dict[str, object] = {}
    if valid is not None and takes("valid"):
        kwargs["valid"] = valid
    if data is not None and "data" in parameters:
        kwargs["data"] = data
    return factory(train, videos, **kwargs)


def _merge_videos(*frames: pd.DataFrame | None) -> pd.DataFrame:
    present = [f for f in frames if f is not None and len(f)]
    if not present:
        return pd.DataFrame({"video_id": pd.Series([], dtype=object), "category": pd.Series([], dtype=object)})
    merged = pd.concat(present, ignore_index=True)
    merged["video_id"] = merged["video_id"].astype(str)
    if "upload_time" in merged.columns:
        merged = merged.sort_values("upload_time", kind="stable")
    return merged.drop_duplicates("video_id", keep="first").reset_index(drop=True)


@dataclass
class FileSplit:
    """The train / valid / test files of one evaluation, in canonical tables; `split` says whether the
    test comes after train in time ("time") or is drawn from the same period ("random")."""

    train: FileData
    valid: FileData | None
    test: FileData
    videos: pd.DataFrame
    users: pd.DataFrame

    @property
    def split(self) -> str:
        train_end = pd.to_datetime(self.train.events["event_time"], utc=True).max()
        later = [d for d in (self.valid, self.test) if d is not None and len(d.events)]
        starts = [pd.to_datetime(d.events["event_time"], utc=True).min() for d in later]
        return "time" if starts and min(starts) >= train_end else "random"


def _expand(name: str, recommender: Recommender) -> dict[str, Recommender]:
    """A recommender with parts worth scoring alone (the platform's candidate sources) and its parts."""
    parts = getattr(recommender, "components", None)
    return {name: recommender, **{f"{name}/{part}": r for part, r in parts().items()}} if callable(parts) else {name: recommender}


def evaluate_files(
    train_path: str | Path,
    test_path: str | Path,
    *,
    recommenders: Mapping[str, RecommenderFactory] | None = None,
    valid_path: str | Path | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    main_k: int = MAIN_K,
) -> EvaluationResult:
    """Fit every factory (default: the platform's recommender, `PLATFORM`, then :func:`baseline_factories`)
    on the train file and evaluate on the test file, all on the same split; see :func:`load_file` for the
    accepted files. The catalogue is the union of the files' videos; every video a user watched (rated)
    in train or valid is their history: excluded from their lists and their relevant set. With
    `valid_path`, tuned factories tune on it instead of carving validation data from train. The result
    records the files, fit times, tuning, and which recommender is the platform's."""
    train_data = load_file(train_path)
    test_data = load_file(test_path)
    valid_data = load_file(valid_path) if valid_path is not None else None
    train, test = train_data.positives, test_data.positives
    valid = valid_data.positives if valid_data is not None else None
    videos = _catalog_frame(_merge_videos(train_data.videos, valid_data.videos if valid_data else None, test_data.videos),
                            train, test)
    users = pd.concat([d.users for d in (train_data, valid_data, test_data) if d is not None], ignore_index=True)
    users = users.sort_values("signup_time", kind="stable").drop_duplicates("user_id", keep="first")
    data = FileSplit(train_data, valid_data, test_data, videos, users.reset_index(drop=True))
    history = pd.concat([d.watched for d in (train_data, valid_data) if d is not None], ignore_index=True)
    if recommenders is None:
        from recloop.evaluation.platform import PLATFORM, platform_factory

        factories: Mapping[str, RecommenderFactory] = {PLATFORM: platform_factory(), **baseline_factories()}
    else:
        factories = recommenders
    fitted: dict[str, Recommender] = {}
    fit_seconds: dict[str, float] = {}
    platform = None
    for name, factory in factories.items():
        t0 = time.perf_counter()
        rec = _call_factory(factory, train, videos, valid, data)
        fit_seconds[name] = round(time.perf_counter() - t0, 3)
        if getattr(rec, "is_platform", False):
            platform = name
        fitted.update(_expand(name, rec))
        log.info("fitted %s in %.2fs", name, fit_seconds[name])
    split = {
        "kind": "files",
        "order": data.split,
        "train": str(train_path),
        "valid": str(valid_path) if valid_path is not None else None,
        "test": str(test_path),
        "train_interactions": len(train),
        "valid_interactions": len(valid) if valid is not None else None,
        "test_interactions": len(test),
    }
    result = evaluate(fitted, train, test, catalog=videos, ks=ks, exclude_seen=exclude_seen, main_k=main_k,
                      split=split, history=history, platform=platform)
    for name, seconds in fit_seconds.items():
        result["recommenders"][name]["seconds"]["fit"] = seconds
    return result

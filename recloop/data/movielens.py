"""Read MovieLens-format folders into recloop's three canonical tables and land them by day.

Supported layouts, detected from the folder's files:

* ``ml-100k``: ``u.data`` (tab-separated user, item, rating, timestamp), ``u.item`` (``|``-separated,
  latin-1: id, title, release date, video release date, IMDb URL and 19 genre flags) and ``u.user``
  (``id|age|gender|occupation|zip``);
* ``ml-1m`` / ``ml-10m``: ``ratings.dat``, ``movies.dat`` (genres ``A|B``) and, for ML-1M,
  ``users.dat``, all ``::``-separated;
* ``ml-latest`` (also 20M / 25M / 32M): ``ratings.csv`` (userId,movieId,rating,timestamp) and
  ``movies.csv`` (movieId,title,genres); no users file.

The mapping (documented in docs/data_schema.md): each rating becomes one event at the rating time with
``watched_s = 6000 * watched_fraction(rating)`` and ``completed = liked = rating >= 4``; a movie becomes a video of
6000 s whose category is its first genre and whose upload time is its first rating; a user's sign-up
time is their first rating.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recloop.data.schemas import AGE_BUCKETS, EVENTS, TABLE_ORDER, TABLES, USERS, VIDEOS
from recloop.data.simulator import FORMATS, US_PER_DAY, US_PER_S, write_landing_table
from recloop.lake import Lake

LAYOUTS = ("ml-100k", "ml-1m", "ml-latest")
DURATION_S = 6000.0  # MovieLens has no durations: every movie counts as 100 minutes
POSITIVE_RATING = 4.0  # rating >= 4 is a positive engagement (completed and liked)
SURFACE = "ratings"
UNKNOWN = "unknown"
NO_GENRES = "(no genres listed)"

# ML-100K's genre flag columns, in file order. Its "unknown" genre is treated as no genre.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
# ML-1M's users.dat stores an age group code, not an age.
ML1M_AGE_CODES = {1: "13-17", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-54", 50: "45-54", 56: "55+"}

_LAYOUT_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-latest": "ratings.csv"}


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """The layout of the MovieLens folder `path` and the folder that holds its files.

    A folder holding exactly one MovieLens folder (e.g. an unzipped archive's parent) is accepted too.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens folder not found: {root}")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in candidates:
        for layout, marker in _LAYOUT_FILES.items():
            if (folder / marker).is_file():
                return layout, folder
    raise ValueError(
        f"no MovieLens ratings file in {root}: expected u.data (ML-100K), ratings.dat (ML-1M/10M) "
        "or ratings.csv (ml-latest, 20M, 25M)"
    )


# --- low-level readers ------------------------------------------------------------------------------


def _text_bytes(path: Path) -> bytes:
    """The file's content as UTF-8 (MovieLens ships latin-1 in ML-100K/1M, UTF-8 elsewhere)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("latin-1").encode("utf-8")


def _read_delimited(path: Path, names: list[str], delimiter: str, types: dict[str, pa.DataType]) -> pa.Table:
    """A header-less delimited file; ``::`` is turned into a tab first (pyarrow wants one character)."""
    data = _text_bytes(path)
    if delimiter == "::":
        data, delimiter = data.replace(b"::", b"\t"), "\t"
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(types), strings_can_be_null=False
        ),
    )


_RATING_TYPES = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}


def _read_ratings(layout: str, folder: Path) -> pa.Table:
    if layout == "ml-100k":
        return _read_delimited(folder / "u.data", list(_RATING_TYPES), "\t", _RATING_TYPES)
    if layout == "ml-1m":
        return _read_delimited(folder / "ratings.dat", list(_RATING_TYPES), "::", _RATING_TYPES)
    table = pacsv.read_csv(
        folder / "ratings.csv",
        convert_options=pacsv.ConvertOptions(
            column_types={
                "userId": pa.int64(),
                "movieId": pa.int64(),
                "rating": pa.float64(),
                "timestamp": pa.int64(),
            },
            include_columns=["userId", "movieId", "rating", "timestamp"],
        ),
    )
    return table.rename_columns(list(_RATING_TYPES))


def _read_movies(layout: str, folder: Path) -> pd.DataFrame | None:
    """movieId -> title, genres ("A|B", "" when none); None when the layout's movies file is absent."""
    if layout == "ml-100k":
        path = folder / "u.item"
        if not path.is_file():
            return None
        names = ["item", "title", "release", "video_release", "url", *(f"g{i}" for i in range(19))]
        types = {"item": pa.int64(), "title": pa.string(), **{f"g{i}": pa.int8() for i in range(19)}}
        df = _read_delimited(path, names, "|", types).to_pandas()
        # Append each flagged genre, column by column (vectorised over movies). The "unknown" genre
        # (flag 0) means no genre.
        joined = pa.array(np.full(len(df), "", dtype=object), pa.string())
        for i, genre in enumerate(ML100K_GENRES[1:], start=1):
            flagged = pa.array(df[f"g{i}"].to_numpy() == 1)
            appended = pc.if_else(
                pc.equal(joined, ""), pa.scalar(genre), pc.binary_join_element_wise(joined, genre, "|")
            )
            joined = pc.if_else(flagged, appended, joined)
        genres = joined.to_numpy(zero_copy_only=False)
        return pd.DataFrame({"title": df["title"].to_numpy(), "genres": genres}, index=df["item"].to_numpy())
    if layout == "ml-1m":
        path = folder / "movies.dat"
        if not path.is_file():
            return None
        types = {"item": pa.int64(), "title": pa.string(), "genres": pa.string()}
        df = _read_delimited(path, list(types), "::", types).to_pandas()
    else:
        path = folder / "movies.csv"
        if not path.is_file():
            return None
        df = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
                strings_can_be_null=False,
            ),
        ).to_pandas()
        df = df.rename(columns={"movieId": "item"})
    genres = df["genres"].fillna("").astype(str)
    genres = genres.where(genres != NO_GENRES, "")
    return pd.DataFrame(
        {"title": df["title"].fillna("").to_numpy(), "genres": genres.to_numpy()}, index=df["item"].to_numpy()
    )


def watched_fraction(rating: np.ndarray) -> np.ndarray:
    """The share of the movie a rating counts as watched: ``max(rating / 8, (rating - 3) / 2)``.

    Monotone in the rating, and exactly 50 % at the positive threshold 4: recloop's one positive rule
    (`recloop.data.engagement.positive_mask`: completed, liked, or watched at least half of the video)
    then agrees with "rating >= 4 is a positive" — a rating of 3.5 is 44 % of the movie, not a positive;
    4 is 50 %, 4.5 is 75 % and 5 is 100 %. (A plain ``rating / 5`` would make 2.5 a positive watch.)
    """
    r = np.asarray(rating, dtype=np.float64)
    return np.maximum(r / 8.0, (r - 3.0) / 2.0)


TAGS_PER_MOVIE = 8


def read_movie_tags(folder: Path, per_movie: int = TAGS_PER_MOVIE) -> pd.Series | None:
    """movieId -> the movie's most used user tags (ml-latest's `tags.csv`), lowercased, `|` removed, joined
    by `|`; None when the folder has no tags file. Tags are metadata of the movie (who tagged it is not
    kept)."""
    path = folder / "tags.csv"
    if not path.is_file():
        return None
    raw = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"movieId": pa.int64(), "tag": pa.string()}, include_columns=["movieId", "tag"],
        strings_can_be_null=False)).to_pandas()
    tag = raw["tag"].astype(str).str.lower().str.replace("|", " ", regex=False).str.strip()
    counts = pd.DataFrame({"item": raw["movieId"], "tag": tag})[tag != ""].value_counts().reset_index(name="n")
    counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True])
    top = counts.groupby("item", sort=True).head(per_movie)
    return top.groupby("item", sort=True)["tag"].agg("|".join)


def with_user_tags(genres: pd.Series, items: np.ndarray, tags: pd.Series | None) -> pd.Series:
    """The videos' `tags` column: the genres, then the movie's user tags (`read_movie_tags`)."""
    genres = genres.reset_index(drop=True).fillna("").astype(str)
    if tags is None:
        return genres
    extra = tags.reindex(items).fillna("").reset_index(drop=True)
    both = genres + "|" + extra
    return both.str.strip("|")


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Map ages in years to schemas.AGE_BUCKETS ("unknown" below 13 or when missing)."""
    age = np.asarray(age, dtype=np.float64)
    edges = np.array([13, 18, 25, 35, 45, 55], dtype=np.float64)
    labels = np.array([UNKNOWN, *AGE_BUCKETS], dtype=object)
    idx = np.searchsorted(edges, np.nan_to_num(age, nan=-1.0), side="right")
    out = labels[idx]
    out[np.isnan(age)] = UNKNOWN
    return out


def _read_user_ages(layout: str, folder: Path) -> pd.Series | None:
    """userId -> age bucket, or None when the layout has no users file."""
    if layout == "ml-100k" and (folder / "u.user").is_file():
        types = {"user": pa.int64(), "age": pa.int64()}
        df = _read_delimited(folder / "u.user", ["user", "age", "gender", "occupation", "zip"], "|", types)
        df = df.to_pandas()
        return pd.Series(age_bucket(df["age"].to_numpy()), index=df["user"].to_numpy())
    if layout == "ml-1m" and (folder / "users.dat").is_file():
        types = {"user": pa.int64(), "age": pa.int64()}
        names = ["user", "gender", "age", "occupation", "zip"]
        df = _read_delimited(folder / "users.dat", names, "::", types)
        df = df.to_pandas()
        buckets = df["age"].map(ML1M_AGE_CODES).fillna(UNKNOWN)
        return pd.Series(buckets.to_numpy(dtype=object), index=df["user"].to_numpy())
    return None


# --- mapping to the canonical tables ----------------------------------------------------------------


def _first_times(ids: np.ndarray, ts_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and, for each, the earliest timestamp."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    unique, starts = np.unique(sorted_ids, return_index=True)
    return unique, np.minimum.reduceat(ts_us[order], starts)


def _prefixed(prefix: str, values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values, pa.int64()), pa.string()), "")


def _timestamps(us: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), pa.int64()).cast(EVENTS.schema.field("event_time").type)


def read_movielens(path: str | Path) -> dict[str, pa.Table]:
    """The MovieLens folder at `path` as the canonical ``users``, ``videos`` and ``events`` tables.

    Only users and movies that have at least one rating are kept (their sign-up / upload time is their
    first rating). Events are sorted by time, user and movie.
    """
    layout, folder = detect_layout(path)
    ratings = _read_ratings(layout, folder)
    user = ratings["user"].to_numpy()
    item = ratings["item"].to_numpy()
    rating = ratings["rating"].to_numpy()
    ts = ratings["timestamp"].to_numpy()
    del ratings
    ts_us = ts * US_PER_S

    order = np.lexsort((item, user, ts))
    user, item, rating, ts, ts_us = user[order], item[order], rating[order], ts[order], ts_us[order]
    positive = rating >= POSITIVE_RATING
    events = pa.Table.from_arrays(
        [
            pc.binary_join_element_wise(
                "ml",
                *(pc.cast(pa.array(a, pa.int64()), pa.string()) for a in (user, item, ts)),
                "-",
            ),
            _prefixed("ml_u", user),
            _prefixed("ml_v", item),
            _timestamps(ts_us),
            pa.array(np.full(len(user), SURFACE, dtype=object), pa.string()),
            pa.array(np.zeros(len(user), np.int32), pa.int32()),
            pa.array(DURATION_S * watched_fraction(rating), pa.float64()),
            pa.array(positive, pa.bool_()),
            pa.array(positive, pa.bool_()),
        ],
        schema=EVENTS.schema,
    )

    items, first_item = _first_times(item, ts_us)
    movies = _read_movies(layout, folder)
    if movies is None:
        title = np.full(len(items), "", dtype=object)
        genres = pd.Series(np.full(len(items), "", dtype=object))
    else:
        movies = movies[~movies.index.duplicated(keep="first")].reindex(items)
        title = movies["title"].fillna("").to_numpy(dtype=object)
        genres = movies["genres"].fillna("").reset_index(drop=True)
    category = genres.str.partition("|")[0]
    category = category.where(category != "", UNKNOWN)
    tags = with_user_tags(genres, items, read_movie_tags(folder))
    videos = pa.Table.from_arrays(
        [
            _prefixed("ml_v", items),
            pa.array(title, pa.string()),
            pa.array(tags.to_numpy(dtype=object), pa.string()),
            pa.array(category.to_numpy(dtype=object), pa.string()),
            pa.array(np.full(len(items), UNKNOWN, dtype=object), pa.string()),
            pa.array(np.full(len(items), DURATION_S), pa.float64()),
            _timestamps(first_item),
        ],
        schema=VIDEOS.schema,
    )

    users_ids, first_user = _first_times(user, ts_us)
    ages = _read_user_ages(layout, folder)
    if ages is None:
        age = np.full(len(users_ids), UNKNOWN, dtype=object)
    else:
        ages = ages[~ages.index.duplicated(keep="first")]
        age = ages.reindex(users_ids).fillna(UNKNOWN).to_numpy(dtype=object)
    unknown = pa.array(np.full(len(users_ids), UNKNOWN, dtype=object), pa.string())
    users = pa.Table.from_arrays(
        [_prefixed("ml_u", users_ids), unknown, pa.array(age, pa.string()), _timestamps(first_user), unknown],
        schema=USERS.schema,
    )
    return {"users": users, "videos": videos, "events": events}


def write_landing(
    tables: dict[str, pa.Table], landing: Lake, fmt: str = "parquet", *, empty_tables: bool = True,
    on_day: Callable[[str], None] | None = None,
) -> dict:
    """Split each table by the UTC date of its time column and write the days into the landing zone.

    Every date that has any row gets all three tables (users and videos may be empty there: a day
    without sign-ups or uploads is legitimate); with ``empty_tables=False`` a table is written only on
    the dates it has rows (a history import: thousands of empty files would only cost time).
    ``on_day(date)`` is called after each date is written. Returns ``{"rows": {table: rows}, "dates": [...]}``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    split: dict[str, tuple[pa.Table, np.ndarray, np.ndarray]] = {}
    all_days: set[int] = set()
    for name in TABLE_ORDER:
        schema = TABLES[name]
        table = tables[name]
        if not table.schema.equals(schema.schema):
            table = table.select(schema.columns).cast(schema.schema)
        us = table[schema.time_column].cast(pa.int64()).to_numpy(zero_copy_only=False)
        if table[schema.time_column].null_count:
            raise ValueError(f"{name}: {schema.time_column} has null values; cannot assign a date")
        day = us // US_PER_DAY
        order = np.argsort(day, kind="stable")
        table, day = table.take(pa.array(order)), day[order]
        unique, starts = np.unique(day, return_index=True)
        split[name] = (table, unique, starts)
        all_days.update(unique.tolist())

    days = sorted(all_days)
    dates = [str(np.datetime64(d, "D")) for d in days]
    bounds = {name: dict(zip(unique.tolist(), zip(starts.tolist(), [*starts[1:].tolist(), table.num_rows])))
              for name, (table, unique, starts) in split.items()}
    for d, date_str in zip(days, dates):
        for name in TABLE_ORDER:
            lo, hi = bounds[name].get(d, (0, 0))
            if hi > lo or empty_tables:
                write_landing_table(landing, name, date_str, split[name][0].slice(lo, hi - lo), fmt)
        if on_day is not None:
            on_day(date_str)
    return {"rows": {name: tables[name].num_rows for name in TABLE_ORDER}, "dates": dates}


def load_movielens(path: str | Path, landing: Lake, fmt: str = "parquet") -> dict:
    """Read a MovieLens folder and land it: ``write_landing(read_movielens(path), landing, fmt)``."""
    return write_landing(read_movielens(path), landing, fmt)

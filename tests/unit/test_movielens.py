"""The MovieLens adapter: layout detection, the row-by-row mapping and the landing split by day.

Every test writes a tiny MovieLens-format folder by hand; no MovieLens data is downloaded or committed.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recloop.data.movielens import age_bucket, detect_layout, load_movielens, read_movielens, write_landing
from recloop.data.schemas import TABLES
from recloop.lake import LocalLake

# (user, movie, rating, unix timestamp) -- shared by all layouts (the 100K/1M formats have whole stars).
T0 = 978_300_760  # 2000-12-31 22:12:40 UTC
DAY = 86_400
RATINGS = [
    (1, 10, 5.0, T0),
    (1, 20, 3.0, T0 + 60),
    (2, 10, 4.0, T0 + DAY),
    (2, 30, 1.0, T0 + DAY + 5),
    (3, 20, 4.0, T0 + 3 * DAY),
    (1, 30, 2.0, T0 - 100),
]
HALF_STAR = [(4, 10, 4.5, T0 + 2 * DAY), (4, 40, 0.5, T0 + 2 * DAY + 1)]


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def make_ml100k(root):
    folder = root / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{int(r)}\t{t}\n" for u, m, r, t in RATINGS))
    flags = {
        10: ["Animation", "Children's", "Comedy"],
        20: ["Drama"],
        30: [],  # only the "unknown" flag set
    }
    genres = [
        "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
        "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
        "War", "Western",
    ]  # fmt: skip
    titles = {10: "Toy Story (1995)", 20: "Café au lait (1993)", 30: "unknown"}
    lines = []
    for movie, gs in flags.items():
        bits = ["1" if (g in gs or (g == "unknown" and not gs)) else "0" for g in genres]
        lines.append("|".join([str(movie), titles[movie], "01-Jan-1995", "", "http://x.org/"] + bits))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|10|M|student|15213\n")
    return folder


def make_ml1m(root):
    folder = root / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{int(r)}::{t}\n" for u, m, r, t in RATINGS))
    movies = [
        "10::Toy Story (1995)::Animation|Children's|Comedy",
        "20::Café au lait (1993)::Drama",
        '30::"Great Day in Harlem, A" (1994)::Documentary',
    ]
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    return folder


def make_ml_latest(root):
    folder = root / "ml-latest-small"
    folder.mkdir()
    rows = RATINGS + HALF_STAR
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "10,Toy Story (1995),Animation|Children|Comedy\n"
        '20,"American President, The (1995)",Comedy|Drama|Romance\n'
        "30,Café au lait (1993),Drama\n"
        "40,Some Film (2019),(no genres listed)\n"
        "99,Never Rated (2001),Drama\n",
        encoding="utf-8",
    )
    return folder


# --- layout detection -------------------------------------------------------------------------------


def test_detect_layout(tmp_path):
    assert detect_layout(make_ml100k(tmp_path))[0] == "ml-100k"
    assert detect_layout(make_ml1m(tmp_path))[0] == "ml-1m"
    latest = make_ml_latest(tmp_path)
    assert detect_layout(latest)[0] == "ml-latest"
    # a parent holding one MovieLens folder is accepted
    parent = tmp_path / "parent"
    parent.mkdir()
    make_ml1m(parent)
    assert detect_layout(parent) == ("ml-1m", parent / "ml-1m")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="u.data"):
        read_movielens(empty)
    with pytest.raises(FileNotFoundError):
        read_movielens(tmp_path / "missing")


def test_age_bucket():
    got = age_bucket(np.array([7, 13, 17, 18, 24, 25, 44, 45, 54, 55, 73, np.nan]))
    assert list(got) == [
        "unknown", "13-17", "13-17", "18-24", "18-24", "25-34", "35-44", "45-54", "45-54", "55+", "55+",
        "unknown",
    ]  # fmt: skip


# --- the mapping, row by row ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_ml100k, make_ml1m, make_ml_latest])
def test_events_mapping(tmp_path, make):
    tables = read_movielens(make(tmp_path))
    for name, table in tables.items():
        assert table.schema.equals(TABLES[name].schema), name
    ratings = RATINGS + (HALF_STAR if make is make_ml_latest else [])
    events = {row["event_id"]: row for row in tables["events"].to_pylist()}
    assert len(events) == len(ratings)
    for user, movie, rating, ts in ratings:
        row = events[f"ml-{user}-{movie}-{ts}"]
        assert row["user_id"] == f"ml_u{user}"
        assert row["video_id"] == f"ml_v{movie}"
        assert row["event_time"] == utc(ts)
        assert row["surface"] == "ratings"
        assert row["position"] == 0
        assert row["watched_s"] == pytest.approx(6000.0 * max(rating / 8, (rating - 3) / 2))
        assert (row["watched_s"] >= 3000.0) is (rating >= 4)  # the positive rule agrees with rating >= 4
        assert row["completed"] is (rating >= 4) and row["liked"] is (rating >= 4)
    times = tables["events"]["event_time"].to_pylist()
    assert times == sorted(times)


@pytest.mark.parametrize("make", [make_ml100k, make_ml1m, make_ml_latest])
def test_videos_mapping(tmp_path, make):
    tables = read_movielens(make(tmp_path))
    videos = {row["video_id"]: row for row in tables["videos"].to_pylist()}
    rated = {m for _, m, _, _ in RATINGS + (HALF_STAR if make is make_ml_latest else [])}
    assert set(videos) == {f"ml_v{m}" for m in rated}  # movies never rated are dropped
    for movie in rated:
        first = min(t for _, m, _, t in RATINGS + HALF_STAR if m == movie)
        row = videos[f"ml_v{movie}"]
        assert row["upload_time"] == utc(first)
        assert row["duration_s"] == 6000.0
        assert row["creator_id"] == "unknown"
    assert videos["ml_v10"]["title"] == "Toy Story (1995)"
    if make is make_ml_latest:
        assert videos["ml_v10"]["tags"] == "Animation|Children|Comedy"
        assert videos["ml_v20"]["title"] == "American President, The (1995)"
        assert videos["ml_v20"]["category"] == "Comedy"
        assert videos["ml_v30"]["title"] == "Café au lait (1993)"
        assert videos["ml_v40"]["category"] == "unknown" and videos["ml_v40"]["tags"] == ""
    else:
        assert videos["ml_v10"]["tags"] == "Animation|Children's|Comedy"
        assert videos["ml_v10"]["category"] == "Animation"
        assert videos["ml_v20"]["title"] == "Café au lait (1993)"  # latin-1 decoded
        assert videos["ml_v20"]["category"] == "Drama" and videos["ml_v20"]["tags"] == "Drama"
    if make is make_ml100k:
        assert videos["ml_v30"]["category"] == "unknown" and videos["ml_v30"]["tags"] == ""
    if make is make_ml1m:
        assert videos["ml_v30"]["title"] == '"Great Day in Harlem, A" (1994)'
        assert videos["ml_v30"]["category"] == "Documentary"


@pytest.mark.parametrize("make", [make_ml100k, make_ml1m, make_ml_latest])
def test_users_mapping(tmp_path, make):
    tables = read_movielens(make(tmp_path))
    users = {row["user_id"]: row for row in tables["users"].to_pylist()}
    ratings = RATINGS + (HALF_STAR if make is make_ml_latest else [])
    assert set(users) == {f"ml_u{u}" for u, _, _, _ in ratings}
    for user in {u for u, _, _, _ in ratings}:
        row = users[f"ml_u{user}"]
        assert row["signup_time"] == utc(min(t for u, _, _, t in ratings if u == user))
        assert row["device"] == "unknown" and row["country"] == "unknown"
    ages = {u: users[f"ml_u{u}"]["age_bucket"] for u in (1, 2, 3)}
    if make is make_ml100k:
        assert ages == {1: "18-24", 2: "45-54", 3: "unknown"}  # 24, 53, 10 years
    elif make is make_ml1m:
        assert ages == {1: "13-17", 2: "55+", 3: "25-34"}  # age codes 1, 56, 25
    else:
        assert set(ages.values()) == {"unknown"}


def test_no_event_precedes_its_user_or_video(tmp_path):
    tables = read_movielens(make_ml_latest(tmp_path))
    signup = dict(zip(tables["users"]["user_id"].to_pylist(), tables["users"]["signup_time"].to_pylist()))
    upload = dict(zip(tables["videos"]["video_id"].to_pylist(), tables["videos"]["upload_time"].to_pylist()))
    for row in tables["events"].to_pylist():
        assert row["event_time"] >= signup[row["user_id"]]
        assert row["event_time"] >= upload[row["video_id"]]
        assert row["watched_s"] <= 6000.0


def test_ml10m_without_users_file(tmp_path):
    folder = make_ml1m(tmp_path)
    (folder / "users.dat").unlink()
    (folder / "ratings.dat").write_text(
        "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in [(1, 10, 3.5, T0), (2, 20, 4.5, T0 + 1)])
    )
    tables = read_movielens(folder)
    assert tables["events"]["watched_s"].to_pylist() == [2625.0, 4500.0]  # 3.5 -> 44 %, 4.5 -> 75 %
    assert tables["events"]["liked"].to_pylist() == [False, True]
    assert tables["users"]["age_bucket"].to_pylist() == ["unknown", "unknown"]


# --- landing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_landing_splits_by_utc_date(tmp_path, fmt):
    tables = read_movielens(make_ml_latest(tmp_path))
    lake = LocalLake(tmp_path / "landing")
    result = write_landing(tables, lake, fmt=fmt)
    expected_dates = sorted({utc(t).date().isoformat() for _, _, _, t in RATINGS + HALF_STAR})
    assert result["dates"] == expected_dates
    assert result["rows"] == {name: tables[name].num_rows for name in ("users", "videos", "events")}
    total = {"users": 0, "videos": 0, "events": 0}
    for name in total:
        schema = TABLES[name]
        for d in expected_dates:
            data = lake.read_bytes(f"{name}/date={d}/part-0.{fmt}")
            if fmt == "parquet":
                part = pq.read_table(io.BytesIO(data))
            else:
                types = {f.name: f.type for f in schema.schema}
                part = pacsv.read_csv(
                    io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types)
                )
            part = part.cast(schema.schema)
            for t in part[schema.time_column].to_pylist():
                assert t.date().isoformat() == d
            total[name] += part.num_rows
    assert total == result["rows"]
    # day by day: the events of each date are the ratings made that UTC day
    per_day = {d: 0 for d in expected_dates}
    for _, _, _, t in RATINGS + HALF_STAR:
        per_day[utc(t).date().isoformat()] += 1
    if fmt == "parquet":
        assert {d: lake.read_partition("events", d).num_rows for d in expected_dates} == per_day


def test_load_movielens_one_call(tmp_path):
    result = load_movielens(make_ml100k(tmp_path), LocalLake(tmp_path / "landing"))
    assert result["rows"]["events"] == len(RATINGS)
    assert LocalLake(tmp_path / "landing").partitions("events") == result["dates"]


def test_bad_format(tmp_path):
    tables = read_movielens(make_ml100k(tmp_path))
    with pytest.raises(ValueError, match="format"):
        write_landing(tables, LocalLake(tmp_path / "x"), fmt="json")


def test_wrong_schema_tables_are_cast(tmp_path):
    tables = read_movielens(make_ml100k(tmp_path))
    events = tables["events"]
    tables["events"] = events.set_column(
        events.schema.get_field_index("position"), "position", events["position"].cast(pa.int64())
    )
    write_landing(tables, LocalLake(tmp_path / "l"))
    got = LocalLake(tmp_path / "l").read_partition("events", utc(T0).date().isoformat())
    assert got.schema.equals(TABLES["events"].schema)

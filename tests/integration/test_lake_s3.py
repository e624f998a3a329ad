"""The lake's two implementations behave the same: a local folder, and S3 through boto3 against an
S3-compatible server (moto's standalone server on loopback, started by the fixture)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pytest

from recloop.config import REPO_ROOT
from recloop.ingestion import ingest_partition
from recloop.lake import LocalLake, S3Lake, open_lake
from recloop.validation import validate_partition


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path):
    if request.param == "local":
        return LocalLake(tmp_path / "lake")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return open_lake(f"s3://{bucket}/some/prefix", s3_endpoint_url=endpoint)


def test_partition_write_replaces_and_lists(lake):
    t1 = pa.table({"a": [1, 2, 3]})
    w = lake.write_partition("ds", "2025-01-01", t1)
    assert w.rows == 3 and w.bytes > 0
    lake.write_partition("ds", "2025-01-02", pa.table({"a": [4]}))
    # a stray file in a partition is removed when the partition is written again
    lake.write_bytes("ds/date=2025-01-01/stale.parquet", b"junk")
    lake.write_partition("ds", "2025-01-01", pa.table({"a": [9, 8]}))
    assert lake.read_partition("ds", "2025-01-01").column("a").to_pylist() == [9, 8]
    assert lake.list_keys("ds/date=2025-01-01/") == ["ds/date=2025-01-01/part-0.parquet"]
    assert lake.partitions("ds") == ["2025-01-01", "2025-01-02"]
    assert lake.has_partition("ds", "2025-01-02") and not lake.has_partition("ds", "2025-01-03")
    assert lake.delete_partition("ds", "2025-01-02") == 1
    assert lake.partitions("ds") == ["2025-01-01"]
    with pytest.raises(FileNotFoundError):
        lake.read_partition("ds", "2025-01-05")


def test_s3_uri_and_keys(s3_bucket):
    endpoint, bucket = s3_bucket
    lake = open_lake(f"s3://{bucket}/p", s3_endpoint_url=endpoint)
    assert isinstance(lake, S3Lake)
    assert lake.write_bytes("x/y.txt", b"hi") == f"s3://{bucket}/p/x/y.txt"
    assert lake.exists("x/y.txt") and not lake.exists("x/z.txt")
    assert lake.read_bytes("x/y.txt") == b"hi"
    with pytest.raises(FileNotFoundError):
        lake.read_bytes("x/z.txt")


def test_ingest_and_validate_on_s3(s3_bucket):
    """The same ingestion and GX validation code paths with landing zone and lake both on S3."""
    endpoint, bucket = s3_bucket
    landing = open_lake(f"s3://{bucket}/landing", s3_endpoint_url=endpoint)
    lake = open_lake(f"s3://{bucket}/lake", s3_endpoint_url=endpoint)
    day = "2025-01-02"
    landing.write_bytes(f"users/date={day}/part-0.csv", b"user_id,country,age_bucket,signup_time,device\nu1,US,25-34,2025-01-02T01:00:00Z,ios\n")
    landing.write_bytes(
        f"videos/date={day}/part-0.csv",
        b"video_id,title,tags,category,creator_id,duration_s,upload_time\nv1,T,a|b,pets,c1,100,2025-01-01T00:00:00Z\n",
    )
    landing.write_bytes(
        f"events/date={day}/part-0.csv",
        b"event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked\n"
        b"e1,u1,v1,2025-01-02T10:00:00Z,home,0,50,false,true\n"
        b"e2,u1,v1,2025-01-02T10:05:00Z,home,1,500,true,false\n",
    )
    at = datetime(2025, 1, 3, tzinfo=timezone.utc)
    for table in ("users", "videos", "events"):
        ingest_partition(table, day, landing=landing, lake=lake, ingested_at=at)
        validate_partition(lake, table, day, expectations_dir=REPO_ROOT / "expectations")
    # twice: a re-run replaces, never duplicates
    ingest_partition("events", day, landing=landing, lake=lake, ingested_at=at)
    result = validate_partition(lake, "events", day, expectations_dir=REPO_ROOT / "expectations")
    assert (result.ingested, result.accepted, result.quarantined) == (2, 1, 1)
    assert result.accepted_written.uri == f"s3://{bucket}/lake/silver/events/date={day}/part-0.parquet"
    assert lake.read_partition("silver/events", day).column("event_id").to_pylist() == ["e1"]
    assert "over the video's duration" in lake.read_partition("quarantine/events", day).column("reason")[0].as_py()

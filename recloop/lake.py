"""The lake: where every stage keeps its daily partitions as Parquet.

One interface, two implementations: `LocalLake` (a folder, the embedded default) and `S3Lake` (a bucket
and prefix reached through boto3). Datasets are laid out Hive-style,
`<dataset>/date=YYYY-MM-DD/part-0.parquet`, and a partition is always written whole: writing it again
replaces what was there, so re-running a step never duplicates or drops rows.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

PART_FILE = "part-0.parquet"


@dataclass(frozen=True)
class WrittenPartition:
    """What a partition write produced: where, how many rows, how many bytes."""

    uri: str
    rows: int
    bytes: int


def partition_key(dataset: str, partition: str) -> str:
    return f"{dataset}/date={partition}"


class Lake(ABC):
    """Daily-partitioned Parquet datasets under one root."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI of `key` (a dataset, partition or file path relative to the root)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> str:
        """Store `data` at `key`, replacing any object there. Returns its URI."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The bytes stored at `key`; FileNotFoundError when there are none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at `key`."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Keys of all objects below `prefix`, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object below `prefix`. Returns how many were deleted."""

    @abstractmethod
    def _replace_partition_files(self, prefix: str, files: dict[str, bytes]) -> None:
        """Make `files` (name -> bytes) the whole content of `prefix`, as atomically as the store allows."""

    # --- partitions -------------------------------------------------------------------------------

    def write_partition(self, dataset: str, partition: str, table: pa.Table, **parquet: object) -> WrittenPartition:
        """Write `table` as the whole of `dataset`'s `partition`, replacing any earlier content. `parquet`
        options go to `pyarrow.parquet.write_table` (default: zstd compression)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **{"compression": "zstd", **parquet})
        data = buf.getvalue()
        prefix = partition_key(dataset, partition)
        self._replace_partition_files(prefix, {PART_FILE: data})
        return WrittenPartition(uri=self.uri(f"{prefix}/{PART_FILE}"), rows=table.num_rows, bytes=len(data))

    def replace_partition(self, dataset: str, partition: str, files: dict[str, bytes]) -> list[str]:
        """Make `files` (name -> bytes) the whole content of `dataset`'s `partition`. Returns their URIs."""
        prefix = partition_key(dataset, partition)
        self._replace_partition_files(prefix, files)
        return [self.uri(f"{prefix}/{name}") for name in files]

    @contextmanager
    def partition_writer(self, dataset: str, partition: str, schema: pa.Schema, **parquet: Any) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer of `schema` whose file becomes the whole of `dataset`'s `partition` when the
        block ends without an error (replacing any earlier content, as `write_partition` does); on an
        error, nothing changes. Rows are written batch by batch, so a partition larger than memory can
        be written. `parquet` options go to `pyarrow.parquet.ParquetWriter` (default: zstd)."""
        prefix = partition_key(dataset, partition)
        tmp = self._staging_file(prefix)
        try:
            with pq.ParquetWriter(str(tmp), schema, **{"compression": "zstd", **parquet}) as writer:
                yield writer
            self._commit_partition_file(prefix, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt_partition_file(self, dataset: str, partition: str, path: Path) -> WrittenPartition:
        """Make the finished local Parquet file `path` (written by another engine, e.g. Spark) the whole of
        `dataset`'s `partition` as `part-0.parquet`, replacing any earlier content as `write_partition` does:
        in a local lake a rename (`path` is moved) when it is on the lake's file system, an upload in S3."""
        rows = pq.ParquetFile(path).metadata.num_rows
        self._commit_partition_file(partition_key(dataset, partition), Path(path))
        return self.partition_written(dataset, partition, rows)

    def partition_written(self, dataset: str, partition: str, rows: int) -> WrittenPartition:
        """What a finished `partition_writer` block wrote: its file's URI and size, and `rows`."""
        key = f"{partition_key(dataset, partition)}/{PART_FILE}"
        return WrittenPartition(uri=self.uri(key), rows=rows, bytes=self.size(key))

    def _staging_file(self, prefix: str) -> Path:
        """A local temporary path for a partition file being written."""
        fd, name = tempfile.mkstemp(prefix="recloop-partition-", suffix=".parquet.tmp")
        os.close(fd)
        return Path(name)

    def _commit_partition_file(self, prefix: str, path: Path) -> None:
        """Make the finished local Parquet file `path` the whole content of `prefix`."""
        self._replace_partition_files(prefix, {PART_FILE: path.read_bytes()})

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        """A local path holding the bytes of `key` for the block (the file itself in a local lake, a
        temporary download otherwise): large files are read from disk, never loaded whole."""
        fd, name = tempfile.mkstemp(prefix="recloop-input-")
        try:
            with os.fdopen(fd, "wb") as f:
                self._download(key, f)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def _download(self, key: str, out: Any) -> None:
        out.write(self.read_bytes(key))

    def size(self, key: str) -> int:
        """The size in bytes of the object at `key`."""
        return len(self.read_bytes(key))

    def read_partition(self, dataset: str, partition: str) -> pa.Table:
        """The table stored in `dataset`'s `partition`; FileNotFoundError when it was never written."""
        prefix = partition_key(dataset, partition)
        keys = [k for k in self.list_keys(prefix + "/") if k.endswith(".parquet")]
        if not keys:
            raise FileNotFoundError(f"no partition {partition} in dataset {dataset!r} at {self.uri(prefix)}")
        # ParquetFile.read: the same table as pq.read_table, without the datasets layer (2x faster on the
        # small partitions a long history has thousands of)
        tables = [pq.ParquetFile(pa.BufferReader(self.read_bytes(k))).read() for k in keys]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def has_partition(self, dataset: str, partition: str) -> bool:
        return any(k.endswith(".parquet") for k in self.list_keys(partition_key(dataset, partition) + "/"))

    def partitions(self, dataset: str) -> list[str]:
        """The partitions of `dataset` that hold data, sorted."""
        found = set()
        for key in self.list_keys(dataset.rstrip("/") + "/"):
            for part in key.split("/"):
                if part.startswith("date=") and key.endswith(".parquet"):
                    found.add(part.removeprefix("date="))
        return sorted(found)

    def delete_partition(self, dataset: str, partition: str) -> int:
        return self.delete_prefix(partition_key(dataset, partition) + "/")

    def local_path(self, key: str) -> Path | None:
        """A local filesystem path for `key` when the lake is a folder (DuckDB reads it directly)."""
        return None


class LocalLake(Lake):
    """A lake in a local folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalLake({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the lake root {self.root}")
        return path

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def write_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        yield path

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def _staging_file(self, prefix: str) -> Path:
        # Beside the partition (same file system, so the commit is a rename); hidden from listings.
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.parquet.tmp")

    def _commit_partition_file(self, prefix: str, path: Path) -> None:
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            os.replace(path, staging / PART_FILE)
            self._swap_in(target, staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _swap_in(self, target: Path, staging: Path) -> None:
        if target.exists():
            old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix.rstrip("/")]
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            base.unlink()
            return 1
        if not base.is_dir():
            return 0
        count = sum(1 for p in base.rglob("*") if p.is_file())
        shutil.rmtree(base)
        return count

    def _replace_partition_files(self, prefix: str, files: dict[str, bytes]) -> None:
        # Write the new partition beside the old one, then swap directories: a reader sees either the
        # old partition or the new one, never a mix, and a crash mid-write leaves the old one intact.
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            self._swap_in(target, staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


class S3Lake(Lake):
    """A lake in an S3 bucket (or any S3-compatible store) under a prefix, through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: object | None = None,
    ) -> None:
        import boto3  # imported here: the local lake does not need it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    @classmethod
    def from_uri(cls, uri: str, *, endpoint_url: str | None = None) -> "S3Lake":
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    def __repr__(self) -> str:
        return f"S3Lake({self.uri()!r})"

    def _key(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}".rstrip("/")

    def write_bytes(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(self.uri(key)) from None
        return obj["Body"].read()

    def _download(self, key: str, out: Any) -> None:
        try:
            self.client.download_fileobj(self.bucket, self._key(key), out)
        except Exception as err:  # noqa: BLE001 - botocore's ClientError for a missing key
            if not self.exists(key):
                raise FileNotFoundError(self.uri(key)) from err
            raise

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def _commit_partition_file(self, prefix: str, path: Path) -> None:
        # One streamed upload (multipart for a large file), then the partition's other objects go.
        key = f"{prefix}/{PART_FILE}"
        self.client.upload_file(str(path), self.bucket, self._key(key))
        for stale in self.list_keys(prefix + "/"):
            if stale != key:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(stale))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list_keys(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
            )
        return len(keys)

    def _replace_partition_files(self, prefix: str, files: dict[str, bytes]) -> None:
        # S3 has no directory rename: put the new objects (same names overwrite in one PUT each), then
        # delete whatever else the partition held, so a re-run never leaves stale parts behind.
        written = set()
        for name, data in files.items():
            self.write_bytes(f"{prefix}/{name}", data)
            written.add(f"{prefix}/{name}")
        stale = [k for k in self.list_keys(prefix + "/") if k not in written]
        for key in stale:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def local_partition_files(lake: Lake, dataset: str) -> dict[str, list[str]] | None:
    """Local Parquet paths of every partition of `dataset` (one listing); None when the lake is not local."""
    if lake.local_path("") is None:
        return None
    out: dict[str, list[str]] = {}
    for key in lake.list_keys(dataset.rstrip("/") + "/"):
        if not key.endswith(".parquet"):
            continue
        part = next((p.removeprefix("date=") for p in key.split("/") if p.startswith("date=")), None)
        if part is not None:
            out.setdefault(part, []).append(str(lake.local_path(key)))
    return out


def register_partitions(
    con: Any, name: str, lake: Lake, dataset: str, partitions: Sequence[str],
    schema: pa.Schema, files: dict[str, list[str]] | None,
) -> None:
    """`partitions` of `dataset` as the DuckDB view `name` (columns of `schema`), with each row's partition
    day as column `_p` (DATE). `files` is `local_partition_files(lake, dataset)`, listed once by the caller
    (DuckDB reads the local files directly); None reads the partitions through the lake (S3)."""
    columns = ", ".join(f'"{c}"' for c in schema.names)
    paths = [f for p in partitions for f in files.get(p, [])] if files is not None else []
    if paths:
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in paths)
        con.execute(
            f"CREATE TEMP VIEW {name} AS SELECT {columns}, "
            f"CAST(regexp_extract(filename, 'date=(\\d{{4}}-\\d{{2}}-\\d{{2}})', 1) AS DATE) AS _p "
            f"FROM read_parquet([{listing}], hive_partitioning = false, filename = true)"
        )
        return
    tables = []
    if files is None:
        for p in partitions:
            t = lake.read_partition(dataset, p).select(schema.names).cast(schema)
            tables.append(t.append_column("_p", pa.array([date.fromisoformat(p)] * t.num_rows, pa.date32())))
    table = pa.concat_tables(tables) if tables else schema.empty_table().append_column("_p", pa.array([], pa.date32()))
    con.register(f"{name}_arrow", table)
    con.execute(f"CREATE TEMP VIEW {name} AS SELECT {columns}, _p FROM {name}_arrow")


def open_lake(uri: str, *, s3_endpoint_url: str | None = None) -> Lake:
    """The lake at `uri`: `s3://bucket/prefix` for S3, anything else is a local folder."""
    if uri.startswith("s3://"):
        return S3Lake.from_uri(uri, endpoint_url=s3_endpoint_url)
    return LocalLake(uri)

"""Feast's DuckDB offline store, reading `s3://` file sources through Arrow's own S3 client.

Feast's `duckdb` offline store (ibis on DuckDB) reads a `FileSource` with DuckDB's `read_parquet`, which
for an `s3://` path needs DuckDB's `httpfs` extension. The DuckDB wheel does not bundle it: DuckDB
downloads it from its extension site at run time, which a locked-down deployment (or this project's CI)
cannot reach, and no `httpfs` package exists on PyPI for DuckDB 2.0. Feast's `dask` offline store needs
`s3fs`, whose `aiobotocore` pins `botocore` below the version `boto3` (the lake) runs on.

This store is Feast's DuckDB store with one change: an `s3://` source is opened as a lazy
`pyarrow.dataset` over Arrow's S3 filesystem (compiled into the pyarrow wheel; credentials from the
AWS chain: `AWS_*` variables, profile, instance role) at the source's `s3_endpoint_override` (MinIO,
moto) and handed to DuckDB, which scans it with projection and filter push-down. Every other source,
the retrieval SQL, deduplication and point-in-time joins are Feast's own.

Selected in `feature_store.yaml` by `offline_store: type: recloop.feast_offline.S3DuckDBOfflineStore`;
`recloop.features` swaps it in when the lake is on S3.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import datetime
from typing import Any, List, Optional, Union

import ibis
import pandas as pd
import pyarrow
from feast.data_format import ParquetFormat
from feast.data_source import DataSource
from feast.feature_view import FeatureView
from feast.infra.offline_stores import duckdb as feast_duckdb
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from ibis.expr.types import Table
from pydantic import StrictStr

STORE_TYPE = "recloop.feast_offline.S3DuckDBOfflineStore"
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def s3_filesystem(
    endpoint_override: str | None,
    region: str | None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
) -> pyarrow.fs.S3FileSystem:
    """Arrow's S3 filesystem for an endpoint (None = AWS). Keys None = the AWS credential chain."""
    from pyarrow import fs

    kwargs: dict[str, Any] = {}
    if endpoint_override:
        kwargs["endpoint_override"] = endpoint_override
    if region:
        kwargs["region"] = region
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    return fs.S3FileSystem(**kwargs)


def _source_filesystem(source: FileSource) -> pyarrow.fs.S3FileSystem:
    creds = source.resolve_credentials() or {}
    endpoint = source.s3_endpoint_override or os.environ.get("RECLOOP_S3_ENDPOINT_URL") or None
    region = creds.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return s3_filesystem(
        endpoint,
        region,
        creds.get("AWS_ACCESS_KEY_ID"),
        creds.get("AWS_SECRET_ACCESS_KEY"),
        creds.get("AWS_SESSION_TOKEN"),
    )


def read_s3_parquet(source: FileSource) -> Table:
    """An `s3://bucket/prefix` Parquet source (one file or a folder of them) as a lazy ibis table."""
    import pyarrow.dataset as ds

    path = source.path.removeprefix("s3://").rstrip("/")
    dataset = ds.dataset(path, filesystem=_source_filesystem(source), format="parquet")
    if not dataset.files:
        raise FileNotFoundError(f"no Parquet files under {source.path}")
    return ibis.memtable(dataset)


def read_data_source(data_source: DataSource, repo_path: str) -> Table:
    """Feast's DuckDB reader, except for `s3://` Parquet file sources (read through Arrow's S3)."""
    if isinstance(data_source, FileSource) and data_source.path.startswith("s3://") and (
        data_source.file_format is None or isinstance(data_source.file_format, ParquetFormat)
    ):
        return read_s3_parquet(data_source)
    return feast_duckdb._read_data_source(data_source, repo_path)


class S3DuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: StrictStr = STORE_TYPE


class S3DuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with `s3://` file sources read through Arrow's S3 filesystem."""

    def validate_data_source(self, config: RepoConfig, data_source: DataSource) -> None:
        """`feast apply`'s source check, at the source's own endpoint.

        Feast's `FileSource.validate` opens `s3://` paths with `FileSystem.from_uri`, which ignores
        `s3_endpoint_override` and asks AWS for the bucket's region (retrying for seconds where AWS is
        out of reach, then only warning). Here the same check (the path exists, the timestamp column is
        there; a warning otherwise, as in Feast, since `apply` may run before the first snapshot) goes to
        the configured endpoint."""
        if not (isinstance(data_source, FileSource) and data_source.path.startswith("s3://")):
            return super().validate_data_source(config, data_source)
        import pyarrow.dataset as ds

        path = data_source.path.removeprefix("s3://").rstrip("/")
        try:
            dataset = ds.dataset(path, filesystem=_source_filesystem(data_source), format="parquet")
            if not dataset.files:
                logger.warning("FileSource %s holds no Parquet files yet", data_source.path)
            elif data_source.timestamp_field and data_source.timestamp_field not in dataset.schema.names:
                logger.warning("Timestamp field %r not found in FileSource %s; columns: %s",
                               data_source.timestamp_field, data_source.path, dataset.schema.names)
        except Exception as err:  # noqa: BLE001 - Feast's own check only warns too
            logger.warning("Could not validate FileSource %s: %s", data_source.path, err)

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: List[str],
        feature_name_columns: List[str],
        timestamp_field: str,
        created_timestamp_column: Optional[str],
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        return pull_latest_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            **_ibis_io(config),
        )

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: List[FeatureView],
        feature_refs: List[str],
        entity_df: Union[pd.DataFrame, str],
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        return get_historical_features_ibis(
            config=config,
            feature_views=feature_views,
            feature_refs=feature_refs,
            entity_df=entity_df,
            registry=registry,
            project=project,
            full_feature_names=full_feature_names,
            **_ibis_io(config),
            filter_by_created_timestamp=filter_by_created_timestamp,
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: List[str],
        feature_name_columns: List[str],
        timestamp_field: str,
        created_timestamp_column: Optional[str] = None,
        start_date: Optional[datetime] = None,
        end_date: Optional[datetime] = None,
    ) -> RetrievalJob:
        return pull_all_from_table_or_query_ibis(
            config=config,
            data_source=data_source,
            join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns,
            timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column,
            start_date=start_date,
            end_date=end_date,
            **_ibis_io(config),
        )


def _ibis_io(config: RepoConfig) -> dict[str, Any]:
    """What the three overrides hand Feast's ibis functions: this module's reader, Feast's DuckDB writer,
    the staging location (the only difference from `DuckDBOfflineStore` is the reader)."""
    return {
        "data_source_reader": read_data_source,
        "data_source_writer": feast_duckdb._write_data_source,
        "staging_location": config.offline_store.staging_location,
        "staging_location_endpoint_override": config.offline_store.staging_location_endpoint_override,
    }


__all__ = ["STORE_TYPE", "S3DuckDBOfflineStore", "S3DuckDBOfflineStoreConfig", "read_data_source"]

"""The feature snapshots on Spark: the same point-in-time snapshots as the DuckDB engine (`recloop.features`),
computed by Spark SQL over the silver Parquet partitions and written as the same
`features/<view>/date=D/part-0.parquet` partitions, so Feast and everything downstream are unchanged.

Selected by `RECLOOP_FEATURE_ENGINE=spark` (`recloop.features.compute_features` and `compute_features_range`
dispatch here), on the master `RECLOOP_SPARK_MASTER` (default `local[2]`: this machine's two cores; a
`spark://`, `yarn` or `k8s://` master runs the same jobs on a cluster, docs/deployment.md).

How it computes (definitions: `recloop.features`' docstring). An event of day `ed` in partition `p` counts
for snapshot day `d` exactly when `d - 27 <= ed, p <= d` (the window `[d-27 00:00, d+1 00:00)` and the
partitions read for `d`), its 1-day window when `ed = d`, its 7-day window when `ed >= d - 6`. So the events
are first aggregated at the grain (key, `ed`, `p`), each group is spread over the snapshot days it counts
for, and summed per (`d`, key): the work grows with the distinct (key, day) pairs, not with events x 28.
Videos known at `d`: accepted in a partition `<= d` and uploaded before `d+1 00:00`; a video delivered
twice keeps its latest row (as the DuckDB engine's `redelivered` path does). Floating-point sums are added
in another order than DuckDB's: values agree to ~1e-12 (tests/integration/test_spark_features.py).

Spark reads the lake's files itself and writes each view's snapshots with `partitionBy("date")` into a
staging folder beside the lake's datasets; each day's single file is then moved into place (a rename), so a
rerun replaces the partition as the DuckDB engine's writes do. A lake on S3 needs Hadoop's `s3a` file
system (`hadoop-aws` and its AWS SDK on the cluster's classpath), which the pyspark wheel does not bring:
it is refused with a message saying so.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from recloop.config import SettingsError
from recloop.data.schemas import EVENTS, VIDEOS
from recloop.lake import Lake, WrittenPartition

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[2]"
MIN_JAVA = 17
# Shuffle partitions of a local master (Spark's default, 200, is meant for a cluster); adaptive query
# execution coalesces them further.
LOCAL_SHUFFLE_PARTITIONS = 8
_DAY_US = "86400000000D"  # a Spark SQL DOUBLE literal (86400000000.0 would be a DECIMAL)


class SparkUnavailable(SettingsError):
    """RECLOOP_FEATURE_ENGINE=spark cannot run here: pyspark or Java is missing, or the lake is out of reach."""

    def __init__(self, message: str) -> None:
        super().__init__(os.environ.get("RECLOOP_ENV") or "local", [f"RECLOOP_FEATURE_ENGINE=spark: {message}"])


# --------------------------------------------------------------------------------------------------
# The session: one per process
# --------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_SESSION: "SparkSession | None" = None
# Spark's own logging: warnings only while the JVM starts (an error-level root makes Spark's shell logic print
# a notice about the level), without the usual start-up notices; errors only once the session runs.
_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
"""


def java_version(java: str) -> int | None:
    """The major version `java -version` reports (17 for "17.0.15", 8 for "1.8.0_392"); None if it fails."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


_CHECKED: list[str] = []  # the Java found fit, once per process and JAVA_HOME


def check_available() -> None:
    """Raise `SparkUnavailable` (a clear message, no traceback in the CLI) unless pyspark and Java 17+ are here."""
    import importlib.util

    if os.environ.get("JAVA_HOME", "") in _CHECKED:
        return

    if importlib.util.find_spec("pyspark") is None:
        raise SparkUnavailable('the Python package pyspark is not installed: pip install -c constraints.txt -e ".[spark]" '
                               "(or set RECLOOP_FEATURE_ENGINE=duckdb)")
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no `java` on PATH"
        raise SparkUnavailable(f"Spark needs Java {MIN_JAVA} or newer and {where}: install a JRE "
                               "(Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    version = java_version(java)
    if version is None or version < MIN_JAVA:
        raise SparkUnavailable(f"Spark needs Java {MIN_JAVA} or newer; {java} is "
                               f"{'of unknown version' if version is None else f'Java {version}'}")
    _CHECKED.append(java_home or "")


def session(master: str = DEFAULT_MASTER, conf: dict[str, str] | None = None) -> "SparkSession":
    """This process's Spark session (created on first use, stopped at exit): UTC session time zone, Parquet
    timestamps in microseconds, zstd, Spark's logging at ERROR. A local master gets few shuffle partitions and
    no UI. Spark settings beyond these come from Spark's own configuration (SPARK_CONF_DIR) or `conf`, given
    by the first call (`spark.driver.extraJavaOptions` there is added to the logging option)."""
    global _SESSION
    with _LOCK:
        if _SESSION is not None and _SESSION.sparkContext._jsc is not None:
            if _SESSION.sparkContext.master != master:
                raise SparkUnavailable(f"this process already runs Spark on {_SESSION.sparkContext.master}, "
                                       f"not {master} (one session per process)")
            return _SESSION
        check_available()
        local = master.startswith("local")
        if local:
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no "hostname resolves to a loopback" warning
        log4j = Path(tempfile.gettempdir()) / "recloop-spark-log4j2.properties"
        if not log4j.is_file() or log4j.read_text() != _LOG4J:
            tmp = log4j.with_name(f".{log4j.name}.{os.getpid()}")
            tmp.write_text(_LOG4J)
            os.replace(tmp, log4j)
        from pyspark.sql import SparkSession

        builder = (SparkSession.builder.master(master).appName("recloop-features")
                   .config("spark.sql.session.timeZone", "UTC")
                   .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
                   .config("spark.sql.parquet.compression.codec", "zstd")
                   .config("spark.ui.showConsoleProgress", "false"))
        conf = dict(conf or {})
        java_options = f"-Dlog4j2.configurationFile=file:{log4j} {conf.pop('spark.driver.extraJavaOptions', '')}"
        builder = builder.config("spark.driver.extraJavaOptions", java_options.strip())
        if local:
            builder = (builder.config("spark.sql.shuffle.partitions", str(LOCAL_SHUFFLE_PARTITIONS))
                       .config("spark.ui.enabled", "false"))
        for key, value in conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        _SESSION = spark
        atexit.register(stop)
        return spark


def stop() -> None:
    """Stop this process's Spark session (and its JVM's work), if one runs."""
    global _SESSION
    with _LOCK:
        if _SESSION is not None:
            try:
                _SESSION.stop()
            finally:
                _SESSION = None


def jvm_pid() -> int | None:
    """The process id of the local JVM behind the session (None without one): its memory is the engine's."""
    if _SESSION is None:
        return None
    proc = getattr(_SESSION.sparkContext._gateway, "proc", None)
    return getattr(proc, "pid", None)


# --------------------------------------------------------------------------------------------------
# The queries
# --------------------------------------------------------------------------------------------------

# `ev`: silver events with their event day `ed` and partition day `p`. `_SPREAD` gives a group of (key, ed,
# p) the snapshot days it counts for: d in [max(ed, p), min(ed, p) + 27], within the range asked for.
_EV_SQL = """
SELECT user_id, video_id, event_time, watched_s,
       coalesce(completed, false) AS completed,
       coalesce(liked, false) AS liked,
       watched_s > 0 AS watched,
       CAST(event_time AS DATE) AS ed,
       _p AS p
FROM events_src
"""
_LO = "greatest(ed, p, DATE'{first}')"
_HI = "least(date_add(least(ed, p), 27), DATE'{last}')"


def _spread(grain: str) -> str:
    """`grain` (a query of groups with `ed`, `p`) spread over its snapshot days, joined with `snaps`."""
    return f"""
SELECT s.d, s.snap, g.*
FROM (SELECT *, explode(sequence({_LO}, {_HI})) AS sd FROM ({grain}) WHERE {_LO} <= {_HI}) g
JOIN snaps s ON s.d = g.sd
"""


_USER_GRAIN = """
SELECT user_id, ed, p,
       count(*) AS n, count_if(watched) AS w, sum(watched_s) AS ws,
       count_if(watched AND completed) AS wc, count_if(liked) AS l,
       max(CASE WHEN watched THEN event_time END) AS last_watch
FROM ev GROUP BY user_id, ed, p
"""
_VIDEO_GRAIN = """
SELECT video_id, ed, p,
       count(*) AS n, count_if(watched) AS w, sum(watched_s) AS ws,
       count_if(watched AND completed) AS wc, count_if(liked) AS l
FROM ev GROUP BY video_id, ed, p
"""
_WATCH_GRAIN = """
SELECT user_id, video_id, ed, p, count(*) AS w, sum(watched_s) AS ws
FROM ev WHERE watched GROUP BY user_id, video_id, ed, p
"""

_IN_1D = "ed = d"
_IN_7D = "ed >= date_sub(d, 6)"

_USER_ACTIVITY_SQL = f"""
SELECT d, snap, user_id,
       sum(CASE WHEN {_IN_1D} THEN n ELSE 0 END)                        AS impressions_1d,
       sum(CASE WHEN {_IN_7D} THEN n ELSE 0 END)                        AS impressions_7d,
       sum(n)                                                           AS impressions_28d,
       sum(CASE WHEN {_IN_1D} THEN w ELSE 0 END)                        AS watches_1d,
       sum(CASE WHEN {_IN_7D} THEN w ELSE 0 END)                        AS watches_7d,
       sum(w)                                                           AS watches_28d,
       coalesce(sum(CASE WHEN {_IN_1D} THEN ws END), 0D)                AS watch_s_1d,
       coalesce(sum(CASE WHEN {_IN_7D} THEN ws END), 0D)                AS watch_s_7d,
       coalesce(sum(ws), 0D)                                            AS watch_s_28d,
       coalesce(sum(wc) / nullif(sum(w), 0), 0D)                        AS completion_rate_28d,
       sum(l) / sum(n)                                                  AS like_rate_28d,
       coalesce(CAST(unix_micros(snap) - unix_micros(max(last_watch)) AS DOUBLE) / {_DAY_US}, 28D)
                                                                        AS days_since_last_watch,
       size(collect_set(CASE WHEN w > 0 THEN ed END))                   AS active_days_28d
FROM ({_spread(_USER_GRAIN)})
GROUP BY d, snap, user_id
"""

# Videos known at each snapshot day: accepted in a partition up to the day, uploaded before the snapshot;
# a video delivered more than once keeps its latest row as of the day.
_VID_SQL = """
SELECT d, snap, video_id, category, duration_s, upload_time FROM (
    SELECT s.d, s.snap, v.video_id, v.category, v.duration_s, v.upload_time,
           row_number() OVER (PARTITION BY s.d, v.video_id ORDER BY v.upload_time DESC) AS rn
    FROM snaps s JOIN videos_src v ON v.upload_time < s.snap AND v._p <= s.d
    WHERE v.video_id IS NOT NULL
) WHERE rn = 1
"""

_VIDEO_POPULARITY_SQL = f"""
WITH agg AS (
    SELECT d, video_id,
           sum(CASE WHEN {_IN_1D} THEN n ELSE 0 END)                    AS impressions_1d,
           sum(CASE WHEN {_IN_7D} THEN n ELSE 0 END)                    AS impressions_7d,
           sum(n)                                                       AS impressions_28d,
           sum(CASE WHEN {_IN_1D} THEN w ELSE 0 END)                    AS watches_1d,
           sum(CASE WHEN {_IN_7D} THEN w ELSE 0 END)                    AS watches_7d,
           sum(w)                                                       AS watches_28d,
           coalesce(sum(CASE WHEN {_IN_7D} THEN ws END), 0D)            AS watch_s_7d,
           coalesce(sum(ws), 0D)                                        AS watch_s_28d,
           sum(wc)                                                      AS completions_28d,
           sum(l)                                                       AS likes_28d
    FROM ({_spread(_VIDEO_GRAIN)})
    GROUP BY d, video_id
)
SELECT vid.d, vid.snap, vid.video_id,
       coalesce(agg.impressions_1d, 0)                                  AS impressions_1d,
       coalesce(agg.impressions_7d, 0)                                  AS impressions_7d,
       coalesce(agg.impressions_28d, 0)                                 AS impressions_28d,
       coalesce(agg.watches_1d, 0)                                      AS watches_1d,
       coalesce(agg.watches_7d, 0)                                      AS watches_7d,
       coalesce(agg.watches_28d, 0)                                     AS watches_28d,
       coalesce(agg.watch_s_7d, 0D)                                     AS watch_s_7d,
       coalesce(agg.watch_s_28d, 0D)                                    AS watch_s_28d,
       coalesce(agg.watches_7d / nullif(agg.impressions_7d, 0), 0D)     AS watch_rate_7d,
       coalesce(agg.completions_28d / nullif(agg.watches_28d, 0), 0D)   AS completion_rate_28d,
       coalesce(agg.likes_28d / nullif(agg.impressions_28d, 0), 0D)     AS like_rate_28d,
       CAST(unix_micros(vid.snap) - unix_micros(vid.upload_time) AS DOUBLE) / {_DAY_US} AS age_days,
       vid.duration_s                                                   AS duration_s
FROM vid LEFT JOIN agg ON agg.d = vid.d AND agg.video_id = vid.video_id
"""

# Watch time per (user, category of the video as known at the snapshot); events of videos unknown at the
# snapshot are left out.
_USER_CATEGORY_AFFINITY_SQL = f"""
WITH j AS (
    SELECT x.d, x.snap, x.user_id, vid.category, sum(x.ws) AS watch_s_28d, sum(x.w) AS watches_28d
    FROM ({_spread(_WATCH_GRAIN)}) x
    JOIN vid ON vid.d = x.d AND vid.video_id = x.video_id
    GROUP BY x.d, x.snap, x.user_id, vid.category
)
SELECT d, snap, user_id, category, watch_s_28d, watches_28d,
       watch_s_28d / sum(watch_s_28d) OVER (PARTITION BY d, user_id) AS watch_share_28d
FROM j
"""


def _spark_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "STRING"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    raise TypeError(f"no Spark type for {t}")


def _read_partitions(spark: "SparkSession", root: Path, dataset: str, partitions: Sequence[str],
                     schema: pa.Schema, columns: Sequence[str]) -> "DataFrame":
    """`partitions` of `dataset`, read by Spark from the lake's folders (Hive-style `date=`), as the columns
    `columns` of `schema` and the partition day `_p` (DATE)."""
    ddl = ", ".join([f"`{c}` {_spark_type(schema.field(c).type)}" for c in columns] + ["`date` DATE"])
    if not partitions:
        return spark.createDataFrame([], ddl).withColumnRenamed("date", "_p")
    base = root / dataset
    return (spark.read.schema(ddl).option("basePath", str(base))
            .parquet(*[str(base / f"date={p}") for p in partitions])
            .withColumnRenamed("date", "_p"))


def _lake_root(lake: Lake) -> Path:
    root = lake.local_path("")
    if root is None:
        raise SparkUnavailable(
            f"the lake {lake.uri()} is not a local folder. Spark reads and writes an S3 lake through Hadoop's "
            "s3a file system, which needs hadoop-aws (and its AWS SDK bundle) on the cluster's classpath and "
            "fs.s3a.* settings (endpoint, credentials); the pyspark wheel installed here has neither. Run the "
            "spark engine on a cluster set up for s3a, or use RECLOOP_FEATURE_ENGINE=duckdb with an S3 lake")
    return Path(root)


def snapshot_frames(spark: "SparkSession", lake: Lake, days: Sequence[str], created: datetime) -> dict[str, "DataFrame"]:
    """Every feature view's snapshots of `days` as Spark DataFrames (lazy): the view's schema
    (`FEATURE_SCHEMAS`) and the snapshot day `date`. Registers the temporary views it needs."""
    from recloop.features import FEATURE_SCHEMAS, USER_ACTIVITY, USER_CATEGORY_AFFINITY, VIDEO_POPULARITY, WINDOW_DAYS

    root = _lake_root(lake)
    days = sorted(set(days))
    first, last = days[0], days[-1]
    first_event_day = (date.fromisoformat(first) - timedelta(days=WINDOW_DAYS - 1)).isoformat()
    event_parts = [p for p in lake.partitions("silver/events") if first_event_day <= p <= last]
    video_parts = [p for p in lake.partitions("silver/videos") if p <= last]
    _read_partitions(spark, root, "silver/events", event_parts, EVENTS.schema,
                     ["user_id", "video_id", "event_time", "watched_s", "completed", "liked"]
                     ).createOrReplaceTempView("events_src")
    _read_partitions(spark, root, "silver/videos", video_parts, VIDEOS.schema,
                     ["video_id", "category", "duration_s", "upload_time"]).createOrReplaceTempView("videos_src")
    (spark.createDataFrame([(date.fromisoformat(d),) for d in days], "d DATE")
     .selectExpr("d", "CAST(date_add(d, 1) AS TIMESTAMP) AS snap").createOrReplaceTempView("snaps"))
    spark.sql(_EV_SQL).createOrReplaceTempView("ev")
    spark.sql(_VID_SQL).persist().createOrReplaceTempView("vid")
    spread = {"first": first, "last": last}
    created_us = int(created.timestamp() * 1_000_000)
    out = {}
    for view, sql in ((USER_ACTIVITY, _USER_ACTIVITY_SQL), (USER_CATEGORY_AFFINITY, _USER_CATEGORY_AFFINITY_SQL),
                      (VIDEO_POPULARITY, _VIDEO_POPULARITY_SQL)):
        schema = FEATURE_SCHEMAS[view]
        stamps = {"event_timestamp": "snap", "created_timestamp": f"timestamp_micros({created_us})"}
        select = ["d AS `date`"] + [f"CAST({stamps.get(f.name, f'`{f.name}`')} AS {_spark_type(f.type)}) AS `{f.name}`"
                                    for f in schema]
        out[view] = _nullable(spark.sql(sql.format(**spread)).selectExpr(*select))
    return out


def _nullable(df: "DataFrame") -> "DataFrame":
    """`df` with every column nullable, as the DuckDB engine's Parquet files declare them (`FEATURE_SCHEMAS`):
    Spark knows that a count or a `coalesce` is never null and would write those columns as required, which
    a reader of partitions from both engines (a pyarrow dataset) could not unify. No cast or projection relaxes
    nullability (the optimizer sees through them), so the rows are re-wrapped with the relaxed schema in the
    JVM (no Python round trip)."""
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructField, StructType

    if all(f.nullable for f in df.schema.fields):
        return df
    schema = StructType([StructField(f.name, f.dataType, True) for f in df.schema.fields])
    jspark = df.sparkSession._jsparkSession
    return DataFrame(jspark.createDataFrame(df._jdf.rdd(), jspark.parseDataType(schema.json())), df.sparkSession)


def write_snapshots(lake: Lake, days: Sequence[str], *, master: str = DEFAULT_MASTER,
                    created: datetime | None = None) -> dict[str, dict[str, WrittenPartition]]:
    """Compute every feature view's snapshots of `days` on Spark and write them as the lake's partitions
    `features/<view>/date=D/part-0.parquet` (each replacing any earlier one, one file per day as the DuckDB
    engine writes). Returns `{day: {view: WrittenPartition}}`."""
    from recloop.features import ENTITY_KEYS, FEATURE_SCHEMAS, FEATURE_VIEWS, SNAPSHOT_PARQUET, feature_dataset

    days = sorted(set(days))
    if not days:
        return {}
    root = _lake_root(lake)
    spark = session(master)
    created = created or datetime.now(timezone.utc)
    staging = root / f".spark-staging-{uuid.uuid4().hex}"
    out: dict[str, dict[str, WrittenPartition]] = {day: {} for day in days}
    try:
        frames = snapshot_frames(spark, lake, days, created)
        for view in FEATURE_VIEWS:
            started = time.perf_counter()
            target = staging / view
            (frames[view].repartition("date").sortWithinPartitions("date", *ENTITY_KEYS[view])
             .write.mode("overwrite").partitionBy("date")
             .option("compression", "zstd").option("parquet.enable.dictionary", "false")
             .parquet(str(target)))
            for day in days:
                files = sorted((target / f"date={day}").glob("*.parquet"))
                dataset = feature_dataset(view)
                if len(files) == 1:
                    out[day][view] = lake.adopt_partition_file(dataset, day, files[0])
                else:  # no row that day (Spark writes no file), or (not expected) several files
                    table = (pa.concat_tables([pq.read_table(f) for f in files]) if files
                             else FEATURE_SCHEMAS[view].empty_table())
                    out[day][view] = lake.write_partition(dataset, day, table.cast(FEATURE_SCHEMAS[view]),
                                                          **SNAPSHOT_PARQUET)
            log.info("Spark wrote %s for %d day(s) in %.1f s", view, len(days), time.perf_counter() - started)
    finally:
        if spark.catalog.tableExists("vid"):
            spark.catalog.uncacheTable("vid")  # the videos of each day, persisted for two views
        shutil.rmtree(staging, ignore_errors=True)
    return out

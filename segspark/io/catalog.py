"""The table catalog: every table segspark writes, with its schema, keys, partitioning and write
policy, and the typed rows of the tables whose rows are built on the driver. The contract with
downstream consumers.

`TABLES` is the one list of tables: a new table is a schema, (when its rows are built in Python) a
row class, and one `Table` entry here; writing and reading go through it (`io.tables`). Change a
name or type here only together with its tests and the README's table section.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from segspark.features.catalog import feature_columns
from segspark.io.delta_files import arrow_schema

# Typed canonical events, produced by ingest from any source through the config's column mapping.
EVENTS = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("event_time", TimestampType(), False),
        StructField("event_type", StringType(), False),
        StructField("item_id", StringType(), True),
        StructField("category", StringType(), True),
        StructField("price", DoubleType(), True),
        StructField("quantity", DoubleType(), False),
        StructField("session_id", StringType(), True),
        StructField("order_id", StringType(), True),
        StructField("country", StringType(), True),
        StructField("device", StringType(), True),
    ]
)
EVENT_COLUMNS = tuple(field.name for field in EVENTS.fields)

QUARANTINE = StructType(
    [
        StructField("run_id", StringType(), False),
        StructField("source", StringType(), False),
        StructField("reason", StringType(), False),
        StructField("raw", StringType(), True),
        StructField("ingested_at", TimestampType(), False),
    ]
)

# Feature columns of the default config, in table order; their meaning is the feature catalog (a
# contract, see README). The slot families' widths follow the config: use
# `catalog.feature_columns(cfg.features)` for a given run.
FEATURE_COLUMNS = feature_columns()
USER_FEATURES_KEYS = ("user_id", "as_of", "run_id")

USER_SEGMENTS = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("as_of", DateType(), False),
        StructField("run_id", StringType(), False),
        StructField("model", StringType(), False),
        StructField("segment", IntegerType(), False),
        StructField("segment_name", StringType(), False),
        StructField("probability", DoubleType(), False),
        StructField("anomaly_score", DoubleType(), True),
        StructField("is_anomaly", BooleanType(), False),
        # Full membership vector (GMM only; null for hard-assignment models).
        StructField("probabilities", ArrayType(DoubleType()), True),
    ]
)
USER_SEGMENTS_COLUMNS = tuple(field.name for field in USER_SEGMENTS.fields)

# The deep model's user embeddings (autoencoder output), one row per user and run.
USER_EMBEDDINGS = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("as_of", DateType(), False),
        StructField("run_id", StringType(), False),
        StructField("embedding", ArrayType(FloatType(), False), False),
    ]
)

# One row per model x k of the k sweep (the whole curve); `chosen` marks the k used, with its reason.
# The metrics are measured on the sweep's user sample (`sample_users` of them); the chosen row also
# has the full-scale fit's objective and cluster sizes (every user).
MODEL_SELECTION = StructType(
    [
        StructField("as_of", DateType(), False),
        StructField("run_id", StringType(), False),
        StructField("model", StringType(), False),
        StructField("k", IntegerType(), False),
        StructField("chosen", BooleanType(), False),
        StructField("reason", StringType(), True),
        StructField("best_seed", LongType(), True),
        StructField("seeds", IntegerType(), True),
        StructField("seed_ari", DoubleType(), True),
        StructField("objective", DoubleType(), True),
        StructField("silhouette", DoubleType(), True),
        StructField("silhouette_sq", DoubleType(), True),
        StructField("davies_bouldin", DoubleType(), True),
        StructField("calinski_harabasz", DoubleType(), True),
        StructField("wss", DoubleType(), True),
        StructField("bic", DoubleType(), True),
        StructField("aic", DoubleType(), True),
        StructField("degenerate_retries", IntegerType(), True),
        StructField("dunn", DoubleType(), True),
        StructField("sample_users", LongType(), True),
        StructField("full_objective", DoubleType(), True),
        StructField("full_cluster_sizes", ArrayType(LongType()), True),
    ]
)

RUNS = StructType(
    [
        StructField("run_id", StringType(), False),
        StructField("started_at", TimestampType(), False),
        StructField("finished_at", TimestampType(), True),
        StructField("status", StringType(), False),
        StructField("config_hash", StringType(), False),
        StructField("as_of", DateType(), True),
        StructField("input_rows", LongType(), True),
        StructField("clean_rows", LongType(), True),
        StructField("quarantined_rows", LongType(), True),
        StructField("users", LongType(), True),
        StructField("metrics", StringType(), True),
    ]
)

# Table contract (DESIGN.md `segment_profiles`). Means and z-scores are maps so that the table's
# schema stays the same when the feature set changes between runs.
SEGMENT_PROFILES = StructType(
    [
        StructField("as_of", DateType(), False),
        StructField("run_id", StringType(), False),
        StructField("model", StringType(), False),
        StructField("segment", IntegerType(), False),
        StructField("segment_name", StringType(), False),
        StructField("size", LongType(), False),
        StructField("share", DoubleType(), False),
        StructField("top_features", ArrayType(StringType(), False), False),
        StructField("feature_means", MapType(StringType(), DoubleType(), True), False),
        StructField("feature_zscores", MapType(StringType(), DoubleType(), False), False),
    ]
)

# Table contract (DESIGN.md `segment_transitions`).
SEGMENT_TRANSITIONS = StructType(
    [
        StructField("as_of", DateType(), False),
        StructField("run_id", StringType(), False),
        StructField("model", StringType(), False),
        StructField("from_segment", IntegerType(), True),
        StructField("to_segment", IntegerType(), True),
        StructField("users", LongType(), False),
    ]
)

# --- the stream's tables (segspark.streaming.job) ---------------------------------------------------
# Every column but those of user_segments_live is nullable: the tables were created from DDL strings,
# and an existing table's schema must stay what it is.


def _nullable(*columns: tuple[str, object]) -> StructType:
    return StructType([StructField(name, datatype, True) for name, datatype in columns])


USER_SEGMENTS_LIVE = StructType([
    StructField("user_id", StringType(), False),
    StructField("model", StringType(), False),
    StructField("segment", IntegerType(), False),
    StructField("segment_name", StringType(), True),
    StructField("probability", DoubleType(), True),
    StructField("anomaly_score", DoubleType(), True),
    StructField("latest_event_time", TimestampType(), True),
    StructField("as_of", DateType(), False),
    StructField("app_id", StringType(), False),
    StructField("batch_id", LongType(), False),
    StructField("processed_at", TimestampType(), False),
])
SEGMENT_CENTROIDS_ONLINE = _nullable(
    ("app_id", StringType()), ("batch_id", LongType()), ("model", StringType()), ("segment", IntegerType()),
    ("centroid", ArrayType(DoubleType())), ("weight", DoubleType()), ("processed_at", TimestampType()),
)
SEGMENT_DRIFT = _nullable(
    ("app_id", StringType()), ("batch_id", LongType()), ("as_of", DateType()), ("model", StringType()),
    ("users", LongType()), ("max_psi", DoubleType()), ("psi", StringType()), ("max_centroid_shift", DoubleType()),
    ("max_size_change", DoubleType()), ("noise_share", DoubleType()), ("retrain_recommended", BooleanType()),
    ("reasons", ArrayType(StringType())), ("processed_at", TimestampType()),
)
STREAM_BATCHES = _nullable(
    ("app_id", StringType()), ("batch_id", LongType()), ("as_of", DateType()), ("input_rows", LongType()),
    ("clean_rows", LongType()), ("quarantined_rows", LongType()), ("users", LongType()),
    ("retrain_recommended", BooleanType()), ("reasons", ArrayType(StringType())), ("seconds", DoubleType()),
    ("step_seconds", StringType()), ("processed_at", TimestampType()), ("query_id", StringType()),
)

# The stream's outliers (streaming.emerging): users a live model fits badly, with what clustering them
# needs later (embedding, features), so that the window of recent outliers survives a restart.
STREAM_OUTLIERS = _nullable(
    ("app_id", StringType()), ("batch_id", LongType()), ("as_of", DateType()), ("user_id", StringType()),
    ("models", ArrayType(StringType())), ("embedding", ArrayType(DoubleType())),
    ("features", MapType(StringType(), DoubleType())), ("processed_at", TimestampType()),
)
# Clusters of the recent outliers proposed as new segments; the live models do not use them.
CANDIDATE_SEGMENTS = _nullable(
    ("app_id", StringType()), ("batch_id", LongType()), ("as_of", DateType()), ("candidate", IntegerType()),
    ("segment_name", StringType()), ("size", LongType()), ("training_members", LongType()),
    ("window_outliers", LongType()), ("window_users", LongType()), ("space", StringType()),
    ("user_ids", ArrayType(StringType())), ("top_features", ArrayType(StringType())),
    ("feature_means", MapType(StringType(), DoubleType())), ("feature_zscores", MapType(StringType(), DoubleType())),
    ("created_at", TimestampType()),
)


# --- typed rows: the tables whose rows are built on the driver ----------------------------------------
# One dataclass per table, its fields named and ordered as the table's schema (a test checks them
# field for field); `Table.frame` turns a list of them into a DataFrame with the table's schema.


@dataclass(frozen=True)
class RunRow:
    run_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str
    config_hash: str
    as_of: dt.date | None
    input_rows: int | None
    clean_rows: int | None
    quarantined_rows: int | None
    users: int | None
    metrics: str | None  # JSON


@dataclass(frozen=True)
class ModelSelectionRow:
    as_of: dt.date
    run_id: str
    model: str
    k: int
    chosen: bool
    reason: str | None
    best_seed: int | None
    seeds: int | None
    seed_ari: float | None
    objective: float | None
    silhouette: float | None
    silhouette_sq: float | None
    davies_bouldin: float | None
    calinski_harabasz: float | None
    wss: float | None
    bic: float | None
    aic: float | None
    degenerate_retries: int | None
    dunn: float | None
    sample_users: int | None
    full_objective: float | None
    full_cluster_sizes: list[int] | None


@dataclass(frozen=True)
class SegmentProfileRow:
    as_of: dt.date
    run_id: str
    model: str
    segment: int
    segment_name: str
    size: int
    share: float
    top_features: list[str]
    feature_means: dict[str, float | None]
    feature_zscores: dict[str, float]


@dataclass(frozen=True)
class SegmentTransitionRow:
    as_of: dt.date
    run_id: str
    model: str
    from_segment: int | None  # None: the users are new in this run
    to_segment: int | None  # None: the users are gone from this run
    users: int


@dataclass(frozen=True)
class CentroidRow:
    app_id: str
    batch_id: int
    model: str
    segment: int
    centroid: list[float]
    weight: float
    processed_at: dt.datetime


@dataclass(frozen=True)
class DriftRow:
    app_id: str
    batch_id: int
    as_of: dt.date | None
    model: str
    users: int
    max_psi: float | None
    psi: str  # JSON: feature -> PSI
    max_centroid_shift: float | None
    max_size_change: float | None
    noise_share: float | None
    retrain_recommended: bool
    reasons: list[str]
    processed_at: dt.datetime


@dataclass(frozen=True)
class StreamBatchRow:
    app_id: str
    batch_id: int
    as_of: dt.date | None
    input_rows: int
    clean_rows: int
    quarantined_rows: int
    users: int
    retrain_recommended: bool
    reasons: list[str]
    seconds: float
    step_seconds: str  # JSON: step -> seconds
    processed_at: dt.datetime
    query_id: str | None


@dataclass(frozen=True)
class CandidateSegmentRow:
    app_id: str
    batch_id: int
    as_of: dt.date | None
    candidate: int  # HDBSCAN's cluster number in this batch's fit (not a segment id)
    segment_name: str
    size: int  # the window's outlier users in the cluster
    training_members: int  # training users (the deep model's HDBSCAN sample) clustered with them
    window_outliers: int  # outlier users clustered (the window's, up to max_users)
    window_users: int  # users scored in the window's batches
    space: str  # what was clustered: autoencoder embeddings, or prepared features without them
    user_ids: list[str]  # the candidate's users (size of them)
    top_features: list[str]
    feature_means: dict[str, float | None]
    feature_zscores: dict[str, float | None]
    created_at: dt.datetime


# --- the tables -------------------------------------------------------------------------------------


class WritePolicy(enum.Enum):
    """How a table's rows are written (`io.tables.write_rows`), each in one atomic commit."""

    # The rows where run_id = the run's id are replaced: re-running a run id never duplicates it.
    # A stream's quarantine adds a txn (its run id is `<app_id>-<batch id>`).
    REPLACE_RUN = "replace the run's rows"
    # Appended with a txn (app id, batch id): a batch Spark replays after a crash is skipped.
    APPEND_TXN = "append once per txn"
    # The partitions the rows fall in are replaced (a copy-on-write upsert of those partitions), or
    # with no partitions given the rows are appended; with a txn.
    REPLACE_PARTITIONS = "replace the written partitions"


@dataclass(frozen=True)
class Table:
    name: str  # under output.root (or in output.catalog.output.schema)
    description: str
    schema: StructType | None  # None: the columns follow the config (the key columns first)
    keys: tuple[str, ...]  # the columns a row is found by (its grain)
    policy: WritePolicy
    partition_by: tuple[str, ...] = ()
    row: type | None = None  # the typed row, for tables whose rows are built on the driver
    txn_suffix: str | None = None  # a stream's commits carry the txn `<app_id>.<txn_suffix>`

    def txn_app(self, app_id: str) -> str:
        if self.txn_suffix is None:
            raise ValueError(f"table {self.name} is not written by the stream: it has no txn app id")
        return f"{app_id}.{self.txn_suffix}"

    def frame(self, spark: SparkSession, rows: Iterable[object]) -> DataFrame:
        """`rows` (instances of `row`) as a DataFrame with the table's schema."""
        return spark.createDataFrame(self._values(rows), self.schema)

    def arrow(self, rows: Iterable[object]) -> pa.Table:
        """`rows` (instances of `row`) as an Arrow table with the schema of the table's Parquet files:
        what the embedded committer writes on the driver, without a Spark job (a few rows of a run or
        a stream batch would otherwise cost a job each). Timestamps without a zone are UTC, as in the
        session (runtime.session sets spark.sql.session.timeZone=UTC)."""
        names = self.schema.names if self.schema is not None else []
        values = self._values(rows)
        return pa.Table.from_pylist([dict(zip(names, v, strict=True)) for v in values], schema=arrow_schema(self.schema))

    def _values(self, rows: Iterable[object]) -> list[tuple]:
        rows = list(rows)
        # No rows at all (a commit of nothing, carrying a txn) is written the same way for any table.
        if self.schema is None or (self.row is None and rows):
            raise TypeError(f"table {self.name} has no typed rows: write it from a DataFrame")
        names = self.schema.names
        data = []
        for row in rows:
            if not isinstance(row, self.row):
                raise TypeError(f"table {self.name} takes {self.row.__name__} rows, got {type(row).__name__}")
            data.append(tuple(getattr(row, name) for name in names))
        return data


def _table(*args, **kwargs) -> tuple[str, Table]:
    table = Table(*args, **kwargs)
    return table.name, table


_RUN = WritePolicy.REPLACE_RUN
_TXN = WritePolicy.APPEND_TXN
# Every table segspark writes, batch tables first, then the stream's.
TABLES: dict[str, Table] = dict([
    _table("quarantine", "one rejected input record and its reason", QUARANTINE, ("run_id",), _RUN,
           txn_suffix="quarantine"),
    _table("user_features", "per-user features as of a date (the feature catalog's columns)", None,
           USER_FEATURES_KEYS, _RUN),
    _table("user_embeddings", "the autoencoder's embedding of each user", USER_EMBEDDINGS,
           ("user_id", "as_of", "run_id"), _RUN),
    _table("user_segments", "each user's segment in each model", USER_SEGMENTS,
           ("user_id", "as_of", "run_id", "model"), _RUN),
    _table("model_selection", "the k sweep of each model, the chosen k marked", MODEL_SELECTION,
           ("run_id", "model", "k"), _RUN, row=ModelSelectionRow),
    _table("segment_profiles", "size, share, feature means and z-scores of each segment", SEGMENT_PROFILES,
           ("run_id", "model", "segment"), _RUN, row=SegmentProfileRow),
    _table("segment_transitions", "users moving between segments since the previous run", SEGMENT_TRANSITIONS,
           ("run_id", "model", "from_segment", "to_segment"), _RUN, row=SegmentTransitionRow),
    _table("runs", "one row per run: status, counts, metrics", RUNS, ("run_id",), _RUN, row=RunRow),
    _table("stream_feature_state", "the stream's per-user feature state, by hash bucket of user_id; a user's row of "
           "the latest batch is current", None, ("user_id", "batch_id"), WritePolicy.REPLACE_PARTITIONS,
           partition_by=("bucket",), txn_suffix="state"),
    _table("user_segments_live", "the stream's assignments; the latest batch per user and model is current",
           USER_SEGMENTS_LIVE, ("app_id", "batch_id", "user_id", "model"), _TXN, txn_suffix="live"),
    _table("segment_centroids_online", "a snapshot of the online k-means centres per batch",
           SEGMENT_CENTROIDS_ONLINE, ("app_id", "batch_id", "model", "segment"), _TXN, row=CentroidRow,
           txn_suffix="online"),
    _table("segment_drift", "drift of each batch against the training run, per model", SEGMENT_DRIFT,
           ("app_id", "batch_id", "model"), _TXN, row=DriftRow, txn_suffix="drift"),
    _table("stream_batches", "one row per stream batch: counts, as-of date, seconds", STREAM_BATCHES,
           ("app_id", "batch_id"), _TXN, row=StreamBatchRow, txn_suffix="stream_batches"),
    _table("stream_outliers", "users a live model fits badly (noise or anomaly), per batch, with embedding and features",
           STREAM_OUTLIERS, ("app_id", "batch_id", "user_id"), _TXN, txn_suffix="outliers"),
    _table("candidate_segments", "clusters of the recent outliers proposed as new segments (until a retrain)",
           CANDIDATE_SEGMENTS, ("app_id", "batch_id", "candidate"), _TXN, row=CandidateSegmentRow,
           txn_suffix="candidates"),
])


def table(name: str | Table) -> Table:
    """The catalog entry of table `name` (a Table is returned as it is)."""
    if isinstance(name, Table):
        return name
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"no table {name!r} in the catalog; the tables are {', '.join(TABLES)}") from None


def stream_tables() -> list[Table]:
    """The tables a stream writes (each commit with its txn), in catalog order."""
    return [t for t in TABLES.values() if t.txn_suffix is not None]

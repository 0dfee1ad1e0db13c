"""Canonical column names and table schemas: the contract with downstream consumers.

Change a name or type here only together with its tests and the README's table section.
"""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from segspark.features.catalog import feature_columns

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

# Table names under output.root (or in output.catalog.output.schema).
TABLES = ("quarantine", "user_features", "user_segments", "runs")

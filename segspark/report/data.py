"""What the report shows, read from the run's tables: small pandas frames, never all the users.

Every read goes through `read_output_table` and filters on the run id in Spark; what comes back to
the driver is either a small table as a whole (runs, profiles, selection, transitions: a few rows
per model and segment), an aggregate (histogram bins, counts per reason), or a bounded sample (the
projection: at most `limit` users, chosen by a hash of user_id). No SparkContext, RDD or JVM
access, so it works over Spark Connect too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from segspark.config import OutputConfig
from segspark.errors import UsageError
from segspark.io.tables import output_table_exists, read_output_table
from segspark.models import registry

log = logging.getLogger(__name__)

# The models a training run can hold, in the order the pipeline fits them.
MODELS = registry.names()
EMBEDDING_MODEL = registry.producer("user_embeddings").name  # whose embeddings the projection shows
SOFT_MODEL = next(m.name for m in registry.MODELS if m.soft)  # whose membership distribution is drawn
KEY_COLUMNS = ("user_id", "as_of", "run_id")


@dataclass(frozen=True)
class RunRecord:
    """One row of `runs`, with its metrics JSON parsed."""

    run_id: str
    status: str
    as_of: dt.date | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    config_hash: str
    input_rows: int | None
    clean_rows: int | None
    quarantined_rows: int | None
    users: int | None
    metrics: dict = field(default_factory=dict)

    def model_metrics(self, model: str) -> dict:
        value = self.metrics.get(model)
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ProjectionSample:
    """A bounded sample of users: their vectors and the segment they are coloured by."""

    source: str  # "embeddings" (user_embeddings) or "features" (numeric user_features columns)
    model: str  # the model whose segments colour the points
    columns: list[str]  # the vector's components (feature names, or embedding dimensions)
    matrix: np.ndarray  # users x columns (NaN where a feature is null)
    segments: np.ndarray  # segment id per user
    names: dict[int, str]  # segment id -> name


def optional_table(spark: SparkSession, output: OutputConfig, name: str) -> DataFrame | None:
    """Table `name`, or None when it does not exist (yet): e.g. `segment_drift` before any stream."""
    if not output_table_exists(spark, output, name):
        return None
    return read_output_table(spark, output, name)


def _runs_table(spark: SparkSession, output: OutputConfig) -> DataFrame:
    runs = optional_table(spark, output, "runs")
    if runs is None:
        raise UsageError(
            f"report: no runs under output.root={output.root!r} (table runs not found); "
            "run `segspark run --config FILE` first, or set output.root to where the runs were written"
        )
    return runs


def resolve_run(spark: SparkSession, output: OutputConfig, run_id: str | None) -> RunRecord:
    """The run to report on: `run_id`, or the latest succeeded run that has segments.

    UsageError (exit 2) when there are no runs, `run_id` is not one of them, or no succeeded run has
    segment profiles; the message names the runs that are there."""
    runs = _runs_table(spark, output)
    if run_id is not None:
        found = runs.where(F.col("run_id") == run_id).limit(1).collect()
        if not found:
            raise UsageError(
                f"report: --run-id {run_id!r} is not in the runs table under output.root={output.root!r}; "
                f"{_recent_runs_hint(runs)}"
            )
        return _record(found[0])
    profiles = optional_table(spark, output, "segment_profiles")
    latest = []
    if profiles is not None:
        trained = profiles.select("run_id").distinct()
        latest = (
            runs.where(F.col("status") == "succeeded")
            .join(trained, "run_id", "left_semi")
            .orderBy(F.col("finished_at").desc_nulls_last(), F.col("run_id").desc())
            .limit(1)
            .collect()
        )
    if not latest:
        raise UsageError(
            f"report: no succeeded run with segments under output.root={output.root!r}; "
            f"run `segspark run --config FILE` first, or name a run with --run-id ({_recent_runs_hint(runs)})"
        )
    log.info("report: the latest succeeded run with segments is %s", latest[0].run_id)
    return _record(latest[0])


def _recent_runs_hint(runs: DataFrame, limit: int = 5) -> str:
    recent = runs.orderBy(F.col("started_at").desc()).select("run_id", "status").limit(limit + 1).collect()
    if not recent:
        return "the runs table is empty"
    shown = ", ".join(f"{r.run_id} ({r.status})" for r in recent[:limit])
    return f"latest runs: {shown}{', ...' if len(recent) > limit else ''}"


def _record(row) -> RunRecord:
    try:
        metrics = json.loads(row.metrics) if row.metrics else {}
    except ValueError:
        log.warning("report: run %s has metrics that are not JSON; showing none", row.run_id)
        metrics = {}
    return RunRecord(
        run_id=row.run_id,
        status=row.status,
        as_of=row.as_of,
        started_at=row.started_at,
        finished_at=row.finished_at,
        config_hash=row.config_hash,
        input_rows=row.input_rows,
        clean_rows=row.clean_rows,
        quarantined_rows=row.quarantined_rows,
        users=row.users,
        metrics=metrics if isinstance(metrics, dict) else {},
    )


def _of_run(spark: SparkSession, output: OutputConfig, name: str, run_id: str) -> DataFrame | None:
    table = optional_table(spark, output, name)
    return None if table is None else table.where(F.col("run_id") == run_id)


def _model_order(model: str) -> int:
    return MODELS.index(model) if model in MODELS else len(MODELS)


def segment_profiles(spark: SparkSession, output: OutputConfig, run_id: str) -> pd.DataFrame:
    """model, segment, segment_name, size, share, top_features (list), feature_zscores (dict): one row
    per model and segment (a few dozen rows)."""
    columns = ["model", "segment", "segment_name", "size", "share", "top_features", "feature_zscores"]
    rows = _of_run(spark, output, "segment_profiles", run_id)
    if rows is None:
        return pd.DataFrame(columns=columns)
    records = [
        {**r.asDict(), "top_features": list(r.top_features or []), "feature_zscores": dict(r.feature_zscores or {})}
        for r in rows.select(*columns).collect()
    ]
    frame = pd.DataFrame.from_records(records, columns=columns)
    return _sorted(frame, ["model", "segment"])


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    frame = frame.assign(_order=frame["model"].map(_model_order))
    return frame.sort_values(["_order", *by], kind="stable").drop(columns="_order").reset_index(drop=True)


def profile_names(spark: SparkSession, output: OutputConfig, run_id: str, model: str) -> dict[int, str]:
    """segment -> name of one model in one run (an earlier run's, for the transitions' rows)."""
    rows = _of_run(spark, output, "segment_profiles", run_id)
    if rows is None:
        return {}
    return {int(r.segment): r.segment_name for r in rows.where(F.col("model") == model).select("segment", "segment_name").collect()}


def model_selection(spark: SparkSession, output: OutputConfig, run_id: str) -> pd.DataFrame:
    """The k sweep of every model (one row per model and k)."""
    columns = ["model", "k", "chosen", "reason", "best_seed", "seeds", "seed_ari", "silhouette", "silhouette_sq",
               "davies_bouldin", "calinski_harabasz", "wss", "bic", "aic", "dunn", "sample_users"]
    rows = _of_run(spark, output, "model_selection", run_id)
    if rows is None:
        return pd.DataFrame(columns=columns)
    present = [c for c in columns if c in rows.columns]  # tables of older versions lack the newer columns
    frame = pd.DataFrame.from_records([r.asDict() for r in rows.select(*present).collect()], columns=columns)
    return _sorted(frame, ["k"])


def transitions(spark: SparkSession, output: OutputConfig, run_id: str) -> pd.DataFrame:
    """model, from_segment, to_segment, users (from/to null: a user only in one of the two runs)."""
    columns = ["model", "from_segment", "to_segment", "users"]
    rows = _of_run(spark, output, "segment_transitions", run_id)
    if rows is None:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame.from_records([r.asDict() for r in rows.select(*columns).collect()], columns=columns)
    return _sorted(frame, ["from_segment", "to_segment"])


def quarantine_counts(spark: SparkSession, output: OutputConfig, run_id: str) -> pd.DataFrame | None:
    """reason, rows: the run's quarantined records per reason (None when the table does not exist)."""
    rows = _of_run(spark, output, "quarantine", run_id)
    if rows is None:
        return None
    counted = rows.groupBy("reason").agg(F.count(F.lit(1)).alias("rows")).collect()
    frame = pd.DataFrame.from_records([r.asDict() for r in counted], columns=["reason", "rows"])
    return frame.sort_values(["rows", "reason"], ascending=[False, True]).reset_index(drop=True)


def _segments(spark: SparkSession, output: OutputConfig, run_id: str) -> DataFrame | None:
    return _of_run(spark, output, "user_segments", run_id)


def membership(spark: SparkSession, output: OutputConfig, run_id: str, model: str = SOFT_MODEL, bins: int = 20):
    """(histogram, per segment) of the `probability` of `model`'s users, or None when the run has no
    rows of that model. histogram: bin (0..bins-1 over [0, 1]), users; per segment: segment,
    segment_name, users, mean_probability, below_half (users whose membership is under 0.5)."""
    rows = _segments(spark, output, run_id)
    if rows is None:
        return None
    probability = F.col("probability")
    binned = F.least(F.floor(probability * bins).cast("int"), F.lit(bins - 1)).alias("bin")
    # One job: per segment and bin (at most segments x bins rows); both views are sums of these.
    cells = (
        rows.where((F.col("model") == model) & probability.isNotNull())
        .groupBy("segment", "segment_name", binned)
        .agg(
            F.count(F.lit(1)).alias("users"),
            F.sum(probability).alias("probability_sum"),
            F.sum(F.when(probability < 0.5, 1).otherwise(0)).alias("below_half"),
        )
        .collect()
    )
    if not cells:
        return None
    frame = pd.DataFrame.from_records([r.asDict() for r in cells])
    histogram = (
        frame.groupby("bin")["users"].sum().reindex(range(bins), fill_value=0).rename_axis("bin").reset_index()
    )
    per_segment = frame.groupby(["segment", "segment_name"], as_index=False)[["users", "probability_sum", "below_half"]].sum()
    per_segment["mean_probability"] = per_segment["probability_sum"] / per_segment["users"]
    per_segment = per_segment.drop(columns="probability_sum").sort_values("segment").reset_index(drop=True)
    return histogram, per_segment[["segment", "segment_name", "users", "mean_probability", "below_half"]]


def anomaly_scores(spark: SparkSession, output: OutputConfig, run_id: str, bins: int = 30):
    """(stats, histogram) of every model's anomaly_score, or None without scores.

    stats: model, users, scored, anomalies, low, high (the histogram's range: min to the 99th
    percentile), max, threshold (the lowest score flagged as an anomaly); histogram: model, bin,
    users (scores above `high` are counted in the last bin)."""
    rows = _segments(spark, output, run_id)
    if rows is None:
        return None
    score = F.col("anomaly_score")
    stats_rows = (
        rows.groupBy("model")
        .agg(
            F.count(F.lit(1)).alias("users"),
            F.count(score).alias("scored"),
            F.sum(F.col("is_anomaly").cast("int")).alias("anomalies"),
            F.min(score).alias("low"),
            F.percentile_approx(score, 0.99, 1000).alias("high"),
            F.max(score).alias("max"),
            F.min(F.when(F.col("is_anomaly"), score)).alias("threshold"),
        )
        .collect()
    )
    stats = pd.DataFrame.from_records(
        [r.asDict() for r in stats_rows],
        columns=["model", "users", "scored", "anomalies", "low", "high", "max", "threshold"],
    )
    stats = _sorted(stats[stats["scored"] > 0], [])
    if stats.empty:
        return None
    # A model whose 99th percentile equals its minimum (mostly one value) gets the full range.
    highs = [h if pd.notna(h) and h > lo else mx for lo, h, mx in zip(stats["low"], stats["high"], stats["max"], strict=True)]
    stats = stats.assign(high=highs)
    bin_of = None
    for model, low, high in zip(stats["model"], stats["low"], stats["high"], strict=True):
        width = (high - low) / bins if high > low else 1.0
        expr = F.least(F.greatest(F.floor((score - F.lit(low)) / F.lit(width)).cast("int"), F.lit(0)), F.lit(bins - 1))
        is_model = F.col("model") == model
        bin_of = F.when(is_model, expr) if bin_of is None else bin_of.when(is_model, expr)
    hist_rows = (
        rows.where(score.isNotNull() & F.col("model").isin(list(stats["model"])))
        .groupBy("model", bin_of.alias("bin"))
        .agg(F.count(F.lit(1)).alias("users"))
        .collect()
    )
    histogram = pd.DataFrame.from_records([r.asDict() for r in hist_rows], columns=["model", "bin", "users"])
    return stats, histogram


def projection_sample(
    spark: SparkSession, output: OutputConfig, run_id: str, models: list[str], limit: int = 3000
) -> ProjectionSample | None:
    """At most `limit` users (the smallest xxhash64 of user_id: the same users every time) with
    their embedding and ae_hdbscan segment when the run has embeddings; otherwise their numeric
    user_features, coloured by the kmeans segment (or the first model there is). None without any."""
    segments = _segments(spark, output, run_id)
    if segments is None or not models:
        return None
    if EMBEDDING_MODEL in models:
        embeddings = _of_run(spark, output, "user_embeddings", run_id)
        if embeddings is not None:
            sample = _sample(embeddings.select("user_id", "embedding"), segments, EMBEDDING_MODEL, limit)
            if sample:
                matrix = np.array([list(r.embedding) for r in sample], dtype=float)
                return _projection("embeddings", EMBEDDING_MODEL, [f"e{i}" for i in range(matrix.shape[1])], matrix, sample)
    colour = next((m.name for m in registry.MODELS if m.swept and m.name in models), models[0])
    features = _of_run(spark, output, "user_features", run_id)
    if features is None:
        return None
    numeric = [f.name for f in features.schema.fields
               if f.name not in KEY_COLUMNS and isinstance(f.dataType, T.NumericType)]
    if not numeric:
        return None
    sample = _sample(features.select("user_id", *numeric), segments, colour, limit)
    if not sample:
        return None
    matrix = np.array([[np.nan if r[c] is None else float(r[c]) for c in numeric] for r in sample], dtype=float)
    return _projection("features", colour, numeric, matrix, sample)


def _sample(vectors: DataFrame, segments: DataFrame, model: str, limit: int) -> list:
    picked = (
        vectors.withColumn("_hash", F.xxhash64("user_id"))
        .orderBy("_hash", "user_id")
        .limit(limit)
    )
    labels = segments.where(F.col("model") == model).select("user_id", "segment", "segment_name")
    rows = picked.join(labels, "user_id").orderBy("_hash", "user_id").collect()
    log.info("report: projection sample of %d users (model %s, at most %d)", len(rows), model, limit)
    return rows


def _projection(source: str, model: str, columns: list[str], matrix: np.ndarray, rows: list) -> ProjectionSample:
    return ProjectionSample(
        source=source,
        model=model,
        columns=columns,
        matrix=matrix,
        segments=np.array([int(r.segment) for r in rows]),
        names={int(r.segment): r.segment_name for r in rows},
    )


def latest_drift(spark: SparkSession, output: OutputConfig, limit: int = 50) -> pd.DataFrame | None:
    """The latest `segment_drift` row of every stream (app_id) and model: None when the table does
    not exist, an empty frame when it has no rows."""
    drift = optional_table(spark, output, "segment_drift")
    if drift is None:
        return None
    columns = ["app_id", "batch_id", "as_of", "model", "users", "max_psi", "max_centroid_shift",
               "max_size_change", "noise_share", "retrain_recommended", "reasons", "processed_at"]
    latest = drift.groupBy("app_id", "model").agg(F.max("batch_id").alias("batch_id"))
    rows = (
        drift.join(latest, ["app_id", "model", "batch_id"], "left_semi")
        .select(*columns)
        .orderBy(F.col("processed_at").desc(), "app_id", "model")
        .limit(limit)
        .collect()
    )
    return pd.DataFrame.from_records([{**r.asDict(), "reasons": list(r.reasons or [])} for r in rows], columns=columns)

"""Stable segments of every model of a run, together: ids that persist across runs, profiles, names,
transitions and separation.

1. stable ids: the clusters are matched to the previous run's segments of the same model
   (segments.ids: member overlap, profile z-scores for clusters without common users); new
   clusters get ids never used before by that model;
2. profiles and deterministic names (segments.profiles) on the stable ids, and transitions
   between the previous run and this one;
3. separation (segments.separation): each segment's silhouette and separating features on the
   run's user sample, recorded in the model's metrics (`runs.metrics.<model>.separation`).

These are a fixed number of Spark jobs for all models together (the assignments are persisted
once; one aggregation gives every model's profiles, one join every model's overlap with its previous
run, from which the transitions follow, and one broadcast join every model's segments of the sampled
users), so their cost does not grow with the number of models. When the sample is every user (a run
small enough for the driver), the profiles come from those sampled segments and one collect of the
features instead of two aggregations: on 400 users, a warm session spent 3.5 s here before, 1.7 s
after, nearly all of it Spark's planning.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from segspark.config import OutputConfig
from segspark.io.catalog import SegmentTransitionRow
from segspark.io.tables import output_table_exists, read_output_table
from segspark.models.contract import ASSIGNMENT_COLUMNS, TrainedModel
from segspark.models.sample import UserSample
from segspark.segments.ids import (
    SegmentMapping,
    cross_counts_by_model,
    match_from_counts,
    stable_segment,
    transitions_from_counts,
)
from segspark.segments.profiles import (
    NOISE_SEGMENT,
    UNASSIGNED,
    SegmentProfiles,
    segment_name_column,
    segment_profiles_by_model,
    segment_profiles_in_memory,
)
from segspark.segments.separation import separation

log = logging.getLogger(__name__)

@dataclass
class ModelSegments:
    name: str
    k: int
    reason: str
    fitted: object  # the model's fitted object (models.contract.SegmentModel)
    curve: list[dict]
    profiles: SegmentProfiles
    mapping: SegmentMapping
    previous_run_id: str | None
    transitions: list[tuple]  # (from_segment, to_segment, users); empty on a model's first run
    metrics: dict = field(default_factory=dict)


@dataclass
class RunSegments:
    """Every model's stable segments of a run."""

    models: list[ModelSegments]
    # user_id, model, segment (stable), segment_name, probability, anomaly_score, ...: every model's
    # rows, as one projection of the persisted raw assignments (see `_stable_assignments`).
    assignments: DataFrame | None


def stable_segments(
    spark: SparkSession,
    output: OutputConfig,
    run_id: str,
    trained: Sequence[TrainedModel],
    features: DataFrame,
    feature_names: list[str],
    category_labels: Mapping[str, str] | None = None,
    cached: list[DataFrame] | None = None,
    *,
    sample: UserSample | None = None,
    prepared_names: Sequence[str] = (),
    silhouette_rows: int = 2000,
) -> RunSegments:
    """Stable ids, profiles, names and transitions of every trained model of the run, together.

    The models' raw assignments are persisted once (appended to `cached`; the caller unpersists them
    after writing), profiled in one aggregation, and matched to their previous runs with one join.
    With `sample` (the sweep's user sample; `prepared_names` its columns), every model's metrics get
    its `separation` on that sample (its first `silhouette_rows` users for the silhouette): one more
    Spark job fetches the sampled users' segments."""
    if not trained:
        return RunSegments([], None)
    names = [t.name for t in trained]
    raw = reduce(
        DataFrame.unionByName,
        [t.raw.select(F.lit(t.name).alias("model"), "user_id", *ASSIGNMENT_COLUMNS) for t in trained],
    ).persist(StorageLevel.MEMORY_AND_DISK)
    if cached is not None:
        cached.append(raw)
    sampled = {} if sample is None else _sampled_segments(spark, raw, sample.user_ids)
    raw_profiles = None
    if sample is not None and sample.size == sample.total_users:
        raw_profiles = _profiles_on_driver(features, sample, sampled, feature_names, category_labels, names)
    if raw_profiles is None:
        raw_profiles = segment_profiles_by_model(features, raw.select("model", "user_id", "segment"), feature_names,
                                                 category_labels=category_labels, models=names)
    previous = _previous_runs(spark, output, names, run_id)
    cells: dict[str, list] = {}
    if previous:
        earlier = reduce(operator.or_, [(F.col("model") == m) & (F.col("run_id") == p.run_id) for m, p in previous.items()])
        previous_assignments = read_output_table(spark, output, "user_segments").filter(earlier)
        cells = cross_counts_by_model(raw.select("model", "user_id", "segment"), previous_assignments)

    built = []
    for model in trained:
        profiles_raw, before = raw_profiles[model.name], previous.get(model.name)
        if before is None:
            mapping = match_from_counts(None, [p.segment for p in profiles_raw.segments])
        else:
            mapping = match_from_counts(
                cells.get(model.name, []),
                [p.segment for p in profiles_raw.segments],
                current_centroids={p.segment: _vector(p.zscores, feature_names) for p in profiles_raw.segments},
                previous_centroids={s: _vector(z, feature_names) for s, z in before.zscores.items()},
                next_id=before.max_id + 1,
            )
        profiles = profiles_raw.relabel(mapping.mapping)  # no second pass over the users
        moved = [] if before is None else transitions_from_counts(cells.get(model.name, []), mapping.mapping)
        metrics = {
            **model.metrics,
            "previous_run_id": None if before is None else before.run_id,
            "segment_ids": {
                "mapping": {str(a): b for a, b in sorted(mapping.mapping.items())},
                "new": mapping.new,
                "vanished": mapping.vanished,
                "method": {str(a): m for a, m in sorted(mapping.method.items())},
            },
            "segment_names": {str(s): n for s, n in sorted(profiles.names().items())},
        }
        if sample is not None:
            metrics["separation"] = _separation(model, mapping, sampled.get(model.name), sample, list(prepared_names),
                                                silhouette_rows)
        built.append(ModelSegments(
            model.name, model.k, model.reason, model.fitted, model.curve, profiles, mapping,
            None if before is None else before.run_id, moved, metrics,
        ))
    return RunSegments(built, _stable_assignments(raw, built))


def _stable_assignments(raw: DataFrame, built: Sequence[ModelSegments]) -> DataFrame:
    """Every model's assignments in stable ids with their segment names: one projection of `raw` (the
    persisted union of the models' raw assignments), each model's mapping and names chosen by its name.

    One frame over `raw`, not a union of one filtered frame per model: each of those would carry the
    whole union's plan, so the driver would analyse the models' scoring plans models x models times
    (~2 s of planning for four models on any data size)."""
    model = F.col("model")

    def by_model(expression_of) -> Column:
        cases = [(model == m.name, expression_of(m)) for m in built]
        column = F.when(*cases[0])
        for condition, value in cases[1:]:
            column = column.when(condition, value)
        return column

    stable = raw.select("user_id", "model", by_model(lambda m: stable_segment(m.mapping)).alias("segment"),
                        *ASSIGNMENT_COLUMNS[1:])
    named = stable.withColumn("segment_name", by_model(lambda m: segment_name_column(m.profiles.names())))
    return named.select("user_id", "model", "segment", "segment_name", *ASSIGNMENT_COLUMNS[1:])


_UNSAMPLED = UNASSIGNED  # a sampled user without an assignment of the model (not expected: every user is assigned)


def _profiles_on_driver(features: DataFrame, sample: UserSample, sampled: Mapping[str, np.ndarray],
                        feature_names: list[str], category_labels: Mapping[str, str] | None,
                        models: list[str]) -> dict[str, SegmentProfiles] | None:
    """Every model's raw profiles when the run's sample is every user: their segments came back with
    the sample's (`_sampled_segments`), so one small job brings their features, and the statistics
    are computed on the driver (segment_profiles_in_memory) instead of in two aggregations. None
    (profile in Spark) in the unexpected case of a sampled user without a feature row."""
    values = features.select(F.col("user_id").cast("string").alias("user_id"),
                             *[F.col(n).cast("double").alias(n) for n in feature_names]).toPandas()
    rows = pd.Index(values["user_id"]).get_indexer(sample.user_ids.astype(str))
    if (rows < 0).any():
        return None
    labels = {}
    for model in models:
        aligned = np.full(len(values), UNASSIGNED, dtype=np.int64)
        if model in sampled:
            aligned[rows] = sampled[model]
        labels[model] = aligned
    return segment_profiles_in_memory(values, labels, feature_names, category_labels=category_labels, models=models)


def _sampled_segments(spark: SparkSession, raw: DataFrame, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each model's raw segment of every sampled user, in sample order (_UNSAMPLED where it has none).

    One Spark job for all models: the bounded sample's ids, broadcast, select their rows of the
    persisted assignments; at most sample x models small rows come back."""
    schema = StructType([StructField("user_id", StringType(), False), StructField("_pos", LongType(), False)])
    ids = spark.createDataFrame(
        pd.DataFrame({"user_id": user_ids.astype(str), "_pos": np.arange(len(user_ids), dtype=np.int64)}), schema
    )
    rows = (
        raw.select("model", F.col("user_id").cast("string").alias("user_id"), "segment")
        .join(F.broadcast(ids), "user_id")
        .select("model", "_pos", "segment")
        .toPandas()
    )
    result = {}
    for model, group in rows.groupby("model"):
        labels = np.full(len(user_ids), _UNSAMPLED, dtype=np.int64)
        labels[group["_pos"].to_numpy()] = group["segment"].to_numpy()
        result[str(model)] = labels
    return result


def _separation(model: TrainedModel, mapping: SegmentMapping, raw_labels: np.ndarray | None, sample: UserSample,
                names: list[str], silhouette_rows: int) -> dict:
    """evaluation.separation of one model on the sample, in stable segment ids."""
    if raw_labels is None:
        raw_labels = np.full(sample.size, _UNSAMPLED, dtype=np.int64)
    found = raw_labels != _UNSAMPLED
    lookup = {**mapping.mapping, NOISE_SEGMENT: NOISE_SEGMENT}
    labels = np.array([lookup[int(s)] for s in raw_labels[found]], dtype=np.int64)
    matrix = sample.matrix[found]
    head = matrix[:silhouette_rows]
    space = head if model.embed is None else np.asarray(model.embed(head), dtype=np.float64)
    return separation(space, matrix, labels, names, space_name=model.space)


def transition_rows(built: Sequence[ModelSegments], as_of, run_id: str) -> list[SegmentTransitionRow] | None:
    """segment_transitions rows of every model that has a previous run (None when none has)."""
    if not any(m.previous_run_id for m in built):
        return None
    return [
        SegmentTransitionRow(as_of=as_of, run_id=run_id, model=m.name, from_segment=a, to_segment=b, users=int(n))
        for m in built for a, b, n in m.transitions
    ]


@dataclass(frozen=True)
class _PreviousRun:
    run_id: str
    zscores: dict[int, dict[str, float]]
    max_id: int  # the largest segment id this model ever used (vanished ones included)


def _previous_runs(spark: SparkSession, output: OutputConfig, models: Sequence[str], run_id: str) -> dict[str, _PreviousRun]:
    """Per model, the latest earlier successful run that wrote its profiles (profiles and runs are
    small tables): two small jobs for all models."""
    if not (output_table_exists(spark, output, "segment_profiles") and output_table_exists(spark, output, "runs")):
        return {}
    profiles = read_output_table(spark, output, "segment_profiles").filter(
        F.col("model").isin(list(models)) & (F.col("run_id") != run_id)
    )
    runs = read_output_table(spark, output, "runs").select("run_id", "status", "started_at")
    per_run = (
        profiles.groupBy("model", "run_id").agg(F.max("segment").alias("max_id"))
        .join(runs, "run_id", "left")
        .collect()
    )
    latest: dict[str, tuple] = {}
    max_ids: dict[str, int] = {}
    for row in per_run:
        # The largest id a model ever used counts every earlier run, failed ones too: never reuse it.
        max_ids[row.model] = max(max_ids.get(row.model, -1), int(row.max_id))
        if row.status == "succeeded":
            key = (row.started_at, row.run_id)
            if row.model not in latest or key > latest[row.model]:
                latest[row.model] = key
    if not latest:
        return {}
    wanted = reduce(operator.or_, [(F.col("model") == m) & (F.col("run_id") == key[1]) for m, key in latest.items()])
    zscores: dict[str, dict[int, dict[str, float]]] = {}
    for row in profiles.filter(wanted).select("model", "segment", "feature_zscores").collect():
        zscores.setdefault(row.model, {})[row.segment] = dict(row.feature_zscores)
    return {m: _PreviousRun(key[1], zscores.get(m, {}), max_ids[m]) for m, key in latest.items()}


def _vector(zscores: Mapping[str, float], names: list[str]) -> list[float]:
    return [float(zscores.get(n) or 0.0) for n in names]

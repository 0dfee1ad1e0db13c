"""One model's segments: choose k, fit, keep segment ids stable across runs, profile and name.

`build_segments` is what the pipeline runs per enabled model (kmeans, bisecting_kmeans, gmm):

1. k: a sweep over models.selection.k_min..k_max with several seeds per k (evaluation.selection:
   the documented rule and its reason in words), or the model's fixed k;
2. assignments for every user on the executors (segment, probability, anomaly score and flag);
3. stable ids: the clusters are matched to the previous run's segments of the same model
   (evaluation.segment_ids: member overlap, profile z-scores for clusters without common users);
   new clusters get ids never used before by that model;
4. profiles and deterministic names (evaluation.profiles) on the stable ids, and transitions
   between the previous run and this one.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from segspark.config import ClusteringConfig, KSelectionConfig, OutputConfig
from segspark.evaluation.profiles import SegmentProfiles, segment_profiles
from segspark.evaluation.segment_ids import SegmentMapping, apply_mapping, match_segments, transitions
from segspark.evaluation.selection import sweep
from segspark.io.delta import table_exists
from segspark.io.tables import read_output_table, table_path

log = logging.getLogger(__name__)

MODEL_MODULES = {
    "kmeans": "segspark.models.kmeans",
    "bisecting_kmeans": "segspark.models.bisecting",
    "gmm": "segspark.models.gmm",
}


@dataclass
class ModelSegments:
    name: str
    k: int
    reason: str
    fitted: object  # the module's Fitted* (model, centroids, metrics())
    curve: list[dict]
    assignments: DataFrame  # user_id, segment (stable), segment_name, probability, anomaly_score, ...
    profiles: SegmentProfiles
    mapping: SegmentMapping
    previous_run_id: str | None
    transitions: DataFrame | None  # from_segment, to_segment, users
    metrics: dict = field(default_factory=dict)


def fit_function(name: str, cfg: ClusteringConfig) -> Callable[[DataFrame, int, int], object]:
    """`fit(prepared, k, seed)` for the model `name` with its configured options."""
    module = importlib.import_module(MODEL_MODULES[name])
    options = {"max_iter": cfg.max_iter, "contamination": cfg.contamination}
    if name == "bisecting_kmeans":
        options["min_divisible_cluster_size"] = cfg.min_divisible_cluster_size
    if name == "gmm":
        options.update(
            tol=cfg.tol,
            max_retries=cfg.max_retries,
            min_component_weight=cfg.min_component_weight,
            principal_components=cfg.principal_components,
        )
    return lambda prepared, k, seed: module.fit_one(prepared, k, seed, **options)


def build_segments(
    spark: SparkSession,
    output: OutputConfig,
    run_id: str,
    name: str,
    cfg: ClusteringConfig,
    selection: KSelectionConfig,
    prepared: DataFrame,
    features: DataFrame,
    feature_names: list[str],
    category_labels: Mapping[str, str] | None = None,
) -> ModelSegments:
    """An MLlib baseline: k from the sweep (or fixed), then `stable_segments`."""
    fixed = cfg.k is not None
    ks = [cfg.k] if fixed else list(range(selection.k_min, selection.k_max + 1))
    seeds = [cfg.seed + 1009 * i for i in range(selection.seeds)]
    swept = sweep(
        fit_function(name, cfg),
        prepared,
        ks,
        seeds,
        parallelism=selection.parallelism,
        metrics_kwargs={"silhouette_sample": selection.silhouette_sample, "seed": cfg.seed},
    )
    if fixed:
        k, reason = cfg.k, f"k={cfg.k}: fixed in config (models.{name}.k)"
    else:
        k, reason = swept.choose(selection.silhouette_tolerance)
    fitted = swept.models[k]
    log.info("%s: %s", name, reason)
    segments = stable_segments(
        spark, output, run_id, name, fitted.assign(prepared), features, feature_names, category_labels
    )
    segments.k, segments.reason, segments.fitted, segments.curve = k, reason, fitted, swept.curve
    segments.metrics.update(k=k, reason=reason, fixed_k=fixed, curve=swept.curve, model=fitted.metrics())
    return segments


def stable_segments(
    spark: SparkSession,
    output: OutputConfig,
    run_id: str,
    name: str,
    raw: DataFrame,
    features: DataFrame,
    feature_names: list[str],
    category_labels: Mapping[str, str] | None = None,
) -> ModelSegments:
    """Stable ids, profiles, names and transitions for one model's raw assignments (user_id,
    segment as the model numbers it, -1 for noise, plus the model's score columns).

    The caller fills in k, reason, fitted and curve."""
    raw_profiles = segment_profiles(features, raw, feature_names, category_labels=category_labels)
    previous = _previous_run(spark, output, name, run_id)
    if previous is None:
        mapping = match_segments(raw.select("user_id", "segment"), None)
        previous_assignments = None
    else:
        previous_assignments = (
            read_output_table(spark, output, "user_segments")
            .filter((F.col("model") == name) & (F.col("run_id") == previous.run_id))
            .select("user_id", "segment")
        )
        mapping = match_segments(
            raw.select("user_id", "segment"),
            previous_assignments,
            current_centroids={p.segment: _vector(p.zscores, feature_names) for p in raw_profiles.segments},
            previous_centroids={s: _vector(z, feature_names) for s, z in previous.zscores.items()},
            next_id=previous.max_id + 1,
        )
    stable = apply_mapping(raw, mapping)
    profiles = raw_profiles.relabel(mapping.mapping)  # no second pass over the users
    assignments = profiles.with_names(stable)
    moved = None if previous_assignments is None else transitions(stable.select("user_id", "segment"), previous_assignments)
    metrics = {
        "previous_run_id": None if previous is None else previous.run_id,
        "segment_ids": {
            "mapping": {str(a): b for a, b in sorted(mapping.mapping.items())},
            "new": mapping.new,
            "vanished": mapping.vanished,
            "method": {str(a): m for a, m in sorted(mapping.method.items())},
        },
        "segment_names": {str(s): n for s, n in sorted(profiles.names().items())},
    }
    return ModelSegments(
        name, 0, "", None, [], assignments, profiles, mapping,
        None if previous is None else previous.run_id, moved, metrics,
    )


@dataclass(frozen=True)
class _PreviousRun:
    run_id: str
    zscores: dict[int, dict[str, float]]
    max_id: int  # the largest segment id this model ever used (vanished ones included)


def _previous_run(spark: SparkSession, output: OutputConfig, model: str, run_id: str) -> _PreviousRun | None:
    """The latest earlier successful run that wrote profiles for `model` (profiles and runs are small)."""
    if not (table_exists(table_path(output, "segment_profiles"), spark) and table_exists(table_path(output, "runs"), spark)):
        return None
    profiles = read_output_table(spark, output, "segment_profiles").filter(
        (F.col("model") == model) & (F.col("run_id") != run_id)
    )
    runs = read_output_table(spark, output, "runs").filter(F.col("status") == "succeeded").select("run_id", "started_at")
    latest = profiles.join(runs, "run_id").orderBy(F.col("started_at").desc(), F.col("run_id").desc()).limit(1).collect()
    if not latest:
        return None
    previous_id = latest[0].run_id
    rows = profiles.filter(F.col("run_id") == previous_id).select("segment", "feature_zscores").collect()
    max_id = profiles.agg(F.max("segment")).collect()[0][0]
    return _PreviousRun(previous_id, {r.segment: dict(r.feature_zscores) for r in rows}, int(max_id))


def _vector(zscores: Mapping[str, float], names: list[str]) -> list[float]:
    return [float(zscores.get(n) or 0.0) for n in names]

"""Segments of every model of a run: choose k, fit, keep segment ids stable across runs, profile and name.

`train_baselines` fits the enabled MLlib baselines (kmeans, bisecting_kmeans, gmm):

1. k: a sweep over models.selection.k_min..k_max with several seeds per k, every fit a Spark task
   running scikit-learn on the bounded user sample (models.sample_grid; evaluation.selection: the
   documented rule and its reason in words), or the model's fixed k;
2. one MLlib fit of the chosen k on every user, started from the sample's best solution where MLlib
   allows it (models.mllib_start), and its assignments for every user on the executors (segment,
   probability, anomaly score and flag).

`stable_segments` then takes every trained model of the run (the deep model too) at once:

3. stable ids: the clusters are matched to the previous run's segments of the same model
   (evaluation.segment_ids: member overlap, profile z-scores for clusters without common users);
   new clusters get ids never used before by that model;
4. profiles and deterministic names (evaluation.profiles) on the stable ids, and transitions
   between the previous run and this one;
5. separation (evaluation.separation): each segment's silhouette and separating features on the
   run's user sample, recorded in the model's metrics (`runs.metrics.<model>.separation`).

Steps 3 to 5 are a fixed number of Spark jobs for all models together (the assignments are
persisted once; one aggregation gives every model's profiles, one join every model's overlap with
its previous run, from which the transitions follow, and one broadcast join every model's segments
of the sampled users), so their cost does not grow with the number of models.
"""

from __future__ import annotations

import importlib
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from segspark.config import ClusteringConfig, KSelectionConfig, ModelsConfig, OutputConfig
from segspark.errors import NotEnoughUsersError
from segspark.evaluation.selection import SweepResult, curve_from_grid
from segspark.io.catalog import TABLES, SegmentTransitionRow
from segspark.io.tables import output_table_exists, read_output_table
from segspark.models.sample import UserSample
from segspark.models.sample_grid import Cell, run_grid
from segspark.runtime.session import share_session, task_slots
from segspark.segments.ids import (
    SegmentMapping,
    apply_mapping,
    cross_counts_by_model,
    match_from_counts,
    transitions_from_counts,
)
from segspark.segments.profiles import NOISE_SEGMENT, SegmentProfiles, segment_profiles_by_model
from segspark.segments.separation import separation

log = logging.getLogger(__name__)

ASSIGNMENT_COLUMNS = ("segment", "probability", "anomaly_score", "is_anomaly", "probabilities")

MODEL_MODULES = {
    "kmeans": "segspark.models.kmeans",
    "bisecting_kmeans": "segspark.models.bisecting",
    "gmm": "segspark.models.gmm",
}


@dataclass
class TrainedModel:
    """A model fitted on this run's users, before stable ids: what `stable_segments` takes."""

    name: str
    k: int
    reason: str
    fitted: object  # the module's Fitted* (model, centroids, metrics()), or models.deep.FittedDeep
    curve: list[dict]
    raw: DataFrame  # user_id + ASSIGNMENT_COLUMNS, segment as the model numbers its clusters
    metrics: dict = field(default_factory=dict)
    # Prepared vectors -> the space the model clusters in, where its silhouette is measured (the deep
    # model's encoder); None: the prepared features themselves.
    embed: Callable[[np.ndarray], np.ndarray] | None = None
    space: str = "prepared features"


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
    transitions: list[tuple]  # (from_segment, to_segment, users); empty on a model's first run
    metrics: dict = field(default_factory=dict)


def model_options(name: str, cfg: ClusteringConfig, sample: np.ndarray) -> dict:
    """The keyword options of model `name`'s `fit_sample` and `fit_one`, from its config; GMM's
    principal axes come from the sample, so that the sweep and the full fit share one projection."""
    options: dict = {"max_iter": cfg.max_iter, "contamination": cfg.contamination}
    if name == "bisecting_kmeans":
        options["min_divisible_cluster_size"] = cfg.min_divisible_cluster_size
    if name == "gmm":
        from segspark.models.gmm import principal_axes

        options.update(
            tol=cfg.tol,
            max_retries=cfg.max_retries,
            min_component_weight=cfg.min_component_weight,
            principal_components=cfg.principal_components,
            reg_covar=cfg.reg_covar,
            projection=principal_axes(sample, cfg.principal_components),
        )
    return options


def users_check(models: ModelsConfig, users: int, dims: int) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Each swept baseline's k range for a run of `users` users with `dims` prepared features, and
    warnings. What a model needs: k below the number of users (a silhouette needs a cluster of two),
    and for gmm, whose components have full covariances over its `dims_gmm` input dimensions
    (principal_components), at least dims_gmm + 1 users per component. A k range beyond that is
    narrowed (warned); a fixed k or a deep model the users cannot carry, or a range with no k left,
    is a NotEnoughUsersError naming every such model and the users it needs, raised before any fit."""
    selection, ranges, warnings, problems = models.selection, {}, [], []
    for name, cfg in models.enabled().items():
        per_component = 1
        if name == "gmm":
            per_component = min(cfg.principal_components or dims, dims) + 1
        highest = min(users - 1, users // per_component)  # the largest k the users carry
        need = (f"k x ({per_component - 1} + 1) users (a full covariance in {per_component - 1} dimensions per component)"
                if per_component > 1 else "k + 1 users")
        if cfg.k is not None:
            if cfg.k > highest:
                problems.append(f"{name} with models.{name}.k={cfg.k} needs {need}: at least "
                                f"{_users_for(cfg.k, per_component):,}, the run has {users:,}; lower models.{name}.k "
                                f"or set models.{name}.enabled=false")
            continue
        if highest < 2:
            problems.append(f"{name} needs {need}, at least {_users_for(2, per_component):,} for k=2, the run has "
                            f"{users:,} (or set models.{name}.enabled=false)")
        elif selection.k_max > highest:
            k_min, k_max = min(selection.k_min, highest), highest
            warnings.append(f"{users:,} users: {name}'s k range {selection.k_min}..{selection.k_max} is narrowed to "
                            f"{k_min}..{k_max} ({name} needs {need})")
            ranges[name] = (k_min, k_max)
    if models.autoencoder.enabled:
        from segspark.models.deep.model import users_problem

        deep = users_problem(users, models.autoencoder, models.hdbscan)
        if deep is not None:
            problems.append(f"{deep} (or set models.autoencoder.enabled=false to leave the deep model out)")
    if problems:
        raise NotEnoughUsersError(f"too few users ({users:,}) for the enabled models: " + "; ".join(problems))
    for warning in warnings:
        log.warning("%s", warning)
    return ranges, warnings


def _users_for(k: int, per_component: int) -> int:
    return max(k + 1, k * per_component)


@dataclass(frozen=True)
class _Selected:
    name: str
    k: int
    reason: str
    swept: SweepResult
    options: dict


def train_baselines(
    spark: SparkSession,
    models: Mapping[str, ClusteringConfig],
    selection: KSelectionConfig,
    prepared: DataFrame,
    sample: UserSample,
    k_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[TrainedModel]:
    """The MLlib baselines: k chosen on the user sample (one Spark job fits every model, k and seed
    with scikit-learn: models.sample_grid), then one MLlib fit per model on every user, started from
    the sample's best solution for that k. `k_ranges`: a model's (k_min, k_max) where the run's
    users narrow the configured range (`users_check`)."""
    if not models:
        return []
    sweep_sample = sample.head(selection.sample_size)
    cells, fitters, options = [], {}, {}
    for name, cfg in models.items():
        module = importlib.import_module(MODEL_MODULES[name])
        fitters[name] = module.fit_sample
        options[name] = model_options(name, cfg, sweep_sample.matrix)
        k_min, k_max = (k_ranges or {}).get(name, (selection.k_min, selection.k_max))
        ks = [cfg.k] if cfg.k is not None else list(range(k_min, k_max + 1))
        seeds = [cfg.seed + 1009 * i for i in range(selection.seeds)]
        cells += [Cell(name, k, seed) for k in ks for seed in seeds]
    # Two tasks per task slot: every core busy, cells balanced over them, and the per-task cost of
    # Spark (scheduling, the closure) paid a few times rather than once per fit.
    slots = task_slots(spark)
    results = run_grid(spark, sweep_sample.matrix, cells, fitters, options, selection.silhouette_sample,
                       tasks=None if slots is None else 2 * slots)

    chosen = []
    for name, cfg in models.items():
        swept = curve_from_grid([r for r in results if r.cell.model == name])
        for entry in swept.curve:
            entry["sample_users"] = sweep_sample.size
        if cfg.k is not None:
            if cfg.k not in swept.best:
                raise RuntimeError(f"{name}: every fit of the fixed k={cfg.k} failed on the sample: {'; '.join(swept.failed)}")
            k, reason = cfg.k, f"k={cfg.k}: fixed in config (models.{name}.k)"
        else:
            try:
                k, reason = swept.choose(selection.silhouette_tolerance)
            except ValueError as exc:
                failed = f"; failed fits: {'; '.join(swept.failed)}" if swept.failed else ""
                raise RuntimeError(f"{name}: no k could be chosen: {exc}{failed}") from exc
            reason += f"; measured on a hash sample of {sweep_sample.describe()}"
        log.info("%s: %s", name, reason)
        chosen.append(_Selected(name, k, reason, swept, options[name]))

    fitted = _fit_full(prepared, chosen, selection.parallelism, sample.total_users)
    trained = []
    for pick in chosen:
        model = fitted[pick.name]
        for entry in pick.swept.curve:
            if entry["k"] == pick.k:  # the full-scale fit next to the sample's metrics
                entry["full_objective"] = model.objective
                entry["full_cluster_sizes"] = list(model.cluster_sizes)
        metrics = {
            "k": pick.k, "reason": pick.reason, "fixed_k": models[pick.name].k is not None, "curve": pick.swept.curve,
            "model": model.metrics(), "sample_users": sweep_sample.size, "failed_sample_fits": pick.swept.failed,
        }
        trained.append(TrainedModel(pick.name, pick.k, pick.reason, model, pick.swept.curve, model.assign(prepared), metrics))
    return trained


def _fit_full(prepared: DataFrame, chosen: list[_Selected], parallelism: int, users: int) -> dict[str, object]:
    """One MLlib fit per model on every user, `parallelism` at a time (Spark runs jobs from several
    driver threads at once), each started from the best sample fit of its chosen k."""

    def fit(pick: _Selected):
        best = pick.swept.best[pick.k]
        module = importlib.import_module(MODEL_MODULES[pick.name])
        options = {**pick.options, **({"users": users} if pick.name == "gmm" else {})}
        return module.fit_one(prepared, pick.k, best.cell.seed, start=best.fit, **options)

    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="segspark-fit",
                            initializer=share_session, initargs=(prepared.sparkSession,)) as pool:
        futures = {pick.name: pool.submit(fit, pick) for pick in chosen}
        return {name: future.result() for name, future in futures.items()}


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
) -> list[ModelSegments]:
    """Stable ids, profiles, names and transitions of every trained model of the run, together.

    The models' raw assignments are persisted once (appended to `cached`; the caller unpersists them
    after writing), profiled in one aggregation, and matched to their previous runs with one join.
    With `sample` (the sweep's user sample; `prepared_names` its columns), every model's metrics get
    its `separation` on that sample (its first `silhouette_rows` users for the silhouette): one more
    Spark job fetches the sampled users' segments."""
    if not trained:
        return []
    names = [t.name for t in trained]
    raw = reduce(
        DataFrame.unionByName,
        [t.raw.select(F.lit(t.name).alias("model"), "user_id", *ASSIGNMENT_COLUMNS) for t in trained],
    ).persist(StorageLevel.MEMORY_AND_DISK)
    if cached is not None:
        cached.append(raw)
    raw_profiles = segment_profiles_by_model(
        features, raw.select("model", "user_id", "segment"), feature_names, category_labels=category_labels, models=names
    )
    sampled = {} if sample is None else _sampled_segments(spark, raw, sample.user_ids)
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
        assignments = profiles.with_names(
            apply_mapping(raw.where(F.col("model") == model.name).select("user_id", *ASSIGNMENT_COLUMNS), mapping)
        )
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
            model.name, model.k, model.reason, model.fitted, model.curve, assignments, profiles, mapping,
            None if before is None else before.run_id, moved, metrics,
        ))
    return built


_UNSAMPLED = -2  # a sampled user without an assignment of the model (not expected: every user is assigned)


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


def transitions_frame(spark: SparkSession, built: Sequence[ModelSegments], as_of, run_id: str) -> DataFrame | None:
    """segment_transitions rows of every model that has a previous run (None when none has)."""
    rows = [
        SegmentTransitionRow(as_of=as_of, run_id=run_id, model=m.name, from_segment=a, to_segment=b, users=int(n))
        for m in built for a, b, n in m.transitions
    ]
    if not any(m.previous_run_id for m in built):
        return None
    return TABLES["segment_transitions"].frame(spark, rows)


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

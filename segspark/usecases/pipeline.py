"""The batch pipeline: ingest -> features -> preparation -> segments per model -> Delta tables.

`run(spark, cfg)` is the library entry point used by the CLI, jobs/ and notebooks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from segspark import ingest
from segspark.bundle.store import (
    bundle_location,
    bundle_signing,
    bundle_slots,
    finish_bundle,
    models_folder,
    save_model,
    score_with_bundle,
    start_bundle,
)
from segspark.config import Config
from segspark.errors import InputSchemaError, UsageError
from segspark.evaluation.sample_metrics import sample_metrics
from segspark.features import resolve_slots, user_features
from segspark.features.behaviour import FeatureSlots
from segspark.features.catalog import category_slot_names, feature_columns
from segspark.features.finite import can_be_non_finite, check_finite, non_finite_counts
from segspark.features.runs import FeatureRun, load_feature_run
from segspark.ingest.privacy import check_same_pseudonyms, resolve_protection
from segspark.io.catalog import MODEL_SELECTION, RUNS, USER_SEGMENTS_COLUMNS
from segspark.io.catalog import USER_FEATURES_KEYS as KEYS
from segspark.io.readers import corrupt_file_error, read_with_corrupt_files
from segspark.io.tables import check_output, read_output_table, table_path, write_run_rows
from segspark.io.tracking import check_tracking, log_run
from segspark.models.deep import model as deep
from segspark.models.prepare import fit_preparation
from segspark.models.sample import UserSample, collect_user_sample
from segspark.runtime import progress
from segspark.runtime.redaction import redact_text
from segspark.runtime.run_ids import check_batch_run_id
from segspark.runtime.session import apply_required_conf, right_sized, share_session
from segspark.segments.ids import NOISE_SEGMENT
from segspark.segments.profiles import SEGMENT_PROFILES
from segspark.segments.train import (
    ModelSegments,
    TrainedModel,
    stable_segments,
    train_baselines,
    transitions_frame,
    users_check,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    as_of: dt.date | None
    status: str = "running"
    input_rows: int = 0
    clean_rows: int = 0
    quarantined_rows: int = 0
    users: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    segments: list[dict] = field(default_factory=list)  # model, segment, name, size
    tables: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@contextmanager
def _stage(result: RunResult, name: str) -> Iterator[dict]:
    """Times a stage and logs one line with its row counts when it ends."""
    counts: dict = {}
    start = time.perf_counter()
    progress.stage_started(name, counts)
    try:
        yield counts
    finally:
        progress.stage_finished(name)
    seconds = time.perf_counter() - start
    result.stage_seconds[name] = round(seconds, 3)
    detail = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in counts.items())
    log.info("stage %-9s %6.1f s  %s", name, seconds, detail)


def run(
    spark: SparkSession,
    cfg: Config,
    run_id: str | None = None,
    as_of: dt.date | None = None,
    *,
    segments: bool = True,
    bundle: str | None = None,
    from_features: bool = False,
) -> RunResult:
    """Run the batch pipeline and record the run in the `runs` table (also when it fails).

    segments=False stops after the features (`segspark features`). bundle: score the users with the
    models of an existing bundle (`segspark score`) instead of training new ones. from_features:
    train on the features an earlier `segspark features` run wrote (`segspark train`): run_id names
    that run (default: the latest succeeded one), whose record the training then completes."""
    # A run id names folders and rows: an invalid one is refused before anything is read or written.
    if run_id is not None:
        check_batch_run_id(run_id, cfg.streaming.app_id)
    apply_required_conf(spark)
    check_output(spark, cfg.output)
    source = load_feature_run(spark, cfg.output, run_id, as_of, cfg.streaming.app_id) if from_features else None
    if source is not None:
        result = RunResult(run_id=source.run_id, as_of=source.as_of)
        started_at = source.started_at
    else:
        result = RunResult(run_id=run_id or new_run_id(), as_of=as_of)
        started_at = dt.datetime.now(dt.UTC)
    log.info("run %s starting (config hash %s)", result.run_id, cfg.config_hash()[:12])
    cached: list[DataFrame] = []
    try:
        _run_stages(spark, cfg, result, cached, segments, bundle, source, started_at)
        result.status = "succeeded"
    except BaseException as exc:
        result.status = "failed"
        # A file the first read got through but a later stage's re-read did not: still the file's fault.
        unreadable = corrupt_file_error(exc, cfg.input) if isinstance(exc, Exception) else None
        failure = unreadable or exc
        result.metrics["error"] = redact_text(f"{type(failure).__name__}: {failure}")[:2000]
        if unreadable is not None:
            raise unreadable from None
        raise
    finally:
        for df in cached:
            df.unpersist()
        _record_run(spark, cfg, result, started_at)
    return result


def _run_stages(
    spark: SparkSession,
    cfg: Config,
    result: RunResult,
    cached: list[DataFrame],
    segments: bool,
    bundle: str | None,
    source: FeatureRun | None,
    started_at: dt.datetime,
) -> None:
    out = cfg.output
    run_id = result.run_id
    # Configuration problems of the later stages fail now, not after an hour of features.
    location = bundle_location(out, run_id) if segments and bundle is None else None
    if location is not None:
        check_tracking(cfg.mlflow)
    # A configured signing key that is not in the environment fails now, not after training.
    signing = bundle_signing(cfg.bundle) if segments else None

    if source is None:
        trained = bundle_slots(bundle, signing) if bundle is not None else None
        features, slots = _features_stages(spark, cfg, result, cached, started_at, trained)
    else:
        features, slots = _features_of_run(result, source, cached)
    if result.users == 0:
        raise UsageError(
            f"no user has events up to --as-of {result.as_of} (the events of input.path {cfg.input.path!r} start "
            f"{result.metrics.get('event_range', {}).get('first_event')}); choose a later --as-of, or leave it out"
        )
    if not segments:
        return
    if bundle is not None:
        _score_stage(spark, cfg, result, features, bundle, signing)
        return
    _train_stages(spark, cfg, result, cached, features, slots, location)


def _features_of_run(result: RunResult, source: FeatureRun, cached: list[DataFrame]):
    """`segspark train`: the run's counts and features as its `segspark features` run recorded them."""
    result.input_rows, result.clean_rows = source.input_rows, source.clean_rows
    result.quarantined_rows, result.reasons, result.users = source.quarantined_rows, source.reasons, source.users
    result.stage_seconds.update(source.metrics.get("stage_seconds") or {})
    carried = {k: v for k, v in source.metrics.items() if k not in ("stage_seconds", "quarantine_reasons", "error")}
    result.metrics.update(carried)
    result.metrics["event_range"] = source.event_range
    features = right_sized(source.features, source.users, bytes_per_row=16 * len(source.features.columns))
    features = features.persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(features)
    log.info("train: %d users of features run %s (as of %s)", source.users, source.run_id, source.as_of)
    return features, source.slots


def _features_stages(
    spark: SparkSession,
    cfg: Config,
    result: RunResult,
    cached: list[DataFrame],
    started_at: dt.datetime,
    slots: FeatureSlots | None = None,
):
    """ingest -> quarantine -> features: (the persisted features, their slot values). `slots`: the
    category and one-hot values of a bundle's training (scoring), else resolved from these events."""
    out, run_id = cfg.output, result.run_id
    # The pseudonym key is read before any input (a missing key is exit 2), and applied at ingest.
    protection = resolve_protection(cfg.privacy, spark)
    result.metrics["privacy"] = protection.describe()
    with _stage(result, "ingest") as counts:
        def summarise(raw: DataFrame):
            tagged = ingest.tag_events(raw, cfg.input, protection, now=started_at).persist(StorageLevel.MEMORY_AND_DISK)
            # One small aggregation gives every count and the end of the data. Dates and times are
            # formatted by Spark in the session's zone (UTC): a collected timestamp would come back in the
            # driver machine's local zone. It reads every input file, so an unreadable one fails here.
            stamp = "yyyy-MM-dd HH:mm:ss"
            try:
                return tagged, (
                    tagged.groupBy(F.col(ingest.REASON).alias("reason"))
                    .agg(F.count(F.lit(1)).alias("rows"), F.date_format(F.min("event_time"), stamp).alias("first_event"),
                         F.date_format(F.max("event_time"), stamp).alias("last_event"),
                         F.to_date(F.max("event_time")).alias("last_day"))
                    .collect()
                )
            except BaseException:
                tagged.unpersist()
                raise

        (tagged, summary), skipped = read_with_corrupt_files(spark, cfg.input, summarise)
        cached.append(tagged)
        if skipped:
            result.metrics["skipped_files"] = skipped
            counts.update(skipped_files=len(skipped))
        result.reasons = {row.reason: int(row.rows) for row in summary if row.reason is not None}
        result.clean_rows = sum(int(row.rows) for row in summary if row.reason is None)
        result.quarantined_rows = sum(result.reasons.values())
        result.input_rows = result.clean_rows + result.quarantined_rows
        clean_summary = next((row for row in summary if row.reason is None), None)
        last_day = clean_summary.last_day if clean_summary is not None else None
        result.metrics["event_range"] = {
            "first_event": str(clean_summary.first_event if clean_summary else None),
            "last_event": str(clean_summary.last_event if clean_summary else None),
        }
        counts.update(input=result.input_rows, clean=result.clean_rows, quarantined=result.quarantined_rows)
        if result.input_rows == 0:
            left_out = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
            raise InputSchemaError(
                f"input.path {cfg.input.path!r} ({cfg.input.format}) holds no events: its files have no records"
                f"{left_out}. Check input.path and input.format, or wait until events have landed there"
            )

    with _stage(result, "quarantine") as counts:
        written = write_run_rows(spark, out, "quarantine", ingest.quarantine_rows(tagged, run_id, cfg.input.path), run_id)
        result.tables["quarantine"] = table_path(out, "quarantine")
        counts.update(rows=written.rows, reasons=json.dumps(result.reasons, sort_keys=True))

    if result.as_of is None:
        if last_day is None:
            raise InputSchemaError(
                f"input {cfg.input.path!r} has no valid events: all {result.input_rows:,} records were quarantined "
                f"({', '.join(f'{k}: {v:,}' for k, v in sorted(result.reasons.items()))}); see the quarantine table, "
                "and check input.columns, input.timestamp_format and input.event_types"
            )
        result.as_of = last_day

    with _stage(result, "features") as counts:
        clean = ingest.clean_events(tagged)
        slots = slots or resolve_slots(clean, result.as_of, cfg.features)
        result.metrics["feature_slots"] = slots.as_dict()
        features = user_features(clean, result.as_of, cfg.features, slots)
        # Keys first (the table contract): Delta keeps file statistics for the first 32 columns only,
        # and replacing a run's rows finds its files by the statistics of run_id.
        features = features.select(
            "user_id", "as_of", F.lit(run_id).alias("run_id"), *[c for c in features.columns if c not in KEYS]
        ).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(features)
        # Counting the users (this pass also fills the cache the write reads) checks that no feature
        # is NaN or infinite: such rows never reach user_features.
        checked = [f.name for f in features.schema.fields if can_be_non_finite(f.dataType)]
        stats = features.agg(F.count(F.lit(1)).alias("users:"), *non_finite_counts(checked)).first().asDict()
        result.users = int(stats["users:"])
        check_finite(stats, checked, result.users, "features",
                     "check input.price_bounds and input.quantity_bounds (sums of huge values overflow to infinity); "
                     "otherwise this is a bug in the features: please report it")
        write_run_rows(spark, out, "user_features", features, run_id)
        # Every later pass and the iterative fits read these users: no more partitions than they need.
        features = right_sized(features, result.users, bytes_per_row=16 * len(features.columns))
        result.tables["user_features"] = table_path(out, "user_features")
        counts.update(users=result.users, as_of=str(result.as_of))
        # `segspark train` may use these features even if a later stage of this run fails.
        result.metrics["features_complete"] = True
    tagged.unpersist()
    return features, slots


def _train_stages(
    spark: SparkSession,
    cfg: Config,
    result: RunResult,
    cached: list[DataFrame],
    features: DataFrame,
    slots: FeatureSlots,
    location: str,
) -> None:
    """prepare -> segments (every enabled model) -> bundle (+ MLflow)."""
    out, run_id = cfg.output, result.run_id
    with _stage(result, "prepare") as counts:
        # Fitted on this run's users and saved with the run: scoring other users reuses it as is.
        prep = fit_preparation(features, feature_columns(cfg.features), cfg.prepare)
        # Too few users for a model: narrow its k range (warned and recorded) or stop before any fit
        # (and before the bundle folder is started).
        k_ranges, warnings = users_check(cfg.models, result.users, len(prep.selected))
        if warnings:
            result.metrics["warnings"] = warnings
        start_bundle(location, models_folder(out))
        prep.save(f"{location}/prepare", spark)
        result.metrics["prepare"] = prep.metrics()
        # Every fit and metric of the k sweep reads the prepared vectors: keep them.
        prepared = prep.transform(features).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(prepared)
        counts.update(inputs=len(prep.features), selected=len(prep.selected), dropped=len(prep.dropped))

    with _stage(result, "segments") as counts:
        labels = dict(zip(category_slot_names(cfg.features), slots.categories, strict=False))
        models = cfg.models
        # One hash sample of the prepared users, collected once: the k sweep, the autoencoder and
        # HDBSCAN each fit on a prefix of it.
        sample = collect_user_sample(prepared, prep.selected, _sample_size(cfg), result.users,
                                     models.selection.sample_seed)
        result.metrics["user_sample"] = {"users": sample.size, "of": sample.total_users, "seed": sample.seed}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segspark-deep") as background:
            # The autoencoder and HDBSCAN fit on the driver while the baselines' Spark jobs run (at small
            # scale those mostly wait on job latency); the deep model's own scoring job follows there.
            deep_model = (background.submit(_train_deep, spark, cfg, result, prepared, prep.selected, cached, sample)
                          if models.autoencoder.enabled else None)
            trained = train_baselines(spark, models.enabled(), models.selection, prepared, sample, k_ranges)
            if deep_model is not None:
                trained.append(deep_model.result())
        # Separation per segment on the sweep's users: the rows of the silhouette the sweep reported.
        built = stable_segments(spark, out, run_id, trained, features, feature_columns(cfg.features), labels, cached,
                                sample=sample.head(models.selection.sample_size), prepared_names=prep.selected,
                                silhouette_rows=models.selection.silhouette_sample)
        for model in built:
            if model.name == deep.MODEL_NAME:
                _note_noise(model)
        for model in built:
            result.metrics[model.name] = model.metrics
            result.segments += [
                {"model": model.name, "segment": p.segment, "name": p.name, "size": p.size}
                for p in model.profiles.segments
            ]
        if not built:
            raise ValueError(
                "no model is enabled: set models.<name>.enabled: true for kmeans, bisecting_kmeans or gmm, "
                "or models.autoencoder.enabled: true for ae_hdbscan"
            )
        _write_segment_tables(spark, cfg, result, built)
        counts.update(models=len(built), **{m.name: f"k={m.k}" for m in built})

    with _stage(result, "bundle") as counts:
        for model in built:
            save_model(location, model.name, model.fitted, model.mapping.mapping, model.profiles.names())
        manifest = finish_bundle(
            location,
            run_id=run_id,
            config_hash=cfg.config_hash(),
            as_of=result.as_of,
            features=features,
            preparation=prep,
            models=[m.name for m in built],
            training_data={"input_path": redact_text(cfg.input.path), "users": result.users, "events": result.clean_rows,
                           **result.metrics["event_range"], "as_of": str(result.as_of),
                           # scoring and streaming compute features with the slot values trained on
                           "feature_slots": slots.as_dict(), "privacy": result.metrics.get("privacy")},
            signing=bundle_signing(cfg.bundle),
        )
        result.metrics["bundle"] = {"path": location, "content_sha256": manifest.content_sha256}
        result.tables["bundle"] = location
        counts.update(files=len(manifest.files), models=",".join(manifest.models))
        if cfg.mlflow.tracking_uri:
            mlflow_run = log_run(
                cfg.mlflow, run_id=run_id, params=cfg.redacted(), metrics=result.metrics, bundle_dir=location,
                experiment=cfg.mlflow.experiment, tags={"segspark.as_of": str(result.as_of)},
            )
            result.metrics["mlflow_run_id"] = mlflow_run
            counts.update(mlflow_run=mlflow_run)


def _score_stage(
    spark: SparkSession, cfg: Config, result: RunResult, features: DataFrame, bundle: str, signing=None
) -> None:
    """`segspark score`: every model of an existing bundle applied to this run's users."""
    out, run_id = cfg.output, result.run_id
    with _stage(result, "score") as counts:
        scored = score_with_bundle(bundle, features, signing)
        check_same_pseudonyms(scored.manifest.training_data.get("privacy"), result.metrics.get("privacy"), bundle)
        keys = [F.lit(result.as_of).cast("date").alias("as_of"), F.lit(run_id).alias("run_id")]
        try:
            if scored.embeddings is not None:
                write_run_rows(spark, out, "user_embeddings", scored.embeddings.select("user_id", *keys, "embedding"), run_id)
                result.tables["user_embeddings"] = table_path(out, "user_embeddings")
            rows = None
            for name, assignments in scored.assignments.items():
                frame = assignments.select("user_id", *keys, F.lit(name).alias("model"), *USER_SEGMENTS_COLUMNS[4:])
                rows = frame if rows is None else rows.unionByName(frame)
            written = write_run_rows(spark, out, "user_segments", rows, run_id)
            result.tables["user_segments"] = table_path(out, "user_segments")
        finally:
            for frame in scored.cached:
                frame.unpersist()
        result.metrics["scored_with_bundle"] = {
            "path": bundle, "run_id": scored.manifest.run_id, "content_sha256": scored.manifest.content_sha256,
            "models": list(scored.manifest.models),
        }
        # Segment sizes from the rows just written (a small aggregate; the scoring is not recomputed).
        sizes = (
            read_output_table(spark, out, "user_segments")
            .filter(F.col("run_id") == run_id)
            .groupBy("model", "segment", "segment_name")
            .count()
            .collect()
        )
        order = {name: i for i, name in enumerate(scored.manifest.models)}
        result.segments = [
            {"model": r.model, "segment": r.segment, "name": r.segment_name, "size": r["count"]}
            for r in sorted(sizes, key=lambda r: (order.get(r.model, len(order)), r.segment))
        ]
        counts.update(bundle_run=scored.manifest.run_id, rows=written.rows)


def _sample_size(cfg: Config) -> int:
    """Users the run's sample needs: the largest of the sweep's, the autoencoder's and HDBSCAN's."""
    models = cfg.models
    sizes = [models.selection.sample_size]
    if models.autoencoder.enabled:
        sizes += [models.autoencoder.sample_size, models.hdbscan.sample_size]
    return max(sizes)


def _train_deep(
    spark: SparkSession,
    cfg: Config,
    result: RunResult,
    prepared: DataFrame,
    model_inputs: list[str],
    cached: list[DataFrame],
    sample: UserSample,
) -> TrainedModel:
    """ae_hdbscan: fit on prefixes of the user sample (on the driver), score every user once
    (embeddings + segments) and write the embeddings."""
    out, run_id = cfg.output, result.run_id
    share_session(spark)
    fitted = deep.fit_deep(sample, cfg.models.autoencoder, cfg.models.hdbscan, model_inputs)
    scores = fitted.scores(prepared).persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(scores)
    keys = [F.lit(result.as_of).cast("date").alias("as_of"), F.lit(run_id).alias("run_id")]
    write_run_rows(spark, out, "user_embeddings", scores.select("user_id", *keys, "embedding"), run_id)
    result.tables["user_embeddings"] = table_path(out, "user_embeddings")

    # Quality of the clusters on HDBSCAN's own fitting sample (its non-noise embeddings), in memory.
    kept = fitted.sample_labels != NOISE_SEGMENT
    quality = sample_metrics(fitted.sample_embeddings[kept], fitted.sample_labels[kept],
                             cfg.models.selection.silhouette_sample)
    hdb_metrics = fitted.hdbscan_metrics
    reason = (
        f"k={fitted.k}: the clusters HDBSCAN found in {hdb_metrics.get('sample_rows')} sampled embeddings "
        f"(min_cluster_size={hdb_metrics.get('min_cluster_size')}, min_samples={hdb_metrics.get('min_samples')})"
    )
    if hdb_metrics.get("assign_noise"):
        reason += (f"; {hdb_metrics.get('density_noise_share', 0.0):.1%} of the sample lay between clusters and "
                   "joined the nearest one, anomalies excepted")
    curve = [{"k": fitted.k, "sample_users": int(kept.sum()), **{m: quality.get(m) for m in _CURVE_METRICS}}]
    metrics = {"k": fitted.k, "reason": reason, "curve": curve, "model": fitted.metrics()}
    # Its segments are clusters of the embeddings: their separation is measured there too.
    return TrainedModel(deep.MODEL_NAME, fitted.k, reason, fitted, curve, fitted.assign(prepared, scores), metrics,
                        embed=lambda rows: fitted.encoder.encode(rows.astype(np.float32)), space="autoencoder embeddings")


def _note_noise(model: ModelSegments) -> None:
    """The deep model's reason ends with the share of every user called noise (from its profiles)."""
    noise = next((p.share for p in model.profiles.segments if p.segment == NOISE_SEGMENT), 0.0)
    model.reason = f"{model.reason}; {noise:.1%} of users are noise (segment -1)"
    model.metrics.update(reason=model.reason, noise_share=noise)
    log.info("%s: %s", model.name, model.reason)


_CURVE_METRICS = ("silhouette", "silhouette_sq", "davies_bouldin", "calinski_harabasz", "wss", "dunn")


def _write_segment_tables(spark: SparkSession, cfg: Config, result: RunResult, built: list) -> None:
    """One commit per table for all models, so that a run's rows appear (and are replaced) together.
    The tables are independent, so the small ones are written while user_segments is."""
    out, run_id, as_of = cfg.output, result.run_id, result.as_of
    keys = [F.lit(as_of).cast("date").alias("as_of"), F.lit(run_id).alias("run_id")]
    segments = reduce(DataFrame.unionByName, [
        model.assignments.select("user_id", *keys, F.lit(model.name).alias("model"), *USER_SEGMENTS_COLUMNS[4:])
        for model in built
    ])
    small = {
        "model_selection": spark.createDataFrame(
            [row for model in built for row in _selection_rows(model, as_of, run_id)], MODEL_SELECTION
        ),
        "segment_profiles": spark.createDataFrame(
            [row for model in built for row in model.profiles.to_rows(as_of, run_id, model.name)], SEGMENT_PROFILES
        ),
    }
    moves = transitions_frame(spark, built, as_of, run_id)
    if moves is not None:
        small["segment_transitions"] = moves
    with ThreadPoolExecutor(max_workers=len(small), thread_name_prefix="segspark-write",
                            initializer=share_session, initargs=(spark,)) as pool:
        pending = [pool.submit(write_run_rows, spark, out, name, frame, run_id) for name, frame in small.items()]
        written = write_run_rows(spark, out, "user_segments", segments, run_id)
        for future in pending:
            future.result()
    for name in ("user_segments", *small):
        result.tables[name] = table_path(out, name)
    log.info("segments written: %s user_segments rows", f"{written.rows:,}" if written.rows >= 0 else "?")


def _selection_rows(model, as_of: dt.date, run_id: str) -> list[tuple]:
    def number(entry: dict, key: str):
        value = entry.get(key)
        return None if value is None else float(value)

    rows = []
    for entry in model.curve:
        chosen = entry["k"] == model.k
        rows.append(
            (
                as_of, run_id, model.name, int(entry["k"]), chosen, model.reason if chosen else None,
                entry.get("best_seed"), len(entry.get("seed_objectives") or []) or None, number(entry, "seed_ari"),
                number(entry, "objective"), number(entry, "silhouette"), number(entry, "silhouette_sq"),
                number(entry, "davies_bouldin"), number(entry, "calinski_harabasz"), number(entry, "wss"),
                number(entry, "bic"), number(entry, "aic"), entry.get("degenerate_retries"),
                number(entry, "dunn"), entry.get("sample_users"), number(entry, "full_objective"),
                entry.get("full_cluster_sizes"),
            )
        )
    return rows


def _record_run(spark: SparkSession, cfg: Config, result: RunResult, started_at: dt.datetime) -> None:
    metrics = {**result.metrics, "stage_seconds": result.stage_seconds, "quarantine_reasons": result.reasons}
    row = (
        result.run_id,
        started_at,
        dt.datetime.now(dt.UTC),
        result.status,
        cfg.config_hash(),
        result.as_of,
        result.input_rows,
        result.clean_rows,
        result.quarantined_rows,
        result.users,
        json.dumps(metrics, sort_keys=True, default=str),
    )
    try:
        write_run_rows(spark, cfg.output, "runs", spark.createDataFrame([row], RUNS), result.run_id)
        result.tables["runs"] = table_path(cfg.output, "runs")
    except Exception:
        if result.status == "succeeded":
            raise
        # The run already failed; keep its original error as the one reported.
        log.exception("could not record failed run %s in the runs table", result.run_id)

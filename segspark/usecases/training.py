"""The training stages of a run: prepare -> segments (every enabled model) -> bundle (+ MLflow)."""

from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.bundle.store import bundle_signing, finish_bundle, models_folder, save_model, start_bundle
from segspark.config import Config
from segspark.features.behaviour import FeatureSlots
from segspark.features.catalog import category_slot_names, feature_columns
from segspark.io.catalog import USER_SEGMENTS_COLUMNS, ModelSelectionRow
from segspark.io.tables import table_path, write_rows
from segspark.io.tracking import log_run
from segspark.models import registry
from segspark.models.contract import TrainedModel
from segspark.models.prepare import fit_preparation
from segspark.models.sample import UserSample, collect_user_sample
from segspark.runtime.redaction import redact_text
from segspark.runtime.session import share_session
from segspark.segments.ids import NOISE_SEGMENT
from segspark.segments.stable import ModelSegments, RunSegments, stable_segments, transition_rows
from segspark.segments.train import train_baselines, users_check
from segspark.usecases.context import RunContext

log = logging.getLogger(__name__)


def train_models(ctx: RunContext, features: DataFrame, slots: FeatureSlots, location: str) -> None:
    """prepare -> segments (every enabled model) -> bundle (+ MLflow), the bundle at `location`."""
    spark, cfg, result = ctx.spark, ctx.cfg, ctx.result
    out, run_id = cfg.output, result.run_id
    with ctx.stage("prepare") as counts:
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
        prepared = ctx.keep(prep.transform(features))
        counts.update(inputs=len(prep.features), selected=len(prep.selected), dropped=len(prep.dropped))

    with ctx.stage("segments") as counts:
        labels = dict(zip(category_slot_names(cfg.features), slots.categories, strict=False))
        models = cfg.models
        # One hash sample of the prepared users, collected once: the k sweep, the autoencoder and
        # HDBSCAN each fit on a prefix of it.
        enabled = registry.enabled(models)
        swept = {m.name: m.settings(models) for m in enabled if m.swept}
        own_k = [m for m in enabled if not m.swept]
        sample = collect_user_sample(prepared, prep.selected, _sample_size(cfg, own_k), result.users,
                                     models.selection.sample_seed)
        result.metrics["user_sample"] = {"users": sample.size, "of": sample.total_users, "seed": sample.seed}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segspark-own-k") as background:
            # Models that find their own k (the autoencoder and HDBSCAN) fit on the driver while the
            # swept models' Spark jobs run (at small scale those mostly wait on job latency); their own
            # scoring job and output tables follow there.
            pending = [background.submit(_train_own_k, ctx, m, prepared, prep.selected, sample) for m in own_k]
            trained = train_baselines(spark, swept, models.selection, prepared, sample, k_ranges)
            for model in trained:
                ctx.cached.extend(model.scored.cached)
                _write_outputs(ctx, model.scored)
            trained += [future.result() for future in pending]
        # Separation per segment on the sweep's users: the rows of the silhouette the sweep reported.
        segments = stable_segments(spark, out, run_id, trained, features, feature_columns(cfg.features), labels,
                                   ctx.cached, sample=sample.head(models.selection.sample_size),
                                   prepared_names=prep.selected, silhouette_rows=models.selection.silhouette_sample)
        built = segments.models
        for model in built:
            if registry.get(model.name).noise:
                _note_noise(model)
        for model in built:
            result.metrics[model.name] = model.metrics
            result.segments += [
                {"model": model.name, "segment": p.segment, "name": p.name, "size": p.size}
                for p in model.profiles.segments
            ]
        if not built:
            choices = ", ".join(f"models.{m.config_key}.enabled: true for {m.name}" for m in registry.MODELS)
            raise ValueError(f"no model is enabled: set {choices}")
        _write_segment_tables(ctx, segments)
        counts.update(models=len(built), **{m.name: f"k={m.k}" for m in built})

    with ctx.stage("bundle") as counts:
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


def _sample_size(cfg: Config, own_k: list) -> int:
    """Users the run's sample needs: the largest of the sweep's and of what the other models fit on."""
    models = cfg.models
    return max([models.selection.sample_size, *[m.implementation().sample_size(models) for m in own_k]])


def _train_own_k(ctx: RunContext, model, prepared: DataFrame, model_inputs: list[str], sample: UserSample) -> TrainedModel:
    """A model that finds its own k, trained (in a background thread) and its output tables written."""
    share_session(ctx.spark)
    trained = model.implementation().train(prepared, sample, ctx.cfg.models, model_inputs)
    ctx.cached.extend(trained.scored.cached)
    _write_outputs(ctx, trained.scored)
    return trained


def _write_outputs(ctx: RunContext, scored) -> None:
    """The tables a model adds besides its segments (the deep model's user_embeddings)."""
    keys = [F.lit(ctx.result.as_of).cast("date").alias("as_of"), F.lit(ctx.run_id).alias("run_id")]
    for table, frame in scored.outputs.items():
        write_rows(ctx.spark, ctx.cfg.output, table, frame.select("user_id", *keys, *frame.columns[1:]), ctx.run_id)
        ctx.result.tables[table] = table_path(ctx.cfg.output, table)


def _note_noise(model: ModelSegments) -> None:
    """The deep model's reason ends with the share of every user called noise (from its profiles)."""
    noise = next((p.share for p in model.profiles.segments if p.segment == NOISE_SEGMENT), 0.0)
    model.reason = f"{model.reason}; {noise:.1%} of users are noise (segment -1)"
    model.metrics.update(reason=model.reason, noise_share=noise)
    log.info("%s: %s", model.name, model.reason)


def _write_segment_tables(ctx: RunContext, run_segments: RunSegments) -> None:
    """One commit per table for all models, so that a run's rows appear (and are replaced) together.
    The tables are independent, so the small ones are written while user_segments is."""
    spark, cfg, result = ctx.spark, ctx.cfg, ctx.result
    out, run_id, as_of = cfg.output, result.run_id, result.as_of
    built = run_segments.models
    keys = [F.lit(as_of).cast("date").alias("as_of"), F.lit(run_id).alias("run_id")]
    segments = run_segments.assignments.select("user_id", *keys, "model", *USER_SEGMENTS_COLUMNS[4:])
    # Typed rows: the embedded committer writes them on the driver, without a Spark job.
    small = {
        "model_selection": [row for model in built for row in _selection_rows(model, as_of, run_id)],
        "segment_profiles": [row for model in built for row in model.profiles.to_rows(as_of, run_id, model.name)],
    }
    moves = transition_rows(built, as_of, run_id)
    if moves is not None:
        small["segment_transitions"] = moves
    with ThreadPoolExecutor(max_workers=len(small), thread_name_prefix="segspark-write",
                            initializer=share_session, initargs=(spark,)) as pool:
        pending = [pool.submit(write_rows, spark, out, name, frame, run_id) for name, frame in small.items()]
        written = write_rows(spark, out, "user_segments", segments, run_id)
        for future in pending:
            future.result()
    for name in ("user_segments", *small):
        result.tables[name] = table_path(out, name)
    log.info("segments written: %s user_segments rows", f"{written.rows:,}" if written.rows >= 0 else "?")


def _selection_rows(model, as_of: dt.date, run_id: str) -> list[ModelSelectionRow]:
    def number(entry: dict, key: str):
        value = entry.get(key)
        return None if value is None else float(value)

    rows = []
    for entry in model.curve:
        chosen = entry["k"] == model.k
        rows.append(
            ModelSelectionRow(
                as_of=as_of, run_id=run_id, model=model.name, k=int(entry["k"]), chosen=chosen,
                reason=model.reason if chosen else None, best_seed=entry.get("best_seed"),
                seeds=len(entry.get("seed_objectives") or []) or None, seed_ari=number(entry, "seed_ari"),
                objective=number(entry, "objective"), silhouette=number(entry, "silhouette"),
                silhouette_sq=number(entry, "silhouette_sq"), davies_bouldin=number(entry, "davies_bouldin"),
                calinski_harabasz=number(entry, "calinski_harabasz"), wss=number(entry, "wss"),
                bic=number(entry, "bic"), aic=number(entry, "aic"),
                degenerate_retries=entry.get("degenerate_retries"), dunn=number(entry, "dunn"),
                sample_users=entry.get("sample_users"), full_objective=number(entry, "full_objective"),
                full_cluster_sizes=entry.get("full_cluster_sizes"),
            )
        )
    return rows



"""The use cases: what the CLI, the jobs and the notebook call, one function each.

- `features`: ingest -> quarantine -> features (`segspark features`);
- `train`: prepare -> segments -> bundle on the features an earlier `features` run wrote, completing
  that run's record (`segspark train`);
- `run`: both in one run (`segspark run`);
- `score`: the features of new data, scored with the models of an existing bundle (`segspark score`).

Each records its run in the `runs` table, also when it fails (context.execute), and returns the
run's `RunResult`.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import SparkSession

from segspark.bundle.store import bundle_location, bundle_signing, bundle_slots
from segspark.config import Config
from segspark.features.runs import load_feature_run
from segspark.io.tracking import check_tracking
from segspark.models import registry
from segspark.usecases.context import RunContext, RunResult, begin, execute, new_run_id
from segspark.usecases.featurize import compute_features, features_of_run
from segspark.usecases.scoring import score_users
from segspark.usecases.training import train_models


def _context(spark: SparkSession, cfg: Config, run_id: str | None, as_of: dt.date | None) -> RunContext:
    begin(spark, cfg, run_id)
    result = RunResult(run_id=run_id or new_run_id(), as_of=as_of)
    return RunContext(spark, cfg, result, started_at=dt.datetime.now(dt.UTC))


def _training_checks(ctx: RunContext) -> str:
    """Configuration problems of the training stages fail before any work, not after an hour of
    features: the bundle's location, MLflow tracking and a signing key missing from the environment.
    Returns where the run's bundle goes. The checks passed, the models start loading what their
    fits need (registry.warm_up), beside the stages before the fits."""
    location = bundle_location(ctx.cfg.output, ctx.run_id)
    check_tracking(ctx.cfg.mlflow)
    bundle_signing(ctx.cfg.bundle)
    registry.warm_up(ctx.cfg.models)
    return location


def features(spark: SparkSession, cfg: Config, run_id: str | None = None, as_of: dt.date | None = None) -> RunResult:
    """Ingest and compute the user features: tables quarantine and user_features, and the run's record."""
    return execute(_context(spark, cfg, run_id, as_of), compute_features)


def run(spark: SparkSession, cfg: Config, run_id: str | None = None, as_of: dt.date | None = None) -> RunResult:
    """The whole batch pipeline: features, then every enabled model, segment tables and the bundle."""

    def body(ctx: RunContext) -> None:
        location = _training_checks(ctx)
        users, slots = compute_features(ctx)
        train_models(ctx, users, slots, location)

    return execute(_context(spark, cfg, run_id, as_of), body)


def train(spark: SparkSession, cfg: Config, run_id: str | None = None, as_of: dt.date | None = None) -> RunResult:
    """Train on the features of the `features` run `run_id` (default: the latest succeeded one, or the
    latest as of `as_of`), whose record the training then completes."""
    begin(spark, cfg, run_id)
    source = load_feature_run(spark, cfg.output, run_id, as_of, cfg.streaming.app_id)
    ctx = RunContext(spark, cfg, RunResult(run_id=source.run_id, as_of=source.as_of), started_at=source.started_at)

    def body(ctx: RunContext) -> None:
        location = _training_checks(ctx)
        users, slots = features_of_run(ctx, source)
        train_models(ctx, users, slots, location)

    return execute(ctx, body)


def score(
    spark: SparkSession, cfg: Config, bundle: str, run_id: str | None = None, as_of: dt.date | None = None
) -> RunResult:
    """Compute the features of `cfg.input`'s events with the slot values the bundle was trained on, and
    assign every user a segment of each of the bundle's models (no training)."""

    def body(ctx: RunContext) -> None:
        signing = bundle_signing(cfg.bundle)
        users, _ = compute_features(ctx, bundle_slots(bundle, signing))
        score_users(ctx, users, bundle, signing)

    return execute(_context(spark, cfg, run_id, as_of), body)


__all__ = ["RunResult", "features", "new_run_id", "run", "score", "train"]

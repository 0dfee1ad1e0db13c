"""The feature stages of a run: ingest -> quarantine -> features (`compute_features`), or the
features an earlier `segspark features` run wrote (`features_of_run`, for `segspark train`)."""

from __future__ import annotations

import json
import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark import ingest
from segspark.errors import InputSchemaError, UsageError
from segspark.features import resolve_slots, user_features
from segspark.features.behaviour import FeatureSlots
from segspark.features.finite import can_be_non_finite, check_finite, non_finite_counts
from segspark.features.runs import FeatureRun
from segspark.ingest.privacy import resolve_protection
from segspark.io.catalog import USER_FEATURES_KEYS as KEYS
from segspark.io.readers import read_with_corrupt_files
from segspark.io.tables import table_path, write_rows
from segspark.runtime.session import right_sized
from segspark.usecases.context import RunContext

log = logging.getLogger(__name__)


def compute_features(ctx: RunContext, slots: FeatureSlots | None = None) -> tuple[DataFrame, FeatureSlots]:
    """ingest -> quarantine -> features: (the persisted features, their slot values). `slots`: the
    category and one-hot values of a bundle's training (scoring), else resolved from these events."""
    spark, cfg, result = ctx.spark, ctx.cfg, ctx.result
    out, run_id = cfg.output, result.run_id
    # The pseudonym key is read before any input (a missing key is exit 2), and applied at ingest.
    protection = resolve_protection(cfg.privacy, spark)
    result.metrics["privacy"] = protection.describe()
    with ctx.stage("ingest") as counts:
        ingested, skipped = read_with_corrupt_files(
            spark, cfg.input,
            lambda raw: ingest.ingest_records(ctx.size_shuffles(raw), cfg.input, protection, now=ctx.started_at),
        )
        ctx.cached.append(ingested.tagged)
        if skipped:
            result.metrics["skipped_files"] = skipped
            counts.update(skipped_files=len(skipped))
        result.reasons = dict(ingested.reasons)
        result.clean_rows, result.quarantined_rows = ingested.clean_rows, ingested.quarantined_rows
        result.input_rows = ingested.input_rows
        result.metrics["event_range"] = {"first_event": str(ingested.first_event), "last_event": str(ingested.last_event)}
        counts.update(input=result.input_rows, clean=result.clean_rows, quarantined=result.quarantined_rows)
        if result.input_rows == 0:
            left_out = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
            raise InputSchemaError(
                f"input.path {cfg.input.path!r} ({cfg.input.format}) holds no events: its files have no records"
                f"{left_out}. Check input.path and input.format, or wait until events have landed there"
            )

    with ctx.stage("quarantine") as counts:
        written = ingest.write_quarantine(spark, out, ingested, run_id, cfg.input.path)
        result.tables["quarantine"] = table_path(out, "quarantine")
        counts.update(rows=written.rows, reasons=json.dumps(result.reasons, sort_keys=True))

    if result.as_of is None:
        if ingested.last_day is None:
            raise InputSchemaError(
                f"input {cfg.input.path!r} has no valid events: all {result.input_rows:,} records were quarantined "
                f"({', '.join(f'{k}: {v:,}' for k, v in sorted(result.reasons.items()))}); see the quarantine table, "
                "and check input.columns, input.timestamp_format and input.event_types"
            )
        result.as_of = ingested.last_day

    with ctx.stage("features") as counts:
        clean = ingested.clean
        slots = slots or resolve_slots(clean, result.as_of, cfg.features)
        result.metrics["feature_slots"] = slots.as_dict()
        result.metrics["feature_paths"] = ingested.source_keys.describe(cfg.features)
        features = user_features(clean, result.as_of, cfg.features, slots, ingested.source_keys)
        # Keys first (the table contract): Delta keeps file statistics for the first 32 columns only,
        # and replacing a run's rows finds its files by the statistics of run_id.
        features = ctx.keep(features.select(
            "user_id", "as_of", F.lit(run_id).alias("run_id"), *[c for c in features.columns if c not in KEYS]
        ))
        # Counting the users (this pass also fills the cache the write reads) checks that no feature
        # is NaN or infinite: such rows never reach user_features.
        checked = [f.name for f in features.schema.fields if can_be_non_finite(f.dataType)]
        stats = features.agg(F.count(F.lit(1)).alias("users:"), *non_finite_counts(checked)).first().asDict()
        result.users = int(stats["users:"])
        check_finite(stats, checked, result.users, "features",
                     "check input.price_bounds and input.quantity_bounds (sums of huge values overflow to infinity); "
                     "otherwise this is a bug in the features: please report it")
        write_rows(spark, out, "user_features", features, run_id)
        # Every later pass and the iterative fits read these users: no more partitions than they need.
        features = right_sized(features, result.users, bytes_per_row=16 * len(features.columns))
        result.tables["user_features"] = table_path(out, "user_features")
        counts.update(users=result.users, as_of=str(result.as_of))
        # `segspark train` may use these features even if a later stage of this run fails.
        result.metrics["features_complete"] = True
    ingested.unpersist()
    require_users(ctx)
    return features, slots


def features_of_run(ctx: RunContext, source: FeatureRun) -> tuple[DataFrame, FeatureSlots]:
    """`segspark train`: the run's counts and features as its `segspark features` run recorded them."""
    result = ctx.result
    result.input_rows, result.clean_rows = source.input_rows, source.clean_rows
    result.quarantined_rows, result.reasons, result.users = source.quarantined_rows, source.reasons, source.users
    result.stage_seconds.update(source.metrics.get("stage_seconds") or {})
    carried = {k: v for k, v in source.metrics.items() if k not in ("stage_seconds", "quarantine_reasons", "error")}
    result.metrics.update(carried)
    result.metrics["event_range"] = source.event_range
    features = ctx.keep(right_sized(source.features, source.users, bytes_per_row=16 * len(source.features.columns)))
    log.info("train: %d users of features run %s (as of %s)", source.users, source.run_id, source.as_of)
    require_users(ctx)
    return features, source.slots


def require_users(ctx: RunContext) -> None:
    result = ctx.result
    if result.users == 0:
        raise UsageError(
            f"no user has events up to --as-of {result.as_of} (the events of input.path {ctx.cfg.input.path!r} start "
            f"{result.metrics.get('event_range', {}).get('first_event')}); choose a later --as-of, or leave it out"
        )

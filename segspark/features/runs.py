"""An earlier run's features as the input of `segspark train`.

`segspark features` and `segspark train` split one run in two (two tasks of a Databricks job, say,
or features daily and training weekly): the first writes `user_features` and a `runs` row, the
second trains on those rows under the same run id and completes that run's record. What training
needs besides the rows comes from the features run's `runs` row: the input counts (so that
`input_rows = clean_rows + quarantined_rows` still holds for the run), the quarantine reasons, the
category slot values behind the slot columns, and the range of the events.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from segspark.config import OutputConfig
from segspark.errors import ConfigError
from segspark.features.behaviour import FeatureSlots
from segspark.io.tables import output_table_exists, read_output_table, table_path
from segspark.runtime.run_ids import STREAM_NAMESPACE, check_batch_run_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureRun:
    run_id: str
    as_of: dt.date
    started_at: dt.datetime
    features: DataFrame  # user_features rows of the run (user_id, as_of, run_id + features)
    users: int
    input_rows: int
    clean_rows: int
    quarantined_rows: int
    reasons: dict[str, int]
    slots: FeatureSlots
    event_range: dict  # first_event, last_event (strings; None for runs recorded before they were kept)
    metrics: dict  # the features run's own metrics, carried into the completed run


def load_feature_run(
    spark: SparkSession, output: OutputConfig, run_id: str | None, as_of: dt.date | None,
    app_id: str = STREAM_NAMESPACE,
) -> FeatureRun:
    """The features of run `run_id` (default: the latest batch run whose features are complete),
    checked against `as_of`. The id read back from `runs` is checked like --run-id (segspark.runtime.run_ids,
    `app_id`: the stream namespace): training writes its bundle folder under it.

    ConfigError (exit 2) when there is no such run, it did not succeed, it has no features, or its
    as_of is not the one asked for: each message says what was found and what to run instead."""
    runs_path = table_path(output, "runs")
    if not output_table_exists(spark, output, "runs") or not output_table_exists(spark, output, "user_features"):
        raise ConfigError(
            f"train: no features under output.root={output.root!r} (tables runs and user_features not found); "
            "run `segspark features --config FILE` first, or `segspark run` for features and training in one go"
        )
    runs = read_output_table(spark, output, "runs")
    # A run whose features were written: it succeeded, or a later stage (a training) failed after them.
    complete = (F.col("status") == "succeeded") | (F.get_json_object("metrics", "$.features_complete") == "true")
    if run_id is None:
        # A stream's runs row (metrics.stream) holds no features: never the one to train on.
        batch = F.get_json_object("metrics", "$.stream").isNull()
        latest = runs.where(complete & batch).orderBy(F.col("finished_at").desc()).limit(1).collect()
        if not latest:
            raise ConfigError(f"train: no run with complete features in {runs_path}; run `segspark features` first")
        record = latest[0]
        log.info("train: using the features of the latest run %s", record.run_id)
    else:
        found = runs.where(F.col("run_id") == run_id).collect()
        if not found:
            raise ConfigError(
                f"train: --run-id {run_id!r} is not in {runs_path}; run `segspark features --run-id {run_id}` first"
            )
        record = found[0]
    check_batch_run_id(record.run_id, app_id, source=f"the run id read from {runs_path}")
    metrics = json.loads(record.metrics or "{}")
    if record.status != "succeeded" and not metrics.get("features_complete"):
        raise ConfigError(
            f"train: run {record.run_id!r} has status {record.status!r}; its features are incomplete. "
            f"Re-run `segspark features --run-id {record.run_id}`"
        )
    if as_of is not None and record.as_of != as_of:
        raise ConfigError(
            f"train: run {record.run_id!r} computed features as of {record.as_of}, not --as-of {as_of}; "
            "leave --as-of out, or compute features for that date first"
        )
    features = read_output_table(spark, output, "user_features").where(F.col("run_id") == record.run_id)
    slots = metrics.get("feature_slots")
    if slots is None:
        raise ConfigError(f"train: run {record.run_id!r} recorded no feature slots; re-run `segspark features`")
    users = int(record.users or 0)
    if users == 0:
        raise ConfigError(f"train: run {record.run_id!r} has no user features; re-run `segspark features`")
    return FeatureRun(
        run_id=record.run_id,
        as_of=record.as_of,
        started_at=record.started_at,
        features=features,
        users=users,
        input_rows=int(record.input_rows or 0),
        clean_rows=int(record.clean_rows or 0),
        quarantined_rows=int(record.quarantined_rows or 0),
        reasons={str(k): int(v) for k, v in (metrics.get("quarantine_reasons") or {}).items()},
        slots=FeatureSlots(categories=list(slots.get("categories") or []), one_hot=dict(slots.get("one_hot") or {})),
        event_range=dict(metrics.get("event_range") or {"first_event": None, "last_event": None}),
        metrics=metrics,
    )

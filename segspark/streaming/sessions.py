"""Sessions as mergeable state: a stream's batches give the same sessions as one batch over all events.

The batch features (`features.behaviour.with_sessions`) key a user's sessions by the source's
session id when an event has one, and otherwise by gap-based numbering over ALL of the user's
events in time order (a new session after more than `features.session_gap_minutes` of inactivity).
Both are kept as per-user state that a micro-batch merges into, in any arrival order (late and
out-of-order events included):

* `source` rows (user_id, session_id, start, end): a source session's first and last event time;
  merging is min/max per key;
* `gap` rows (user_id, start, end, own_start, own_end, own_events): maximal runs of events whose
  consecutive gaps are at most the session gap, over all events, with the first and last time and
  the number of the events in the run that have no source session id (the events that make it a
  gap session of its own). Merging sorts a user's runs by start and starts a new run where the start
  is more than the gap after the latest end so far: the connected runs of the union of the events,
  which is exactly the batch numbering.

A micro-batch's rows are computed relationally (`session_state`, `connect_runs`: a window over the
batch's events); the stream keeps them per user as arrays, and merges a user's old and new arrays
within the row (`merge_runs`, `feature_state.merge_keyed`): no rows move between tasks.

`session_features` then gives `sessions`, `session_duration_mean_min` and
`session_duration_median_min` from the state with the batch's own expressions over the same
per-session minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from segspark.config import FeaturesConfig


@dataclass(frozen=True)
class SessionState:
    source: DataFrame  # user_id, session_id, start, end
    gap: DataFrame  # user_id, start, end, own_start, own_end, own_events


def session_state(events: DataFrame, cfg: FeaturesConfig) -> SessionState:
    """The session state of a set of clean canonical events (one micro-batch, say)."""
    has_id = F.col("session_id").isNotNull() if cfg.use_source_sessions else F.lit(False)
    source = (
        events.where(has_id)
        .groupBy("user_id", "session_id")
        .agg(F.min("event_time").alias("start"), F.max("event_time").alias("end"))
    )
    return SessionState(source, connect_runs(event_runs(events, ~has_id), cfg.session_gap_minutes * 60))


def event_runs(events: DataFrame, own: Column) -> DataFrame:
    """Each event as a run of its own (start = end = its time), own_* set where `own` holds."""
    return events.select(
        "user_id",
        F.col("event_time").alias("start"),
        F.col("event_time").alias("end"),
        F.when(own, F.col("event_time")).alias("own_start"),
        F.when(own, F.col("event_time")).alias("own_end"),
        own.cast("long").alias("own_events"),
    )


def merge_runs(a: Column, b: Column, gap_seconds: int, runs_type: str) -> Column:
    """`connect_runs` within a row: two arrays of one user's runs (struct<start, end, own_start,
    own_end, own_events>, of type `runs_type`) joined into maximal runs whose gaps are at most
    gap_seconds. The runs are sorted by start, then end (the struct's field order), and folded: a run
    starts a new one where its start is more than the gap after the latest end so far (the last
    run's end, as the runs before it ended earlier), else it extends the last one."""

    def step(runs: Column, run: Column) -> Column:
        last = F.try_element_at(runs, F.lit(-1))  # null for the first run: no element to read
        starts_new = last.isNull() | ((run["start"].cast("long") - last["end"].cast("long")) > gap_seconds)
        extended = F.struct(
            last["start"].alias("start"),
            F.greatest(last["end"], run["end"]).alias("end"),
            F.least(last["own_start"], run["own_start"]).alias("own_start"),  # least/greatest skip nulls
            F.greatest(last["own_end"], run["own_end"]).alias("own_end"),
            (last["own_events"] + run["own_events"]).alias("own_events"),
        )
        return F.when(starts_new, F.concat(runs, F.array(run).cast(runs_type))).otherwise(
            F.concat(F.slice(runs, 1, F.size(runs) - 1), F.array(extended).cast(runs_type))
        )

    return F.aggregate(F.array_sort(F.concat(a, b)), F.array().cast(runs_type), step)


def connect_runs(runs: DataFrame, gap_seconds: int) -> DataFrame:
    """Runs (or single events) joined into maximal runs whose gaps are at most gap_seconds."""
    by_start = Window.partitionBy("user_id").orderBy("start", "end")
    latest_end = F.max("end").over(by_start.rowsBetween(Window.unboundedPreceding, -1))
    # The batch rule on event times in whole seconds: (t - previous) > gap starts a new session.
    starts = (latest_end.isNull() | ((F.col("start").cast("long") - latest_end.cast("long")) > gap_seconds)).cast("int")
    numbered = runs.withColumn("_new", starts).withColumn(
        "_run", F.sum("_new").over(by_start.rowsBetween(Window.unboundedPreceding, 0))
    )
    return numbered.groupBy("user_id", "_run").agg(
        F.min("start").alias("start"),
        F.max("end").alias("end"),
        F.min("own_start").alias("own_start"),
        F.max("own_end").alias("own_end"),
        F.sum("own_events").alias("own_events"),
    ).drop("_run")


def session_features(state: SessionState, cfg: FeaturesConfig) -> DataFrame:
    """user_id, sessions, session_duration_mean_min, session_duration_median_min (as the batch)."""
    minutes = [
        state.source.select(
            "user_id", ((F.col("end").cast("double") - F.col("start").cast("double")) / 60.0).alias("_minutes")
        ),
        state.gap.where(F.col("own_events") > 0).select(
            "user_id",
            ((F.col("own_end").cast("double") - F.col("own_start").cast("double")) / 60.0).alias("_minutes"),
        ),
    ]
    per_session = minutes[0].unionByName(minutes[1])
    return per_session.groupBy("user_id").agg(
        F.count(F.lit(1)).alias("sessions"),
        F.avg("_minutes").alias("session_duration_mean_min"),
        F.percentile_approx("_minutes", 0.5, cfg.median_accuracy).cast("double").alias("session_duration_median_min"),
    )

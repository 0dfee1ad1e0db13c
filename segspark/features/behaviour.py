"""Behavioural features per user, point-in-time as of a date.

`as_of` is a calendar date (UTC): features use the events up to the end of that day, i.e. strictly
before the cutoff `as_of + 1 day, 00:00 UTC`; nothing later is ever read. Durations are fractional
days measured to that cutoff.

Everything is computed in one pass per user: a window partitioned by user (sessions), then
aggregations per session and per user that reuse the same partitioning, so the features cost one
shuffle (the one ingest already makes to find duplicates).

Feature definitions (the canonical ones are a contract, see README):
- recency_days: days from the last purchase to the cutoff; null when the user never purchased.
- frequency: distinct orders (order id; without one, distinct sessions with a purchase). Orders
  are counted within sessions, so an order whose lines fall into two sessions counts twice; an
  order is placed at one moment, so in practice this does not happen.
- monetary: net revenue, purchases minus returns (price x quantity).
- tenure_days: days from the first event to the cutoff.
- sessions: distinct sessions (the source's session id when configured and present, otherwise a new
  session after `features.session_gap_minutes` of inactivity).
- views, carts, removes_from_cart, purchases, returns: event counts by type.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from segspark.config import FeaturesConfig

SECONDS_PER_DAY = 86_400.0


def as_of_cutoff(as_of: dt.date) -> dt.datetime:
    """First instant after the as-of day (UTC)."""
    return dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(0, 0), tzinfo=dt.UTC)


def _days_before(cutoff: Column, ts: Column) -> Column:
    return (cutoff.cast("double") - ts.cast("double")) / SECONDS_PER_DAY


def with_sessions(events: DataFrame, cfg: FeaturesConfig) -> DataFrame:
    """Adds `session_key`: the source's session id when configured, else gap-based numbering."""
    by_time = Window.partitionBy("user_id").orderBy("event_time")
    gap_seconds = cfg.session_gap_minutes * 60
    previous = F.lag("event_time").over(by_time)
    starts = (previous.isNull() | ((F.col("event_time").cast("long") - previous.cast("long")) > gap_seconds)).cast("int")
    numbered = events.withColumn("_gap_session", F.sum(starts).over(by_time.rowsBetween(Window.unboundedPreceding, 0)))
    derived = F.concat(F.lit("gap-"), F.col("_gap_session").cast("string"))
    key = F.coalesce(F.col("session_id"), derived) if cfg.use_source_sessions else derived
    return numbered.withColumn("session_key", key).drop("_gap_session")


def user_features(events: DataFrame, as_of: dt.date, cfg: FeaturesConfig) -> DataFrame:
    """One row per user with events up to `as_of`: user_id, as_of + feature columns.

    Two aggregation levels, per session then per user. Both group by keys that start with user_id,
    so they reuse the partitioning of the session window: no shuffle beyond the one by user.
    """
    cutoff = F.lit(as_of_cutoff(as_of)).cast("timestamp")
    window = events.filter(F.col("event_time") < cutoff)
    sessions = with_sessions(window, cfg)

    kind = F.col("event_type")
    is_purchase = kind == "purchase"
    is_return = kind == "return"
    amount = F.coalesce(F.col("price"), F.lit(0.0)) * F.abs(F.col("quantity"))
    # An order is the order id when the source has one; without one, a session with a purchase.
    order_key = F.coalesce(F.col("order_id"), F.col("session_key"))

    per_session = sessions.groupBy("user_id", "session_key").agg(
        F.max(F.when(is_purchase, F.col("event_time"))).alias("last_purchase"),
        F.min("event_time").alias("first_event"),
        F.count_distinct(F.when(is_purchase, order_key)).alias("orders"),
        F.sum(F.when(is_purchase, amount).when(is_return, -amount).otherwise(0.0)).alias("net_revenue"),
        F.count_if(kind == "view").alias("views"),
        F.count_if(kind == "cart").alias("carts"),
        F.count_if(kind == "remove_from_cart").alias("removes_from_cart"),
        F.count_if(is_purchase).alias("purchases"),
        F.count_if(is_return).alias("returns"),
    )
    counts = ("views", "carts", "removes_from_cart", "purchases", "returns")
    per_user = per_session.groupBy("user_id").agg(
        F.max("last_purchase").alias("_last_purchase"),
        F.min("first_event").alias("_first_event"),
        F.sum("orders").cast("long").alias("frequency"),
        F.sum("net_revenue").alias("monetary"),
        F.count(F.lit(1)).alias("sessions"),
        *[F.sum(name).cast("long").alias(name) for name in counts],
    )
    return per_user.select(
        "user_id",
        F.lit(as_of).cast("date").alias("as_of"),
        _days_before(cutoff, F.col("_last_purchase")).alias("recency_days"),
        "frequency",
        F.round("monetary", 2).alias("monetary"),
        _days_before(cutoff, F.col("_first_event")).alias("tenure_days"),
        "sessions",
        *counts,
    )

"""Orders as mergeable state: `frequency` and the purchase intervals, as the batch computes them.

The batch (`features.behaviour._order_aggregates`) takes an order to be the order id of a purchase
line, else its session: the source session id, else gap-based numbering over the user's PURCHASE
events only. An order is placed at its first purchase line, and the features are the number of
orders and the mean and population standard deviation of the days between consecutive orders.

State, merged batch by batch in any arrival order:

* `keyed` rows (user_id, order_key, placed): orders with an order id or a source session id,
  placed = earliest line (min per key when merging);
* `gap` rows (user_id, start, end, own_start, own_end, own_events): runs of purchase events joined
  across the session gap (`sessions.connect_runs`), own_* counting the lines with neither an order id
  nor a source session id: each run with such lines is one order, placed at own_start.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.config import FeaturesConfig
from segspark.features.behaviour import order_interval_aggregates
from segspark.streaming.sessions import connect_runs, event_runs


@dataclass(frozen=True)
class OrderState:
    keyed: DataFrame  # user_id, order_key, placed (timestamp)
    gap: DataFrame  # user_id, start, end, own_start, own_end, own_events


def order_state(events: DataFrame, cfg: FeaturesConfig) -> OrderState:
    purchases = events.where(F.col("event_type") == "purchase")
    session = F.col("session_id") if cfg.use_source_sessions else F.lit(None).cast("string")
    key = F.coalesce(F.col("order_id"), session)
    keyed = (
        purchases.where(key.isNotNull())
        .groupBy("user_id", key.alias("order_key"))
        .agg(F.min("event_time").alias("placed"))
    )
    return OrderState(keyed, connect_runs(event_runs(purchases, key.isNull()), cfg.session_gap_minutes * 60))


def order_features(state: OrderState) -> DataFrame:
    """user_id, frequency, purchase_interval_mean_days, purchase_interval_std_days (users with orders)."""
    placed = state.keyed.select("user_id", F.col("placed").cast("double").alias("_placed")).unionByName(
        state.gap.where(F.col("own_events") > 0).select("user_id", F.col("own_start").cast("double").alias("_placed"))
    )
    return order_interval_aggregates(placed)

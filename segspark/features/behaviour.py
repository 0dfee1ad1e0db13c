"""Behavioural features per user, point-in-time as of a date.

`as_of` is a calendar date (UTC): features use the events up to the end of that day, i.e. strictly
before the cutoff `as_of + 1 day, 00:00 UTC`; nothing later is ever read. Durations are fractional
days measured to that cutoff. The catalog (`catalog.py`, `segspark features --list`) defines every
column; this module computes them.

One pass per user, no per-feature shuffles: ingest leaves the clean events partitioned by user and
sorted by (user, event time). Three aggregations read them, each grouped by keys that start with
user_id, so none needs an exchange:
- events -> user: counts, money, prices (means and approximate medians), time-of-day shares,
  breadth, trend windows, category shares, most frequent country/device;
- events -> sessions -> user: session count and durations;
- purchase lines -> orders -> user: orders and the intervals between them (a window over each
  user's orders, which are few).
The three user-level results are joined on user_id (co-partitioned, small).

Sessions have two paths (`SourceKeys`, from ingest's counting pass). Where every event carries the
source's session id (REES46-style clickstream), a session is that id: one hash aggregation per
(user, session) gives the sessions and, without order ids, the orders too (a session with a
purchase), with no window over the events. Anywhere else (invoice lines, a source without session
ids, or one that lacks them on some events) the gaps between a user's events number its sessions
in a window over every event, and the orders are aggregated from the purchase lines on their own.
Both paths give the same values.

Rates never divide by zero: a rate whose denominator is 0 is null (documented per feature), and
shares are over the user's events, of which there is at least one.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from segspark.config import FeaturesConfig
from segspark.features.catalog import ONE_HOT_COLUMNS, category_slot_names, feature_columns, one_hot_names

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0
SECONDS_PER_DAY_INT = 86_400


def as_of_cutoff(as_of: dt.date) -> dt.datetime:
    """First instant after the as-of day (UTC)."""
    return dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(0, 0), tzinfo=dt.UTC)


@dataclass(frozen=True)
class SourceKeys:
    """What ingest's counting pass saw of the source's own keys among the clean events. The default
    knows nothing, and takes the path that derives sessions and orders from the events alone."""

    every_event_has_session: bool = False
    some_event_has_order: bool = True

    def sessions_by_source_id(self, cfg: FeaturesConfig) -> bool:
        return cfg.use_source_sessions and self.every_event_has_session

    def orders_from_sessions(self, cfg: FeaturesConfig) -> bool:
        return self.sessions_by_source_id(cfg) and not self.some_event_has_order

    def describe(self, cfg: FeaturesConfig) -> dict[str, str]:
        """How the features find sessions and orders (the run's metrics.feature_paths)."""
        sessions = "source session ids" if self.sessions_by_source_id(cfg) else "numbered by gaps in a window"
        orders = "sessions with a purchase" if self.orders_from_sessions(cfg) else "aggregated from purchase lines"
        return {"sessions": sessions, "orders": orders}


@dataclass(frozen=True)
class FeatureSlots:
    """The value behind each slot column (category shares, one-hot columns) for one run."""

    categories: list[str]
    one_hot: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"categories": self.categories, "one_hot": self.one_hot}


def _category(cfg: FeaturesConfig) -> Column:
    """The category at the configured depth: "electronics.smartphone" -> "electronics" at level 1."""
    category = F.col("category")
    if cfg.category_level is None:
        return category
    return F.substring_index(category, ".", cfg.category_level)


def resolve_slots(events: DataFrame, as_of: dt.date, cfg: FeaturesConfig) -> FeatureSlots:
    """Pinned slot values from the config, else the most common values (by events) up to as_of.

    One small aggregation over the events (a few rows come back)."""
    wanted = {}
    if not cfg.categories:
        wanted["category"] = (_category(cfg), cfg.top_categories)
    for column in ONE_HOT_COLUMNS:
        spec = cfg.one_hot.get(column)
        if spec is not None and not spec.values:
            wanted[column] = (F.col(column), spec.top_n)
    found: dict[str, list[str]] = {kind: [] for kind in wanted}
    if wanted:
        cutoff = F.lit(as_of_cutoff(as_of)).cast("timestamp")
        pairs = F.array(*[F.struct(F.lit(kind).alias("kind"), value.alias("value")) for kind, (value, _) in
                          wanted.items()])
        counts = (
            events.filter(F.col("event_time") < cutoff)
            .select(F.explode(pairs).alias("p"))
            .filter(F.col("p.value").isNotNull())
            .groupBy("p.kind", "p.value")
            .count()
            .collect()
        )
        for row in sorted(counts, key=lambda r: (-r["count"], r["value"])):
            if len(found[row["kind"]]) < wanted[row["kind"]][1]:
                found[row["kind"]].append(row["value"])
    slots = FeatureSlots(
        categories=list(cfg.categories) if cfg.categories else found["category"],
        one_hot={
            column: list(spec.values) if spec.values else found[column]
            for column, spec in cfg.one_hot.items()
            if column in ONE_HOT_COLUMNS
        },
    )
    log.info("feature slots: %s", slots.as_dict())
    return slots


def _days_before(cutoff: Column, ts: Column) -> Column:
    return (cutoff.cast("double") - ts.cast("double")) / SECONDS_PER_DAY


def _ratio(numerator: Column, denominator: Column) -> Column:
    """numerator / denominator, null when the denominator is 0 (never NaN or infinity)."""
    return F.when(denominator != 0, numerator.cast("double") / denominator)


def with_sessions(events: DataFrame, cfg: FeaturesConfig) -> DataFrame:
    """Adds `session_key`: the source's session id when configured, else gap-based numbering.

    The gap window runs over each user's events in time order, which is how ingest leaves them."""
    by_time = Window.partitionBy("user_id").orderBy("event_time")
    gap_seconds = cfg.session_gap_minutes * 60
    previous = F.lag("event_time").over(by_time)
    starts = (previous.isNull() | ((F.col("event_time").cast("long") - previous.cast("long")) > gap_seconds)).cast("int")
    numbered = events.withColumn("_gap_session", F.sum(starts).over(by_time.rowsBetween(Window.unboundedPreceding, 0)))
    derived = F.concat(F.lit("gap-"), F.col("_gap_session").cast("string"))
    key = F.coalesce(F.col("session_id"), derived) if cfg.use_source_sessions else derived
    return numbered.withColumn("session_key", key).drop("_gap_session")


def _local_seconds(cfg: FeaturesConfig) -> Column:
    """Whole seconds since the epoch (rounded down) of each event's wall-clock time in features.time_zone.

    Hour, weekday and day are then arithmetic on it: Spark's hour(), dayofweek() and to_date()
    convert every value through java.time in the session's zone (11.7M events: 1.0 s against
    0.15 s for the arithmetic), and for UTC the zone shift is left out altogether. Seconds, not
    microseconds: about 1.7e9 of them are exact as a double, so the divisions below floor exactly."""
    ts = F.col("event_time")
    return F.unix_seconds(ts if cfg.time_zone == "UTC" else F.from_utc_timestamp(ts, cfg.time_zone))


def _local_hour(cfg: FeaturesConfig) -> Column:
    return F.floor(F.pmod(_local_seconds(cfg), F.lit(SECONDS_PER_DAY_INT)) / 3600)


def _local_day(cfg: FeaturesConfig) -> Column:
    """Days since 1970-01-01 of each event's local date (rounded down: before 1970 too)."""
    return F.floor(_local_seconds(cfg) / SECONDS_PER_DAY_INT)


def _local_weekday(cfg: FeaturesConfig) -> Column:
    """0 = Sunday ... 6 = Saturday (1970-01-01 was a Thursday)."""
    return F.pmod(_local_day(cfg) + 4, F.lit(7))


ADDITIVE_NAMES = (
    "events", "views", "carts", "removes_from_cart", "purchases", "returns", "_gross", "return_value", "_items",
    "_night", "_morning", "_afternoon", "_evening", "_weekend",
)


def additive_aggregates(cfg: FeaturesConfig) -> dict[str, Column]:
    """The per-user counts and sums over events, by aggregate name: the part of the event
    aggregates that two sets of events merge by adding (the streaming feature state keeps them)."""
    kind, price = F.col("event_type"), F.col("price")
    is_purchase, is_return = kind == "purchase", kind == "return"
    line_value = F.coalesce(price, F.lit(0.0)) * F.abs(F.col("quantity"))
    hour, weekday = _local_hour(cfg), _local_weekday(cfg)
    return {
        "events": F.count(F.lit(1)),
        "views": F.count_if(kind == "view"),
        "carts": F.count_if(kind == "cart"),
        "removes_from_cart": F.count_if(kind == "remove_from_cart"),
        "purchases": F.count_if(is_purchase),
        "returns": F.count_if(is_return),
        "_gross": F.sum(F.when(is_purchase, line_value).otherwise(0.0)),
        "return_value": F.sum(F.when(is_return, line_value).otherwise(0.0)),
        "_items": F.sum(F.when(is_purchase, F.abs(F.col("quantity"))).otherwise(0.0)),
        "_night": F.count_if(hour < 6),
        "_morning": F.count_if((hour >= 6) & (hour < 12)),
        "_afternoon": F.count_if((hour >= 12) & (hour < 18)),
        "_evening": F.count_if(hour >= 18),
        "_weekend": F.count_if(weekday.isin(0, 6)),
    }  # keys: ADDITIVE_NAMES


def _event_aggregates(events: DataFrame, cutoff: Column, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """Per user: the counts, sums, extremes and means (`_plain_event_aggregates`) joined with the
    medians, sets and modes (`_object_event_aggregates`): two aggregations over the same events, so
    that each runs the way it runs fastest (their join is on one row per user, both partitioned by it)."""
    return _plain_event_aggregates(events, cutoff, cfg, slots).join(_object_event_aggregates(events, cfg, slots), "user_id")


def _plain_event_aggregates(events: DataFrame, cutoff: Column, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """The aggregates with fixed-size buffers, in Spark's code-generated hash aggregation.

    Grouped by the user id and its length (one group per user all the same), not by the id alone:
    over events sorted by user, spark.sql.execution.replaceHashWithSortAgg (runtime.session) would
    turn a grouping by the id into a sort aggregation, which evaluates every function interpreted,
    row by row (11.7M events: 5.7-8.5 s against 2.9-3.6 s). The extra key keeps the hash
    aggregation, and the events' partitioning by user still spares an exchange."""
    kind = F.col("event_type")
    is_view, is_purchase = kind == "view", kind == "purchase"
    price, ts = F.col("price"), F.col("event_time")
    window_seconds = cfg.trend_window_days * SECONDS_PER_DAY
    age = cutoff.cast("double") - ts.cast("double")
    category = _category(cfg)
    aggregates = [
        F.min(ts).alias("_first_event"),
        F.max(F.when(is_purchase, ts)).alias("_last_purchase"),
        *[column.alias(name) for name, column in additive_aggregates(cfg).items()],
        F.avg(F.when(is_view, price)).alias("price_viewed_mean"),
        F.avg(F.when(is_purchase, price)).alias("price_bought_mean"),
        F.count_if(age <= window_seconds).alias("events_last_window"),
        F.count_if((age > window_seconds) & (age <= 2 * window_seconds)).alias("events_prior_window"),
    ]
    aggregates += [F.count_if(category == value).alias(f"_cat{i}") for i, value in enumerate(slots.categories)]
    key_length = "_user_id_length"
    return events.groupBy("user_id", F.length("user_id").alias(key_length)).agg(*aggregates).drop(key_length)


def _object_event_aggregates(events: DataFrame, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """The medians, sets and modes (object buffers): a sort aggregation that streams through each
    user's events as ingest sorted them, never spilling a hash map of every user's buffers.

    Each function reads a column of the projection below it rather than an expression: the sort
    aggregation evaluates its functions' inputs interpreted, row by row, where the projection is
    generated code, and percentile_approx works out the type of a CASE WHEN input again on every
    row (11.7M events, four alternated runs: 7.1-8.5 s before, 5.7-6.8 s after)."""
    kind, price = F.col("event_type"), F.col("price")
    accuracy = cfg.median_accuracy
    inputs = events.select(
        "user_id",
        F.when(kind == "view", price).alias("_viewed_price"),
        F.when(kind == "purchase", price).alias("_bought_price"),
        _local_day(cfg).alias("_day"),
        "item_id",
        _category(cfg).alias("_category"),
        *slots.one_hot,
    )
    aggregates = [
        F.percentile_approx("_viewed_price", 0.5, accuracy).alias("price_viewed_median"),
        F.percentile_approx("_bought_price", 0.5, accuracy).alias("price_bought_median"),
        F.size(F.collect_set("_day")).alias("active_days"),
        F.size(F.collect_set("item_id")).alias("distinct_items"),
        F.size(F.collect_set("_category")).alias("distinct_categories"),
    ]
    # deterministic: of equally frequent values the lowest, so re-runs (and the streaming state) agree.
    aggregates += [F.mode(column, True).alias(f"_mode_{column}") for column in slots.one_hot]
    return inputs.groupBy("user_id").agg(*aggregates)


def _session_aggregates(events: DataFrame, cfg: FeaturesConfig) -> DataFrame:
    per_session = with_sessions(events, cfg).groupBy("user_id", "session_key").agg(
        ((F.max("event_time").cast("double") - F.min("event_time").cast("double")) / 60.0).alias("_minutes")
    )
    return per_session.groupBy("user_id").agg(
        F.count(F.lit(1)).alias("sessions"),
        F.avg("_minutes").alias("session_duration_mean_min"),
        F.percentile_approx("_minutes", 0.5, cfg.median_accuracy).cast("double").alias("session_duration_median_min"),
    )


def _source_session_aggregates(events: DataFrame, cfg: FeaturesConfig, with_orders: bool) -> DataFrame:
    """`_session_aggregates` for events that all carry the source's session id, which is then each
    event's session key: one generated hash aggregation per (user, session), where the general path
    runs two windows over every event to number gap sessions it does not use, and aggregates the
    orders from another read of the events (11.7M events: 3.4-3.6 s with the orders, against
    5.7-5.9 s for the general path's sessions and 1.8 s for its orders).

    with_orders (no event has an order id, so an order is a session with a purchase, placed at its
    first purchase): `_order_aggregates`' columns too, from the same sessions, with the intervals in
    a window over each user's sessions (a few per user) ordered by that time, those without a
    purchase last."""
    ts = F.col("event_time")
    per_session = events.groupBy("user_id", "session_id").agg(
        ((F.max(ts).cast("double") - F.min(ts).cast("double")) / 60.0).alias("_minutes"),
        F.min(F.when(F.col("event_type") == "purchase", ts)).cast("double").alias("_placed"),
    )
    aggregates = [
        F.count(F.lit(1)).alias("sessions"),
        F.avg("_minutes").alias("session_duration_mean_min"),
        F.percentile_approx("_minutes", 0.5, cfg.median_accuracy).cast("double").alias("session_duration_median_min"),
    ]
    if with_orders:
        placed = F.col("_placed")
        previous = F.lag(placed).over(Window.partitionBy("user_id").orderBy(placed.asc_nulls_last()))
        per_session = per_session.withColumn("_interval", (placed - previous) / SECONDS_PER_DAY)
        aggregates += [
            F.count(placed).alias("frequency"),
            F.avg("_interval").alias("purchase_interval_mean_days"),
            F.stddev_pop("_interval").alias("purchase_interval_std_days"),
        ]
    return per_session.groupBy("user_id").agg(*aggregates)


def _order_aggregates(events: DataFrame, cfg: FeaturesConfig) -> DataFrame:
    # An order is the order id when the source has one; without one, a session with a purchase.
    purchases = with_sessions(events.filter(F.col("event_type") == "purchase"), cfg)
    orders = purchases.groupBy("user_id", F.coalesce(F.col("order_id"), F.col("session_key")).alias("_order")).agg(
        F.min("event_time").cast("double").alias("_placed")
    )
    return order_interval_aggregates(orders)


def order_interval_aggregates(orders: DataFrame) -> DataFrame:
    """frequency and purchase-interval mean/std per user from one row per order (user_id, _placed:
    epoch seconds of the order's first line). Shared with the streaming order state."""
    previous = F.lag("_placed").over(Window.partitionBy("user_id").orderBy("_placed"))
    intervals = orders.withColumn("_interval", (F.col("_placed") - previous) / SECONDS_PER_DAY)
    return intervals.groupBy("user_id").agg(
        F.count(F.lit(1)).alias("frequency"),
        F.avg("_interval").alias("purchase_interval_mean_days"),
        F.stddev_pop("_interval").alias("purchase_interval_std_days"),
    )


def user_features(
    events: DataFrame, as_of: dt.date, cfg: FeaturesConfig, slots: FeatureSlots | None = None,
    keys: SourceKeys = SourceKeys(),
) -> DataFrame:
    """One row per user with events up to `as_of`: user_id, as_of + the catalog's feature columns.

    `events` are clean canonical events (ingest.clean_events). `slots` fixes the category and
    one-hot slot values; by default they are resolved from the events (one small extra job).
    `keys`: what ingest found of the source's session and order ids (`Ingested.source_keys`); it
    chooses the sessions' path, never the values."""
    slots = slots or resolve_slots(events, as_of, cfg)
    cutoff = F.lit(as_of_cutoff(as_of)).cast("timestamp")
    window = events.filter(F.col("event_time") < cutoff)

    per_user = _event_aggregates(window, cutoff, cfg, slots)
    if keys.sessions_by_source_id(cfg):
        with_orders = keys.orders_from_sessions(cfg)
        per_user = per_user.join(_source_session_aggregates(window, cfg, with_orders), "user_id")
        if not with_orders:
            per_user = per_user.join(_order_aggregates(window, cfg), "user_id", "left")
    else:
        per_user = (
            per_user.join(_session_aggregates(window, cfg), "user_id")
            .join(_order_aggregates(window, cfg), "user_id", "left")
        )
    return features_from_aggregates(per_user, as_of, cfg, slots)


def features_from_aggregates(per_user: DataFrame, as_of: dt.date, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """The catalog's features from one row of aggregates per user: the columns `_event_aggregates`,
    `_session_aggregates` and `_order_aggregates` give (frequency null = no order). The streaming
    feature state derives the same aggregates from its merged state and finishes them here."""
    cutoff = F.lit(as_of_cutoff(as_of)).cast("timestamp")
    c = F.col
    events_n = c("events")
    frequency = F.coalesce(c("frequency"), F.lit(0)).cast("long")
    tenure = _days_before(cutoff, c("_first_event"))
    last, prior = c("events_last_window"), c("events_prior_window")
    share = lambda col: (col / events_n).cast("double")  # noqa: E731 - events >= 1 for every user
    columns = {
        "recency_days": _days_before(cutoff, c("_last_purchase")),
        "frequency": frequency,
        "monetary": F.round(c("_gross") - c("return_value"), 2),
        "tenure_days": tenure,
        "sessions": c("sessions"),
        "events": events_n,
        "views": c("views"),
        "carts": c("carts"),
        "removes_from_cart": c("removes_from_cart"),
        "purchases": c("purchases"),
        "returns": c("returns"),
        "session_duration_mean_min": c("session_duration_mean_min"),
        "session_duration_median_min": c("session_duration_median_min"),
        "events_per_session": _ratio(events_n, c("sessions")),
        "active_days": c("active_days").cast("long"),
        "sessions_per_week": c("sessions") / (F.greatest(tenure, F.lit(7.0)) / 7.0),
        "purchase_interval_mean_days": c("purchase_interval_mean_days"),
        "purchase_interval_std_days": c("purchase_interval_std_days"),
        "basket_size": _ratio(c("_items"), frequency),
        "avg_order_value": _ratio(c("_gross"), frequency),
        "return_value": F.round(c("return_value"), 2),
        "return_share": _ratio(c("return_value"), c("_gross")),
        "view_to_cart_rate": _ratio(c("carts"), c("views")),
        "cart_to_purchase_rate": _ratio(c("purchases"), c("carts")),
        "remove_share": _ratio(c("removes_from_cart"), c("carts")),
        "price_viewed_mean": c("price_viewed_mean"),
        "price_viewed_median": c("price_viewed_median"),
        "price_bought_mean": c("price_bought_mean"),
        "price_bought_median": c("price_bought_median"),
        "night_share": share(c("_night")),
        "morning_share": share(c("_morning")),
        "afternoon_share": share(c("_afternoon")),
        "evening_share": share(c("_evening")),
        "weekend_share": share(c("_weekend")),
        "distinct_items": c("distinct_items").cast("long"),
        "distinct_categories": c("distinct_categories").cast("long"),
        "events_last_window": last,
        "events_prior_window": prior,
        "activity_trend": F.coalesce(_ratio(last - prior, last + prior), F.lit(0.0)),
    }
    category_names = category_slot_names(cfg)
    slotted = [c(f"_cat{i}") for i in range(len(slots.categories))]
    for i, name in enumerate(category_names):
        columns[name] = share(slotted[i]) if i < len(slotted) else F.lit(0.0)
    columns["other_category_share"] = share(events_n - sum(slotted, F.lit(0)))
    for column in ONE_HOT_COLUMNS:
        if column not in cfg.one_hot:
            continue
        values = slots.one_hot.get(column, [])
        mode = c(f"_mode_{column}")
        *slot_names, other = one_hot_names(cfg, column)
        for i, name in enumerate(slot_names):
            columns[name] = (mode == values[i]).cast("int") if i < len(values) else F.lit(0)
        columns[other] = (mode.isNull() | ~mode.isin(*values)).cast("int") if values else F.lit(1)
    ordered = feature_columns(cfg)
    missing = set(ordered) ^ set(columns)
    if missing:  # the catalog and this function must describe the same columns
        raise AssertionError(f"catalog and computed features differ: {sorted(missing)}")
    return per_user.select("user_id", F.lit(as_of).cast("date").alias("as_of"), *[columns[n].alias(n) for n in ordered])

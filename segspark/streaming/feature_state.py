"""The running feature state of a stream: one mergeable row per user, from which the batch features follow.

A micro-batch's events become per-user aggregates (`batch_state`) that merge into the state
(`merge_state`) in any arrival order, late and out-of-order events included; the catalog's features
then come from the merged state (`state_features`) through the batch job's own final step
(`features.behaviour.features_from_aggregates`), so rates, recency, tenure and the trend windows are
computed exactly as in batch, as of the date the stream has reached. Per column:

* min / max: first and last event, last purchase;
* sums and counts: event kinds, money, items, day parts, slot categories, price sums and counts
  (means are sum / count);
* sets: items, categories and local days (distinct counts are their sizes);
* count maps: prices viewed and bought (the median is read off the sorted map: the value at rank
  ceil(n/2), which is what `percentile_approx` returns wherever its sketch is exact, i.e. for users
  with fewer values than about `features.median_accuracy` / 2), events per UTC day (the trend
  windows at any as-of date), and per value of each one-hot column (the mode: most frequent, ties
  to the lowest value, as the batch's deterministic mode);
* sessions and orders as arrays of the runs and keyed rows of `sessions.SessionState` and
  `orders.OrderState`, merged within the row with their own rules (`merge_nested`).

The state grows with a user's distinct values and sessions, not with the number of events.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.config import FeaturesConfig
from segspark.features.behaviour import (
    ADDITIVE_NAMES,
    FeatureSlots,
    _category,
    additive_aggregates,
    features_from_aggregates,
)
from segspark.runtime.expressions import memoised
from segspark.streaming.orders import OrderState, order_features, order_state
from segspark.streaming.sessions import SessionState, merge_runs, session_features, session_state

# Scalar columns and how two values merge.
_MIN, _MAX, _SUM = "min", "max", "sum"
# The batch's additive aggregates (`behaviour.additive_aggregates`) under their names without the
# leading underscore, and the sums and counts behind the price means.
_ADDITIVE = {name.lstrip("_"): name for name in ADDITIVE_NAMES}
_PRICE_SUMS = ["viewed_price_n", "bought_price_n", "viewed_price_sum", "bought_price_sum"]
_SETS = ["item_set", "category_set", "local_days"]
_RUN_FIELDS = ["start", "end", "own_start", "own_end", "own_events"]
# Array-of-struct columns: (column, fields of its rows).
_NESTED = {
    "source_sessions": ["session_id", "start", "end"],
    "gap_sessions": _RUN_FIELDS,
    "keyed_orders": ["order_key", "placed"],
    "order_runs": _RUN_FIELDS,
}
# How the keyed rows merge: {field: min or max} of the rows with the same key (the first field).
_KEYED_RULES = {
    "source_sessions": {"start": _MIN, "end": _MAX},
    "keyed_orders": {"placed": _MIN},
}


def _rules(slots: FeatureSlots) -> dict[str, str]:
    rules = {"first_event": _MIN, "last_event": _MAX, "last_purchase": _MAX}
    rules.update({name: _SUM for name in [*_ADDITIVE, *_PRICE_SUMS, *_category_counts(slots)]})
    return rules


def _category_counts(slots: FeatureSlots) -> list[str]:
    return [f"cat_{i}" for i in range(len(slots.categories))]


def _map_columns(slots: FeatureSlots) -> list[str]:
    return ["viewed_prices", "bought_prices", "utc_days"] + [f"{column}_counts" for column in slots.one_hot]


def batch_state(events: DataFrame, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """One state row per user of a set of clean canonical events (a micro-batch)."""
    scalars = memoised(slots, ("batch_scalars", cfg.model_dump_json()), lambda: _batch_scalars(cfg, slots))
    state = join_by_user(events.groupBy("user_id").agg(*scalars), _batch_maps(events, slots), "left")
    sessions, orders = session_state(events, cfg), order_state(events, cfg)
    for name, rows in zip(_NESTED, (sessions.source, sessions.gap, orders.keyed, orders.gap), strict=True):
        state = join_by_user(state, _nest(rows, name), "left")
    return _normalised(state, slots)


def _batch_scalars(cfg: FeaturesConfig, slots: FeatureSlots) -> list[Column]:
    """`batch_state`'s per-user aggregates: the same for every batch, built once (`memoised`)."""
    kind, price, ts = F.col("event_type"), F.col("price"), F.col("event_time")
    is_view, is_purchase = kind == "view", kind == "purchase"
    local = F.from_utc_timestamp(ts, cfg.time_zone)
    category = _category(cfg)
    additive = additive_aggregates(cfg)
    scalars = [
        F.min(ts).alias("first_event"),
        F.max(ts).alias("last_event"),
        F.max(F.when(is_purchase, ts)).alias("last_purchase"),
        *[additive[batch_name].alias(name) for name, batch_name in _ADDITIVE.items()],
        F.count(F.when(is_view, price)).alias("viewed_price_n"),
        F.count(F.when(is_purchase, price)).alias("bought_price_n"),
        F.coalesce(F.sum(F.when(is_view, price)), F.lit(0.0)).alias("viewed_price_sum"),
        F.coalesce(F.sum(F.when(is_purchase, price)), F.lit(0.0)).alias("bought_price_sum"),
        F.collect_set("item_id").alias("item_set"),
        F.collect_set(category).alias("category_set"),
        F.collect_set(F.to_date(local)).alias("local_days"),
    ]
    scalars += [F.count_if(category == value).alias(name) for name, value in zip(_category_counts(slots), slots.categories, strict=True)]
    return scalars


def _batch_maps(events: DataFrame, slots: FeatureSlots) -> DataFrame:
    """user_id + every count map ({key: events}) of the users' events, from one count of
    (user, map, key): each event becomes a row per map it has a key in, with the key in that map's
    own field (the maps' keys differ in type), so that one shuffle counts them all and a second
    gathers each user's maps (a shuffle and a join per map cost seconds per micro-batch)."""
    kind, price = F.col("event_type"), F.col("price")
    keys = [
        F.when(kind == "view", price),  # viewed_prices
        F.when(kind == "purchase", price),  # bought_prices
        F.to_date("event_time"),  # utc_days: the session time zone is UTC
        *[F.col(column) for column in slots.one_hot],
    ]
    names = _map_columns(slots)
    fields = [f"_k{i}" for i in range(len(names))]
    types = [field.dataType for field in events.select(*keys).schema]
    entries = [
        F.when(key.isNotNull(), F.struct(F.lit(i).alias("_map"), *[
            (key if j == i else F.lit(None).cast(types[j])).alias(fields[j]) for j in range(len(keys))
        ]))
        for i, key in enumerate(keys)
    ]
    counted = (
        events.select("user_id", F.explode(F.array(*entries)).alias("_e")).where(F.col("_e").isNotNull())
        .select("user_id", "_e.*").groupBy("user_id", "_map", *fields).count()
    )
    return counted.groupBy("user_id").agg(*[
        F.map_from_entries(F.collect_list(
            F.when(F.col("_map") == i, F.struct(F.col(field).alias("key"), F.col("count").alias("n")))
        )).alias(name)
        for i, (name, field) in enumerate(zip(names, fields, strict=True))
    ])


def join_by_user(left: DataFrame, right: DataFrame, how: str) -> DataFrame:
    """`left` joined with `right` on user_id as a sort-merge join (a hint). With sides this small, AQE
    would make each join a broadcast instead, a Spark job of its own per join: without the hint a
    10k-event micro-batch took 12.5-13.6 s, with it 9.5-11.9 s. (Under AQE a checkpointed frame does
    not carry its partitioning into later plans, so both sides are shuffled by user again: small
    shuffles, in the AQE stages the batch's timeline shows.)"""
    return left.join(right.hint("merge"), "user_id", how)


def _nest(rows: DataFrame, name: str) -> DataFrame:
    return rows.groupBy("user_id").agg(F.collect_list(F.struct(*_NESTED[name])).alias(name))


def _unnest(state: DataFrame, name: str) -> DataFrame:
    return state.select("user_id", F.explode(name).alias("_row")).select("user_id", *[F.col(f"_row.{f}").alias(f) for f in _NESTED[name]])


def _normalised(state: DataFrame, slots: FeatureSlots, *kept: str) -> DataFrame:
    """Fixed column order, and empty maps and arrays where a user has none (never null); `kept`
    columns follow as they are."""
    types = dict(state.dtypes)

    def build() -> list[Column]:
        columns = [F.col("user_id")]
        columns += [F.col(name) for name in _rules(slots)]
        columns += [F.coalesce(F.col(name), F.array().cast(types[name])).alias(name) for name in _SETS]
        columns += [F.coalesce(F.col(name), F.create_map().cast(types[name])).alias(name) for name in _map_columns(slots)]
        columns += [F.coalesce(F.col(name), F.array().cast(types[name])).alias(name) for name in _NESTED]
        return columns

    # The same for every batch of a stream (the state's types do not change): built once (`memoised`).
    return state.select(*memoised(slots, ("normalised", tuple(sorted(types.items()))), build), *kept)


# merge_state's column: true on the rows of the batch's users (merged or new), false on the others.
TOUCHED = "_touched"
# A stored state row's version: the batch that wrote it (`state_store`: a user's latest row is current).
VERSION = "batch_id"


def merge_state(state: DataFrame, batch: DataFrame, cfg: FeaturesConfig, slots: FeatureSlots,
                batch_id: int | None = None) -> DataFrame:
    """Every row of `state` (one current row per user: all of them, or those of the batch's users)
    with `batch` added, and the column TOUCHED: the batch's users merged (new ones as the batch has
    them), true; the users only in `state` as they were, false. One full outer join by user gives
    both the rows a stream writes back and the ones it scores, without joining the state to the
    batch again to find the users it did not touch. With `batch_id`, the rows also carry VERSION:
    `batch_id` on the touched ones, the state's own on the others."""
    both = join_by_user(
        state.withColumn("_known", F.lit(True)).alias("a"), batch.withColumn("_new", F.lit(True)).alias("b"), "full"
    )
    types = dict(batch.dtypes)
    key = ("merged", cfg.model_dump_json(), tuple(sorted(types.items())))
    merged = memoised(slots, key, lambda: _merged_columns(cfg, slots, types))
    untouched = F.col("b._new").isNull()
    if batch_id is None:
        return _normalised(both.select(F.col("user_id"), *merged, (~untouched).alias(TOUCHED)), slots, TOUCHED)
    version = F.when(untouched, F.col(f"a.{VERSION}")).otherwise(F.lit(batch_id)).cast("long").alias(VERSION)
    return _normalised(both.select(F.col("user_id"), *merged, version, (~untouched).alias(TOUCHED)), slots, VERSION,
                       TOUCHED)


def _merged_columns(cfg: FeaturesConfig, slots: FeatureSlots, types: dict[str, str]) -> list[Column]:
    """`merge_state`'s columns over its join (old state `a`, batch `b`): the same for every batch of a
    stream, built once (`memoised`): thousands of calls to the JVM otherwise."""
    a, b = (lambda n: F.col(f"a.{n}")), (lambda n: F.col(f"b.{n}"))  # noqa: E731
    new_user, untouched = F.col("a._known").isNull(), F.col("b._new").isNull()
    merged: list[Column] = []
    for name, rule in _rules(slots).items():
        if rule == _MIN:
            merged.append(F.least(a(name), b(name)).alias(name))  # least/greatest skip nulls
        elif rule == _MAX:
            merged.append(F.greatest(a(name), b(name)).alias(name))
        else:
            merged.append(F.when(untouched, a(name)).otherwise(F.coalesce(a(name), F.lit(0)) + b(name)).alias(name))
    merged += [F.when(new_user, b(n)).when(untouched, a(n)).otherwise(F.array_union(a(n), b(n))).alias(n) for n in _SETS]
    merged += [
        F.when(new_user, b(n)).when(untouched, a(n)).otherwise(
            F.map_zip_with(a(n), b(n), lambda _, x, y: F.coalesce(x, F.lit(0)) + F.coalesce(y, F.lit(0)))
        ).alias(n)
        for n in _map_columns(slots)
    ]
    merged += [
        F.when(new_user, b(n)).when(untouched, a(n)).otherwise(merge_nested(n, a(n), b(n), types[n], cfg)).alias(n)
        for n in _NESTED
    ]
    return merged


def merge_nested(name: str, old: Column, new: Column, array_type: str, cfg: FeaturesConfig) -> Column:
    """A user's old and new rows of the array column `name` (of type `array_type`) merged within the
    row: runs are connected across the session gap (`sessions.merge_runs`), keyed rows merge by key.
    Merging arrays in place, rather than exploding, regrouping and joining them back, keeps a
    micro-batch's merge to the one join of the old state with the batch (15 Spark jobs fewer)."""
    if name in _KEYED_RULES:
        return merge_keyed(old, new, _NESTED[name], _KEYED_RULES[name], array_type)
    return merge_runs(old, new, cfg.session_gap_minutes * 60, array_type)


def merge_keyed(old: Column, new: Column, fields: list[str], rules: dict[str, str], array_type: str) -> Column:
    """Two arrays of structs with a unique key (the first of `fields`) merged into one row per key,
    each other field the min or max (`rules`) of the rows with that key."""
    key, values = fields[0], fields[1:]

    def by_key(rows: Column) -> Column:
        return F.map_from_arrays(rows[key], F.transform(rows, lambda row: F.struct(*[row[f].alias(f) for f in values])))

    pick = {_MIN: F.least, _MAX: F.greatest}  # both skip nulls: a key on one side only keeps its values
    merged = F.map_zip_with(
        by_key(old), by_key(new),
        lambda _, x, y: F.struct(*[pick[rules[f]](x[f], y[f]).alias(f) for f in values]),
    )
    rows = F.transform(F.map_entries(merged), lambda e: F.struct(e["key"].alias(key), *[e["value"][f].alias(f) for f in values]))
    return rows.cast(array_type)


def _sessions(state: DataFrame) -> SessionState:
    return SessionState(_unnest(state, "source_sessions"), _unnest(state, "gap_sessions"))


def _orders(state: DataFrame) -> OrderState:
    return OrderState(_unnest(state, "keyed_orders"), _unnest(state, "order_runs"))


def state_features(state: DataFrame, as_of: dt.date, cfg: FeaturesConfig, slots: FeatureSlots) -> DataFrame:
    """The batch job's `user_features` (user_id, as_of, the catalog's columns) of the state's users,
    as of `as_of`, which must not be before any event in the state (the stream's as-of date)."""
    c = F.col
    window = cfg.trend_window_days
    last_day, boundary, first_day = F.lit(as_of), F.lit(as_of - dt.timedelta(days=window)), F.lit(
        as_of - dt.timedelta(days=2 * window)
    )
    aggregates = [
        "user_id",
        c("first_event").alias("_first_event"),
        c("last_purchase").alias("_last_purchase"),
        *[c(name).alias(batch_name) for name, batch_name in _ADDITIVE.items()],
        _mean(c("viewed_price_sum"), c("viewed_price_n")).alias("price_viewed_mean"),
        count_map_median(c("viewed_prices")).alias("price_viewed_median"),
        _mean(c("bought_price_sum"), c("bought_price_n")).alias("price_bought_mean"),
        count_map_median(c("bought_prices")).alias("price_bought_median"),
        F.size("local_days").alias("active_days"),
        F.size("item_set").alias("distinct_items"),
        F.size("category_set").alias("distinct_categories"),
        _days_between(c("utc_days"), boundary, last_day).alias("events_last_window"),
        _days_between(c("utc_days"), first_day, boundary).alias("events_prior_window"),
        *[c(name).alias(f"_cat{i}") for i, name in enumerate(_category_counts(slots))],
        *[count_map_mode(c(f"{column}_counts")).alias(f"_mode_{column}") for column in slots.one_hot],
    ]
    per_user = (
        state.select(*aggregates)
        .transform(lambda frame: join_by_user(frame, session_features(_sessions(state), cfg), "left"))
        .transform(lambda frame: join_by_user(frame, order_features(_orders(state)), "left"))
    )
    return features_from_aggregates(per_user, as_of, cfg, slots)


def _mean(total: Column, n: Column) -> Column:
    return F.when(n > 0, total / n)


def _days_between(days: Column, after: Column, up_to: Column) -> Column:
    """Events on the UTC days d with after < d <= up_to (the batch's windows, counted back from the
    as-of cutoff in whole days)."""
    return F.aggregate(
        F.map_entries(days), F.lit(0).cast("long"),
        lambda total, e: total + F.when((e["key"] > after) & (e["key"] <= up_to), e["value"]).otherwise(F.lit(0).cast("long")),
    )


def count_map_median(counts: Column) -> Column:
    """The value at rank max(1, ceil(n/2)) of a {value: count} map (null when empty)."""
    n = F.aggregate(F.map_values(counts), F.lit(0).cast("long"), lambda total, x: total + x)
    # n and the rank ride in the fold's start value, so they are computed once per row: referenced in
    # the step function, the rank (and n's own pass over the map) was computed again for every entry,
    # a user's m prices costing m^2 reads (a JFR profile of steady 100k-event batches put a fifth of the
    # executors' map and array reads there).
    start = F.struct(
        F.lit(0).cast("long").alias("seen"),
        F.lit(None).cast("double").alias("value"),
        n.alias("n"),
        F.greatest(F.ceil(n * 0.5), F.lit(1)).alias("rank"),
    )
    # The result is taken in the fold's finish step: read from the column twice, the fold could run twice.
    return F.aggregate(
        F.array_sort(F.map_entries(counts)),
        start,
        lambda acc, e: F.when(acc["seen"] >= acc["rank"], acc).otherwise(
            F.struct(
                (acc["seen"] + e["value"]).alias("seen"),
                e["key"].cast("double").alias("value"),
                acc["n"].alias("n"),
                acc["rank"].alias("rank"),
            )
        ),
        lambda acc: F.when(acc["n"] > 0, acc["value"]),
    )


def count_map_mode(counts: Column) -> Column:
    """The most frequent key of a {value: count} map, ties to the lowest key (null when empty)."""
    start = F.struct(F.lit(0).cast("long").alias("n"), F.lit(None).cast("string").alias("key"))
    best = F.aggregate(
        F.array_sort(F.map_entries(counts)),
        start,
        lambda acc, e: F.when(e["value"] > acc["n"], F.struct(e["value"].alias("n"), e["key"].alias("key"))).otherwise(acc),
    )
    return best["key"]


__all__ = ["TOUCHED", "VERSION", "batch_state", "count_map_median", "count_map_mode", "join_by_user", "merge_keyed", "merge_nested", "merge_state",
           "state_features"]

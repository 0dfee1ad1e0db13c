"""Session and order state merged batch by batch, in any arrival order, gives the batch features:
the same sessions (count, mean and median duration) and orders (frequency, interval mean and std)
per user, with source session ids, with gap sessions only, and with a mix of both. The state is
merged as the stream merges it: per user, as arrays merged within the row (`merge_nested`)."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from segspark import ingest
from segspark.features.behaviour import _order_aggregates, _session_aggregates
from segspark.io.readers import read_raw_events
from segspark.streaming.feature_state import merge_nested
from segspark.streaming.orders import OrderState, order_features, order_state
from segspark.streaming.sessions import SessionState, session_features, session_state


@pytest.fixture(scope="module")
def events(spark, sample_parquet):
    from segspark.config import load_config

    from .conftest import REPO

    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={sample_parquet}/events"])
    clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input))
    # Half of the events lose their source session id: the mixed case, where the rest are numbered by gaps.
    mixed = clean.withColumn("session_id", F.when(F.xxhash64("event_time", "item_id") % 2 == 0, F.col("session_id")))
    return cfg, clean.cache(), mixed.cache()


def _sorted(frame, columns):
    return sorted(tuple(row) for row in frame.select("user_id", *columns).collect())


def _same(got, expected, exact):
    """Rows equal: the columns at `exact` positions exactly, the others to 1e-9 relative (means)."""
    def close(a, b):
        return a == b or (a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b)))

    return [(g, e) for g, e in zip(got, expected, strict=True)
            if any((g[i] != e[i]) if i in exact else not close(g[i], e[i]) for i in range(len(e)))]


def _batches(data):
    """Three "micro-batches" by a hash, not by time: each holds late and early events of every user."""
    return [data.where(F.abs(F.xxhash64("user_id", "event_time", "event_type")) % 3 == i) for i in range(3)]


# The state's array columns (feature_state._NESTED) behind each kind, in its dataclass's field order.
SOURCE, GAP = ["session_id", "start", "end"], ["start", "end", "own_start", "own_end", "own_events"]
NESTED = {
    "sessions": (SessionState, {"source_sessions": SOURCE, "gap_sessions": GAP}),
    "orders": (OrderState, {"keyed_orders": ["order_key", "placed"], "order_runs": GAP}),
}


def _nested(state, kind):
    """user_id + one array column per row set of the state (as the stream stores it)."""
    _, columns = NESTED[kind]
    frames = [
        rows.groupBy("user_id").agg(F.collect_list(F.struct(*fields)).alias(name))
        for rows, (name, fields) in zip(vars(state).values(), columns.items(), strict=True)
    ]
    return frames[0].join(frames[1], "user_id", "full")


def _merged(old, new, kind, features):
    """Two nested states merged per user with the stream's `merge_nested`, back as row sets."""
    cls, columns = NESTED[kind]
    both = _nested(old, kind).alias("a").join(_nested(new, kind).alias("b"), "user_id", "full")
    types = dict(_nested(new, kind).dtypes)
    empty = {name: F.array().cast(types[name]) for name in columns}
    merged = both.select("user_id", *[
        merge_nested(name, F.coalesce(F.col(f"a.{name}"), empty[name]), F.coalesce(F.col(f"b.{name}"), empty[name]),
                     types[name], features).alias(name)
        for name in columns
    ]).localCheckpoint()
    return cls(*[
        merged.select("user_id", F.explode(name).alias("_r")).select("user_id", *[F.col(f"_r.{f}").alias(f) for f in fields])
        for name, fields in columns.items()
    ])


KINDS = {
    # state of a batch, features from state, the batch features, compared columns, exact positions
    "sessions": (session_state, lambda state, f: session_features(state, f), _session_aggregates,
                 ("sessions", "session_duration_mean_min", "session_duration_median_min"), {0, 1, 3}),
    "orders": (order_state, lambda state, f: order_features(state), _order_aggregates,
               ("frequency", "purchase_interval_mean_days", "purchase_interval_std_days"), {0, 1}),
}


@pytest.mark.parametrize("case", ["source ids", "gaps only", "mixed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_batches_in_random_order_give_the_batch_features(events, kind, case):
    state_of, features_of, batch_features, columns, exact = KINDS[kind]
    cfg, clean, mixed = events
    features = cfg.features.model_copy(update={"use_source_sessions": case != "gaps only"})
    data = mixed if case == "mixed" else clean
    parts = _batches(data)
    state = state_of(parts[2], features)
    for part in (parts[0], parts[1]):
        state = _merged(state, state_of(part, features), kind, features)
    expected = _sorted(batch_features(data, features), columns)
    got = _sorted(features_of(state, features), columns)
    assert len(got) == len(expected) > 50
    mismatched = _same(got, expected, exact)
    assert not mismatched, mismatched[:3]
    assert sum(g[1] for g in got) > len(got)  # users with several sessions / orders: merging was exercised

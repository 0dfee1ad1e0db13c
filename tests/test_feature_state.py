"""The streaming feature state: micro-batches merged in any arrival order give the batch job's
`user_features` on the same events, every column, as of the date the stream has reached."""

from __future__ import annotations

import math

import pytest
from pyspark.sql import functions as F

from segspark import ingest
from segspark.features import resolve_slots, user_features
from segspark.io.readers import read_raw_events
from segspark.streaming.feature_state import (
    TOUCHED,
    batch_state,
    count_map_median,
    count_map_mode,
    merge_state,
    state_features,
)


@pytest.fixture(scope="module")
def stream_events(spark, sample_parquet):
    from segspark.config import load_config

    from .conftest import REPO

    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={sample_parquet}/events"])
    clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input)).cache()
    as_of = clean.select(F.to_date(F.max("event_time"))).first()[0]
    return cfg, clean, as_of


def _rows(frame):
    return {row.user_id: row.asDict() for row in frame.collect()}


def _differences(got: dict, expected: dict) -> list:
    out = []
    for user, row in expected.items():
        for column, value in row.items():
            mine = got[user][column]
            if isinstance(value, float) and mine is not None and value is not None:
                if not math.isclose(mine, value, rel_tol=1e-9, abs_tol=1e-9):
                    out.append((user, column, mine, value))
            elif mine != value:
                out.append((user, column, mine, value))
    return out


def test_merged_micro_batches_give_the_batch_features(stream_events):
    cfg, clean, as_of = stream_events
    slots = resolve_slots(clean, as_of, cfg.features)
    # Three "micro-batches" split by a hash, not by time: every batch holds early and late events.
    parts = [clean.where(F.abs(F.xxhash64("user_id", "event_time", "event_type", "item_id")) % 3 == i) for i in range(3)]
    # localCheckpoint: each state is materialised, as the stream reads it back from its Delta table.
    state = batch_state(parts[1], cfg.features, slots).localCheckpoint()
    kept_as_they_were = 0
    for part in (parts[2], parts[0]):
        batch = batch_state(part, cfg.features, slots).localCheckpoint()
        merged = merge_state(state, batch, cfg.features, slots).localCheckpoint()
        touched = {r.user_id for r in merged.where(F.col(TOUCHED)).select("user_id").collect()}
        assert touched == {r.user_id for r in batch.select("user_id").collect()}  # the batch's users, no others
        kept_as_they_were += merged.count() - len(touched)  # users of the state the batch did not touch
        state = merged.drop(TOUCHED)
    assert kept_as_they_were > 0
    got = _rows(state_features(state, as_of, cfg.features, slots))
    expected = _rows(user_features(clean, as_of, cfg.features, slots))
    assert set(got) == set(expected) and len(expected) > 50
    differences = _differences(got, expected)
    assert not differences, differences[:5]
    # the merge was exercised: users whose events came in more than one batch
    assert state.where(F.col("events") > 3).count() > 20


def test_count_map_median_and_mode(spark):
    frame = spark.createDataFrame(
        [({1.0: 1, 3.0: 2, 2.0: 1}, {"de": 2, "at": 2, "fr": 1}), ({5.0: 1}, {"x": 1}), ({}, {})],
        "m map<double,bigint>, c map<string,bigint>",
    )
    rows = frame.select(count_map_median(F.col("m")).alias("median"), count_map_mode(F.col("c")).alias("mode")).collect()
    # 1, 2, 3, 3: rank ceil(4/2) = 2 -> 2.0, as percentile_approx; the mode's tie goes to the lowest key
    assert [(r.median, r.mode) for r in rows] == [(2.0, "at"), (5.0, "x"), (None, None)]
    exact = spark.createDataFrame([(1.0,), (3.0,), (3.0,), (2.0,)], "v double").select(F.percentile_approx("v", 0.5, 1000)).first()[0]
    assert exact == 2.0

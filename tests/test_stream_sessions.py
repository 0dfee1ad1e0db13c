"""Session state merged batch by batch, in any arrival order, gives the batch features' sessions:
same count, mean and median duration per user, with source session ids, with gap sessions only,
and with a mix of both."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from segspark import ingest
from segspark.features.behaviour import _session_aggregates
from segspark.io.readers import read_raw_events
from segspark.streaming.sessions import merge_sessions, session_features, session_state


@pytest.fixture(scope="module")
def events(spark, sample_parquet):
    from segspark.config import load_config

    from .conftest import REPO

    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={sample_parquet}/events"])
    clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input))
    # Half of the events lose their source session id: the mixed case, where the rest are numbered by gaps.
    mixed = clean.withColumn("session_id", F.when(F.xxhash64("event_time", "item_id") % 2 == 0, F.col("session_id")))
    return cfg, clean.cache(), mixed.cache()


def _sorted(frame):
    return sorted(tuple(row) for row in frame.select(
        "user_id", "sessions", "session_duration_mean_min", "session_duration_median_min").collect())


@pytest.mark.parametrize("case", ["source ids", "gaps only", "mixed"])
def test_batches_in_random_order_give_the_batch_sessions(events, case):
    cfg, clean, mixed = events
    features = cfg.features.model_copy(update={"use_source_sessions": case != "gaps only"})
    data = mixed if case == "mixed" else clean
    # Three "micro-batches" by a hash, not by time: each holds late and early events of every user.
    parts = [data.where(F.abs(F.xxhash64("user_id", "event_time", "event_type")) % 3 == i) for i in range(3)]
    state = session_state(parts[2], features)
    for part in (parts[0], parts[1]):
        state = merge_sessions(state, session_state(part, features), features)
    expected = _sorted(_session_aggregates(data, features))
    got = _sorted(session_features(state, features))
    assert len(got) == len(expected) > 100
    mismatched = [(g, e) for g, e in zip(got, expected, strict=True) if g[:2] != e[:2] or g[3] != e[3]
                  or abs(g[2] - e[2]) > 1e-9 * max(1.0, abs(e[2]))]
    assert not mismatched, mismatched[:3]
    assert sum(g[1] for g in got) > len(got)  # users with several sessions: merging was exercised

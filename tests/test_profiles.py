"""Segment profiles (sizes, shares, means, z-scores against pandas) and the naming rules."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from segspark.io.catalog import SEGMENT_PROFILES
from segspark.segments.profiles import (
    NOISE_NAME,
    UNASSIGNED,
    name_segment,
    segment_profiles,
    segment_profiles_by_model,
    segment_profiles_in_memory,
)

FEATURES = ["recency_days", "frequency", "monetary", "sessions", "night_share", "constant"]


@pytest.fixture(scope="module")
def data():
    """Three planted groups plus noise, with a null recency (never purchased) and a constant feature."""
    rng = np.random.default_rng(3)
    rows = []
    spec = {  # segment: (users, recency, frequency, monetary, sessions, night_share)
        0: (12, 3.0, 8, 900.0, 20, 0.05),  # recent, frequent, high spend
        1: (9, 80.0, 1, 30.0, 2, 0.10),  # one order long ago
        2: (6, None, 0, 0.0, 25, 0.80),  # many night sessions, no purchase
        -1: (3, 20.0, 2, 100.0, 5, 0.30),
    }
    for seg, (n, recency, frequency, monetary, sessions, night) in spec.items():
        for i in range(n):
            rows.append(
                {
                    "user_id": f"s{seg}-{i}",
                    "segment": seg,
                    "recency_days": None if recency is None else recency + float(rng.integers(0, 5)),
                    "frequency": frequency,
                    "monetary": monetary * float(rng.uniform(0.8, 1.2)),
                    "sessions": sessions + int(rng.integers(0, 3)),
                    "night_share": min(1.0, night + float(rng.uniform(0, 0.1))),
                    "constant": 1.0,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def profiles(spark, data):
    features = spark.createDataFrame(
        data[["user_id", *FEATURES]].astype(object).where(data[["user_id", *FEATURES]].notna(), None)
    )
    assignments = spark.createDataFrame(data[["user_id", "segment"]])
    return segment_profiles(features, assignments, FEATURES, top_n=3)


def test_sizes_shares_means_and_zscores_match_pandas(profiles, data):
    by_segment = profiles.by_segment()
    assert sorted(by_segment) == [-1, 0, 1, 2]

    expected_means = data.groupby("segment")[FEATURES].mean()  # NaN skipped, as Spark's avg
    pop_mean = data[FEATURES].mean()
    pop_std = data[FEATURES].std(ddof=0)
    for seg, profile in by_segment.items():
        members = data[data["segment"] == seg]
        assert profile.size == len(members)
        assert profile.share == pytest.approx(len(members) / len(data))
        for f in FEATURES:
            want = expected_means.loc[seg, f]
            if np.isnan(want):
                assert profile.means[f] is None and profile.zscores[f] == 0.0
                continue
            assert profile.means[f] == pytest.approx(want)
            z = 0.0 if pop_std[f] == 0 else (want - pop_mean[f]) / pop_std[f]
            assert profile.zscores[f] == pytest.approx(z, abs=1e-9)
    assert profiles.population_means["monetary"] == pytest.approx(pop_mean["monetary"])
    assert profiles.population_stds["constant"] == 0.0


def test_top_features_rank_by_absolute_z(profiles):
    for profile in profiles.segments:
        nonzero = {f: z for f, z in profile.zscores.items() if z != 0.0}
        want = sorted(nonzero, key=lambda f: (-abs(nonzero[f]), f))[:3]
        assert profile.top_features == want
        assert "constant" not in profile.top_features


def test_names_are_readable_unique_and_noise_is_named(profiles):
    names = profiles.names()
    assert names[-1] == NOISE_NAME
    assert len(set(names.values())) == len(names)
    assert "high-value" in names[0] and "frequent" in names[0]
    assert names[1] == "lapsed one-timers"
    assert "night-time" in names[2] and "browsers" in names[2]


def test_profiles_are_deterministic(spark, data, profiles):
    shuffled = data.sample(frac=1.0, random_state=7)
    features = spark.createDataFrame(
        shuffled[["user_id", *FEATURES]].astype(object).where(shuffled[["user_id", *FEATURES]].notna(), None)
    )
    again = segment_profiles(features, spark.createDataFrame(shuffled[["user_id", "segment"]]), FEATURES, top_n=3)
    assert again.names() == profiles.names()
    assert [p.top_features for p in again.segments] == [p.top_features for p in profiles.segments]


def test_rows_fit_the_table_schema(spark, profiles):
    df = profiles.to_dataframe(spark, "2026-10-31", "run-7", "kmeans")
    assert df.columns[:3] == ["as_of", "run_id", "model"]
    assert df.schema == SEGMENT_PROFILES and profiles.schema == SEGMENT_PROFILES
    rows = {r["segment"]: r for r in df.collect()}
    assert rows[1]["as_of"] == dt.date(2026, 10, 31) and rows[1]["run_id"] == "run-7"
    assert rows[1]["segment_name"] == "lapsed one-timers"
    assert rows[2]["feature_means"]["recency_days"] is None
    assert rows[0]["feature_zscores"]["monetary"] == pytest.approx(profiles.by_segment()[0].zscores["monetary"])
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)


def test_with_names_labels_assignments(spark, profiles):
    assignments = spark.createDataFrame([("a", 1), ("b", -1)], "user_id string, segment int")
    got = {r["user_id"]: r["segment_name"] for r in profiles.with_names(assignments).collect()}
    assert got == {"a": "lapsed one-timers", "b": NOISE_NAME}


# --- naming rules on hand-built profiles ------------------------------------------------------------

POP = {"frequency": 2.0, "sessions": 6.0, "monetary": 200.0}


def name(z, means=None, pop=POP, **kwargs):
    return name_segment(z, {**{"frequency": 2.0, "sessions": 6.0}, **(means or {})}, pop, **kwargs)


def test_value_and_frequency_adjectives():
    assert name({"monetary": 1.4, "frequency": 1.1}, {"frequency": 6.0, "sessions": 12.0}) == "high-value frequent buyers"
    assert name({"monetary": -0.9}) == "low-value buyers"


def test_lapsed_one_timers():
    assert name({"recency_days": 1.5, "frequency": -0.6}, {"frequency": 1.0, "sessions": 1.5}) == "lapsed one-timers"
    # One order is usually a small total: only a high one is worth a word.
    assert name({"monetary": -1.0}, {"frequency": 1.0, "sessions": 1.5}) == "one-timers"
    assert name({"monetary": 1.0}, {"frequency": 1.0, "sessions": 1.5}) == "high-value one-timers"


def test_night_time_browsers_and_window_shoppers():
    got = name({"night_share": 2.0, "sessions": 1.5, "frequency": -0.2}, {"frequency": 1.0, "sessions": 14.0})
    assert got == "night-time browsers"  # 1 order in 14 sessions: conversion far below 2 in 6
    assert name({"session_duration_mean_min": 1.2, "frequency": -1.0}, {"frequency": 0.0}) == "window shoppers"
    assert name({"frequency": -1.0}, {"frequency": 0.1}) == "occasional visitors"


def test_cart_abandoners_and_bargain_hunters():
    assert name({"view_to_cart_rate": 1.3, "cart_to_purchase_rate": -1.1}, {"frequency": 0.0}) == "cart abandoners"
    assert name({"price_bought_mean": -1.0, "frequency": 0.8}, {"frequency": 3.0}) == "frequent bargain hunters"


def test_weekend_and_time_of_day_shoppers():
    assert name({"weekend_share": 0.9}) == "weekend shoppers"
    assert name({"evening_share": 0.7, "morning_share": 0.6}) == "evening shoppers"  # the strongest time wins


def test_category_qualifier():
    z = {"monetary": 1.0, "top_category_1_share": 0.6, "top_category_2_share": 1.5}
    means = {"top_category_1_share": 0.3, "top_category_2_share": 0.5}
    assert name(z, means) == "high-value buyers in category 2"
    assert name(z, means, category_labels={"top_category_2_share": "games"}) == "high-value buyers in games"
    # A slot that stands out in z but is a small share of the segment's events is not named.
    assert name(z, {"top_category_2_share": 0.1}) == "high-value buyers"


def test_fallback_to_top_features():
    assert name({"sessions": 0.3, "recency_days": -0.4, "tenure_days": 0.1}) == "low recency_days, high sessions"
    assert name({"sessions": 0.0}) == "average users"
    # Missing features make their rules not fire rather than fail.
    assert name_segment({"returns": 2.0}, {}, {}) == "high returns"


def test_duplicate_names_are_disambiguated(spark):
    # Two segments that are both "browsers" (no orders, many sessions), one by views, one by sessions.
    rows = [(f"a{i}", 0, 0.0, 30.0, 10.0) for i in range(5)]
    rows += [(f"b{i}", 1, 0.0, 10.0, 40.0) for i in range(5)]
    rows += [(f"c{i}", 2, 4.0, 2.0, 2.0) for i in range(10)]
    features = spark.createDataFrame(rows, "user_id string, segment int, frequency double, sessions double, views double")
    result = segment_profiles(features, features.select("user_id", "segment"), ["frequency", "sessions", "views"])
    names = result.names()
    assert names[0] == "browsers, high sessions" and names[1] == "browsers, high views"
    assert len(set(names.values())) == 3


def test_profiles_on_the_driver_are_the_spark_aggregations(spark, data):
    """A run whose users all fit on the driver profiles them there (segments.stable): the same sizes,
    shares, means, population statistics, z-scores and names as the two Spark aggregations, for two
    models at once, one of which left a user unassigned and has no noise."""
    values = data[["user_id", *FEATURES]]
    other = np.where(data["segment"] == -1, 3, (data["segment"] + 1) % 3)
    other[0] = UNASSIGNED
    features = spark.createDataFrame(values.astype(object).where(values.notna(), None))
    assigned = pd.concat([
        pd.DataFrame({"model": "a", "user_id": data["user_id"], "segment": data["segment"]}),
        pd.DataFrame({"model": "b", "user_id": data["user_id"], "segment": other}).iloc[1:],
    ])
    in_spark = segment_profiles_by_model(features, spark.createDataFrame(assigned), FEATURES, top_n=3,
                                         models=["a", "b", "c"])
    on_driver = segment_profiles_in_memory(values, {"a": data["segment"].to_numpy(), "b": other}, FEATURES, top_n=3,
                                           models=["a", "b", "c"])

    assert sorted(on_driver) == sorted(in_spark) == ["a", "b", "c"]
    assert on_driver["c"].segments == in_spark["c"].segments == []
    for model in ("a", "b"):
        got, want = on_driver[model], in_spark[model]
        assert got.population_means == pytest.approx(want.population_means)
        assert got.population_stds == pytest.approx(want.population_stds)
        assert [(p.segment, p.name, p.size, p.share, p.top_features) for p in got.segments] == [
            (p.segment, p.name, p.size, p.share, p.top_features) for p in want.segments]
        for mine, theirs in zip(got.segments, want.segments, strict=True):
            assert mine.means == pytest.approx(theirs.means, nan_ok=True)
            assert mine.zscores == pytest.approx(theirs.zscores)
    assert sum(p.size for p in on_driver["b"].segments) == len(data) - 1
    assert on_driver["a"].by_segment()[2].means["recency_days"] is None  # every member's value is null


def test_relabel_equals_profiling_the_relabelled_assignments(spark, data, profiles):
    mapping = {0: 5, 1: 0, 2: 1}
    relabelled = data.assign(segment=data["segment"].map(lambda s: mapping.get(s, s)))
    features = spark.createDataFrame(
        data[["user_id", *FEATURES]].astype(object).where(data[["user_id", *FEATURES]].notna(), None)
    )
    direct = segment_profiles(features, spark.createDataFrame(relabelled[["user_id", "segment"]]), FEATURES, top_n=3)

    moved = profiles.relabel(mapping)

    assert [p.segment for p in moved.segments] == [-1, 0, 1, 5]
    assert moved.names() == direct.names()
    for got, want in zip(moved.segments, direct.segments, strict=True):
        assert (got.size, got.top_features) == (want.size, want.top_features)
        assert got.zscores == pytest.approx(want.zscores)
    with pytest.raises(ValueError, match="not in the mapping"):
        profiles.relabel({0: 1})

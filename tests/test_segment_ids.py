"""Stable segment ids across runs: overlap matching, centroid fallback, new and vanished ids, transitions."""

import datetime as dt

import pytest

from segspark.io.catalog import SEGMENT_TRANSITIONS
from segspark.segments.ids import (
    apply_mapping,
    match_segments,
    transitions,
    with_transition_keys,
)


def assignments(spark, pairs):
    return spark.createDataFrame(pairs, "user_id string, segment int")


def groups(prefix, sizes):
    """[(user, segment)] with `sizes[segment]` users per segment; -1 allowed as a key."""
    return [(f"{prefix}{seg}-{i}", seg) for seg, n in sizes.items() for i in range(n)]


@pytest.fixture(scope="module")
def previous_pairs():
    return groups("u", {0: 10, 1: 8, 2: 6, -1: 3})


def test_permuted_labels_map_back_exactly(spark, previous_pairs):
    previous = assignments(spark, previous_pairs)
    permutation = {0: 2, 1: 0, 2: 1, -1: -1}
    current = assignments(spark, [(u, permutation[s]) for u, s in previous_pairs])

    result = match_segments(current, previous)

    assert result.mapping == {-1: -1, 0: 1, 1: 2, 2: 0}
    assert result.new == [] and result.vanished == []
    assert result.method == {-1: "noise", 0: "overlap", 1: "overlap", 2: "overlap"}
    assert all(score == pytest.approx(1.0) for score in result.jaccard.values())
    relabelled = apply_mapping(current, result).collect()
    assert sorted((r["user_id"], r["segment"]) for r in relabelled) == sorted(previous_pairs)


def test_split_keeps_id_in_larger_part_and_new_id_is_never_reused(spark, previous_pairs):
    previous = assignments(spark, previous_pairs)
    # Previous cluster 0 (10 users) splits into raw 3 (7 users) and raw 0 (3 users); 1 and 2 keep
    # their users under raw labels 1 and 2.
    split = {f"u0-{i}": (3 if i < 7 else 0) for i in range(10)}
    current = assignments(spark, [(u, split.get(u, s)) for u, s in previous_pairs])

    # Ids up to 6 were used by earlier runs (e.g. a cluster that vanished two runs ago).
    result = match_segments(current, previous, next_id=7)

    assert result.mapping[3] == 0 and result.method[3] == "overlap"
    assert result.mapping[1] == 1 and result.mapping[2] == 2
    assert result.mapping[0] == 7 and result.method[0] == "new"
    assert result.new == [7] and result.vanished == []
    assert result.overlap[(3, 0)] == 7 and result.overlap[(0, 0)] == 3

    # Without a floor the new id still comes after every previous id.
    assert match_segments(current, previous).mapping[0] == 3


def test_vanished_cluster_is_reported(spark, previous_pairs):
    previous = assignments(spark, previous_pairs)
    # Cluster 2's users are absorbed into cluster 1: 1 keeps its id (larger Jaccard), 2 vanishes.
    current = assignments(spark, [(u, 1 if s == 2 else s) for u, s in previous_pairs])

    result = match_segments(current, previous)

    assert result.mapping == {-1: -1, 0: 0, 1: 1}
    assert result.vanished == [2] and result.new == []


def test_disjoint_users_fall_back_to_centroids(spark):
    previous = assignments(spark, groups("old", {0: 5, 1: 5, 2: 5}))
    current = assignments(spark, groups("new", {0: 5, 1: 5, 2: 5, -1: 2}))
    previous_centroids = {0: [0.0, 0.0], 1: [10.0, 0.0], 2: [0.0, 10.0]}
    # raw 0 sits next to previous 2, raw 1 next to previous 0, raw 2 is far from everything.
    current_centroids = {0: [0.5, 9.5], 1: [0.3, -0.2], 2: [30.0, 30.0], -1: [1.0, 1.0]}

    result = match_segments(
        current, previous, current_centroids=current_centroids, previous_centroids=previous_centroids
    )

    assert result.mapping == {-1: -1, 0: 2, 1: 0, 2: 3}
    assert result.method == {-1: "noise", 0: "centroid", 1: "centroid", 2: "new"}
    assert result.distance[1] == pytest.approx((0.3**2 + 0.2**2) ** 0.5)
    assert result.vanished == [1] and result.new == [3]

    # Without centroids every cluster is new: ids after the previous ones, in raw order.
    plain = match_segments(current, previous)
    assert plain.mapping == {-1: -1, 0: 3, 1: 4, 2: 5}
    assert plain.vanished == [0, 1, 2]

    # An explicit max_distance widens (or narrows) the default of half the closest previous pair.
    wide = match_segments(
        current, previous, current_centroids=current_centroids, previous_centroids=previous_centroids,
        max_distance=100.0,
    )
    assert wide.mapping[2] == 1 and wide.method[2] == "centroid"


def test_small_overlap_below_min_overlap_is_not_a_match(spark):
    previous = assignments(spark, groups("u", {0: 10, 1: 10}))
    # Raw 0 holds one of previous 0's users plus 9 users new to the data; raw 1 takes the other 19.
    current_pairs = [("u0-0", 0)] + [(f"u0-{i}", 1) for i in range(1, 10)] + [(f"u1-{i}", 1) for i in range(10)]
    current_pairs += [(f"x{i}", 0) for i in range(9)]
    current = assignments(spark, current_pairs)

    result = match_segments(current, previous, min_overlap=0.2)

    # raw 1 covers all of previous 1 and 9 of previous 0: Jaccard 10/19 with 1, 9/20 with 0.
    assert result.mapping[1] == 1
    assert result.jaccard[1] == pytest.approx(10 / 19)
    # raw 0 and previous 0 share a single user (Jaccard over common users 1/10 < 0.2): raw 0 is new.
    assert result.mapping[0] == 2 and result.vanished == [0]


def test_no_previous_run_is_the_identity(spark):
    current = assignments(spark, groups("u", {0: 2, 1: 2, 2: 2, -1: 1}))
    result = match_segments(current, None)
    assert result.mapping == {-1: -1, 0: 0, 1: 1, 2: 2}
    assert result.new == [0, 1, 2] and result.vanished == []


def test_apply_mapping_rejects_unmapped_segments(spark):
    current = assignments(spark, [("a", 0), ("b", 5), ("c", -1)])
    with pytest.raises(Exception, match="segment 5 is not in the mapping"):
        apply_mapping(current, {0: 3}).collect()
    assert sorted(r["segment"] for r in apply_mapping(current, {0: 3, 5: 4}).collect()) == [-1, 3, 4]


def test_transitions_count_users_between_stable_ids(spark):
    previous = assignments(spark, [("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", -1), ("gone", 1)])
    current = assignments(spark, [("a", 0), ("b", 1), ("c", 1), ("d", -1), ("e", 0), ("fresh", 2)])

    flows = transitions(current, previous)
    got = {(r["from_segment"], r["to_segment"]): r["users"] for r in flows.collect()}

    assert got == {(0, 0): 1, (0, 1): 1, (1, 1): 1, (1, -1): 1, (-1, 0): 1, (1, None): 1, (None, 2): 1}

    keyed = with_transition_keys(flows, "2026-10-31", "run-1", "kmeans")
    assert keyed.columns == [f.name for f in SEGMENT_TRANSITIONS.fields]
    assert [f.dataType for f in keyed.schema.fields] == [f.dataType for f in SEGMENT_TRANSITIONS.fields]
    row = keyed.first()
    assert (row["as_of"], row["run_id"], row["model"]) == (dt.date(2026, 10, 31), "run-1", "kmeans")
    assert sum(r["users"] for r in keyed.collect()) == 7

"""Stable segment ids across runs, and the user flow between segments.

A clustering numbers its clusters arbitrarily: the same customers can be cluster 2 in one run and
cluster 5 in the next. `match_segments` maps each cluster of the current run to the id its
counterpart had in the previous run, so that `segment` means the same group of customers from run
to run (reports, CRM audiences and `segment_transitions` rely on that).

Matching, in order:
1. Member overlap. Users present in both runs are counted per (current cluster, previous id)
   (one join and one aggregation; k x k numbers come to the driver). The score of a pair is the
   Jaccard index of the two member sets over those common users, |C & P| / |C | P|: unlike a raw
   count it does not favour matching a small cluster to a huge one, and a cluster that split keeps
   its id in the larger part. The Hungarian algorithm (`scipy.optimize.linear_sum_assignment`)
   picks the one-to-one matching with the largest total score; a pair scoring below `min_overlap`
   is not a match.
2. Centroid distance, for the clusters still unmatched when both runs' centroids are given (dict
   id -> coordinates in the same feature space, e.g. the prepared space): the Hungarian matching of
   smallest total Euclidean distance among the unmatched clusters, a pair counting only within
   `max_distance`. Its default is half the smallest distance between two previous centroids: a
   current centroid that close to a previous one is nearer to it than to any other previous
   centroid, so the match is never ambiguous. This links runs over different users (new cohorts).
3. New ids for the rest: max(largest previous id + 1, `next_id`), counting up in the order of the
   current cluster ids. Pass as `next_id` one more than the largest id ever used by the model (e.g.
   from `segment_profiles`) so that an id that vanished in an earlier run is never reused for a
   different cluster.

Previous ids left without a current cluster are reported as `vanished`. The noise segment -1 is
never matched: it always stays -1. Without a previous run the mapping is the identity.

`transitions` counts users by (previous stable id, current stable id): users only in the current
run have from_segment null (new users), users only in the previous run have to_segment null (no
longer in the population, e.g. no activity in the window); -1 is a segment like any other there.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.models.contract import NOISE_SEGMENT

log = logging.getLogger(__name__)


def _hungarian(matrix: np.ndarray, maximize: bool = False) -> list[tuple[int, int]]:
    """The optimal one-to-one pairs (row, column) of `matrix` (scipy's Hungarian algorithm). scipy.optimize
    is imported here, not with the module: it takes ~0.4 s, and the commands that never match segments
    (features, score, stream) import this module too."""
    from scipy.optimize import linear_sum_assignment

    return list(zip(*linear_sum_assignment(matrix, maximize=maximize), strict=True))


DEFAULT_MIN_OVERLAP = 0.1  # minimum Jaccard index of a member-overlap match


@dataclass(frozen=True)
class SegmentMapping:
    mapping: dict[int, int]  # current raw cluster -> stable id (-1 -> -1)
    new: list[int]  # stable ids given to clusters without a counterpart
    vanished: list[int]  # previous stable ids without a current cluster
    method: dict[int, str]  # current raw cluster -> "overlap" | "centroid" | "new" | "noise"
    # (current raw cluster, previous stable id) -> users in both; only pairs with common users
    overlap: dict[tuple[int, int], int] = field(default_factory=dict)
    jaccard: dict[int, float] = field(default_factory=dict)  # current raw cluster -> score of its overlap match
    distance: dict[int, float] = field(default_factory=dict)  # current raw cluster -> centroid match distance

    def metrics(self) -> dict:
        """JSON-ready summary for `runs.metrics` (keys as strings)."""
        return {
            "mapping": {str(k): v for k, v in sorted(self.mapping.items())},
            "method": {str(k): v for k, v in sorted(self.method.items())},
            "new": self.new,
            "vanished": self.vanished,
            "jaccard": {str(k): round(v, 6) for k, v in sorted(self.jaccard.items())},
            "distance": {str(k): round(v, 6) for k, v in sorted(self.distance.items())},
        }


def match_segments(
    current: DataFrame,
    previous: DataFrame | None,
    *,
    current_centroids: Mapping[int, Sequence[float]] | None = None,
    previous_centroids: Mapping[int, Sequence[float]] | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    max_distance: float | None = None,
    next_id: int | None = None,
) -> SegmentMapping:
    """Map the current run's raw clusters to stable ids (module docstring).

    current: this run's assignments (user_id, segment: raw cluster ids). previous: the previous
    run's assignments of the same model with stable ids (None when there is none). Centroids:
    segment id -> coordinates, for both runs in the same feature space. min_overlap: the smallest
    Jaccard index (0..1] that counts as an overlap match. next_id: the smallest id a new cluster
    may get (one more than the largest id the model ever used)."""
    _check_assignments(current, "current")
    if previous is None:
        sizes = current.groupBy(F.col("segment").cast("int").alias("segment")).count().collect()
        ids = {int(r["segment"]) for r in sizes if r["segment"] is not None}
        return match_from_counts(None, ids | set(current_centroids or ()), min_overlap=min_overlap)
    _check_assignments(previous, "previous")
    return match_from_counts(
        _cross_counts(current, previous),
        set(current_centroids or ()),
        current_centroids=current_centroids,
        previous_centroids=previous_centroids,
        min_overlap=min_overlap,
        max_distance=max_distance,
        next_id=next_id,
    )


def match_from_counts(
    cells: Sequence[tuple[int | None, int | None, int]] | None,
    current_ids: Iterable[int] = (),
    *,
    current_centroids: Mapping[int, Sequence[float]] | None = None,
    previous_centroids: Mapping[int, Sequence[float]] | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    max_distance: float | None = None,
    next_id: int | None = None,
) -> SegmentMapping:
    """`match_segments` from the user counts it reads, computed by the caller (no Spark here).

    cells: (current raw cluster, previous stable id, users) with None for "not in that run", as
    `cross_counts_by_model` gives them; None when there is no previous run (identity mapping).
    current_ids: clusters of the current run (the profiles' segments), also those no common user has."""
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"match_segments: min_overlap is a Jaccard index in (0, 1], got {min_overlap}")
    if max_distance is not None and max_distance < 0:
        raise ValueError(f"match_segments: max_distance must be >= 0, got {max_distance}")

    if cells is None:
        ids = sorted(set(current_ids) | set(current_centroids or ()))
        mapping = {c: c for c in ids}
        method = {c: "noise" if c == NOISE_SEGMENT else "new" for c in ids}
        new = [c for c in ids if c != NOISE_SEGMENT]
        log.info("segment ids: no previous run, identity mapping for %d clusters", len(new))
        return SegmentMapping(mapping, new, [], method)

    cur_ids = sorted({c for c, _, _ in cells if c is not None} | set(current_ids) | set(current_centroids or ()))
    prev_ids = sorted({p for _, p, _ in cells if p is not None} | set(previous_centroids or ()))
    cur_clusters = [c for c in cur_ids if c != NOISE_SEGMENT]
    prev_clusters = [p for p in prev_ids if p != NOISE_SEGMENT]

    # Sizes over the users present in both runs (either side's noise included), so that users who
    # joined or left do not dilute the overlap of a cluster that kept its members.
    overlap = {(c, p): n for c, p, n in cells if c is not None and p is not None}
    cur_common: dict[int, int] = {}
    prev_common: dict[int, int] = {}
    for (c, p), n in overlap.items():
        cur_common[c] = cur_common.get(c, 0) + n
        prev_common[p] = prev_common.get(p, 0) + n

    mapping: dict[int, int] = {}
    method: dict[int, str] = {}
    jaccard: dict[int, float] = {}
    distance: dict[int, float] = {}
    if NOISE_SEGMENT in cur_ids:
        mapping[NOISE_SEGMENT], method[NOISE_SEGMENT] = NOISE_SEGMENT, "noise"

    if cur_clusters and prev_clusters:
        score = np.zeros((len(cur_clusters), len(prev_clusters)))
        for i, c in enumerate(cur_clusters):
            for j, p in enumerate(prev_clusters):
                both = overlap.get((c, p), 0)
                if both:
                    score[i, j] = both / (cur_common[c] + prev_common[p] - both)
        for i, j in _hungarian(score, maximize=True):
            if score[i, j] >= min_overlap:
                c, p = cur_clusters[i], prev_clusters[j]
                mapping[c], method[c], jaccard[c] = p, "overlap", float(score[i, j])

    _match_centroids(
        [c for c in cur_clusters if c not in mapping],
        [p for p in prev_clusters if p not in set(mapping.values())],
        current_centroids,
        previous_centroids,
        max_distance,
        mapping,
        method,
        distance,
    )

    start = max([p + 1 for p in prev_clusters] + [next_id if next_id is not None else 0, 0])
    new = []
    for c in cur_clusters:
        if c not in mapping:
            mapping[c], method[c] = start, "new"
            new.append(start)
            start += 1
    matched = set(mapping.values())
    vanished = [p for p in prev_clusters if p not in matched]
    log.info(
        "segment ids: %s (overlap %d, centroid %d, new %s, vanished %s)",
        dict(sorted(mapping.items())),
        sum(1 for m in method.values() if m == "overlap"),
        sum(1 for m in method.values() if m == "centroid"),
        new,
        vanished,
    )
    return SegmentMapping(mapping, new, vanished, method, overlap, jaccard, distance)


def _match_centroids(cur, prev, current_centroids, previous_centroids, max_distance, mapping, method, distance):
    """Hungarian matching of the still-unmatched clusters by centroid distance (in place)."""
    if not cur or not prev or current_centroids is None or previous_centroids is None:
        return
    cur = [c for c in cur if c in current_centroids]
    prev = [p for p in prev if p in previous_centroids]
    if not cur or not prev:
        return
    a = _as_matrix(current_centroids, cur, "current_centroids")
    b = _as_matrix(previous_centroids, prev, "previous_centroids")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"match_segments: current centroids have {a.shape[1]} dimensions, previous ones {b.shape[1]}; "
            "pass both runs' centroids in the same feature space (or leave them out)."
        )
    limit = max_distance if max_distance is not None else _default_max_distance(previous_centroids)
    if limit is None:
        log.info("segment ids: fewer than 2 previous centroids and no max_distance, no centroid matching")
        return
    dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))
    for i, j in _hungarian(dist):
        if dist[i, j] <= limit:
            c, p = cur[i], prev[j]
            mapping[c], method[c], distance[c] = p, "centroid", float(dist[i, j])


def _as_matrix(centroids: Mapping[int, Sequence[float]], ids: list[int], name: str) -> np.ndarray:
    rows = [list(map(float, centroids[i])) for i in ids]
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"match_segments: {name} have different numbers of dimensions: {[len(r) for r in rows]}")
    return np.array(rows, dtype=float)


def _default_max_distance(previous_centroids: Mapping[int, Sequence[float]]) -> float | None:
    points = [list(map(float, v)) for k, v in sorted(previous_centroids.items()) if k != NOISE_SEGMENT]
    if len(points) < 2:
        return None
    smallest = min(math.dist(a, b) for i, a in enumerate(points) for b in points[i + 1:])
    return smallest / 2.0


def _check_assignments(df: DataFrame, name: str) -> None:
    missing = [c for c in ("user_id", "segment") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name} assignments have no column(s) {missing}; they have {df.columns}. "
            "Pass a DataFrame with user_id and segment (int, -1 = noise)."
        )


def _pairs(current: DataFrame, previous: DataFrame) -> DataFrame:
    """from_segment (previous), to_segment (current) per user of either run: a full outer join."""
    cur = current.select("user_id", F.col("segment").cast("int").alias("to_segment"))
    prev = previous.select("user_id", F.col("segment").cast("int").alias("from_segment"))
    return prev.join(cur, "user_id", "full_outer")


def _cross_counts(current: DataFrame, previous: DataFrame) -> list[tuple[int | None, int | None, int]]:
    """(current segment, previous segment, users) cells, None for 'not in that run'; (k+1) x (k'+1) rows."""
    rows = _pairs(current, previous).groupBy("to_segment", "from_segment").count().collect()
    return [(r["to_segment"], r["from_segment"], int(r["count"])) for r in rows]


def cross_counts_by_model(current: DataFrame, previous: DataFrame) -> dict[str, list[tuple[int | None, int | None, int]]]:
    """The cells of `_cross_counts` for several models in one job: both sides have model, user_id,
    segment (the current run's raw clusters; the previous run's stable ids), joined per model."""
    cur = current.select("model", "user_id", F.col("segment").cast("int").alias("to_segment"))
    prev = previous.select("model", "user_id", F.col("segment").cast("int").alias("from_segment"))
    rows = prev.join(cur, ["model", "user_id"], "full_outer").groupBy("model", "to_segment", "from_segment").count()
    cells: dict[str, list] = {}
    for r in rows.collect():
        cells.setdefault(r["model"], []).append((r["to_segment"], r["from_segment"], int(r["count"])))
    return cells


def transitions_from_counts(
    cells: Sequence[tuple[int | None, int | None, int]], mapping: Mapping[int, int]
) -> list[tuple[int | None, int | None, int]]:
    """`transitions` (from_segment, to_segment, users) from the cross counts of the raw current
    clusters, relabelled with the stable ids: no second pass over the users."""
    flows: dict[tuple[int | None, int | None], int] = {}
    for current, previous, users in cells:
        to = None if current is None else int(mapping.get(current, current))
        flows[(previous, to)] = flows.get((previous, to), 0) + users
    return [(a, b, n) for (a, b), n in sorted(flows.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0,
                                                                             kv[0][1] is None, kv[0][1] or 0))]


def apply_mapping(assignments: DataFrame, mapping: Mapping[int, int] | SegmentMapping) -> DataFrame:
    """Relabels `segment` with the stable ids (a literal map, evaluated on the executors).

    -1 stays -1. A segment value the mapping does not cover fails the query with a message naming
    it: it would otherwise collide silently with a stable id."""
    return assignments.withColumn("segment", stable_segment(mapping))


def stable_segment(mapping: Mapping[int, int] | SegmentMapping) -> Column:
    """`apply_mapping`'s expression: the stable id of the column `segment`."""
    lookup_dict = dict(mapping.mapping if isinstance(mapping, SegmentMapping) else mapping)
    lookup_dict.setdefault(NOISE_SEGMENT, NOISE_SEGMENT)
    lookup = F.create_map(*[x for k, v in sorted(lookup_dict.items()) for x in (F.lit(int(k)), F.lit(int(v)))])
    segment = F.col("segment").cast("int")
    mapped = lookup[segment]
    relabelled = F.when(segment.isNull(), F.lit(None).cast("int")).when(
        mapped.isNull(),
        F.raise_error(F.concat(F.lit("apply_mapping: segment "), segment.cast("string"),
                               F.lit(f" is not in the mapping (it covers {sorted(lookup_dict)})"))),
    ).otherwise(mapped)
    return relabelled.cast("int")


def transitions(current: DataFrame, previous: DataFrame) -> DataFrame:
    """from_segment, to_segment, users: user flow between two runs, both already in stable ids.

    from_segment is null for users only in the current run, to_segment null for users only in the
    previous one."""
    _check_assignments(current, "current")
    _check_assignments(previous, "previous")
    return (
        _pairs(current, previous)
        .groupBy("from_segment", "to_segment")
        .agg(F.count(F.lit(1)).cast("long").alias("users"))
    )


def with_transition_keys(flows: DataFrame, as_of: dt.date | str, run_id: str, model: str) -> DataFrame:
    """`transitions` output with the key columns, in the order and types of `io.catalog.SEGMENT_TRANSITIONS`."""
    day = dt.date.fromisoformat(as_of) if isinstance(as_of, str) else as_of
    return flows.select(
        F.lit(day).cast("date").alias("as_of"),
        F.lit(run_id).cast("string").alias("run_id"),
        F.lit(model).cast("string").alias("model"),
        F.col("from_segment").cast("int").alias("from_segment"),
        F.col("to_segment").cast("int").alias("to_segment"),
        F.col("users").cast("long").alias("users"),
    )

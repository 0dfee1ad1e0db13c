"""How well each segment stands apart, and which features set it apart (numpy, on a bounded sample).

The run's quality metrics give one silhouette per model; the report also shows it per segment, and
the prepared features that separate each segment from the others. Both are measured on the run's
hash sample of prepared users (`models.sample.UserSample`, already on the driver), with every
sampled user's final (stable) segment, so they describe the segments of the tables:

- per-segment silhouette: scikit-learn's Euclidean `silhouette_samples` of the sample's first
  `models.selection.silhouette_sample` users (the rows of the run's silhouette and Dunn index: it
  is quadratic in them), averaged per segment, in the space the model clusters in (the prepared
  features; the autoencoder's embeddings for the deep model). The noise segment -1 is not a cluster:
  it is left out, as in the run's silhouette. A segment's `nearest` segment is the other segment
  whose users are closest on average to its own (the smallest mean of the silhouette's b-distances:
  the one it would overlap);
- separating features: on every sampled user (the sweep's sample), the segment's mean of each
  prepared feature minus the mean of all other users (noise included), and minus its nearest
  segment's mean, each divided by that feature's standard deviation over the sampled users (a
  standardized mean difference: +1.8 reads "1.8 standard deviations above"). Dividing by the
  feature's own spread keeps the unit the same whatever `prepare` did to it (standard, minmax or
  quantile scaling, a family weight); a feature with no spread separates nothing. The `top_n`
  largest |differences| are kept, with their sign.

Only k-sized and top_n-sized results are kept: `separation` returns a JSON-ready record for
`runs.metrics.<model>.separation`, which the report reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segspark.segments.profiles import NOISE_SEGMENT, ranked


@dataclass(frozen=True)
class SegmentSilhouettes:
    """The silhouette of every sampled row and its mean per segment (segments in sorted order)."""

    segments: np.ndarray  # (k,) segment ids
    users: np.ndarray  # (k,) sampled rows per segment
    silhouette: np.ndarray  # (k,) mean silhouette of the segment's rows
    nearest: np.ndarray  # (k,) the other segment its rows are closest to on average
    samples: np.ndarray  # (n,) silhouette of each row, in the input's order

    @property
    def mean(self) -> float:
        """The overall silhouette (what sklearn's silhouette_score gives on the same rows)."""
        return float(self.samples.mean())


def segment_silhouettes(points: np.ndarray, labels: np.ndarray) -> SegmentSilhouettes | None:
    """Per-row Euclidean silhouette (equal to sklearn.metrics.silhouette_samples) and its mean per
    label. None when it is undefined: fewer than 2 labels, or as many labels as rows.

    From one distance matrix and its per-label sums (n x k), which also give each label's nearest
    other label; O(n^2 d) like sklearn, so `points` must be a bounded sample."""
    # Imported here, not with the module: sklearn takes ~0.9 s to import, and the commands that never
    # profile segments (features, score, stream) import this module too.
    from sklearn.metrics import pairwise_distances

    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    segments, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    n, k = labels.size, segments.size
    if not 2 <= k <= n - 1:
        return None
    member = np.zeros((n, k))
    member[np.arange(n), inverse] = 1.0
    to_segment = pairwise_distances(points, metric="euclidean") @ member  # sum of distances to each label
    rows = np.arange(n)
    own = sizes[inverse]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = to_segment[rows, inverse] / (own - 1)  # 0/0 for a single member: its silhouette is 0 below
        mean_to = to_segment / sizes[None, :]
    mean_to[rows, inverse] = np.inf
    b = mean_to.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.nan_to_num((b - a) / np.maximum(a, b))  # as sklearn: 0 for singletons and a = b = 0
    samples[own == 1] = 0.0
    per_segment = np.bincount(inverse, weights=samples, minlength=k) / sizes
    # Mean distance from each segment's rows to every other segment: the closest one is its neighbour.
    between = (member.T @ np.where(np.isfinite(mean_to), mean_to, 0.0)) / sizes[:, None]
    np.fill_diagonal(between, np.inf)
    return SegmentSilhouettes(segments, sizes, per_segment, segments[between.argmin(axis=1)], samples)


def mean_differences(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(segments, sizes, segment means, means of the rest): per label of `labels`, the mean of each
    column of `features` over its rows and over all other rows (NaN where there are none)."""
    features = np.asarray(features, dtype=np.float64)
    segments, inverse, sizes = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    sums = np.zeros((segments.size, features.shape[1]))
    np.add.at(sums, inverse, features)
    rest = features.shape[0] - sizes
    with np.errstate(divide="ignore", invalid="ignore"):
        means = sums / sizes[:, None]
        rest_means = (sums.sum(axis=0)[None, :] - sums) / rest[:, None]
    return segments, sizes, means, np.where(rest[:, None] > 0, rest_means, np.nan)


def top_differences(difference: np.ndarray, names: list[str], top_n: int) -> list[list]:
    """[[feature, difference], ...]: the `top_n` largest |difference|, ties by name (profiles.ranked)."""
    values = {name: float(v) for name, v in zip(names, difference, strict=True) if np.isfinite(v)}
    return [[name, round(values[name], 4)] for name in ranked(values)[:top_n]]


def separation(
    space: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    feature_names: list[str],
    *,
    space_name: str = "prepared features",
    top_n: int = 5,
) -> dict:
    """The record of one model (module docstring). `features`: the sample's prepared vectors and
    `labels` their segments; `space`: the first rows of the sample in the space the model clusters in
    (its silhouette's rows: as many as it has, at most `features`' rows)."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    head = labels[: len(space)]
    clustered = head != NOISE_SEGMENT
    silhouettes = segment_silhouettes(np.asarray(space)[clustered], head[clustered])
    by_segment = {} if silhouettes is None else {
        int(s): (int(n), float(v), int(near))
        for s, n, v, near in zip(silhouettes.segments, silhouettes.users, silhouettes.silhouette, silhouettes.nearest,
                                 strict=True)
    }
    segments, sizes, means, rest_means = mean_differences(features, labels)
    spread = np.asarray(features, dtype=np.float64).std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_sd = np.where(spread > 0, 1.0 / spread, np.nan)  # NaN: a constant feature is left out
    row_of = {int(s): i for i, s in enumerate(segments)}
    records = []
    for i, segment in enumerate(int(s) for s in segments):
        users, silhouette, nearest = by_segment.get(segment, (int((head == segment).sum()), None, None))
        record = {
            "segment": segment,
            "silhouette_users": users,
            "silhouette": None if silhouette is None else round(silhouette, 6),
            "nearest": nearest,
            "feature_users": int(sizes[i]),
            "versus_rest": top_differences((means[i] - rest_means[i]) * per_sd, feature_names, top_n),
            "versus_nearest": [],
        }
        if nearest is not None and nearest in row_of:
            record["versus_nearest"] = top_differences((means[i] - means[row_of[nearest]]) * per_sd, feature_names,
                                                       top_n)
        records.append(record)
    return {
        "space": space_name,
        "silhouette_users": int(len(space)),
        "silhouette": None if silhouettes is None else round(silhouettes.mean, 6),
        "feature_users": int(labels.size),
        "segments": records,
    }

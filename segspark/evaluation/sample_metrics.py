"""Clustering quality of one labelling of an in-memory sample (numpy and scikit-learn).

What the k sweep measures inside each of its Spark tasks, on the selection sample
(`models.sample.UserSample`): every metric is scikit-learn's definition, or the textbook one where
scikit-learn has none.

- `davies_bouldin`, `calinski_harabasz`: scikit-learn's scores on every sampled row.
- `wss`: the sum of squared distances of the sampled rows to their cluster mean.
- `silhouette`: scikit-learn's (Euclidean) silhouette on the first `silhouette_rows` rows of the
  sample. The sample is in hash order, so its first rows are themselves a hash-chosen sample; the
  silhouette is quadratic in its rows, which is why it gets fewer of them.
- `silhouette_sq`: the squared-Euclidean silhouette on every sampled row (what Spark's
  ClusteringEvaluator computes; equal to scikit-learn's with metric="sqeuclidean"), in O(n k) from
  per-cluster sums.
- `dunn`: the Dunn index on the silhouette's rows, from the same distance matrix: the smallest
  distance between two points of different clusters over the largest distance between two points of
  one cluster (Dunn 1974). Larger is better; it is undefined (None) for fewer than two clusters or
  when every cluster is a single point.

A metric that is undefined for the labelling (fewer than 2 clusters, or as many clusters as rows)
is None, as in `evaluation.metrics.cluster_metrics`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    pairwise_distances,
    silhouette_score,
)


def unmeasured(k: int, n: int, segments: list, sizes: list) -> dict:
    """The metrics record of a clustering before anything is measured: the same keys whether the
    metrics come from a sample in memory (sample_metrics) or from Spark (metrics.cluster_metrics)."""
    return {
        "k": k,
        "n": n,
        "segments": segments,
        "sizes": sizes,
        "wss": None,
        "davies_bouldin": None,
        "calinski_harabasz": None,
        "silhouette_sq": None,
        "silhouette": None,
        "silhouette_sample_size": 0,
    }


# The sample metrics a model's k curve records (model_selection's metric columns).
CURVE_METRICS = ("silhouette", "silhouette_sq", "davies_bouldin", "calinski_harabasz", "wss", "dunn")


def sample_metrics(points: np.ndarray, labels: np.ndarray, silhouette_rows: int) -> dict:
    """Quality of `labels` (integers, one per row of `points`); keys as in the module docstring plus
    k (non-empty clusters), n (rows), sizes and segments (sizes in the order of the sorted labels)."""
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if points.ndim != 2 or labels.shape != (points.shape[0],):
        raise ValueError(f"points must be n x d and labels n long, got {points.shape} and {labels.shape}")
    segments, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    n, k = points.shape[0], segments.size
    result = unmeasured(int(k), int(n), segments.tolist(), sizes.tolist())
    result["dunn"] = None
    if n == 0:
        return result
    means = np.zeros((k, points.shape[1]))
    np.add.at(means, inverse, points)
    means /= sizes[:, None]
    result["wss"] = float(((points - means[inverse]) ** 2).sum())
    if not 2 <= k <= n - 1:
        return result
    result["davies_bouldin"] = float(davies_bouldin_score(points, inverse))
    result["calinski_harabasz"] = float(calinski_harabasz_score(points, inverse))
    result["silhouette_sq"] = _squared_silhouette(points, inverse, sizes)

    m = min(int(silhouette_rows), n)
    head_labels = inverse[:m]
    if 2 <= np.unique(head_labels).size <= m - 1:
        distances = pairwise_distances(points[:m], metric="euclidean")
        result["silhouette"] = float(silhouette_score(distances, head_labels, metric="precomputed"))
        result["silhouette_sample_size"] = m
        result["dunn"] = _dunn(distances, head_labels)
    return result


def _squared_silhouette(points: np.ndarray, inverse: np.ndarray, sizes: np.ndarray) -> float:
    """Mean squared-Euclidean silhouette from per-cluster sums: the mean squared distance from x to
    the members of cluster c is ||x||^2 - 2 x.S1_c / n_c + S2_c / n_c (S1 the sum of the members,
    S2 the sum of their squared norms); a point's own cluster averages over the other members."""
    k = sizes.size
    norms = (points * points).sum(axis=1)
    s1 = np.zeros((k, points.shape[1]))
    np.add.at(s1, inverse, points)
    s2 = np.bincount(inverse, weights=norms, minlength=k)
    total = norms[:, None] * sizes[None, :] - 2.0 * points @ s1.T + s2[None, :]  # sum of d^2 to each cluster
    total = np.maximum(total, 0.0)  # rounding can leave a tiny negative
    rows = np.arange(points.shape[0])
    own_size = sizes[inverse]
    a = np.where(own_size > 1, total[rows, inverse] / np.maximum(own_size - 1, 1), 0.0)
    mean_to = total / sizes[None, :]
    mean_to[rows, inverse] = np.inf
    b = mean_to.min(axis=1)
    denominator = np.maximum(a, b)
    s = np.where((own_size > 1) & (denominator > 0), (b - a) / np.where(denominator > 0, denominator, 1.0), 0.0)
    return float(s.mean())


def _dunn(distances: np.ndarray, labels: np.ndarray) -> float | None:
    same = labels[:, None] == labels[None, :]
    diameter = float(distances[same].max(initial=0.0))
    if diameter <= 0.0:
        return None
    separation = float(distances[~same].min(initial=np.inf))
    return separation / diameter if np.isfinite(separation) else None

"""The bounded user sample (hash of user_id, collected once) and the metrics measured on it."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.functions import array_to_vector
from pyspark.sql import functions as F
from sklearn import metrics as skm
from sklearn.datasets import make_blobs
from sklearn.metrics import pairwise_distances

from segspark.evaluation.sample_metrics import sample_metrics
from segspark.models.prepare import PREPARED_VECTOR
from segspark.models.sample import collect_user_sample, hash_order

COLUMNS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def prepared(spark):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(900, 3))
    rows = [(f"user-{i:05d}", *map(float, v)) for i, v in enumerate(x)]
    frame = spark.createDataFrame(rows, ["user_id", *COLUMNS])
    return frame.withColumn(PREPARED_VECTOR, array_to_vector(F.array(*COLUMNS))).cache(), x


def test_sample_is_the_smallest_hashes_and_does_not_depend_on_partitioning(spark, prepared):
    frame, x = prepared
    sample = collect_user_sample(frame, COLUMNS, 200, 900, seed=42)
    assert sample.size == 200 and sample.total_users == 900 and sample.matrix.shape == (200, 3)
    # Exactly the 200 users with the smallest xxhash64(user_id, seed), in that order, with their values.
    expected = [r.user_id for r in frame.orderBy(hash_order(42), "user_id").limit(200).select("user_id").collect()]
    assert list(sample.user_ids) == expected
    by_id = {f"user-{i:05d}": v for i, v in enumerate(x)}
    np.testing.assert_array_equal(sample.matrix, np.array([by_id[u] for u in expected]))
    # Another partitioning, and a filter that lets through all users, give the same sample.
    again = collect_user_sample(frame.repartition(7), COLUMNS, 200, 900, seed=42)
    assert list(again.user_ids) == expected
    # The first rows of a sample are the smaller sample: the silhouette's and HDBSCAN's rows.
    small = collect_user_sample(frame, COLUMNS, 50, 900, seed=42)
    assert list(sample.head(50).user_ids) == list(small.user_ids)
    # Another seed, another sample.
    assert list(collect_user_sample(frame, COLUMNS, 200, 900, seed=7).user_ids) != expected


def test_sample_takes_every_user_when_there_are_fewer(prepared):
    frame, _ = prepared
    sample = collect_user_sample(frame, COLUMNS, 5000, 900, seed=42)
    assert sample.size == 900 and len(set(sample.user_ids)) == 900
    assert sample.describe() == "900 of 900 users"
    with pytest.raises(ValueError, match="at least 1"):
        collect_user_sample(frame, COLUMNS, 0, 900, seed=42)


def _dunn(points, labels):
    d = pairwise_distances(points)
    same = labels[:, None] == labels[None, :]
    return d[~same].min() / d[same].max()


def test_sample_metrics_equal_scikit_learn_and_the_textbook_dunn_index():
    points, labels = make_blobs(n_samples=700, centers=4, n_features=5, cluster_std=1.5, random_state=3)
    labels[0] = 9  # a singleton cluster: scored 0 by the silhouette, as scikit-learn does
    m = sample_metrics(points, labels, silhouette_rows=300)
    assert m["k"] == 5 and m["n"] == 700 and sum(m["sizes"]) == 700 and m["segments"] == [0, 1, 2, 3, 9]
    assert m["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(points, labels), rel=1e-12)
    assert m["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(points, labels), rel=1e-12)
    assert m["silhouette"] == pytest.approx(skm.silhouette_score(points[:300], labels[:300]), rel=1e-12)
    assert m["silhouette_sample_size"] == 300
    assert m["silhouette_sq"] == pytest.approx(skm.silhouette_score(points, labels, metric="sqeuclidean"), rel=1e-9)
    assert m["dunn"] == pytest.approx(_dunn(points[:300], labels[:300]), rel=1e-12)
    centres = {c: points[labels == c].mean(axis=0) for c in set(labels)}
    assert m["wss"] == pytest.approx(sum(((p - centres[c]) ** 2).sum() for p, c in zip(points, labels, strict=True)))


def test_sample_metrics_leave_undefined_values_empty():
    points = np.arange(12, dtype=float).reshape(6, 2)
    one = sample_metrics(points, np.zeros(6, dtype=int), silhouette_rows=6)
    assert one["k"] == 1 and one["wss"] is not None
    assert one["silhouette"] is one["davies_bouldin"] is one["dunn"] is None
    # Every cluster a single point: no diameter, so no Dunn index.
    assert sample_metrics(points[:3], np.array([0, 1, 2]), 3)["dunn"] is None

"""Clustering metrics computed in Spark against scikit-learn on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from segspark.evaluation.metrics import (
    adjusted_rand_index,
    cluster_metrics,
    mean_pairwise_ari,
    silhouette_sample_rows,
)


def _frame(spark, X, labels, label_col="segment"):
    rows = [(f"u{i:05d}", Vectors.dense(x.tolist()), int(lab)) for i, (x, lab) in enumerate(zip(X, labels, strict=True))]
    return spark.createDataFrame(rows, ["user_id", "features_vector", label_col])


def _wss(X, labels):
    labels = np.asarray(labels)
    return sum(float(((X[labels == c] - X[labels == c].mean(axis=0)) ** 2).sum()) for c in np.unique(labels))


@pytest.fixture(scope="module")
def overlapping(spark):
    """Overlapping, unequal blobs with labels that are not 0..k-1 (some silhouettes negative)."""
    X, y = make_blobs(n_samples=[250, 150, 100], n_features=6, cluster_std=[1.5, 2.5, 1.0], random_state=7)
    labels = np.array([-1, 5, 9])[y]
    df = _frame(spark, X, labels).cache()
    return X, labels, df


def test_metrics_equal_sklearn_on_full_data(overlapping):
    X, labels, df = overlapping
    m = cluster_metrics(df, silhouette_sample=10_000)

    assert m["silhouette_sample_size"] == len(X)
    assert m["silhouette"] == pytest.approx(skm.silhouette_score(X, labels), abs=1e-9)
    assert m["silhouette_sq"] == pytest.approx(skm.silhouette_score(X, labels, metric="sqeuclidean"), abs=1e-9)
    assert m["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X, labels), rel=1e-9)
    assert m["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(X, labels), rel=1e-9)
    assert m["wss"] == pytest.approx(_wss(X, labels), rel=1e-9)
    assert m["k"] == 3
    assert m["segments"] == [-1, 5, 9]
    assert m["sizes"] == [250, 150, 100]
    assert m["n"] == 500
    for name in ("silhouette", "silhouette_sq", "davies_bouldin", "calinski_harabasz", "wss"):
        assert isinstance(m[name], float), name


def test_sampled_silhouette_equals_sklearn_on_the_sampled_rows(overlapping):
    X, labels, df = overlapping
    m = cluster_metrics(df, silhouette_sample=150, seed=3)

    rows = silhouette_sample_rows(df, 150, seed=3).collect()
    Xs = np.array([r["features_vector"].toArray() for r in rows])
    ys = [r["segment"] for r in rows]
    assert m["silhouette_sample_size"] == len(rows) == 150
    assert m["silhouette"] == pytest.approx(skm.silhouette_score(Xs, ys), abs=1e-9)

    # Deterministic for a seed, different rows for another seed; the full-data metrics do not sample.
    again = [r["user_id"] for r in silhouette_sample_rows(df, 150, seed=3).collect()]
    other = [r["user_id"] for r in silhouette_sample_rows(df, 150, seed=4).collect()]
    assert again == [r["user_id"] for r in rows]
    assert set(other) != set(again)
    assert m["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X, labels), rel=1e-9)


def test_singleton_cluster_scores_zero_like_sklearn(spark):
    X, y = make_blobs(n_samples=120, centers=3, n_features=4, cluster_std=1.0, random_state=1)
    X = np.vstack([X, [[30.0, 30.0, 30.0, 30.0]]])
    y = np.append(y, 7)  # a one-member cluster
    m = cluster_metrics(_frame(spark, X, y), silhouette_sample=1000)

    assert m["k"] == 4 and m["sizes"][-1] == 1
    assert m["silhouette"] == pytest.approx(skm.silhouette_score(X, y), abs=1e-9)
    assert m["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X, y), rel=1e-9)
    assert m["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(X, y), rel=1e-9)


def test_one_cluster_is_reported_not_an_error(spark):
    X, _ = make_blobs(n_samples=60, centers=2, n_features=3, random_state=2)
    m = cluster_metrics(_frame(spark, X, np.zeros(len(X))))

    assert m["k"] == 1 and m["sizes"] == [60]
    assert m["wss"] == pytest.approx(_wss(X, np.zeros(len(X))), rel=1e-9)
    for name in ("silhouette", "silhouette_sq", "davies_bouldin", "calinski_harabasz"):
        assert m[name] is None, name


def test_missing_column_is_named(spark):
    X, y = make_blobs(n_samples=10, centers=2, n_features=2, random_state=0)
    with pytest.raises(ValueError, match="'cluster'"):
        cluster_metrics(_frame(spark, X, y), prediction_col="cluster")


def test_ari_equals_sklearn_and_skips_nulls(spark):
    rng = np.random.default_rng(5)
    n = 2000
    a = rng.integers(0, 4, n)
    b = np.where(rng.random(n) < 0.7, a, rng.integers(0, 5, n))  # agrees with a most of the time
    c = rng.integers(0, 3, n)
    null_a = rng.random(n) < 0.05
    null_b = rng.random(n) < 0.05
    rows = [
        (f"u{i}", None if null_a[i] else int(a[i]), None if null_b[i] else int(b[i]), int(c[i]), int((a[i] + 1) % 4))
        for i in range(n)
    ]
    df = spark.createDataFrame(rows, "user_id string, a int, b int, c int, a_renamed int")
    keep = ~null_a & ~null_b

    assert adjusted_rand_index(df, "a", "b") == pytest.approx(skm.adjusted_rand_score(a[keep], b[keep]), abs=1e-12)
    assert adjusted_rand_index(df, "b", "c") == pytest.approx(skm.adjusted_rand_score(b[~null_b], c[~null_b]), abs=1e-12)
    assert adjusted_rand_index(df, "a", "a_renamed") == 1.0  # same partition, other label values

    expected = np.mean(
        [
            skm.adjusted_rand_score(a[keep], b[keep]),
            skm.adjusted_rand_score(a[~null_a], c[~null_a]),
            skm.adjusted_rand_score(b[~null_b], c[~null_b]),
        ]
    )
    assert mean_pairwise_ari(df, ["a", "b", "c"]) == pytest.approx(expected, abs=1e-12)
    assert mean_pairwise_ari(df, ["a"]) is None

"""Clustering quality metrics computed with Spark aggregations.

Only k x d-sized results (per-cluster counts, means, distance sums) and single numbers come back
to the driver, so the metrics work on millions of users. Each metric is defined to equal its
scikit-learn counterpart on the same rows:

- `davies_bouldin`, `calinski_harabasz`, `wss`: on all rows, from one pass for per-cluster count and
  mean and a second pass for each row's distance to its cluster mean.
- `silhouette`: true Euclidean silhouette on a deterministic bounded sample (`silhouette_sample_rows`,
  at most models.selection.silhouette_sample rows, selected in Spark and scored on the driver):
  `sklearn.metrics.silhouette_score` on exactly those rows.
- `silhouette_sq`: Spark's `ClusteringEvaluator` (squared Euclidean) on all rows; it agrees with
  `silhouette_score(metric="sqeuclidean")`. It is cheap at any size but rewards compact clusters
  more than the Euclidean one, which is why both are reported.
- `adjusted_rand_index` / `mean_pairwise_ari`: from the contingency table (k_a x k_b cells).

Rows whose vector or label is null are left out. Every distinct label value (including -1) counts
as a cluster, as in scikit-learn.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.functions import vector_to_array
from pyspark.ml.stat import Summarizer
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, LongType, StructField, StructType
from sklearn.metrics import silhouette_score

from segspark.evaluation.sample_metrics import unmeasured

log = logging.getLogger(__name__)

DEFAULT_FEATURES = "features_vector"
DEFAULT_PREDICTION = "segment"


def _require_columns(df: DataFrame, *cols: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found in the DataFrame (columns: {df.columns}); "
            "pass the right features_col / prediction_col / label column names"
        )


def _euclidean(x: Column, y: Column) -> Column:
    """sqrt(sum((x - y)^2)) of two equal-length double arrays, computed directly (no dot-product
    trick) so that close points keep their precision."""
    squares = F.zip_with(x, y, lambda a, b: (a - b) * (a - b))
    return F.sqrt(F.aggregate(squares, F.lit(0.0), lambda acc, v: acc + v))


def silhouette_sample_rows(
    df: DataFrame,
    n: int,
    seed: int = 0,
    features_col: str = DEFAULT_FEATURES,
    prediction_col: str = DEFAULT_PREDICTION,
) -> DataFrame:
    """The rows the sampled silhouette uses: the first `n` rows ordered by
    (xxhash64(user_id, seed), user_id), nulls left out.

    A hash order rather than `sample()` so the same rows come back on every call, on any partitioning,
    and so a caller (or a test) can fetch exactly the rows a metric was computed on. Returns
    user_id, features_col, prediction_col."""
    if n < 1:
        raise ValueError(f"silhouette sample size must be at least 1, got {n}")
    _require_columns(df, "user_id", features_col, prediction_col)
    clean = df.where(F.col(features_col).isNotNull() & F.col(prediction_col).isNotNull())
    order = F.xxhash64(F.col("user_id"), F.lit(int(seed)))
    return (
        clean.select("user_id", features_col, prediction_col)
        .orderBy(order, F.col("user_id"))
        .limit(int(n))
    )


def _sampled_silhouette(sample: DataFrame, features_col: str, prediction_col: str) -> tuple[float | None, int]:
    """(mean Euclidean silhouette, sample size) of a bounded sample: scikit-learn's silhouette_score.

    The sample is bounded by models.selection.silhouette_sample (a few thousand rows x d numbers,
    like every fitting sample), so it is brought to the driver and scored there exactly as
    sklearn.metrics.silhouette_score does (s = 0 for a singleton cluster). An n^2 Spark cross join
    of array lambdas did the same in about a minute per k for 2,000 rows; numpy takes milliseconds.
    The metrics over all users (Spark's silhouette, Davies-Bouldin, Calinski-Harabasz, WSS) stay
    distributed. None when the sample has fewer than 2 or as many labels as rows (sklearn raises)."""
    rows = sample.select(
        F.col(prediction_col).cast("long").alias("_lab"), vector_to_array(F.col(features_col)).alias("_x")
    ).collect()
    n = len(rows)
    labels = np.array([r["_lab"] for r in rows])
    distinct = len(set(labels.tolist()))
    if not 2 <= distinct <= n - 1:
        log.warning("sampled silhouette undefined: %d label(s) among %d sampled rows", distinct, n)
        return None, n
    points = np.array([r["_x"] for r in rows], dtype=float)
    return float(silhouette_score(points, labels, metric="euclidean")), n


def cluster_metrics(
    df: DataFrame,
    features_col: str = DEFAULT_FEATURES,
    prediction_col: str = DEFAULT_PREDICTION,
    *,
    silhouette_sample: int = 2000,
    seed: int = 0,
) -> dict:
    """Quality of one clustering. Needs `user_id`, a vector `features_col` and an integer `prediction_col`.

    Returns a dict: silhouette (Euclidean, on `silhouette_sample_rows(df, silhouette_sample, seed)`),
    silhouette_sample_size, silhouette_sq (Spark ClusteringEvaluator, all rows), davies_bouldin,
    calinski_harabasz, wss (sum of squared distances to the cluster mean), k (non-empty clusters),
    sizes and segments (sizes in the order of the sorted segment labels), n (rows used). The
    metrics that need at least two clusters (and fewer clusters than rows) are None when undefined.

    Several passes over `df`: cache it first when it is expensive to recompute."""
    _require_columns(df, "user_id", features_col, prediction_col)
    rows = df.where(F.col(features_col).isNotNull() & F.col(prediction_col).isNotNull())
    vec = F.col(features_col)

    # Pass 1: per-cluster count and mean (k x d back to the driver).
    stats = rows.groupBy(F.col(prediction_col).alias("_lab")).agg(
        F.count("*").alias("_n"), Summarizer.mean(vec).alias("_mean")
    )
    collected = sorted(stats.collect(), key=lambda r: r["_lab"])
    labels = [int(r["_lab"]) for r in collected]
    sizes = [int(r["_n"]) for r in collected]
    k, n = len(labels), sum(sizes)
    result = unmeasured(k, n, labels, sizes)
    if k == 0:
        log.warning("cluster_metrics: no rows with both %s and %s set", features_col, prediction_col)
        return result
    centroids = np.array([r["_mean"].toArray() for r in collected], dtype=float)

    # Pass 2: each row's distance to its own centroid (centroids joined as a k-row broadcast table).
    spark = df.sparkSession
    schema = StructType(
        [StructField("_lab", LongType(), False), StructField("_c", ArrayType(DoubleType(), False), False)]
    )
    centre_df = spark.createDataFrame([(lab, c.tolist()) for lab, c in zip(labels, centroids, strict=True)], schema)
    dist = _euclidean(vector_to_array(vec), F.col("_c"))
    per_cluster = (
        rows.select(F.col(prediction_col).cast("long").alias("_lab"), vec)
        .join(F.broadcast(centre_df), "_lab")
        .select("_lab", dist.alias("_d"))
        .groupBy("_lab")
        .agg(F.sum("_d").alias("_sum_d"), F.sum(F.col("_d") * F.col("_d")).alias("_sum_d2"))
    )
    by_label = {int(r["_lab"]): (float(r["_sum_d"]), float(r["_sum_d2"])) for r in per_cluster.collect()}
    sum_d = np.array([by_label[lab][0] for lab in labels])
    sum_d2 = np.array([by_label[lab][1] for lab in labels])
    counts = np.array(sizes, dtype=float)
    wss = float(sum_d2.sum())
    result["wss"] = wss

    if not 2 <= k <= n - 1:
        log.warning("cluster_metrics: %d cluster(s) for %d rows; silhouette, DB and CH are undefined", k, n)
        return result

    # Davies-Bouldin exactly as sklearn.metrics.davies_bouldin_score.
    intra = sum_d / counts
    diff = centroids[:, None, :] - centroids[None, :, :]
    centre_dist = np.sqrt((diff * diff).sum(axis=2))
    if np.allclose(intra, 0) or np.allclose(centre_dist, 0):
        db = 0.0
    else:
        centre_dist[centre_dist == 0] = np.inf
        db = float(np.mean(np.max((intra[:, None] + intra[None, :]) / centre_dist, axis=1)))
    result["davies_bouldin"] = db

    # Calinski-Harabasz as sklearn.metrics.calinski_harabasz_score: between / within dispersion.
    overall = (counts[:, None] * centroids).sum(axis=0) / n
    extra = float((counts * ((centroids - overall) ** 2).sum(axis=1)).sum())
    result["calinski_harabasz"] = 1.0 if wss == 0.0 else extra * (n - k) / (wss * (k - 1.0))

    evaluator = ClusteringEvaluator(
        featuresCol=features_col,
        predictionCol=prediction_col,
        metricName="silhouette",
        distanceMeasure="squaredEuclidean",
    )
    result["silhouette_sq"] = float(evaluator.evaluate(rows))

    sil, sample_n = _sampled_silhouette(
        silhouette_sample_rows(rows, silhouette_sample, seed, features_col, prediction_col),
        features_col,
        prediction_col,
    )
    result["silhouette"] = sil
    result["silhouette_sample_size"] = sample_n
    return result


def _pair_counts(df: DataFrame, pairs: Sequence[tuple[str, str]]) -> dict[int, list[tuple[object, object, int]]]:
    """Contingency tables of several label-column pairs in one Spark job: each row is exploded into
    one (pair, a, b) entry per pair, then counted. Labels are compared as strings so columns of
    different types can share the exploded array; nulls in either column are left out per pair."""
    entries = F.explode(
        F.array(
            *[
                F.struct(F.lit(i).alias("p"), F.col(a).cast("string").alias("a"), F.col(b).cast("string").alias("b"))
                for i, (a, b) in enumerate(pairs)
            ]
        )
    ).alias("e")
    counted = (
        df.select(entries)
        .select("e.p", "e.a", "e.b")
        .where(F.col("a").isNotNull() & F.col("b").isNotNull())
        .groupBy("p", "a", "b")
        .count()
    )
    tables: dict[int, list[tuple[object, object, int]]] = {i: [] for i in range(len(pairs))}
    for row in counted.collect():
        tables[int(row["p"])].append((row["a"], row["b"], int(row["count"])))
    return tables


def _ari_from_table(table: Sequence[tuple[object, object, int]]) -> float:
    """sklearn.metrics.adjusted_rand_score's pair-confusion formula, in exact Python integers."""
    n = sum(c for _, _, c in table)
    row_sums: dict[object, int] = {}
    col_sums: dict[object, int] = {}
    for a, b, c in table:
        row_sums[a] = row_sums.get(a, 0) + c
        col_sums[b] = col_sums.get(b, 0) + c
    sum_squares = sum(c * c for _, _, c in table)
    tp = sum_squares - n
    fp = sum(c * col_sums[b] for _, b, c in table) - sum_squares
    fn = sum(c * row_sums[a] for a, _, c in table) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        # Identical partitions (also no rows or one row), as sklearn returns.
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def adjusted_rand_index(df: DataFrame, col_a: str, col_b: str) -> float:
    """Adjusted Rand index between two label columns of `df` (rows with a null in either left out);
    equals sklearn.metrics.adjusted_rand_score. Only the contingency table comes to the driver."""
    _require_columns(df, col_a, col_b)
    return _ari_from_table(_pair_counts(df, [(col_a, col_b)])[0])


def mean_pairwise_ari(df: DataFrame, label_cols: Sequence[str]) -> float | None:
    """Mean adjusted Rand index over all pairs of `label_cols` (one Spark job for all pairs);
    None when there are fewer than two columns."""
    cols = list(label_cols)
    if len(cols) < 2:
        return None
    _require_columns(df, *cols)
    pairs = list(itertools.combinations(cols, 2))
    tables = _pair_counts(df, pairs)
    values = [_ari_from_table(tables[i]) for i in range(len(pairs))]
    mean = math.fsum(values) / len(values)
    log.debug("pairwise ARI over %s: %s (mean %.4f)", cols, values, mean)
    return mean

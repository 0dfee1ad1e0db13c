"""MLlib KMeans segmentation with a soft membership probability and an anomaly score.

Probability (documented contract): KMeans is read as a mixture of spherical Gaussians with equal
weights and one shared variance sigma^2, estimated from the fit as the mean squared distance of a
training point to its centroid per dimension (training cost / (n * d)). A user's membership in
cluster j is then softmax_j(-d_j^2 / (2 sigma^2)) over the squared distances d_j^2 to every centroid
in the prepared feature space (models.prepare: imputed, log1p, capped, selected, scaled);
`probability` is the membership of the assigned (nearest) cluster, so it is in (1/k, 1].
`anomaly_score` is the distance to the assigned centroid divided by the root-mean-square training
distance: about 1 for a typical member, larger for outliers. `is_anomaly` flags the users above the
(1 - contamination) quantile of the training users' scores.

Like every swept model (models.registry), the module offers `options`, `fit_sample` (the k sweep's
scikit-learn fit), `fit_one` (the MLlib fit on every user) and `users_per_cluster`; the fitted model
keeps models.contract.SegmentModel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.config import ClusteringConfig
from segspark.models.contract import (
    QUANTILE_RELATIVE_ERROR,
    MLlibSaving,
    assignments,
    check_fit_arguments,
    squared_distances,
    threshold_aggregate,
)
from segspark.models.mllib_start import can_start_from_sample, kmeans_from_centres
from segspark.models.prepare import PREPARED_VECTOR
from segspark.models.sample_grid import SampleFit
from segspark.runtime.expressions import memoised

log = logging.getLogger(__name__)

MODEL_NAME = "kmeans"


@dataclass(frozen=True)
class FittedKMeans(MLlibSaving):
    SPARK_FIELDS: ClassVar = {"model": "pyspark.ml.clustering.KMeansModel"}

    model: KMeansModel
    k: int
    seed: int
    centroids: list[list[float]]  # in the prepared space, k x d (small)
    sigma2: float  # shared per-dimension variance of the spherical-Gaussian reading
    cluster_sizes: list[int]
    objective: float  # within-cluster sum of squares (MLlib training cost)
    anomaly_threshold: float | None  # None: nobody is flagged (contamination 0)
    model_name: str = MODEL_NAME
    degenerate_retries: int = 0
    warm_start: bool = False  # started from the sample's centroids (models.mllib_start)
    fitted_on: str = "mllib"  # "driver": the sample's fit of every user as it is (fit_one's `points`)

    def metrics(self) -> dict:
        return {
            "model": self.model_name,
            "k": self.k,
            "seed": self.seed,
            "cluster_sizes": self.cluster_sizes,
            "objective": self.objective,
            "training_cost": self.objective,
            "sigma2": self.sigma2,
            "anomaly_threshold": self.anomaly_threshold,
            "warm_start": self.warm_start,
            "fitted_on": self.fitted_on,
        }

    def predict(self, prepared: DataFrame) -> DataFrame:
        """prepared's columns plus `segment` (int)."""
        scored = self.model.transform(prepared)
        return scored.withColumn("segment", F.col("segment").cast("int"))

    def assign(self, prepared: DataFrame) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities (null)."""
        return assignments(_scores(self, prepared), self.anomaly_threshold)


def options(cfg: ClusteringConfig, sample: np.ndarray) -> dict:
    """The keyword options of `fit_sample` and `fit_one` from the model's config."""
    return {"max_iter": cfg.max_iter, "contamination": cfg.contamination}


def users_per_cluster(cfg: ClusteringConfig, dims: int) -> int:
    """Users a cluster needs at the least (k + 1 users in all: a silhouette needs a cluster of two)."""
    return 1


def fit_sample(points: np.ndarray, k: int, seed: int, *, max_iter: int = 40, **_: object) -> SampleFit:
    """scikit-learn KMeans (k-means++, one initialisation) on the sample: what the k sweep measures."""
    from sklearn.cluster import KMeans as SkKMeans

    fitted = SkKMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(points)
    return SampleFit(labels=fitted.labels_, objective=float(fitted.inertia_),
                     params={"centroids": fitted.cluster_centers_})


def fit_one(
    prepared: DataFrame,
    k: int,
    seed: int,
    *,
    max_iter: int = 40,
    contamination: float = 0.01,
    quantile_relative_error: float = QUANTILE_RELATIVE_ERROR,
    start: SampleFit | None = None,
    points: np.ndarray | None = None,
    **_: object,
) -> FittedKMeans:
    """Fit MLlib KMeans on every user's prepared vector (`FittedPreparation.transform`); only k x d
    and one aggregate row come back. start: the sample's solution to start from (models.mllib_start:
    on a classic session; otherwise, and without one, MLlib's k-means|| with `seed`). points: set
    when the sample holds every user (their prepared vectors); `start` is then already scikit-learn's
    fit of every user, and becomes the MLlib model as it is, without MLlib's iterations."""
    check_fit_arguments(k, contamination, quantile_relative_error)
    # Fit on a projection, not on the cached `prepared` itself: MLlib caches its own deserialised
    # vectors only when its input is not cached, and re-reading Spark's columnar cache on every
    # iteration was measured 3.6x slower (200k users, 33 dimensions).
    vectors = prepared.select(PREPARED_VECTOR)
    warm = start is not None and can_start_from_sample(prepared)
    on_driver = warm and points is not None
    if warm:
        model = kmeans_from_centres(vectors, PREPARED_VECTOR, start.params["centroids"], max_iter=max_iter, seed=seed,
                                    iterate=not on_driver)
    else:
        estimator = KMeans(k=k, maxIter=max_iter, seed=seed, featuresCol=PREPARED_VECTOR, predictionCol="segment")
        model = estimator.fit(vectors)
    model.setFeaturesCol(PREPARED_VECTOR).setPredictionCol("segment")
    centroids = [list(map(float, c)) for c in model.clusterCenters()]
    # One pass over the users: cluster sizes, the cost and the anomaly threshold. The score is the
    # distance to the centroid over the RMS training distance sqrt(cost / n), so the quantile of the
    # plain distance is taken and divided afterwards.
    scored = model.transform(vectors).select(
        F.col("segment").cast("int").alias("segment"),
        squared_distances(vector_to_array(F.col(PREPARED_VECTOR)), centroids).alias("_d2"),
    ).select("segment", F.array_min("_d2").alias("_nearest"))
    aggregates = [F.sum("_nearest").alias("cost"), F.count(F.lit(1)).alias("n")]
    aggregates += [F.sum(F.when(F.col("segment") == j, 1).otherwise(0)).alias(f"size_{j}") for j in range(len(centroids))]
    if contamination > 0:
        aggregates.append(threshold_aggregate(F.sqrt("_nearest"), contamination, quantile_relative_error).alias("q"))
    row = scored.agg(*aggregates).first()
    n, cost = int(row["n"]), float(row["cost"] or 0.0)
    sizes = [int(row[f"size_{j}"]) for j in range(len(centroids))]
    d = len(centroids[0])
    sigma2 = max(cost / max(n * d, 1), 1e-12)
    rms = math.sqrt(sigma2 * d)
    threshold = float(row["q"]) / rms if contamination > 0 and row["q"] is not None else None
    how = ("scikit-learn's fit of every user, on the driver" if on_driver
           else "started from the sample's centroids" if warm else "k-means|| start")
    log.info("kmeans k=%d seed=%d on %d users (%s): sizes %s, cost %.1f", k, seed, n, how, sizes, cost)
    return FittedKMeans(model, k, seed, centroids, sigma2, sizes, cost, threshold, warm_start=warm,
                        fitted_on="driver" if on_driver else "mllib")


def _scores(fitted: FittedKMeans, prepared: DataFrame) -> DataFrame:
    distances, outputs = memoised(fitted, "scores", lambda: _score_expressions(fitted))
    scored = fitted.model.transform(prepared).select("user_id", F.col("segment").cast("int"), distances)
    return scored.select("user_id", "segment", *outputs)


def _score_expressions(fitted: FittedKMeans) -> tuple[Column, list[Column]]:
    """The squared distances to the centroids (`_d2`), then probability and anomaly_score from them:
    expressions of the fitted constants, built once per fitted model (`memoised`)."""
    point = vector_to_array(F.col(PREPARED_VECTOR))
    distances = squared_distances(point, fitted.centroids).alias("_d2")
    two_sigma2 = 2.0 * fitted.sigma2
    nearest = F.array_min("_d2")
    # Subtract the nearest distance before exponentiating so that far-away users do not underflow.
    weights = F.transform("_d2", lambda d2: F.exp(-(d2 - nearest) / F.lit(two_sigma2)))
    total = F.aggregate(weights, F.lit(0.0), lambda acc, w: acc + w)
    rms = math.sqrt(fitted.sigma2 * len(fitted.centroids[0]))
    return distances, [
        (F.lit(1.0) / total).alias("probability"),  # the nearest centroid has weight exp(0) = 1
        (F.sqrt(nearest) / F.lit(rms)).alias("anomaly_score"),
    ]


FITTED = FittedKMeans

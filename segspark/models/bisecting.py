"""MLlib BisectingKMeans segmentation: the KMeans baseline's soft probability and anomaly score.

Probability: read like `models.kmeans`, as a mixture of equal-weight spherical Gaussians with one
shared per-dimension variance sigma^2 = WSS / (n * d). A user's membership in cluster j is
softmax_j(-d_j^2 / (2 sigma^2)) over the squared distances to every leaf centroid, and `probability`
is the membership of the segment MLlib assigned. Unlike KMeans that is not always the nearest
centroid: BisectingKMeans assigns by walking its tree of splits (the closer child at each level), so
a user near a split border can land in a leaf whose centroid is not the closest. The probability is
then below 1/k and says so honestly instead of pretending the user sits in the nearest cluster.
`anomaly_score` is the distance to the assigned centroid over the root-mean-square training distance
(about 1 for a typical member); `is_anomaly` marks scores above the training scores' (1 -
contamination) quantile, computed once at fit time on the executors and stored.

MLlib splits a cluster by nudging its centre by 1e-4 times the centre's norm. Standard-scaled
features have their overall centre at the origin, where that nudge is zero: both children start at
the same point and MLlib silently returns a single cluster (seen on real prepared features). The fit
therefore reads the vectors shifted by +1 in every dimension (`_BISECT_INPUT`); distances, and so
the clustering, are unchanged, and `centroids` are reported in the unshifted prepared space. The
saved MLlib model expects that shifted column: score through `predict`/`assign`.

BisectingKMeans can return fewer than k leaves (a cluster smaller than minDivisibleClusterSize is
not split); that is logged and `centroids` / `cluster_sizes` have the real number of clusters.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from pyspark.ml.clustering import BisectingKMeans, BisectingKMeansModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.config import BisectingKMeansConfig
from segspark.models.contract import (
    QUANTILE_RELATIVE_ERROR,
    MLlibSaving,
    assignments,
    check_fit_arguments,
    squared_distance,
    threshold_aggregate,
)
from segspark.models.prepare import PREPARED_VECTOR, check_prepared
from segspark.models.sample_grid import SampleFit

log = logging.getLogger(__name__)

MODEL_NAME = "bisecting_kmeans"
_BISECT_INPUT = "_bisect_input"  # the prepared vector shifted off the origin (see module docstring)
_SHIFT = 1.0


@dataclass(frozen=True)
class FittedBisectingKMeans(MLlibSaving):
    SPARK_FIELDS: ClassVar = {"model": "pyspark.ml.clustering.BisectingKMeansModel"}

    model_name: str
    k: int  # requested; len(centroids) may be smaller (see module docstring)
    seed: int
    model: BisectingKMeansModel
    centroids: list[list[float]]  # leaf cluster means in the prepared space, clusters x d
    objective: float  # within-cluster sum of squares (summary.trainingCost); lower is better
    cluster_sizes: list[int]
    sigma2: float  # shared per-dimension variance of the spherical-Gaussian reading
    contamination: float
    anomaly_threshold: float | None  # None when contamination is 0: nobody is flagged
    min_divisible_cluster_size: float
    degenerate_retries: int = 0  # interface parity with gmm: a bisecting fit is never retried
    bic: float | None = None
    aic: float | None = None

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def metrics(self) -> dict:
        return {
            "model": self.model_name,
            "k": self.k,
            "clusters": self.n_clusters,
            "seed": self.seed,
            "cluster_sizes": self.cluster_sizes,
            "objective": self.objective,
            "training_cost": self.objective,
            "sigma2": self.sigma2,
            "contamination": self.contamination,
            "anomaly_threshold": self.anomaly_threshold,
            "min_divisible_cluster_size": self.min_divisible_cluster_size,
            "degenerate_retries": self.degenerate_retries,
        }

    def predict(self, prepared: DataFrame) -> DataFrame:
        """Every column of `prepared` plus `segment` (int)."""
        check_prepared(prepared, need_user_id=False)
        return self.model.transform(_with_shifted(prepared)).select(*prepared.columns, F.col("segment").cast("int"))

    def assign(self, prepared: DataFrame) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities (null) per user."""
        check_prepared(prepared, need_user_id=True)
        return assignments(_scored(self, prepared), self.anomaly_threshold)


def options(cfg: BisectingKMeansConfig, sample: np.ndarray) -> dict:
    """The keyword options of `fit_sample` and `fit_one` from the model's config."""
    return {"max_iter": cfg.max_iter, "contamination": cfg.contamination,
            "min_divisible_cluster_size": cfg.min_divisible_cluster_size}


def users_per_cluster(cfg: BisectingKMeansConfig, dims: int) -> int:
    """Users a cluster needs at the least (k + 1 users in all: a silhouette needs a cluster of two)."""
    return 1


def fit_sample(points: np.ndarray, k: int, seed: int, *, max_iter: int = 20, **_: object) -> SampleFit:
    """scikit-learn BisectingKMeans on the sample: what the k sweep measures. `largest_cluster` is
    the strategy closest to MLlib's, which splits the larger divisible clusters first."""
    from sklearn.cluster import BisectingKMeans as SkBisectingKMeans

    fitted = SkBisectingKMeans(
        n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed, bisecting_strategy="largest_cluster"
    ).fit(points)
    return SampleFit(labels=fitted.labels_, objective=float(fitted.inertia_),
                     params={"centroids": fitted.cluster_centers_})


def fit_one(
    prepared: DataFrame,
    k: int,
    seed: int,
    *,
    max_iter: int = 20,
    min_divisible_cluster_size: float = 1.0,
    contamination: float = 0.01,
    quantile_relative_error: float = QUANTILE_RELATIVE_ERROR,
    start: SampleFit | None = None,
    **_: object,
) -> FittedBisectingKMeans:
    """Fit BisectingKMeans on `features_vector`; only clusters x d numbers and one quantile come back.

    min_divisible_cluster_size: >= 1 a point count, < 1 a share of the users (MLlib's meaning).
    start: ignored. Neither of MLlib's BisectingKMeans estimators takes an initial model, so the full
    fit always starts from its own initialisation, with the sweep's best seed.
    Cache `prepared` first: it is read by the fit and once more for the anomaly threshold."""
    check_prepared(prepared, need_user_id=False)
    check_fit_arguments(k, contamination, quantile_relative_error)
    estimator = BisectingKMeans(
        k=k,
        maxIter=max_iter,
        seed=seed,
        minDivisibleClusterSize=min_divisible_cluster_size,
        featuresCol=_BISECT_INPUT,
        predictionCol="segment",
    )
    model: BisectingKMeansModel = estimator.fit(_with_shifted(prepared))
    centroids = [[float(x) - _SHIFT for x in c] for c in model.clusterCenters()]
    summary = model.summary
    sizes = [int(s) for s in summary.clusterSizes]
    cost = float(summary.trainingCost)
    n, d = sum(sizes), len(centroids[0])
    if len(centroids) < k:
        log.warning(
            "bisecting_kmeans k=%d seed=%d found only %d divisible clusters (min_divisible_cluster_size=%s): "
            "lower min_divisible_cluster_size or k",
            k,
            seed,
            len(centroids),
            min_divisible_cluster_size,
        )
    # Floor: a perfect fit (every user on a centroid) would otherwise divide by zero in the softmax.
    sigma2 = max(cost / max(n * d, 1), 1e-12)
    # Without a threshold yet: the threshold is a quantile of this fit's own training scores.
    fitted = FittedBisectingKMeans(
        MODEL_NAME, k, seed, model, centroids, cost, sizes, sigma2, contamination, None, min_divisible_cluster_size
    )
    threshold = None
    if contamination > 0:
        row = _scored(fitted, prepared).agg(
            threshold_aggregate(F.col("anomaly_score"), contamination, quantile_relative_error).alias("threshold")
        )
        threshold = float(row.first()["threshold"])
    log.info(
        "bisecting_kmeans k=%d seed=%d fitted on %d users: sizes %s, cost %.4g, anomaly threshold %s",
        k,
        seed,
        n,
        sizes,
        cost,
        threshold,
    )
    return replace(fitted, anomaly_threshold=threshold)


def _scored(fitted: FittedBisectingKMeans, prepared: DataFrame) -> DataFrame:
    """user_id (when present), segment, probability, anomaly_score; column expressions only."""
    point = vector_to_array(F.col(PREPARED_VECTOR))
    distances = F.array(*[squared_distance(point, centre) for centre in fitted.centroids])
    keep = ["user_id"] if "user_id" in prepared.columns else []
    scored = fitted.model.transform(_with_shifted(prepared)).select(
        *keep, F.col("segment").cast("int"), distances.alias("_d2")
    )
    nearest = F.array_min("_d2")
    own = F.element_at("_d2", F.col("segment") + 1)  # the assigned leaf, not necessarily the nearest
    two_sigma2 = F.lit(2.0 * fitted.sigma2)
    # Shift by the nearest distance before exponentiating so that far-away users do not underflow.
    total = F.aggregate(
        F.transform("_d2", lambda d2: F.exp(-(d2 - nearest) / two_sigma2)), F.lit(0.0), lambda acc, w: acc + w
    )
    rms = math.sqrt(fitted.sigma2 * len(fitted.centroids[0]))
    return scored.select(
        *keep,
        "segment",
        (F.exp(-(own - nearest) / two_sigma2) / total).alias("probability"),
        (F.sqrt(own) / F.lit(rms)).alias("anomaly_score"),
    )


def _with_shifted(prepared: DataFrame) -> DataFrame:
    shifted = F.transform(vector_to_array(F.col(PREPARED_VECTOR)), lambda x: x + F.lit(_SHIFT))
    return prepared.withColumn(_BISECT_INPUT, array_to_vector(shifted))


FITTED = FittedBisectingKMeans

"""MLlib KMeans segmentation with a soft membership probability.

Probability (documented contract): KMeans is read as a mixture of spherical Gaussians with equal
weights and one shared variance sigma^2, estimated from the fit as the mean squared distance of a
training point to its centroid per dimension (training cost / (n * d)). A user's membership in
cluster j is then softmax_j(-d_j^2 / (2 sigma^2)) over the squared distances d_j^2 to every centroid
in the prepared feature space (models.prepare: imputed, log1p, capped, selected, scaled);
`probability` is the membership of the assigned (nearest) cluster, so it is in (1/k, 1].
`anomaly_score` is the distance to the assigned centroid divided by the root-mean-square training
distance: about 1 for a typical member, larger for outliers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.config import KMeansConfig
from segspark.models.prepare import PREPARED_VECTOR

log = logging.getLogger(__name__)

MODEL_NAME = "kmeans"


@dataclass(frozen=True)
class FittedKMeans:
    model: KMeansModel  # save with model.write().overwrite().save(path)
    feature_names: list[str]  # the prepared features, in vector order
    centroids: list[list[float]]  # in the prepared space, k x d (small)
    sigma2: float  # shared per-dimension variance of the spherical-Gaussian reading
    segment_names: list[str]
    cluster_sizes: list[int]
    training_cost: float

    def metrics(self) -> dict:
        return {
            "k": len(self.centroids),
            "features": len(self.feature_names),
            "cluster_sizes": self.cluster_sizes,
            "training_cost": self.training_cost,
            "sigma2": self.sigma2,
            "segment_names": self.segment_names,
        }


def fit(prepared: DataFrame, cfg: KMeansConfig, feature_names: Sequence[str]) -> FittedKMeans:
    """Fit KMeans on the prepared vector (`FittedPreparation.transform`); only k x d comes back.

    feature_names: the prepared features in vector order (`FittedPreparation.selected`)."""
    kmeans = KMeans(k=cfg.k, maxIter=cfg.max_iter, seed=cfg.seed, featuresCol=PREPARED_VECTOR, predictionCol="segment")
    model: KMeansModel = kmeans.fit(prepared)
    centroids = [list(map(float, c)) for c in model.clusterCenters()]
    names = list(feature_names)
    if centroids and len(centroids[0]) != len(names):
        raise ValueError(f"the prepared vector has {len(centroids[0])} dimensions but {len(names)} feature names")
    summary = model.summary
    sizes = [int(s) for s in summary.clusterSizes]
    n, d = sum(sizes), len(names)
    sigma2 = max(summary.trainingCost / max(n * d, 1), 1e-12)
    labels = segment_names(centroids, names, sizes)
    log.info("kmeans k=%d fitted on %d users: sizes %s, cost %.1f", cfg.k, n, sizes, summary.trainingCost)
    return FittedKMeans(model, names, centroids, sigma2, labels, sizes, float(summary.trainingCost))


def assign(fitted: FittedKMeans, prepared: DataFrame) -> DataFrame:
    """user_id, segment, segment_name, probability, anomaly_score for every user (executors only)."""
    scored = fitted.model.transform(prepared)
    point = vector_to_array(F.col(PREPARED_VECTOR))
    distances = [_squared_distance(point, centre) for centre in fitted.centroids]
    scored = scored.select("user_id", F.col("segment").cast("int"), F.array(*distances).alias("_d2"))

    two_sigma2 = 2.0 * fitted.sigma2
    nearest = F.array_min("_d2")
    # Subtract the nearest distance before exponentiating so that far-away users do not underflow.
    weights = F.transform("_d2", lambda d2: F.exp(-(d2 - nearest) / F.lit(two_sigma2)))
    total = F.aggregate(weights, F.lit(0.0), lambda acc, w: acc + w)
    names = F.array(*[F.lit(n) for n in fitted.segment_names])
    rms = math.sqrt(fitted.sigma2 * len(fitted.feature_names))
    return scored.select(
        "user_id",
        "segment",
        F.element_at(names, F.col("segment") + 1).alias("segment_name"),
        (F.lit(1.0) / total).alias("probability"),  # the nearest centroid has weight exp(0) = 1
        (F.sqrt(nearest) / F.lit(rms)).alias("anomaly_score"),
    )


def _squared_distance(point: Column, centre: list[float]) -> Column:
    centre_col = F.array(*[F.lit(float(x)) for x in centre])
    return F.aggregate(F.zip_with(point, centre_col, lambda a, b: (a - b) * (a - b)), F.lit(0.0), lambda s, x: s + x)


def segment_names(
    centroids: list[list[float]], features: Sequence[str], sizes: Sequence[int] | None = None
) -> list[str]:
    """Deterministic readable names from each centroid's two strongest features, e.g.
    "high monetary, low recency_days". Ties and repeats get the segment number appended.

    "Strongest" is the largest deviation from the size-weighted mean of the centroids (the mean
    user in the prepared space), so names read the same under standard scaling (mean about 0) and
    min-max scaling (every value >= 0). Without sizes the deviation is from 0."""
    mean = _weighted_mean(centroids, sizes) if sizes else [0.0] * len(features)
    names = []
    for index, centre in enumerate(centroids):
        deviation = [c - m for c, m in zip(centre, mean, strict=True)]
        ranked = sorted(range(len(deviation)), key=lambda i: (-abs(deviation[i]), features[i]))[:2]
        parts = [f"{'high' if deviation[i] > 0 else 'low'} {features[i]}" for i in ranked]
        name = ", ".join(parts)
        names.append(name if name not in names else f"{name} ({index})")
    return names


def _weighted_mean(centroids: list[list[float]], sizes: Sequence[int]) -> list[float]:
    total = sum(sizes) or 1
    return [sum(c[i] * s for c, s in zip(centroids, sizes, strict=True)) / total for i in range(len(centroids[0]))]

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

Small data: MLlib runs every iteration of every level as a Spark job (34 jobs for k=6 at 5,000 users,
3.3 s in a warm local session, 18 s in a run's contended demo, where scikit-learn takes 0.04 s). When
the run's user sample holds every user (`points`), the full fit is scikit-learn's on the driver, the
fit the k sweep measured, and its hierarchy of splits becomes MLlib's tree (`_mllib_model`): the saved
model is an MLlib BisectingKMeansModel like any other, which assigns by the same walk (the closer
child centre at each split). `fitted_on` in the metrics says which fit ran ("driver" or "mllib").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from pyspark.ml.clustering import BisectingKMeans, BisectingKMeansModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.config import BisectingKMeansConfig
from segspark.models.contract import (
    QUANTILE_RELATIVE_ERROR,
    MLlibSaving,
    assignments,
    check_fit_arguments,
    squared_distances,
    threshold_aggregate,
)
from segspark.models.mllib_start import can_start_from_sample
from segspark.models.prepare import PREPARED_VECTOR, check_prepared
from segspark.models.sample_grid import SampleFit
from segspark.runtime.expressions import memoised
from segspark.runtime.jvm import doubles

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
    fitted_on: str = "mllib"  # "driver": every user's vector fitted by scikit-learn (module docstring)

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
            "fitted_on": self.fitted_on,
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
    """scikit-learn BisectingKMeans on the sample: what the k sweep measures."""
    fitted = _sklearn_fit(points, k, seed, max_iter)
    return SampleFit(labels=fitted.labels_, objective=float(fitted.inertia_),
                     params={"centroids": fitted.cluster_centers_})


def _sklearn_fit(points: np.ndarray, k: int, seed: int, max_iter: int):
    """`largest_cluster` is the strategy closest to MLlib's, which splits the larger divisible
    clusters first."""
    from sklearn.cluster import BisectingKMeans as SkBisectingKMeans

    return SkBisectingKMeans(
        n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed, bisecting_strategy="largest_cluster"
    ).fit(points)


def fit_one(
    prepared: DataFrame,
    k: int,
    seed: int,
    *,
    max_iter: int = 20,
    min_divisible_cluster_size: float = 1.0,
    contamination: float = 0.01,
    quantile_relative_error: float = QUANTILE_RELATIVE_ERROR,
    points: np.ndarray | None = None,
    **_: object,
) -> FittedBisectingKMeans:
    """Fit BisectingKMeans on `features_vector`; only clusters x d numbers and one quantile come back.

    min_divisible_cluster_size: >= 1 a point count, < 1 a share of the users (MLlib's meaning).
    points: every user's prepared vector, in the driver's memory when the run's user sample holds
    them all: then scikit-learn fits them on the driver, with the sweep's best seed, and its tree
    becomes the MLlib model (module docstring; a classic session and min_divisible_cluster_size 1,
    scikit-learn's rule, else MLlib fits). Neither of MLlib's BisectingKMeans estimators takes an
    initial model: the MLlib fit starts from its own initialisation, with the sweep's best seed.
    Cache `prepared` first: it is read by the fit and once more for the anomaly threshold."""
    check_prepared(prepared, need_user_id=False)
    check_fit_arguments(k, contamination, quantile_relative_error)
    driver = None
    if points is not None and min_divisible_cluster_size == 1.0 and can_start_from_sample(prepared):
        driver = _driver_fit(prepared, np.asarray(points, dtype=float), k, seed, max_iter, min_divisible_cluster_size)
    if driver is not None:
        model, sizes, cost = driver
    else:
        estimator = BisectingKMeans(
            k=k,
            maxIter=max_iter,
            seed=seed,
            minDivisibleClusterSize=min_divisible_cluster_size,
            featuresCol=_BISECT_INPUT,
            predictionCol="segment",
        )
        model = estimator.fit(_with_shifted(prepared))
        summary = model.summary
        sizes, cost = [int(s) for s in summary.clusterSizes], float(summary.trainingCost)
    centroids = [[float(x) - _SHIFT for x in c] for c in model.clusterCenters()]
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
        MODEL_NAME, k, seed, model, centroids, cost, sizes, sigma2, contamination, None, min_divisible_cluster_size,
        fitted_on="mllib" if driver is None else "driver",
    )
    threshold = None
    if contamination > 0:
        row = _scored(fitted, prepared).agg(
            threshold_aggregate(F.col("anomaly_score"), contamination, quantile_relative_error).alias("threshold")
        )
        threshold = float(row.first()["threshold"])
    log.info(
        "bisecting_kmeans k=%d seed=%d fitted on %d users (%s): sizes %s, cost %.4g, anomaly threshold %s",
        k,
        seed,
        n,
        "scikit-learn on the driver" if driver is not None else "MLlib",
        sizes,
        cost,
        threshold,
    )
    return replace(fitted, anomaly_threshold=threshold)


def _driver_fit(prepared: DataFrame, points: np.ndarray, k: int, seed: int, max_iter: int,
                min_divisible_cluster_size: float) -> tuple[BisectingKMeansModel, list[int], float] | None:
    """scikit-learn's fit of every user as an MLlib model, its cluster sizes and cost (by MLlib's walk
    of the tree); None where scikit-learn keeps no tree (the private `_bisecting_tree` of 1.1 and later)."""
    fitted = _sklearn_fit(points, k, seed, max_iter)
    tree = getattr(fitted, "_bisecting_tree", None)
    if tree is None or not hasattr(tree, "left"):
        log.info("bisecting_kmeans: scikit-learn kept no tree of splits; MLlib fits every user")
        return None
    nodes = _nodes(tree, fitted.labels_, points)
    if any(not node.members.any() for node in nodes):  # an empty cluster has no centre: MLlib decides
        log.info("bisecting_kmeans: scikit-learn left an empty cluster; MLlib fits every user")
        return None
    labels = _walk(nodes, points)
    leaves = [node for node in nodes if node.leaf >= 0]
    sizes = [int((labels == leaf.leaf).sum()) for leaf in sorted(leaves, key=lambda node: node.leaf)]
    centres = np.array([leaf.centre for leaf in sorted(leaves, key=lambda node: node.leaf)])
    cost = float(((points - centres[labels]) ** 2).sum())
    model = _mllib_model(prepared.sparkSession, nodes, cost)
    model._set(k=k, maxIter=max_iter, seed=seed, minDivisibleClusterSize=min_divisible_cluster_size,
               featuresCol=_BISECT_INPUT, predictionCol="segment")
    return model, sizes, cost


@dataclass
class _Node:
    """A cluster of the tree in MLlib's numbering: leaves 0, 1, ... and inner nodes -1, -2, ... in
    pre-order (left child first), as MLlib's own fit numbers them."""

    index: int
    leaf: int  # = index for a leaf, -1 for an inner node
    members: np.ndarray  # bool mask over the points
    centre: np.ndarray  # the members' mean, in the prepared (unshifted) space
    children: list[int]  # positions in the node list
    cost: float = 0.0  # the members' squared distances to the centre, summed


def _nodes(tree, labels: np.ndarray, points: np.ndarray) -> list[_Node]:
    nodes: list[_Node] = []
    counters = {"leaf": 0, "inner": -1}

    def visit(node) -> int:
        position = len(nodes)
        if node.left is None:
            nodes.append(_Node(counters["leaf"], counters["leaf"], labels == node.label, np.zeros(0), []))
            counters["leaf"] += 1
        else:
            nodes.append(_Node(counters["inner"], -1, np.zeros(len(points), dtype=bool), np.zeros(0), []))
            counters["inner"] -= 1
            children = [visit(node.left), visit(node.right)]
            nodes[position].members = nodes[children[0]].members | nodes[children[1]].members
            nodes[position].children = children
        members = points[nodes[position].members]
        nodes[position].centre = members.mean(axis=0)
        nodes[position].cost = float(((members - nodes[position].centre) ** 2).sum())
        return position

    visit(tree)
    return nodes


def _walk(nodes: list[_Node], points: np.ndarray) -> np.ndarray:
    """Every point's leaf by MLlib's rule: from the root, the child whose centre is nearer (the first
    on a tie), down to a leaf."""
    labels = np.empty(len(points), dtype=int)

    def descend(position: int, rows: np.ndarray) -> None:
        node = nodes[position]
        if not node.children:
            labels[rows] = node.leaf
            return
        left, right = (nodes[c] for c in node.children)
        to_left = (((points[rows] - left.centre) ** 2).sum(axis=1) <= ((points[rows] - right.centre) ** 2).sum(axis=1))
        descend(node.children[0], rows[to_left])
        descend(node.children[1], rows[~to_left])

    descend(0, np.arange(len(points)))
    return labels


def _mllib_model(spark, nodes: list[_Node], cost: float) -> BisectingKMeansModel:
    """The pyspark.ml model of the tree `nodes` (centres shifted like the fit's input), built through
    the JVM as MLlib's own fit builds it: a ClusteringTreeNode per cluster (size, centre and norm,
    cost, height = the farthest child centre), the RDD-based model, the DataFrame-API wrapper."""
    jvm = spark._jvm
    gateway = spark.sparkContext._gateway
    clustering = jvm.org.apache.spark.mllib.clustering
    built: dict[int, object] = {}
    for position in reversed(range(len(nodes))):  # children before their parent
        node = nodes[position]
        shifted = node.centre + _SHIFT
        centre = jvm.org.apache.spark.mllib.linalg.Vectors.dense(doubles(gateway, shifted))
        children = gateway.new_array(clustering.ClusteringTreeNode, len(node.children))
        for i, child in enumerate(node.children):
            children[i] = built[child]
        height = max((float(np.linalg.norm(nodes[c].centre - node.centre)) for c in node.children), default=0.0)
        built[position] = clustering.ClusteringTreeNode(
            node.index, int(node.members.sum()), clustering.VectorWithNorm(centre, float(np.linalg.norm(shifted)), 1.0),
            float(node.cost), height, children)
    parent = clustering.BisectingKMeansModel(built[0], "euclidean", float(cost))
    return BisectingKMeansModel(jvm.org.apache.spark.ml.clustering.BisectingKMeansModel(BisectingKMeansModel._randomUID(), parent))


def _scored(fitted: FittedBisectingKMeans, prepared: DataFrame) -> DataFrame:
    """user_id (when present), segment, probability, anomaly_score; column expressions only."""
    distances, outputs = memoised(fitted, "scores", lambda: _score_expressions(fitted))
    keep = ["user_id"] if "user_id" in prepared.columns else []
    scored = fitted.model.transform(_with_shifted(prepared)).select(*keep, F.col("segment").cast("int"), distances)
    return scored.select(*keep, "segment", *outputs)


def _score_expressions(fitted: FittedBisectingKMeans) -> tuple[Column, list[Column]]:
    """The squared distances to the leaves' centres (`_d2`), then probability and anomaly_score from
    them: expressions of the fitted constants, built once per fitted model (`memoised`)."""
    point = vector_to_array(F.col(PREPARED_VECTOR))
    distances = squared_distances(point, fitted.centroids).alias("_d2")
    nearest = F.array_min("_d2")
    own = F.element_at("_d2", F.col("segment") + 1)  # the assigned leaf, not necessarily the nearest
    two_sigma2 = F.lit(2.0 * fitted.sigma2)
    # Shift by the nearest distance before exponentiating so that far-away users do not underflow.
    total = F.aggregate(
        F.transform("_d2", lambda d2: F.exp(-(d2 - nearest) / two_sigma2)), F.lit(0.0), lambda acc, w: acc + w
    )
    rms = math.sqrt(fitted.sigma2 * len(fitted.centroids[0]))
    return distances, [
        (F.exp(-(own - nearest) / two_sigma2) / total).alias("probability"),
        (F.sqrt(own) / F.lit(rms)).alias("anomaly_score"),
    ]


def _with_shifted(prepared: DataFrame) -> DataFrame:
    shifted = F.transform(vector_to_array(F.col(PREPARED_VECTOR)), lambda x: x + F.lit(_SHIFT))
    return prepared.withColumn(_BISECT_INPUT, array_to_vector(shifted))


FITTED = FittedBisectingKMeans

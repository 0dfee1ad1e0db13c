"""Full-scale MLlib fits that start from the sample's solution.

The k sweep fits every (model, k, seed) on the user sample; the chosen k is then fitted once on
every user. Starting that fit from the sample's solution keeps the solution the sweep measured
(rather than a new local optimum from a new initialisation) and needs few iterations.

What MLlib allows:
- KMeans: Spark's DataFrame estimator (pyspark.ml) takes no initial model, but the RDD-based one
  (org.apache.spark.mllib.clustering.KMeans) does (`setInitialModel`). It is driven here through the
  JVM on a classic session: the vectors go to an RDD in the JVM (`DatasetUtils.columnToOldVector`,
  no Python on the row path), and the result is wrapped into the pyspark.ml KMeansModel, which
  transforms, saves and loads like one the DataFrame estimator returned. Over Spark Connect there is
  no JVM on the client and no RDD API, so KMeans starts from MLlib's k-means|| with the sweep's best
  seed there; `warm_start` in the model's metrics says which happened.
- GaussianMixture: neither estimator is used from the sample's mixture (models.gmm says why); the
  full-scale EM there is Spark aggregations.
- BisectingKMeans has no initial model in either API: it starts from its own (models.bisecting).

When the sample holds every user, the sample's solution is already a fit of every user: k-means
takes it as it is (`kmeans_from_centres(iterate=False)`), and models.bisecting builds scikit-learn's
tree into MLlib's model; neither runs a Spark job to fit.
"""

from __future__ import annotations

import logging

import numpy as np
from pyspark.ml.clustering import KMeansModel
from pyspark.sql import DataFrame

from segspark.runtime.jvm import doubles
from segspark.runtime.session import is_connect

log = logging.getLogger(__name__)


def can_start_from_sample(frame: DataFrame) -> bool:
    """True on a classic session (a JVM on this side), where the RDD-based estimators are reachable."""
    return not is_connect(frame.sparkSession)


def kmeans_from_centres(
    frame: DataFrame, column: str, centres: np.ndarray, *, max_iter: int, seed: int, tol: float = 1e-4,
    iterate: bool = True,
) -> KMeansModel:
    """MLlib KMeans on `frame[column]` started from `centres` (k x d); a pyspark.ml KMeansModel.
    iterate=False: the model of `centres` as they are, without a Spark job (they are already a fit
    of every row of `frame`: the k sweep's, when its sample holds every user)."""
    jvm = frame.sparkSession._jvm
    centres = np.asarray(centres, dtype=float)
    fitted = jvm.org.apache.spark.mllib.clustering.KMeansModel(_old_vectors(jvm, frame, centres))
    if iterate:
        with _vectors(jvm, frame, column) as rdd:
            fitted = (
                jvm.org.apache.spark.mllib.clustering.KMeans()
                .setK(int(centres.shape[0]))
                .setMaxIterations(int(max_iter))
                .setEpsilon(float(tol))
                .setSeed(int(seed))
                .setInitialModel(fitted)
                .run(rdd)
            )
    model = KMeansModel(jvm.org.apache.spark.ml.clustering.KMeansModel(KMeansModel._randomUID(), fitted))
    model._set(k=int(centres.shape[0]), maxIter=int(max_iter), seed=int(seed), tol=float(tol))
    return model


def _old_vectors(jvm, frame: DataFrame, rows: np.ndarray):
    gateway = frame.sparkSession.sparkContext._gateway
    vectors = gateway.new_array(jvm.org.apache.spark.mllib.linalg.Vector, rows.shape[0])
    for i, row in enumerate(rows):
        vectors[i] = jvm.org.apache.spark.mllib.linalg.Vectors.dense(doubles(gateway, row))
    return vectors


class _vectors:
    """The column as a persisted JVM RDD of mllib vectors for the fit's iterations, unpersisted after
    (the RDD-based estimators iterate over their input and warn when it is not cached)."""

    def __init__(self, jvm, frame: DataFrame, column: str):
        self._rdd = jvm.org.apache.spark.ml.util.DatasetUtils.columnToOldVector(frame.select(column)._jdf, column)
        self._level = jvm.org.apache.spark.storage.StorageLevel.MEMORY_AND_DISK()

    def __enter__(self):
        return self._rdd.persist(self._level)

    def __exit__(self, *exc) -> None:
        self._rdd.unpersist(False)

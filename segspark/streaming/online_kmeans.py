"""Streaming k-means for Structured Streaming: the update rule of Spark's StreamingKMeans.

Spark has streaming k-means only for the old DStreams API (`pyspark.mllib.clustering.StreamingKMeans`).
This is the same model for micro-batches: each batch contributes per-cluster sums and counts of
its points (assigned to the nearest current centre, computed on the executors: only k x d numbers
come back), and the centres move by the decayed weighted average

    discount  = decay                      (time_unit "batches")
              = decay ** points_in_batch   (time_unit "points")
    w_j      <- discount * w_j
    lambda_j  = n_j / max(w_j + n_j, 1e-16)
    c_j      <- (1 - lambda_j) * c_j + lambda_j * (sum_j / n_j),   w_j <- w_j + n_j

and, as Spark does, a dying cluster (weight below 1e-8 of the largest) takes half of the largest
cluster's weight and a centre split off it. decay = 1 weighs all history equally; 0 keeps only the
latest batch. `tests/test_online_kmeans.py` checks the rule against Spark's StreamingKMeansModel.

A model snapshot (`to_dict`/`from_dict`) is small JSON: centres, weights, settings, batches seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.models.contract import centre_sums

TIME_UNITS = ("batches", "points")


@dataclass
class OnlineKMeans:
    centers: np.ndarray  # (k, d) float64
    weights: np.ndarray  # (k,) float64: decayed number of points behind each centre
    decay: float = 1.0
    time_unit: str = "batches"
    batches: int = 0  # batches applied so far
    split_events: list[dict] = field(default_factory=list)  # dying clusters re-seeded (batch, dead, from)

    def __post_init__(self) -> None:
        self.centers = np.array(self.centers, dtype=np.float64, ndmin=2)
        self.weights = np.array(self.weights, dtype=np.float64).reshape(-1)
        if self.centers.shape[0] != self.weights.shape[0] or self.centers.shape[0] == 0:
            raise ValueError(
                f"online k-means: {self.centers.shape[0]} centres and {self.weights.shape[0]} weights; "
                "expected one weight per centre and at least one centre"
            )
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"online k-means: decay must be in [0, 1], got {self.decay}")
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"online k-means: time_unit must be one of {TIME_UNITS}, got {self.time_unit!r}")

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def predict(self, points: np.ndarray) -> np.ndarray:
        """Nearest centre of each row (squared Euclidean; ties to the lower index, as MLlib)."""
        x = np.asarray(points, dtype=np.float64)
        d2 = (x * x).sum(axis=1)[:, None] - 2.0 * x @ self.centers.T + (self.centers**2).sum(axis=1)[None, :]
        return d2.argmin(axis=1)

    def update(self, sums: np.ndarray, counts: np.ndarray) -> OnlineKMeans:
        """Apply one batch's per-cluster sums (k x d) and counts (k,); returns self."""
        sums = np.asarray(sums, dtype=np.float64).reshape(self.centers.shape)
        counts = np.asarray(counts, dtype=np.float64).reshape(self.weights.shape)
        if (counts < 0).any():
            raise ValueError("online k-means: negative point counts")
        discount = self.decay if self.time_unit == "batches" else math.pow(self.decay, float(counts.sum()))
        self.weights *= discount
        for j in np.flatnonzero(counts > 0):
            updated = self.weights[j] + counts[j]
            lam = counts[j] / max(updated, 1e-16)
            self.weights[j] = updated
            self.centers[j] = self.centers[j] * (1.0 - lam) + sums[j] * (lam / counts[j])
        largest, smallest = int(self.weights.argmax()), int(self.weights.argmin())
        if self.weights[smallest] < 1e-8 * self.weights[largest]:
            weight = (self.weights[largest] + self.weights[smallest]) / 2.0
            self.weights[largest] = self.weights[smallest] = weight
            centre = self.centers[largest].copy()
            nudge = 1e-14 * np.maximum(np.abs(centre), 1.0)
            self.centers[largest] = centre + nudge
            self.centers[smallest] = centre - nudge
            self.split_events.append({"batch": self.batches, "dead": smallest, "from": largest})
        self.batches += 1
        return self

    def to_dict(self) -> dict:
        return {
            "centers": self.centers.tolist(),
            "weights": self.weights.tolist(),
            "decay": self.decay,
            "time_unit": self.time_unit,
            "batches": self.batches,
            "split_events": list(self.split_events),
        }

    @classmethod
    def from_dict(cls, data: dict) -> OnlineKMeans:
        return cls(
            centers=np.array(data["centers"]),
            weights=np.array(data["weights"]),
            decay=float(data["decay"]),
            time_unit=str(data["time_unit"]),
            batches=int(data.get("batches", 0)),
            split_events=list(data.get("split_events", [])),
        )


# The prepared vector as array<double>, the column `nearest_centre` reads.
POINT = "_point"


def as_points(frame: DataFrame, vector_col: str, *keep: str) -> DataFrame:
    """`keep` columns and the vector column as array<double> (`POINT`), what `nearest_centre` reads."""
    return frame.select(*keep, vector_to_array(F.col(vector_col), "float64").alias(POINT))


def nearest_centre(array_col: str, centers: np.ndarray) -> tuple[Column, Column]:
    """(index of the nearest centre, squared distance to it) of an array<double> column, as Spark
    expressions with the centres inlined as literals (k x d numbers); ties go to the lower index, as
    MLlib. The centres move every batch, so the expression cannot be built once (`runtime.expressions`);
    it takes a few dozen calls to the JVM (the centres are one literal, `double_array`)."""
    centers = np.asarray(centers, dtype=np.float64)
    # Squared distance to centre j, minus the row's own |x|^2 (the same for every j): |c_j|^2 - 2 x.c_j,
    # summed from |c_j|^2 in the order of the coordinates, in one pass over the point (`centre_sums`);
    # then the smallest score, and the first centre that has it.
    nearest = centre_sums(
        F.col(array_col), -2.0 * centers, [float((centre ** 2).sum()) for centre in centers], lambda x, c: x * c,
        finish=lambda scores: F.struct(
            F.array_min(scores).alias("score"),
            (F.array_position(scores, F.array_min(scores)) - 1).cast("int").alias("j"),
        ),
    )
    own = F.expr(f"aggregate(`{array_col}`, 0.0D, (total, v) -> total + v * v)")
    return nearest["j"], F.greatest(nearest["score"] + own, F.lit(0.0))


def batch_statistics(points: DataFrame, vector_col: str, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sums k x d, counts k) of a batch, each row assigned to its nearest centre.

    Runs on the executors as one aggregation (`nearest_centre`); only k rows come back."""
    centers = np.asarray(centers, dtype=np.float64)
    k, d = centers.shape
    cluster, _ = nearest_centre(POINT, centers)
    rows = (
        as_points(points, vector_col).select(cluster.alias("cluster"), F.col(POINT).alias("x"))
        .groupBy("cluster")
        .agg(F.expr("count(1) AS n"), *[F.expr(f"sum(x[{i}]) AS s{i}") for i in range(d)])
        .collect()
    )
    sums, counts = np.zeros((k, d)), np.zeros(k)
    for row in rows:
        counts[row.cluster] = row.n
        sums[row.cluster] = [row[f"s{i}"] for i in range(d)]
    return sums, counts



"""Online k-means follows Spark's StreamingKMeans update rule exactly (checked against MLlib's own
StreamingKMeansModel on the same batches), its batch statistics come from one aggregation, and the
distances to the centres read each point once and give the same doubles as adding term by term."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors
from pyspark.sql import functions as F

from segspark.models.contract import squared_distances
from segspark.streaming.online_kmeans import OnlineKMeans, batch_statistics, nearest_centre


def _batches(seed: int, batches: int = 3, rows: int = 300):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 6.0, 6.0]])
    drift = np.array([0.3, -0.2, 0.1])
    return [
        centres[rng.integers(0, 3, rows)] + drift * b + rng.normal(0.0, 0.7, size=(rows, 3)) for b in range(batches)
    ]


@pytest.mark.parametrize("decay, time_unit", [(0.5, "batches"), (0.999, "points"), (0.0, "batches")])
def test_update_matches_spark_streaming_kmeans(spark, decay, time_unit):
    from pyspark.mllib.clustering import StreamingKMeansModel
    from pyspark.mllib.linalg import Vectors as MllibVectors

    start = np.array([[0.5, 0.5, 0.5], [4.0, 4.0, 1.0], [1.0, 5.0, 5.0]])
    weights = np.array([10.0, 20.0, 5.0])
    ours = OnlineKMeans(start.copy(), weights.copy(), decay=decay, time_unit=time_unit)
    theirs = StreamingKMeansModel([MllibVectors.dense(c) for c in start], list(weights))
    for batch in _batches(3):
        frame = spark.createDataFrame([(Vectors.dense(row),) for row in batch], ["v"])
        ours.update(*batch_statistics(frame, "v", ours.centers))
        theirs = theirs.update(spark.sparkContext.parallelize([MllibVectors.dense(r) for r in batch], 2), decay, time_unit)
    np.testing.assert_allclose(ours.centers, np.array([np.asarray(c) for c in theirs.centers]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.weights, np.array(theirs.clusterWeights), rtol=1e-9)
    assert ours.batches == 3


def test_batch_statistics_are_the_nearest_centre_sums(spark):
    batch = _batches(5, batches=1)[0]
    centres = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 6.0, 6.0], [50.0, 50.0, 50.0]])
    sums, counts = batch_statistics(spark.createDataFrame([(Vectors.dense(r),) for r in batch], ["v"]), "v", centres)
    nearest = OnlineKMeans(centres, np.ones(4)).predict(batch)
    assert counts.tolist() == np.bincount(nearest, minlength=4).astype(float).tolist() and counts[3] == 0
    for j in range(3):
        np.testing.assert_allclose(sums[j], batch[nearest == j].sum(axis=0), rtol=1e-12)


def test_distances_are_sums_in_coordinate_order_and_ties_go_to_the_lower_centre(spark):
    # Both read each point once (`centre_sums`); each sum must be the same double as adding the
    # coordinates' terms one by one in order, and the nearest of two equal centres is the first.
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(5, 7)).round(2)
    centres[3] = centres[1]
    points = rng.normal(size=(40, 7)).round(2)
    points[0] = centres[1]  # at distance 0 from centres 1 and 3
    frame = spark.createDataFrame([(row.tolist(),) for row in points], "p array<double>")
    index, squared = nearest_centre("p", centres)
    rows = frame.select("p", squared_distances(F.col("p"), centres).alias("d"), index.alias("j"), squared.alias("s")).collect()
    for row in rows:
        x = np.array(row.p)
        expected = []
        for centre in centres:
            total = 0.0
            for a, b in zip(x, centre, strict=True):
                total += (a - b) * (a - b)
            expected.append(total)
        assert list(row.d) == expected
        assert row.j == int(np.argmin(expected))  # numpy's argmin: the first of equal minima
        assert row.s == pytest.approx(min(expected), abs=1e-9)  # |x|^2 - 2x.c + |c|^2, rounded otherwise
    assert rows[0].j == 1 and rows[0].d[1] == rows[0].d[3] == 0.0


def test_dying_cluster_is_reseeded_from_the_largest():
    model = OnlineKMeans(np.array([[0.0, 0.0], [10.0, 10.0]]), np.array([1e-9, 100.0]), decay=0.1)
    model.update(np.array([[0.0, 0.0], [1000.0, 1000.0]]), np.array([0.0, 100.0]))
    assert model.weights[0] == model.weights[1]
    np.testing.assert_allclose(model.centers[0], model.centers[1], atol=1e-10)
    assert model.split_events == [{"batch": 0, "dead": 0, "from": 1}]


def test_snapshot_round_trips_and_bad_settings_are_named():
    model = OnlineKMeans(np.array([[1.0, 2.0]]), np.array([3.0]), decay=0.9, time_unit="points", batches=7)
    again = OnlineKMeans.from_dict(model.to_dict())
    assert again.to_dict() == model.to_dict()
    with pytest.raises(ValueError, match="decay must be in"):
        OnlineKMeans(np.zeros((1, 2)), np.ones(1), decay=1.5)
    with pytest.raises(ValueError, match="time_unit must be one of"):
        OnlineKMeans(np.zeros((1, 2)), np.ones(1), time_unit="hours")
    with pytest.raises(ValueError, match="one weight per centre"):
        OnlineKMeans(np.zeros((2, 2)), np.ones(3))

"""KMeans first cut: preparation, fit, soft probabilities, names."""

import datetime as dt

import numpy as np
import pytest
from pyspark.sql import functions as F

from segspark.config import KMeansConfig
from segspark.models import kmeans
from segspark.models.prepare import model_inputs, signed_log1p
from segspark.schema import FEATURE_COLUMNS


@pytest.fixture(scope="module")
def blobs(spark):
    """Three well-separated groups of users in feature space, 60 users each."""
    rng = np.random.default_rng(0)
    rows = []
    centres = [(2.0, 1, 10.0), (60.0, 8, 900.0), (20.0, 3, 150.0)]
    for group, (recency, frequency, monetary) in enumerate(centres):
        for i in range(60):
            rows.append(
                {
                    "user_id": f"g{group}-{i}",
                    "as_of": dt.date(2026, 10, 31),
                    "recency_days": float(recency * rng.uniform(0.9, 1.1)),
                    "frequency": int(frequency),
                    "monetary": float(monetary * rng.uniform(0.9, 1.1)),
                    "tenure_days": 90.0,
                    "sessions": int(frequency * 2),
                    "views": int(frequency * 5),
                    "carts": int(frequency),
                    "removes_from_cart": 0,
                    "purchases": int(frequency),
                    "returns": 0,
                }
            )
    return spark.createDataFrame(rows)


def test_signed_log1p_keeps_sign(spark):
    row = spark.createDataFrame([(-9.0,), (0.0,), (9.0,)], ["x"]).select(signed_log1p(F.col("x")).alias("y")).collect()
    assert [r.y for r in row] == pytest.approx([-np.log(10), 0.0, np.log(10)])


def test_model_inputs_impute_recency_and_reject_unknown_names(spark, blobs):
    never_bought = blobs.limit(1).withColumn("recency_days", F.lit(None).cast("double"))
    row = model_inputs(never_bought, []).collect()[0]
    assert row.recency_days == row.tenure_days == 90.0
    with pytest.raises(ValueError, match="unknown features"):
        model_inputs(blobs, ["nope"])


def test_kmeans_separates_groups_with_documented_probabilities(blobs):
    cfg = KMeansConfig(k=3, seed=1, log_transform=list(FEATURE_COLUMNS))
    fitted = kmeans.fit(blobs, cfg)
    assert sorted(fitted.cluster_sizes) == [60, 60, 60]
    rows = kmeans.assign(fitted, blobs, cfg.log_transform).collect()
    assert len(rows) == 180
    by_group = {}
    for row in rows:
        by_group.setdefault(row.user_id.split("-")[0], set()).add(row.segment)
    assert all(len(s) == 1 for s in by_group.values())  # each group in one segment
    assert len(set().union(*by_group.values())) == 3  # and the segments differ
    for row in rows:
        assert 1 / 3 < row.probability <= 1.0
        assert row.anomaly_score >= 0
        assert row.segment_name == fitted.segment_names[row.segment]
    # Well-separated blobs: memberships are near certain and typical members score about 1.
    assert np.median([r.probability for r in rows]) > 0.99
    assert np.median([r.anomaly_score for r in rows]) < 2


def test_segment_names_are_deterministic_and_unique():
    names = kmeans.segment_names([[2.0, -0.5], [-1.0, 0.2], [2.0, -0.5]], ("monetary", "recency_days"))
    assert names == [
        "high monetary, low recency_days",
        "low monetary, high recency_days",
        "high monetary, low recency_days (2)",
    ]

"""KMeans on the prepared features: fit, soft probabilities, anomaly flags, saved model."""

import datetime as dt

import numpy as np
import pytest
from pyspark.ml.clustering import KMeansModel

from segspark.config import CapConfig, PrepareConfig, SelectionConfig
from segspark.models import kmeans
from segspark.models.prepare import fit_preparation

FEATURES = ["recency_days", "frequency", "monetary", "tenure_days", "sessions", "views", "returns"]


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
                    "returns": 0,
                }
            )
    return spark.createDataFrame(rows)


@pytest.fixture(scope="module")
def prepared(blobs):
    cfg = PrepareConfig(
        log1p=["frequency", "monetary", "sessions", "views", "tenure_days"],
        cap=CapConfig(lower=0.0, upper=1.0),
        selection=SelectionConfig(keep=["recency_days", "frequency", "monetary"]),
    )
    prep = fit_preparation(blobs, FEATURES, cfg)
    return prep, prep.transform(blobs).cache()


def test_preparation_selects_the_informative_features(prepared):
    prep, _ = prepared
    # tenure and returns are constant; sessions and views are exact functions of frequency.
    assert prep.selected == ["recency_days", "frequency", "monetary"]
    assert {d["feature"]: d["reason"] for d in prep.dropped} == {
        "tenure_days": "near_constant",
        "returns": "near_constant",
        "sessions": "correlated",
        "views": "correlated",
    }
    details = {d["feature"]: d["detail"] for d in prep.dropped}
    assert details["tenure_days"] == "100.0% of users have 90.0"  # the feature's value, not its log1p
    assert details["views"].startswith("|r|=0.99") and details["views"].endswith(" with frequency")


def test_kmeans_separates_groups_with_documented_probabilities(prepared, tmp_path):
    prep, frame = prepared
    fitted = kmeans.fit_one(frame, 3, seed=1, contamination=0.05)
    assert sorted(fitted.cluster_sizes) == [60, 60, 60]
    assert len(fitted.centroids[0]) == len(prep.selected) == 3
    rows = fitted.assign(frame).collect()
    assert len(rows) == 180
    by_group = {}
    for row in rows:
        by_group.setdefault(row.user_id.split("-")[0], set()).add(row.segment)
    assert all(len(s) == 1 for s in by_group.values())  # each group in one segment
    assert len(set().union(*by_group.values())) == 3  # and the segments differ
    for row in rows:
        assert 1 / 3 < row.probability <= 1.0
        assert row.anomaly_score >= 0
        assert row.probabilities is None
        assert row.is_anomaly == (row.anomaly_score > fitted.anomaly_threshold)
    # Well-separated blobs: memberships are near certain and typical members score about 1.
    assert np.median([r.probability for r in rows]) > 0.99
    assert np.median([r.anomaly_score for r in rows]) < 2
    # contamination 5%: about 9 of 180 users flagged (approximate quantile).
    assert 5 <= sum(r.is_anomaly for r in rows) <= 12

    fitted.model.write().overwrite().save(str(tmp_path / "kmeans"))
    reloaded = KMeansModel.load(str(tmp_path / "kmeans"))
    assert np.allclose(reloaded.clusterCenters(), fitted.centroids)

"""Drift signals: PSI against training quantile bins (counted in one Spark aggregation), centroid
shift, segment size change, noise share, and the retrain recommendation with its reasons."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from segspark.streaming.drift import (
    DriftThresholds,
    ReferenceBins,
    assess,
    bin_shares,
    centroid_shift,
    feature_psi,
    psi,
    reference_bins,
    size_change,
)


def _frame(spark, seed: int, rows: int = 4000, shift: float = 0.0, nulls: int = 0):
    rng = np.random.default_rng(seed)
    data = pd.DataFrame({"spend": rng.lognormal(3.0, 1.0, rows) * math.exp(shift), "visits": rng.poisson(5, rows)})
    data["visits"] = data["visits"].astype("float64")
    if nulls:
        data.loc[: nulls - 1, "spend"] = np.nan
    return spark.createDataFrame(data), data


def test_psi_of_known_shares():
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2))
    assert math.isfinite(psi([0.5, 0.5], [1.0, 0.0]))  # an empty bin is smoothed, not infinite
    with pytest.raises(ValueError, match="2 training bins but 3 window bins"):
        psi([0.5, 0.5], [0.2, 0.3, 0.5])


def test_bin_shares_match_pandas_and_count_nulls(spark):
    frame, data = _frame(spark, 1, nulls=40)
    edges = {"spend": [10.0, 20.0, 40.0], "visits": [3.0, 6.0]}
    shares = bin_shares(frame, edges)
    spend = data["spend"]
    expected = [(spend <= 10).mean(), ((spend > 10) & (spend <= 20)).mean(), ((spend > 20) & (spend <= 40)).mean(),
                (spend > 40).mean(), spend.isna().mean()]
    assert shares["spend"] == pytest.approx(expected)
    assert sum(shares["visits"]) == pytest.approx(1.0) and shares["visits"][-1] == 0.0


def test_same_distribution_is_stable_and_a_shift_is_flagged(spark):
    training, _ = _frame(spark, 2)
    reference = reference_bins(training, ["spend", "visits"], bins=10)
    assert len(reference.edges["spend"]) == 9 and sum(reference.shares["spend"]) == pytest.approx(1.0)
    assert ReferenceBins.from_dict(reference.to_dict()) == reference

    same, _ = _frame(spark, 3)
    stable = feature_psi(reference, same)
    assert max(stable.values()) < 0.05

    shifted, _ = _frame(spark, 4, shift=1.0)  # spend x e
    moved = feature_psi(reference, shifted)
    assert moved["spend"] > 0.25 and moved["visits"] < 0.05
    summary = assess(DriftThresholds(), psi_by_feature=moved)
    assert summary["retrain_recommended"] and summary["max_psi"] == moved["spend"]
    assert "PSI above 0.25: spend" in summary["reasons"][0] and "visits" not in summary["reasons"][0]


def test_centroid_shift_size_change_noise_and_reasons():
    assert centroid_shift([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]]) == [5.0, 0.0]
    with pytest.raises(ValueError, match="differ"):
        centroid_shift([[0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]])
    changes = size_change({0: 0.5, 1: 0.5}, {0: 80, 1: 10, 2: 10})
    assert changes == pytest.approx({0: 0.3, 1: -0.4, 2: 0.1})

    quiet = assess(DriftThresholds(), psi_by_feature={"a": 0.01}, shifts=[0.1], size_changes={0: 0.02}, noise_share=0.05)
    assert not quiet["retrain_recommended"] and quiet["reasons"] == []
    loud = assess(DriftThresholds(), shifts=[0.1, 0.9], size_changes=changes, noise_share=0.3)
    assert loud["retrain_recommended"] and len(loud["reasons"]) == 3
    assert "segment 1 share changed by -40.0%" in loud["reasons"][1]
    assert loud["max_centroid_shift"] == 0.9 and loud["max_size_change"] == pytest.approx(0.4)

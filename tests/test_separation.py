"""evaluation.separation: per-segment silhouette and separating features on tiny numpy examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples, silhouette_score

from segspark.segments.separation import segment_silhouettes, separation


def blobs():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [4.5, 0.5], [0.0, 9.0]])
    labels = np.repeat([0, 1, 2, 5], [12, 9, 7, 1])  # segment 5 has a single member
    points = centres[np.searchsorted([0, 1, 2, 5], labels)] + rng.normal(scale=0.6, size=(labels.size, 2))
    return points, labels


def test_segment_silhouettes_equal_sklearns_samples_averaged_per_segment():
    points, labels = blobs()
    result = segment_silhouettes(points, labels)
    expected = silhouette_samples(points, labels)
    np.testing.assert_allclose(result.samples, expected, atol=1e-12)
    assert result.mean == pytest.approx(silhouette_score(points, labels), abs=1e-12)
    assert result.segments.tolist() == [0, 1, 2, 5]
    assert result.users.tolist() == [12, 9, 7, 1]
    for segment, value in zip(result.segments, result.silhouette, strict=True):
        assert value == pytest.approx(expected[labels == segment].mean(), abs=1e-12)
    assert result.silhouette[-1] == 0.0  # a single member's silhouette is 0, as in sklearn
    # 1 and 2 are close blobs: each other's neighbour; 0 is nearer to them than to 5.
    assert dict(zip(result.segments.tolist(), result.nearest.tolist(), strict=True))[1] == 2
    assert dict(zip(result.segments.tolist(), result.nearest.tolist(), strict=True))[2] == 1
    assert dict(zip(result.segments.tolist(), result.nearest.tolist(), strict=True))[0] in (1, 2)


def test_silhouette_is_undefined_for_one_label_or_one_label_per_row():
    points = np.arange(6, dtype=float).reshape(3, 2)
    assert segment_silhouettes(points, np.array([4, 4, 4])) is None
    assert segment_silhouettes(points, np.array([0, 1, 2])) is None


def test_separation_leaves_noise_out_of_the_silhouette_and_ranks_signed_mean_differences():
    points, labels = blobs()
    labels = labels.copy()
    labels[[0, 13]] = -1  # two noise users
    features = np.column_stack([points, np.where(labels == 1, 3.0, 0.0), np.zeros(labels.size)])
    names = ["x", "y", "flag", "constant"]
    record = separation(points[:24], features, labels, names, space_name="test space", top_n=2)

    head = labels[:24]
    kept = head != -1
    assert record["space"] == "test space" and record["silhouette_users"] == 24
    assert record["feature_users"] == labels.size
    assert record["silhouette"] == pytest.approx(silhouette_score(points[:24][kept], head[kept]), abs=1e-6)
    by_segment = {r["segment"]: r for r in record["segments"]}
    assert sorted(by_segment) == [-1, 0, 1, 2, 5]
    noise = by_segment[-1]
    assert noise["silhouette"] is None and noise["nearest"] is None and noise["silhouette_users"] == 2
    assert noise["versus_nearest"] == []
    # Segment 5 lies beyond the silhouette's first 24 rows: no silhouette rows, no value.
    assert by_segment[5]["silhouette_users"] == 0 and by_segment[5]["silhouette"] is None
    expected = silhouette_samples(points[:24][kept], head[kept])
    for segment in (0, 1, 2):
        assert by_segment[segment]["silhouette"] == pytest.approx(expected[head[kept] == segment].mean(), abs=1e-6)
        assert by_segment[segment]["silhouette_users"] == int((head == segment).sum())

    one = by_segment[1]
    assert one["feature_users"] == 8
    # Segment 1 is the only one with flag = 3: 3 above the rest and its neighbour 2, in flag's standard deviations.
    spread = features.std(axis=0)
    assert one["versus_rest"][0] == ["flag", pytest.approx(3.0 / spread[2], abs=1e-4)]
    assert one["nearest"] == 2 and one["versus_nearest"][0] == ["flag", pytest.approx(3.0 / spread[2], abs=1e-4)]
    rest = labels != 1
    x_difference = (features[labels == 1, 0].mean() - features[rest, 0].mean()) / spread[0]
    assert one["versus_rest"][1] == ["x", pytest.approx(x_difference, abs=1e-4)]
    # A feature equal in every segment separates nothing.
    assert all(name != "constant" for r in record["segments"] for name, _ in r["versus_rest"])

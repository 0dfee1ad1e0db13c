"""HDBSCAN on embeddings: the slim artifact predicts exactly what hdbscan's approximate prediction does,
re-predicts training points to their fitted values, round-trips through npz and bytes, and rejects bad
input. Pure numpy and hdbscan (no Spark); data sets of a few hundred points so that this runs in seconds."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import hdbscan
import numpy as np
import pytest

from segspark.config import HdbscanConfig
from segspark.models.deep import density
from segspark.models.deep.density import FittedHdbscan, SlimHdbscan, fit_hdbscan

DIMS = 6


def _blobs(seed: int, dims: int = DIMS, per_blob: int = 150, blobs: int = 4, noise: int = 60):
    """Gaussian blobs (sigma 1, centres ~N(0, 6^2)) plus uniform background noise; also the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 6.0, size=(blobs, dims))
    parts = [rng.normal(c, 1.0, size=(per_blob, dims)) for c in centres]
    parts.append(rng.uniform(-15.0, 15.0, size=(noise, dims)))
    return np.vstack(parts), centres


def _held_out(seed: int, centres: np.ndarray) -> np.ndarray:
    """New points: inside the blobs, at their edges (2-3 sigma), between two blobs, and far away."""
    rng = np.random.default_rng(seed)
    dims = centres.shape[1]
    inside = np.vstack([rng.normal(c, 1.0, size=(40, dims)) for c in centres])
    directions = rng.normal(size=(len(centres) * 30, dims))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    edges = np.repeat(centres, 30, axis=0) + directions * rng.uniform(2.0, 3.0, size=(len(directions), 1))
    t = rng.uniform(0.0, 1.0, size=(80, 1))
    between = centres[0] + t * (centres[1] - centres[0]) + rng.normal(0.0, 0.3, size=(80, dims))
    far = rng.uniform(-30.0, 30.0, size=(60, dims))
    return np.vstack([inside, edges, between, far])


def _hdbscan_predict(clusterer, points):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no-cluster models warn that everything is noise
        labels, probabilities = hdbscan.approximate_predict(clusterer, points)
        scores = hdbscan.approximate_predict_scores(clusterer, points)
    # hdbscan's raw score is negative for points denser than everything under their cluster; GLOSH
    # is a score in [0, 1], and ours floors those at 0 (on purpose, the one difference in scores).
    return labels, probabilities, np.maximum(scores, 0.0)


CONFIGS = {
    "eom-min_samples-5": HdbscanConfig(min_cluster_size=25, min_samples=5),
    "eom-default-min_samples": HdbscanConfig(min_cluster_size=25, min_samples=None),
    "leaf-min_samples-3": HdbscanConfig(min_cluster_size=15, min_samples=3, cluster_selection_method="leaf"),
    "eom-epsilon": HdbscanConfig(min_cluster_size=20, min_samples=4, cluster_selection_epsilon=1.5),
}


@pytest.fixture(scope="module")
def data():
    train, centres = _blobs(0)
    return train, _held_out(1, centres)


@pytest.fixture(scope="module", params=list(CONFIGS))
def fitted(request, data) -> FittedHdbscan:
    return fit_hdbscan(data[0], CONFIGS[request.param])


def test_held_out_points_match_hdbscan(fitted, data):
    held_out = data[1]
    labels, probabilities, scores = fitted.artifact.predict(held_out)
    expected_labels, expected_probabilities, expected_scores = _hdbscan_predict(fitted.clusterer, held_out)

    # The held-out set exercises noise, partial membership and no training-point shortcut.
    assert (expected_labels == -1).sum() >= 10
    assert ((expected_probabilities > 0.0) & (expected_probabilities < 1.0)).sum() >= 10
    assert len(np.unique(expected_labels[expected_labels >= 0])) >= 2
    assert fitted.artifact._prepared()[0].query(held_out, k=1)[0].min() > 0.0

    assert labels.dtype == np.int32 and probabilities.dtype == np.float64 and scores.dtype == np.float64
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0.0, atol=1e-6)
    np.testing.assert_allclose(scores, expected_scores, rtol=0.0, atol=1e-6)
    assert (((scores >= 0.0) & (scores <= 1.0)) | np.isnan(scores)).all()


def test_training_points_get_their_fitted_values(fitted, data):
    train = data[0]
    clusterer = fitted.clusterer
    labels, probabilities, scores = fitted.artifact.predict(train)
    np.testing.assert_array_equal(labels, clusterer.labels_)
    np.testing.assert_array_equal(probabilities, clusterer.probabilities_)
    np.testing.assert_array_equal(scores, clusterer.outlier_scores_)


def test_float32_embeddings(data):
    """What an autoencoder emits: fitted and predicted as float32, matched exactly as float64."""
    train32, held_out32 = data[0].astype(np.float32), data[1].astype(np.float32)
    fitted = fit_hdbscan(train32, CONFIGS["eom-min_samples-5"])
    assert fitted.artifact.points.dtype == np.float64
    np.testing.assert_array_equal(fitted.artifact.predict(train32)[0], fitted.clusterer.labels_)
    np.testing.assert_array_equal(
        fitted.artifact.predict(held_out32)[0], _hdbscan_predict(fitted.clusterer, held_out32)[0]
    )


def test_hdbscan_does_not_repredict_training_probabilities(data):
    """Why the training-point rule exists: hdbscan gives training points other probabilities."""
    fitted = fit_hdbscan(data[0], CONFIGS["eom-min_samples-5"])
    _, probabilities, _ = _hdbscan_predict(fitted.clusterer, data[0])
    assert (np.abs(probabilities - fitted.clusterer.probabilities_) > 1e-6).sum() >= 1
    _, ours, _ = fitted.artifact.predict(data[0])
    np.testing.assert_array_equal(ours, fitted.clusterer.probabilities_)


@pytest.fixture(scope="module")
def gridded():
    """Rounded coordinates: duplicates and equal distances everywhere (for the tie-order test)."""
    rng = np.random.default_rng(31)
    centres = rng.normal(0.0, 4.0, size=(3, 3))
    parts = [rng.normal(c, 1.0, size=(100, 3)) for c in centres] + [rng.uniform(-10, 10, size=(40, 3))]
    return np.round(np.vstack(parts)), centres


def _ring(rng, centre, points: int = 30, jitter: float = 0.05) -> np.ndarray:
    """Points one unit apart on a circle, jittered: every point has the same density around it."""
    angles = np.arange(points) * 2 * np.pi / points
    radius = points / (2 * np.pi)
    ring = np.c_[np.cos(angles), np.sin(angles)] * radius + centre
    return ring + rng.normal(0.0, jitter, ring.shape)


@pytest.fixture(scope="module")
def split_before_falling_out():
    """A selected cluster that splits before any point falls out of it, built without ties.

    Two rings of equal density 4.5 apart form one cluster; a third ring lies far away. Every point
    of the pair has the same core distance (about 3), below the gap, so the pair splits into its two
    rings before losing a single point, and each ring then dissolves at once: the pair's stability
    beats its rings' and it is selected. hdbscan's prediction map then labels only one ring (the
    case `_cluster_map_from_labels` repairs). The jitter is continuous, so no two distances are
    equal and nothing depends on how ties break; the layout holds for every seed with an exact
    minimum spanning tree, and this seed holds with hdbscan's default approximate one too."""
    rng = np.random.default_rng(3)
    radius = 30 / (2 * np.pi)
    pair = [_ring(rng, [0.0, 0.0]), _ring(rng, [2 * radius + 4.5, 0.0])]
    return np.vstack([*pair, _ring(rng, [0.0, 60.0])])


def _unmapped_subclusters(artifact: SlimHdbscan) -> tuple[int, np.ndarray]:
    """The mechanism, read from the condensed tree: (label, training points) of a selected cluster
    that no point falls out of directly and whose sub-clusters the prediction map leaves at -1."""
    n = artifact.points.shape[0]
    own = artifact.cluster_label[artifact.point_parent - n]
    missing = (own == -1) & (artifact.fitted_labels >= 0)
    assert missing.any(), "the layout no longer produces a split-before-falling-out cluster"
    labels = np.unique(artifact.fitted_labels[missing])
    assert labels.size == 1
    return int(labels[0]), np.flatnonzero(missing)


def test_training_points_where_hdbscan_predicts_other_labels(split_before_falling_out):
    train = split_before_falling_out
    fitted = fit_hdbscan(train, HdbscanConfig(min_cluster_size=15, min_samples=5))
    clusterer = fitted.clusterer
    label, unmapped = _unmapped_subclusters(fitted.artifact)
    # The label's points fall out of two sibling clusters (the rings), none of the selected pair itself.
    parents = np.unique(fitted.artifact.point_parent[clusterer.labels_ == label])
    assert parents.size == 2
    assert unmapped.size == 30  # one whole ring

    hdbscan_labels, _, _ = _hdbscan_predict(clusterer, train)
    wrong = np.flatnonzero(hdbscan_labels != clusterer.labels_)
    np.testing.assert_array_equal(wrong, unmapped)  # exactly the unmapped ring comes back as noise
    assert (hdbscan_labels[wrong] == -1).all()
    assert fitted.artifact.map_gaps == wrong.size == fitted.metrics()["prediction_map_gaps"]

    labels, probabilities, scores = fitted.artifact.predict(train)
    np.testing.assert_array_equal(labels, clusterer.labels_)
    np.testing.assert_array_equal(probabilities, clusterer.probabilities_)
    np.testing.assert_array_equal(scores, clusterer.outlier_scores_)


def test_ties_follow_hdbscan_neighbour_order(gridded):
    """Half-grid points are equidistant from many training points: same labels as hdbscan anyway."""
    train, centres = gridded
    rng = np.random.default_rng(2)
    held_out = np.vstack(
        [np.round(rng.normal(c, 1.5, size=(150, 3))) + rng.choice([0.0, 0.5], size=(150, 3)) for c in centres]
    )
    for cfg in (HdbscanConfig(min_cluster_size=10, min_samples=3), HdbscanConfig(min_cluster_size=15)):
        fitted = fit_hdbscan(train, cfg)
        new = held_out[fitted.artifact._prepared()[0].query(held_out, k=1)[0][:, 0] > 0.0]
        labels, probabilities, scores = fitted.artifact.predict(new)
        expected = _hdbscan_predict(fitted.clusterer, new)
        np.testing.assert_array_equal(labels, expected[0])
        np.testing.assert_allclose(probabilities, expected[1], rtol=0.0, atol=1e-6)
        np.testing.assert_allclose(scores, expected[2], rtol=0.0, atol=1e-6)
        # Rows with equal distances were answered from hdbscan's own tree (its order of ties).
        assert "reference" in fitted.artifact._cache


def test_repair_cluster_map_labels_the_whole_selected_cluster(split_before_falling_out):
    train = split_before_falling_out
    cfg = HdbscanConfig(min_cluster_size=15, min_samples=5)
    plain = fit_hdbscan(train, cfg).artifact
    label, unmapped = _unmapped_subclusters(plain)
    repaired = fit_hdbscan(train, cfg, repair_cluster_map=True)
    assert repaired.artifact.map_gaps == 0 and repaired.metrics()["repair_cluster_map"] is True
    n = train.shape[0]
    assert (repaired.artifact.cluster_label[repaired.artifact.point_parent[unmapped] - n] == label).all()
    # New points a little off the unmapped ring: noise with hdbscan's map, the label with the repair.
    jittered = train + np.random.default_rng(3).normal(0.0, 0.05, size=train.shape)
    before, _, _ = plain.predict(jittered)
    after, _, _ = repaired.artifact.predict(jittered)
    assert (before[unmapped] == -1).all() and (after[unmapped] == label).all()
    changed = before != after
    assert (before[changed] == -1).all() and (after[changed] >= 0).all()


def test_duplicates_with_different_fitted_labels_take_the_majority():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, -0.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    labels = np.array([1, 0, 0, 2, 3, 1])
    # (0, 0): label 0 twice against 1 once -> row 1; (2, 2): a tie -> the label seen first (row 4).
    np.testing.assert_array_equal(density._twins(points, labels), [1, 1, 1, 3, 4, 4])


def test_save_load_and_bytes_round_trips(tmp_path, data):
    fitted = fit_hdbscan(data[0], CONFIGS["eom-min_samples-5"])
    artifact = fitted.artifact
    expected = artifact.predict(data[1])

    path = str(tmp_path / "hdbscan.npz")
    artifact.save(path)
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)
    loaded = SlimHdbscan.load(path)
    from_bytes = SlimHdbscan.from_bytes(artifact.to_bytes())
    for other in (loaded, from_bytes):
        assert other.min_samples == artifact.min_samples
        assert other.anomaly_threshold == artifact.anomaly_threshold
        for got, want in zip(other.predict(data[1]), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert artifact.nbytes < len(artifact.to_bytes()) < artifact.nbytes + 10_000

    artifact.predict(data[1][:1])  # builds the KD-tree, which pickling leaves out
    unpickled = pickle.loads(pickle.dumps(artifact))
    assert "tree" not in unpickled._cache
    assert len(pickle.dumps(artifact)) < artifact.nbytes + 11_000
    np.testing.assert_array_equal(unpickled.predict(data[1])[0], expected[0])


def test_no_anomaly_threshold_round_trips_as_none(data):
    fitted = fit_hdbscan(data[0], HdbscanConfig(min_cluster_size=25, min_samples=5, contamination=0.0))
    assert fitted.artifact.anomaly_threshold is None
    assert SlimHdbscan.from_bytes(fitted.artifact.to_bytes()).anomaly_threshold is None
    assert not fitted.artifact.is_anomaly(np.array([0.0, 1.0])).any()


def test_anomaly_threshold_and_metrics(data):
    train = data[0]
    fitted = fit_hdbscan(train, HdbscanConfig(min_cluster_size=25, min_samples=5, contamination=0.05))
    scores = fitted.clusterer.outlier_scores_
    assert fitted.artifact.anomaly_threshold == pytest.approx(np.quantile(scores, 0.95))
    assert fitted.artifact.is_anomaly(scores).mean() == pytest.approx(0.05, abs=0.01)

    metrics = fitted.metrics()
    assert metrics["sample_rows"] == len(train)
    assert metrics["n_clusters"] == len(metrics["cluster_sizes"]) == fitted.clusterer.labels_.max() + 1
    assert sum(metrics["cluster_sizes"]) + round(metrics["noise_share"] * len(train)) == len(train)
    assert (metrics["min_cluster_size"], metrics["min_samples"]) == (25, 5)
    assert metrics["anomaly_threshold"] == fitted.artifact.anomaly_threshold


def test_min_cluster_size_from_share_and_min_samples_default(data):
    fitted = fit_hdbscan(data[0], HdbscanConfig(min_cluster_share=0.05, min_samples=None))
    assert fitted.min_cluster_size == round(0.05 * len(data[0])) == 33
    assert fitted.min_samples == fitted.artifact.min_samples == 33
    assert fitted.clusterer.min_samples is None  # the library's own default


def test_chunked_and_threaded_prediction_is_identical(monkeypatch, data):
    artifact = fit_hdbscan(data[0], CONFIGS["eom-min_samples-5"]).artifact
    expected = artifact.predict(data[1])
    monkeypatch.setattr(density, "_QUERY_ELEMENTS", 10)  # 256-row chunks
    for workers in (1, 2):
        for got, want in zip(artifact.predict(data[1], workers=workers), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_no_clusters_predicts_noise():
    points = np.random.default_rng(4).uniform(-1.0, 1.0, size=(120, 3))
    fitted = fit_hdbscan(points, HdbscanConfig(min_cluster_size=60, min_samples=5))
    assert fitted.metrics()["n_clusters"] == 0
    new = np.random.default_rng(5).uniform(-1.0, 1.0, size=(30, 3))
    labels, probabilities, scores = fitted.artifact.predict(new)
    expected = _hdbscan_predict(fitted.clusterer, new)
    np.testing.assert_array_equal(labels, expected[0])
    np.testing.assert_array_equal(probabilities, expected[1])
    np.testing.assert_array_equal(scores, expected[2])
    np.testing.assert_array_equal(fitted.artifact.predict(points)[0], -1)


def test_empty_batch():
    artifact = fit_hdbscan(_blobs(6, per_blob=60, noise=10)[0], HdbscanConfig(min_cluster_size=20)).artifact
    for empty in (np.empty((0, DIMS)), np.empty((0,)), np.empty((0, DIMS), dtype=np.float32)):
        labels, probabilities, scores = artifact.predict(empty)
        assert labels.shape == probabilities.shape == scores.shape == (0,)
        assert (labels.dtype, probabilities.dtype, scores.dtype) == (np.int32, np.float64, np.float64)


def test_bad_embeddings_are_rejected():
    train, _ = _blobs(7, per_blob=30, noise=10)
    cfg = HdbscanConfig(min_cluster_size=10, min_samples=3)
    with_nan = train.copy()
    with_nan[5, 2] = np.nan
    with_nan[9, 0] = np.inf
    with pytest.raises(
        ValueError, match=r"embeddings must be finite: 2 NaN/inf values in 2 rows \(first at row 5"
    ):
        fit_hdbscan(with_nan, cfg)
    with pytest.raises(ValueError, match=r"2-D .* got shape \(130,\)"):
        fit_hdbscan(train[:, 0], cfg)
    with pytest.raises(ValueError, match="at least min_cluster_size = 200 embeddings, got 130"):
        fit_hdbscan(train, HdbscanConfig(min_cluster_size=200))
    with pytest.raises(ValueError, match=r"2 \* min_samples = 140 .* got 130"):
        fit_hdbscan(train, HdbscanConfig(min_cluster_size=10, min_samples=70))


def test_bad_points_are_rejected_at_predict_time():
    artifact = fit_hdbscan(_blobs(8, per_blob=40, noise=10)[0], HdbscanConfig(min_cluster_size=15)).artifact
    with pytest.raises(ValueError, match=f"have 4 dimensions, but the HDBSCAN model was fitted on {DIMS}"):
        artifact.predict(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite: 1 NaN/inf values in 1 rows"):
        artifact.predict(np.array([[np.nan] + [0.0] * (DIMS - 1)]))
    with pytest.raises(ValueError, match="2-D"):
        artifact.predict(np.zeros(DIMS))


def test_inconsistent_artifact_is_rejected(data):
    artifact = fit_hdbscan(data[0], CONFIGS["eom-min_samples-5"]).artifact
    payload = {name: getattr(artifact, name) for name in density._ARRAYS}
    payload["core_distances"] = payload["core_distances"][:-1]
    with pytest.raises(ValueError, match=r"core_distances has shape \(\d+,\), expected"):
        SlimHdbscan(**payload, min_samples=artifact.min_samples, anomaly_threshold=None)


def test_many_identical_embeddings_give_nan_scores_like_hdbscan():
    train, centres = _blobs(9, dims=4, per_blob=100, blobs=3, noise=30)
    train = np.vstack([train, np.repeat(centres[:1], 30, axis=0)])  # 30 identical users, min_samples 5
    fitted = fit_hdbscan(train, HdbscanConfig(min_cluster_size=20, min_samples=5))
    assert fitted.metrics()["nan_outlier_scores"] > 30
    assert np.isfinite(fitted.artifact.anomaly_threshold)
    held_out = np.random.default_rng(10).normal(centres[0], 1.0, size=(50, 4))
    labels, probabilities, scores = fitted.artifact.predict(held_out)
    expected = _hdbscan_predict(fitted.clusterer, held_out)
    np.testing.assert_array_equal(labels, expected[0])
    np.testing.assert_array_equal(probabilities, expected[1])
    np.testing.assert_array_equal(scores, expected[2])
    assert np.isnan(scores).any()


def test_noise_joins_the_nearest_cluster_and_anomalies_stay_noise(data):
    """assign_noise: HDBSCAN's noise between clusters gets the nearest clustered training point's
    label; the anomalies (GLOSH above the threshold) keep -1; clustered rows are untouched."""
    train, held_out = data
    fitted = fit_hdbscan(train, HdbscanConfig(min_cluster_size=25, min_samples=5, contamination=0.05,
                                              assign_noise=True))
    artifact = fitted.artifact
    # The training points: their background noise holds both anomalies and points near the blobs.
    points = np.vstack([train, held_out])
    raw_labels, raw_probabilities, raw_scores = artifact.predict(points)
    labels, probabilities, scores = artifact.assign(points)
    np.testing.assert_array_equal(scores, raw_scores)
    clustered = raw_labels >= 0
    np.testing.assert_array_equal(labels[clustered], raw_labels[clustered])
    np.testing.assert_array_equal(probabilities[clustered], raw_probabilities[clustered])

    anomalies = artifact.is_anomaly(raw_scores)
    joined = ~clustered & ~anomalies
    assert joined.sum() > 10 and (~clustered & anomalies).sum() > 10  # the held-out set has both kinds
    assert (labels[~clustered & anomalies] == -1).all()
    members = np.flatnonzero(artifact.fitted_labels >= 0)
    squared = ((points[joined][:, None, :] - artifact.points[members][None]) ** 2).sum(axis=-1)
    np.testing.assert_array_equal(labels[joined], artifact.fitted_labels[members[squared.argmin(axis=1)]])
    assert ((probabilities[joined] > 0) & (probabilities[joined] <= 1)).all()

    metrics = fitted.metrics()
    assert metrics["noise_share"] < metrics["density_noise_share"] == pytest.approx(
        (fitted.clusterer.labels_ < 0).mean())
    assert metrics["noise_share"] == pytest.approx((artifact.assigned_fitted_labels() < 0).mean())
    assert sum(metrics["cluster_sizes"]) + round(metrics["noise_share"] * len(train)) == len(train)


def test_noise_assignment_round_trips_and_older_artifacts_predict_as_hdbscan(data):
    import io

    train, held_out = data
    artifact = fit_hdbscan(train, HdbscanConfig(min_cluster_size=25, min_samples=5, assign_noise=True)).artifact
    assert SlimHdbscan.from_bytes(artifact.to_bytes()).assign_noise
    payload = artifact._payload()
    del payload["assign_noise"]  # as saved before the option existed
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    older = SlimHdbscan.from_bytes(buffer.getvalue())
    assert not older.assign_noise
    np.testing.assert_array_equal(older.assign(held_out)[0], artifact.predict(held_out)[0])


def test_the_modules_of_executor_functions_import_without_the_drivers_libraries():
    """A Python worker imports the module of each function it unpickles: the deep scoring's, the
    GMM's mixture math and the preparation's. scikit-learn, hdbscan and pyspark.ml (1.3-1.5 s in a
    fresh worker) are for fitting on the driver; the KD-tree's numba is what scoring needs."""
    code = (
        "import sys, segspark.models.deep.scoring, segspark.models.deep.density, segspark.models.deep.encoder, "
        "segspark.models.mixture_math, segspark.models.prepare; "
        "bad = [m for m in ('sklearn', 'hdbscan', 'pyspark.ml', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]

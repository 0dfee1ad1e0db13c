"""Every registered model keeps one contract (models.contract), checked the way scikit-learn's
`check_estimator` checks an estimator: fit on planted blobs through the registry, assign, the
output schema of user_segments, metrics, side outputs, and a save/load round trip through a bundle
folder that assigns every user the same way."""

import json

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors

from segspark.bundle.models import load_fitted, save_fitted
from segspark.config import ModelsConfig
from segspark.io.catalog import USER_SEGMENTS
from segspark.models import registry
from segspark.models.contract import ASSIGNMENT_COLUMNS, Scored, SegmentModel, double_array
from segspark.models.sample import UserSample

DIMS, PER_BLOB, K = 6, 200, 3
NAMES = [f"f{i}" for i in range(DIMS)]
MODELS = ModelsConfig.model_validate({
    "autoencoder": {"hidden_layers": [16, 8], "embedding_size": 3, "epochs": 8, "batch_size": 32,
                    "learning_rate": 0.01, "input_noise": 0.0, "sample_size": 600},
    "hdbscan": {"min_cluster_size": 40, "min_samples": 5, "sample_size": 600},
    "selection": {"silhouette_sample": 300},
})


@pytest.fixture(scope="module")
def planted(spark):
    """Three well-separated blobs: the prepared frame (user_id, features_vector) and its sample."""
    rng = np.random.default_rng(11)
    centres = rng.normal(0.0, 4.0, size=(K, DIMS))
    points = np.vstack([rng.normal(c, 0.4, size=(PER_BLOB, DIMS)) for c in centres])
    ids = np.array([f"u{i:04d}" for i in range(len(points))], dtype=object)
    frame = spark.createDataFrame(
        [(u, Vectors.dense(p)) for u, p in zip(ids.tolist(), points.tolist(), strict=True)], ["user_id", "features_vector"]
    ).cache()
    return frame, UserSample(ids, points, len(points), 0)


@pytest.fixture(scope="module")
def fitted(planted):
    """One fitted model of every registered type, through its registry entry (module-scoped: read only)."""
    frame, sample = planted
    result = {}
    for model in registry.MODELS:
        module = model.implementation()
        if model.swept:
            options = module.options(model.settings(MODELS), sample.matrix)
            result[model.name] = module.fit_one(frame, K, 3, users=sample.size, **options)
        else:
            result[model.name] = module.train(frame, sample, MODELS, NAMES).fitted
    return result


def test_the_registry_is_the_one_list_of_models():
    from segspark.report import data

    names = registry.names()
    assert names == ("kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan")
    assert names == data.MODELS
    assert list(ModelsConfig().enabled()) == list(names)  # every model is on by default
    off = ModelsConfig.model_validate({"gmm": {"enabled": False}, "autoencoder": {"enabled": False}})
    assert list(off.enabled()) == ["kmeans", "bisecting_kmeans"]
    for model in registry.MODELS:
        module = model.implementation()
        assert module.FITTED.__module__ == model.module
        wanted = ("options", "fit_sample", "fit_one", "users_per_cluster") if model.swept else (
            "train", "users_problem", "sample_size")
        assert all(callable(getattr(module, f, None)) for f in wanted), (model.name, wanted)
    with pytest.raises(KeyError, match="not one segspark knows"):
        registry.get("dbscan")


@pytest.mark.parametrize("name", registry.names())
def test_a_fitted_model_keeps_the_contract(fitted, name):
    model = fitted[name]
    assert isinstance(model, SegmentModel)
    assert model.model_name == name
    metrics = model.metrics()
    assert {"model", "k", "objective", "anomaly_threshold"} <= set(metrics)
    assert metrics["model"] == name and metrics["objective"] == model.objective
    json.dumps(metrics, allow_nan=False, default=float)  # goes to runs.metrics and the bundle


@pytest.mark.parametrize("name", registry.names())
def test_assignments_have_the_user_segments_columns_for_every_user(planted, fitted, name):
    frame, sample = planted
    assigned = fitted[name].assign(frame)
    expected = {f.name: f.dataType for f in USER_SEGMENTS.fields if f.name in ASSIGNMENT_COLUMNS}
    assert assigned.columns == ["user_id", *ASSIGNMENT_COLUMNS]
    assert {f.name: f.dataType for f in assigned.schema.fields if f.name != "user_id"} == expected
    rows = assigned.collect()
    assert sorted(r.user_id for r in rows) == sorted(sample.user_ids)
    assert all(r.segment is not None and r.is_anomaly is not None and 0.0 <= r.probability <= 1.0 for r in rows)
    assert sum(r.is_anomaly for r in rows) <= 0.05 * len(rows)  # contamination 0.01, to within the quantile
    soft = registry.get(name).soft
    assert all((r.probabilities is not None) == soft for r in rows)


@pytest.mark.parametrize("name", registry.names())
def test_score_gives_the_assignments_and_the_tables_the_registry_names(planted, fitted, name):
    frame, sample = planted
    scored = fitted[name].score(frame)
    try:
        assert isinstance(scored, Scored)
        assert scored.assignments.columns == ["user_id", *ASSIGNMENT_COLUMNS]
        assert tuple(scored.outputs) == registry.get(name).outputs
        for table in scored.outputs.values():
            assert table.columns[0] == "user_id" and table.count() == sample.size
    finally:
        for df in scored.cached:
            df.unpersist()


@pytest.mark.parametrize("name", registry.names())
def test_save_and_load_assign_every_user_the_same_way(planted, fitted, name, tmp_path):
    frame, _ = planted
    ids = {s: s for s in range(-1, K + 5)}
    save_fitted(name, fitted[name], str(tmp_path), ids, {s: f"segment {s}" for s in ids})
    document = json.loads((tmp_path / "models" / f"{name}.json").read_text())
    assert document["model"] == name
    loaded = load_fitted(name, str(tmp_path))
    assert loaded.segment_ids == ids and type(loaded.fitted) is type(fitted[name])

    def rows(model):
        return {r.user_id: r for r in model.assign(frame).collect()}

    before, after = rows(fitted[name]), rows(loaded.fitted)
    assert before.keys() == after.keys()
    for user, row in before.items():
        again = after[user]
        assert (row.segment, row.is_anomaly) == (again.segment, again.is_anomaly), user
        assert row.probability == pytest.approx(again.probability, abs=1e-6)
        assert row.anomaly_score == pytest.approx(again.anomaly_score, rel=1e-5, abs=1e-6)


def test_double_array_reads_back_every_double_exactly(spark):
    """The centres' literal (one SQL text) holds the same doubles as F.lit of each: no rounding."""
    values = [0.1, -0.0, 1e-300, -2.5e-17, 1.7976931348623157e308, 123456789.123456789, -1 / 3, 5e-324, 42.0]
    (row,) = spark.range(1).select(double_array(values).alias("a")).collect()
    assert [np.float64(x).tobytes() for x in row.a] == [np.float64(x).tobytes() for x in values]
    with pytest.raises(ValueError, match="not a finite number"):
        double_array([1.0, float("nan")])

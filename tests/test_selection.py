"""Choosing k: the written rule on hand-made curves, and a real sweep of scikit-learn fits in Spark tasks."""

from __future__ import annotations

import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from segspark.evaluation.selection import SweepResult, choose_k, curve_from_grid
from segspark.models import kmeans
from segspark.models.sample_grid import Cell, run_grid


def _entry(k, sil, db, ch, wss=100.0):
    return {"k": k, "silhouette": sil, "davies_bouldin": db, "calinski_harabasz": ch, "wss": wss}


def test_lowest_davies_bouldin_within_tolerance_of_best_silhouette():
    curve = [
        _entry(4, 0.400, 0.95, 900.0),
        _entry(5, 0.405, 0.80, 800.0),  # 1.7% below the best silhouette, lowest DB
        _entry(6, 0.412, 0.91, 850.0),  # best silhouette
        _entry(7, 0.380, 0.70, 700.0),  # lowest DB overall but 7.8% below the best silhouette
    ]
    k, reason = choose_k(curve, silhouette_tolerance=0.02)
    assert k == 5
    assert reason.startswith("k=5: lowest Davies-Bouldin (0.800)")
    assert "within 2% of the best silhouette (0.412 at k=6" in reason

    # No tolerance: only the best silhouette is a candidate.
    k, reason = choose_k(curve, silhouette_tolerance=0.0)
    assert k == 6
    assert reason.startswith("k=6: best silhouette (0.412), no other k within 0% of it")

    # The default, 1%, leaves k=5 (1.7% below) out.
    assert choose_k(curve)[0] == 6

    # A wide tolerance lets k=7 in.
    assert choose_k(curve, silhouette_tolerance=0.1)[0] == 7


def test_best_silhouette_and_lowest_davies_bouldin():
    k, reason = choose_k([_entry(3, 0.50, 0.6, 500.0), _entry(4, 0.495, 0.7, 600.0)], silhouette_tolerance=0.02)
    assert k == 3
    assert reason == "k=3: best silhouette (0.500) and lowest Davies-Bouldin (0.600) among k within 2% of it (k=3, 4)"


def test_ties_go_to_higher_calinski_harabasz_then_smaller_k():
    k, reason = choose_k([_entry(3, 0.50, 0.6, 500.0), _entry(4, 0.50, 0.6, 650.0), _entry(5, 0.50, 0.6, 600.0)])
    assert k == 4
    assert "tied on Davies-Bouldin with k=3, 5, higher Calinski-Harabasz (650.0 vs 600.0)" in reason

    k, reason = choose_k([_entry(5, 0.50, 0.6, 500.0), _entry(3, 0.50, 0.6, 500.0)])
    assert k == 3
    assert "so the smaller k" in reason


def test_entries_with_missing_metrics_are_skipped():
    curve = [
        {"k": 2, "silhouette": None, "davies_bouldin": None, "calinski_harabasz": None, "wss": 10.0},
        _entry(3, 0.3, float("nan"), 100.0),
        _entry(4, 0.2, 1.1, 90.0),
    ]
    k, reason = choose_k(curve)
    assert k == 4
    assert "skipped k=2 (missing silhouette, davies_bouldin, calinski_harabasz); k=3 (missing davies_bouldin)" in reason

    with pytest.raises(ValueError, match="no curve entry has all of k, silhouette"):
        choose_k(curve[:2])
    with pytest.raises(ValueError, match="silhouette_tolerance"):
        choose_k(curve, silhouette_tolerance=-0.1)


@pytest.fixture(scope="module")
def blobs():
    x, truth = make_blobs(n_samples=400, centers=4, n_features=4, cluster_std=0.5, center_box=(-10, 10), random_state=4)
    return x, truth


def test_sweep_finds_the_planted_k(spark, blobs):
    """Every (k, seed) fitted with scikit-learn in Spark tasks; the best seed per k measured there."""
    x, _ = blobs
    cells = [Cell("kmeans", k, seed) for k in (2, 3, 4, 5) for seed in (1, 2)]
    results = run_grid(spark, x, cells, {"kmeans": kmeans.fit_sample}, {"kmeans": {"max_iter": 20}}, 300, tasks=3)
    assert [r.cell for r in results] == cells
    result = curve_from_grid(results)

    assert isinstance(result, SweepResult)
    assert [e["k"] for e in result.curve] == [2, 3, 4, 5]
    assert sorted(result.best) == [2, 3, 4, 5]
    by_k = {e["k"]: e for e in result.curve}
    for entry in result.curve:
        assert entry["objective"] == min(entry["seed_objectives"].values())
        assert entry["best_seed"] in (1, 2)
        assert entry["silhouette_sample_size"] == 300
        assert sum(entry["sizes"]) == 400
    planted = by_k[4]
    assert planted["clusters"] == 4
    assert planted["seed_ari"] > 0.95
    assert planted["dunn"] > 0.5  # four separated blobs
    # The best seed's fit carries what the full-scale fit starts from.
    assert result.best[4].fit.params["centroids"].shape == (4, 4)

    k, reason = result.choose()
    assert k == 4, result.curve
    assert reason.startswith("k=4:")
    assert "silhouette" in reason and "Davies-Bouldin" in reason


def test_sweep_names_the_failing_fit(spark, blobs):
    x, _ = blobs

    def sometimes(points, k, seed, **options):
        if k == 2 and seed == 1:
            raise ArithmeticError("no convergence")
        return kmeans.fit_sample(points, k, seed, **options)

    def always(points, k, seed, **options):
        raise ArithmeticError("no convergence")

    cells = [Cell("kmeans", k, seed) for k in (2, 3) for seed in (1, 2)]
    result = curve_from_grid(run_grid(spark, x, cells, {"kmeans": sometimes}, {}, 300))
    assert result.failed == ["k=2 seed=1: ArithmeticError: no convergence"]
    assert [e["k"] for e in result.curve] == [2, 3] and result.curve[0]["best_seed"] == 2

    result = curve_from_grid(run_grid(spark, x, cells, {"kmeans": always}, {}, 300))
    assert len(result.failed) == 4 and result.curve == []
    with pytest.raises(ValueError, match="no curve entry"):
        result.choose()


@pytest.fixture(scope="module")
def planted(spark):
    """Six planted groups in 8 dimensions, as prepared users (user_id, columns, the prepared vector)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    x, truth = make_blobs(n_samples=3000, centers=6, n_features=8, cluster_std=1.0, center_box=(-6, 6), random_state=11)
    columns = [f"f{i}" for i in range(8)]
    rows = [(f"u{i:05d}", *map(float, v)) for i, v in enumerate(x)]
    frame = spark.createDataFrame(rows, ["user_id", *columns])
    prepared = frame.withColumn("features_vector", array_to_vector(F.array(*columns))).coalesce(2).cache()
    return prepared, columns, {f"u{i:05d}": int(t) for i, t in enumerate(truth)}


def test_k_chosen_on_a_sample_is_the_k_chosen_on_every_user(spark, planted):
    """On planted data: the same k from a third of the users as from all of them, and the full-scale
    fit (MLlib, from the sample's best solution where MLlib allows it) as good as the sample's."""

    from segspark.config import ModelsConfig
    from segspark.models import registry
    from segspark.models.sample import collect_user_sample
    from segspark.segments.train import train_baselines

    prepared, columns, truth = planted
    models = ModelsConfig()
    baselines = {m.name: m.settings(models) for m in registry.MODELS if m.swept}
    chosen = {}
    for size in (3000, 1000):
        selection = models.selection.model_copy(update={"sample_size": size, "silhouette_sample": 1000})
        sample = collect_user_sample(prepared, columns, size, 3000, selection.sample_seed)
        trained = train_baselines(spark, baselines, selection, prepared, sample)
        chosen[size] = {t.name: t.k for t in trained}
        if size == 3000:
            continue
        for model in trained:
            entry = next(e for e in model.curve if e["k"] == model.k)
            assert entry["sample_users"] == 1000 and sum(entry["full_cluster_sizes"]) == 3000
            assert "measured on a hash sample of 1,000 of 3,000 users" in model.reason
            # The sweep's best fit at the chosen k, again on the sample (it is deterministic)...
            module = registry.get(model.name).implementation()
            options = module.options(baselines[model.name], sample.matrix)
            labels = module.fit_sample(sample.matrix, model.k, entry["best_seed"], **options).labels
            sweep_ari = adjusted_rand_score([truth[u] for u in sample.user_ids], labels)
            # ...against the full-scale fit of every user.
            rows = model.raw.select("user_id", "segment").collect()
            full_ari = adjusted_rand_score([truth[r.user_id] for r in rows], [r.segment for r in rows])
            assert full_ari >= sweep_ari - 0.02, (model.name, sweep_ari, full_ari)
    assert chosen[1000] == chosen[3000] == dict.fromkeys(baselines, 6), chosen

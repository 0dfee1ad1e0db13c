"""Planted personas: with the generator's defaults the k sweep finds the number of personas, KMeans
recovers them, and so does the autoencoder + HDBSCAN on the users it does not call noise (ARI
against truth/), through the whole pipeline."""

import pytest
from deltalake import DeltaTable
from sklearn.metrics import adjusted_rand_score

from segspark import usecases
from segspark.datagen import PERSONAS, GenerateSpec
from segspark.datagen_local import write_dataset_on_driver

from .conftest import REPO


@pytest.fixture(scope="module")
def personas_run(spark, tmp_path_factory):
    from segspark.config import load_config

    data = tmp_path_factory.mktemp("personas")
    write_dataset_on_driver(GenerateSpec(users=1500, seed=5), str(data), "parquet")
    cfg = load_config(
        REPO / "conf/local.yaml",
        [
            f"input.path={data}/events",
            f"output.root={data}/out",
            "models.bisecting_kmeans.enabled=false",
            "models.gmm.enabled=false",
            "models.selection.seeds=2",
            "models.selection.silhouette_sample=1000",
        ],
    )
    result = usecases.run(spark, cfg, run_id="personas")
    truth = spark.read.parquet(f"{data}/truth").toPandas()
    return cfg, result, truth


def test_sweep_chooses_the_number_of_personas(personas_run):
    _, result, _ = personas_run
    assert result.metrics["kmeans"]["k"] == len(PERSONAS), result.metrics["kmeans"]["reason"]
    assert [c["k"] for c in result.metrics["kmeans"]["curve"]] == list(range(3, 9))


def test_kmeans_recovers_the_personas(personas_run):
    cfg, result, truth = personas_run
    segments = DeltaTable(f"{cfg.output.root}/user_segments").to_pandas().query("model == 'kmeans'")
    joined = segments.merge(truth.astype({"user_id": str}), on="user_id")
    assert len(joined) == result.users
    ari = adjusted_rand_score(joined.persona, joined.segment)
    print(f"kmeans ARI against the planted personas: {ari:.3f}")
    assert ari >= 0.8, f"ARI {ari:.3f}"


def test_autoencoder_hdbscan_recovers_the_personas_with_little_noise(personas_run):
    cfg, result, truth = personas_run
    segments = DeltaTable(f"{cfg.output.root}/user_segments").to_pandas().query("model == 'ae_hdbscan'")
    joined = segments.merge(truth.astype({"user_id": str}), on="user_id")
    assert len(joined) == result.users
    kept = joined[joined.segment != -1]
    noise = 1 - len(kept) / len(joined)
    ari = adjusted_rand_score(kept.persona, kept.segment)
    print(f"ae_hdbscan ARI on non-noise users: {ari:.3f}, noise share {noise:.1%}")
    assert noise <= 0.10, f"noise share {noise:.1%}"
    assert ari >= 0.9, f"ARI {ari:.3f}"
    assert result.metrics["ae_hdbscan"]["k"] == len(PERSONAS)

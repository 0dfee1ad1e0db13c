"""The deep path end to end (autoencoder embeddings + HDBSCAN on the executors), the run's model
bundle, and `segspark score` applying the bundle to data without retraining."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from segspark import pipeline
from segspark.cli import main
from segspark.models.bundle import BundleError, open_bundle

from .conftest import FAST_MODELS, REPO


def frame(root, name):
    return DeltaTable(f"{root}/{name}").to_pandas()


@pytest.fixture(scope="module")
def deep_run(spark, sample_parquet, tmp_path_factory):
    from segspark.config import load_config

    out = tmp_path_factory.mktemp("deep-run")
    cfg = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={sample_parquet}/events", f"output.root={out}", *FAST_MODELS,
         "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.kmeans.k=4"],
    )
    return cfg, pipeline.run(spark, cfg, run_id="train")


def test_embeddings_for_every_user(deep_run):
    cfg, result = deep_run
    embeddings = frame(cfg.output.root, "user_embeddings")
    assert len(embeddings) == result.users and embeddings.user_id.is_unique
    assert set(embeddings.run_id) == {"train"}
    sizes = embeddings.embedding.map(len)
    assert (sizes == cfg.models.autoencoder.embedding_size).all()
    assert np.isfinite(np.stack(embeddings.embedding.to_numpy())).all()


def test_ae_hdbscan_segments_noise_probabilities_and_scores(deep_run):
    cfg, result = deep_run
    segments = frame(cfg.output.root, "user_segments")
    deep = segments[segments.model == "ae_hdbscan"]
    assert len(deep) == result.users and deep.user_id.is_unique
    assert deep.probability.between(0, 1).all() and deep.anomaly_score.between(0, 1).all()
    noise = deep[deep.segment == -1]
    assert (noise.probability == 0).all() and (noise.segment_name == "noise / unassigned").all()
    metrics = result.metrics["ae_hdbscan"]
    assert metrics["k"] == deep[deep.segment != -1].segment.nunique() >= 2
    assert metrics["noise_share"] == pytest.approx(len(noise) / len(deep))
    assert "of users are noise" in metrics["reason"]
    assert metrics["model"]["autoencoder"]["sample_rows"] == result.users  # sample_size exceeds 400 users
    chosen = frame(cfg.output.root, "model_selection").query("model == 'ae_hdbscan'")
    assert chosen.chosen.all() and chosen.k.tolist() == [metrics["k"]]


def test_bundle_holds_every_model_with_checksums(deep_run):
    cfg, result = deep_run
    location = result.metrics["bundle"]["path"]
    manifest = open_bundle(location)
    assert manifest.run_id == "train" and set(manifest.models) == {"kmeans", "ae_hdbscan"}
    files = set(manifest.files)
    assert {"prepare/prepare.json", "feature_spec.json", "autoencoder/encoder.npz", "autoencoder/autoencoder.keras",
            "hdbscan/hdbscan.npz", "models/kmeans.json", "models/ae_hdbscan.json"} <= files
    assert any(f.startswith("mllib/kmeans/model/") for f in files)
    assert manifest.config_hash == cfg.config_hash()
    data = manifest.training_data
    assert data["users"] == result.users and data["events"] == result.clean_rows
    assert data["first_event"] < data["last_event"] and data["input_path"] == cfg.input.path
    assert {"pyspark", "tensorflow", "hdbscan", "scikit-learn"} <= set(manifest.libraries)


def test_score_reproduces_the_training_segments_without_retraining(spark, deep_run):
    cfg, result = deep_run
    location = result.metrics["bundle"]["path"]
    scored = pipeline.run(spark, cfg, run_id="scored", bundle=location)
    assert scored.metrics["scored_with_bundle"]["run_id"] == "train"
    assert {s["model"] for s in scored.segments} == {"kmeans", "ae_hdbscan"}
    assert sorted((s["model"], s["segment"], s["size"]) for s in scored.segments) == sorted(
        (s["model"], s["segment"], s["size"]) for s in result.segments
    )
    assert "ae_hdbscan" not in scored.stage_seconds and "segments" not in scored.stage_seconds
    segments = frame(cfg.output.root, "user_segments")
    columns = ["model", "user_id", "segment", "segment_name", "probability", "anomaly_score", "is_anomaly"]
    trained = segments[segments.run_id == "train"][columns].sort_values(["model", "user_id"]).reset_index(drop=True)
    again = segments[segments.run_id == "scored"][columns].sort_values(["model", "user_id"]).reset_index(drop=True)
    assert len(again) == len(trained)
    assert (again.segment.to_numpy() == trained.segment.to_numpy()).all()
    assert (again.segment_name.to_numpy() == trained.segment_name.to_numpy()).all()
    assert np.allclose(again.probability, trained.probability, atol=1e-6)
    embeddings = frame(cfg.output.root, "user_embeddings")
    assert (embeddings.run_id == "scored").sum() == result.users


def test_score_refuses_a_changed_bundle(spark, deep_run, tmp_path, capsys):
    cfg, result = deep_run
    copy = tmp_path / "bundle"
    shutil.copytree(result.metrics["bundle"]["path"], copy)
    target = copy / "models" / "kmeans.json"
    document = json.loads(target.read_text())
    document["segment_ids"] = {k: v + 1 for k, v in document["segment_ids"].items()}
    target.write_text(json.dumps(document))
    with pytest.raises(BundleError, match="models/kmeans.json"):
        pipeline.run(spark, cfg, run_id="tampered", bundle=str(copy))
    code = main(["score", "--config", str(REPO / "conf/local.yaml"), "--bundle", str(copy),
                 "--set", f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "models/kmeans.json" in err and "Traceback" not in err


def test_score_refuses_features_that_do_not_match_the_bundle(spark, deep_run, tmp_path):
    from segspark.config import load_config

    cfg, result = deep_run
    other = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}", "features.top_categories=2"],
    )
    with pytest.raises(BundleError, match="top_category_3_share"):
        pipeline.run(spark, other, run_id="other-features", bundle=result.metrics["bundle"]["path"])


def test_missing_bundle_exits_2(capsys, tmp_path):
    code = main(["score", "--config", str(REPO / "conf/local.yaml"), "--bundle", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err


def test_same_seed_gives_the_same_segments(spark, deep_run, tmp_path):
    from segspark.config import load_config

    cfg, _ = deep_run
    again = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}", *FAST_MODELS,
         "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.kmeans.enabled=false"],
    )
    pipeline.run(spark, again, run_id="train")
    first = frame(cfg.output.root, "user_segments").query("model == 'ae_hdbscan' and run_id == 'train'")
    second = frame(again.output.root, "user_segments").query("model == 'ae_hdbscan'")
    merged = first.merge(second, on="user_id")
    assert len(merged) == len(first)
    assert (merged.segment_x == merged.segment_y).all()
    assert Path(again.output.root, "_models", "train", "manifest.json").exists()


def test_too_few_users_for_the_autoencoder_names_the_settings(spark, sample_parquet, tmp_path):
    from segspark.config import load_config

    cfg = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={sample_parquet}/events", f"output.root={tmp_path / 'out'}", *FAST_MODELS,
         "models.kmeans.enabled=false", "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false",
         "models.autoencoder.batch_size=100000"],
    )
    from segspark.errors import NotEnoughUsersError

    with pytest.raises(NotEnoughUsersError, match=r"fewer than one batch.*models\.autoencoder\.enabled=false"):
        pipeline.run(spark, cfg, run_id="too-few")

"""The deep path end to end (autoencoder embeddings + HDBSCAN on the executors), the run's model
bundle, and `segspark score` applying the bundle to data without retraining."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from segspark import usecases
from segspark.bundle.manifest import (
    SIGNATURE_NAME,
    BundleError,
    open_bundle,
    signing_key_from_env,
    write_manifest,
)
from segspark.bundle.store import load_bundle
from segspark.cli import main

from .conftest import FAST_MODELS, REPO

KEY_ENV = "SEGSPARK_TEST_BUNDLE_KEY"


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
    return cfg, usecases.run(spark, cfg, run_id="train")


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
    scored = usecases.score(spark, cfg, run_id="scored", bundle=location)
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
        usecases.score(spark, cfg, run_id="tampered", bundle=str(copy))
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
        usecases.score(spark, other, run_id="other-features", bundle=result.metrics["bundle"]["path"])


def test_missing_bundle_exits_2(capsys, tmp_path):
    code = main(["score", "--config", str(REPO / "conf/local.yaml"), "--bundle", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err


def test_same_seed_gives_the_same_segments(spark, deep_run, tmp_path, monkeypatch):
    from segspark.config import load_config

    cfg, _ = deep_run
    # This second training run also signs its bundle (bundle.signing_key_env).
    monkeypatch.setenv(KEY_ENV, "s" * 32)
    again = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}", *FAST_MODELS,
         "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.kmeans.enabled=false",
         f"bundle.signing_key_env={KEY_ENV}"],
    )
    trained = usecases.run(spark, again, run_id="train")
    signed = trained.metrics["bundle"]["path"]
    assert Path(signed, SIGNATURE_NAME).is_file()
    assert open_bundle(signed, signing=signing_key_from_env(KEY_ENV)).run_id == "train"
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
        usecases.run(spark, cfg, run_id="too-few")


def _copy_with_checksums(source, target, edit=None, signing=None):
    """A copy of the bundle, `edit`ed (models/kmeans.json as a dict), with a manifest whose checksums
    match: what someone who rewrites a bundle and its manifest produces."""
    shutil.copytree(source, target)
    if edit is not None:
        path = target / "models" / "kmeans.json"
        document = json.loads(path.read_text())
        edit(document)
        path.write_text(json.dumps(document))
    old = open_bundle(target, verify=False)
    write_manifest(target, run_id=old.run_id, config_hash=old.config_hash, as_of=old.as_of,
                   training_data=old.training_data, models=list(old.models), signing=signing)
    return target


def test_score_refuses_a_bundle_whose_json_points_outside_it(deep_run, tmp_path, capsys):
    cfg, result = deep_run
    original = Path(result.metrics["bundle"]["path"])
    elsewhere = original / "mllib" / "kmeans" / "model"  # a valid MLlib model, but not this bundle's file
    for name, target in (("absolute", str(elsewhere)), ("relative", os.path.relpath(elsewhere, tmp_path / "relative"))):
        copy = _copy_with_checksums(original, tmp_path / name, edit=lambda d, t=target: d["fitted"].update(model=t))
        open_bundle(copy)  # its checksums match the edit
        with pytest.raises(BundleError, match=r"models/kmeans.json fitted.model .*(absolute path|climbs out)"):
            load_bundle(str(copy))
    code = main(["score", "--config", str(REPO / "conf/local.yaml"), "--bundle", str(tmp_path / "absolute"),
                 "--set", f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "is the absolute path or URI" in err and "Traceback" not in err


def test_score_with_a_signing_key(spark, deep_run, tmp_path, capsys, monkeypatch):
    cfg, result = deep_run
    original = result.metrics["bundle"]["path"]
    monkeypatch.setenv(KEY_ENV, "s" * 32)
    key = signing_key_from_env(KEY_ENV)

    def score(bundle) -> tuple[int, str]:
        code = main(["score", "--config", str(REPO / "conf/local.yaml"), "--bundle", str(bundle), "--set",
                     f"input.path={cfg.input.path}", f"output.root={tmp_path / 'out'}", f"bundle.signing_key_env={KEY_ENV}"])
        return code, capsys.readouterr().err

    # Unsigned (trained without a key): refused before Spark starts, by score and by stream.
    code, err = score(original)
    assert code == 2 and "is not signed (manifest.sig is missing)" in err and "Traceback" not in err
    code = main(["stream", "--config", str(REPO / "conf/local.yaml"), "--available-now", "--bundle", str(original),
                 "--set", f"input.path={tmp_path}", f"output.root={tmp_path / 'out'}", f"bundle.signing_key_env={KEY_ENV}"])
    err = capsys.readouterr().err
    assert code == 2 and "is not signed (manifest.sig is missing)" in err and "Traceback" not in err
    # Signed, then a model file and the manifest's checksums rewritten: refused.
    tampered = _copy_with_checksums(original, tmp_path / "tampered", signing=key)
    kmeans = tampered / "models" / "kmeans.json"
    document = json.loads(kmeans.read_text())
    document["segment_ids"] = {k: v + 1 for k, v in document["segment_ids"].items()}
    kmeans.write_text(json.dumps(document))
    manifest = json.loads((tampered / "manifest.json").read_text())
    data = kmeans.read_bytes()
    manifest["files"]["models/kmeans.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (tampered / "manifest.json").write_text(json.dumps(manifest, indent=2))
    open_bundle(tampered)  # the checksums alone pass
    code, err = score(tampered)
    assert code == 2 and "manifest.sig does not match manifest.json" in err and "Traceback" not in err
    # Signed with this key: scores, with the training run's segments.
    signed = _copy_with_checksums(original, tmp_path / "signed", signing=key)
    signed_cfg = cfg.model_copy(update={
        "bundle": cfg.bundle.model_copy(update={"signing_key_env": KEY_ENV}),
        "output": cfg.output.model_copy(update={"root": str(tmp_path / "scored")}),
    })
    scored = usecases.score(spark, signed_cfg, run_id="signed", bundle=str(signed))
    assert scored.metrics["scored_with_bundle"]["run_id"] == "train"
    assert sorted((s["model"], s["segment"], s["size"]) for s in scored.segments) == sorted(
        (s["model"], s["segment"], s["size"]) for s in result.segments
    )

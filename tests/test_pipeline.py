"""End to end on generated data: every stage, real Delta tables read back with delta-rs."""

import json

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from segspark import usecases

from .conftest import FAST_MODELS, data_lines


def table(cfg, name):
    return DeltaTable(f"{cfg.output.root}/{name}")


def rows_of(cfg, name):
    return table(cfg, name).to_pyarrow_table().to_pylist()


@pytest.fixture(scope="module")
def noisy_run(spark, noisy_json, tmp_path_factory):
    from segspark.config import load_config

    from .conftest import REPO

    out = tmp_path_factory.mktemp("noisy-run")
    cfg = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={noisy_json}/events", "input.format=json", f"output.root={out}", *FAST_MODELS,
         "models.kmeans.k=4"],
    )
    return cfg, usecases.run(spark, cfg, run_id="run-1")


def test_every_input_record_is_accounted_for(noisy_run, noisy_json):
    cfg, result = noisy_run
    lines = data_lines(noisy_json / "events")
    assert result.input_rows == lines
    assert result.input_rows == result.clean_rows + result.quarantined_rows
    quarantine = rows_of(cfg, "quarantine")
    assert len(quarantine) == result.quarantined_rows
    reasons = {r["reason"] for r in quarantine}
    assert {"duplicate", "malformed_record"} <= reasons
    assert all(r["raw"] for r in quarantine) and all(r["run_id"] == "run-1" for r in quarantine)
    run = rows_of(cfg, "runs")[0]
    assert (run["input_rows"], run["clean_rows"], run["quarantined_rows"]) == (
        result.input_rows,
        result.clean_rows,
        result.quarantined_rows,
    )


def test_tables_have_the_contract_schema(noisy_run):
    cfg, result = noisy_run
    segments = table(cfg, "user_segments").schema().to_arrow()
    assert segments.names == [
        "user_id", "as_of", "run_id", "model", "segment", "segment_name", "probability", "anomaly_score",
        "is_anomaly", "probabilities",
    ]
    assert segments.field("segment").type == pa.int32()
    assert segments.field("as_of").type == pa.date32()
    assert segments.field("probability").type == pa.float64()
    features = table(cfg, "user_features").schema().to_arrow()
    assert {"user_id", "as_of", "run_id", "recency_days", "frequency", "monetary", "tenure_days", "sessions"} <= set(
        features.names
    )
    quarantine = table(cfg, "quarantine").schema().to_arrow()
    assert quarantine.names == ["run_id", "source", "reason", "raw", "ingested_at"]
    assert quarantine.field("ingested_at").type == pa.timestamp("us", tz="UTC")


def test_segments_cover_every_user_once_with_valid_probabilities(noisy_run):
    cfg, result = noisy_run
    all_segments = rows_of(cfg, "user_segments")
    features = rows_of(cfg, "user_features")
    assert {r["model"] for r in all_segments} == {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"}
    assert all(r["as_of"] == result.as_of for r in all_segments)
    for model in ("kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"):
        segments = [r for r in all_segments if r["model"] == model]
        assert len(segments) == len(features) == result.users > 0
        assert len({r["user_id"] for r in segments}) == len(segments)
        assert all(0.0 <= r["probability"] <= 1.0 and r["segment_name"] for r in segments)
        assert sum(s["size"] for s in result.segments if s["model"] == model) == result.users
    kmeans = [r for r in all_segments if r["model"] == "kmeans"]
    assert {r["segment"] for r in kmeans} == set(range(4))  # fixed k=4, first run: ids 0..3
    assert all(0.25 < r["probability"] <= 1.0 and r["probabilities"] is None for r in kmeans)
    for r in (r for r in all_segments if r["model"] == "gmm"):
        assert r["probability"] == pytest.approx(max(r["probabilities"])) and sum(r["probabilities"]) == pytest.approx(1)
    run = rows_of(cfg, "runs")[0]
    assert run["status"] == "succeeded" and run["config_hash"] == cfg.config_hash()
    metrics = json.loads(run["metrics"])
    assert metrics["kmeans"]["k"] == 4 and metrics["kmeans"]["reason"] == "k=4: fixed in config (models.kmeans.k)"
    assert metrics["gmm"]["k"] in (3, 4) and "Davies-Bouldin" in metrics["gmm"]["reason"]
    assert set(metrics["stage_seconds"]) >= {"ingest", "features", "prepare", "segments", "bundle"}


def test_model_selection_and_profiles_tables(noisy_run):
    cfg, result = noisy_run
    selection = rows_of(cfg, "model_selection")
    for model in ("bisecting_kmeans", "gmm"):  # swept k = 3..4; the whole curve is stored
        curve = sorted((r for r in selection if r["model"] == model), key=lambda r: r["k"])
        assert [r["k"] for r in curve] == [3, 4]
        assert sum(r["chosen"] for r in curve) == 1
        chosen = next(r for r in curve if r["chosen"])
        assert chosen["reason"].startswith(f"k={chosen['k']}:") and chosen["k"] == result.metrics[model]["k"]
        assert all(r["silhouette"] is not None and r["davies_bouldin"] is not None for r in curve)
    assert all(r["bic"] is not None for r in selection if r["model"] == "gmm")
    profiles = rows_of(cfg, "segment_profiles")
    kmeans = [p for p in profiles if p["model"] == "kmeans"]
    assert sorted(p["segment"] for p in kmeans) == [0, 1, 2, 3]
    assert sum(p["size"] for p in kmeans) == result.users
    assert len({p["segment_name"] for p in kmeans}) == 4  # unique names
    assert all(p["top_features"] and "monetary" in dict(p["feature_zscores"]) for p in kmeans)


def test_rerun_of_same_run_id_replaces_rows_and_new_run_adds(spark, noisy_run):
    cfg, first = noisy_run
    before = {name: len(rows_of(cfg, name)) for name in ("quarantine", "user_features", "user_segments", "runs")}
    versions = {name: table(cfg, name).version() for name in before}
    again = usecases.run(spark, cfg, run_id="run-1")
    assert again.users == first.users
    after = {name: len(rows_of(cfg, name)) for name in before}
    assert after == before  # replaced, not duplicated
    assert all(table(cfg, name).version() == versions[name] + 1 for name in before)  # one atomic commit each

    second = usecases.run(spark, cfg, run_id="run-2")
    segments = rows_of(cfg, "user_segments")
    assert len(segments) == 2 * before["user_segments"]
    assert {r["run_id"] for r in rows_of(cfg, "runs")} == {"run-1", "run-2"}

    # Same users, same data: every segment keeps its id, whatever numbers the new fit gave them.
    for model in ("kmeans", "bisecting_kmeans", "gmm"):
        by_run = {
            run: {r["user_id"]: r["segment"] for r in segments if r["run_id"] == run and r["model"] == model}
            for run in ("run-1", "run-2")
        }
        agree = sum(by_run["run-1"][u] == s for u, s in by_run["run-2"].items()) / len(by_run["run-2"])
        assert agree > 0.95, (model, agree)
        assert second.metrics[model]["previous_run_id"] == "run-1"
    moves = [r for r in rows_of(cfg, "segment_transitions") if r["run_id"] == "run-2" and r["model"] == "kmeans"]
    assert sum(r["users"] for r in moves) == second.users
    assert sum(r["users"] for r in moves if r["from_segment"] == r["to_segment"]) == second.users  # kmeans k=4


def test_as_of_limits_the_data_used(spark, sample_parquet, make_config):
    import datetime as dt

    cfg = make_config(f"input.path={sample_parquet}/events")
    # The features alone: as_of decides which events they read; the models only see the features.
    full = usecases.features(spark, cfg, run_id="full")
    early = usecases.features(spark, cfg, run_id="early", as_of=full.as_of - dt.timedelta(days=20))
    assert early.users < full.users
    tenure = [r["tenure_days"] for r in rows_of(cfg, "user_features") if r["run_id"] == "early"]
    assert max(tenure) <= 11  # nothing after the as-of day is used

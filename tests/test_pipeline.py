"""End to end on generated data: every stage, real Delta tables read back with delta-rs."""

import json

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from segspark import pipeline

from .conftest import data_lines


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
        [f"input.path={noisy_json}/events", "input.format=json", f"output.root={out}", "models.kmeans.k=4"],
    )
    return cfg, pipeline.run(spark, cfg, run_id="run-1")


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
    segments = rows_of(cfg, "user_segments")
    features = rows_of(cfg, "user_features")
    assert len(segments) == len(features) == result.users > 0
    assert len({r["user_id"] for r in segments}) == len(segments)
    assert {r["segment"] for r in segments} == set(range(4))
    assert all(0.25 < r["probability"] <= 1.0 for r in segments)
    assert all(r["model"] == "kmeans" and r["as_of"] == result.as_of for r in segments)
    assert sum(s["size"] for s in result.segments) == result.users
    run = rows_of(cfg, "runs")[0]
    assert run["status"] == "succeeded" and run["config_hash"] == cfg.config_hash()
    metrics = json.loads(run["metrics"])
    assert metrics["kmeans"]["k"] == 4 and set(metrics["stage_seconds"]) >= {"ingest", "features", "kmeans"}


def test_rerun_of_same_run_id_replaces_rows_and_new_run_adds(spark, noisy_run):
    cfg, first = noisy_run
    before = {name: len(rows_of(cfg, name)) for name in ("quarantine", "user_features", "user_segments", "runs")}
    versions = {name: table(cfg, name).version() for name in before}
    again = pipeline.run(spark, cfg, run_id="run-1")
    assert again.users == first.users
    after = {name: len(rows_of(cfg, name)) for name in before}
    assert after == before  # replaced, not duplicated
    assert all(table(cfg, name).version() == versions[name] + 1 for name in before)  # one atomic commit each

    pipeline.run(spark, cfg, run_id="run-2")
    segments = rows_of(cfg, "user_segments")
    assert len(segments) == 2 * before["user_segments"]
    assert {r["run_id"] for r in rows_of(cfg, "runs")} == {"run-1", "run-2"}


def test_as_of_limits_the_data_used(spark, sample_parquet, make_config):
    import datetime as dt

    cfg = make_config(f"input.path={sample_parquet}/events")
    full = pipeline.run(spark, cfg, run_id="full")
    early = pipeline.run(spark, cfg, run_id="early", as_of=full.as_of - dt.timedelta(days=20))
    assert early.users < full.users
    tenure = [r["tenure_days"] for r in rows_of(cfg, "user_features") if r["run_id"] == "early"]
    assert max(tenure) <= 11  # nothing after the as-of day is used

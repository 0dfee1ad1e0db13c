"""Pseudonymised user ids (a keyed HMAC in Spark, the same in every table, score and stream), the key
kept out of config, and what quarantine keeps of a rejected record (privacy.quarantine_raw)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from segspark import ingest, usecases
from segspark.errors import ConfigError, UsageError
from segspark.ingest.privacy import MIN_KEY_BYTES, Protection, pseudonym, pseudonym_of, resolve_protection
from segspark.io.readers import read_raw_events

from .conftest import FAST_MODELS, REPO, data_lines

KEY = "test-pseudonym-key-0123456789abcdef"
KEY_ENV = "SEGSPARK_TEST_PSEUDONYM_KEY"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def python_hmac(key: bytes, user_id: str) -> str:
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def frame(root, name):
    return DeltaTable(f"{root}/{name}").to_pandas()


@pytest.mark.parametrize("key", [b"k" * MIN_KEY_BYTES, bytes(range(64)), b"a much longer key than one block " * 3])
def test_spark_hmac_equals_pythons_hmac(spark, key):
    ids = ["1", "17850", "user@example.com", "ünïcødé-ユーザー", "x" * 300, "", None]
    rows = spark.createDataFrame([(i,) for i in ids], "user_id string")
    got = {r.user_id: r.p for r in rows.select("user_id", pseudonym(F.col("user_id"), key).alias("p")).collect()}
    for user_id in ids:
        expected = None if user_id is None else python_hmac(key, user_id)
        assert got[user_id] == expected == (None if user_id is None else pseudonym_of(user_id, key))


def test_key_comes_from_the_environment_never_from_config(make_config, monkeypatch):
    with pytest.raises(ConfigError, match=r"privacy\.key .*unknown key"):
        make_config("privacy.key=in-the-config-file-0123")
    with pytest.raises(ConfigError, match="secret_scope and secret_key go together"):
        make_config("privacy.secret_scope=segspark")
    cfg = make_config("privacy.pseudonymise_user_id=true", f"privacy.key_env={KEY_ENV}")
    monkeypatch.setenv(KEY_ENV, "too-short")
    with pytest.raises(UsageError, match=f"at least {MIN_KEY_BYTES}"):
        resolve_protection(cfg.privacy)
    monkeypatch.setenv(KEY_ENV, KEY)
    assert resolve_protection(cfg.privacy) == Protection(KEY.encode(), "full")
    assert resolve_protection(make_config().privacy) == Protection(None, "full")  # off: no key needed


def test_missing_key_exits_2_with_a_clear_message(sample_parquet, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "segspark", "features", "--config", str(REPO / "conf/local.yaml"),
         "--set", f"input.path={sample_parquet}/events", f"output.root={tmp_path / 'out'}",
         "privacy.pseudonymise_user_id=true", f"privacy.key_env={KEY_ENV}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: privacy.pseudonymise_user_id is on but no key is set: set the environment variable {KEY_ENV}" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # checked before Spark started: nothing stored, no run begun


@pytest.fixture(scope="module")
def pseudonymised_run(spark, noisy_json, tmp_path_factory):
    """A training run, a score with its bundle and a stream micro-batch, all on the noisy JSON with
    pseudonymised ids."""
    from segspark.config import load_config
    from segspark.streaming.micro_batch import ingest_micro_batch

    os.environ[KEY_ENV] = KEY
    try:
        out = tmp_path_factory.mktemp("pseudonymised")
        cfg = load_config(REPO / "conf/local.yaml", [
            f"input.path={noisy_json}/events", "input.format=json", f"output.root={out}", *FAST_MODELS,
            "models.kmeans.k=3", "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false",
            "models.autoencoder.epochs=3", "privacy.pseudonymise_user_id=true", f"privacy.key_env={KEY_ENV}",
        ])
        trained = usecases.run(spark, cfg, run_id="train")
        usecases.score(spark, cfg, run_id="score", bundle=trained.metrics["bundle"]["path"])
        batch = ingest_micro_batch(spark, cfg, read_raw_events(spark, cfg.input), 0)
        streamed = {r.user_id for r in batch.clean.select("user_id").distinct().collect()}
        batch.unpersist()
    finally:
        del os.environ[KEY_ENV]
    return cfg, trained, streamed


def source_ids(noisy_json) -> dict[str, str]:
    """Pseudonym -> source id of every parseable line (ids as ingest normalises them)."""
    ids = {}
    for path in (noisy_json / "events").glob("part-*"):
        for line in path.read_text().splitlines():
            try:
                user = json.loads(line).get("user_id")
            except json.JSONDecodeError:
                continue
            if user is not None:
                ids[python_hmac(KEY.encode(), str(user))] = str(user)
    return ids


def test_every_table_holds_the_same_pseudonyms(pseudonymised_run, noisy_json):
    cfg, trained, streamed = pseudonymised_run
    root = cfg.output.root
    known = source_ids(noisy_json)
    features = frame(root, "user_features")
    users = set(features["user_id"])
    assert len(users) == trained.users > 0 and users <= set(known)  # each the HMAC of a source id
    assert not users & set(known.values())  # no id in the clear
    segments = frame(root, "user_segments")
    for run_id in ("train", "score"):  # training and scoring give every user the same pseudonym
        for model in ("kmeans", "ae_hdbscan"):
            assert set(segments[(segments.run_id == run_id) & (segments.model == model)]["user_id"]) == users
    assert set(frame(root, "user_embeddings")["user_id"]) == users
    assert streamed == users  # a stream's micro-batch (and so its feature state) too

    quarantine = frame(root, "quarantine")
    assert len(quarantine) > 0
    clear = set(known.values())
    for row in quarantine.itertuples():
        raw = json.loads(row.raw)
        if raw.get("user_id") is not None:  # the source column, or the canonical event's (duplicates)
            assert HEX64.match(raw["user_id"]) and raw["user_id"] in known and raw["user_id"] not in clear
    malformed = quarantine[quarantine.reason == "malformed_record"]
    assert len(malformed) and all(json.loads(raw) == {} for raw in malformed.raw)  # its text is not kept
    [run] = [r for r in DeltaTable(f"{root}/runs").to_pyarrow_table().to_pylist() if r["run_id"] == "train"]
    assert json.loads(run["metrics"])["privacy"]["user_id"] == "hmac-sha256"


@pytest.mark.parametrize("mode", ["mapped", "none"])
def test_quarantine_raw_mapped_and_none(spark, make_config, noisy_json, mode):
    cfg = make_config(f"input.path={noisy_json}/events", "input.format=json")
    # A source column that is not mapped and is personal (as an e-mail or IP address column would be).
    raw = read_raw_events(spark, cfg.input).withColumn("email", F.lit("ana@example.com"))
    tagged = ingest.tag_events(raw, cfg.input, Protection(None, mode))
    counts = {r.reason: r["count"] for r in ingest.reason_counts(tagged).collect()}
    rows = ingest.quarantine_rows(tagged, "r", cfg.input.path).collect()
    assert sum(counts.values()) == data_lines(noisy_json / "events")  # input = clean + quarantined
    assert len(rows) == sum(n for reason, n in counts.items() if reason) > 0
    assert {"duplicate", "malformed_record", "missing_price"} <= {r.reason for r in rows}
    if mode == "none":
        assert all(r.raw is None for r in rows)
        return
    mapped = set(cfg.input.columns.mapped().values())
    for r in rows:
        record = json.loads(r.raw)
        assert "email" not in record and "brand" not in record and "ana@example.com" not in r.raw
        assert set(record) <= mapped | set(ingest.EVENT_COLUMNS)  # source columns, or the canonical event
    assert any(json.loads(r.raw).get("user_id") for r in rows if r.reason == "missing_price")


def test_quarantine_table_takes_null_raw(spark, make_config, noisy_json):
    cfg = make_config(f"input.path={noisy_json}/events", "input.format=json", "privacy.quarantine_raw=none")
    result = usecases.features(spark, cfg, run_id="no-raw")
    quarantine = frame(cfg.output.root, "quarantine")
    assert len(quarantine) == result.quarantined_rows > 0 and quarantine.raw.isna().all()
    assert result.input_rows == result.clean_rows + result.quarantined_rows == data_lines(noisy_json / "events")

"""The one redaction (segspark.runtime.redaction) on real-world secret shapes, and where it is applied: the
logged config, the report's configuration table (MLflow params: tests/test_tracking.py)."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pytest
from deltalake import DeltaTable

from segspark.config import load_config
from segspark.runtime.redaction import MASK, is_secret_key, redact, redact_text

from .conftest import REPO

# (dotted key, value, what must not survive, what must stay readable)
SHAPES = [
    ("input.options.kafka.sasl.jaas.config",
     'org.apache.kafka.common.security.plain.PlainLoginModule required username="CKAPIKEY42" password="cflt-s3cr3t";',
     ["cflt-s3cr3t", "CKAPIKEY42"], []),
    ("spark.conf.fs.azure.account.key.shopdata.dfs.core.windows.net",
     "bXlzdG9yYWdla2V5bXlzdG9yYWdla2V5bXlzdG9yYWdla2V5PT0=", ["bXlzdG9yYWdla2V5"], []),
    ("spark.conf.fs.s3a.access.key", "AKIAIOSFODNN7EXAMPLE", ["AKIAIOSFODNN7EXAMPLE"], []),
    ("spark.conf.fs.s3a.secret.key", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ["wJalrXUtnFEMI"], []),
    ("spark.conf.fs.s3a.session.token", "FwoGZXIvYXdzEBYaDHqa0AP1/EXAMPLE", ["FwoGZXIvYXdzEBYaDHqa0AP1"], []),
    ("spark.conf.fs.gs.auth.service.account.private.key", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n-----END PRIVATE KEY-----",
     ["MIIEvQIBADAN"], []),
    ("spark.conf.spark.ssl.keyStorePassword", "changeit", ["changeit"], []),
    ("spark.conf.fs.azure.account.oauth2.client.secret", "Xy7~client-secret", ["client-secret"], []),
    ("input.path", "jdbc:postgresql://db.internal:5432/shop?user=etl&password=pg-pass-1&sslmode=require",
     ["pg-pass-1"], ["db.internal:5432/shop", "sslmode=require"]),
    ("input.path", "jdbc:sqlserver://sql.internal:1433;databaseName=shop;user=etl;password=mssql-pass;",
     ["mssql-pass"], ["databaseName=shop"]),
    ("input.path", "jdbc:mysql://etl:mysql-pass@mysql.internal/shop", ["mysql-pass"], ["mysql.internal/shop"]),
    ("input.path", "jdbc:oracle:thin:scott/tiger-pass@ora.internal:1521/ORCL", ["tiger-pass"], ["ora.internal:1521/ORCL"]),
    ("spark.remote", "sc://connect.example.com:15002/;token=dapi0123456789abcdef;user_id=ana",
     ["dapi0123456789abcdef"], ["connect.example.com:15002", "user_id=ana"]),
    ("mlflow.tracking_uri", "https://ana:basic-pass@mlflow.example.com/api", ["basic-pass", "ana:"],
     ["mlflow.example.com/api"]),
    ("input.path", "https://acct.blob.core.windows.net/c/events.json?sv=2022-11-02&ss=b&sig=AbC%2Bsas%3D&se=2030",
     ["AbC%2Bsas%3D"], ["acct.blob.core.windows.net/c/events.json", "sv=2022-11-02"]),
    ("input.path", "https://b.s3.amazonaws.com/e.csv?X-Amz-Credential=ASIAY34FZKBOKMUTVV7A%2F20240101"
                   "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE&X-Amz-Signature=ab12cd34",
     ["ASIAY34FZKBOKMUTVV7A", "IQoJb3JpZ2luX2VjEXAMPLE", "ab12cd34"], ["b.s3.amazonaws.com/e.csv"]),
    ("spark.conf.spark.hadoop.fs.azure.sas.fixed.token", "sv=2022&sig=abc", ["sig=abc"], []),
    ("input.options.connection", "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=QWNjb3VudEtleQ==;",
     ["QWNjb3VudEtleQ"], ["AccountName=acct"]),
    ("notes", "curl -H 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig' https://api", ["eyJhbGciOiJIUzI1NiJ9"],
     []),
]

HARMLESS = {
    "input.path": "/data/events/2026-10",
    "output.root": "abfss://segments@shopdata.dfs.core.windows.net/out",  # a container, not user info
    "input.columns.session_id": "user_session",
    "spark.conf.spark.sql.shuffle.partitions": "200",
    "spark.conf.spark.sql.sources.partitionKey": "user_id",
    "streaming.partition_key": "user_id",
    "privacy.key_env": "SEGSPARK_PSEUDONYM_KEY",
    "privacy.secret_scope": "segspark",
    "privacy.secret_key": "pseudonym-key",
    "spark.conf.hadoop.security.credential.provider.path": "jceks://hdfs/keys/s3.jceks",
    "models.kmeans.k": 6,
    "models.autoencoder.hidden_layers": [64, 32],
    "models.hdbscan.min_cluster_share": 0.02,
    "model": "ae_hdbscan",
    "mlflow.tracking_uri": "databricks",
}


def nest(key: str, value):
    """`spark.conf.fs.s3a.access.key` -> {"spark": {"conf": {"fs.s3a.access.key": value}}}: sections,
    then a free-form key holding dots (as spark.conf and input.options do)."""
    parts = key.split(".", 2)
    inner = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        inner = {part: inner}
    return inner


@pytest.mark.parametrize(("key", "value", "secrets", "kept"), SHAPES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SHAPES)])
def test_real_world_secret_shapes_are_redacted_where_harmless_parts_stay(key, value, secrets, kept):
    # As a config value under its key: nested as in the config, and flat as MLflow params are.
    for shown in (json.dumps(redact({key: value})), json.dumps(redact(nest(key, value)))):
        assert not any(secret in shown for secret in secrets), shown
    # As free text (an error message quoting it): the value's shape alone must give the secret away,
    # unless only its key marks it (a bare key has no shape).
    text = redact_text(f"error: cannot open {value} (retrying)")
    if not is_secret_key(key):
        assert not any(secret in text for secret in secrets), text
    for part in kept:
        assert part in text, text


def test_nested_mappings_and_lists_keep_harmless_values_readable():
    config = {**HARMLESS, "db": {"password": "p@ss", "port": 5432, "tls": {"client_key": "-k-", "enabled": True}},
              "endpoints": ["https://u:list-pass@h1/x", "/local/path"], "tokens": ["t-one", "t-two"]}
    shown = redact(config)
    assert shown["db"] == {"password": MASK, "port": 5432, "tls": {"client_key": MASK, "enabled": True}}
    assert shown["endpoints"] == ["https://***@h1/x", "/local/path"]
    assert shown["tokens"] == [MASK, MASK]
    for key, value in HARMLESS.items():
        assert shown[key] == value, key
    assert redact({"password": None, "token": ""}) == {"password": None, "token": ""}  # no secret set: shown so


def test_the_key_rule():
    for key in ("fs.s3a.access.key", "fs.azure.account.key.acct.blob.core.windows.net", "a.b.private.key",
                "kafka.sasl.jaas.config", "clientSecret", "AWS_SECRET_ACCESS_KEY", "api_key", "apiKey",
                "kafka.ssl.keystore.key", "spark.authenticate.secret", "X-Amz-Signature"):
        assert is_secret_key(key), key
    for key in ("partition_key", "sort_key", "key", "privacy.key_env", "privacy.secret_scope", "privacy.secret_key",
                "bundle.signing_key_env", "spark.ssl.keyStore", "spark.authenticate.secret.file", "session_id",
                "hadoop.security.credential.provider.path", "spark.kubernetes.authenticate.oauthTokenFile"):
        assert not is_secret_key(key), key


def test_resolved_config_log_line_holds_no_secret(caplog):
    caplog.set_level("DEBUG", logger="segspark.config")
    load_config(REPO / "conf/local.yaml", [
        "spark.remote=sc://h:15002/;token=connect-tok-1", "spark.conf.fs.s3a.secret.key=s3-secret-1",
        "input.options.kafka.sasl.jaas.config=x required password=\"jaas-pass-1\";",
        "mlflow.tracking_uri=https://u:tracking-pass-1@mlflow/",
    ])
    logged = next(r.getMessage() for r in caplog.records if "resolved config" in r.getMessage())
    for secret in ("connect-tok-1", "s3-secret-1", "jaas-pass-1", "tracking-pass-1"):
        assert secret not in logged
    assert "sc://h:15002/;token=***" in logged and '"fs.s3a.secret.key": "***"' in logged


def test_report_configuration_table_is_redacted():
    from segspark.report import data
    from segspark.report.html import Table, render_page
    from segspark.report.sections import ReportContext, run_section

    cfg = load_config(REPO / "conf/local.yaml", ["spark.conf.fs.s3a.secret.key=s3-secret-2",
                                                 "spark.remote=sc://h:15002/;token=connect-tok-2"])
    run = data.RunRecord(**{name: None for name in data.RunRecord.__dataclass_fields__} | {
        "run_id": "r1", "status": "failed", "config_hash": cfg.config_hash(),
        "metrics": {"error": "ConnectError: sc://h:15002/;token=connect-tok-2 refused"}})
    ctx = ReportContext(spark=None, output=cfg.output, run=run, config_hash=cfg.config_hash(),
                        profiles=pd.DataFrame({"model": []}), selection=pd.DataFrame({"model": [], "chosen": []}),
                        settings=cfg.redacted())
    section = run_section(ctx)
    text = json.dumps([[list(map(str, row)) for row in b.rows] for b in section.blocks if isinstance(b, Table)])
    assert "s3-secret-2" not in text and "connect-tok-2" not in text
    assert "spark.conf.fs.s3a.secret.key" in text and "models.selection.k_min" in text
    page = render_page("report", "", [section], dt.datetime.now(dt.UTC))
    assert "s3-secret-2" not in page and "connect-tok-2" not in page and "spark.conf.fs.s3a.secret.key" in page


def test_cli_error_lines_are_redacted(spark, capsys, tmp_path):
    from segspark.cli import main

    # The error names the input path, which here carries a (Hive-style) token: printed redacted.
    missing = tmp_path / "exports" / "token=cli-tok-1" / "events"
    code = main(["features", "--config", str(REPO / "conf/local.yaml"), "--set", f"input.path={missing}",
                 f"output.root={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no parquet data found" in err and "token=***" in err and "cli-tok-1" not in err
    # The failed run's recorded error (runs.metrics, shown by the report) is redacted the same way.
    [run] = DeltaTable(str(tmp_path / "out" / "runs")).to_pyarrow_table().to_pylist()
    assert run["status"] == "failed" and "token=***" in run["metrics"] and "cli-tok-1" not in run["metrics"]

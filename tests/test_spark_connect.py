"""Spark Connect (Databricks serverless and shared clusters): no SparkContext, no JVM on the client.

A real Spark Connect server is started from the pyspark installation on loopback; the CLI runs as a
client in a subprocess (a Connect client switches the whole process into Connect mode, so it cannot
share the test process with the suite's classic session). The whole pipeline runs over it: ingest,
features, the MLlib sweeps, the autoencoder + HDBSCAN scoring in mapInArrow, the embedded Delta
committer; then `segspark score` applies the bundle over Connect too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.find_spark_home import _find_spark_home

from segspark.ingest.privacy import pseudonym_of

from .conftest import FAST_MODELS, REPO

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    spark_home = _find_spark_home()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("connect") / "server.log"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_HOME": spark_home}
    command = [
        os.path.join(spark_home, "bin", "spark-submit"), "--master", "local[2]", "--driver-memory", "2g",
        "--class", SERVER_CLASS,
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false", "--conf", "spark.log.level=WARN",
        "--conf", "spark.sql.shuffle.partitions=4",
        "spark-internal",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"Spark Connect server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"Spark Connect server did not listen on 127.0.0.1:{port}:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"sc://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "PYSPARK_GATEWAY_PORT")}
    return subprocess.run([sys.executable, "-m", "segspark", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=1200)


def _source_ids(sample) -> set:
    return set(pq.read_table(str(sample / "events"), columns=["user_id"]).column("user_id").to_pylist())


def _segments(root, run_id: str) -> dict[tuple[str, str], int]:
    table = DeltaTable(str(root / "user_segments")).to_pyarrow_table(
        columns=["user_id", "model", "segment", "run_id"]
    )
    table = table.filter(pc.equal(table["run_id"], run_id))
    rows = table.to_pylist()
    keyed = {(str(r["user_id"]), r["model"]): r["segment"] for r in rows}
    assert len(keyed) == len(rows), "one row per user and model"
    return keyed


def test_pipeline_and_scoring_run_over_spark_connect(connect_url, sample_parquet, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # Pseudonymised ids: the HMAC's Spark expressions run on the server, the same in training and scoring.
    monkeypatch.setenv("SEGSPARK_PSEUDONYM_KEY", "connect-test-key-0123456789")
    common = [f"input.path={sample_parquet}/events", f"output.root={out}", "privacy.pseudonymise_user_id=true"]
    # A URL parameter the client sends as a gRPC header (as ;token= would, which needs TLS): never logged.
    remote = f"spark.remote={connect_url}/;x-api-token=connect-header-secret"
    trained = _cli("run", "--config", "conf/local.yaml", "--run-id", "connect-train", "--set", remote, *common,
                   *FAST_MODELS)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert f"connected to Spark Connect server {connect_url}/;x-api-token=***" in trained.stderr
    assert "connect-header-secret" not in trained.stderr + trained.stdout
    common.append(f"spark.remote={connect_url}")
    assert "run connect-train succeeded" in trained.stdout

    segments = _segments(out, "connect-train")
    models = {model for _, model in segments}
    assert models == {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"}
    users = {user for user, _ in segments}
    assert len(segments) == 4 * len(users)
    key = b"connect-test-key-0123456789"
    assert users <= {pseudonym_of(str(u), key) for u in _source_ids(sample_parquet)}
    embeddings = DeltaTable(str(out / "user_embeddings")).to_pyarrow_table(columns=["user_id", "embedding"])
    assert embeddings.num_rows == len(users)
    runs = DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist()
    assert [(r["run_id"], r["status"]) for r in runs] == [("connect-train", "succeeded")]
    assert runs[0]["input_rows"] == runs[0]["clean_rows"] + runs[0]["quarantined_rows"]

    # The bundle applied over Connect to the same events gives every user the same segment.
    bundle = out / "_models" / "connect-train"
    scored = _cli("score", "--config", "conf/local.yaml", "--bundle", str(bundle), "--run-id", "connect-score",
                  "--set", *common)
    assert scored.returncode == 0, scored.stderr[-4000:]
    assert _segments(out, "connect-score") == segments

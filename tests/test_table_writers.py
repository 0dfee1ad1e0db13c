"""Every write policy of the catalog, through every Delta writer this session has: the embedded
committer always, the Delta Spark connector where it is on the classpath. The same tests for both;
results are read back with delta-rs (and through `read_output_table`)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from deltalake import DeltaTable

from segspark.config import OutputConfig
from segspark.io.catalog import TABLES, RunRow, StreamBatchRow
from segspark.io.delta import CONNECTOR, EMBEDDED, table_writers
from segspark.io.tables import committed_version, read_output_table, table_path, write_rows
from segspark.runtime.session import has_delta_connector

from .conftest import start_process_session

AT = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def pytest_generate_tests(metafunc):
    # Which writers exist is a property of the session's classpath, known only once it runs: the
    # test process's session is started here, at collection, as the `spark` fixture starts it
    # (conftest), which then gets this same session. A missing connector is left out, not collected
    # as a skipped or a passing test.
    if "writer" in metafunc.fixturenames:
        metafunc.parametrize("writer", table_writers(start_process_session()))


def test_the_embedded_committer_is_always_a_writer(spark):
    assert table_writers(spark)[0] == EMBEDDED
    assert (CONNECTOR in table_writers(spark)) == has_delta_connector(spark)


def _out(tmp_path) -> OutputConfig:
    return OutputConfig(root=str(tmp_path / "out"))


def _delta(out: OutputConfig, name: str) -> DeltaTable:
    return DeltaTable(table_path(out, name))


def _run(run_id: str, status: str, users: int) -> RunRow:
    return RunRow(run_id, AT, AT, status, "hash", dt.date(2026, 3, 1), 10, 9, 1, users, "{}")


def test_replace_run_rows(spark, tmp_path, writer):
    out = _out(tmp_path)
    for row in (_run("r1", "failed", 1), _run("r2", "succeeded", 2), _run("r1", "succeeded", 3)):
        written = write_rows(spark, out, "runs", [row], row.run_id, writer=writer)
        assert not written.skipped
    table = _delta(out, "runs")
    data = table.to_pandas().sort_values("run_id")
    assert data[["run_id", "status", "users"]].values.tolist() == [["r1", "succeeded", 3], ["r2", "succeeded", 2]]
    assert table.version() == 2 and list(table.metadata().partition_columns) == []
    types = {f.name: f.type for f in pa.schema(table.schema().to_arrow())}
    assert types["started_at"] == pa.timestamp("us", tz="UTC") and types["as_of"] == pa.date32()
    assert list(types) == TABLES["runs"].schema.names
    back = read_output_table(spark, out, "runs").orderBy("run_id").collect()
    assert [(r.run_id, r.users) for r in back] == [("r1", 3), ("r2", 2)]


def test_replace_run_rows_with_txn_skips_a_replay(spark, tmp_path, writer):
    out = _out(tmp_path)
    rows = spark.createDataFrame([("app-0", "src", "bad_time", "{}", AT)] * 2, TABLES["quarantine"].schema)
    first = write_rows(spark, out, "quarantine", rows, "app-0", txn=("app.quarantine", 0), writer=writer)
    replay = write_rows(spark, out, "quarantine", rows, "app-0", txn=("app.quarantine", 0), writer=writer)
    assert not first.skipped and replay.skipped
    assert len(_delta(out, "quarantine").to_pandas()) == 2
    assert committed_version(out, "quarantine", "app.quarantine") == 0


def test_append_with_txn(spark, tmp_path, writer):
    out = _out(tmp_path)
    spec = TABLES["stream_batches"]
    app = spec.txn_app("app")
    assert committed_version(out, spec, app) is None  # no table yet

    def batch(batch_id: int) -> StreamBatchRow:
        return StreamBatchRow("app", batch_id, dt.date(2026, 3, 1), 5, 4, 1, 3, False, [], 0.5, "{}", AT, "q")

    assert not write_rows(spark, out, spec, [batch(0)], txn=(app, 0), writer=writer).skipped
    assert write_rows(spark, out, spec, [batch(0)], txn=(app, 0), writer=writer).skipped  # a replayed batch
    assert not write_rows(spark, out, spec, [batch(1)], txn=(app, 1), writer=writer).skipped
    assert sorted(_delta(out, spec.name).to_pandas()["batch_id"]) == [0, 1]
    assert committed_version(out, spec, app) == 1
    assert committed_version(out, spec, "other.stream_batches") is None


def test_replace_partitions_with_txn(spark, tmp_path, writer):
    out = _out(tmp_path)
    spec = TABLES["stream_feature_state"]
    (bucket,) = spec.partition_by
    schema = f"user_id string, events long, {bucket} int"
    app = spec.txn_app("app")
    first = spark.createDataFrame([("a", 1, 0), ("b", 1, 1), ("c", 1, 1)], schema)
    write_rows(spark, out, spec, first, partitions=[0, 1], txn=(app, 0), writer=writer)
    # Batch 1 touches bucket 1 only: its rows replace that bucket's, bucket 0 stays.
    second = spark.createDataFrame([("b", 2, 1), ("d", 1, 1)], schema)
    write_rows(spark, out, spec, second, partitions=[1], txn=(app, 1), writer=writer)
    assert write_rows(spark, out, spec, second, partitions=[1], txn=(app, 1), writer=writer).skipped
    table = _delta(out, spec.name)
    assert list(table.metadata().partition_columns) == [bucket]
    data = table.to_pandas().sort_values("user_id")
    assert data[["user_id", "events", bucket]].values.tolist() == [["a", 1, 0], ["b", 2, 1], ["d", 1, 1]]
    assert committed_version(out, spec, app) == 1
    # No partitions: the rows are appended (a stream batch's new state rows), once per txn.
    third = spark.createDataFrame([("a", 3, 0)], schema)
    assert not write_rows(spark, out, spec, third, partitions=[], txn=(app, 2), writer=writer).skipped
    assert write_rows(spark, out, spec, third, partitions=[], txn=(app, 2), writer=writer).skipped
    data = _delta(out, spec.name).to_pandas().sort_values(["user_id", "events"])
    assert data[["user_id", "events"]].values.tolist() == [["a", 1], ["a", 3], ["b", 2], ["d", 1]]
    assert committed_version(out, spec, app) == 2
    back = read_output_table(spark, out, spec).where(f"{bucket} = 1").orderBy("user_id").collect()
    assert [(r.user_id, r.events) for r in back] == [("b", 2), ("d", 1)]

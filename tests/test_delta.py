"""Delta tables through the embedded committer (no Delta Spark connector here): real Spark writes,
real delta-rs commits, tables read back with delta-rs itself."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from segspark.io.delta import (
    CHECKPOINT_INTERVAL,
    STAGE_PREFIX,
    _sql_predicate,
    read_table,
    table_exists,
    write_table,
)
from segspark.runtime.session import has_delta_connector

SCHEMA = "run_id string, user_id long, amount double, ts timestamp, day date"
UTC = dt.UTC


@pytest.fixture(autouse=True)
def _embedded(spark):
    if has_delta_connector(spark):
        pytest.skip("these tests exercise the embedded committer; the Delta connector is on the classpath")


def rows(run_id: str, n: int, start: int = 0):
    base = dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    return [
        (
            run_id,
            start + i,
            float(i) + 0.5,
            base + dt.timedelta(hours=i, microseconds=i),
            dt.date(2024, 3, 1 + i),
        )
        for i in range(n)
    ]


def frame(spark, data, schema=SCHEMA, parts=1):
    return spark.createDataFrame(data, schema).coalesce(parts)


def log_actions(path, version: int) -> list[dict]:
    with open(os.path.join(path, "_delta_log", f"{version:020d}.json")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def stage_dirs(path) -> list[str]:
    return sorted(d for d in os.listdir(path) if d.startswith(STAGE_PREFIX))


def run_counts(path) -> dict[str, int]:
    return DeltaTable(str(path)).to_pandas()["run_id"].value_counts().to_dict()


def test_create_append_schema_and_counts(spark, tmp_path):
    path = str(tmp_path / "t")
    assert not table_exists(path)
    first = write_table(spark, frame(spark, rows("r1", 3), parts=2), path)
    assert (first.version, first.rows, first.skipped) == (0, 3, False)
    assert first.files >= 1
    assert table_exists(path)
    second = write_table(spark, frame(spark, rows("r2", 2, start=10)), path)
    assert (second.version, second.files, second.rows) == (1, 1, 2)

    table = DeltaTable(path)
    assert table.version() == 1
    types = {f.name: f.type for f in pa.schema(table.schema().to_arrow())}
    assert types == {
        "run_id": pa.string(),
        "user_id": pa.int64(),
        "amount": pa.float64(),
        "ts": pa.timestamp("us", tz="UTC"),
        "day": pa.date32(),
    }
    data = table.to_pandas().sort_values("user_id")
    assert data["user_id"].tolist() == [0, 1, 2, 10, 11]
    assert data["run_id"].tolist() == ["r1", "r1", "r1", "r2", "r2"]
    # Spark's by-products are gone: no _SUCCESS, no Hadoop .crc files beside the data
    leftovers = [
        name
        for d in stage_dirs(path)
        for name in os.listdir(os.path.join(path, d))
        if not name.endswith(".parquet")
    ]
    assert leftovers == []


def test_column_order_follows_the_table(spark, tmp_path):
    path = str(tmp_path / "t")
    write_table(spark, frame(spark, rows("r1", 2)), path)
    swapped = frame(spark, rows("r2", 1)).select("day", "ts", "amount", "user_id", "run_id")
    write_table(spark, swapped, path)
    assert DeltaTable(path).to_pandas().columns.tolist() == ["run_id", "user_id", "amount", "ts", "day"]
    assert run_counts(path) == {"r1": 2, "r2": 1}


def test_file_statistics(spark, tmp_path):
    path = str(tmp_path / "t")
    data = rows("r1", 4) + [("r1", 99, None, None, None)]
    write_table(spark, frame(spark, data), path)
    adds = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
    assert len(adds) == 1
    add = adds[0]
    assert add["num_records"] == 5
    assert (add["min.user_id"], add["max.user_id"]) == (0, 99)
    assert (add["min.amount"], add["max.amount"]) == (0.5, 3.5)
    assert (add["min.run_id"], add["max.run_id"]) == ("r1", "r1")
    assert (add["min.day"], add["max.day"]) == (dt.date(2024, 3, 1), dt.date(2024, 3, 4))
    assert add["min.ts"] == dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert add["max.ts"] == dt.datetime(2024, 3, 1, 15, 0, 0, 123459, tzinfo=UTC)
    assert (add["null_count.amount"], add["null_count.user_id"]) == (1, 0)
    # the log itself: Delta's timestamp format, ISO-8601 with microseconds and Z
    stats = json.loads(next(a["add"]["stats"] for a in log_actions(path, 0) if "add" in a))
    assert stats["minValues"]["ts"] == "2024-03-01T12:00:00.123456Z"
    assert stats["maxValues"]["day"] == "2024-03-04"


def test_timestamps_round_trip_as_utc_microseconds(spark, tmp_path):
    path = str(tmp_path / "t")
    stamps = [
        dt.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        dt.datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    write_table(
        spark, spark.createDataFrame([(i, s) for i, s in enumerate(stamps)], "i int, ts timestamp"), path
    )
    table = DeltaTable(path).to_pyarrow_table().sort_by("i")
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert table.column("ts").to_pylist() == stamps
    back = read_table(spark, path).orderBy("i").toPandas()  # the session is in UTC
    assert [t.to_pydatetime().replace(tzinfo=UTC) for t in back["ts"]] == stamps


def test_replace_where_rerun_replaces_and_keeps_other_runs(spark, tmp_path):
    path = str(tmp_path / "t")
    assert write_table(spark, frame(spark, rows("r1", 3)), path, replace_where={"run_id": "r1"}).version == 0
    assert write_table(spark, frame(spark, rows("r2", 2)), path, replace_where={"run_id": "r2"}).version == 1
    again = write_table(spark, frame(spark, rows("r1", 4), parts=2), path, replace_where={"run_id": "r1"})
    assert (again.version, again.rows) == (2, 4)
    assert run_counts(path) == {"r1": 4, "r2": 2}
    write_table(spark, frame(spark, rows("r1", 4)), path, replace_where={"run_id": "r1"})
    assert run_counts(path) == {"r1": 4, "r2": 2}

    history = DeltaTable(path).history()
    assert len(history) == 4  # one commit per write
    removed = [a["remove"] for a in log_actions(path, 2) if "remove" in a]
    assert len(removed) == 1 and removed[0]["path"].startswith(STAGE_PREFIX)


def test_replace_where_on_partitioned_table(spark, tmp_path):
    path = str(tmp_path / "t")
    odd = "run 1:a/b%c"  # needs escaping in folder names and percent-encoding in the log
    write_table(
        spark, frame(spark, rows(odd, 3)), path, replace_where={"run_id": odd}, partition_by=["run_id"]
    )
    write_table(
        spark, frame(spark, rows("r2", 2)), path, replace_where={"run_id": "r2"}, partition_by=["run_id"]
    )
    write_table(spark, frame(spark, rows(odd, 1)), path, replace_where={"run_id": odd})  # partitioning kept
    table = DeltaTable(path)
    assert table.metadata().partition_columns == ["run_id"]
    assert run_counts(path) == {odd: 1, "r2": 2}
    adds = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert sorted(a["partition.run_id"] for a in adds) == sorted([odd, "r2"])
    assert [c for c in read_table(spark, path).columns] == ["run_id", "user_id", "amount", "ts", "day"]
    assert {r["run_id"]: r["count"] for r in read_table(spark, path).groupBy("run_id").count().collect()} == {
        odd: 1,
        "r2": 2,
    }


def test_replace_where_one_of_several_values(spark, tmp_path):
    """{column: [values]} on a partition column replaces the rows of every listed value in one
    commit (streaming state rewrites the buckets a micro-batch touched)."""
    path = str(tmp_path / "t")
    for run in ("a", "b", "c"):
        write_table(spark, frame(spark, rows(run, 2)), path, replace_where={"run_id": run}, partition_by=["run_id"])
    both = frame(spark, rows("a", 3) + rows("c", 1), parts=2)
    result = write_table(spark, both, path, replace_where={"run_id": ["c", "a"]})
    assert (result.version, result.rows) == (3, 4)
    assert run_counts(path) == {"a": 3, "b": 2, "c": 1}
    # Read back through the file list: one scan per write folder (2 here, for 3 partitions).
    back = read_table(spark, path)
    assert back.columns == ["run_id", "user_id", "amount", "ts", "day"]
    assert {r["run_id"]: r["count"] for r in back.groupBy("run_id").count().collect()} == {"a": 3, "b": 2, "c": 1}
    assert sorted(back.where("run_id = 'a'").select("user_id").toPandas().user_id) == [0, 1, 2]
    with pytest.raises(ValueError, match="non-empty list"):
        write_table(spark, both, path, replace_where={"run_id": []})
    unpartitioned = str(tmp_path / "u")
    write_table(spark, frame(spark, rows("a", 2)), unpartitioned)
    with pytest.raises(ValueError, match="partition column"):
        write_table(spark, both, unpartitioned, replace_where={"run_id": ["a", "c"]})


def test_replace_where_refuses_files_it_cannot_replace_whole(spark, tmp_path):
    path = str(tmp_path / "t")
    write_table(spark, frame(spark, rows("r1", 2) + rows("r2", 2)), path)  # one file, two runs
    with pytest.raises(ValueError, match=r"may hold both.*run_id from 'r1' to 'r2'"):
        write_table(spark, frame(spark, rows("r1", 1)), path, replace_where={"run_id": "r1"})
    assert len(stage_dirs(path)) == 1  # refused before writing anything
    # the DataFrame must hold only the replaced rows
    with pytest.raises(ValueError, match="filter the DataFrame"):
        write_table(spark, frame(spark, rows("r3", 1) + rows("r4", 1)), path, replace_where={"run_id": "r3"})
    assert len(stage_dirs(path)) == 1
    assert DeltaTable(path).version() == 0
    assert run_counts(path) == {"r1": 2, "r2": 2}


def test_txn_replay_is_skipped(spark, tmp_path):
    path = str(tmp_path / "t")
    first = write_table(spark, frame(spark, rows("r1", 2)), path, txn=("stream-a", 1))
    assert (first.version, first.skipped) == (0, False)
    assert DeltaTable(path).transaction_version("stream-a") == 1
    for replay in (1, 0):
        result = write_table(spark, frame(spark, rows("r1", 2)), path, txn=("stream-a", replay))
        assert result.skipped and result.version is None and result.files == 0
    assert len(stage_dirs(path)) == 1  # nothing was written for the replays
    nxt = write_table(spark, frame(spark, rows("r2", 1)), path, txn=("stream-a", 2))
    assert (nxt.version, nxt.skipped) == (1, False)
    other = write_table(spark, frame(spark, rows("r3", 1)), path, txn=("stream-b", 1))
    assert other.version == 2
    table = DeltaTable(path)
    assert (table.transaction_version("stream-a"), table.transaction_version("stream-b")) == (2, 1)
    assert run_counts(path) == {"r1": 2, "r2": 1, "r3": 1}


def test_every_tenth_version_gets_a_checkpoint_that_keeps_the_rows_and_the_txn(spark, tmp_path):
    """A stream commits to each of its tables once per batch: every CHECKPOINT_INTERVAL-th version is
    checkpointed, so that opening the table does not replay all of its commits (delta-rs alone
    writes one every 100). The rows, the writer's txn and a replay's skip survive the checkpoint."""
    path = str(tmp_path / "t")
    arrow_rows = pa.table({"batch": pa.array([0], pa.int64())})
    for batch in range(2 * CHECKPOINT_INTERVAL + 1):  # versions 0..20; Arrow rows: no Spark job each
        result = write_table(spark, arrow_rows.set_column(0, "batch", pa.array([batch], pa.int64())), path,
                             txn=("stream-a.live", batch))
        assert result.version == batch
    log_files = os.listdir(os.path.join(path, "_delta_log"))
    assert sorted(f for f in log_files if "checkpoint.parquet" in f) == [
        f"{v:020d}.checkpoint.parquet" for v in (CHECKPOINT_INTERVAL, 2 * CHECKPOINT_INTERVAL)]
    with open(os.path.join(path, "_delta_log", "_last_checkpoint")) as fh:
        assert json.load(fh)["version"] == 2 * CHECKPOINT_INTERVAL
    table = DeltaTable(path)
    assert table.transaction_version("stream-a.live") == 2 * CHECKPOINT_INTERVAL
    assert sorted(table.to_pandas()["batch"]) == list(range(2 * CHECKPOINT_INTERVAL + 1))
    assert sorted(r.batch for r in read_table(spark, path).collect()) == list(range(2 * CHECKPOINT_INTERVAL + 1))
    replay = write_table(spark, arrow_rows, path, txn=("stream-a.live", 2 * CHECKPOINT_INTERVAL))
    assert replay.skipped and DeltaTable(path).version() == 2 * CHECKPOINT_INTERVAL


def test_schema_mismatch_is_refused_and_table_stays_readable(spark, tmp_path):
    path = str(tmp_path / "t")
    write_table(spark, frame(spark, rows("r1", 2)), path)
    wrong = frame(spark, rows("r2", 1)).withColumn("amount", spark_col("amount").cast("string"))
    with pytest.raises(
        ValueError, match=r"column 'amount' is string in the DataFrame, expected double"
    ) as err:
        write_table(spark, wrong, path)
    assert path in str(err.value)
    assert stage_dirs(path) and len(stage_dirs(path)) == 1
    assert DeltaTable(path).to_pandas().shape == (2, 5)
    assert read_table(spark, path).count() == 2


def test_new_nullable_columns_are_added_to_the_table(spark, tmp_path):
    """A newer segspark writes a column an older table lacks: the commit adds it to the schema, the
    old rows read it as null, and every other difference is still refused."""
    path = str(tmp_path / "t")
    write_table(spark, frame(spark, rows("r1", 2)), path, replace_where={"run_id": "r1"})
    newer = frame(spark, rows("r2", 3)).withColumn("dunn", spark_col("amount") * 2)
    result = write_table(spark, newer, path, replace_where={"run_id": "r2"})
    # The schema change is its own commit (ALTER TABLE ADD COLUMNS), then the rows.
    assert result.version == 2
    assert any("metaData" in action for action in log_actions(path, 1))
    assert any("add" in action for action in log_actions(path, 2))
    table = DeltaTable(path)
    assert table.schema().to_arrow().names == ["run_id", "user_id", "amount", "ts", "day", "dunn"]
    back = table.to_pandas().sort_values(["run_id", "user_id"])
    assert back[back.run_id == "r1"].dunn.isna().all()
    assert back[back.run_id == "r2"].dunn.tolist() == [1.0, 3.0, 5.0]
    assert read_table(spark, path).where("dunn IS NULL").count() == 2
    # Once added, the column is part of the table: a writer without it (an older version) is refused.
    older = frame(spark, rows("r1", 2))
    with pytest.raises(ValueError, match=r"column 'dunn' is missing from the DataFrame"):
        write_table(spark, older, path, replace_where={"run_id": "r1"})


def test_int96_timestamps_are_refused(spark, tmp_path):
    key = "spark.sql.parquet.outputTimestampType"
    previous = spark.conf.get(key)
    spark.conf.set(key, "INT96")
    try:
        with pytest.raises(ValueError, match="outputTimestampType is INT96"):
            write_table(spark, frame(spark, rows("r1", 1)), str(tmp_path / "t"))
    finally:
        spark.conf.set(key, previous)
    assert not table_exists(str(tmp_path / "t"))


def test_read_table_unpartitioned_partitioned_and_empty(spark, tmp_path):
    plain, parted, empty = (str(tmp_path / n) for n in ("plain", "parted", "empty"))
    write_table(spark, frame(spark, rows("r1", 3), parts=2), plain)
    got = read_table(spark, plain)
    assert got.schema == spark.createDataFrame([], SCHEMA).schema
    assert sorted(r["user_id"] for r in got.collect()) == [0, 1, 2]

    null_day = ("r1", 7, 1.0, None, None)  # a null partition value: __HIVE_DEFAULT_PARTITION__ on disk
    write_table(spark, frame(spark, [*rows("r1", 3), null_day]), parted, partition_by=["run_id", "day"])
    assert DeltaTable(parted).to_pandas().shape == (4, 5)
    got = read_table(spark, parted)
    assert got.columns == ["run_id", "user_id", "amount", "ts", "day"]
    assert sorted((r["user_id"], r["day"], r["run_id"]) for r in got.collect()) == [
        (0, dt.date(2024, 3, 1), "r1"),
        (1, dt.date(2024, 3, 2), "r1"),
        (2, dt.date(2024, 3, 3), "r1"),
        (7, None, "r1"),
    ]

    result = write_table(spark, frame(spark, []), empty)
    assert (result.version, result.files, result.rows) == (0, 0, 0)
    assert DeltaTable(empty).to_pyarrow_table().num_rows == 0
    got = read_table(spark, empty)
    assert got.count() == 0 and got.columns == ["run_id", "user_id", "amount", "ts", "day"]
    assert dict(got.dtypes)["ts"] == "timestamp"
    write_table(spark, frame(spark, []), str(tmp_path / "empty_parted"), partition_by=["run_id"])
    assert read_table(spark, str(tmp_path / "empty_parted")).count() == 0


def test_reads_and_appends_to_a_table_written_by_delta_rs(spark, tmp_path):
    path = str(tmp_path / "t")
    write_deltalake(
        path, pa.table({"k": ["a b:c%d", "x"], "n": pa.array([1, 2], pa.int64())}), partition_by=["k"]
    )
    assert sorted((r["k"], r["n"]) for r in read_table(spark, path).collect()) == [("a b:c%d", 1), ("x", 2)]
    write_table(spark, spark.createDataFrame([("x", 3)], "k string, n long"), path, replace_where={"k": "x"})
    assert sorted(DeltaTable(path).to_pandas().itertuples(index=False)) == [("a b:c%d", 1), ("x", 3)]


def test_connector_replace_where_predicate():
    predicate = _sql_predicate({"run_id": "r'1", "as_of": dt.date(2024, 1, 2), "n": 3, "ok": True})
    assert predicate == "`run_id` = 'r\\'1' AND `as_of` = DATE'2024-01-02' AND `n` = 3 AND `ok` = true"


def spark_col(name):
    from pyspark.sql import functions as F

    return F.col(name)


def test_nested_and_vector_columns_are_stored_without_stats(spark, tmp_path):
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql import types as T

    path = str(tmp_path / "t")
    df = spark.createDataFrame(
        [
            (1, [0.5, 1.5], {"a": 1.0}, Vectors.dense([1.0, 2.0])),
            (2, None, {}, Vectors.sparse(2, [1], [3.0])),
        ],
        T.StructType(
            [
                T.StructField("id", T.IntegerType()),
                T.StructField("emb", T.ArrayType(T.DoubleType())),
                T.StructField("m", T.MapType(T.StringType(), T.DoubleType())),
                T.StructField("v", VectorUDT()),
            ]
        ),
    ).coalesce(1)
    write_table(spark, df, path)
    write_table(spark, df, path)  # same schema again: the vector's stored struct matches the table
    table = DeltaTable(path)
    assert table.to_pyarrow_table().num_rows == 4
    add = pa.table(table.get_add_actions(flatten=True)).to_pylist()[0]
    assert (add["min.id"], add["max.id"]) == (1, 2)
    stats = json.loads(next(a["add"]["stats"] for a in log_actions(path, 0) if "add" in a))
    assert list(stats["minValues"]) == list(stats["maxValues"]) == ["id"]
    back = read_table(spark, path).where("id = 1").first()
    assert back["emb"] == [0.5, 1.5] and back["v"]["values"] == [1.0, 2.0]


def test_catalog_names_are_quoted_and_need_a_schema():
    from segspark.config import OutputConfig
    from segspark.errors import ConfigError
    from segspark.io.delta import is_catalog_name
    from segspark.io.tables import table_path

    name = table_path(OutputConfig(root="/x", catalog="main", schema="crm"), "user_segments")
    assert name == "`main`.`crm`.`user_segments`" and is_catalog_name(name)
    assert table_path(OutputConfig(root="/x", schema="odd`name"), "runs") == "`odd``name`.`runs`"
    assert table_path(OutputConfig(root="/x/"), "runs") == "/x/runs" and not is_catalog_name("/x/runs")
    with pytest.raises(ConfigError, match="needs output.schema"):
        table_path(OutputConfig(root="/x", catalog="main"), "runs")


def test_catalog_table_without_the_connector_is_refused(spark):
    from segspark.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the Delta Spark connector"):
        write_table(spark, spark.range(1), "`main`.`crm`.`t`")


def test_a_writer_that_loses_the_creation_race_commits_on_the_winners_table(spark, tmp_path):
    """Two writers create one new table: the one that commits second reads the table the first
    created, re-checks it and commits its own files: both runs land once."""
    from segspark.io import delta

    path = str(tmp_path / "t")
    competitor = {"run": "other", "rows": frame(spark, rows("other", 2, start=100))}

    class Racing(delta._Committer):
        raced = False

        def _commit(self, table, removes, adds):
            if not Racing.raced:  # the other writer creates the table while this one writes its files
                Racing.raced = True
                write_table(spark, competitor["rows"], path, replace_where={"run_id": competitor["run"]})
            return super()._commit(table, removes, adds)

    result = Racing(spark, frame(spark, rows("mine", 3)), path, {"run_id": "mine"}, None, None).run()
    assert Racing.raced and result.version == 1
    assert run_counts(path) == {"other": 2, "mine": 3}
    # The same writer against the same run id: the later commit replaces, nothing is duplicated.
    again = Racing(spark, frame(spark, rows("mine", 4)), path, {"run_id": "mine"}, None, None)
    Racing.raced = False
    competitor.update(run="mine", rows=frame(spark, rows("mine", 5, start=200)))  # a concurrent rerun of "mine"
    again.run()
    assert run_counts(path) == {"other": 2, "mine": 4}

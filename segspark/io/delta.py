"""Delta tables: written by the Delta Spark connector when it is on the classpath, otherwise by the
embedded committer (Spark writes Parquet, the driver commits it with delta-rs).

Embedded committer, one `write_table` call:

1. Checks up front, before any file is written: the session writes microsecond timestamps (not
   INT96), the DataFrame's schema equals the table's, the `txn` was not committed already (then it
   returns `skipped=True`), and every existing file is either wholly inside or wholly outside the
   `replace_where` rows (from partition values, or from min/max/null-count statistics).
2. Spark tasks write Parquet into a fresh folder of the table directory,
   `<table>/write-<utc time>-<id>/[<col>=<value>/...]part-*.parquet` (Hive-style partition folders
   come from Spark's `partitionBy`; partition columns are not stored in the files, as Delta wants).
   Rows built on the driver (a run's record, a sweep's curve, a stream batch's drift) come as an
   Arrow table instead (`io.catalog.Table.arrow`): the driver writes their one file itself, since a
   Spark job for a few rows costs far more than the rows (unpartitioned tables only).
3. The driver lists those files and reads each Parquet footer (never the data) to verify the size
   and schema and to compute the per-file statistics Delta readers use to skip files.
4. One atomic delta-rs commit holds the new files, the removal of the files `replace_where` replaces,
   and the `txn` (app id, version). A failed verification deletes the new folder; a failed commit
   leaves it unreferenced (Delta readers never see it; VACUUM removes it). Every
   `CHECKPOINT_INTERVAL`th version also gets a checkpoint (below).
5. Concurrent writers: when another writer committed to the table first (or created it while this
   one wrote its files), the commit is redone on the new version: the table is read again, the txn,
   the schema and the files `replace_where` replaces are checked again, and the same staged files
   are committed (up to COMMIT_ATTEMPTS times). Two runs writing one output root at once therefore
   each land exactly once; two writers of the same run id leave one copy, the later one's.

Rows are replaced by whole files only; this committer never rewrites a file. A file holding both
rows that match `replace_where` and other rows (for instance after OPTIMIZE merged several runs)
therefore makes the write fail with an explanation instead of deleting or duplicating rows.

Found about delta-rs 1.6: `AddAction.path` takes the file's path as stored (delta-rs percent-encodes
it into the log), `get_add_actions()` returns paths percent-encoded as in the log, and
`RemoveAction.path` is encoded again, so it must be given the decoded path or the remove silently
matches nothing. `create_write_transaction` does not refresh the DeltaTable object it is called on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import reduce
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    RemoveAction,
    Transaction,
    create_table_with_add_actions,
)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from segspark.errors import ConfigError
from segspark.io.delta_files import (
    FileFacts,
    arrow_schema,
    check_timestamp_type,
    classify,
    coerce,
    delta_types,
    describe_facts,
    file_stats,
    partition_string,
    schema_problems,
    table_features,
)
from segspark.runtime.session import has_delta_connector

log = logging.getLogger(__name__)

STAGE_PREFIX = "write-"
WRITE_ID_KEY = "segsparkWriteId"  # commitInfo key that finds our commit's version in the history
COMMIT_ATTEMPTS = 5  # commits tried when other writers keep committing to the same table first
# A checkpoint every this many versions, as Spark's Delta writes them (its delta.checkpointInterval
# default). Opening a table replays every JSON commit since its last checkpoint, and delta-rs's own
# post-commit hook writes one only every 100 versions: a stream commits to each of its tables once
# per batch, so every batch's opens (19 per 10k-event batch) grew slower until the hundredth. Measured
# on a stream's live table: 5.5 ms to open at version 1, 59 ms at version 82, 7.5 ms right after a
# checkpoint at version 90, which took 0.13 s to write.
CHECKPOINT_INTERVAL = 10
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Table features whose rules this committer does not apply (reads: that it cannot read correctly).
WRITE_UNSUPPORTED = {
    "columnMapping",
    "deletionVectors",
    "checkConstraints",
    "generatedColumns",
    "identityColumns",
    "invariants",
    "changeDataFeed",
    "rowTracking",
    "typeWidening",
}
READ_UNSUPPORTED = {"columnMapping", "deletionVectors"}
EMBEDDED, CONNECTOR = "embedded", "connector"  # the writers (`table_writers`)


@dataclass(frozen=True)
class WriteResult:
    path: str
    version: int | None  # table version committed, None when skipped (txn already committed)
    files: int
    rows: int  # sum of numRecords of the files added; -1 if unknown (connector path)
    skipped: bool = False


def is_catalog_name(table: str) -> bool:
    """Tables are given by path, or by a quoted catalog name (`catalog`.`schema`.`table`, see
    `catalog_name`): a path never starts with a backtick."""
    return table.startswith("`")


def catalog_name(*parts: str) -> str:
    """The quoted identifier of a catalog table, e.g. `main`.`crm`.`user_segments`."""
    return ".".join(_quote_name(p) for p in parts if p)


def table_exists(path: str, spark: SparkSession | None = None) -> bool:
    """True when `path` holds a Delta table (a readable `_delta_log`), or when the catalog table
    `path` names exists (then `spark` is needed)."""
    if is_catalog_name(path):
        if spark is None:
            raise ValueError(f"table_exists({path}): a catalog table name needs the SparkSession")
        return spark.catalog.tableExists(path)
    return DeltaTable.is_deltatable(_locate(path).table_uri)


def table_writers(spark: SparkSession) -> tuple[str, ...]:
    """The Delta writers this session has: the embedded committer always, the connector when it is
    on the classpath (`write_table` uses the connector then)."""
    return (EMBEDDED, CONNECTOR) if has_delta_connector(spark) else (EMBEDDED,)


def transaction_version(path: str, app_id: str) -> int | None:
    """The version of app `app_id`'s Delta transaction (txn) in the table at `path`: the last batch
    that writer committed. None when the table does not exist or holds no commit of the app."""
    _refuse_catalog_read(path, "its transactions")
    uri = _locate(path).table_uri
    if not DeltaTable.is_deltatable(uri):
        return None
    version = DeltaTable(uri).transaction_version(app_id)
    return None if version is None else int(version)


def commit_history(path: str, limit: int) -> list[dict]:
    """The commitInfo of the table's last `limit` commits, newest first ([] when it does not exist)."""
    _refuse_catalog_read(path, "its history")
    uri = _locate(path).table_uri
    if not DeltaTable.is_deltatable(uri):
        return []
    return list(DeltaTable(uri).history(limit=limit))


def write_table(
    spark: SparkSession,
    df: DataFrame | pa.Table,
    path: str,
    *,
    replace_where: dict[str, object] | None = None,
    partition_by: list[str] | None = None,
    txn: tuple[str, int] | None = None,
    commit_metadata: Mapping[str, str] | None = None,
    writer: str | None = None,
) -> WriteResult:
    """Append `df` to the Delta table at `path` (created when missing) in one commit. `df` may be an
    Arrow table (rows built on the driver) for the embedded committer: the driver writes its one
    Parquet file, and no Spark job runs.

    replace_where: {column: value} equalities, or {column: [values]} for "one of"; the rows matching
      all of them are replaced by `df` atomically (re-running a run id never duplicates its rows).
      Every row of `df` must match.
    partition_by: partition columns when the table is created; must match an existing table's.
    txn: (app_id, version): skip the write when the table already holds this version or a later
      one for app_id, otherwise record it in the commit (idempotent re-runs, streaming batches).
    commit_metadata: string entries recorded in the commit's commitInfo next to the txn (a stream
      records which checkpoint's query wrote the batch): custom keys with the embedded committer,
      `userMetadata` (JSON) with the connector. Readers find them in the table's history.
    writer: `table_writers` names one; by default the connector when present, else the embedded committer.
    """
    _check_replace_where(df, path, replace_where)
    if uses_connector(spark, writer, path):
        if isinstance(df, pa.Table):
            raise TypeError(f"Delta table {path}: the connector writes DataFrames, not Arrow tables")
        return _connector_write(spark, df, path, replace_where, partition_by, txn, commit_metadata)
    _refuse_catalog_name(path)
    return _Committer(spark, df, path, replace_where or {}, partition_by, txn, commit_metadata).run()


def uses_connector(spark: SparkSession, writer: str | None, path: str = "") -> bool:
    """Whether `write_table(..., writer=writer)` goes through the Delta Spark connector (else the
    embedded committer, which also takes Arrow tables)."""
    if writer not in (None, *table_writers(spark)):
        raise ValueError(
            f"writer={writer!r} for Delta table {path}: this session has the writer(s) {list(table_writers(spark))}"
            f" ({CONNECTOR!r} needs the Delta Spark connector on the classpath)"
        )
    return writer == CONNECTOR or (writer is None and has_delta_connector(spark))


def read_table(spark: SparkSession, path: str) -> DataFrame:
    """The current snapshot of the Delta table at `path` (or with that catalog name) as a DataFrame."""
    if is_catalog_name(path):
        return spark.read.table(path)
    if has_delta_connector(spark):
        return spark.read.format("delta").load(path)
    loc = _locate(path)
    table = DeltaTable(loc.table_uri)
    blocked = table_features(table) & READ_UNSUPPORTED
    if blocked:
        raise ValueError(
            f"Delta table {path} uses {sorted(blocked)}, which reading through the file list would "
            "get wrong; read it with the Delta Spark connector (delta-spark on the classpath)"
        )
    schema = T.StructType.fromJson(json.loads(table.schema().to_json()))
    parts = list(table.metadata().partition_columns)
    data_schema = T.StructType([f for f in schema.fields if f.name not in parts])
    files = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    if not files:
        return spark.createDataFrame([], schema)
    bases = _partition_bases(files, parts)
    if bases is not None:
        # Spark-written Hive-style folders (this committer's own layout): one scan per write folder,
        # with Spark's partition discovery typed by the table schema, instead of one per partition
        # (a stream's state rewritten batch by batch has its files in one or a few write folders).
        full = T.StructType(list(data_schema.fields) + [schema[c] for c in parts])
        frames = [
            spark.read.schema(full).option("basePath", loc.spark_file(base)).parquet(*[loc.spark_file(p) for p in paths])
            .select(*[_col(f.name) for f in schema.fields])
            for base, paths in bases.items()
        ]
        return reduce(DataFrame.unionAll, frames)
    groups: dict[tuple, list[str]] = {}
    for add in files:
        key = tuple(add.get(f"partition.{c}") for c in parts)
        groups.setdefault(key, []).append(loc.spark_file(unquote(add["path"])))
    frames = []
    for key, paths in groups.items():
        frame = spark.read.schema(data_schema).parquet(*paths)
        for name, value in zip(parts, key, strict=True):
            frame = frame.withColumn(name, F.lit(value).cast(schema[name].dataType))
        frames.append(frame.select(*[_col(f.name) for f in schema.fields]))
    return reduce(DataFrame.unionAll, frames)


def _partition_bases(files: list[dict], parts: list[str]) -> dict[str, list[str]] | None:
    """Files by the folder above their `<part>=<value>/` folders (one per partition column, in
    order, as Spark's partitionBy writes them), when every file has them and that gives fewer scans
    than one per partition; else None."""
    if not parts:
        return None
    bases: dict[str, list[str]] = {}
    partitions = set()
    for add in files:
        rel = unquote(add["path"])
        folders = rel.split("/")[:-1]
        if "://" in rel or rel.startswith("/") or len(folders) < len(parts):
            return None
        tail = folders[len(folders) - len(parts):]
        if [unquote(f.partition("=")[0]) for f in tail] != parts or not all("=" in f for f in tail):
            return None
        bases.setdefault("/".join(folders[: len(folders) - len(parts)]), []).append(rel)
        partitions.add(tuple(tail))
    if "" in bases or len(bases) >= len(partitions):
        return None
    return bases


# ---------------------------------------------------------------------------------------------
# Delta Spark connector


def _connector_write(spark, df, path, replace_where, partition_by, txn, commit_metadata=None) -> WriteResult:
    started = time.monotonic()
    before = _connector_last_commit(spark, path)
    writer = df.write.format("delta")
    if replace_where:
        writer = writer.mode("overwrite").option("replaceWhere", _sql_predicate(replace_where))
    else:
        writer = writer.mode("append")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if txn is not None:
        writer = writer.option("txnAppId", txn[0]).option("txnVersion", str(txn[1]))
    if commit_metadata:
        writer = writer.option("userMetadata", json.dumps(dict(commit_metadata), sort_keys=True))
    # New nullable columns of a newer segspark are added to an existing table (as the embedded
    # committer does); a changed or missing column is still an error.
    writer = writer.option("mergeSchema", "true")
    if is_catalog_name(path):
        writer.saveAsTable(path)  # created in the catalog (managed) on the first write
    else:
        writer.save(path)
    last = _connector_last_commit(spark, path)
    if txn is not None and before is not None and last["version"] == before["version"]:
        log.info("Delta table %s: txn %s already committed, write skipped by the connector", path, txn)
        return WriteResult(path, None, 0, 0, skipped=True)
    metrics = last["operationMetrics"] or {}
    result = WriteResult(
        path, last["version"], int(metrics.get("numFiles", -1)), int(metrics.get("numOutputRows", -1))
    )
    log.info(
        "Delta commit (connector): table=%s version=%s files=%d rows=%d seconds=%.2f",
        path,
        result.version,
        result.files,
        result.rows,
        time.monotonic() - started,
    )
    return result


def _connector_last_commit(spark, path):
    table = path if is_catalog_name(path) else "delta." + _quote_name(path)
    try:
        return spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]
    except Exception:  # noqa: BLE001 - not a Delta table yet
        return None


def _sql_predicate(replace_where: Mapping[str, object]) -> str:
    return " AND ".join(
        f"{_quote_name(k)} IN ({', '.join(_sql_literal(x) for x in sorted(v))})" if _is_values(v)
        else f"{_quote_name(k)} = {_sql_literal(v)}"
        for k, v in replace_where.items()
    )


def _is_values(value: object) -> bool:
    return isinstance(value, list | tuple | set | frozenset)


def _quote_name(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)  # the session time zone is UTC
        return f"TIMESTAMP'{value.isoformat(sep=' ')}'"
    if isinstance(value, dt.date):
        return f"DATE'{value.isoformat()}'"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


# ---------------------------------------------------------------------------------------------
# Embedded committer


@dataclass(frozen=True)
class _Location:
    table_uri: str  # what delta-rs gets
    spark_root: str  # what Spark gets (file:// for local paths, whatever the default file system)
    fs: pafs.FileSystem
    root: str  # the table directory inside `fs`

    def spark_file(self, rel: str) -> str:
        if "://" in rel or rel.startswith("/"):
            return rel  # an absolute path in the log (shallow clones)
        return f"{self.spark_root}/{rel}"


def _locate(path: str) -> _Location:
    parsed = urlparse(path)
    if len(parsed.scheme) <= 1 or parsed.scheme == "file":  # a plain path (or a Windows drive)
        local = os.path.abspath(unquote(parsed.path) if parsed.scheme == "file" else path)
        return _Location(local, "file://" + local, pafs.LocalFileSystem(), local)
    fs, root = pafs.FileSystem.from_uri(path)
    return _Location(path.rstrip("/"), path.rstrip("/"), fs, root.rstrip("/"))


class _Committer:
    def __init__(self, spark, df, path, replace_where, partition_by, txn, commit_metadata=None):
        self.spark, self.df, self.path, self.txn = spark, df, path, txn
        self.commit_metadata = {str(k): str(v) for k, v in (commit_metadata or {}).items()}
        self.loc = _locate(path)
        self.started = time.monotonic()
        self.partition_by = list(partition_by or [])
        self.replace_where = replace_where
        self.arrow_schema = df.schema if isinstance(df, pa.Table) else arrow_schema(df.schema)
        self.columns = df.column_names if isinstance(df, pa.Table) else df.columns
        self.write_id = uuid.uuid4().hex

    def run(self) -> WriteResult:
        check_timestamp_type(self.spark)
        table = DeltaTable(self.loc.table_uri) if DeltaTable.is_deltatable(self.loc.table_uri) else None
        removes: list[RemoveAction] = []
        if table is not None:
            if self.txn is not None:
                done = table.transaction_version(self.txn[0])
                if done is not None and done >= self.txn[1]:
                    log.info(
                        "Delta table %s: txn %s already at version %s, write skipped",
                        self.path,
                        self.txn,
                        done,
                    )
                    return WriteResult(self.path, None, 0, 0, skipped=True)
            self._check_existing(table)
            removes = self._replaced_files(table)
        missing = [c for c in self.partition_by if c not in self.columns]
        if missing or (self.partition_by and len(self.partition_by) == len(self.columns)):
            raise ValueError(
                f"partition_by={self.partition_by} for Delta table {self.path}: columns {missing} are not in "
                f"the DataFrame (columns: {self.columns}), or no column would be left for the data files"
            )
        if self.partition_by and isinstance(self.df, pa.Table) and self.df.num_rows:  # no rows: no file
            raise ValueError(f"Delta table {self.path} is partitioned by {self.partition_by}: write it from a DataFrame")
        partitions = set(self.partition_by)
        listed = [k for k, v in self.replace_where.items() if _is_values(v) and k not in partitions]
        if listed:
            # Statistics prove "every row is one of the values" only for a single value per file.
            raise ValueError(
                f"replace_where={self.replace_where} for Delta table {self.path}: a list of values needs a "
                f"partition column, and {listed} is not one (partitioned by {self.partition_by})"
            )
        self.data_schema = pa.schema([f for f in self.arrow_schema if f.name not in partitions])
        self.conditions = {
            k: coerce(v, self.arrow_schema.field(k).type, k) for k, v in self.replace_where.items()
        }

        stage = f"{STAGE_PREFIX}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{self.write_id[:12]}"
        stage_path = f"{self.loc.root}/{stage}"
        try:
            if isinstance(self.df, pa.Table):
                self._write_arrow(stage_path)
            else:
                writer = self.df.write
                if self.partition_by:
                    writer = writer.partitionBy(*self.partition_by)
                writer.parquet(f"{self.loc.spark_root}/{stage}")
            adds = self._add_actions(stage, stage_path)
        except Exception:
            self._delete(stage_path)
            raise
        rows = sum(json.loads(a.stats)["numRecords"] for a in adds)
        version = self._commit_with_retries(table, removes, adds, stage_path)
        if version is None:
            return WriteResult(self.path, None, 0, 0, skipped=True)
        seconds = time.monotonic() - self.started
        log.info(
            "Delta commit: table=%s version=%s files=%d rows=%d removed_files=%d seconds=%.2f",
            self.path,
            version,
            len(adds),
            rows,
            len(removes),
            seconds,
        )
        return WriteResult(self.path, version, len(adds), rows)

    # -- checks before writing ---------------------------------------------------------------

    def _check_existing(self, table: DeltaTable) -> None:
        blocked = table_features(table) & WRITE_UNSUPPORTED
        if blocked:
            raise ValueError(
                f"Delta table {self.path} uses {sorted(blocked)}, which the embedded committer does not "
                "support; write it with the Delta Spark connector (delta-spark on the classpath)"
            )
        expected = delta_types(table.schema())
        found = delta_types(DeltaSchema.from_arrow(self.arrow_schema))
        # Additive schema evolution, as Spark's mergeSchema: columns the table does not have yet (a
        # newer segspark writing to an older table) are appended to the table's schema in the same
        # commit, nullable like every Delta column; the table's earlier files read them as null.
        # Anything else that differs (a missing column, another type) is an error.
        added = [c for c in found if c not in expected]
        problems = schema_problems({c: t for c, t in found.items() if c not in added}, expected, what="the DataFrame")
        if problems:
            raise ValueError(
                f"cannot write to Delta table {self.path}: the DataFrame's schema differs from the table's "
                f"({'; '.join(problems)}). Cast or select the columns to match the table (only new columns "
                "are added to a table), or write to a new table"
            )
        if added:
            # Its own commit before the data's (delta-rs writes no schema change with added files),
            # like ALTER TABLE ADD COLUMNS: harmless if the write then fails, since the new columns
            # are null for every existing row.
            log.info("Delta table %s: adding column(s) %s to the table's schema", self.path, ", ".join(added))
            new_fields = DeltaSchema.from_arrow(pa.schema([self.arrow_schema.field(c) for c in added])).fields
            table.alter.add_columns(list(new_fields))
            table.update_incremental()
            expected = delta_types(table.schema())
        parts = list(table.metadata().partition_columns)
        if self.partition_by and self.partition_by != parts:
            raise ValueError(
                f"partition_by={self.partition_by} for Delta table {self.path}, which is partitioned by "
                f"{parts}; pass partition_by={parts} or leave it out"
            )
        self.partition_by = parts
        order = list(expected)
        if list(self.columns) != order:  # same columns, table order: files then match the table
            self.df = self.df.select(order) if isinstance(self.df, pa.Table) else self.df.select(*[_col(c) for c in order])
            self.arrow_schema = pa.schema([self.arrow_schema.field(c) for c in order])
            self.columns = order

    def _replaced_files(self, table: DeltaTable) -> list[RemoveAction]:
        if not self.replace_where:
            return []
        types = {f.name: f.type for f in pa.schema(table.schema().to_arrow())}
        conditions = {k: coerce(v, types[k], k) for k, v in self.replace_where.items()}
        parts = set(table.metadata().partition_columns)
        now = int(time.time() * 1000)
        removes = []
        for add in pa.table(table.get_add_actions(flatten=True)).to_pylist():
            facts = FileFacts(
                num_records=add.get("num_records"),
                partition={c: add.get(f"partition.{c}") for c in parts},
                minimum={c: add.get(f"min.{c}") for c in conditions},
                maximum={c: add.get(f"max.{c}") for c in conditions},
                nulls={c: add.get(f"null_count.{c}") for c in conditions},
            )
            verdict = classify(facts, conditions, parts)
            if verdict == "unknown":
                raise ValueError(
                    f"cannot replace the rows where {_sql_predicate(self.replace_where)} in Delta table "
                    f"{self.path}: file {add['path']} may hold both such rows and others "
                    f"({describe_facts(facts, conditions, parts)}). The embedded committer replaces whole files "
                    "and never rewrites one; this happens when files were compacted (OPTIMIZE) or written by "
                    "another tool. Partition the table by the replace_where columns, or use the Delta Spark "
                    "connector"
                )
            if verdict == "all":
                # get_add_actions gives the path encoded as in the log; RemoveAction encodes it again.
                removes.append(
                    RemoveAction(
                        path=unquote(add["path"]),
                        data_change=True,
                        deletion_timestamp=now,
                        size=add["size_bytes"],
                        partition_values={c: partition_string(add.get(f"partition.{c}")) for c in parts},
                    )
                )
        return removes

    # -- after Spark wrote: list, verify, describe ------------------------------------------

    def _write_arrow(self, stage_path: str) -> None:
        """The Arrow table as one Parquet file in the stage folder, as Spark would write it
        (microsecond UTC timestamps, snappy); no file for no rows (the commit then adds none)."""
        self.loc.fs.create_dir(stage_path, recursive=True)
        if self.df.num_rows:
            pq.write_table(self.df, f"{stage_path}/part-00000-{self.write_id}-c000.snappy.parquet",
                           filesystem=self.loc.fs, compression="snappy", coerce_timestamps="us")

    def _add_actions(self, stage: str, stage_path: str) -> list[AddAction]:
        listing = self.loc.fs.get_file_info(pafs.FileSelector(stage_path, recursive=True))
        adds, junk = [], []
        for info in listing:
            if info.type != pafs.FileType.File:
                continue
            name = posixpath.basename(info.path)
            if name.startswith(("_", ".")) or name.endswith(".crc"):
                junk.append(info.path)  # _SUCCESS and Hadoop checksums: VACUUM would never remove them
                continue
            add = self._describe_file(stage, stage_path, info)
            if add is None:
                junk.append(info.path)  # the empty file Spark writes for an empty DataFrame
            else:
                adds.append(add)
        for junk_path in junk:
            self.loc.fs.delete_file(junk_path)
        if not adds:
            self._delete(stage_path)
        return adds

    def _describe_file(self, stage: str, stage_path: str, info: pafs.FileInfo) -> AddAction | None:
        rel_in_stage = info.path[len(stage_path) + 1 :]
        rel = f"{stage}/{rel_in_stage}"
        with self.loc.fs.open_input_file(info.path) as handle:
            size = handle.size()
            parquet = pq.ParquetFile(handle)  # reads the footer only
            meta, file_schema = parquet.metadata, parquet.schema_arrow
        if size != info.size:
            raise ValueError(f"Delta table {self.path}: file {rel} is {size} bytes, listed as {info.size}")
        try:
            found = delta_types(DeltaSchema.from_arrow(file_schema))
        except Exception as exc:  # noqa: BLE001 - a type Delta has no name for
            raise ValueError(
                f"Delta table {self.path}: file {rel} has a schema Delta cannot hold: {exc}"
            ) from exc
        problems = schema_problems(
            found, delta_types(DeltaSchema.from_arrow(self.data_schema)), what=f"file {rel}"
        )
        if problems:
            raise ValueError(
                f"Delta table {self.path}: file {rel} does not match the table schema ({'; '.join(problems)}); "
                "nothing was committed. Check spark.sql.parquet.* settings (e.g. outputTimestampType)"
            )
        if meta.num_rows == 0:
            return None
        partition_values: dict[str, str | None] = {}
        for part in rel_in_stage.split("/")[:-1]:
            key, _, raw = part.partition("=")
            partition_values[unquote(key)] = None if raw == HIVE_NULL else unquote(raw)
        if list(partition_values) != self.partition_by:
            raise ValueError(
                f"Delta table {self.path}: file {rel} is not under partition folders {self.partition_by}"
            )
        stats, facts = file_stats(meta, self.data_schema)
        facts.partition = {
            k: coerce(v, self.arrow_schema.field(k).type, k) for k, v in partition_values.items()
        }
        if self.conditions and classify(facts, self.conditions, set(self.partition_by)) != "all":
            raise ValueError(
                f"replace_where={self.replace_where} for Delta table {self.path}, but the DataFrame holds other "
                f"rows ({rel}: {describe_facts(facts, self.conditions, set(self.partition_by))}); filter the DataFrame "
                "to the replaced rows"
            )
        return AddAction(
            path=rel,  # as stored: delta-rs percent-encodes it into the log
            size=size,
            partition_values=partition_values,
            modification_time=(info.mtime_ns or time.time_ns()) // 1_000_000,
            data_change=True,
            stats=json.dumps(stats, separators=(",", ":")),
        )

    # -- commit -------------------------------------------------------------------------------

    def _commit_with_retries(self, table, removes, adds, stage_path: str) -> int | None:
        """Commit; when another writer committed to the table (or created it) since it was read, read
        it again, re-check the txn, the schema and the files `replace_where` replaces, and commit
        again. The staged files stay the same: only the log entry is redone, so a retry can neither
        lose nor duplicate rows. None when the other writer had committed this write's txn."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            read_version = None if table is None else table.version()
            try:
                return self._commit(table, removes, adds)
            except Exception as exc:
                fresh = DeltaTable(self.loc.table_uri) if DeltaTable.is_deltatable(self.loc.table_uri) else None
                moved = fresh is not None and (read_version is None or fresh.version() > read_version)
                if not moved or attempt == COMMIT_ATTEMPTS:
                    raise
                log.info(
                    "Delta table %s: another writer committed version %s first (%s); re-checking and committing "
                    "again (attempt %d of %d)", self.path, fresh.version(), type(exc).__name__, attempt + 1,
                    COMMIT_ATTEMPTS,
                )
                table = fresh
                if self.txn is not None:
                    done = table.transaction_version(self.txn[0])
                    if done is not None and done >= self.txn[1]:
                        log.info("Delta table %s: txn %s was committed by the other writer; write skipped",
                                 self.path, self.txn)
                        self._delete(stage_path)
                        return None
                self._check_existing(table)
                removes = self._replaced_files(table)
        raise AssertionError("unreachable")

    def _commit(self, table: DeltaTable | None, removes: list, adds: list[AddAction]) -> int:
        props = CommitProperties(
            custom_metadata={**self.commit_metadata, WRITE_ID_KEY: self.write_id},
            app_transactions=[Transaction(self.txn[0], self.txn[1])] if self.txn else None,
        )
        try:
            if table is None:
                create_table_with_add_actions(
                    self.loc.table_uri,
                    DeltaSchema.from_arrow(self.arrow_schema),
                    adds,
                    mode="append",
                    partition_by=self.partition_by or None,
                    commit_properties=props,
                )
            else:
                table.create_write_transaction(
                    [*removes, *adds],
                    mode="append",
                    schema=table.schema(),
                    partition_by=self.partition_by or None,
                    commit_properties=props,
                )
        except Exception as exc:
            exc.add_note(
                f"segspark: commit to Delta table {self.path} failed ({len(adds)} new files, {len(removes)} "
                f"removed); the new files under {STAGE_PREFIX}* stay unreferenced until VACUUM"
            )
            raise
        if table is None:
            table = DeltaTable(self.loc.table_uri)
        else:  # the new commits only: a fresh open would replay the log since its last checkpoint
            table.update_incremental()
        version = next((int(entry["version"]) for entry in table.history(limit=20)
                        if entry.get(WRITE_ID_KEY) == self.write_id), table.version())
        _checkpoint_if_due(table, version, self.path)
        return version

    def _delete(self, stage_path: str) -> None:
        # Only a staging folder of a write, directly inside the table: never the table or above it.
        name = stage_path[len(self.loc.root) + 1:]
        if not stage_path.startswith(self.loc.root + "/") or not name.startswith(STAGE_PREFIX) or "/" in name or ".." in name:
            raise ValueError(f"refusing to delete {stage_path!r}: not a staging folder inside table {self.loc.root!r}")
        try:
            self.loc.fs.delete_dir(stage_path)
        except (FileNotFoundError, OSError) as exc:
            log.warning("could not delete staged files %s: %s", stage_path, exc)


def _checkpoint_if_due(table: DeltaTable, version: int, path: str) -> None:
    """A checkpoint of `version` when it is a multiple of CHECKPOINT_INTERVAL (delta-rs's post-commit
    hook writes its own at versions 99, 199, ...). The commit stands either way: a missing checkpoint
    only makes the next opens slower."""
    if version <= 0 or version % CHECKPOINT_INTERVAL:
        return
    try:
        if table.version() == version:
            table.create_checkpoint()
        else:  # another writer committed after this one: checkpoint the version this one wrote
            DeltaTable(table.table_uri, version=version).create_checkpoint()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("Delta table %s: no checkpoint written at version %d (%s: %s)", path, version,
                    type(exc).__name__, exc)


def _refuse_catalog_read(path: str, what: str) -> None:
    if is_catalog_name(path):
        raise ValueError(
            f"table {path}: {what} are read with delta-rs, by path; a catalog table name has none. Use a path "
            "table (under output.root)"
        )


def _refuse_catalog_name(path: str) -> None:
    if is_catalog_name(path):
        raise ConfigError(
            f"table {path}: output.catalog/output.schema write catalog tables, which needs the Delta Spark "
            "connector (Databricks, or spark-submit --packages io.delta:delta-spark_2.13:<version>); it is not "
            "on this session's classpath. Leave output.catalog and output.schema empty to write path tables "
            "under output.root"
        )


def _check_replace_where(df: DataFrame | pa.Table, path: str, replace_where: Mapping[str, object] | None) -> None:
    if replace_where is None:
        return
    if not replace_where:
        raise ValueError(f"replace_where for Delta table {path} is empty; pass None to append")
    columns = df.column_names if isinstance(df, pa.Table) else df.columns
    for column, value in replace_where.items():
        if column not in columns:
            raise ValueError(
                f"replace_where column {column!r} is not in the DataFrame (columns: {columns})"
            )
        if value is None or (_is_values(value) and (not value or None in value)):
            raise ValueError(
                f"replace_where column {column!r} is {value!r}; expected a value, or a non-empty list of "
                "values (column IN list), without None"
            )


def _col(name: str):
    return F.col(_quote_name(name))

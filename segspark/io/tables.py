"""Where segspark's output tables live, and reading and writing them by their catalog entry.

Tables are Delta tables under `output.root/<name>`, or catalog tables `output.catalog`.`output.schema`.
`<name>` when those are set (Unity Catalog or a metastore; written by the Delta Spark connector, which
the catalog needs). Model bundles, reports and checkpoints stay under output.root either way.
`write_rows` applies the table's write policy (`io.catalog.WritePolicy`): writing a run's rows
replaces that run's earlier rows in the same commit (re-running a run id never duplicates it); a
stream's tables are appended to, or their partitions replaced, once per txn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pyspark.sql import DataFrame, SparkSession

from segspark.config import OutputConfig
from segspark.errors import ConfigError
from segspark.io.catalog import Table, WritePolicy, table
from segspark.io.delta import (
    WriteResult,
    catalog_name,
    read_table,
    table_exists,
    transaction_version,
    uses_connector,
    write_table,
)
from segspark.runtime.session import has_delta_connector


def uses_catalog(output: OutputConfig) -> bool:
    return bool(output.catalog or output.schema_)


def table_path(output: OutputConfig, name: str | Table) -> str:
    """The table's path under output.root, or its quoted catalog name (io.delta accepts both)."""
    name = table(name).name
    if uses_catalog(output):
        if not output.schema_:
            raise ConfigError(f"output.catalog={output.catalog!r} needs output.schema too (the schema the tables go to)")
        return catalog_name(output.catalog or "", output.schema_, name)
    return f"{output.root.rstrip('/')}/{name}"


def check_output(spark: SparkSession, output: OutputConfig) -> None:
    """Fail before any work when catalog tables are asked for but cannot be written here."""
    if uses_catalog(output) and not has_delta_connector(spark):
        raise ConfigError(
            f"output.catalog={output.catalog!r} output.schema={output.schema_!r}: catalog tables are written by "
            "the Delta Spark connector (Databricks, or spark-submit --packages io.delta:delta-spark_2.13:<version>), "
            "which this session does not have. Leave output.catalog and output.schema empty to write path tables "
            "under output.root"
        )
    if uses_catalog(output):
        table_path(output, "runs")  # schema given?


def write_rows(
    spark: SparkSession,
    output: OutputConfig,
    name: str | Table,
    data: DataFrame | Sequence[object],
    run_id: str | None = None,
    *,
    txn: tuple[str, int] | None = None,
    partitions: Sequence[object] | None = None,
    commit_metadata: Mapping[str, str] | None = None,
    writer: str | None = None,
) -> WriteResult:
    """Write `data` (a DataFrame, or the table's typed rows) to table `name` in one atomic commit, as
    its write policy says:

    - REPLACE_RUN: the rows of run `run_id` (every row of `data` has it) replace that run's rows;
    - APPEND_TXN: appended, with `txn` (app id, version) needed;
    - REPLACE_PARTITIONS: `data` replaces the rows of `partitions` (values of the table's one
      partition column, which every row of `data` falls in), with `txn` needed; with no partitions
      (an empty list) it is appended.

    txn: (app id, version) of an idempotent writer: a commit with that transaction already in the
    table is skipped (`skipped=True`). writer: see `io.delta.write_table`."""
    spec = table(name)
    if isinstance(data, DataFrame):
        df = data
    else:  # typed rows: the embedded committer writes them on the driver, without a Spark job
        df = spec.frame(spark, data) if uses_connector(spark, writer, spec.name) else spec.arrow(data)
    policy = spec.policy
    if (run_id is not None) != (policy is WritePolicy.REPLACE_RUN):
        raise ValueError(
            f"table {spec.name} is written by policy {policy.name} ({policy.value}): "
            + ("pass the run_id whose rows are replaced" if policy is WritePolicy.REPLACE_RUN
               else f"it takes no run_id (got {run_id!r})")
        )
    if policy is not WritePolicy.REPLACE_RUN and txn is None:
        raise ValueError(f"table {spec.name} ({policy.value}) is written once per txn: pass txn=(app id, version)")
    if (partitions is not None) != (policy is WritePolicy.REPLACE_PARTITIONS):
        raise ValueError(
            f"partitions={partitions!r} for table {spec.name} ({policy.value}): only REPLACE_PARTITIONS tables take "
            "the partitions they replace, and they need them"
        )
    replace_where: dict[str, object] | None = None
    if policy is WritePolicy.REPLACE_RUN:
        replace_where = {"run_id": run_id}
    elif policy is WritePolicy.REPLACE_PARTITIONS:
        (column,) = spec.partition_by
        replace_where = {column: list(partitions)} if partitions else None
    return write_table(spark, df, table_path(output, spec), replace_where=replace_where,
                       partition_by=list(spec.partition_by) or None, txn=txn, commit_metadata=commit_metadata,
                       writer=writer)


def write_run_rows(
    spark: SparkSession,
    output: OutputConfig,
    name: str | Table,
    df: DataFrame,
    run_id: str,
    *,
    txn: tuple[str, int] | None = None,
    commit_metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Replace run `run_id`'s rows in table `name` with `df`: `write_rows` of a REPLACE_RUN table."""
    return write_rows(spark, output, name, df, run_id, txn=txn, commit_metadata=commit_metadata)


def read_output_table(spark: SparkSession, output: OutputConfig, name: str | Table) -> DataFrame:
    """The current snapshot of table `name` as a DataFrame."""
    return read_table(spark, table_path(output, name))


def output_table_exists(spark: SparkSession, output: OutputConfig, name: str | Table) -> bool:
    return table_exists(table_path(output, name), spark)


def committed_version(output: OutputConfig, name: str | Table, app_id: str) -> int | None:
    """The last version (a stream's batch id) that writer app `app_id` committed to table `name` with
    its txn; None when the table does not exist or holds none of its commits. Path tables only."""
    return transaction_version(table_path(output, name), app_id)

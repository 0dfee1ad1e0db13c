"""Where segspark's output tables live, and writing one run's rows into them.

Tables are Delta tables under `output.root/<name>`, or catalog tables `output.catalog`.`output.schema`.
`<name>` when those are set (Unity Catalog or a metastore; written by the Delta Spark connector, which
the catalog needs). Model bundles, reports and checkpoints stay under output.root either way. Writing a
run's rows replaces that run's earlier rows in the same commit (re-running a run id never duplicates it).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import DataFrame, SparkSession

from segspark.config import OutputConfig
from segspark.errors import ConfigError
from segspark.io.delta import WriteResult, catalog_name, read_table, table_exists, write_table
from segspark.runtime.session import has_delta_connector


def uses_catalog(output: OutputConfig) -> bool:
    return bool(output.catalog or output.schema_)


def table_path(output: OutputConfig, name: str) -> str:
    """The table's path under output.root, or its quoted catalog name (io.delta accepts both)."""
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


def write_run_rows(
    spark: SparkSession,
    output: OutputConfig,
    name: str,
    df: DataFrame,
    run_id: str,
    *,
    txn: tuple[str, int] | None = None,
    commit_metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Replace run `run_id`'s rows in table `name` with `df` (atomic, one commit). txn: (app id,
    version) of an idempotent writer: a commit with that transaction already in the table is skipped."""
    return write_table(spark, df, table_path(output, name), replace_where={"run_id": run_id}, txn=txn,
                       commit_metadata=commit_metadata)


def read_output_table(spark: SparkSession, output: OutputConfig, name: str) -> DataFrame:
    return read_table(spark, table_path(output, name))


def output_table_exists(spark: SparkSession, output: OutputConfig, name: str) -> bool:
    return table_exists(table_path(output, name), spark)

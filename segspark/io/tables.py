"""Where segspark's output tables live, and writing one run's rows into them.

Tables are Delta tables under `output.root/<name>`. Writing a run's rows replaces that run's earlier
rows in the same commit (re-running a run id never duplicates it).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession

from segspark.config import OutputConfig
from segspark.errors import ConfigError
from segspark.io.delta import WriteResult, read_table, write_table


def table_path(output: OutputConfig, name: str) -> str:
    if output.catalog or output.schema_:
        raise ConfigError(
            "output.catalog/output.schema: writing to catalog tables is not supported yet; "
            "leave them empty and set output.root to a path"
        )
    return f"{output.root.rstrip('/')}/{name}"


def write_run_rows(spark: SparkSession, output: OutputConfig, name: str, df: DataFrame, run_id: str) -> WriteResult:
    """Replace run `run_id`'s rows in table `name` with `df` (atomic, one commit)."""
    return write_table(spark, df, table_path(output, name), replace_where={"run_id": run_id})


def read_output_table(spark: SparkSession, output: OutputConfig, name: str) -> DataFrame:
    return read_table(spark, table_path(output, name))

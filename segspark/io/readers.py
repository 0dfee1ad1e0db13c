"""Reading raw event logs as configured (json, csv, parquet, delta).

Text formats are read with every column as a string and a corrupt-record column, so that typing is
done by ingest (where a bad value becomes a quarantine row with a reason) and a malformed line is
kept, never silently dropped.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from segspark.config import InputConfig
from segspark.errors import InputSchemaError

log = logging.getLogger(__name__)

CORRUPT_COLUMN = "_corrupt_record"


def read_raw_events(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """The source records as a DataFrame; json/csv carry `_corrupt_record` for malformed lines."""
    if cfg.format == "kafka":
        raise InputSchemaError(
            "input.format kafka is a streaming source: batch runs read parquet, json, csv or delta "
            "(set input.format and input.path to files, or use the streaming path)"
        )
    reader = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "delta": _read_delta}[cfg.format]
    try:
        df = reader(spark, cfg)
    except InputSchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into one clear message below
        if _is_missing_path(exc):
            raise InputSchemaError(
                f"input.path {cfg.path!r}: no {cfg.format} data found there. "
                "Check the path, or set it with --set input.path=..."
            ) from None
        raise
    check_required_columns(df, cfg)
    return df


def check_required_columns(df: DataFrame, cfg: InputConfig) -> None:
    present = [c for c in df.columns if c != CORRUPT_COLUMN]
    missing = {canon: src for canon, src in cfg.columns.mapped().items() if src not in present}
    if missing:
        wanted = ", ".join(f"{src!r} (for {canon})" for canon, src in missing.items())
        raise InputSchemaError(
            f"input {cfg.path!r} ({cfg.format}) lacks required columns: {wanted}. "
            f"Columns present: {', '.join(present) or 'none'}. "
            "Map the source's names under input.columns in the config, or leave optional ones empty."
        )


def _is_missing_path(exc: Exception) -> bool:
    text = str(exc)
    return "PATH_NOT_FOUND" in text or "Path does not exist" in text or "UNABLE_TO_INFER_SCHEMA" in text


def _read_json(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    # primitivesAsString: numbers stay text until ingest types them, so "12.5" and 12.5 behave alike.
    options = {
        "mode": "PERMISSIVE",
        "columnNameOfCorruptRecord": CORRUPT_COLUMN,
        "primitivesAsString": "true",
        **cfg.options,
    }
    df = spark.read.options(**options).json(cfg.path)
    if CORRUPT_COLUMN not in df.columns:
        df = df.withColumn(CORRUPT_COLUMN, _null_string())
    return df


def _read_csv(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    options = {"header": "true", **cfg.options}
    # The header gives the column names; reading it touches the first line only.
    header = spark.read.options(**options).csv(cfg.path).columns
    schema = StructType([StructField(name, StringType(), True) for name in header])
    schema = schema.add(StructField(CORRUPT_COLUMN, StringType(), True))
    return (
        spark.read.options(
            **{"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COLUMN, **options, "enforceSchema": "false"}
        )
        .schema(schema)
        .csv(cfg.path)
    )


def _read_parquet(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    df = spark.read.options(**cfg.options).parquet(cfg.path)
    return df.withColumn(CORRUPT_COLUMN, _null_string())


def _read_delta(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    from segspark.io.delta import read_table  # the connector or the snapshot's file list

    return read_table(spark, cfg.path).withColumn(CORRUPT_COLUMN, _null_string())


def _null_string():
    from pyspark.sql import functions as F

    return F.lit(None).cast(StringType())

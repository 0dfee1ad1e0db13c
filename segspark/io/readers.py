"""Reading raw event logs as configured (json, csv, parquet, delta).

Text formats are read with every column as a string and a corrupt-record column, so that typing is
done by ingest (where a bad value becomes a quarantine row with a reason) and a malformed line is
kept, never silently dropped: a text file of binary garbage is read line by line, and its lines are
quarantined as malformed_record.

A file that cannot be read through at all (a truncated Parquet file or gzip stream, a Parquet file
without its footer, an I/O error) fails Spark's read with FAILED_READ_FILE naming the file.
`read_with_corrupt_files` turns that into a CorruptFileError (exit 2) naming the file, or, with
`input.on_corrupt_file: skip`, reads the input again without that file, once per corrupt file, and
returns the files it left out (nothing is read from a skipped file, so nothing of it is half-counted).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import unquote, urlparse

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from segspark.config import InputConfig
from segspark.errors import InputSchemaError

log = logging.getLogger(__name__)

CORRUPT_COLUMN = "_corrupt_record"
T = TypeVar("T")

# Spark's error for a file it cannot read (error class FAILED_READ_FILE.*): the message names the file.
_FAILED_READ = re.compile(r"Encountered error while reading file (.+?)\.(?:\s|$)")
_CAUSE = re.compile(r"Caused by: ([\w.$]+): (.+)")
_GLOB = re.compile(r"[*?\[{]")


class CorruptFileError(InputSchemaError):
    """A file of the input cannot be read through (truncated or corrupt)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def corrupt_file(exc: BaseException) -> tuple[str, str] | None:
    """(the file, why) when `exc` is Spark failing to read a file of the input; None otherwise."""
    text = str(exc)
    found = _FAILED_READ.search(text) if "FAILED_READ_FILE" in text else None
    if found is None:
        return None
    causes = _CAUSE.findall(text)
    why = f"{causes[-1][0]}: {causes[-1][1].strip()}" if causes else text[found.end():].strip().split("\n")[0]
    return found.group(1), why[:300] or "unreadable"


def corrupt_file_error(exc: BaseException, cfg: InputConfig) -> CorruptFileError | None:
    """CorruptFileError naming the file when `exc` is Spark failing to read one; None otherwise."""
    found = corrupt_file(exc)
    if found is None:
        return None
    path, why = found
    skip = (", or set input.on_corrupt_file=skip to leave unreadable files out (they are listed in "
            "runs.metrics.skipped_files)") if cfg.format != "delta" else ""
    return CorruptFileError(
        f"input file {path} ({cfg.format}) cannot be read: {why}. It is truncated or corrupt: replace or "
        f"remove it{skip}", path)


def read_with_corrupt_files(spark: SparkSession, cfg: InputConfig, use: Callable[[DataFrame], T]) -> tuple[T, list[str]]:
    """`use(records)` on the input (its first action must read every file: ingest's summary does).

    A file Spark cannot read is a CorruptFileError naming it (input.on_corrupt_file fail, and always
    for delta, whose snapshot cannot leave a file out), or with skip the whole read is done again
    without it. Returns `use`'s result and the files skipped."""
    skipped: list[str] = []
    while True:
        try:
            return use(read_raw_events(spark, cfg, exclude=skipped)), skipped
        except Exception as exc:  # noqa: BLE001 - only Spark's unreadable-file failure is handled
            error = corrupt_file_error(exc, cfg)
            if error is None:
                raise
            if cfg.on_corrupt_file == "fail" or cfg.format == "delta" or _file_key(error.path) in map(_file_key, skipped):
                raise error from None
            log.warning("input: skipping unreadable file %s (input.on_corrupt_file=skip): %s", error.path, error)
            skipped.append(error.path)


def read_raw_events(spark: SparkSession, cfg: InputConfig, exclude: Sequence[str] = ()) -> DataFrame:
    """The source records as a DataFrame; json/csv carry `_corrupt_record` for malformed lines.
    `exclude`: files of input.path to leave out (unreadable ones, see read_with_corrupt_files)."""
    if cfg.format in ("kafka", "mqtt"):
        raise InputSchemaError(
            f"input.format {cfg.format} is a streaming source: batch runs read parquet, json, csv or delta "
            "(set input.format and input.path to files, or use the streaming path)"
        )
    reader = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "delta": _read_delta}[cfg.format]
    try:
        paths, options = _paths(spark, cfg, exclude) if exclude else ([cfg.path], dict(cfg.options))
        df = reader(spark, cfg, paths, options)
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


def _paths(spark: SparkSession, cfg: InputConfig, exclude: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The files of input.path without `exclude`, and reader options that keep partition columns."""
    # The text source lists files with the same rules as every file source (hidden files, globs,
    # recursiveFileLookup, pathGlobFilter) and infers nothing, so listing reads no file.
    listed = spark.read.options(**cfg.options).text(cfg.path).inputFiles()
    left_out = {_file_key(p) for p in exclude}
    files = sorted(p for p in listed if _file_key(p) not in left_out)
    if not files:
        raise InputSchemaError(
            f"input.path {cfg.path!r}: every file is unreadable and was skipped ({', '.join(exclude)}); "
            "replace the files, or point input.path at readable data"
        )
    options = dict(cfg.options)
    if not _GLOB.search(cfg.path) and "basePath" not in options and any(_file_key(p) != _file_key(cfg.path) for p in files):
        options["basePath"] = cfg.path  # partition folders (day=...) still give their columns
    return files, options


def _file_key(path: str) -> str:
    """One spelling of a file for comparisons: Spark writes file:/x, file:///x and /x for one file."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return os.path.normpath(unquote(parsed.path))
    return path.rstrip("/")


def _read_json(spark: SparkSession, cfg: InputConfig, paths: list[str], options: dict[str, str]) -> DataFrame:
    # primitivesAsString: numbers stay text until ingest types them, so "12.5" and 12.5 behave alike.
    options = {
        "mode": "PERMISSIVE",
        "columnNameOfCorruptRecord": CORRUPT_COLUMN,
        "primitivesAsString": "true",
        **options,
    }
    df = spark.read.options(**options).json(paths)
    if CORRUPT_COLUMN not in df.columns:
        df = df.withColumn(CORRUPT_COLUMN, _null_string())
    return df


def _read_csv(spark: SparkSession, cfg: InputConfig, paths: list[str], options: dict[str, str]) -> DataFrame:
    options = {"header": "true", **options}
    # The header gives the column names; reading it touches the first line only.
    header = spark.read.options(**options).csv(paths).columns
    schema = StructType([StructField(name, StringType(), True) for name in header])
    schema = schema.add(StructField(CORRUPT_COLUMN, StringType(), True))
    return (
        spark.read.options(
            **{"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COLUMN, **options, "enforceSchema": "false"}
        )
        .schema(schema)
        .csv(paths)
    )


def _read_parquet(spark: SparkSession, cfg: InputConfig, paths: list[str], options: dict[str, str]) -> DataFrame:
    df = spark.read.options(**options).parquet(*paths)
    return df.withColumn(CORRUPT_COLUMN, _null_string())


def _read_delta(spark: SparkSession, cfg: InputConfig, paths: list[str], options: dict[str, str]) -> DataFrame:
    from segspark.io.delta import read_table  # the connector or the snapshot's file list

    return read_table(spark, cfg.path).withColumn(CORRUPT_COLUMN, _null_string())


def _null_string():
    from pyspark.sql import functions as F

    return F.lit(None).cast(StringType())

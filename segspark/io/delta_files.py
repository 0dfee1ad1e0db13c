"""Parquet files and Delta metadata for the embedded committer: Arrow/Delta schemas, per-file
statistics read from Parquet footers, and what those statistics say about `replace_where` rows."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from pyspark.sql import SparkSession
from pyspark.sql import types as T

STATS_STRING_LIMIT = 256  # longer strings get no min/max (a truncated max would be wrong)


@dataclass
class FileFacts:
    """What is known about one file's rows, with typed values, for `replace_where`."""

    num_records: int | None
    partition: dict[str, Any] = field(default_factory=dict)
    minimum: dict[str, Any] = field(default_factory=dict)
    maximum: dict[str, Any] = field(default_factory=dict)
    nulls: dict[str, int | None] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Schemas


def arrow_schema(schema: T.StructType) -> pa.Schema:
    """The Arrow schema of the Parquet files Spark writes for `schema`, every field nullable (as
    Delta makes new tables' columns)."""
    names = [f.name for f in schema.fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"the DataFrame has duplicate columns {dupes}; a Delta table needs unique names")
    return pa.schema([pa.field(f.name, _arrow_type(f.dataType, f.name)) for f in schema.fields])


def _arrow_type(dtype: T.DataType, column: str) -> pa.DataType:
    simple = {
        T.StringType: pa.string(),
        T.CharType: pa.string(),
        T.VarcharType: pa.string(),
        T.BinaryType: pa.binary(),
        T.BooleanType: pa.bool_(),
        T.ByteType: pa.int8(),
        T.ShortType: pa.int16(),
        T.IntegerType: pa.int32(),
        T.LongType: pa.int64(),
        T.FloatType: pa.float32(),
        T.DoubleType: pa.float64(),
        T.DateType: pa.date32(),
        T.TimestampType: pa.timestamp("us", tz="UTC"),
        T.TimestampNTZType: pa.timestamp("us"),
    }
    for cls, arrow in simple.items():
        if isinstance(dtype, cls):
            return arrow
    if isinstance(dtype, T.DecimalType):
        return pa.decimal128(dtype.precision, dtype.scale)
    if isinstance(dtype, T.ArrayType):
        return pa.list_(_arrow_type(dtype.elementType, column))
    if isinstance(dtype, T.MapType):
        return pa.map_(_arrow_type(dtype.keyType, column), _arrow_type(dtype.valueType, column))
    if isinstance(dtype, T.StructType):
        return pa.struct([pa.field(f.name, _arrow_type(f.dataType, column)) for f in dtype.fields])
    if isinstance(dtype, T.UserDefinedType):  # e.g. MLlib vectors: stored as their SQL type
        return _arrow_type(dtype.sqlType(), column)
    raise ValueError(
        f"column {column!r} has type {dtype.simpleString()}, which a Delta table cannot hold; cast it"
    )


def delta_types(schema: DeltaSchema) -> dict[str, Any]:
    """{column: Delta type JSON without nullability or metadata} in schema order."""
    return {f["name"]: _strip(f["type"]) for f in json.loads(schema.to_json())["fields"]}


def _strip(dtype: Any) -> Any:
    if not isinstance(dtype, dict):
        return dtype
    out = {
        k: _strip(v)
        for k, v in dtype.items()
        if k not in ("containsNull", "valueContainsNull", "nullable", "metadata")
    }
    if "fields" in dtype:
        out["fields"] = [{"name": f["name"], "type": _strip(f["type"])} for f in dtype["fields"]]
    return out


def schema_problems(found: dict[str, Any], expected: dict[str, Any], what: str) -> list[str]:
    show = lambda t: t if isinstance(t, str) else json.dumps(t)  # noqa: E731
    problems = [f"column {n!r} is missing from {what}" for n in expected if n not in found]
    problems += [f"column {n!r} of {what} is not in the table" for n in found if n not in expected]
    problems += [
        f"column {n!r} is {show(found[n])} in {what}, expected {show(expected[n])}"
        for n in expected
        if n in found and found[n] != expected[n]
    ]
    return problems


def table_features(table: DeltaTable) -> set[str]:
    proto = table.protocol()
    features = set(proto.reader_features or []) | set(proto.writer_features or [])
    if proto.min_reader_version == 2:
        features.add("columnMapping")  # legacy protocol versions imply their features
    legacy = {3: "checkConstraints", 4: "generatedColumns", 5: "columnMapping", 6: "identityColumns"}
    features.update(
        v for k, v in legacy.items() if proto.writer_features is None and proto.min_writer_version >= k
    )
    return features


def check_timestamp_type(spark: SparkSession) -> None:
    kind = spark.conf.get("spark.sql.parquet.outputTimestampType", "INT96")
    if kind.upper() == "INT96":
        raise ValueError(
            "spark.sql.parquet.outputTimestampType is INT96: delta-rs refuses such timestamps. Set it to "
            "TIMESTAMP_MICROS (segspark.runtime.session.get_spark does) before writing Delta tables"
        )


# ---------------------------------------------------------------------------------------------
# Statistics and replace_where


def file_stats(meta: pq.FileMetaData, data_schema: pa.Schema) -> tuple[dict, FileFacts]:
    """Delta statistics JSON for one file from its footer, and the same values typed."""
    leaves = {}
    for i in range(meta.num_columns):
        column = meta.schema.column(i)
        if column.max_repetition_level == 0 and "." not in column.path:
            leaves[column.path] = i
    facts = FileFacts(num_records=meta.num_rows)
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for fld in data_schema:
        if fld.name not in leaves or not _is_primitive(fld.type):
            continue
        low, high, nulls = _column_stats(meta, leaves[fld.name])
        if nulls is not None:
            stats["nullCount"][fld.name] = facts.nulls[fld.name] = nulls
        low_json, high_json = _stat_json(low), _stat_json(high)
        if low_json is not None and high_json is not None:
            stats["minValues"][fld.name], stats["maxValues"][fld.name] = low_json, high_json
            facts.minimum[fld.name], facts.maximum[fld.name] = low, high
    return stats, facts


def _is_primitive(dtype: pa.DataType) -> bool:
    checks = (
        pa.types.is_string,
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_boolean,
        pa.types.is_date32,
        pa.types.is_timestamp,
        pa.types.is_decimal,
    )
    return any(check(dtype) for check in checks)


def _column_stats(meta: pq.FileMetaData, index: int) -> tuple[Any, Any, int | None]:
    low = high = None
    nulls: int | None = 0
    known = True
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:
            continue
        s = group.column(index).statistics
        if s is None:
            return None, None, None
        nulls = nulls + s.null_count if nulls is not None and s.has_null_count else None
        if s.has_min_max:
            low = s.min if low is None else min(low, s.min)
            high = s.max if high is None else max(high, s.max)
        elif not (s.has_null_count and s.null_count == group.num_rows):
            known = False  # values without min/max
    return (low, high, nulls) if known else (None, None, nulls)


def _stat_json(value: Any) -> Any:
    if value is None or isinstance(value, bytes):
        return None
    if isinstance(value, str):
        return value if len(value) <= STATS_STRING_LIMIT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value) if Decimal(repr(float(value))) == value else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value  # bool, int


def classify(facts: FileFacts, conditions: Mapping[str, Any], partitions: set[str]) -> str:
    """'all' when every row of the file matches the conditions, 'none' when none does,
    'unknown' when the partition values and statistics cannot tell."""
    verdict = "all"
    for column, wanted in conditions.items():
        state = "unknown"
        # A set of values means "column IN (values)"; a single value, "column = value".
        values = wanted if isinstance(wanted, frozenset) else frozenset([wanted])
        if column in partitions:
            state = "all" if facts.partition.get(column) in values else "none"
        elif facts.num_records == 0:
            state = "none"
        elif facts.num_records is not None:
            low, high, nulls = facts.minimum.get(column), facts.maximum.get(column), facts.nulls.get(column)
            try:
                if nulls is not None and nulls == facts.num_records:
                    state = "none"  # all null: `column = value` holds for no row
                elif low is not None and high is not None:
                    if all(v < low or v > high for v in values):
                        state = "none"
                    elif low == high and low in values and nulls == 0:
                        state = "all"
            except TypeError:
                state = "unknown"
        if state == "none":
            return "none"
        if state == "unknown":
            verdict = "unknown"
    return verdict


def describe_facts(facts: FileFacts, conditions: Mapping[str, Any], partitions: set[str]) -> str:
    parts = []
    for column in conditions:
        if column in partitions:
            parts.append(f"{column}={facts.partition.get(column)!r}")
        elif facts.minimum.get(column) is None:
            parts.append(f"no min/max statistics for {column}")
        else:
            parts.append(
                f"{column} from {facts.minimum[column]!r} to {facts.maximum[column]!r}, "
                f"{facts.nulls.get(column)} nulls in {facts.num_records} rows"
            )
    return ", ".join(parts)


def coerce(value: Any, dtype: pa.DataType, column: str) -> Any:
    """`value` as the Python value pyarrow gives for a `dtype` column (to compare with stats); a
    list, tuple or set of values (replace_where "one of") as a frozenset of such values."""
    if value is None:
        return None
    if isinstance(value, list | tuple | set | frozenset):
        return frozenset(coerce(v, dtype, column) for v in value)
    try:
        if pa.types.is_timestamp(dtype):
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value)
            if isinstance(value, dt.datetime) and dtype.tz is not None and value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)  # naive means UTC, like the session
        elif pa.types.is_date32(dtype) and isinstance(value, str):
            value = dt.date.fromisoformat(value)
        elif pa.types.is_boolean(dtype) and isinstance(value, str):
            value = {"true": True, "false": False}[value.lower()]
        if isinstance(value, str) and not pa.types.is_string(dtype):
            return pa.array([value]).cast(dtype).to_pylist()[0]
        return pa.array([value], type=dtype).to_pylist()[0]
    except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise ValueError(f"value {value!r} for column {column!r} is not a valid {dtype}: {exc}") from exc


def partition_string(value: Any) -> str | None:
    """A typed partition value as Delta serialises it in `partitionValues`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)

"""The table catalog: one registry of tables, typed rows that match their schemas field for field,
write policies that refuse the wrong arguments, and no Delta access outside segspark/io."""

from __future__ import annotations

import datetime as dt
import re
import types
import typing

import pytest
from pyspark.sql import types as T

from segspark.config import OutputConfig
from segspark.io.catalog import TABLES, RunRow, SegmentTransitionRow, Table, WritePolicy, stream_tables, table
from segspark.io.tables import table_path, write_rows

from .conftest import REPO

_SCALARS = {
    T.StringType: str, T.IntegerType: int, T.LongType: int, T.DoubleType: float, T.FloatType: float,
    T.BooleanType: bool, T.DateType: dt.date, T.TimestampType: dt.datetime,
}


def _python_type(datatype: T.DataType, nullable: bool):
    """The annotation a row field of this Spark type has (`X | None` where the column is nullable)."""
    if isinstance(datatype, T.ArrayType):
        hint = list[_python_type(datatype.elementType, datatype.containsNull)]
    elif isinstance(datatype, T.MapType):
        hint = dict[_python_type(datatype.keyType, False), _python_type(datatype.valueType, datatype.valueContainsNull)]
    else:
        hint = _SCALARS[type(datatype)]
    return hint | None if nullable else hint


def _optional(hint) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_none(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if _optional(hint) and len(args) == 1 else hint


def _same(hint, expected) -> bool:
    """`hint` fits a column of type `expected`: equal, or not nullable where the column allows null."""
    if hint == expected:
        return True
    if _optional(expected):
        return _same(_strip_none(hint), _strip_none(expected))
    if _optional(hint):
        return False
    origin = typing.get_origin(hint)
    if origin is not None and origin is typing.get_origin(expected) and origin in (list, dict):
        return all(_same(a, b) for a, b in zip(typing.get_args(hint), typing.get_args(expected), strict=True))
    return False


ROW_TABLES = [t for t in TABLES.values() if t.row is not None]


@pytest.mark.parametrize("spec", ROW_TABLES, ids=[t.name for t in ROW_TABLES])
def test_row_classes_match_their_table_schema_field_for_field(spec: Table):
    hints = typing.get_type_hints(spec.row)
    assert list(hints) == spec.schema.names
    for field in spec.schema.fields:
        expected = _python_type(field.dataType, field.nullable)
        assert _same(hints[field.name], expected), (spec.name, field.name, hints[field.name], expected)


def test_the_registry_is_consistent():
    assert list(TABLES) == [t.name for t in TABLES.values()]
    for spec in TABLES.values():
        assert spec.description and spec.keys, spec.name
        if spec.schema is not None:
            assert set(spec.keys) <= set(spec.schema.names), spec.name
            assert set(spec.partition_by) <= set(spec.schema.names), spec.name
        if spec.policy is WritePolicy.REPLACE_RUN:
            assert "run_id" in spec.keys, spec.name
        else:  # written once per txn: only the stream's tables
            assert spec.txn_suffix is not None, spec.name
        assert (spec.policy is WritePolicy.REPLACE_PARTITIONS) == (len(spec.partition_by) == 1), spec.name
    suffixes = [t.txn_suffix for t in stream_tables()]
    assert len(set(suffixes)) == len(suffixes)
    # The contract tables of DESIGN.md and the README.
    for name in ("quarantine", "user_features", "user_segments", "segment_profiles", "segment_transitions", "runs"):
        assert name in TABLES
    with pytest.raises(ValueError, match="no table 'nope' in the catalog"):
        table("nope")
    assert table_path(OutputConfig(root="/x"), TABLES["runs"]) == table_path(OutputConfig(root="/x"), "runs") == "/x/runs"


def test_typed_rows_become_a_frame_with_the_table_schema(spark):
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    runs = TABLES["runs"]
    row = RunRow("r1", at, None, "running", "h", dt.date(2026, 1, 2), 3, 2, 1, 2, "{}")
    df = runs.frame(spark, [row])
    assert df.schema == runs.schema
    got = df.collect()[0]
    assert (got.run_id, got.as_of, got.finished_at, got.metrics) == ("r1", dt.date(2026, 1, 2), None, "{}")
    assert runs.frame(spark, []).schema == runs.schema
    with pytest.raises(TypeError, match="takes RunRow rows, got SegmentTransitionRow"):
        runs.frame(spark, [SegmentTransitionRow(dt.date(2026, 1, 2), "r1", "kmeans", 1, 2, 3)])
    # No rows at all is a commit of nothing (a stream's txn) for any table of a fixed schema; rows
    # need the table's typed row.
    assert TABLES["user_segments"].frame(spark, []).schema == TABLES["user_segments"].schema
    with pytest.raises(TypeError, match="no typed rows"):
        TABLES["user_segments"].frame(spark, [runs.row])
    with pytest.raises(TypeError, match="no typed rows"):
        TABLES["user_features"].frame(spark, [])


def test_write_policies_refuse_the_wrong_arguments(spark, tmp_path):
    out = OutputConfig(root=str(tmp_path / "out"))
    df = spark.createDataFrame([("a", 1)], "user_id string, bucket int")
    with pytest.raises(ValueError, match="pass the run_id"):
        write_rows(spark, out, "user_features", df)
    with pytest.raises(ValueError, match="takes no run_id"):
        write_rows(spark, out, "stream_batches", df, "r1", txn=("app.stream_batches", 0))
    with pytest.raises(ValueError, match="once per txn"):
        write_rows(spark, out, "segment_drift", df)
    with pytest.raises(ValueError, match="only REPLACE_PARTITIONS tables"):
        write_rows(spark, out, "stream_feature_state", df, txn=("app.state", 0))
    assert not (tmp_path / "out").exists()


# Opening a Delta table: delta-rs, or the connector's data source. The connector probe of the session
# factory resolves the data source and opens no table; the bundle manifest names deltalake as one of
# the libraries whose versions it records.
_DELTA = re.compile(r"\bDeltaTable\b|^\s*(from|import)\s+deltalake\b|\.format\(\s*[\"']delta[\"']\s*\)", re.M)
_ALLOWED = {"segspark/runtime/session.py": ['.format("delta").load("/segspark-delta-probe-does-not-exist")']}


def test_nothing_outside_io_opens_a_delta_table():
    found = []
    for path in sorted((REPO / "segspark").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("segspark/io/"):
            continue
        text = path.read_text()
        for allowed in _ALLOWED.get(rel, []):
            assert allowed in text, f"{rel}: the allowed use {allowed!r} is gone; drop it from _ALLOWED"
            text = text.replace(allowed, "")
        found += [f"{rel}: {m.group(0).strip()}" for m in _DELTA.finditer(text)]
    assert found == [], "Delta tables are opened through segspark.io only:\n" + "\n".join(found)

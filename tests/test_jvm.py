"""runtime.jvm: PySpark's lookups of Spark's static classes are kept in Python, so building a column
makes one py4j round trip (the call) instead of three; the calls and their results are unchanged."""

from __future__ import annotations

import threading

import py4j.clientserver
import pytest
from pyspark.sql import functions as F

from segspark.runtime import jvm
from segspark.runtime.session import apply_required_conf


@pytest.fixture
def sent(monkeypatch):
    """The py4j commands this thread sends (py4j's own finalizer thread sends deletions meanwhile)."""
    commands: list[str] = []
    real = py4j.clientserver.ClientServerConnection.send_command
    me = threading.get_ident()

    def recording(self, command, *args, **kwargs):
        if threading.get_ident() == me:
            commands.append(command)
        return real(self, command, *args, **kwargs)

    monkeypatch.setattr(py4j.clientserver.ClientServerConnection, "send_command", recording)
    return commands


def _reflection(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith("r\n")]  # py4j's class and member lookups


def test_a_column_is_built_without_asking_the_jvm_for_its_class_or_method(spark, sent):
    def build():
        column, literal = F.col("user_id"), F.lit(2.5)
        frame = spark.createDataFrame([("a",)], "user_id string").select("user_id", F.upper("user_id").alias("up"))
        assert [(row.user_id, row.up) for row in frame.collect()] == [("a", "A")]
        assert str(column) == "Column<'user_id'>" and str(literal) == "Column<'2.5'>"

    build()  # each method is looked up once, the first time
    sent.clear()
    build()
    lookups = _reflection(sent)
    assert not [c for c in lookups if "functions" in c or "PythonUtils" in c], lookups


def test_the_first_lookup_asks_once_and_fields_are_asked_every_time(spark, sent):
    view = spark.sparkContext._jvm
    remembered = jvm._RememberedClass("java.lang.Integer", spark.sparkContext._gateway._gateway_client)
    assert remembered.parseInt("42") == 42 and remembered.parseInt("7") == 7
    assert remembered.MAX_VALUE == remembered.MAX_VALUE == 2**31 - 1
    lookups = _reflection(sent)
    assert len([c for c in lookups if "\nparseInt\n" in c]) == 1  # a static method: kept
    assert len([c for c in lookups if "\nMAX_VALUE\n" in c]) == 2  # a field: its value may change
    assert "MAX_VALUE" not in vars(remembered)
    # The view holds one remembering class per Spark class, under each name PySpark uses for it.
    assert vars(view)["functions"] is vars(view)["org.apache.spark.sql.functions"]
    assert isinstance(vars(view)["PythonUtils"], jvm._RememberedClass)


def test_remembering_again_keeps_the_classes_and_a_missing_class_is_skipped(spark, monkeypatch):
    view = spark.sparkContext._jvm
    before = {name: vars(view).get(name) for name in jvm.STATIC_CLASSES}
    assert isinstance(before["org.apache.spark.sql.functions"], jvm._RememberedClass)
    monkeypatch.setattr(jvm, "STATIC_CLASSES", (*jvm.STATIC_CLASSES, "org.example.NoSuchClass"))
    assert apply_required_conf(spark) is spark
    assert {name: vars(view)[name] for name in before} == before
    assert "org.example.NoSuchClass" not in vars(view)

"""Fewer py4j round trips between the driver's Python and its JVM (classic sessions only).

py4j makes one socket round trip per call, and its list converters make one per element: handing
Spark 53 column names and 54 probabilities, then reading back a 53 x 54 result, was measured at
3,300 round trips (2 s of a 400-user run, more than the job itself). The bulk helpers move each
array in one call (a 2-d result in one per row).

`remember_static_lookups` keeps what PySpark looks up for every column it builds: `F.col("x")` asks
the JVM for the class `org.apache.spark.sql.functions`, then for its method `col`, then calls it,
and the first two answers never change. A bare name (`functions`, `PythonUtils`) is also tried as a
class of the default package and of each of the view's imports first, each miss a search of the
classpath. In a warm 10k-event stream micro-batch these lookups were 3.5k of its ~8k round trips
(each 60-130 us on this 2-core machine: a socket write, the JVM's reflection, a socket read).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from py4j.java_gateway import JavaClass, JavaMember
from py4j.protocol import Py4JError
from pyspark.sql import DataFrame, SparkSession

from segspark.runtime.session import is_connect

# The static classes PySpark resolves through the gateway's JVM view while building columns and
# plans, as it names them (`pyspark.sql.functions`, `pyspark.sql.classic.column`, `_to_seq`, ...).
# A name missing from this Spark is skipped.
STATIC_CLASSES = (
    "org.apache.spark.sql.functions",
    "functions",
    "PythonUtils",
    "PythonSQLUtils",
    "org.apache.spark.sql.classic.SparkSession",
    "org.apache.spark.sql.expressions.Window",
    "org.apache.spark.ml.functions",
)

_SEPARATOR = "\u001f"  # the ASCII unit separator: never in a column name segspark writes


def doubles(gateway, values) -> object:
    """A Java double[] in one py4j call: JSON carries every double exactly (Python writes the
    shortest repr that reads back the same)."""
    numbers = [float(v) for v in np.asarray(values, dtype=float).ravel()]
    return gateway.jvm.org.apache.spark.mllib.linalg.Vectors.fromJson(json.dumps({"type": 1, "values": numbers})).toArray()


def strings(gateway, values: Sequence[str]) -> object:
    """A Java String[] in two py4j calls."""
    joined = _SEPARATOR.join(values)
    if any(_SEPARATOR in v for v in values) or any(not v for v in values):
        raise ValueError(f"strings: a value is empty or holds U+001F: {list(values)!r}")
    # py4j hands java.lang.String back as a Python str: the split is Pattern's, which returns String[].
    return gateway.jvm.java.util.regex.Pattern.compile(_SEPARATOR).split(joined, -1)


def approx_quantiles(frame: DataFrame, columns: Sequence[str], probabilities: Sequence[float],
                     relative_error: float) -> list[list[float]]:
    """`DataFrame.approxQuantile(columns, probabilities, relative_error)`, the same Spark call, with
    its arguments and its result moved in one py4j call each (on a classic session; over Spark
    Connect there is no JVM here and the plain call is one request anyway)."""
    if is_connect(frame.sparkSession):
        return frame.approxQuantile(list(columns), list(probabilities), relative_error)
    gateway = frame.sparkSession.sparkContext._gateway
    result = frame._jdf.stat().approxQuantile(strings(gateway, columns), doubles(gateway, probabilities),
                                              float(relative_error))
    # One call per column: Java's Double.toString reads back to the same double, and json reads its
    # Infinity and NaN too.
    text = gateway.jvm.java.util.Arrays
    return [json.loads(text.toString(result[i])) for i in range(len(columns))]


class _RememberedClass(JavaClass):
    """A py4j JavaClass that keeps the static methods and nested classes it looked up (the same for
    the JVM's life) as attributes of its own, so a later lookup makes no round trip. A field is asked
    each time: its value may change."""

    def __getattr__(self, name):
        member = super().__getattr__(name)
        if isinstance(member, JavaMember | JavaClass):
            self.__dict__[name] = member
        return member


def remember_static_lookups(spark: SparkSession) -> None:
    """Put a remembering JavaClass for each of STATIC_CLASSES in the session's JVM view, where
    PySpark's lookups (`getattr(sc._jvm, name)`) find it before asking the JVM. Calls go on as
    before (same class, same method, same arguments): only the lookups are saved. Nothing on a Spark
    Connect session (no JVM here), and nothing where the view does not take attributes."""
    if is_connect(spark):
        return
    view = spark.sparkContext._jvm
    by_class: dict[str, _RememberedClass] = {}
    for name in STATIC_CLASSES:
        try:
            if isinstance(vars(view).get(name), _RememberedClass):
                continue
            found = getattr(view, name)
            if isinstance(found, JavaClass):
                remembered = by_class.setdefault(found._fqn, _RememberedClass(found._fqn, found._gateway_client))
                setattr(view, name, remembered)
        except (Py4JError, AttributeError, TypeError):  # not in this Spark, or a view of another make
            continue

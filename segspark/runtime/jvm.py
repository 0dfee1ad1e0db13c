"""Bulk transfers between the driver's Python and its JVM (classic sessions only).

py4j makes one socket round trip per call, and its list converters make one per element: handing
Spark 53 column names and 54 probabilities, then reading back a 53 x 54 result, was measured at
3,300 round trips (2 s of a 400-user run, more than the job itself). These helpers move each array
in one call (a 2-d result in one per row).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from pyspark.sql import DataFrame

from segspark.runtime.session import is_connect

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

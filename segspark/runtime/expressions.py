"""Column expressions built once per fitted object, then reused by every DataFrame that applies it.

Building an expression costs a call to the JVM per function (about 0.1-0.3 ms each through py4j on
this project's machines), and preparing and scoring a bundle's users builds thousands of them: a
stream that rebuilt them for every micro-batch spent about a second per batch on it. Expressions
such as `F.col(...)` are unresolved until a DataFrame uses them, so the same Column serves any
number of DataFrames. They belong to the session's JVM: the memo is kept per SparkContext (a new
session builds them again) and outside the object, which stays picklable (Columns are not).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

# id(owner) -> (the JVM context the expressions belong to, {key: value}); dropped with the owner.
_MEMO: dict[int, tuple[object, dict[Hashable, Any]]] = {}


def memoised(owner: object, key: Hashable, build: Callable[[], T]) -> T:
    """`build()` (Columns, or anything made of them) the first time `owner` asks for `key` in this
    JVM context, the same value afterwards. `owner` must not change what `build` reads."""
    context = jvm_context()
    entry = _MEMO.get(id(owner))
    if entry is None or entry[0] is not context:
        entry = (context, {})
        if id(owner) not in _MEMO:
            weakref.finalize(owner, _MEMO.pop, id(owner), None)
        _MEMO[id(owner)] = entry
    values = entry[1]
    if key not in values:
        values[key] = build()
    return values[key]


def jvm_context() -> object:
    """What the Columns `pyspark.sql.functions` builds now belong to: the Connect marker while Spark
    Connect is on (the functions then build Connect's plain expression trees, which any Connect
    session can send; a process may hold a classic session beside it), else the active
    SparkContext's Java context (classic)."""
    from pyspark import SparkContext
    from pyspark.sql.utils import is_remote

    if is_remote():
        return _CONNECT
    sc = SparkContext._active_spark_context
    return sc._jsc if sc is not None else _CONNECT


_CONNECT = object()

__all__ = ["jvm_context", "memoised"]

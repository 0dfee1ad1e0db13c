"""runtime.expressions.memoised: Column expressions built once per object, reused across DataFrames."""

from __future__ import annotations

import gc

from pyspark.sql import functions as F

from segspark.runtime import expressions
from segspark.runtime.expressions import memoised


class _Owner:
    pass


def test_one_build_per_owner_and_key_reused_by_any_dataframe(spark):
    owner, other, builds = _Owner(), _Owner(), []

    def build():
        builds.append(1)
        return [(F.col("id") * 2).alias("twice"), F.transform(F.array("id", "id"), lambda x: x + 1).alias("plus")]

    first = memoised(owner, "scores", build)
    assert memoised(owner, "scores", build) is first and len(builds) == 1
    assert memoised(other, "scores", build) is not first and len(builds) == 2
    # The same Column objects, unresolved until used, serve DataFrames of different plans.
    small = spark.range(3).select(*first).collect()
    large = spark.range(5).where("id >= 3").select(*first).collect()
    assert [(r.twice, r.plus) for r in small] == [(0, [1, 1]), (2, [2, 2]), (4, [3, 3])]
    assert [(r.twice, r.plus) for r in large] == [(6, [4, 4]), (8, [5, 5])]


def test_the_memo_goes_with_its_owner(spark):
    owner = _Owner()
    memoised(owner, "k", lambda: F.lit(1))
    key = id(owner)
    assert key in expressions._MEMO
    del owner
    gc.collect()
    assert key not in expressions._MEMO

"""A guard that stops a run instead of letting non-finite values reach a model.

Ingest quarantines NaN, infinite and implausible prices and quantities, and the features are
defined without NaN or infinity (README, Features); still, a bug upstream, a permissive
`input.price_bounds` (sums overflow to infinity) or a `user_features` table written by another tool
must not poison a model silently: Spark's NaN is not null, so nothing imputes it, and one value
wrecks the scaling of every user. The feature and prepare stages refuse such values. The counts are
extra columns of one aggregation over the users (in preparation, the imputation's own agg; in the feature
stage, the pass that counts the users and fills the cache the write reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import DataType, DecimalType, DoubleType, FloatType

from segspark.errors import NonFiniteError

_PREFIX = "non_finite:"


def can_be_non_finite(dtype: DataType) -> bool:
    return isinstance(dtype, (DoubleType, FloatType, DecimalType))


def non_finite_counts(names: Sequence[str]) -> list[Column]:
    """Aggregate expressions: per column, the rows (users) whose value is NaN or +-infinity."""
    def bad(name: str) -> Column:
        value = F.col(name).cast("double")
        return F.isnan(value) | (F.abs(value) == F.lit(float("inf")))

    return [F.count_if(bad(name)).alias(f"{_PREFIX}{name}") for name in names]


def check_finite(row: Mapping[str, object], names: Sequence[str], users: int | None, stage: str, hint: str) -> None:
    """NonFiniteError naming every column of `names` that `non_finite_counts` found bad in `row`."""
    bad = {name: int(row[f"{_PREFIX}{name}"] or 0) for name in names}
    bad = {name: n for name, n in bad.items() if n}
    if not bad:
        return
    of = f" of {users:,}" if users is not None else ""
    listed = ", ".join(f"{name!r} ({n:,}{of} users)" for name, n in bad.items())
    raise NonFiniteError(
        f"{stage}: NaN or infinite values in {len(bad)} feature{'s' if len(bad) > 1 else ''}: {listed}. "
        f"A model fitted on them would be garbage, so the run stops here; {hint}"
    )

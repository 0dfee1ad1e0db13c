"""Feature preparation for models: impute, log-transform heavy tails, assemble, scale.

The row-local steps (imputation rules, log1p) are plain column expressions; the scaler is an MLlib
StandardScaler fitted inside the model's Pipeline, so a saved model carries its fitted preparation
and scoring never refits it on the data being scored.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.schema import FEATURE_COLUMNS

FEATURES_VECTOR = "_features"
SCALED_VECTOR = "_scaled"


def signed_log1p(col: Column) -> Column:
    """log1p for values that may be negative (net revenue after returns): sign(x) * log1p(|x|)."""
    return F.signum(col) * F.log1p(F.abs(col))


def model_inputs(features: DataFrame, log_transform: Sequence[str]) -> DataFrame:
    """Numeric model inputs named like the features, nulls imputed, heavy tails log-transformed.

    Imputation rule: a user who never purchased has no recency; they are treated as if their last
    purchase were as old as their whole tenure (the longest recency they could have).
    """
    unknown = sorted(set(log_transform) - set(FEATURE_COLUMNS))
    if unknown:
        raise ValueError(
            f"models.*.log_transform names unknown features {unknown}; known features: {', '.join(FEATURE_COLUMNS)}"
        )
    columns = []
    for name in FEATURE_COLUMNS:
        value = F.col(name).cast("double")
        if name == "recency_days":
            value = F.coalesce(value, F.col("tenure_days").cast("double"))
        value = F.coalesce(value, F.lit(0.0))
        if name in log_transform:
            value = signed_log1p(value)
        columns.append(value.alias(name))
    return features.select("user_id", *columns)


def preparation_stages(input_columns: Sequence[str]) -> list:
    """MLlib stages that turn model inputs into a standardised vector (mean 0, unit variance)."""
    return [
        VectorAssembler(inputCols=list(input_columns), outputCol=FEATURES_VECTOR, handleInvalid="error"),
        StandardScaler(inputCol=FEATURES_VECTOR, outputCol=SCALED_VECTOR, withMean=True, withStd=True),
    ]

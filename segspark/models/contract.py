"""The contract every segmentation model keeps, and the pieces they share.

A model type (models.registry) names an implementation module. A *fitted* model (`SegmentModel`)
has a name, a k, an objective (lower is better) and an anomaly threshold; it gives its metrics,
assigns every user on the executors (`assign`, the `ASSIGNMENT_COLUMNS`), scores users with any
side outputs (`score`: the deep model's embeddings), and saves itself into a bundle folder and loads
back from it. What segments, the bundle, scoring, streaming and the report need of a model goes
through this contract, never through a model's name.

The shared pieces exist once, here:
- `anomaly_flag`: the is_anomaly column of every model (a null score is never flagged);
- `threshold_aggregate` / `sample_threshold`: the (1 - contamination) quantile of the training
  users' scores, computed by Spark or on a sample;
- `assignments`: the assignment columns in their table order; `squared_distances` to the centres
  (`centre_sums`: one pass over a point), and `double_array`, a literal in one call to the JVM;
- `check_fit_arguments`: k, contamination and quantile accuracy, checked the same way by every fit;
- `MLlibSaving`: saving a fitted dataclass whose fields are numbers or MLlib models.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType

# The columns `assign` returns after user_id: user_segments' model columns (segment as the model
# numbers its clusters until segments.ids maps it to stable ids).
ASSIGNMENT_COLUMNS = ("segment", "probability", "anomaly_score", "is_anomaly", "probabilities")
QUANTILE_RELATIVE_ERROR = 0.001  # rank error of an anomaly threshold: 0.1% of the training users
NOISE_SEGMENT = -1  # the segment of users a density model calls noise


@runtime_checkable
class SegmentModel(Protocol):
    """A fitted model, as segments, the bundle, scoring and streaming use it."""

    model_name: str
    k: int
    anomaly_threshold: float | None

    @property
    def objective(self) -> float: ...

    def metrics(self) -> dict: ...

    def assign(self, prepared: DataFrame) -> DataFrame: ...

    def score(self, prepared: DataFrame) -> Scored: ...

    def save(self, bundle_dir: str) -> dict: ...


class BundleFiles(Protocol):
    """Paths inside a bundle folder, checked against its manifest when scoring (bundle.models)."""

    def file(self, relative: str, what: str) -> Path: ...

    def directory(self, relative: str, what: str) -> str: ...


@dataclass(frozen=True)
class Scored:
    """A model applied to prepared users: its assignments, the tables it adds (name -> frame with
    user_id first, e.g. the deep model's user_embeddings), and frames it persisted on the way
    (unpersist once everything is written)."""

    assignments: DataFrame  # user_id + ASSIGNMENT_COLUMNS
    outputs: dict[str, DataFrame] = field(default_factory=dict)
    cached: list[DataFrame] = field(default_factory=list)


@dataclass
class TrainedModel:
    """A model fitted on a run's users, before stable ids: what `segments.stable_segments` takes."""

    name: str
    k: int
    reason: str
    fitted: SegmentModel
    curve: list[dict]
    scored: Scored  # every user's assignments (segment as the model numbers its clusters) and outputs
    metrics: dict = field(default_factory=dict)
    # Prepared vectors -> the space the model clusters in, where its silhouette is measured (the deep
    # model's encoder); None: the prepared features themselves.
    embed: Callable[[np.ndarray], np.ndarray] | None = None
    space: str = "prepared features"

    @property
    def raw(self) -> DataFrame:
        return self.scored.assignments


def anomaly_flag(score: Column, threshold: float | None) -> Column:
    """is_anomaly: the score above the threshold; never for a null score, nobody without a threshold."""
    if threshold is None:
        return F.lit(False)
    return F.coalesce(score > F.lit(float(threshold)), F.lit(False))


def threshold_aggregate(score: Column, contamination: float, relative_error: float = QUANTILE_RELATIVE_ERROR) -> Column:
    """The aggregate whose value is the anomaly threshold: the (1 - contamination) quantile of the
    training users' scores, to within `relative_error` in rank."""
    accuracy = max(1, round(1.0 / relative_error))
    return F.percentile_approx(score, 1.0 - contamination, accuracy)


def sample_threshold(scores: np.ndarray, contamination: float) -> float | None:
    """The same quantile of scores computed on a sample in memory (None: nobody is flagged)."""
    finite = np.asarray(scores, dtype=float)
    finite = finite[np.isfinite(finite)]
    if contamination <= 0 or finite.size == 0:
        return None
    return float(np.quantile(finite, 1.0 - contamination))


def assignments(scored: DataFrame, threshold: float | None, probabilities: str | None = None) -> DataFrame:
    """user_id + ASSIGNMENT_COLUMNS of a frame with user_id, segment, probability and anomaly_score
    (and the membership vector's column for a soft model; null otherwise)."""
    vector = F.col(probabilities) if probabilities else F.lit(None).cast(ArrayType(DoubleType()))
    return scored.select(
        "user_id",
        F.col("segment").cast("int").alias("segment"),
        "probability",
        "anomaly_score",
        anomaly_flag(F.col("anomaly_score"), threshold).alias("is_anomaly"),
        vector.alias("probabilities"),
    )


def squared_distances(point: Column, centres: Sequence[Sequence[float]]) -> Column:
    """[||point - c||^2 for c in centres]: an array<double> column of a point array column and fixed
    centres, as Spark expressions (no UDF); each distance summed from 0.0 in coordinate order."""
    return centre_sums(point, centres, [0.0] * len(centres), lambda x, c: (x - c) * (x - c))


def centre_sums(point: Column, centres: Sequence[Sequence[float]], start: Sequence[float],
                term: Callable[[Column, Column], Column], finish: Callable[[Column], Column] | None = None) -> Column:
    """[start[j] + term(x_0, c_j0) + term(x_1, c_j1) + ... for each centre c_j]: an array<double>
    column, each sum taken from start[j] in coordinate order, in one pass over the point; `finish`,
    when given, turns that array into the column's value in the same pass.

    Why one pass: Spark runs higher-order functions interpreted, and in Spark 4.2 every element they
    read from a row's array looks its type up through `SQLConf.get`, which on an executor builds a
    new read-only conf each time (`TypeOps.apply`). One `aggregate(zip_with(point, centre))` per
    centre read the point k times (k x d lookups per row, and the point's expression evaluated k
    times); here it is read once, against the centres' coordinates as one nested literal (arrays
    the function builds itself are read without the lookup). 200,000 points, 8 centres, 33
    coordinates: 2.3-2.7 s against 5.0-6.2 s, the same doubles (`/work/notes/dist_once.py`)."""
    centres = np.asarray(centres, dtype=np.float64)
    by_coordinate = F.expr(f"array({', '.join(double_array_sql(column) for column in centres.T)})")
    terms = F.zip_with(point, by_coordinate, lambda x, column: F.transform(column, lambda c: term(x, c)))
    return F.aggregate(terms, double_array(start), lambda sums, t: F.zip_with(sums, t, lambda s, v: s + v), finish)


def double_array(values: Sequence[float]) -> Column:
    """An array<double> literal of finite `values`, built in one call to the JVM: `F.array` of `F.lit`s
    makes one call per value, thousands per scoring of a few models (seconds in a stream's batch).
    Python's repr of a float is the shortest text that reads back as the same double, which is what
    Spark's parser does with it."""
    return F.expr(double_array_sql(values)) if len(values) else F.array().cast(ArrayType(DoubleType()))


def double_array_sql(values: Sequence[float]) -> str:
    """`double_array`'s SQL text: array(v1D, v2D, ...)."""
    return f"array({', '.join(double_sql(value) for value in values)})"


def double_sql(value: float) -> str:
    """A finite double as SQL text that reads back as the same double."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"double_array: {value} is not a finite number")
    return f"{value!r}D"


def check_fit_arguments(k: int, contamination: float, quantile_relative_error: float = QUANTILE_RELATIVE_ERROR) -> None:
    """What every fit requires of its arguments, with the same messages."""
    if k < 2:
        raise ValueError(f"k={k}: expected at least 2 clusters")
    if not 0.0 <= contamination < 0.5:
        raise ValueError(f"contamination={contamination}: expected a share in [0, 0.5), e.g. 0.01")
    if not 0.0 < quantile_relative_error < 1.0:
        raise ValueError(f"quantile_relative_error={quantile_relative_error}: expected a value in (0, 1), e.g. 0.001")


class MLlibSaving:
    """Save and load for a fitted dataclass of plain numbers and MLlib models (`SPARK_FIELDS`: field ->
    the MLlib model class). MLlib models go to `mllib/<model>/<field>` with MLlib's own writer; the
    numbers into the JSON the bundle writes (what `save` returns), the MLlib fields as their paths."""

    SPARK_FIELDS: ClassVar[Mapping[str, str]] = {}
    # Fields that bundles of earlier versions saved as an MLlib model and that are now numbers:
    # field -> (MLlib class, how to turn the loaded model into the numbers).
    LEGACY_FIELDS: ClassVar[Mapping[str, tuple[str, Callable[[Any], Any]]]] = {}

    def score(self, prepared: DataFrame) -> Scored:
        return Scored(self.assign(prepared))  # type: ignore[attr-defined]

    def save(self, bundle_dir: str) -> dict:
        root, name = Path(bundle_dir), self.model_name  # type: ignore[attr-defined]
        numbers: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.SPARK_FIELDS:
                if value is not None:
                    value.write().overwrite().save(str(root / "mllib" / name / f.name))
                numbers[f.name] = None if value is None else f"mllib/{name}/{f.name}"
            else:
                numbers[f.name] = value
        return numbers

    @classmethod
    def load(cls, name: str, numbers: Mapping[str, Any], files: BundleFiles):
        """Model `name` from its saved numbers; `files` resolves its MLlib folders in the bundle."""
        values = dict(numbers)
        for field_name, spark_class in cls.SPARK_FIELDS.items():
            relative = values.get(field_name)
            what = f"models/{name}.json fitted.{field_name} (an MLlib model directory)"
            values[field_name] = None if relative is None else _spark_class(spark_class).load(files.directory(relative, what))
        for field_name, (spark_class, convert) in cls.LEGACY_FIELDS.items():
            if isinstance(values.get(field_name), str):
                what = f"models/{name}.json fitted.{field_name} (an MLlib model directory)"
                values[field_name] = convert(_spark_class(spark_class).load(files.directory(values[field_name], what)))
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})


def _spark_class(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

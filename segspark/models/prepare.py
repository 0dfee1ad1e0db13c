"""Feature preparation for models: impute, signed log1p, cap, select, scale; fitted once and reused.

Steps, in this order: impute -> log1p -> cap -> selection -> scale -> family weights (config:
`prepare.*`). The default scaling, `quantile`, maps each feature through its training users'
distribution (a piecewise-linear rank map with `quantile_knots` knots) before standardising it;
family weighting then gives each family of correlated features (`prepare.families`) the total
weight of one feature. Both are judged in scripts/quality.py on a clean and an overlapping persona
set (README, "Preparation").

Fitting (`fit_preparation`) runs on the executors in three passes and brings back only small
aggregates: the imputation statistics (one agg), one approxQuantile call for the caps and the
near-constant check (and the quantile knots), and one pass of per-partition numpy statistics
(`_column_moments`) that gives the near-constant shares, the d x d Pearson correlation matrix, the
scaling constants and the correlations the families are built from. The result, `FittedPreparation`, is plain
data: it is saved as JSON with the run, and its `transform` is a select of column expressions over
those constants (plus, with quantile scaling, one vectorised numpy pass for the rank maps), so
scoring other users applies the training run's preparation and never refits it on the data being
scored.

Selection is unsupervised: a feature is dropped when at least `near_constant_share` of the users
have one value, or when its |Pearson r| with an already kept feature exceeds `max_abs_correlation`
(features are walked in order, so the later of a correlated pair goes). Features in
`selection.keep` are never dropped and count as kept from the start. Every dropped feature and why
is logged and stored with the run (`metrics()`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StructField, StructType

from segspark.errors import ConfigError, UsageError
from segspark.features.finite import check_finite, non_finite_counts
from segspark.runtime.expressions import memoised
from segspark.runtime.jvm import approx_quantiles

# The preparation's mapInArrow runs in Python workers, which import this module to unpickle it: the
# config's pydantic models (annotations here) and pyspark.ml (the driver's VectorAssembler) would
# cost each new worker 0.25 s.
if TYPE_CHECKING:
    from segspark.config import PrepareConfig, SelectionConfig

log = logging.getLogger(__name__)

PREPARED_VECTOR = "features_vector"
FILE_NAME = "prepare.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no quantile knots, no family weights
RELATIVE_ERROR = 0.001  # of every approxQuantile: rank error 0.1% of the users
_MAPPED = "__rank"  # suffix of the rank-mapped columns while fitting (never a feature name)
NAMED_RULES = ("zero", "mean", "median", "max")
FEATURE_RULE = "feature:"


@dataclass(frozen=True)
class Imputation:
    """How nulls of one feature are filled.

    rule: zero | mean | median | max | value (a configured number) | feature (another feature).
    value: the fill value; for `feature`, the fallback when the source feature is null too (the
    source's median on the training users).
    """

    rule: str
    value: float
    source: str | None = None


@dataclass
class FittedPreparation:
    features: list[str]  # model inputs, in order
    impute: dict[str, Imputation]
    log1p: list[str]
    caps: dict[str, list[float | None]]  # feature -> [lower, upper]; None: that side is not capped
    scaling: str  # standard | minmax
    centre: dict[str, float]  # per selected feature: mean (standard) or min (minmax)
    scale: dict[str, float]  # per selected feature: std or max - min; never 0
    selected: list[str]  # kept features, in input order: the model's dimensions
    dropped: list[dict[str, str]]  # {"feature", "reason": near_constant | correlated, "detail"}
    settings: dict[str, Any] = field(default_factory=dict)  # the prepare config it was fitted with
    version: int = FORMAT_VERSION
    # quantile scaling: per selected feature [[x knots, strictly increasing], [their ranks in [0, 1]]]
    knots: dict[str, list[list[float]]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # family weights; a missing feature: 1
    families: list[list[str]] = field(default_factory=list)  # the families behind the weights

    def transform(self, df: DataFrame) -> DataFrame:
        """user_id, the selected prepared features (same names) and the `features_vector` column.

        Column expressions over the fitted constants, and with quantile scaling one vectorised
        numpy pass for the rank maps (`rank_mapped`): works on any users' features."""
        _require_columns(df, ["user_id", *self._inputs_needed()], "the DataFrame to prepare")
        # The expressions depend on the fitted constants only: built once (a stream prepares every batch).
        capped = df.select("user_id", *memoised(self, "capped", lambda: [self.capped(n).alias(n) for n in self.selected]))
        if self.knots:
            capped = rank_mapped(capped, self.knots)
        prepared = capped.select("user_id", *memoised(
            self, "scaled", lambda: [self.scaled(F.col(n), n).alias(n) for n in self.selected]))
        from pyspark.ml.feature import VectorAssembler

        assembler = VectorAssembler(inputCols=list(self.selected), outputCol=PREPARED_VECTOR, handleInvalid="error")
        return assembler.transform(prepared)

    def capped(self, name: str) -> Column:
        """One selected feature imputed, log1p'd and capped (the input of the scaling)."""
        return _clipped(_logged(_imputed(name, self.impute[name]), name in self.log1p), self.caps[name])

    def scaled(self, mapped: Column, name: str) -> Column:
        """The prepared value from the capped (and, quantile scaling, rank-mapped) one: scale, family weight."""
        scaled = (mapped - F.lit(self.centre[name])) / F.lit(self.scale[name])
        weight = self.weights.get(name, 1.0)
        return scaled if weight == 1.0 else scaled * F.lit(weight)

    def _inputs_needed(self) -> list[str]:
        sources = [self.impute[n].source for n in self.selected if self.impute[n].source]
        return list(dict.fromkeys([*self.selected, *sources]))

    def metrics(self) -> dict[str, Any]:
        return {
            "inputs": len(self.features),
            "selected": list(self.selected),
            "dropped": [dict(d) for d in self.dropped],
            "scaling": self.scaling,
            "families": [list(f) for f in self.families if len(f) > 1],  # singletons keep weight 1
        }

    # --- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FittedPreparation:
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"fitted preparation has version {data.get('version')!r}; expected one of "
                             f"{READABLE_VERSIONS}")
        fitted = cls(
            features=list(data["features"]),
            impute={name: Imputation(**spec) for name, spec in data["impute"].items()},
            log1p=list(data["log1p"]),
            caps={name: list(bounds) for name, bounds in data["caps"].items()},
            scaling=data["scaling"],
            centre={k: float(v) for k, v in data["centre"].items()},
            scale={k: float(v) for k, v in data["scale"].items()},
            selected=list(data["selected"]),
            dropped=[dict(d) for d in data["dropped"]],
            settings=dict(data.get("settings", {})),
            version=data["version"],
            knots={k: [list(map(float, v[0])), list(map(float, v[1]))] for k, v in data.get("knots", {}).items()},
            weights={k: float(v) for k, v in data.get("weights", {}).items()},
            families=[list(f) for f in data.get("families", [])],
        )
        constants = (fitted.impute, fitted.caps, fitted.centre, fitted.scale)
        if fitted.scaling == "quantile":
            constants += (fitted.knots,)
        missing = [n for n in fitted.selected if not all(n in table for table in constants)]
        if missing:
            raise ValueError(f"fitted preparation lacks constants for selected features {missing}")
        return fitted

    def save(self, path: str, spark: SparkSession | None = None) -> str:
        """Write `prepare.json` into the directory `path`; returns what was written.

        Local paths and file: URIs are written with plain file IO (atomically). Other schemes
        (dbfs:, s3a:, abfss:, gs:) are written through Spark when a session is given, as one text
        file under `path`, so the preparation sits next to the model on any store Spark can write."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)  # NaN/inf would not reload as JSON
        if _SCHEME.match(path) and not path.startswith("file:"):
            if spark is None:
                raise UsageError(f"saving the fitted preparation to {path!r} needs a SparkSession (save(path, spark))")
            spark.createDataFrame([(text,)], "value string").coalesce(1).write.mode("overwrite").text(path)
            return path
        target = _local_path(path) / FILE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        partial.write_text(text + "\n")
        os.replace(partial, target)  # readers never see half a file
        return str(target)

    @classmethod
    def load(cls, path: str, spark: SparkSession | None = None) -> FittedPreparation:
        """Read a preparation saved by `save` (the directory, or the prepare.json file itself)."""
        if _SCHEME.match(path) and not path.startswith("file:"):
            if spark is None:
                raise UsageError(f"loading the fitted preparation from {path!r} needs a SparkSession")
            return cls.from_dict(json.loads(spark.read.text(path, wholetext=True).first()[0]))
        target = _local_path(path)
        if target.is_dir() or target.name != FILE_NAME:
            target = target / FILE_NAME
        try:
            return cls.from_dict(json.loads(target.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no fitted preparation at {target}") from None


def signed_log1p(col: Column) -> Column:
    """log1p for values that may be negative (net revenue after returns): sign(x) * log1p(|x|)."""
    return F.signum(col) * F.log1p(F.abs(col))


# --- config validation ---------------------------------------------------------------------------


def check_config(cfg: PrepareConfig, feature_names: Sequence[str]) -> list[str]:
    """The model inputs for this config; ConfigError naming the key when it names unknown features."""
    known = list(feature_names)
    _known_only("prepare.features", cfg.features or [], known)
    _known_only("prepare.log1p", cfg.log1p, known)
    _known_only("prepare.impute", [k for k in cfg.impute if k != "default"], known)
    _known_only("prepare.selection.keep", cfg.selection.keep, known)
    for key, rule in cfg.impute.items():
        _parse_rule(f"prepare.impute.{key}", rule, known)
    inputs = list(known if cfg.features is None else cfg.features)
    if not inputs:
        raise ConfigError("prepare.features is empty; name at least one feature, or null for every feature")
    duplicates = sorted({n for n in inputs if inputs.count(n) > 1})
    if duplicates:
        raise ConfigError(f"prepare.features names {duplicates} more than once")
    return inputs


def _known_only(key: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [n for n in dict.fromkeys(names) if n not in set(known)]
    if unknown:
        raise ConfigError(f"{key} names unknown features {unknown}; known: {', '.join(known)}")


def _parse_rule(key: str, rule: str | float, known: Sequence[str]) -> tuple[str, float | None, str | None]:
    """(rule, configured number, source feature) of one imputation rule."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not math.isfinite(rule):
            raise ConfigError(f"{key}: the imputation value must be a finite number, found {rule!r}")
        return "value", float(rule), None
    text = str(rule).strip()
    if text in NAMED_RULES:
        return text, None, None
    if text.startswith(FEATURE_RULE):
        source = text[len(FEATURE_RULE) :].strip()
        if source not in known:
            raise ConfigError(f"{key}: {text!r} names an unknown feature {source!r}; known: {', '.join(known)}")
        return "feature", None, source
    raise ConfigError(
        f"{key}: unknown imputation rule {rule!r}; expected zero, mean, median, max, a number or feature:<name>"
    )


# --- fitting -------------------------------------------------------------------------------------


def fit_preparation(features: DataFrame, feature_names: Sequence[str], cfg: PrepareConfig) -> FittedPreparation:
    """Fit imputation, caps, selection and scaling on the training users (distributed)."""
    inputs = check_config(cfg, feature_names)
    default = cfg.impute.get("default", "zero")
    rules = {name: _parse_rule(f"prepare.impute.{name}", cfg.impute.get(name, default), feature_names)
             for name in inputs}
    _require_columns(features, list(dict.fromkeys([*inputs, *(r[2] for r in rules.values() if r[2])])),
                     "the features to fit on")

    impute = _fit_imputation(features, rules)
    log1p = [name for name in inputs if name in set(cfg.log1p)]
    before_cap = features.select(
        *[_logged(_imputed(name, impute[name]), name in log1p).alias(name) for name in inputs]
    )
    caps, near_constant, knots = _fit_quantiles(before_cap, inputs, cfg)
    capped = before_cap.select(*[_clipped(F.col(name), caps[name]).alias(name) for name in inputs])
    # With quantile scaling the scaling constants and the families come from the rank-mapped values
    # (Spearman-like correlations): the moments pass maps them itself and reports them under a
    # suffixed name.
    mapped = {name: f"{name}{_MAPPED}" for name in knots}

    keep = set(cfg.selection.keep)
    # One pass over the capped features gives what the rest needs: the near-constant shares, the
    # correlation matrix, the scaling's centres and spreads and the families' correlations.
    moments = _column_moments(capped, inputs, near_constant, knots)
    dropped = _near_constant(moments, near_constant, keep, set(log1p))
    remaining = [n for n in inputs if n not in {d["feature"] for d in dropped}]
    dropped += _correlated(moments, remaining, cfg.selection)
    gone = {d["feature"] for d in dropped}
    selected = [n for n in inputs if n not in gone]
    for entry in dropped:
        log.info("prepare: dropped %s (%s: %s)", entry["feature"], entry["reason"], entry["detail"])
    if not selected:
        raise ValueError(
            f"feature selection dropped every input feature ({sorted(gone)}); relax prepare.selection "
            "thresholds or list features in prepare.selection.keep"
        )
    scaled_columns = [mapped.get(n, n) for n in selected]
    centre, scale = _fit_scaling(moments, scaled_columns, "standard" if cfg.scaling == "quantile" else cfg.scaling)
    centre, scale = (dict(zip(selected, table.values(), strict=True)) for table in (centre, scale))
    families = (_families(moments, selected, scaled_columns, cfg.families.min_abs_correlation)
                if cfg.families.enabled else [[n] for n in selected])
    weights = {n: 1.0 / math.sqrt(len(family)) for family in families for n in family if len(family) > 1}
    for family in families:
        if len(family) > 1:
            log.info("prepare: family of %d correlated features, weight %.3f each: %s", len(family),
                     weights[family[0]], ", ".join(family))
    log.info("prepare: %d of %d features selected, %s scaling, %d families", len(selected), len(inputs),
             cfg.scaling, len(families))
    return FittedPreparation(
        features=inputs,
        impute=impute,
        log1p=log1p,
        caps=caps,
        scaling=cfg.scaling,
        centre=centre,
        scale=scale,
        selected=selected,
        dropped=dropped,
        settings=cfg.model_dump(mode="json"),
        knots={n: knots[n] for n in selected if n in knots},
        weights=weights,
        families=families,
    )


def _fit_imputation(features: DataFrame, rules: Mapping[str, tuple]) -> dict[str, Imputation]:
    """Means, maxima and medians from one agg (nulls ignored); a median is percentile_approx at the
    same relative error as the caps' approxQuantile. The same agg counts the users whose inputs are
    NaN or infinite (imputation fills nulls only): NonFiniteError names them (segspark.features.finite)."""
    wanted = {(rule, name) for name, (rule, _, _) in rules.items() if rule in ("mean", "max", "median")}
    # A feature rule falls back to its source's median when the source is null too.
    wanted |= {("median", source) for _, _, source in rules.values() if source}
    functions = {
        "mean": F.mean,
        "max": F.max,
        "median": lambda col: F.percentile_approx(col, 0.5, int(1 / RELATIVE_ERROR)),
    }
    aggregates = [functions[rule](_double(name)).alias(f"{rule}:{name}") for rule, name in sorted(wanted)]
    inputs = list(rules)
    stats = features.agg(*aggregates, *non_finite_counts(inputs), F.count(F.lit(1)).alias("users:")).first().asDict()
    check_finite(stats, inputs, stats["users:"], "prepare",
                 "the features to fit on must be finite: compute them again (`segspark features` or `segspark run`), "
                 "whose ingest quarantines NaN, infinite and implausible values (input.price_bounds)")

    fitted = {}
    for name, (rule, number, source) in rules.items():
        if rule == "value":
            value = number
        elif rule == "zero":
            value = 0.0
        elif rule == "feature":
            value = stats[f"median:{source}"]
        else:
            value = stats[f"{rule}:{name}"]
        # A feature that is null for every training user has no statistic: fill with 0.
        fitted[name] = Imputation(rule, _finite_or(value, 0.0), source)
    return fitted


def _fit_quantiles(frame: DataFrame, inputs: list[str], cfg: PrepareConfig):
    """Cap bounds, the near-constant candidates and (quantile scaling) the rank map's knots, from
    one approxQuantile call on every column."""
    share = cfg.selection.near_constant_share
    probabilities = [cfg.cap.lower, cfg.cap.upper, (1 - share) / 2, 1 - (1 - share) / 2]
    ranks = np.linspace(0.0, 1.0, cfg.quantile_knots).tolist() if cfg.scaling == "quantile" else []
    quantiles = approx_quantiles(frame, inputs, probabilities + ranks, RELATIVE_ERROR)
    caps, candidates, knots = {}, {}, {}
    for name, values in zip(inputs, quantiles, strict=True):
        lower, upper, low_mid, high_mid = _four(values[:4])
        # Quantile 0 or 1 means that side is not capped: scoring keeps values beyond the training range.
        bounds = [lower if cfg.cap.lower > 0 else None, upper if cfg.cap.upper < 1 else None]
        caps[name] = bounds
        # Capping is monotone, so the capped quantiles are the clipped ones.
        low_mid, high_mid = _clip_value(low_mid, bounds), _clip_value(high_mid, bounds)
        if low_mid == high_mid:
            candidates[name] = low_mid
        if ranks:
            knots[name] = _rank_knots([_clip_value(v, bounds) for v in values[4:]], ranks)
    return caps, candidates, knots


def _rank_knots(values: Sequence[float], ranks: Sequence[float]) -> list[list[float]]:
    """[[x], [rank]] of a piecewise-linear rank map from the quantiles `values` at `ranks`. Equal
    quantiles (a value many users share, such as 0 purchases) become one knot at their middle rank,
    as tied ranks are averaged, so the map is a function and those users sit at the tie's centre."""
    xs: list[float] = []
    groups: list[list[float]] = []
    for value, rank in zip(values, ranks, strict=True):
        if xs and value <= xs[-1]:  # equal (approxQuantile is monotone; <= guards rounding)
            groups[-1].append(rank)
        else:
            xs.append(float(value))
            groups.append([rank])
    return [xs, [float(np.mean(g)) for g in groups]]


def rank_map_values(values: np.ndarray, knots: Sequence[Sequence[float]]) -> np.ndarray:
    """The rank map of `values`: the knots' ranks, linear in between, clamped outside (np.interp;
    one knot: its rank). Fitting and `rank_mapped` both call this, so they agree to the bit."""
    xs, ps = knots
    return np.interp(values, xs, ps)


def rank_mapped(frame: DataFrame, knots: Mapping[str, Sequence[Sequence[float]]]) -> DataFrame:
    """`frame` with each column named in `knots` replaced by its rank map, in one vectorised pass
    (mapInArrow; the other columns pass through). As Spark expressions the maps of a few dozen
    features exceed the JVM's 64 KB method limit, and whole-stage code generation then fails."""
    import pyarrow as pa

    mapped = {name: ([float(x) for x in xs], [float(p) for p in ps]) for name, (xs, ps) in knots.items()}

    def run(batches):
        for batch in batches:
            columns = [
                pa.array(rank_map_values(batch.column(i).to_numpy(zero_copy_only=False).astype(float), mapped[name]),
                         type=pa.float64())
                if name in mapped else batch.column(i)
                for i, name in enumerate(batch.schema.names)
            ]
            yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names)

    schema = StructType([StructField(f.name, DoubleType(), f.nullable) if f.name in mapped else f
                         for f in frame.schema.fields])
    return frame.mapInArrow(run, schema)


def _families(moments: _Moments, selected: list[str], columns: list[str], min_abs_r: float) -> list[list[str]]:
    """Families of selected features: complete-linkage clusters of 1 - |r|, cut at 1 - min_abs_r, so
    every two features of a family correlate with |r| >= min_abs_r. Each family lists its features in
    input order; families are ordered by their first feature. Deterministic for a given matrix."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(selected) < 2:
        return [list(selected)]
    index = [moments.index(c) for c in columns]
    scatter = moments.scatter[np.ix_(index, index)]
    spread = np.sqrt(np.diag(scatter))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nan_to_num(scatter / np.outer(spread, spread), nan=0.0)  # a constant: unrelated to all
    distance = np.clip(1.0 - np.abs(r), 0.0, 1.0)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), "complete"), t=1.0 - min_abs_r,
                      criterion="distance")
    families: dict[int, list[str]] = {}
    for name, label in zip(selected, labels.tolist(), strict=True):
        families.setdefault(label, []).append(name)
    return sorted(families.values(), key=lambda f: selected.index(f[0]))


def _four(quantiles: list[float]) -> list[float]:
    if len(quantiles) != 4:  # approxQuantile gives [] for a column without values: no users at all
        raise ValueError("cannot fit the preparation on an empty DataFrame (no users)")
    return quantiles


@dataclass(frozen=True)
class _Moments:
    """Per-column statistics of the capped features from one pass (`_column_moments`)."""

    names: list[str]
    count: np.ndarray  # (d,) non-null values per column
    mean: np.ndarray  # (d,)
    scatter: np.ndarray  # (d, d) sum of (x - mean)(x - mean)^T over the rows where both are not null
    minimum: np.ndarray  # (d,)
    maximum: np.ndarray  # (d,)
    shares: dict[str, float]  # near-constant candidates: share of users at the candidate value

    def index(self, name: str) -> int:
        return self.names.index(name)


def _column_moments(
    capped: DataFrame, names: list[str], candidates: Mapping[str, float],
    knots: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> _Moments:
    """Count, means, the centred scatter matrix, minima and maxima of `names` (followed by the
    rank-mapped `<name>__rank` of every feature with `knots`), and the share of users at each
    near-constant candidate's value: one Spark job. Every partition returns its exact
    statistics (numpy, centred on its own means), merged on the driver with the pairwise update of
    Chan, Golub and LeVeque, so no precision is lost to large offsets. The preparation imputes
    before this, so there are no nulls; a NaN value propagates into its column's statistics, as in
    Spark's own aggregates."""
    knots = dict(knots or {})
    ranked = list(knots)
    columns = [*names, *[f"{n}{_MAPPED}" for n in ranked]]
    d = len(columns)
    targets = np.array([candidates.get(n, np.nan) for n in columns])

    def partition(batches):
        stats = _Partial(d)
        for batch in batches:
            x = batch[names].to_numpy(dtype=float)
            if ranked:
                x = np.column_stack([x, *[rank_map_values(batch[n].to_numpy(dtype=float), knots[n]) for n in ranked]])
            if len(x):
                stats.add(x, targets)
        yield pd.DataFrame({"stats": [stats.to_bytes()]})

    total = _Partial(d)
    for row in capped.select(*names).mapInPandas(partition, "stats binary").collect():
        total.merge(_Partial.from_bytes(row["stats"], d))
    if total.rows == 0:
        raise ValueError("cannot fit the preparation on an empty DataFrame (no users)")
    shares = {n: float(total.at[i] / total.rows) for i, n in enumerate(columns) if n in candidates}
    names = columns
    return _Moments(names, np.full(d, float(total.rows)), total.mean, total.scatter, total.low, total.high, shares)


class _Partial:
    """Mergeable statistics of a set of rows (see `_column_moments`)."""

    def __init__(self, d: int):
        self.rows = 0.0
        self.mean, self.scatter = np.zeros(d), np.zeros((d, d))
        self.low, self.high, self.at = np.full(d, np.inf), np.full(d, -np.inf), np.zeros(d)

    def add(self, x: np.ndarray, targets: np.ndarray) -> None:
        part = _Partial(x.shape[1])
        part.rows = float(len(x))
        part.mean = x.mean(axis=0)
        centred = x - part.mean
        part.scatter = centred.T @ centred
        with np.errstate(invalid="ignore"):
            part.low, part.high = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
        part.at = (x == targets).sum(axis=0).astype(float)
        self.merge(part)

    def merge(self, other: _Partial) -> None:
        if other.rows == 0:
            return
        total = self.rows + other.rows
        delta = other.mean - self.mean
        self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.rows * other.rows / total)
        self.mean = self.mean + delta * (other.rows / total)
        self.rows = total
        self.low, self.high = np.fmin(self.low, other.low), np.fmax(self.high, other.high)
        self.at = self.at + other.at

    def to_bytes(self) -> bytes:
        return np.concatenate([[self.rows], self.mean, self.low, self.high, self.at, self.scatter.ravel()]).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, d: int) -> _Partial:
        values = np.frombuffer(blob, dtype=np.float64)
        part = cls(d)
        part.rows = float(values[0])
        part.mean, part.low, part.high, part.at = (values[1 + i * d:1 + (i + 1) * d].copy() for i in range(4))
        part.scatter = values[1 + 4 * d:].reshape(d, d).copy()
        return part


def _near_constant(
    moments: _Moments, candidates: Mapping[str, float], keep: set[str], logged: set[str]
) -> list[dict[str, str]]:
    """Drop the features where the middle `near_constant_share` of users share one value."""
    if not candidates:
        return []
    names = list(candidates)
    shares = moments.shares  # the exact share of the common value, for the record
    dropped = []
    for name in names:
        value = candidates[name]
        if name in logged:  # report the feature's own value, not its log
            value = math.copysign(math.expm1(abs(value)), value)
        detail = f"{shares[name]:.1%} of users have {round(value, 6)!r}"
        if name in keep:
            log.info("prepare: kept %s although near-constant (%s): in prepare.selection.keep", name, detail)
            continue
        dropped.append({"feature": name, "reason": "near_constant", "detail": detail})
    return dropped


def _correlated(moments: _Moments, names: list[str], selection: SelectionConfig) -> list[dict[str, str]]:
    """Walk the features in order; drop one whose |r| with an already kept feature exceeds
    max_abs_correlation, or that the kept features determine almost exactly (multiple correlation R
    above max_multiple_correlation: shares that sum to 1, one-hot columns, a total and its parts).
    Such exact linear combinations make covariance matrices singular (GMM) without any single
    pair being highly correlated. Both tests use the one d x d correlation matrix."""
    if len(names) < 2:
        return []
    index = [moments.index(n) for n in names]
    scatter = moments.scatter[np.ix_(index, index)]
    spread = np.sqrt(np.diag(scatter))
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = scatter / np.outer(spread, spread)  # Pearson's r, as MLlib's Correlation computes it
    np.fill_diagonal(raw, np.where(spread > 0, 1.0, np.nan))
    matrix = np.nan_to_num(raw, nan=0.0)  # a constant feature: no linear relation
    keep = set(selection.keep)
    # Kept features count as kept from the start: a feature correlated with one is the one that goes.
    kept = [i for i, name in enumerate(names) if name in keep]
    dropped = []
    for i, name in enumerate(names):
        if name in keep:
            continue
        r, j = max(((abs(float(matrix[i][j])), j) for j in kept), default=(0.0, -1))
        multiple = _multiple_correlation(matrix, i, kept)
        if r > selection.max_abs_correlation:
            dropped.append({"feature": name, "reason": "correlated", "detail": f"|r|={r:.3f} with {names[j]}"})
        elif multiple > selection.max_multiple_correlation:
            dropped.append({"feature": name, "reason": "linear_combination",
                            "detail": f"R={multiple:.4f} from the {len(kept)} features kept before it"})
        else:
            kept.append(i)
    return dropped


def _multiple_correlation(matrix: np.ndarray, target: int, kept: list[int]) -> float:
    """Multiple correlation R of feature `target` on the `kept` ones, from the correlation matrix:
    R^2 = r' Rkk^+ r (pseudo-inverse: kept features may themselves be nearly dependent)."""
    usable = [j for j in kept if matrix[j][j] > 0.5]  # constant features have no correlations
    if not usable or matrix[target][target] < 0.5:
        return 0.0
    r = matrix[np.ix_(usable, [target])]
    r2 = float((r.T @ np.linalg.pinv(matrix[np.ix_(usable, usable)], rcond=1e-10) @ r)[0, 0])
    return math.sqrt(min(max(r2, 0.0), 1.0))


def _fit_scaling(moments: _Moments, selected: list[str], scaling: str) -> tuple[dict, dict]:
    """Centre and scale per selected feature (mean and population standard deviation, or minimum
    and maximum); a zero scale becomes 1 (constants stay finite)."""
    index = [moments.index(n) for n in selected]
    if scaling == "standard":
        firsts = moments.mean[index].tolist()
        seconds = np.sqrt(np.maximum(np.diag(moments.scatter)[index] / moments.count[index], 0.0)).tolist()
    elif scaling == "minmax":
        firsts, seconds = moments.minimum[index].tolist(), moments.maximum[index].tolist()
    else:
        raise ConfigError(f"prepare.scaling: expected standard or minmax, found {scaling!r}")
    centre, scale = {}, {}
    for name, first, second in zip(selected, firsts, seconds, strict=True):
        centre[name] = _finite_or(first, 0.0)
        spread = second if scaling == "standard" else (None if second is None else second - centre[name])
        spread = _finite_or(spread, 0.0)
        # Rounding leaves a tiny non-zero spread on some constant columns; treat it as zero too.
        scale[name] = spread if spread > 1e-12 * max(1.0, abs(centre[name])) else 1.0
    return centre, scale


# --- column expressions (shared by fit and transform) ---------------------------------------------


def _double(name: str) -> Column:
    return F.col(name).cast("double")


def _imputed(name: str, spec: Imputation) -> Column:
    fills = [_double(spec.source)] if spec.source else []
    return F.coalesce(_double(name), *fills, F.lit(spec.value))


def _logged(col: Column, apply: bool) -> Column:
    return signed_log1p(col) if apply else col


def _clipped(col: Column, bounds: Sequence[float | None]) -> Column:
    lower, upper = bounds
    if lower is not None:
        col = F.greatest(col, F.lit(lower))
    if upper is not None:
        col = F.least(col, F.lit(upper))
    return col


def _clip_value(value: float, bounds: Sequence[float | None]) -> float:
    lower, upper = bounds
    value = value if lower is None else max(value, lower)
    return value if upper is None else min(value, upper)


def _finite_or(value: float | None, fallback: float) -> float:
    return float(value) if value is not None and math.isfinite(value) else fallback


def _require_columns(df: DataFrame, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in set(df.columns)]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")


# --- local file IO ---------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: C:\ is a Windows path


def _local_path(path: str) -> Path:
    """A local path or file: URI as a Path; other schemes (dbfs:, s3:, abfss:) are not supported."""
    if path.startswith("file:"):
        parsed = urlparse(path)
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file URI {path!r} names a remote host; use a local path")
        return Path(unquote(parsed.path))
    if _SCHEME.match(path):
        raise UsageError(
            f"the fitted preparation is saved with plain file IO: {path!r} is not a local path or file: URI "
            "(on Databricks use the /dbfs/... or /Volumes/... path)"
        )
    return Path(path)


def check_prepared(prepared: DataFrame, *, need_user_id: bool, reserved: Sequence[str] = ("segment",)) -> None:
    """A model's input must be `FittedPreparation.transform` output: the vector, user_id when rows are
    assigned, and none of the columns the model is about to add (`reserved`)."""
    columns = prepared.columns
    if PREPARED_VECTOR not in columns:
        raise ValueError(
            f"prepared has no {PREPARED_VECTOR!r} column (columns: {columns}); "
            "pass the output of FittedPreparation.transform"
        )
    if need_user_id and "user_id" not in columns:
        raise ValueError(f"prepared has no 'user_id' column (columns: {columns}); keep user_id in the prepared frame")
    for taken in reserved:
        if taken in columns:
            raise ValueError(f"prepared already has a {taken!r} column; drop it before predicting segments")

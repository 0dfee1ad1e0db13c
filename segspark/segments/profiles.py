"""Segment profiles: who is in each segment, and a readable name for it.

`segment_profiles` describes every segment of one model run with two Spark aggregations (per
segment: size and the mean of every feature; over all users: each feature's mean and population
standard deviation); `segment_profiles_by_model` does the same for every model of a run in the same
two aggregations. Only k x d numbers come back to the driver. A run whose users all fit on the driver
(its user sample is every user) computes the same statistics there instead, from every user's features
and segments (`segment_profiles_in_memory`): each Spark query costs a run of a few thousand users more
in planning than in work. For each segment:

- `size` (users), `share` (of all assigned users, the noise segment -1 included);
- `means`: the segment's mean of each feature, over the members where the feature is not null;
- `zscores`: (segment mean - population mean) / population std, where the population is every
  user of `features` and the std is the population standard deviation (ddof 0). 0 when the std is
  0 or null (a constant or all-null feature) or the segment mean is null;
- `top_features`: up to `top_n` features with the largest |z| (ties by name), z exactly 0 left out;
- `name`: from `name_segment` below, made unique within the run.

Segment names (what BI users read; the rules are deterministic, so a profile always gets the same
name). A feature "is high" when its z >= 0.5 (`STANDS_OUT`: the segment's mean is at least half a
population standard deviation above everyone's), "is low" when z <= -0.5. Rules only use the
features that exist in the run; a rule whose features are missing does not fire. "Orders" is
`frequency` (or `purchases` without it). "Session conversion" is mean orders / mean sessions, and
is "low" below half the population's.

The first matching rule gives the noun:

1. cart abandoners: `view_to_cart_rate`, `carts` or `remove_share` high, and `cart_to_purchase_rate` low.
2. not buying: mean orders < 0.5 (most members never ordered) or session conversion low. Then
   - window shoppers: long sessions (`session_duration_mean_min` or `events_per_session` high);
   - browsers: a lot of activity (`sessions`, `sessions_per_week`, `views`, `events` or `active_days` high);
   - occasional visitors: neither, but mean orders < 0.5.
3. one-timers: mean `frequency` between 0.8 and 1.5 (typically exactly one order).
4. bargain hunters: the price they pay is low (`price_bought_mean`, else `price_bought_median`,
   else `price_viewed_mean`).
5. buyers: any of the adjectives "lapsed", "high-value"/"low-value", "frequent"/"occasional" fires.
6. shoppers: a weekend or time-of-day qualifier fires.

Words in front of the noun, in this order:
- "lapsed": `recency_days` high (long since the last purchase); any noun;
- "high-value" / "low-value": `monetary` high / low; buyers ("high-value" only for one-timers);
- "frequent": `frequency` high (buyers, bargain hunters); "occasional": `frequency` low (buyers);
- "weekend": `weekend_share` high; any noun;
- time of day: the highest of `night_share`, `morning_share`, `afternoon_share`, `evening_share`
  that is high gives "night-time", "morning", "afternoon" or "evening"; any noun.
After the noun, "in <category>" when a `top_category_<i>_share` is high and the segment's mean share
is at least 0.25 (the strongest such slot; its label from `category_labels`, else "category <i>").

Examples: "high-value frequent morning buyers in category 1", "lapsed one-timers",
"night-time browsers", "cart abandoners", "window shoppers", "weekend shoppers".
When no rule fires the name is the two features with the largest |z|, e.g.
"high sessions, low recency_days" ("average users" when every z is 0).

Names are unique within a run: segments that would share a name (in segment order) each get their
first top feature ("high X"/"low X") that is not the strongest feature of another segment with
that name; any that still collide get " (2)", " (3)", ... after the first. The noise segment -1 is
always "noise / unassigned".
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from segspark.io.catalog import SEGMENT_PROFILES, TABLES, SegmentProfileRow
from segspark.models.contract import NOISE_SEGMENT

log = logging.getLogger(__name__)


NOISE_NAME = "noise / unassigned"
STANDS_OUT = 0.5  # |z| at which a feature "is high/low" in the naming rules
ONE_TIMER_ORDERS = (0.8, 1.5)
NON_BUYER_ORDERS = 0.5
CATEGORY_MIN_SHARE = 0.25
UNASSIGNED = -2  # `segment_profiles_in_memory`: a user the model assigned no segment (noise is -1)

@dataclass(frozen=True)
class SegmentProfile:
    segment: int
    name: str
    size: int
    share: float
    means: dict[str, float | None]
    zscores: dict[str, float]
    top_features: list[str]


@dataclass(frozen=True)
class SegmentProfiles:
    feature_names: list[str]
    segments: list[SegmentProfile]  # ordered by segment id
    population_means: dict[str, float | None]
    population_stds: dict[str, float | None]
    category_labels: dict[str, str] = field(default_factory=dict)

    @property
    def schema(self) -> StructType:
        return SEGMENT_PROFILES

    def relabel(self, mapping: Mapping[int, int]) -> SegmentProfiles:
        """The same profiles under new segment ids (e.g. `SegmentMapping.mapping`), without another Spark job.

        Names are derived again, so that duplicates are numbered in the order of the new ids exactly
        as `segment_profiles` on the relabelled assignments would number them. -1 stays -1."""
        lookup = {**{int(k): int(v) for k, v in mapping.items()}, NOISE_SEGMENT: NOISE_SEGMENT}
        unmapped = sorted(p.segment for p in self.segments if p.segment not in lookup)
        if unmapped:
            raise ValueError(f"relabel: segments {unmapped} are not in the mapping (it covers {sorted(lookup)})")
        targets = [lookup[p.segment] for p in self.segments]
        if len(set(targets)) != len(targets):
            raise ValueError(f"relabel: the mapping sends two segments to one id: {dict(sorted(lookup.items()))}")
        moved = sorted((replace(p, segment=lookup[p.segment]) for p in self.segments), key=lambda p: p.segment)
        labels = _segment_names(moved, self.population_means, self.category_labels)
        return replace(self, segments=[replace(p, name=labels[p.segment]) for p in moved])

    def by_segment(self) -> dict[int, SegmentProfile]:
        return {p.segment: p for p in self.segments}

    def names(self) -> dict[int, str]:
        return {p.segment: p.name for p in self.segments}

    def to_rows(self, as_of: dt.date | str, run_id: str, model: str) -> list[SegmentProfileRow]:
        """Rows of the `segment_profiles` table, one per segment."""
        day = dt.date.fromisoformat(as_of) if isinstance(as_of, str) else as_of
        return [
            SegmentProfileRow(
                as_of=day, run_id=run_id, model=model, segment=p.segment, segment_name=p.name, size=p.size,
                share=p.share, top_features=list(p.top_features), feature_means=dict(p.means),
                feature_zscores=dict(p.zscores),
            )
            for p in self.segments
        ]

    def to_dataframe(self, spark: SparkSession, as_of: dt.date | str, run_id: str, model: str) -> DataFrame:
        return TABLES["segment_profiles"].frame(spark, self.to_rows(as_of, run_id, model))

    def with_names(self, assignments: DataFrame, column: str = "segment_name") -> DataFrame:
        """Adds the segment's name to each assignment row (a literal map, evaluated on the executors)."""
        return assignments.withColumn(column, segment_name_column(self.names()))


def segment_name_column(names: Mapping[int, str]) -> Column:
    """The name of the column `segment`'s segment (a literal map, evaluated on the executors)."""
    if not names:
        return F.lit(None).cast("string")
    lookup = F.create_map(*[x for seg, name in sorted(names.items()) for x in (F.lit(seg), F.lit(name))])
    return lookup[F.col("segment")]


def segment_profiles(
    features: DataFrame,
    assignments: DataFrame,
    feature_names: Sequence[str],
    *,
    top_n: int = 5,
    category_labels: Mapping[str, str] | None = None,
) -> SegmentProfiles:
    """Profiles of every segment in `assignments` (user_id, segment) over `features` (user_id + columns).

    feature_names: the numeric columns of `features` to describe (raw features read best: means in
    their catalog units). category_labels: optional `top_category_<i>_share` -> category value for
    the names (the slot values recorded in `runs.metrics.feature_slots`)."""
    for column in ("user_id", "segment"):
        if column not in assignments.columns:
            raise ValueError(
                f"segment_profiles: assignments has no column {column!r}; it has {assignments.columns}. "
                "Pass the model's assignments (user_id, segment)."
            )
    one = assignments.select(F.lit("_").alias("model"), "user_id", "segment")
    return segment_profiles_by_model(
        features, one, feature_names, top_n=top_n, category_labels=category_labels, models=["_"]
    )["_"]


def segment_profiles_by_model(
    features: DataFrame,
    assignments: DataFrame,
    feature_names: Sequence[str],
    *,
    top_n: int = 5,
    category_labels: Mapping[str, str] | None = None,
    models: Sequence[str] = (),
) -> dict[str, SegmentProfiles]:
    """`segment_profiles` of several models at once: `assignments` has model, user_id, segment.
    Every model in `models` gets an entry, with no segments when it has no assigned user.

    Two Spark jobs whatever the number of models: one join and aggregation by (model, segment), and
    the population statistics over `features`, which every model shares."""
    names = list(feature_names)
    missing = [n for n in [*names, "user_id"] if n not in features.columns]
    if missing:
        raise ValueError(
            f"segment_profiles: features has no column(s) {missing}; it has {features.columns}. "
            "Pass feature_names that are columns of the features DataFrame."
        )
    for column in ("model", "user_id", "segment"):
        if column not in assignments.columns:
            raise ValueError(
                f"segment_profiles: assignments has no column {column!r}; it has {assignments.columns}. "
                "Pass the models' assignments (model, user_id, segment)."
            )
    if top_n < 0:
        raise ValueError(f"segment_profiles: top_n must be >= 0, got {top_n}")

    # Positional aliases: feature names are safe in maps but not necessarily as column names.
    alias = {n: f"_f{i}" for i, n in enumerate(names)}
    values = features.select("user_id", *[F.col(n).cast("double").alias(alias[n]) for n in names])
    # Left join: an assigned user without a feature row still counts in size and share.
    joined = assignments.select("model", "user_id", F.col("segment").cast("int")).join(values, "user_id", "left")
    per_segment = (
        joined.groupBy("model", "segment")
        .agg(F.count(F.lit(1)).alias("_size"), *[F.avg(alias[n]).alias(alias[n]) for n in names])
        .collect()
    )
    population = values.agg(
        *[F.avg(alias[n]).alias(f"m{alias[n]}") for n in names],
        *[F.stddev_pop(alias[n]).alias(f"s{alias[n]}") for n in names],
    ).collect()[0]
    pop_means = {n: _finite(population[f"m{alias[n]}"]) for n in names}
    pop_stds = {n: _finite(population[f"s{alias[n]}"]) for n in names}
    segments = [(row["model"], row["segment"], int(row["_size"]), {n: row[alias[n]] for n in names}) for row in per_segment]
    return _profiles_of_models(names, segments, pop_means, pop_stds, top_n, category_labels, models)


def segment_profiles_in_memory(
    values: pd.DataFrame,
    labels: Mapping[str, np.ndarray],
    feature_names: Sequence[str],
    *,
    top_n: int = 5,
    category_labels: Mapping[str, str] | None = None,
    models: Sequence[str] = (),
) -> dict[str, SegmentProfiles]:
    """`segment_profiles_by_model` of a run whose users all fit on the driver, without a Spark job:
    `values` holds every user's features (one row per user; null as NaN) and `labels` each model's
    segment of every user, aligned with `values`' rows (`UNASSIGNED` where the model assigned none).
    The same statistics as the Spark aggregations (means over the members where a feature is not
    null, the population standard deviation with ddof 0), to rounding."""
    names = list(feature_names)
    missing = [n for n in names if n not in values.columns]
    if missing:
        raise ValueError(f"segment_profiles: features has no column(s) {missing}; it has {list(values.columns)}")
    if top_n < 0:
        raise ValueError(f"segment_profiles: top_n must be >= 0, got {top_n}")
    matrix = values[names].to_numpy(dtype=np.float64, na_value=np.nan).reshape(len(values), len(names))
    present = ~np.isnan(matrix)
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pop_mean = np.where(present, matrix, 0.0).sum(axis=0) / counts
        pop_std = np.sqrt(np.where(present, (matrix - pop_mean) ** 2, 0.0).sum(axis=0) / counts)
    pop_means = {n: _finite(pop_mean[i]) for i, n in enumerate(names)}
    pop_stds = {n: _finite(pop_std[i]) for i, n in enumerate(names)}
    segments = []
    for model, assigned in labels.items():
        assigned = np.asarray(assigned, dtype=np.int64)
        if assigned.shape != (len(values),):
            raise ValueError(f"segment_profiles: {model} has {assigned.shape[0]} labels for {len(values)} users")
        for segment in np.unique(assigned[assigned != UNASSIGNED]):
            members = assigned == segment
            inside = present[members]
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.where(inside, matrix[members], 0.0).sum(axis=0) / inside.sum(axis=0)
            segments.append((model, int(segment), int(members.sum()), {n: means[i] for i, n in enumerate(names)}))
    return _profiles_of_models(names, segments, pop_means, pop_stds, top_n, category_labels, models)


def _profiles_of_models(
    names: list[str],
    segments: Sequence[tuple[str, int | None, int, Mapping[str, float | None]]],
    pop_means: dict[str, float | None],
    pop_stds: dict[str, float | None],
    top_n: int,
    category_labels: Mapping[str, str] | None,
    models: Sequence[str],
) -> dict[str, SegmentProfiles]:
    """Every model's SegmentProfiles from its segments' (model, segment, size, means) and the
    population's means and standard deviations: z-scores, top features and names."""
    by_model: dict[str, list] = {model: [] for model in models}
    for row in segments:
        by_model.setdefault(row[0], []).append(row)
    result = {}
    for model, rows in sorted(by_model.items()):
        total = sum(size for _, _, size, _ in rows)
        raw: list[tuple[int, int, dict, dict]] = []
        for _, segment, size, segment_means in sorted(rows, key=lambda r: (r[1] is None, r[1])):
            if segment is None:
                raise ValueError("segment_profiles: assignments has users with a null segment; use -1 for noise")
            means = {n: _finite(segment_means[n]) for n in names}
            zscores = {n: _zscore(means[n], pop_means[n], pop_stds[n]) for n in names}
            raw.append((int(segment), size, means, zscores))
        unnamed = [
            SegmentProfile(seg, "", size, size / total if total else 0.0, means, z, ranked(z)[:top_n])
            for seg, size, means, z in raw
        ]
        labels = _segment_names(unnamed, pop_means, category_labels or {})
        profiles = [replace(p, name=labels[p.segment]) for p in unnamed]
        log.info("segment profiles%s: %d segments over %d users: %s", "" if model == "_" else f" of {model}",
                 len(profiles), total, {p.segment: (p.name, p.size) for p in profiles})
        result[model] = SegmentProfiles(names, profiles, pop_means, pop_stds, dict(category_labels or {}))
    return result


def segment_names(
    profiles: Sequence[SegmentProfile],
    population_means: Mapping[str, float | None],
    category_labels: Mapping[str, str] | None = None,
) -> dict[int, str]:
    """The names a run gives these profiles (their `name` is not read): `name_segment` of each, made
    unique among them, -1 named NOISE_NAME. Also names the stream's emerging segment candidates."""
    return _segment_names(profiles, population_means, category_labels or {})


def _segment_names(profiles: Sequence[SegmentProfile], population_means, category_labels) -> dict[int, str]:
    labels = _unique_names(
        {p.segment: name_segment(p.zscores, p.means, population_means, category_labels=category_labels)
         for p in profiles if p.segment != NOISE_SEGMENT},
        {p.segment: p.zscores for p in profiles},
    )
    return {**labels, NOISE_SEGMENT: NOISE_NAME}


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _zscore(mean: float | None, pop_mean: float | None, pop_std: float | None) -> float:
    if mean is None or pop_mean is None or not pop_std:
        return 0.0
    return (mean - pop_mean) / pop_std


def ranked(z: Mapping[str, float | None]) -> list[str]:
    """Features by |z| descending, ties by name; z exactly 0 (or missing) distinguishes nothing.
    Also orders the separating features of `evaluation.separation`."""
    present = [(n, v) for n, v in z.items() if v is not None and math.isfinite(v) and v != 0.0]
    return [n for n, _ in sorted(present, key=lambda item: (-abs(item[1]), item[0]))]


def _phrase(z: Mapping[str, float | None], name: str) -> str:
    return f"{'high' if (z[name] or 0.0) > 0 else 'low'} {name}"


# --- naming ----------------------------------------------------------------------------------------

_TIME_OF_DAY = (
    ("night_share", "night-time"),
    ("morning_share", "morning"),
    ("afternoon_share", "afternoon"),
    ("evening_share", "evening"),
)
_ACTIVITY = ("sessions", "sessions_per_week", "views", "events", "active_days")
_LONG_SESSIONS = ("session_duration_mean_min", "events_per_session")
_CART_INTEREST = ("view_to_cart_rate", "carts", "remove_share")
_PRICE_PAID = ("price_bought_mean", "price_bought_median", "price_viewed_mean")
_CATEGORY_SLOT = re.compile(r"^top_category_(\d+)_share$")


def name_segment(
    z: Mapping[str, float | None],
    means: Mapping[str, float | None],
    population_means: Mapping[str, float | None],
    *,
    category_labels: Mapping[str, str] | None = None,
) -> str:
    """A readable name for one segment from its z-scores and means (rules in the module docstring).

    Deterministic: the same profile always gives the same name. Features that are absent (or whose
    value is None) make the rules that need them not fire."""
    rule = _rule_name(z, means, population_means, category_labels or {})
    return rule if rule is not None else _fallback_name(z)


def _rule_name(z, means, population_means, category_labels) -> str | None:
    def zv(name: str) -> float | None:
        value = z.get(name)
        return float(value) if value is not None and math.isfinite(value) else None

    def high(name: str) -> bool:
        value = zv(name)
        return value is not None and value >= STANDS_OUT

    def low(name: str) -> bool:
        value = zv(name)
        return value is not None and value <= -STANDS_OUT

    def mean(source: Mapping, name: str) -> float | None:
        return _finite(source.get(name))

    orders = next((n for n in ("frequency", "purchases") if mean(means, n) is not None), None)
    order_mean = mean(means, orders) if orders else None
    conversion = _ratio(order_mean, mean(means, "sessions"))
    pop_conversion = _ratio(mean(population_means, orders) if orders else None, mean(population_means, "sessions"))
    low_conversion = conversion is not None and pop_conversion is not None and conversion < 0.5 * pop_conversion
    never_ordered = order_mean is not None and order_mean < NON_BUYER_ORDERS
    frequency = mean(means, "frequency")

    lapsed = high("recency_days")
    value = "high-value" if high("monetary") else "low-value" if low("monetary") else None
    weekend = high("weekend_share")
    times = [(zv(f), label) for f, label in _TIME_OF_DAY if high(f)]
    time_of_day = max(times, key=lambda t: t[0])[1] if times else None  # names are unique: no tie-break needed

    noun: str | None = None
    adjectives: list[str | None] = []
    if any(high(f) for f in _CART_INTEREST) and low("cart_to_purchase_rate"):
        noun = "cart abandoners"
    elif never_ordered or low_conversion:
        if any(high(f) for f in _LONG_SESSIONS):
            noun = "window shoppers"
        elif any(high(f) for f in _ACTIVITY):
            noun = "browsers"
        elif never_ordered:
            noun = "occasional visitors"
    if noun is None:
        price = next((f for f in _PRICE_PAID if zv(f) is not None), None)
        if frequency is not None and ONE_TIMER_ORDERS[0] <= frequency <= ONE_TIMER_ORDERS[1]:
            # One order usually means a low total, so only the exception is worth a word.
            noun, adjectives = "one-timers", ["high-value" if value == "high-value" else None]
        elif price is not None and low(price):
            noun, adjectives = "bargain hunters", ["frequent" if high("frequency") else None]
        else:
            often = "frequent" if high("frequency") else "occasional" if low("frequency") else None
            if lapsed or value or often:
                noun, adjectives = "buyers", [value, often]
            elif weekend or time_of_day:
                noun = "shoppers"
    if noun is None:
        return None
    words = ["lapsed" if lapsed else None, *adjectives, "weekend" if weekend else None, time_of_day, noun]
    name = " ".join(w for w in words if w)
    category = _category(z, means, category_labels)
    return f"{name} in {category}" if category else name


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _category(z, means, category_labels) -> str | None:
    best: tuple[float, int, str] | None = None
    for name, value in z.items():
        match = _CATEGORY_SLOT.match(name)
        share = _finite(means.get(name))
        if not match or value is None or value < STANDS_OUT or share is None or share < CATEGORY_MIN_SHARE:
            continue
        slot = int(match.group(1))
        # Strongest z first; equal z goes to the lower slot (the more common category).
        if best is None or (value, -slot) > (best[0], -best[1]):
            best = (value, slot, name)
    if best is None:
        return None
    return category_labels.get(best[2]) or f"category {best[1]}"


def _fallback_name(z: Mapping[str, float | None]) -> str:
    strongest = ranked(z)[:2]
    return ", ".join(_phrase(z, n) for n in strongest) if strongest else "average users"


def _unique_names(names: dict[int, str], zscores: Mapping[int, Mapping[str, float]]) -> dict[int, str]:
    """Make names unique (module docstring): first a distinguishing feature, then a number."""
    result = dict(names)
    groups: dict[str, list[int]] = {}
    for seg in sorted(names):
        groups.setdefault(names[seg], []).append(seg)
    for base, members in groups.items():
        if len(members) < 2:
            continue
        strongest = {seg: (ranked(zscores[seg])[:1] or [None])[0] for seg in members}
        for seg in members:
            others = {strongest[o] for o in members if o != seg}
            extra = next((f for f in ranked(zscores[seg]) if f not in others), None)
            if extra is not None:
                result[seg] = f"{base}, {_phrase(zscores[seg], extra)}"
    # Whatever still collides (also with a name of another group) gets a number, in segment order.
    used = {NOISE_NAME}
    unique = {}
    for seg in sorted(result):
        candidate, count = result[seg], 1
        while candidate in used:
            count += 1
            candidate = f"{result[seg]} ({count})"
        used.add(candidate)
        unique[seg] = candidate
    return unique

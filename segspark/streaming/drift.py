"""Drift between the training data and a window of new users: when should the models be retrained?

Four signals per window and model, each against a configured threshold:

* population stability index (PSI) of the main features: the training distribution is cut into
  quantile bins once (`reference_bins`, kept with the model), a window's users are counted into the
  same bins, and PSI = sum over bins (a - e) * ln(a / e) of the shares a (window) and e (training),
  with empty bins smoothed to `EPSILON` so that a bin the window never reaches counts, but finitely.
  Nulls are a bin of their own. Common reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift;
* centroid shift: how far each online k-means centre moved from the trained one (prepared units,
  i.e. standard deviations of the training features);
* segment size change: the largest absolute change of a segment's share of users;
* noise share: users the density model calls noise (ae_hdbscan).

`assess` turns them into one row with `retrain_recommended` and the reasons in words. Counting a
window into bins is one aggregation on the executors; only bins x features numbers come back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.runtime.jvm import approx_quantiles

EPSILON = 1e-4  # share given to an empty bin, so PSI stays finite


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.25
    centroid_shift: float = 0.5
    size_change: float = 0.10
    noise_share: float = 0.20


@dataclass(frozen=True)
class ReferenceBins:
    """Per feature: inner quantile edges (bins are (-inf, e0], (e0, e1], ..., (e_last, inf), then
    null) and the training share of each bin."""

    edges: dict[str, list[float]]
    shares: dict[str, list[float]]

    def to_dict(self) -> dict:
        return {"edges": self.edges, "shares": self.shares}

    @classmethod
    def from_dict(cls, data: Mapping) -> ReferenceBins:
        return cls(edges={k: list(v) for k, v in data["edges"].items()},
                   shares={k: list(v) for k, v in data["shares"].items()})


def reference_bins(training: DataFrame, features: Sequence[str], bins: int = 10, accuracy: float = 1e-3) -> ReferenceBins:
    """Quantile bins of the training users' features and their shares (two passes: quantiles, counts)."""
    if bins < 2:
        raise ValueError(f"drift: bins must be at least 2, got {bins}")
    probabilities = [i / bins for i in range(1, bins)]
    quantiles = approx_quantiles(training, list(features), probabilities, accuracy)
    edges = {name: sorted(set(float(q) for q in qs)) for name, qs in zip(features, quantiles, strict=True)}
    return ReferenceBins(edges=edges, shares=bin_shares(training, edges))


def bin_shares(frame: DataFrame, edges: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Share of `frame`'s rows in each bin of each feature (the last bin: nulls), one aggregation."""
    aggregates = [F.count(F.lit(1)).alias("_rows")]
    for i, (name, cuts) in enumerate(edges.items()):
        value = F.col(name).cast("double")
        for b in range(len(cuts) + 1):
            low = value > F.lit(cuts[b - 1]) if b > 0 else F.lit(True)
            high = value <= F.lit(cuts[b]) if b < len(cuts) else F.lit(True)
            aggregates.append(F.count_if(value.isNotNull() & low & high).alias(f"_f{i}_b{b}"))
        aggregates.append(F.count_if(value.isNull()).alias(f"_f{i}_null"))
    row = frame.agg(*aggregates).collect()[0]
    total = max(int(row["_rows"]), 1)
    return {
        name: [row[f"_f{i}_b{b}"] / total for b in range(len(cuts) + 1)] + [row[f"_f{i}_null"] / total]
        for i, (name, cuts) in enumerate(edges.items())
    }


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    if len(expected) != len(actual):
        raise ValueError(f"drift: {len(expected)} training bins but {len(actual)} window bins")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(float(e), EPSILON), max(float(a), EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def feature_psi(reference: ReferenceBins, window: DataFrame) -> dict[str, float]:
    """PSI of every reference feature between the training users and `window`'s users."""
    shares = bin_shares(window, reference.edges)
    return {name: psi(reference.shares[name], shares[name]) for name in reference.edges}


def centroid_shift(trained: np.ndarray, current: np.ndarray) -> list[float]:
    """Euclidean distance each centre moved (same order of centres)."""
    trained, current = np.asarray(trained, dtype=np.float64), np.asarray(current, dtype=np.float64)
    if trained.shape != current.shape:
        raise ValueError(f"drift: trained centres {trained.shape} and current centres {current.shape} differ")
    return [float(x) for x in np.linalg.norm(current - trained, axis=1)]


def size_change(trained_shares: Mapping[int, float], window_counts: Mapping[int, int]) -> dict[int, float]:
    """Per segment: the window's share minus the training share (segments missing on a side: 0)."""
    total = sum(window_counts.values())
    segments = sorted(set(trained_shares) | set(window_counts))
    return {s: (window_counts.get(s, 0) / total if total else 0.0) - float(trained_shares.get(s, 0.0)) for s in segments}


def assess(
    thresholds: DriftThresholds,
    *,
    psi_by_feature: Mapping[str, float] | None = None,
    shifts: Sequence[float] | None = None,
    size_changes: Mapping[int, float] | None = None,
    noise_share: float | None = None,
) -> dict:
    """The window's summary: the largest value of each signal, retrain_recommended, and the reasons."""
    reasons = []
    max_psi = max(psi_by_feature.values(), default=None) if psi_by_feature else None
    if max_psi is not None and max_psi > thresholds.psi:
        worst = sorted(psi_by_feature.items(), key=lambda kv: -kv[1])
        named = ", ".join(f"{k} {v:.2f}" for k, v in worst if v > thresholds.psi)
        reasons.append(f"PSI above {thresholds.psi}: {named}")
    max_shift = max(shifts, default=None) if shifts else None
    if max_shift is not None and max_shift > thresholds.centroid_shift:
        reasons.append(f"a centre moved {max_shift:.2f} (threshold {thresholds.centroid_shift})")
    max_change = max((abs(v) for v in size_changes.values()), default=None) if size_changes else None
    if max_change is not None and max_change > thresholds.size_change:
        segment = max(size_changes, key=lambda s: abs(size_changes[s]))
        reasons.append(
            f"segment {segment} share changed by {size_changes[segment]:+.1%} (threshold {thresholds.size_change:.0%})"
        )
    if noise_share is not None and noise_share > thresholds.noise_share:
        reasons.append(f"noise share {noise_share:.1%} (threshold {thresholds.noise_share:.0%})")
    return {
        "max_psi": max_psi,
        "psi": dict(psi_by_feature or {}),
        "max_centroid_shift": max_shift,
        "max_size_change": max_change,
        "noise_share": noise_share,
        "retrain_recommended": bool(reasons),
        "reasons": reasons,
    }

"""Choosing the number of segments k from a sweep over k and seeds.

The rule (`choose_k`):

1. Use the curve entries that have a finite `silhouette` (true Euclidean), `davies_bouldin` and
   `calinski_harabasz`; entries missing any of them are skipped (and named in the reason).
2. Let s* be the best silhouette. The candidates are the k whose silhouette is within
   `silhouette_tolerance` of s*, relative: silhouette >= s* - silhouette_tolerance * |s*|.
3. Among the candidates pick the lowest Davies-Bouldin; on equal Davies-Bouldin the higher
   Calinski-Harabasz; on equal Calinski-Harabasz the smaller k.

Why: the silhouette alone is noisy between neighbouring k (a sampled estimate, differences in the
third decimal), so it only shortlists; Davies-Bouldin then prefers the compact, well-separated
solution among near-equals, and the smaller k is the simpler segmentation to act on.

`sweep` fits every (k, seed) with a caller-supplied `fit_one`, keeps the best seed per k by its
objective, measures it with `cluster_metrics` and measures seed disagreement with the mean pairwise
adjusted Rand index between the seeds' labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.evaluation.metrics import DEFAULT_FEATURES, cluster_metrics, mean_pairwise_ari
from segspark.session import share_session

log = logging.getLogger(__name__)

RULE_METRICS = ("silhouette", "davies_bouldin", "calinski_harabasz")
SEGMENT_COL = "segment"


def _usable(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _k_list(entries: Iterable[Mapping]) -> str:
    return ", ".join(str(e["k"]) for e in sorted(entries, key=lambda e: e["k"]))


def choose_k(curve: Sequence[Mapping], *, silhouette_tolerance: float = 0.02) -> tuple[int, str]:
    """(k, reason) by the module's rule: among the k whose silhouette is within `silhouette_tolerance`
    (relative) of the best silhouette, the lowest Davies-Bouldin; ties -> higher Calinski-Harabasz ->
    smaller k. The reason is one sentence saying which metric decided and with what values.

    Raises ValueError when no entry has all of k, silhouette, davies_bouldin and calinski_harabasz."""
    if not _usable(silhouette_tolerance) or silhouette_tolerance < 0:
        raise ValueError(f"silhouette_tolerance must be a number >= 0 (e.g. 0.02 for 2%), got {silhouette_tolerance!r}")
    usable: list[Mapping] = []
    skipped: list[str] = []
    for entry in curve:
        missing = [m for m in ("k", *RULE_METRICS) if not _usable(entry.get(m))]
        if missing:
            skipped.append(f"k={entry.get('k')} (missing {', '.join(missing)})")
        else:
            usable.append(entry)
    if not usable:
        raise ValueError(
            f"no curve entry has all of k, {', '.join(RULE_METRICS)} as finite numbers "
            f"({len(curve)} entries; skipped: {'; '.join(skipped) or 'none'}); "
            "sweep at least one k >= 2 that yields two or more non-empty clusters"
        )
    if skipped:
        log.warning("choose_k: skipped %s", "; ".join(skipped))

    best = max(usable, key=lambda e: (e["silhouette"], -e["k"]))
    best_sil = best["silhouette"]
    floor = best_sil - silhouette_tolerance * abs(best_sil)
    candidates = [e for e in usable if e["silhouette"] >= floor]
    chosen = min(candidates, key=lambda e: (e["davies_bouldin"], -e["calinski_harabasz"], e["k"]))
    others = [e for e in candidates if e is not chosen]
    k = int(chosen["k"])
    tol = f"{silhouette_tolerance * 100:g}%"
    db, ch, sil = chosen["davies_bouldin"], chosen["calinski_harabasz"], chosen["silhouette"]

    if not others:
        reason = (
            f"k={k}: best silhouette ({sil:.3f}), no other k within {tol} of it "
            f"(Davies-Bouldin {db:.3f}, Calinski-Harabasz {ch:.1f})"
        )
    elif sil == best_sil:
        reason = (
            f"k={k}: best silhouette ({sil:.3f}) and lowest Davies-Bouldin ({db:.3f}) "
            f"among k within {tol} of it (k={_k_list(candidates)})"
        )
    else:
        reason = (
            f"k={k}: lowest Davies-Bouldin ({db:.3f}) among k within {tol} of the best silhouette "
            f"({best_sil:.3f} at k={int(best['k'])}; k={_k_list(candidates)}), its silhouette {sil:.3f}"
        )
    tied_db = [e for e in others if e["davies_bouldin"] == db]
    if tied_db:
        tied_ch = [e for e in tied_db if e["calinski_harabasz"] == ch]
        if tied_ch:
            reason += (
                f"; tied on Davies-Bouldin and Calinski-Harabasz ({ch:.1f}) with k={_k_list(tied_ch)}, "
                "so the smaller k"
            )
        else:
            reason += (
                f"; tied on Davies-Bouldin with k={_k_list(tied_db)}, "
                f"higher Calinski-Harabasz ({ch:.1f} vs {max(e['calinski_harabasz'] for e in tied_db):.1f})"
            )
    if skipped:
        reason += f"; skipped {'; '.join(skipped)}"
    return k, reason


@dataclass
class SweepResult:
    """One curve entry per k (ascending) and the best-seed fitted object per k."""

    curve: list[dict] = field(default_factory=list)
    models: dict[int, Any] = field(default_factory=dict)

    def choose(self, silhouette_tolerance: float = 0.02) -> tuple[int, str]:
        return choose_k(self.curve, silhouette_tolerance=silhouette_tolerance)


def _objective(model: Any, k: int, seed: int) -> float:
    value = getattr(model, "objective", None)
    if not _usable(value):
        log.warning("sweep: k=%d seed=%d has no finite objective (%r); it ranks last", k, seed, value)
        return math.inf
    return float(value)


def _labels(model: Any, prepared: DataFrame, k: int, seed: int) -> DataFrame:
    predicted = model.predict(prepared)
    missing = [c for c in ("user_id", SEGMENT_COL) if c not in predicted.columns]
    if missing:
        raise ValueError(
            f"predict() of the model for k={k} seed={seed} returned columns {predicted.columns}, "
            f"missing {missing}; it must return user_id and an integer {SEGMENT_COL}"
        )
    return predicted


def sweep(
    fit_one: Callable[[DataFrame, int, int], Any],
    prepared: DataFrame,
    ks: Sequence[int],
    seeds: Sequence[int],
    *,
    parallelism: int = 2,
    metrics_kwargs: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Fit every (k, seed), keep the best seed per k, and measure it.

    fit_one(prepared, k, seed) returns an object with `objective` (float, lower is better) and
    `predict(prepared) -> DataFrame` with `user_id` and an integer `segment`; optional attributes
    `bic`, `aic`, `degenerate_retries` are copied into the curve. When predict's output lacks the
    vector column (`metrics_kwargs["features_col"]`, default "features_vector") it is joined back
    from `prepared` on user_id, so user_id must identify a row of `prepared`.

    Fits are submitted to a thread pool of `parallelism` workers (Spark runs jobs from several driver
    threads at once); the metrics of each k are computed on the calling thread while later fits run.
    `prepared` is read by every fit and metric pass: cache it first.

    Each curve entry: k, best_seed, objective, seeds, seed_objectives ({seed: objective}), seed_ari
    (mean pairwise ARI between the seeds' labels, None for one seed), the `cluster_metrics` results
    (its non-empty cluster count as `clusters`), and bic / aic / degenerate_retries of the best
    seed when it has them."""
    ks, seeds = [int(k) for k in ks], [int(s) for s in seeds]
    if not ks or not seeds:
        raise ValueError(f"sweep needs at least one k and one seed, got ks={ks} seeds={seeds}")
    if len(set(ks)) != len(ks) or len(set(seeds)) != len(seeds):
        raise ValueError(f"ks and seeds must not repeat, got ks={ks} seeds={seeds}")
    if parallelism < 1:
        raise ValueError(f"parallelism must be at least 1, got {parallelism}")
    kwargs = dict(metrics_kwargs or {})
    features_col = kwargs.pop("features_col", DEFAULT_FEATURES)
    kwargs.pop("prediction_col", None)  # predictions are always in `segment`
    if "user_id" not in prepared.columns or features_col not in prepared.columns:
        raise ValueError(
            f"prepared must have user_id and the vector column {features_col!r} (features_col in metrics_kwargs); "
            f"it has {prepared.columns}"
        )

    result = SweepResult()
    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="segspark-sweep",
                            initializer=share_session, initargs=(prepared.sparkSession,)) as pool:
        futures: dict[tuple[int, int], Future] = {
            (k, seed): pool.submit(fit_one, prepared, k, seed) for k in sorted(ks) for seed in seeds
        }
        try:
            for k in sorted(ks):
                fitted = {}
                for seed in seeds:
                    try:
                        fitted[seed] = futures[(k, seed)].result()
                    except Exception as exc:
                        raise RuntimeError(f"fit_one failed for k={k} seed={seed}: {exc}") from exc
                objectives = {seed: _objective(model, k, seed) for seed, model in fitted.items()}
                best_seed = min(seeds, key=lambda s: objectives[s])  # ties: the earlier seed
                best = fitted[best_seed]

                predictions = {seed: _labels(model, prepared, k, seed) for seed, model in fitted.items()}
                scored = predictions[best_seed]
                if features_col not in scored.columns:
                    scored = scored.select("user_id", SEGMENT_COL).join(
                        prepared.select("user_id", features_col), "user_id"
                    )
                metrics = cluster_metrics(scored, features_col, SEGMENT_COL, **kwargs)

                labels = None
                for i, seed in enumerate(seeds):
                    one = predictions[seed].select("user_id", F.col(SEGMENT_COL).alias(f"_seed_{i}"))
                    labels = one if labels is None else labels.join(one, "user_id")
                seed_ari = mean_pairwise_ari(labels, [f"_seed_{i}" for i in range(len(seeds))])

                entry: dict[str, Any] = {
                    "k": k,
                    "best_seed": best_seed,
                    "objective": objectives[best_seed],
                    "seeds": list(seeds),
                    "seed_objectives": objectives,
                    "seed_ari": seed_ari,
                    "clusters": metrics["k"],
                }
                entry.update({name: value for name, value in metrics.items() if name != "k"})
                for extra in ("bic", "aic", "degenerate_retries"):
                    value = getattr(best, extra, None)
                    if value is not None:
                        entry[extra] = value
                result.curve.append(entry)
                result.models[k] = best
                log.info(
                    "sweep k=%d: best seed %d of %d (objective %.6g), %d non-empty clusters, silhouette %s, "
                    "Davies-Bouldin %s, Calinski-Harabasz %s, seed ARI %s",
                    k, best_seed, len(seeds), entry["objective"], metrics["k"], _fmt(metrics["silhouette"], 3),
                    _fmt(metrics["davies_bouldin"], 3), _fmt(metrics["calinski_harabasz"], 1), _fmt(seed_ari, 3),
                )
        except BaseException:
            # Do not run the queued fits after a failure (leaving the `with` waits for them).
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return result


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"

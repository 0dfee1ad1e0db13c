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

`curve_from_grid` turns the sample fits of one model (every k and seed, fitted on the user sample by
models.sample_grid, the best seed of each k measured there) into the curve: the best seed per k by
its objective, its metrics, and the seeds' disagreement as the mean pairwise adjusted Rand index of
their labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from segspark.models.sample_grid import CellResult

log = logging.getLogger(__name__)

RULE_METRICS = ("silhouette", "davies_bouldin", "calinski_harabasz")


def _usable(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _k_list(entries: Iterable[Mapping]) -> str:
    return ", ".join(str(e["k"]) for e in sorted(entries, key=lambda e: e["k"]))


def choose_k(curve: Sequence[Mapping], *, silhouette_tolerance: float = 0.01) -> tuple[int, str]:
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
    """One curve entry per k (ascending) and the best seed's sample fit per k."""

    curve: list[dict] = field(default_factory=list)
    best: dict[int, CellResult] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # "k=.. seed=..: error" of the fits that raised

    def choose(self, silhouette_tolerance: float = 0.01) -> tuple[int, str]:
        return choose_k(self.curve, silhouette_tolerance=silhouette_tolerance)


def curve_from_grid(results: Sequence[CellResult]) -> SweepResult:
    """The curve of one model from its cells of the sample grid (models.sample_grid).

    Per k the seed with the lowest objective is kept (ties: the earlier seed; the task that fitted
    the k's seeds picked it and measured it) and its sample metrics go into the entry, with the
    seeds' disagreement as the mean pairwise adjusted Rand index between their labels of the sample.
    A cell whose fit raised is left out and named in `failed`; a k whose every seed raised gets no
    entry. Each entry: k, best_seed, objective, seeds, seed_objectives ({seed: objective}), seed_ari
    (None for one seed), the sample metrics (`clusters` = non-empty clusters), fit_seconds (the
    seeds' fitting time in the tasks), and bic / aic / degenerate_retries of the best seed when it
    has them."""
    result = SweepResult()
    by_k: dict[int, list[CellResult]] = {}
    for cell in results:
        by_k.setdefault(cell.cell.k, []).append(cell)
    for k in sorted(by_k):
        cells = by_k[k]
        for cell in cells:
            if cell.fit is None:
                result.failed.append(f"k={k} seed={cell.cell.seed}: {cell.error}")
                log.warning("sample sweep: %s k=%d seed=%d failed: %s", cell.cell.model, k, cell.cell.seed, cell.error)
        best = next((c for c in cells if c.best), None)
        if best is None:
            continue
        objectives = {c.cell.seed: _objective(c.fit.objective, k, c.cell.seed) for c in cells if c.fit is not None}
        metrics = best.metrics
        entry: dict[str, Any] = {
            "k": k,
            "best_seed": best.cell.seed,
            "objective": objectives[best.cell.seed],
            "seeds": [c.cell.seed for c in cells],
            "seed_objectives": objectives,
            "seed_ari": best.seed_ari,
            "clusters": metrics["k"],
            "fit_seconds": round(math.fsum(c.seconds for c in cells), 3),
        }
        entry.update({name: value for name, value in metrics.items() if name not in ("k", "segments")})
        for extra in ("bic", "aic", "degenerate_retries"):
            if best.fit.extras.get(extra) is not None:
                entry[extra] = best.fit.extras[extra]
        result.curve.append(entry)
        result.best[k] = best
        log.info(
            "sample sweep %s k=%d: best seed %d of %d (objective %.6g), %d non-empty clusters, silhouette %s, "
            "Davies-Bouldin %s, Calinski-Harabasz %s, Dunn %s, seed ARI %s",
            best.cell.model, k, best.cell.seed, len(cells), entry["objective"], metrics["k"],
            _fmt(metrics["silhouette"], 3), _fmt(metrics["davies_bouldin"], 3),
            _fmt(metrics["calinski_harabasz"], 1), _fmt(metrics.get("dunn"), 3), _fmt(best.seed_ari, 3),
        )
    return result


def _objective(value: Any, k: int, seed: int) -> float:
    if not _usable(value):
        log.warning("sweep: k=%d seed=%d has no finite objective (%r); it ranks last", k, seed, value)
        return math.inf
    return float(value)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"

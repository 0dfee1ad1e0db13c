"""The k sweep as Spark tasks: every (model, k, seed) fitted with scikit-learn on the user sample.

Choosing k takes many fits (3 models x 6 k x 3 seeds by default). Each one on every user would be
a distributed MLlib fit, every iteration of it a Spark job: job latency decides small runs, and
the sweep costs the fit times 54 on large ones. Instead each (model, k, seed) is fitted by a Spark
task with scikit-learn on the bounded user sample (`models.sample`) and measured there
(`evaluation.sample_metrics`); one Spark job runs the whole grid, on every local core or spread over
the executors of a cluster (the cells are dealt to a few tasks per core). The chosen k is then
fitted once on every user with MLlib.

The sample travels in the task function's closure (pickled with it; Spark ships a large closure
once per executor), never through `SparkContext.broadcast`, so this also works over Spark Connect.
Each task is limited to one BLAS/OpenMP thread: Spark runs one task per core.

The seeds of one (model, k) are fitted by the same task, which keeps the best of them by the
model's objective, measures only that one (the metrics cost more than a fit on a small sample) and
measures the seeds' agreement (mean pairwise adjusted Rand index of their labels) where the labels
are. A cell's result comes back as one small row: its objective and fitting time, and for the best
seed of its k the metrics, the agreement and the fitted parameters (to start the full-scale fit from).
"""


from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql.types import (
    BinaryType,
    BooleanType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleFit:
    """A scikit-learn fit on the sample: what the sweep ranks and the full-scale fit starts from."""

    labels: np.ndarray | None  # (n,) int: cluster of every sampled user (not shipped back from the tasks)
    objective: float  # lower is better: WSS, or the negative log-likelihood for GMM
    params: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. centroids; weights, means, covariances
    extras: dict[str, Any] = field(default_factory=dict)  # bic, aic, degenerate_retries: copied into the curve


@dataclass(frozen=True)
class Cell:
    model: str
    k: int
    seed: int


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    fit: SampleFit | None  # None when the fit raised (`error`)
    metrics: dict  # evaluation.sample_metrics of the fit's labels: the best seed of its k only, else {}
    seconds: float  # fitting (and, for the best seed, measuring) time in the task
    error: str | None = None
    best: bool = False  # the lowest objective among the seeds of its (model, k) (ties: the earlier seed)
    seed_ari: float | None = None  # best seed only: mean pairwise ARI of the seeds' labels (None for one seed)


# A fitter: fit(points, k, seed, **options) -> SampleFit; options are the model's, JSON-like.
Fitter = Callable[..., SampleFit]

_RESULT = StructType(
    [
        StructField("cell", LongType(), False),
        StructField("objective", DoubleType(), True),
        StructField("params", BinaryType(), True),
        StructField("extras", StringType(), True),
        StructField("metrics", StringType(), True),
        StructField("seed_ari", DoubleType(), True),
        StructField("best", BooleanType(), False),
        StructField("seconds", DoubleType(), False),
        StructField("error", StringType(), True),
    ]
)


def run_grid(
    spark: SparkSession,
    points: np.ndarray,
    cells: Sequence[Cell],
    fitters: Mapping[str, Fitter],
    options: Mapping[str, Mapping[str, Any]],
    silhouette_rows: int,
    tasks: int | None = None,
) -> list[CellResult]:
    """Fit every cell in Spark tasks (one job); results in the order of `cells`.

    fitters / options: per model name, the scikit-learn fitter and its keyword options (plain values
    or numpy arrays: they travel in the closure). tasks: how many Spark tasks share the (model, k)
    groups (None: one per group); a task costs ~0.1 s of scheduling and start-up, several times a small
    fit. A cell whose fit raises comes back with `error`."""
    cells = list(cells)
    if not cells:
        return []
    points = np.ascontiguousarray(points, dtype=np.float64)
    groups: dict[tuple[str, int], list[int]] = {}
    for index, cell in enumerate(cells):
        groups.setdefault((cell.model, cell.k), []).append(index)
    # Groups in order of decreasing k (the longer fits first), dealt round-robin to the tasks so that
    # every task gets a similar share of long and short fits.
    ordered = sorted(groups.values(), key=lambda members: -cells[members[0]].k)
    count = len(ordered) if tasks is None else max(1, min(int(tasks), len(ordered)))
    task = _task(points, cells, ordered, dict(fitters), {m: dict(o) for m, o in options.items()},
                 int(silhouette_rows), count)
    start = time.perf_counter()
    rows = spark.range(0, count, 1, count).mapInPandas(task, _RESULT).collect()
    by_cell = {int(r["cell"]): r for r in rows}
    results = [_result(cell, by_cell[i]) for i, cell in enumerate(cells)]
    log.info(
        "sample sweep: %d fits of %d x %d sample values in %d tasks, %.1f s (%.1f s of work in the tasks)",
        len(cells), points.shape[0], points.shape[1], count, time.perf_counter() - start,
        sum(r.seconds for r in results),
    )
    return results


def _task(points, cells, groups, fitters, options, silhouette_rows, tasks):
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            for batch in batches:
                for task in batch["id"].tolist():
                    for group in groups[task::tasks]:
                        yield pd.DataFrame(_fit_group(group, cells, points, fitters, options, silhouette_rows))

    return run


def _fit_group(members, cells, points, fitters, options, silhouette_rows) -> list[dict]:
    """Every seed of one (model, k), the best of them measured."""
    from sklearn.metrics import adjusted_rand_score

    from segspark.evaluation.sample_metrics import sample_metrics

    rows, fits = [], {}
    for index in members:
        cell, start = cells[index], time.perf_counter()
        try:
            fits[index] = fitters[cell.model](points, cell.k, cell.seed, **options.get(cell.model, {}))
            error = None
        except Exception as exc:  # noqa: BLE001 - reported per cell; the driver decides what fails the run
            error = f"{type(exc).__name__}: {exc}"
        rows.append({"cell": index, "objective": None if error else float(fits[index].objective), "params": None,
                     "extras": None, "metrics": None, "seed_ari": None, "best": False,
                     "seconds": time.perf_counter() - start, "error": error})
    if not fits:
        return rows
    # Ties on the objective go to the earlier seed; a non-finite objective ranks last.
    best = min(fits, key=lambda i: (not np.isfinite(fits[i].objective), fits[i].objective, members.index(i)))
    start = time.perf_counter()
    labels = [fits[i].labels for i in members if i in fits]
    pairs = [(a, b) for n, a in enumerate(labels) for b in labels[n + 1:]]
    buffer = io.BytesIO()
    np.savez(buffer, **fits[best].params)
    row = next(r for r in rows if r["cell"] == best)
    row.update(
        best=True,
        params=buffer.getvalue(),
        extras=json.dumps(fits[best].extras, default=float),
        metrics=json.dumps(sample_metrics(points, fits[best].labels, silhouette_rows), default=float),
        seed_ari=float(np.mean([adjusted_rand_score(a, b) for a, b in pairs])) if pairs else None,
    )
    row["seconds"] += time.perf_counter() - start
    return rows


def _result(cell: Cell, row) -> CellResult:
    seconds = float(row["seconds"])
    if row["error"] is not None:
        return CellResult(cell, None, {}, seconds, row["error"])
    if not row["best"]:
        return CellResult(cell, SampleFit(None, float(row["objective"])), {}, seconds)
    with np.load(io.BytesIO(row["params"]), allow_pickle=False) as npz:
        params = {name: npz[name] for name in npz.files}
    fit = SampleFit(None, float(row["objective"]), params, json.loads(row["extras"]))
    return CellResult(cell, fit, json.loads(row["metrics"]), seconds, best=True, seed_ari=row["seed_ari"])

"""Training the swept models of a run: choose k on the user sample, then fit every user.

`train_baselines` fits the enabled swept models (models.registry: kmeans, bisecting_kmeans, gmm):

1. k: a sweep over models.selection.k_min..k_max with several seeds per k, every fit a Spark task
   running scikit-learn on the bounded user sample (models.sample_grid; evaluation.selection: the
   documented rule and its reason in words), or the model's fixed k;
2. one MLlib fit of the chosen k on every user, started from the sample's best solution where MLlib
   allows it (models.mllib_start), and its assignments for every user on the executors (segment,
   probability, anomaly score and flag).

`users_check` stops a run whose users are too few for an enabled model before any fit. Models that
find their own k (the deep model) train themselves (`train` of their module); segments.stable then
takes every trained model of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame, SparkSession

from segspark.config import ClusteringConfig, KSelectionConfig, ModelsConfig
from segspark.errors import NotEnoughUsersError
from segspark.evaluation.selection import SweepResult, curve_from_grid
from segspark.models import registry
from segspark.models.contract import TrainedModel
from segspark.models.sample import UserSample
from segspark.models.sample_grid import Cell, run_grid
from segspark.runtime.session import share_session, task_slots

log = logging.getLogger(__name__)

def users_check(models: ModelsConfig, users: int, dims: int) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Each swept baseline's k range for a run of `users` users with `dims` prepared features, and
    warnings. What a model needs: k below the number of users (a silhouette needs a cluster of two),
    and for gmm, whose components have full covariances over its `dims_gmm` input dimensions
    (principal_components), at least dims_gmm + 1 users per component. A k range beyond that is
    narrowed (warned); a fixed k or a deep model the users cannot carry, or a range with no k left,
    is a NotEnoughUsersError naming every such model and the users it needs, raised before any fit."""
    selection, ranges, warnings, problems = models.selection, {}, [], []
    for model in registry.enabled(models):
        if not model.swept:
            problem = model.implementation().users_problem(users, models)
            if problem is not None:
                problems.append(f"{problem} (or set models.{model.config_key}.enabled=false to leave {model.name} out)")
            continue
        name, cfg = model.name, model.settings(models)
        per_component = model.implementation().users_per_cluster(cfg, dims)
        highest = min(users - 1, users // per_component)  # the largest k the users carry
        need = (f"k x ({per_component - 1} + 1) users (a full covariance in {per_component - 1} dimensions per component)"
                if per_component > 1 else "k + 1 users")
        if cfg.k is not None:
            if cfg.k > highest:
                problems.append(f"{name} with models.{name}.k={cfg.k} needs {need}: at least "
                                f"{_users_for(cfg.k, per_component):,}, the run has {users:,}; lower models.{name}.k "
                                f"or set models.{name}.enabled=false")
            continue
        if highest < 2:
            problems.append(f"{name} needs {need}, at least {_users_for(2, per_component):,} for k=2, the run has "
                            f"{users:,} (or set models.{name}.enabled=false)")
        elif selection.k_max > highest:
            k_min, k_max = min(selection.k_min, highest), highest
            warnings.append(f"{users:,} users: {name}'s k range {selection.k_min}..{selection.k_max} is narrowed to "
                            f"{k_min}..{k_max} ({name} needs {need})")
            ranges[name] = (k_min, k_max)
    if problems:
        raise NotEnoughUsersError(f"too few users ({users:,}) for the enabled models: " + "; ".join(problems))
    for warning in warnings:
        log.warning("%s", warning)
    return ranges, warnings


def _users_for(k: int, per_component: int) -> int:
    return max(k + 1, k * per_component)


@dataclass(frozen=True)
class _Selected:
    name: str
    k: int
    reason: str
    swept: SweepResult
    options: dict


def train_baselines(
    spark: SparkSession,
    models: Mapping[str, ClusteringConfig],
    selection: KSelectionConfig,
    prepared: DataFrame,
    sample: UserSample,
    k_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[TrainedModel]:
    """The MLlib baselines: k chosen on the user sample (one Spark job fits every model, k and seed
    with scikit-learn: models.sample_grid), then one MLlib fit per model on every user, started from
    the sample's best solution for that k. `k_ranges`: a model's (k_min, k_max) where the run's
    users narrow the configured range (`users_check`)."""
    if not models:
        return []
    sweep_sample = sample.head(selection.sample_size)
    cells, fitters, options = [], {}, {}
    for name, cfg in models.items():
        module = registry.get(name).implementation()
        fitters[name] = module.fit_sample
        options[name] = module.options(cfg, sweep_sample.matrix)
        k_min, k_max = (k_ranges or {}).get(name, (selection.k_min, selection.k_max))
        ks = [cfg.k] if cfg.k is not None else list(range(k_min, k_max + 1))
        seeds = [cfg.seed + 1009 * i for i in range(selection.seeds)]
        cells += [Cell(name, k, seed) for k in ks for seed in seeds]
    # Two tasks per task slot: every core busy, cells balanced over them, and the per-task cost of
    # Spark (scheduling, the closure) paid a few times rather than once per fit.
    slots = task_slots(spark)
    results = run_grid(spark, sweep_sample.matrix, cells, fitters, options, selection.silhouette_sample,
                       tasks=None if slots is None else 2 * slots)

    chosen = []
    for name, cfg in models.items():
        swept = curve_from_grid([r for r in results if r.cell.model == name])
        for entry in swept.curve:
            entry["sample_users"] = sweep_sample.size
        if cfg.k is not None:
            if cfg.k not in swept.best:
                raise RuntimeError(f"{name}: every fit of the fixed k={cfg.k} failed on the sample: {'; '.join(swept.failed)}")
            k, reason = cfg.k, f"k={cfg.k}: fixed in config (models.{name}.k)"
        else:
            try:
                k, reason = swept.choose(selection.silhouette_tolerance)
            except ValueError as exc:
                failed = f"; failed fits: {'; '.join(swept.failed)}" if swept.failed else ""
                raise RuntimeError(f"{name}: no k could be chosen: {exc}{failed}") from exc
            reason += f"; measured on a hash sample of {sweep_sample.describe()}"
        log.info("%s: %s", name, reason)
        chosen.append(_Selected(name, k, reason, swept, options[name]))

    # When the sweep's sample is every user, a model may fit them on the driver (models.bisecting).
    every_user = sweep_sample.matrix if sweep_sample.size == sample.total_users else None
    fitted = _fit_full(prepared, chosen, selection.parallelism, sample.total_users, every_user)
    trained = []
    for pick in chosen:
        model = fitted[pick.name]
        for entry in pick.swept.curve:
            if entry["k"] == pick.k:  # the full-scale fit next to the sample's metrics
                entry["full_objective"] = model.objective
                entry["full_cluster_sizes"] = list(model.cluster_sizes)
        metrics = {
            "k": pick.k, "reason": pick.reason, "fixed_k": models[pick.name].k is not None, "curve": pick.swept.curve,
            "model": model.metrics(), "sample_users": sweep_sample.size, "failed_sample_fits": pick.swept.failed,
        }
        trained.append(TrainedModel(pick.name, pick.k, pick.reason, model, pick.swept.curve, model.score(prepared), metrics))
    return trained


def _fit_full(prepared: DataFrame, chosen: list[_Selected], parallelism: int, users: int,
              every_user: np.ndarray | None) -> dict[str, object]:
    """One MLlib fit per model on every user, `parallelism` at a time (Spark runs jobs from several
    driver threads at once), each started from the best sample fit of its chosen k. `every_user`:
    the prepared vectors of every user when the sample holds them all (`points` of fit_one)."""

    def fit(pick: _Selected):
        best = pick.swept.best[pick.k]
        module = registry.get(pick.name).implementation()
        return module.fit_one(prepared, pick.k, best.cell.seed, start=best.fit, users=users, points=every_user,
                              **pick.options)

    with ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="segspark-fit",
                            initializer=share_session, initargs=(prepared.sparkSession,)) as pool:
        futures = {pick.name: pool.submit(fit, pick) for pick in chosen}
        return {name: future.result() for name, future in futures.items()}



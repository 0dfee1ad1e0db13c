"""Gaussian mixture segmentation with full covariances, a likelihood anomaly score and a guard
against degenerate fits.

Fitting. The k sweep fits scikit-learn's GaussianMixture on the user sample (`fit_sample`); the
chosen k is then fitted on every user (`fit_one`) starting from the sample's best mixture, by EM run
as Spark aggregations (`_em`: each iteration one pass in which every partition sums its users'
responsibilities, weighted means and centred scatter matrices with numpy, k x (1 + d + d^2) numbers
per partition). MLlib cannot start from a given mixture: its DataFrame estimator takes no initial
model (SPARK-15785), and the RDD-based one, which does, lowered the likelihood of a converged
scikit-learn mixture on every step (measured on 5,000 generated users: -49,976 to -50,391 after one
step, and its own epsilon-floored objective too), so it is not used. Without a sample solution
(`start=None`), MLlib's GaussianMixture fits from its own random start, with the retries below.
When the run's user sample holds every user (`points` of fit_one), the same EM steps run on the
driver over those vectors, with the partitions' code and no Spark job per step.

Per user (`assign`): `probabilities` is the posterior membership vector, `probability` its largest
entry (the assigned segment's), and `anomaly_score` the negative log-likelihood of the user's point
under the mixture, -log(sum_j w_j N(x | mu_j, Sigma_j)). It is a log-density, so it can be negative
for points inside tight components; larger means less likely. All three come from one pandas UDF
that carries the k (log-weight, mean, whitening matrix, log-determinant) in its closure, with
log-sum-exp so that far-away users get a large finite score instead of -log(0) = inf and exact
posteriors. `is_anomaly` marks scores above the training scores' (1 - contamination) quantile,
computed once at fit time and stored.

Degenerate guard: EM can collapse a component onto a few (or duplicated) points, giving it a
near-zero weight or a near-singular covariance; such a fit is detected (`degeneracy_reasons`) and
refitted with another seed (seed + 1000 * attempt) up to `max_retries` times. When every try is
degenerate, `DegenerateModelError` carries each try's reasons. A full-scale EM that ends degenerate
falls back to MLlib's fit with retries.

Input space: the mixture is fitted on the leading `principal_components` principal axes of the
prepared features (of the k sweep's sample, or of every user with MLlib's PCA when fitted without
one; saved as numbers with the fitted object), not on all of them. A full covariance in d dimensions has d(d+1)/2 parameters per component, and on
behavioural features (counts, shares, one-hot columns) a segment is often constant along some
direction, so full-dimensional covariances come out singular for every seed. `centroids` and
`covariances` are in that input space; BIC/AIC count its dimension.

Log-likelihood: MLlib adds machine epsilon to every weighted component density before taking the
log (its E-step and summary.logLikelihood do), which floors each user's log-likelihood at
log(k * 2.2e-16) ~ -35 and so understates how unlikely far-away users are. `log_likelihood` (and
with it `objective`, BIC and AIC) is therefore the exact sum of the per-user log-likelihoods computed
here, in the same training pass as the anomaly threshold; after an MLlib fit its figure is kept as
`mllib_log_likelihood` and cross-checked against the same sum with MLlib's floor applied. BIC and AIC
count p = (k-1) + k*d + k*d(d+1)/2 free parameters (full covariances).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
from pyspark.ml.clustering import GaussianMixture, GaussianMixtureModel
from pyspark.ml.feature import PCA
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BinaryType, StructField, StructType

from segspark.config import GMMConfig
from segspark.models.contract import (
    QUANTILE_RELATIVE_ERROR,
    MLlibSaving,
    assignments,
    check_fit_arguments,
    threshold_aggregate,
)

# The per-row mixture math in a numpy-only module: the pandas UDFs below run in Python workers,
# which then import it alone, not this module with pyspark.ml and the config (0.25 s per new worker).
from segspark.models.mixture_math import components, projected, weighted_log_densities
from segspark.models.prepare import PREPARED_VECTOR, check_prepared
from segspark.models.sample_grid import SampleFit
from segspark.runtime.expressions import memoised

log = logging.getLogger(__name__)

MODEL_NAME = "gmm"
MEMBERSHIP_VECTOR = "_membership"  # MLlib's probabilityCol; assign() exposes it as `probabilities`
_RESERVED = ("segment", MEMBERSHIP_VECTOR)  # columns the model adds
GMM_INPUT = "_gmm_input"  # the vectors the mixture is fitted on (principal components, see docstring)
LOG_LIKELIHOOD_RTOL = 1e-6
# Convergence of the full-scale fit started from the sample's mixture: a change of the log-likelihood
# per user below this: the test scikit-learn applies on the sample (its default tol).
WARM_TOL_PER_USER = 1e-3
MLLIB_EPSILON = float(np.finfo(float).eps)  # MLUtils.EPSILON, added to each w_j * N_j(x) by MLlib


class DegenerateModelError(RuntimeError):
    """Every GaussianMixture fit had a collapsed or singular component.

    attempts: one {"seed": int, "reasons": [str, ...]} per fit tried."""

    def __init__(self, message: str, attempts: list[dict]):
        super().__init__(message)
        self.attempts = attempts

    @property
    def reasons(self) -> list[str]:
        return [f"seed {a['seed']}: {r}" for a in self.attempts for r in a["reasons"]]


@dataclass(frozen=True)
class FittedGMM(MLlibSaving):
    # Plain numbers only. Bundles of earlier versions saved the principal axes as an MLlib PCAModel.
    LEGACY_FIELDS: ClassVar = {"projection": ("pyspark.ml.feature.PCAModel", lambda pca: pca.pc.toArray().tolist())}

    model_name: str
    k: int
    seed: int  # as requested; fit_seed is the one the returned model was fitted with
    centroids: list[list[float]]  # component means in the prepared space, k x d
    weights: list[float]
    covariances: list[list[list[float]]]  # k x d x d
    objective: float  # negative total log-likelihood; lower is better
    log_likelihood: float  # exact: the sum of the users' log-likelihoods (module docstring)
    mllib_log_likelihood: float | None  # MLlib's summary.logLikelihood, floored per user at log(k * EPSILON);
    # None when the full-scale EM started from the sample's mixture (not MLlib's)
    bic: float
    aic: float
    cluster_sizes: list[int]  # users per argmax segment
    contamination: float
    anomaly_threshold: float | None  # None when contamination is 0: nobody is flagged
    fit_seed: int
    iterations: int  # EM iterations on every user
    degenerate_retries: int = 0
    degenerate_reasons: list[dict] = field(default_factory=list)  # the rejected tries: {"seed", "reasons"}
    projection: list[list[float]] | None = None  # d x components principal axes: GMM input = x @ axes; None = x
    warm_start: bool = False  # EM on every user started from the sample's mixture (else MLlib's fit)
    fitted_on: str = "mllib"  # where that EM ran: "driver" (every user in the sample) or "spark"; else "mllib"

    def metrics(self) -> dict:
        return {
            "model": self.model_name,
            "k": self.k,
            "seed": self.seed,
            "fit_seed": self.fit_seed,
            "iterations": self.iterations,
            "cluster_sizes": self.cluster_sizes,
            "weights": self.weights,
            "objective": self.objective,
            "log_likelihood": self.log_likelihood,
            "mllib_log_likelihood": self.mllib_log_likelihood,
            "bic": self.bic,
            "aic": self.aic,
            "contamination": self.contamination,
            "anomaly_threshold": self.anomaly_threshold,
            "degenerate_retries": self.degenerate_retries,
            "degenerate_reasons": self.degenerate_reasons,
            "input_dimensions": len(self.centroids[0]),
            "principal_components": self.projection is not None,
            "warm_start": self.warm_start,
            "fitted_on": self.fitted_on,
        }

    def predict(self, prepared: DataFrame) -> DataFrame:
        """Every column of `prepared` plus `segment` (int)."""
        check_prepared(prepared, need_user_id=False, reserved=_RESERVED)
        mixture = self.mixture(F.col(GMM_INPUT))
        return _gmm_input(prepared, self.projection).select(*prepared.columns, mixture["segment"].alias("segment"))

    def assign(self, prepared: DataFrame) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities per user (executors only)."""
        check_prepared(prepared, need_user_id=True, reserved=_RESERVED)
        # The mixture's pandas UDF (its closure pickled once) and its input: built once per fitted model.
        mixture = memoised(self, "mixture", lambda: self.mixture(F.col(GMM_INPUT)).alias("_m"))
        scored = _gmm_input(prepared, self.projection).select("user_id", mixture).select(
            "user_id",
            F.col("_m.segment").alias("segment"),
            F.col("_m.probabilities").alias("probabilities"),
            (-F.col("_m.log_density")).alias("anomaly_score"),
        )
        # Posteriors are normalised; the clamp only absorbs a last-bit rounding excess.
        probability = F.least(F.lit(1.0), F.greatest(F.lit(0.0), F.array_max("probabilities")))
        return assignments(scored.withColumn("probability", probability), self.anomaly_threshold, "probabilities")

    def mixture(self, vector: Column) -> Column:
        """struct(segment, probabilities, log_density) of a GMM input vector column (`GMM_INPUT`)."""
        return _mixture_udf(self.weights, self.centroids, self.covariances)(vector_to_array(vector))

    def log_density(self, vector: Column) -> Column:
        """log sum_j w_j N(x | mu_j, Sigma_j) of a GMM input vector column (`GMM_INPUT`)."""
        return self.mixture(vector)["log_density"]


def principal_axes(points: np.ndarray, components: int | None) -> np.ndarray | None:
    """The leading `components` principal axes of a sample (d x components), or None when
    `components` is None or not below the number of features. Projecting is x @ axes, uncentred, as
    MLlib's PCAModel does: a shift of every point, which a mixture absorbs in its means."""
    points = np.asarray(points, dtype=float)
    if components is None or components >= points.shape[1]:
        return None
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:components].T
    # A sign per axis that does not depend on the SVD routine: the largest loading is positive.
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(components)])
    return np.ascontiguousarray(axes * np.where(signs == 0, 1.0, signs))


def options(cfg: GMMConfig, sample: np.ndarray) -> dict:
    """The keyword options of `fit_sample` and `fit_one` from the model's config; the principal axes
    come from the sample, so that the sweep and the full fit share one projection."""
    return {
        "max_iter": cfg.max_iter, "contamination": cfg.contamination, "tol": cfg.tol, "max_retries": cfg.max_retries,
        "min_component_weight": cfg.min_component_weight, "principal_components": cfg.principal_components,
        "reg_covar": cfg.reg_covar, "projection": principal_axes(sample, cfg.principal_components),
    }


def users_per_cluster(cfg: GMMConfig, dims: int) -> int:
    """A component has a full covariance over its input dimensions (principal_components of the
    `dims` prepared features): it needs that many users plus one."""
    return min(cfg.principal_components or dims, dims) + 1


def fit_sample(
    points: np.ndarray,
    k: int,
    seed: int,
    *,
    projection: np.ndarray | None = None,
    max_iter: int = 100,
    max_retries: int = 3,
    min_component_weight: float | None = None,
    min_variance: float = 1e-6,
    max_condition: float = 1e12,
    reg_covar: float = 1e-6,
    **_: object,
) -> SampleFit:
    """scikit-learn GaussianMixture (full covariances, k-means initialisation) on the sample projected
    on `projection`, with the degenerate guard and retries of the full fit. Its own convergence test
    (1e-3 on the mean log-likelihood) applies; models.gmm.tol is the full fit's."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    x = np.asarray(points, dtype=float) if projection is None else np.asarray(points, dtype=float) @ projection
    min_weight = 0.005 / k if min_component_weight is None else min_component_weight
    rejected: list[dict] = []
    for attempt in range(max_retries + 1):
        fit_seed = seed + 1000 * attempt
        fitted = SkGaussianMixture(n_components=k, covariance_type="full", max_iter=max_iter, random_state=fit_seed,
                                   reg_covar=reg_covar).fit(x)
        labels = fitted.predict(x)
        reasons = degeneracy_reasons(
            fitted.weights_, fitted.means_, fitted.covariances_, np.bincount(labels, minlength=k).tolist(),
            min_component_weight=min_weight, min_variance=min_variance, max_condition=max_condition,
        )
        if not reasons:
            break
        rejected.append({"seed": fit_seed, "reasons": reasons})
    else:
        raise DegenerateModelError(
            f"GaussianMixture k={k} was degenerate on all {max_retries + 1} seeds tried on the sample: "
            f"{rejected[-1]['reasons']}", rejected,
        )
    log_likelihood = float(fitted.score(x)) * x.shape[0]
    return SampleFit(
        labels=labels,
        objective=-log_likelihood,
        params={"weights": fitted.weights_, "means": fitted.means_, "covariances": fitted.covariances_},
        extras={"bic": float(fitted.bic(x)), "aic": float(fitted.aic(x)), "degenerate_retries": len(rejected),
                "fit_seed": fit_seed},
    )


def fit_one(
    prepared: DataFrame,
    k: int,
    seed: int,
    *,
    max_iter: int = 100,
    tol: float = 0.01,
    contamination: float = 0.01,
    min_component_weight: float | None = None,
    min_variance: float = 1e-6,
    max_condition: float = 1e12,
    max_retries: int = 3,
    quantile_relative_error: float = QUANTILE_RELATIVE_ERROR,
    principal_components: int | None = 8,
    projection: np.ndarray | None = None,
    start: SampleFit | None = None,
    users: int | None = None,
    reg_covar: float = 1e-6,
    points: np.ndarray | None = None,
    **_: object,
) -> FittedGMM:
    """Fit a full-covariance GaussianMixture on every user, retrying degenerate fits.

    min_component_weight: smallest acceptable mixing weight (default 0.005 / k, i.e. 1/200 of an even
    share); min_variance: smallest acceptable covariance eigenvalue relative to the data's mean
    per-dimension variance; max_condition: largest acceptable covariance condition number.
    projection: the principal axes to fit on (d x components: `principal_axes` of the k sweep's
    sample); None computes them from every user with MLlib's PCA (`principal_components` of them).
    start: the sample's mixture in that projection, to start from (models.mllib_start: on a classic
    session; a degenerate result falls back to MLlib's own initialisation with retries). MLlib stops
    EM when the total log-likelihood changes by less than `tol`, which at a million users means
    running every iteration; started from a converged solution, the fit stops instead when the change
    per user is below WARM_TOL_PER_USER (given `users`, the number of rows), or `tol` if larger.
    reg_covar is added to the covariances' diagonal in the sample fit and in the EM started from it;
    MLlib's own fit (the fallback) has no such term.
    points: every user's prepared vector, in the driver's memory when the run's user sample holds
    them all: the EM started from the sample's mixture then runs on the driver, the same steps
    without a Spark job each (`_em`).
    Only k x d x d numbers and one aggregate row come back to the driver. Cache `prepared` first: it
    is read by every fit and once more for the anomaly threshold."""
    check_prepared(prepared, need_user_id=False, reserved=_RESERVED)
    check_fit_arguments(k, contamination, quantile_relative_error)
    if max_retries < 0:
        raise ValueError(f"max_retries={max_retries}: expected 0 or more")
    min_weight = 0.005 / k if min_component_weight is None else min_component_weight
    if projection is None:
        projection = _fit_projection(prepared, principal_components)
    prepared = _gmm_input(prepared.select(PREPARED_VECTOR), projection)
    guard = {"min_component_weight": min_weight, "min_variance": min_variance, "max_condition": max_condition}

    rejected: list[dict] = []
    parameters, warm, iterations, mllib_log_likelihood, fit_seed = None, False, 0, None, seed
    if start is not None:
        local = None if points is None else projected(np.asarray(points, dtype=float), projection)
        weights, means, covariances, iterations = _em(
            prepared, start.params["weights"], start.params["means"], start.params["covariances"],
            max_iter=max_iter, tol_per_user=WARM_TOL_PER_USER, reg_covar=reg_covar, points=local,
        )
        reasons = degeneracy_reasons(weights, means, covariances, **guard)
        if reasons:
            for reason in reasons:
                log.warning("gmm k=%d started from the sample's mixture ended degenerate: %s", k, reason)
            rejected.append({"seed": None, "reasons": reasons})
        else:
            parameters, warm = (weights, means, covariances), True
    if parameters is None:
        model = _fit_cold(prepared, k, seed, max_iter, tol, max_retries, guard, rejected)
        parameters = _parameters(model)
        fit_seed, iterations = int(model.getSeed()), int(model.summary.numIter)
        mllib_log_likelihood = float(model.summary.logLikelihood)
    fitted = _fitted_mixture(
        prepared, parameters, k=k, seed=seed, fit_seed=fit_seed, iterations=iterations, warm=warm,
        fitted_on="spark" if points is None else "driver",
        mllib_log_likelihood=mllib_log_likelihood, rejected=rejected, contamination=contamination,
        quantile_relative_error=quantile_relative_error, tol=tol, max_iter=max_iter, projection=projection,
    )
    log.info(
        "gmm k=%d seed=%d fitted on %d users (%s) after %d degenerate retries: sizes %s, log-likelihood %.6g, "
        "bic %.6g, anomaly threshold %s",
        k, fit_seed, sum(fitted.cluster_sizes), f"{iterations} EM iterations from the sample's mixture, "
        f"on the {'driver' if fitted.fitted_on == 'driver' else 'executors'}" if warm
        else f"MLlib, {iterations} iterations from its own start",
        len(rejected), fitted.cluster_sizes, fitted.log_likelihood, fitted.bic, fitted.anomaly_threshold,
    )
    return fitted


def _fitted_mixture(
    prepared: DataFrame, parameters: tuple, *, k: int, seed: int, fit_seed: int, iterations: int, warm: bool,
    fitted_on: str,
    mllib_log_likelihood: float | None, rejected: list[dict], contamination: float, quantile_relative_error: float,
    tol: float, max_iter: int, projection,
) -> FittedGMM:
    """The fitted mixture with what one more pass over the training users measures."""
    weights, means, covariances = parameters
    # One pass over the training users: the exact log-likelihood, MLlib's floored version of it (to
    # cross-check the densities computed here), the cluster sizes and the anomaly threshold.
    mixture = _mixture_udf(weights, means, covariances)(vector_to_array(F.col(GMM_INPUT)))
    scored = prepared.select(mixture.alias("_m")).select(
        F.col("_m.segment").alias("segment"), F.col("_m.log_density").alias("ll")
    )
    floor = F.lit(math.log(k * MLLIB_EPSILON))
    # log(exp(ll) + k * EPSILON) without leaving log space: what MLlib adds up for each user.
    floored = F.greatest(F.col("ll"), floor) + F.log1p(F.exp(-F.abs(F.col("ll") - floor)))
    row = scored.agg(
        F.sum("ll").alias("total"),
        F.sum(floored).alias("floored"),
        threshold_aggregate(-F.col("ll"), contamination, quantile_relative_error).alias("threshold"),
        *[F.sum(F.when(F.col("segment") == j, 1).otherwise(0)).alias(f"size_{j}") for j in range(k)],
    ).first()
    sizes = [int(row[f"size_{j}"]) for j in range(k)]
    log_likelihood = float(row["total"])
    if mllib_log_likelihood is not None:
        _cross_check(k, float(row["floored"]), mllib_log_likelihood, tol, converged=iterations < max_iter)
    threshold = float(row["threshold"]) if contamination > 0 else None

    n, d = sum(sizes), len(means[0])
    p = (k - 1) + k * d + k * d * (d + 1) // 2
    return FittedGMM(
        model_name=MODEL_NAME,
        k=k,
        seed=seed,
        centroids=means,
        weights=weights,
        covariances=covariances,
        objective=-log_likelihood,
        log_likelihood=log_likelihood,
        mllib_log_likelihood=mllib_log_likelihood,
        bic=-2.0 * log_likelihood + p * math.log(n),
        aic=-2.0 * log_likelihood + 2.0 * p,
        cluster_sizes=sizes,
        contamination=contamination,
        anomaly_threshold=threshold,
        fit_seed=fit_seed,
        iterations=iterations,
        degenerate_retries=len(rejected),
        degenerate_reasons=rejected,
        projection=None if projection is None else np.asarray(projection, dtype=float).tolist(),
        warm_start=warm,
        fitted_on=fitted_on if warm else "mllib",
    )


def _fit_cold(
    prepared: DataFrame, k: int, seed: int, max_iter: int, tol: float, max_retries: int, guard: dict, rejected: list
) -> GaussianMixtureModel:
    """MLlib's GaussianMixture from its own initialisation, retried with other seeds while degenerate."""
    for attempt in range(max_retries + 1):
        fit_seed = seed + 1000 * attempt
        estimator = GaussianMixture(
            k=k,
            maxIter=max_iter,
            tol=tol,
            seed=fit_seed,
            featuresCol=GMM_INPUT,
            predictionCol="segment",
            probabilityCol=MEMBERSHIP_VECTOR,
        )
        model: GaussianMixtureModel = estimator.fit(prepared)
        sizes = [int(s) for s in model.summary.clusterSizes]
        reasons = degeneracy_reasons(*_parameters(model), sizes, **guard)
        if not reasons:
            return model
        for reason in reasons:
            log.warning("gmm k=%d seed=%d (try %d) is degenerate: %s", k, fit_seed, attempt + 1, reason)
        rejected.append({"seed": fit_seed, "reasons": reasons})
    raise DegenerateModelError(
        f"GaussianMixture k={k} was degenerate on all {max_retries + 1} seeds tried "
        f"({', '.join(str(a['seed']) for a in rejected if a['seed'] is not None)}): {rejected[-1]['reasons']}. "
        "Lower k, drop constant or duplicated features, or raise max_retries",
        rejected,
    )


def _cross_check(k: int, floored: float, mllib: float, tol: float, *, converged: bool) -> None:
    """Warn when the densities computed here disagree with MLlib's (anomaly scores would be off).

    MLlib's summary likelihood is taken in the E-step before the last parameter update, so it lags
    the returned model by one EM step: at convergence that step changed it by at most about `tol`."""
    slack = max(LOG_LIKELIHOOD_RTOL * abs(mllib), tol)
    if abs(floored - mllib) <= slack:
        return
    level = logging.WARNING if converged else logging.INFO
    log.log(
        level,
        "gmm k=%d: per-user log-likelihoods (floored like MLlib) sum to %.10g but MLlib reports %.10g%s",
        k,
        floored,
        mllib,
        "; anomaly scores may be off" if converged else " (not converged: maxIter reached)",
    )


def degeneracy_reasons(
    weights: Sequence[float],
    means: Sequence[Sequence[float]],
    covariances: Sequence[Sequence[Sequence[float]]],
    cluster_sizes: Sequence[int] | None = None,
    *,
    min_component_weight: float,
    min_variance: float = 1e-6,
    max_condition: float = 1e12,
) -> list[str]:
    """Why a fitted mixture is unusable, one line per problem; empty when it is fine.

    The variance floor is relative to the data's mean per-dimension variance, taken from the mixture
    itself (trace of sum_j w_j (Sigma_j + mu_j mu_j^T) - mu mu^T, over d): after an EM step that is
    exactly the training data's covariance, so no extra pass over the users is needed."""
    w = np.asarray(weights, dtype=float)
    mu = np.asarray(means, dtype=float)
    sigma = np.asarray(covariances, dtype=float)
    reasons = []
    finite = [
        bool(np.isfinite(w[j]) and np.isfinite(mu[j]).all() and np.isfinite(sigma[j]).all()) for j in range(len(w))
    ]
    data_variance = _mixture_variance(w, mu, sigma, finite)
    floor = min_variance * data_variance
    for j in range(len(w)):
        if not finite[j]:
            reasons.append(f"component {j}: NaN or infinite weight, mean or covariance")
            continue
        if w[j] < min_component_weight:
            reasons.append(f"component {j}: weight {w[j]:.3g} below min_component_weight {min_component_weight:.3g}")
        if cluster_sizes is not None and cluster_sizes[j] == 0:
            reasons.append(f"component {j}: empty cluster (no user has it as the most likely segment)")
        eigenvalues = np.linalg.eigvalsh((sigma[j] + sigma[j].T) / 2.0)  # symmetrise: MLlib's is up to rounding
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        if smallest <= 0.0:
            reasons.append(f"component {j}: covariance not positive definite (smallest eigenvalue {smallest:.3g})")
            continue
        if smallest < floor:
            reasons.append(
                f"component {j}: covariance nearly singular (smallest eigenvalue {smallest:.3g} below "
                f"min_variance {min_variance:.3g} x data variance {data_variance:.3g})"
            )
        if largest / smallest > max_condition:
            reasons.append(
                f"component {j}: covariance condition number {largest / smallest:.3g} above {max_condition:.3g}"
            )
    return reasons


def _mixture_variance(w: np.ndarray, mu: np.ndarray, sigma: np.ndarray, finite: list[bool]) -> float:
    keep = [j for j, ok in enumerate(finite) if ok and w[j] > 0]
    if not keep:
        return 1.0  # nothing usable to scale by; every component is reported on its own anyway
    wk = w[keep] / w[keep].sum()
    mean = wk @ mu[keep]
    second = sum(wk[i] * (sigma[j] + np.outer(mu[j], mu[j])) for i, j in enumerate(keep))
    variance = float(np.trace(second - np.outer(mean, mean))) / mu.shape[1]
    return variance if variance > 0 else 1.0


def _parameters(model: GaussianMixtureModel) -> tuple[list[float], list[list[float]], list[list[list[float]]]]:
    """Weights, means and covariances as plain floats (k x d x d: small, collected once)."""
    gaussians = model.gaussians
    weights = [float(w) for w in model.weights]
    means = [[float(x) for x in g.mean.toArray()] for g in gaussians]
    covariances = [g.cov.toArray().astype(float).tolist() for g in gaussians]
    return weights, means, covariances


def _mixture_udf(weights: Sequence[float], means: Sequence[Sequence[float]], covariances: Sequence):
    """A pandas UDF array<double> -> struct(segment, probabilities, log_density) with the mixture in its
    closure: the most likely component, the exact posteriors and the log-density, with log-sum-exp so
    that a far-away point keeps a finite log-density and normalised posteriors."""
    mu, whiten, coef = components(weights, means, covariances)

    @F.pandas_udf("segment int, probabilities array<double>, log_density double")
    def mixture(points: pd.Series) -> pd.DataFrame:
        n = len(points)
        segment = np.full(n, -1, dtype=np.int32)
        density = np.full(n, np.nan)
        posteriors: list = [None] * n
        valid = points.notna().to_numpy()
        if valid.any():
            x = np.stack(points[valid].to_numpy()).astype(float)
            comp = weighted_log_densities(x, mu, whiten, coef)
            top = comp.max(axis=1)
            log_total = top + np.log(np.exp(comp - top[:, None]).sum(axis=1))
            density[valid] = log_total
            segment[valid] = comp.argmax(axis=1)
            rows = np.flatnonzero(valid)
            for row, posterior in zip(rows, np.exp(comp - log_total[:, None]), strict=True):
                posteriors[row] = posterior
        return pd.DataFrame({"segment": segment, "probabilities": posteriors, "log_density": density})

    return mixture


_EM_STATS = "stats"


def _em(
    frame: DataFrame, weights, means, covariances, *, max_iter: int, tol_per_user: float, reg_covar: float = 1e-6,
    points: np.ndarray | None = None,
) -> tuple[list[float], list[list[float]], list[list[list[float]]], int]:
    """EM on every user of `frame` (the `GMM_INPUT` column) from the given mixture, until the mean
    log-likelihood per user changes by less than `tol_per_user` or `max_iter` steps; (weights, means,
    covariances, steps). Each step is one Spark job: every partition returns its sums of
    responsibilities, responsibility-weighted points and scatter matrices around the current means
    (centred, so no precision is lost to large offsets); the driver adds them up (the M step).
    `points`: the same users' GMM input in the driver's memory, whose sums the driver then computes
    itself, with the partitions' code, without a job. reg_covar is added to every covariance's
    diagonal, as scikit-learn does on the sample."""
    w = np.asarray(weights, dtype=float)
    mu = np.asarray(means, dtype=float)
    cov = np.asarray(covariances, dtype=float)
    k, d = mu.shape
    if points is None:
        schema = StructType([StructField(_EM_STATS, BinaryType(), False)])
        vectors = frame.select(vector_to_array(F.col(GMM_INPUT)).alias("x"))

        def statistics(w, mu, cov) -> list[bytes]:
            return [row[_EM_STATS] for row in vectors.mapInPandas(_em_partition(w, mu, cov), schema).collect()]
    else:
        batch = pd.DataFrame({"x": list(points)})

        def statistics(w, mu, cov) -> list[bytes]:
            return [out[_EM_STATS].iloc[0] for out in _em_partition(w, mu, cov)(iter([batch]))]

    previous, steps = None, 0
    while steps < max_iter:
        steps += 1
        total = np.zeros(2 + k + k * d + k * d * d)
        for part in statistics(w, mu, cov):
            total += np.frombuffer(part, dtype=np.float64)
        n, log_likelihood = total[0], total[1]
        nk = total[2:2 + k]
        shift = total[2 + k:2 + k + k * d].reshape(k, d)  # sum r (x - mu_old)
        scatter = total[2 + k + k * d:].reshape(k, d, d)  # sum r (x - mu_old)(x - mu_old)^T
        safe = np.maximum(nk, 1e-300)
        delta = shift / safe[:, None]
        mu = mu + delta
        cov = scatter / safe[:, None, None] - np.einsum("ki,kj->kij", delta, delta) + reg_covar * np.eye(d)
        w = nk / max(n, 1.0)
        if previous is not None and abs(log_likelihood - previous) < tol_per_user * n:
            break
        previous = log_likelihood
    return w.tolist(), mu.tolist(), cov.tolist(), steps


def _em_partition(weights: np.ndarray, means: np.ndarray, covariances: np.ndarray):
    mu, whiten, coef = components(weights, means, covariances)
    k, d = means.shape

    def run(batches):
        total = np.zeros(2 + k + k * d + k * d * d)
        for batch in batches:
            if batch.empty:
                continue
            x = np.stack(batch["x"].to_numpy()).astype(float)
            comp = weighted_log_densities(x, mu, whiten, coef)
            top = comp.max(axis=1)
            log_total = top + np.log(np.exp(comp - top[:, None]).sum(axis=1))
            r = np.exp(comp - log_total[:, None])  # responsibilities, n x k
            centred = x[:, None, :] - mu[None, :, :]  # n x k x d
            total[0] += x.shape[0]
            total[1] += log_total.sum()
            total[2:2 + k] += r.sum(axis=0)
            total[2 + k:2 + k + k * d] += np.einsum("nk,nkd->kd", r, centred).ravel()
            total[2 + k + k * d:] += np.einsum("nk,nkd,nke->kde", r, centred, centred).ravel()
        yield pd.DataFrame({_EM_STATS: [total.tobytes()]})

    return run


# Without a native LAPACK (no libblas/liblapack on the machine, as here and on CI), Spark falls back
# to F2J's Java translation of LAPACK 3.1, which keeps Fortran SAVE variables in static fields:
# Dlasq3/Dlasq4 (inside the SVD that ends MLlib's PCA) hold per-call state there, and Dlamch/Dlamc2
# compute the machine constants on the first call behind an unsynchronised flag. Two SVDs at once,
# as the k sweep's threads ran them, fail with NotConvergedException, and a race on the first call
# can leave wrong constants for the life of the JVM (seen on CI: every later GMM fit failed). So the
# driver-side SVDs run one at a time, and the constants are computed on one thread before the first.
_DRIVER_LAPACK = threading.Lock()


def _fit_projection(prepared: DataFrame, components: int | None) -> np.ndarray | None:
    """Principal axes of every user's prepared vector (MLlib's PCA, distributed: one d x d covariance),
    d x components, or None when `components` is None or not below the number of prepared features.
    The k sweep passes the axes of its sample instead (`principal_axes`)."""
    _initialise_lapack_constants(prepared.sparkSession)
    dimensions = len(prepared.select(PREPARED_VECTOR).first()[0])
    if components is None or components >= dimensions:
        return None
    with _DRIVER_LAPACK:
        model = PCA(k=components, inputCol=PREPARED_VECTOR, outputCol=GMM_INPUT).fit(prepared.select(PREPARED_VECTOR))
    return np.asarray(model.pc.toArray(), dtype=float)


def _initialise_lapack_constants(spark) -> None:
    """Have the driver JVM's LAPACK compute its machine constants now, on one thread (see above).
    In local mode the executors share this JVM, so their first eigen-decompositions (GaussianMixture
    computes them lazily in its tasks) find the constants ready too. One py4j call, so it is simply
    made before every fit: a stopped and rebuilt session has a new JVM. Spark Connect has no JVM here."""
    if getattr(spark, "_jvm", None) is None:
        return
    with _DRIVER_LAPACK:
        spark._jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().dlamch("E")


def _gmm_input(prepared: DataFrame, projection) -> DataFrame:
    """`prepared` with the GMM input column: the prepared vector, or its projection x @ axes (a pandas
    UDF with the d x components axes in its closure)."""
    if GMM_INPUT in prepared.columns:
        return prepared
    if projection is None:
        return prepared.withColumn(GMM_INPUT, F.col(PREPARED_VECTOR))
    axes = np.asarray(projection, dtype=float)

    @F.pandas_udf("array<double>")
    def project(points: pd.Series) -> pd.Series:
        if len(points) == 0:
            return pd.Series([], dtype=object)
        return pd.Series(list(projected(np.stack(points.to_numpy()).astype(float), axes)))

    return prepared.withColumn(GMM_INPUT, array_to_vector(project(vector_to_array(F.col(PREPARED_VECTOR)))))


FITTED = FittedGMM

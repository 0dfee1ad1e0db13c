"""MLlib GaussianMixture segmentation with full covariances, a likelihood anomaly score and a guard
against degenerate fits.

Per user: `probabilities` is MLlib's posterior membership vector, `probability` its largest entry
(the assigned segment's), and `anomaly_score` the negative log-likelihood of the user's point under
the mixture, -log(sum_j w_j N(x | mu_j, Sigma_j)). It is a log-density, so it can be negative for
points inside tight components; larger means less likely. It is computed on the executors by a
pandas UDF that carries the k (log-weight, mean, whitening matrix, log-determinant) in its closure,
with log-sum-exp so that far-away users get a large finite score instead of -log(0) = inf.
`is_anomaly` marks scores above the training scores' (1 - contamination) quantile, computed once at
fit time and stored. For a user far from every component MLlib's posteriors flatten towards 1/k
(every weighted density underflows to its epsilon floor, below), so there a low `probability` goes
with a high `anomaly_score`: read the two together.

Degenerate guard: EM can collapse a component onto a few (or duplicated) points, giving it a
near-zero weight or a near-singular covariance; MLlib has no covariance regulariser, so such a fit is
detected (`degeneracy_reasons`) and refitted with another seed (seed + 1000 * attempt) up to
`max_retries` times. When every try is degenerate, `DegenerateModelError` carries each try's reasons.

Input space: the mixture is fitted on the leading `principal_components` principal components of
the prepared features (PCA fitted on the training users, distributed; saved with the fitted object),
not on all of them. A full covariance in d dimensions has d(d+1)/2 parameters per component, and on
behavioural features (counts, shares, one-hot columns) a segment is often constant along some
direction, so full-dimensional covariances come out singular for every seed. `centroids` and
`covariances` are in that input space; BIC/AIC count its dimension.

Log-likelihood: MLlib adds machine epsilon to every weighted component density before taking the
log (its E-step and summary.logLikelihood do), which floors each user's log-likelihood at
log(k * 2.2e-16) ~ -35 and so understates how unlikely far-away users are. `log_likelihood` (and
with it `objective`, BIC and AIC) is therefore the exact sum of the per-user log-likelihoods computed
here, in the same training pass as the anomaly threshold; MLlib's figure is kept as
`mllib_log_likelihood` and cross-checked against the same sum with MLlib's floor applied. BIC and AIC
count p = (k-1) + k*d + k*d(d+1)/2 free parameters (full covariances).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pyspark.ml.clustering import GaussianMixture, GaussianMixtureModel
from pyspark.ml.feature import PCA, PCAModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.models.prepare import PREPARED_VECTOR, check_prepared

log = logging.getLogger(__name__)

MODEL_NAME = "gmm"
MEMBERSHIP_VECTOR = "_membership"  # MLlib's probabilityCol; assign() exposes it as `probabilities`
_RESERVED = ("segment", MEMBERSHIP_VECTOR)  # columns the model adds
GMM_INPUT = "_gmm_input"  # the vectors the mixture is fitted on (principal components, see docstring)
QUANTILE_RELATIVE_ERROR = 0.001  # rank error of the anomaly threshold: 0.1% of the training users
LOG_LIKELIHOOD_RTOL = 1e-6
MLLIB_EPSILON = float(np.finfo(float).eps)  # MLUtils.EPSILON, added to each w_j * N_j(x) by MLlib
_LOG_2PI = math.log(2.0 * math.pi)


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
class FittedGMM:
    model_name: str
    k: int
    seed: int  # as requested; fit_seed is the one the returned model was fitted with
    model: GaussianMixtureModel  # save with model.write().overwrite().save(path)
    centroids: list[list[float]]  # component means in the prepared space, k x d
    weights: list[float]
    covariances: list[list[list[float]]]  # k x d x d
    objective: float  # negative total log-likelihood; lower is better
    log_likelihood: float  # exact: the sum of the users' log-likelihoods (module docstring)
    mllib_log_likelihood: float  # summary.logLikelihood: floored per user at log(k * EPSILON)
    bic: float
    aic: float
    cluster_sizes: list[int]  # users per argmax segment
    contamination: float
    anomaly_threshold: float | None  # None when contamination is 0: nobody is flagged
    fit_seed: int
    iterations: int
    degenerate_retries: int = 0
    degenerate_reasons: list[dict] = field(default_factory=list)  # the rejected tries: {"seed", "reasons"}
    projection: PCAModel | None = None  # prepared vector -> GMM input (principal components); None = as is

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
        }

    def predict(self, prepared: DataFrame) -> DataFrame:
        """Every column of `prepared` plus `segment` (int)."""
        check_prepared(prepared, need_user_id=False, reserved=_RESERVED)
        frame = _gmm_input(prepared, self.projection)
        return self.model.transform(frame).select(*prepared.columns, F.col("segment").cast("int"))

    def assign(self, prepared: DataFrame) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities per user (executors only)."""
        check_prepared(prepared, need_user_id=True, reserved=_RESERVED)
        memberships = vector_to_array(F.col(MEMBERSHIP_VECTOR))
        scored = self.model.transform(_gmm_input(prepared, self.projection)).select(
            "user_id",
            F.col("segment").cast("int").alias("segment"),
            memberships.alias("probabilities"),
            (-self.log_density(F.col(GMM_INPUT))).alias("anomaly_score"),
        )
        flagged = (
            F.col("anomaly_score") > F.lit(self.anomaly_threshold)
            if self.anomaly_threshold is not None
            else F.lit(False)
        )
        # The posteriors are normalised by MLlib; the clamp only absorbs a last-bit rounding excess.
        probability = F.least(F.lit(1.0), F.greatest(F.lit(0.0), F.array_max("probabilities")))
        return scored.select(
            "user_id",
            "segment",
            probability.alias("probability"),
            "anomaly_score",
            flagged.alias("is_anomaly"),
            "probabilities",
        )

    def log_density(self, vector: Column) -> Column:
        """log sum_j w_j N(x | mu_j, Sigma_j) of a GMM input vector column (`GMM_INPUT`), as a pandas UDF."""
        return _log_density_udf(self.weights, self.centroids, self.covariances)(vector_to_array(vector))


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
) -> FittedGMM:
    """Fit a full-covariance GaussianMixture on `features_vector`, retrying degenerate fits.

    min_component_weight: smallest acceptable mixing weight (default 0.005 / k, i.e. 1/200 of an even
    share); min_variance: smallest acceptable covariance eigenvalue relative to the data's mean
    per-dimension variance; max_condition: largest acceptable covariance condition number.
    Only k x d x d numbers and one aggregate row come back to the driver. Cache `prepared` first: it
    is read by every fit and once more for the anomaly threshold."""
    check_prepared(prepared, need_user_id=False, reserved=_RESERVED)
    if k < 2:
        raise ValueError(f"k={k}: expected at least 2 components")
    if not 0.0 <= contamination < 0.5:
        raise ValueError(f"contamination={contamination}: expected a share in [0, 0.5), e.g. 0.01")
    if max_retries < 0:
        raise ValueError(f"max_retries={max_retries}: expected 0 or more")
    if not 0.0 < quantile_relative_error < 1.0:
        raise ValueError(f"quantile_relative_error={quantile_relative_error}: expected a value in (0, 1), e.g. 0.001")
    min_weight = 0.005 / k if min_component_weight is None else min_component_weight
    projection = _fit_projection(prepared, principal_components)
    prepared = _gmm_input(prepared, projection)

    rejected: list[dict] = []
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
        weights, means, covariances = _parameters(model)
        sizes = [int(s) for s in model.summary.clusterSizes]
        reasons = degeneracy_reasons(
            weights,
            means,
            covariances,
            sizes,
            min_component_weight=min_weight,
            min_variance=min_variance,
            max_condition=max_condition,
        )
        if not reasons:
            break
        for reason in reasons:
            log.warning("gmm k=%d seed=%d (try %d) is degenerate: %s", k, fit_seed, attempt + 1, reason)
        rejected.append({"seed": fit_seed, "reasons": reasons})
    else:
        raise DegenerateModelError(
            f"GaussianMixture k={k} was degenerate on all {max_retries + 1} seeds tried "
            f"({', '.join(str(a['seed']) for a in rejected)}): {rejected[-1]['reasons']}. "
            "Lower k, drop constant or duplicated features, or raise max_retries",
            rejected,
        )

    summary = model.summary
    mllib_log_likelihood, iterations = float(summary.logLikelihood), int(summary.numIter)
    n, d = sum(sizes), len(means[0])

    # One pass over the training users: the exact log-likelihood, MLlib's floored version of it (to
    # cross-check the densities computed here) and the anomaly threshold.
    ll = prepared.select(
        _log_density_udf(weights, means, covariances)(vector_to_array(F.col(GMM_INPUT))).alias("ll")
    )
    floor = F.lit(math.log(k * MLLIB_EPSILON))
    # log(exp(ll) + k * EPSILON) without leaving log space: what MLlib adds up for each user.
    floored = F.greatest(F.col("ll"), floor) + F.log1p(F.exp(-F.abs(F.col("ll") - floor)))
    accuracy = max(1, round(1.0 / quantile_relative_error))
    row = ll.agg(
        F.sum("ll").alias("total"),
        F.sum(floored).alias("floored"),
        F.percentile_approx(-F.col("ll"), 1.0 - contamination, accuracy).alias("threshold"),
    ).first()
    log_likelihood = float(row["total"])
    _cross_check(k, float(row["floored"]), mllib_log_likelihood, tol, converged=iterations < max_iter)
    threshold = float(row["threshold"]) if contamination > 0 else None

    p = (k - 1) + k * d + k * d * (d + 1) // 2
    fitted = FittedGMM(
        model_name=MODEL_NAME,
        k=k,
        seed=seed,
        model=model,
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
        projection=projection,
    )
    log.info(
        "gmm k=%d seed=%d fitted on %d users in %d iterations after %d degenerate retries: sizes %s, "
        "log-likelihood %.6g (MLlib's floored %.6g), bic %.6g, anomaly threshold %s",
        k,
        fit_seed,
        n,
        iterations,
        len(rejected),
        sizes,
        log_likelihood,
        mllib_log_likelihood,
        fitted.bic,
        threshold,
    )
    return fitted


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


def _log_density_udf(weights: Sequence[float], means: Sequence[Sequence[float]], covariances: Sequence):
    """A pandas UDF array<double> -> double: the mixture log-density, with the constants in its closure.

    Each covariance is factored once here as Sigma = U diag(s) U^T: then A = diag(s^-1/2) U^T whitens,
    (x - mu)^T Sigma^-1 (x - mu) = |A (x - mu)|^2 and log det Sigma = sum log s."""
    mu = np.asarray(means, dtype=float)
    d = mu.shape[1]
    whitening, log_coef = [], []
    for w, cov in zip(weights, covariances, strict=True):
        s, u = np.linalg.eigh((np.asarray(cov, dtype=float) + np.asarray(cov, dtype=float).T) / 2.0)
        whitening.append((u / np.sqrt(s)).T)
        log_coef.append(math.log(w) - 0.5 * (d * _LOG_2PI + float(np.log(s).sum())))
    whiten = np.stack(whitening)
    coef = np.asarray(log_coef)

    @F.pandas_udf("double")
    def log_density(points: pd.Series) -> pd.Series:
        out = np.full(len(points), np.nan)
        valid = points.notna().to_numpy()
        if valid.any():
            x = np.stack(points[valid].to_numpy()).astype(float)
            comp = np.empty((x.shape[0], len(coef)))
            for j in range(len(coef)):
                z = (x - mu[j]) @ whiten[j].T
                comp[:, j] = coef[j] - 0.5 * np.einsum("ij,ij->i", z, z)
            top = comp.max(axis=1)
            # log-sum-exp: factor out the largest term so a far-away point keeps a finite log-density.
            out[valid] = top + np.log(np.exp(comp - top[:, None]).sum(axis=1))
        return pd.Series(out)

    return log_density


# Without a native LAPACK (no libblas/liblapack on the machine, as here and on CI), Spark falls back
# to F2J's Java translation of LAPACK 3.1, which keeps Fortran SAVE variables in static fields:
# Dlasq3/Dlasq4 (inside the SVD that ends MLlib's PCA) hold per-call state there, and Dlamch/Dlamc2
# compute the machine constants on the first call behind an unsynchronised flag. Two SVDs at once,
# as the k sweep's threads ran them, fail with NotConvergedException, and a race on the first call
# can leave wrong constants for the life of the JVM (seen on CI: every later GMM fit failed). So the
# driver-side SVDs run one at a time, and the constants are computed on one thread before the first.
_DRIVER_LAPACK = threading.Lock()


def _fit_projection(prepared: DataFrame, components: int | None) -> PCAModel | None:
    """Principal components of the prepared vectors (distributed: one d x d covariance), or None
    when `components` is None or not below the number of prepared features."""
    _initialise_lapack_constants(prepared.sparkSession)
    dimensions = len(prepared.select(PREPARED_VECTOR).first()[0])
    if components is None or components >= dimensions:
        return None
    with _DRIVER_LAPACK:
        return PCA(k=components, inputCol=PREPARED_VECTOR, outputCol=GMM_INPUT).fit(prepared.select(PREPARED_VECTOR))


def _initialise_lapack_constants(spark) -> None:
    """Have the driver JVM's LAPACK compute its machine constants now, on one thread (see above).
    In local mode the executors share this JVM, so their first eigen-decompositions (GaussianMixture
    computes them lazily in its tasks) find the constants ready too. One py4j call, so it is simply
    made before every fit: a stopped and rebuilt session has a new JVM. Spark Connect has no JVM here."""
    if getattr(spark, "_jvm", None) is None:
        return
    with _DRIVER_LAPACK:
        spark._jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().dlamch("E")


def _gmm_input(prepared: DataFrame, projection: PCAModel | None) -> DataFrame:
    if GMM_INPUT in prepared.columns:
        return prepared
    if projection is None:
        return prepared.withColumn(GMM_INPUT, F.col(PREPARED_VECTOR))
    return projection.transform(prepared)

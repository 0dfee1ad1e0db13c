"""The Gaussian mixture's per-row math, in numpy alone: log-densities of the components, and the
projection of prepared vectors onto the fit's principal axes.

The GMM's pandas UDFs (assignment, the EM steps over every user, the projection) run in Spark's
Python workers, which import the modules of the functions they call. Kept apart from
`segspark.models.gmm` (pyspark.ml, the config's pydantic models), a new worker imports this module
in milliseconds instead of 0.25 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_LOG_2PI = math.log(2.0 * math.pi)


def components(weights: Sequence[float], means, covariances) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means k x d, whitening matrices k x d x d, log coefficients k) of a mixture: each covariance
    is factored once as Sigma = U diag(s) U^T, so that A = diag(s^-1/2) U^T whitens,
    (x - mu)^T Sigma^-1 (x - mu) = |A (x - mu)|^2 and log det Sigma = sum log s."""
    mu = np.asarray(means, dtype=float)
    d = mu.shape[1]
    whitening, log_coef = [], []
    for w, cov in zip(weights, covariances, strict=True):
        sym = (np.asarray(cov, dtype=float) + np.asarray(cov, dtype=float).T) / 2.0
        s, u = np.linalg.eigh(sym)
        whitening.append((u / np.sqrt(s)).T)
        log_coef.append(math.log(w) - 0.5 * (d * _LOG_2PI + float(np.log(s).sum())))
    return mu, np.stack(whitening), np.asarray(log_coef)


def weighted_log_densities(x: np.ndarray, mu: np.ndarray, whiten: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """n x k: log w_j + log N(x | mu_j, Sigma_j)."""
    out = np.empty((x.shape[0], len(coef)))
    for j in range(len(coef)):
        z = (x - mu[j]) @ whiten[j].T
        out[:, j] = coef[j] - 0.5 * np.einsum("ij,ij->i", z, z)
    return out


def projected(points: np.ndarray, projection) -> np.ndarray:
    """The GMM input of prepared vectors in memory: what `gmm._gmm_input` computes on the executors."""
    return points if projection is None else points @ np.asarray(projection, dtype=float)

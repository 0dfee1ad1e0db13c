"""2-D PCA of the report's bounded user sample (on the driver, scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from segspark.report.data import ProjectionSample


@dataclass(frozen=True)
class Projection:
    coords: np.ndarray  # users x 2
    explained: tuple[float, float]  # share of variance of each component
    inputs: int  # columns that went into the PCA (constant columns are left out)


def project(sample: ProjectionSample) -> Projection | None:
    """Embeddings are projected as they are; features are imputed (median of the sample) and
    standardised first, constant columns left out. None when fewer than 3 users or no varying column."""
    matrix = np.asarray(sample.matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] < 3:
        return None
    if sample.source == "features":
        medians = np.nanmedian(np.where(np.isfinite(matrix), matrix, np.nan), axis=0)
        medians = np.where(np.isnan(medians), 0.0, medians)
        matrix = np.where(np.isfinite(matrix), matrix, medians)
        std = matrix.std(axis=0)
        keep = std > 0
        matrix = (matrix[:, keep] - matrix[:, keep].mean(axis=0)) / std[keep]
    else:
        matrix = np.where(np.isfinite(matrix), matrix, 0.0)
        matrix = matrix[:, matrix.std(axis=0) > 0]
    if matrix.shape[1] == 0:
        return None
    components = min(2, matrix.shape[1])
    pca = PCA(n_components=components, random_state=0)
    coords = pca.fit_transform(matrix)
    ratios = list(pca.explained_variance_ratio_)
    if components == 1:
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
        ratios.append(0.0)
    return Projection(coords=coords, explained=(float(ratios[0]), float(ratios[1])), inputs=int(matrix.shape[1]))

"""The deep model `ae_hdbscan`: autoencoder embeddings, density-based segments and noise.

Fitting happens on the driver on bounded, logged samples: prefixes of the run's hash-ordered user
sample (models.sample), models.autoencoder.sample_size users for the autoencoder and
models.hdbscan.sample_size of their embeddings for HDBSCAN; nothing proportional to the number of
users comes back. Assignment of every user runs on the executors
(segspark.models.deep.scoring.deep_scores): the numpy encoder and the slim HDBSCAN artifact, shipped in the
function closure.

Columns of `assign`: segment (-1 = noise), probability = HDBSCAN membership strength (0 for noise),
anomaly_score = GLOSH outlier score in [0, 1], is_anomaly = score above the (1 - contamination)
quantile of the fitting sample's scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType

from segspark.config import AutoencoderConfig, HdbscanConfig
from segspark.models.sample import UserSample

log = logging.getLogger(__name__)

MODEL_NAME = "ae_hdbscan"
ENCODER_FILE = "autoencoder/encoder.npz"
DENSITY_FILE = "hdbscan/hdbscan.npz"
# Bundle files that hold per-user data: HDBSCAN keeps its fitting sample's embedding points (up to
# models.hdbscan.sample_size users) to assign new users. Left out of MLflow unless mlflow.log_samples.
PER_USER_FILES = (DENSITY_FILE,)


@dataclass
class FittedDeep:
    encoder: object  # segspark.models.deep.encoder.NumpyEncoder
    density: object  # segspark.models.deep.density.SlimHdbscan
    k: int  # clusters found (noise not counted)
    autoencoder_metrics: dict = field(default_factory=dict)
    hdbscan_metrics: dict = field(default_factory=dict)
    keras_model: object | None = None  # the trained Keras autoencoder (saved with the bundle); None when loaded
    model_name: str = MODEL_NAME
    # The HDBSCAN fitting sample and its fitted labels (for the sample metrics; not saved, None when loaded).
    sample_embeddings: np.ndarray | None = field(default=None, repr=False)
    sample_labels: np.ndarray | None = field(default=None, repr=False)

    def metrics(self) -> dict:
        return {"k": self.k, "autoencoder": self.autoencoder_metrics, "hdbscan": self.hdbscan_metrics}

    def scores(self, prepared: DataFrame) -> DataFrame:
        """user_id, embedding, segment, probability, anomaly_score (executors, one pass)."""
        from segspark.models.deep.scoring import deep_scores

        return deep_scores(prepared, self.encoder, self.density)

    def assign(self, prepared: DataFrame, scores: DataFrame | None = None) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities (null)."""
        scored = self.scores(prepared) if scores is None else scores
        return scored.select(
            "user_id",
            "segment",
            "probability",
            "anomaly_score",
            _flag(F.col("anomaly_score"), self.density.anomaly_threshold).alias("is_anomaly"),
            F.lit(None).cast(ArrayType(DoubleType())).alias("probabilities"),
        )

    def save(self, bundle_dir: str) -> None:
        root = Path(bundle_dir)
        (root / ENCODER_FILE).parent.mkdir(parents=True, exist_ok=True)
        (root / DENSITY_FILE).parent.mkdir(parents=True, exist_ok=True)
        self.encoder.save(str(root / ENCODER_FILE))
        if self.keras_model is not None:
            self.keras_model.save(str(root / "autoencoder" / "autoencoder.keras"))
        self.density.save(str(root / DENSITY_FILE))

    @classmethod
    def load(cls, bundle_dir: str, metrics: dict | None = None) -> FittedDeep:
        from segspark.models.deep.density import SlimHdbscan
        from segspark.models.deep.encoder import NumpyEncoder

        root = Path(bundle_dir)
        density = SlimHdbscan.load(str(root / DENSITY_FILE))
        metrics = metrics or {}
        return cls(
            NumpyEncoder.load(str(root / ENCODER_FILE)),
            density,
            int(metrics.get("k", 0)),
            metrics.get("autoencoder", {}),
            metrics.get("hdbscan", {}),
        )


def _flag(score: Column, threshold: float | None) -> Column:
    return F.lit(False) if threshold is None else F.coalesce(score > F.lit(float(threshold)), F.lit(False))


def users_problem(users: int, ae_cfg: AutoencoderConfig, hdb_cfg: HdbscanConfig) -> str | None:
    """Why `users` prepared users are too few for the deep model, with the least number that is
    enough for these settings (None: enough). The same rules as its fit (autoencoder.sample_problem,
    density.sample_problem), so the run stops before any work instead of after the features."""
    from segspark.models.deep import autoencoder, density

    def problem(n: int) -> str | None:
        return (autoencoder.sample_problem(min(n, ae_cfg.sample_size), ae_cfg)
                or density.sample_problem(min(n, hdb_cfg.sample_size), hdb_cfg))

    found = problem(users)
    if found is None:
        return None
    # Both samples stop growing at their sample_size: beyond the larger one more users change nothing.
    limit = max(ae_cfg.sample_size, hdb_cfg.sample_size)
    enough = next((n for n in range(users + 1, limit + 1) if problem(n) is None), None)
    need = f"needs at least {enough:,} users with these settings" if enough else "cannot be fitted with these settings"
    return f"{MODEL_NAME} {need}, the run has {users:,}: {found}"


def fit_deep(
    sample: UserSample,
    ae_cfg: AutoencoderConfig,
    hdb_cfg: HdbscanConfig,
    feature_names: list[str] | None = None,
) -> FittedDeep:
    """Train the autoencoder on the first models.autoencoder.sample_size users of the hash-ordered user
    sample (models.sample), embed its first models.hdbscan.sample_size users and fit HDBSCAN on them."""
    from segspark.models.deep.autoencoder import train_autoencoder
    from segspark.models.deep.density import fit_hdbscan

    if sample.size == 0:
        raise ValueError("no prepared users to fit the autoencoder on")
    training = sample.head(ae_cfg.sample_size).matrix.astype(np.float32)
    log.info("ae_hdbscan: autoencoder sample %d of %d users, %d features", len(training), sample.total_users,
             training.shape[1])
    try:
        trained = train_autoencoder(training, ae_cfg, feature_names)
    except ValueError as exc:
        raise ValueError(
            f"ae_hdbscan: {exc} (settings under models.autoencoder; models.autoencoder.enabled=false skips "
            "the deep model)"
        ) from exc
    embeddings = trained.encoder.encode(sample.head(hdb_cfg.sample_size).matrix.astype(np.float32))
    log.info("ae_hdbscan: HDBSCAN sample %d embeddings of size %d", len(embeddings), embeddings.shape[1])
    density = fit_hdbscan(embeddings, hdb_cfg)
    hdb_metrics = density.metrics()
    k = int(hdb_metrics["n_clusters"])
    if k == 0:
        log.warning("ae_hdbscan: HDBSCAN found no cluster in %d embeddings: every user is noise", len(embeddings))
    fitted = FittedDeep(trained.encoder, density.artifact, k, trained.metrics(), hdb_metrics, trained.keras_model)
    fitted.sample_embeddings = embeddings
    fitted.sample_labels = density.artifact.assigned_fitted_labels()
    return fitted

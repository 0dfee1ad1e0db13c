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
from pyspark import StorageLevel
from pyspark.sql import DataFrame

from segspark.config import AutoencoderConfig, HdbscanConfig, ModelsConfig
from segspark.evaluation.sample_metrics import CURVE_METRICS, sample_metrics
from segspark.models.contract import NOISE_SEGMENT, BundleFiles, Scored, TrainedModel, assignments
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
    model_name: str
    k: int  # clusters found (noise not counted)
    encoder: object  # segspark.models.deep.encoder.NumpyEncoder
    density: object  # segspark.models.deep.density.SlimHdbscan
    autoencoder_metrics: dict = field(default_factory=dict)
    hdbscan_metrics: dict = field(default_factory=dict)
    keras_model: object | None = None  # the trained Keras autoencoder (saved with the bundle); None when loaded
    # The HDBSCAN fitting sample and its fitted labels (for the sample metrics; not saved, None when loaded).
    sample_embeddings: np.ndarray | None = field(default=None, repr=False)
    sample_labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def anomaly_threshold(self) -> float | None:
        return self.density.anomaly_threshold

    @property
    def objective(self) -> float:
        """Share of the HDBSCAN sample called noise: what a density model minimises (lower is better)."""
        return float(self.hdbscan_metrics.get("noise_share") or 0.0)

    def metrics(self) -> dict:
        return {"model": self.model_name, "k": self.k, "objective": self.objective,
                "anomaly_threshold": self.anomaly_threshold,
                "autoencoder": self.autoencoder_metrics, "hdbscan": self.hdbscan_metrics}

    def scores(self, prepared: DataFrame) -> DataFrame:
        """user_id, embedding, segment, probability, anomaly_score (executors, one pass)."""
        from segspark.models.deep.scoring import deep_scores

        return deep_scores(prepared, self.encoder, self.density)

    def assign(self, prepared: DataFrame, scores: DataFrame | None = None) -> DataFrame:
        """user_id, segment, probability, anomaly_score, is_anomaly, probabilities (null)."""
        return assignments(self.scores(prepared) if scores is None else scores, self.anomaly_threshold)

    def score(self, prepared: DataFrame) -> Scored:
        """Assignments and user_embeddings from one scoring pass over the users (persisted: both read it)."""
        scores = self.scores(prepared).persist(StorageLevel.MEMORY_AND_DISK)
        return Scored(self.assign(prepared, scores), {"user_embeddings": scores.select("user_id", "embedding")}, [scores])

    def save(self, bundle_dir: str) -> dict:
        root = Path(bundle_dir)
        (root / ENCODER_FILE).parent.mkdir(parents=True, exist_ok=True)
        (root / DENSITY_FILE).parent.mkdir(parents=True, exist_ok=True)
        self.encoder.save(str(root / ENCODER_FILE))
        if self.keras_model is not None:
            self.keras_model.save(str(root / "autoencoder" / "autoencoder.keras"))
        self.density.save(str(root / DENSITY_FILE))
        return self.metrics()

    @classmethod
    def load(cls, name: str, numbers: dict, files: BundleFiles) -> FittedDeep:
        from segspark.models.deep.density import SlimHdbscan
        from segspark.models.deep.encoder import NumpyEncoder

        encoder = NumpyEncoder.load(str(files.file(ENCODER_FILE, f"the encoder of {name}")))
        density = SlimHdbscan.load(str(files.file(DENSITY_FILE, f"the HDBSCAN artifact of {name}")))
        return cls(name, int(numbers.get("k", 0)), encoder, density, numbers.get("autoencoder", {}),
                   numbers.get("hdbscan", {}))


FITTED = FittedDeep


def users_problem(users: int, models_cfg: ModelsConfig) -> str | None:
    """Why `users` prepared users are too few for the deep model, with the least number that is
    enough for these settings (None: enough). The same rules as its fit (autoencoder.sample_problem,
    density.sample_problem), so the run stops before any work instead of after the features."""
    from segspark.models.deep import autoencoder, density

    ae_cfg, hdb_cfg = models_cfg.autoencoder, models_cfg.hdbscan

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


def warm_up() -> None:
    """What the fit needs, loading while the run's first stages run: TensorFlow and Keras
    (autoencoder.import_in_background)."""
    from segspark.models.deep.autoencoder import import_in_background

    import_in_background()


def sample_size(models_cfg: ModelsConfig) -> int:
    """Users of the run's sample this model fits on: the autoencoder's and HDBSCAN's samples are
    prefixes of it."""
    return max(models_cfg.autoencoder.sample_size, models_cfg.hdbscan.sample_size)


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
    fitted = FittedDeep(MODEL_NAME, k, trained.encoder, density.artifact, trained.metrics(), hdb_metrics,
                        trained.keras_model)
    fitted.sample_embeddings = embeddings
    fitted.sample_labels = density.artifact.assigned_fitted_labels()
    return fitted


def train(prepared: DataFrame, sample: UserSample, models_cfg: ModelsConfig, feature_names: list[str]) -> TrainedModel:
    """ae_hdbscan on a run's users: fit on prefixes of the user sample (on the driver), then score
    every user once (segments and embeddings, one pass on the executors)."""
    fitted = fit_deep(sample, models_cfg.autoencoder, models_cfg.hdbscan, feature_names)
    scored = fitted.score(prepared)
    # Quality of the clusters on HDBSCAN's own fitting sample (its non-noise embeddings), in memory.
    kept = fitted.sample_labels != NOISE_SEGMENT
    quality = sample_metrics(fitted.sample_embeddings[kept], fitted.sample_labels[kept],
                             models_cfg.selection.silhouette_sample)
    hdb_metrics = fitted.hdbscan_metrics
    reason = (
        f"k={fitted.k}: the clusters HDBSCAN found in {hdb_metrics.get('sample_rows')} sampled embeddings "
        f"(min_cluster_size={hdb_metrics.get('min_cluster_size')}, min_samples={hdb_metrics.get('min_samples')})"
    )
    if hdb_metrics.get("assign_noise"):
        reason += (f"; {hdb_metrics.get('density_noise_share', 0.0):.1%} of the sample lay between clusters and "
                   "joined the nearest one, anomalies excepted")
    curve = [{"k": fitted.k, "sample_users": int(kept.sum()), **{m: quality.get(m) for m in CURVE_METRICS}}]
    metrics = {"k": fitted.k, "reason": reason, "curve": curve, "model": fitted.metrics()}
    # Its segments are clusters of the embeddings: their separation is measured there too.
    return TrainedModel(MODEL_NAME, fitted.k, reason, fitted, curve, scored, metrics,
                        embed=lambda rows: fitted.encoder.encode(rows.astype(np.float32)), space="autoencoder embeddings")

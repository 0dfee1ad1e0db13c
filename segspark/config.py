"""Typed, validated configuration.

A config file is YAML; it may name a parent with `extends: other.yaml` (resolved relative to the
file) and overrides only the keys it sets. `--set dotted.key=value` overrides any key last; values
are parsed as YAML scalars, so `models.kmeans.k=6` is an int and `output.catalog=null` is None.

Every key is known: an unknown key or a value of the wrong type is a ConfigError naming the key,
the file (or `--set`) that set it, and the type expected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segspark.errors import ConfigError
from segspark.runtime.redaction import redact
from segspark.runtime.run_ids import RUN_ID_PATTERN, RUN_ID_RULE

log = logging.getLogger(__name__)

EventType = Literal["view", "cart", "remove_from_cart", "purchase", "return"]
CANONICAL_EVENT_TYPES: tuple[str, ...] = EventType.__args__


def _settings_as_strings(value: Any) -> Any:
    """Spark settings and reader options are strings; YAML reads `true` and `4` as bool and int.
    Nested values are left alone so that validation reports them."""
    if isinstance(value, Mapping):
        return {
            str(k): (str(v).lower() if isinstance(v, bool) else v if isinstance(v, (Mapping, list)) else str(v))
            for k, v in value.items()
        }
    return value


class _Section(BaseModel):
    # Unknown keys are errors, and values are not silently coerced between unrelated types.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class SparkConfig(_Section):
    app_name: str = "segspark"
    master: str = "local[2]"
    remote: str | None = None  # Spark Connect URL (sc://host:port); also the SPARK_REMOTE variable
    # `auto`: each batch run, and each micro-batch of a stream, sizes its shuffles from its input
    # (runtime/shuffle_sizing.py); a number pins the session's spark.sql.shuffle.partitions.
    shuffle_partitions: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # The driver JVM's compilers when segspark launches a local session for a batch command: `auto`
    # C1 alone for a small input, `quick` C1 alone, `full` the JVM's default (runtime/jit.py).
    jit: Literal["auto", "quick", "full"] = "auto"
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return _settings_as_strings(value)


class InputColumns(_Section):
    """Source column name for each canonical column (None: the source does not have it)."""

    user_id: str
    event_time: str
    event_type: str | None = None
    item_id: str | None = None
    category: str | None = None
    price: str | None = None
    quantity: str | None = None
    session_id: str | None = None
    order_id: str | None = None
    country: str | None = None
    device: str | None = None

    def mapped(self) -> dict[str, str]:
        """Canonical name -> source name, for the columns the source has."""
        return {k: v for k, v in self.model_dump().items() if v}


def _bounds(value: Any) -> Any:
    """[min, max] of plausible values: numbers (YAML reads `1e308` without a dot as text), min <= max."""
    if isinstance(value, (list, tuple)):
        value = [_number_text(v) for v in value]
        if len(value) != 2:
            raise ValueError("expected [min, max]: two numbers")
        if all(isinstance(v, float) for v in value):
            if not all(math.isfinite(v) for v in value):
                raise ValueError("expected finite numbers [min, max]")
            if value[0] > value[1]:
                raise ValueError(f"min {value[0]} is above max {value[1]}")
    return value


def _number_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class PlausibleTimeConfig(_Section):
    """Event times outside this window are quarantined as implausible_timestamp (null: no bound)."""

    earliest: dt.date | None = dt.date(2000, 1, 1)  # events before this day (UTC)
    max_future_hours: int | None = Field(24, ge=0)  # events later than this after the run started

    @field_validator("earliest", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError("expected a date like 2000-01-01") from None
        return value


class MqttConfig(_Section):
    """The MQTT broker `segspark stream` lands messages from (input.format mqtt; streaming/mqtt_landing.py).

    Each message is one JSON event (the json column mapping). The landing client keeps a persistent
    session (fixed client id, clean start off, session expiry), so the broker queues what arrives
    while the stream is down and re-sends what was not acknowledged; a message is acknowledged only
    once it is in a landed file on disk.
    """

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic: str = Field("segspark/events", min_length=1)  # a topic filter: + and # wildcards allowed
    # Only 1: QoS 0 is at most once (a crash loses messages), and paho keeps a QoS 2 message in memory
    # between PUBREC and PUBREL, so a crash there loses it too; QoS 1 is redelivered until acknowledged.
    qos: Literal[1] = 1
    # The broker keeps the session (subscription, unacknowledged and queued messages) under this id;
    # null: segspark-<streaming.app_id>. Two clients with one id take the session from each other.
    client_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    session_expiry_seconds: int = Field(7 * 24 * 3600, ge=1)  # how long the broker keeps the session offline
    keepalive_seconds: int = Field(30, ge=5)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    username: str | None = None
    # The NAME of an environment variable holding the password (never the password: config is logged).
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tls: bool = False  # TLS with the system's CA certificates
    # Unacknowledged messages the broker may send at once (MQTT 5 receive maximum); also the most
    # messages in one landed file.
    max_inflight: int = Field(1000, ge=1, le=65535)
    flush_seconds: float = Field(0.5, gt=0)  # the longest a received message waits to be landed
    # A message whose record id is among the last dedup_window landed records is a redelivery: it is
    # acknowledged and not landed again. The id is a JSON field of the event (id_field, e.g. an event
    # id) or, when null or absent, a hash of topic and payload.
    dedup_window: int = Field(100_000, ge=1)
    id_field: str | None = Field(None, min_length=1)
    # --available-now: land what the broker holds for the session, until no message came for this long.
    drain_idle_seconds: float = Field(2.0, gt=0)


class InputConfig(_Section):
    path: str
    # kafka: streaming only (`segspark stream`), with the Kafka connector on the classpath; the
    # kafka.* settings (kafka.bootstrap.servers, subscribe, ...) go in options.
    # mqtt: streaming only; messages from the broker of input.mqtt land as files in input.path,
    # which the stream reads as json.
    format: Literal["parquet", "json", "csv", "delta", "kafka", "mqtt"] = "parquet"
    mqtt: MqttConfig | None = None  # input.format mqtt (defaults when null)
    options: dict[str, str] = Field(default_factory=dict)
    columns: InputColumns
    timestamp_format: str = "yyyy-MM-dd HH:mm:ss"
    time_zone: str = "UTC"
    event_types: dict[str, EventType] = Field(default_factory=dict)
    # Used for every row when the source has no event-type column (e.g. invoice lines).
    default_event_type: EventType = "purchase"
    # Plausible values: a price or quantity outside [min, max] is quarantined (implausible_price,
    # implausible_quantity); NaN and infinities are unparseable. One absurd value (1e308) would
    # otherwise poison the features and the scaling of a whole run.
    price_bounds: list[float] = Field(default_factory=lambda: [0.0, 1e9])
    quantity_bounds: list[float] = Field(default_factory=lambda: [-1e6, 1e6])
    plausible_time: PlausibleTimeConfig = Field(default_factory=PlausibleTimeConfig)
    # A file of the input that cannot be read through (truncated, corrupt): fail (exit 2 naming it)
    # or skip it (counted and listed in runs.metrics.skipped_files and the report).
    on_corrupt_file: Literal["fail", "skip"] = "fail"

    @field_validator("price_bounds", "quantity_bounds", mode="before")
    @classmethod
    def _check_bounds(cls, value: Any) -> Any:
        return _bounds(value)

    @field_validator("options", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return _settings_as_strings(value)

    def mqtt_settings(self) -> MqttConfig:
        """input.mqtt, or its defaults when the section is absent."""
        return self.mqtt or MqttConfig()


class OneHotConfig(_Section):
    """A low-cardinality canonical column one-hot encoded as its top values plus "other"."""

    top_n: int = Field(3, ge=1, le=50)
    # Pin the values (in slot order) so that the columns mean the same in every run; None: the
    # top_n values with the most users in the data of the run.
    values: list[str] | None = None


class FeaturesConfig(_Section):
    session_gap_minutes: int = Field(30, ge=1)
    use_source_sessions: bool = True
    # Zone of the customers' local time, for the time-of-day and day-of-week shares.
    time_zone: str = "UTC"
    # Category affinity: share of activity in each of the top N categories, the rest pooled.
    top_categories: int = Field(5, ge=1, le=50)
    categories: list[str] | None = None  # pinned categories (slot order); None: top N of the data
    category_level: int | None = Field(1, ge=1)  # dotted levels kept ("electronics.phone" -> 1 level)
    # Activity trend: events in the last `trend_window_days` versus the same span before it.
    trend_window_days: int = Field(30, ge=1)
    one_hot: dict[Literal["country", "device"], OneHotConfig] = Field(
        default_factory=lambda: {"country": OneHotConfig(), "device": OneHotConfig()}
    )
    # Relative accuracy of the per-user medians (percentile_approx accuracy: 1/accuracy of the rank).
    median_accuracy: int = Field(1000, ge=10)


ImputeRule = str | float


class CapConfig(_Section):
    """Winsorise every prepared feature at these quantiles (fitted on the training users)."""

    lower: float = Field(0.0, ge=0.0, le=0.5)
    upper: float = Field(0.999, ge=0.5, le=1.0)


class SelectionConfig(_Section):
    # Near-constant: at least this share of users have one value (the quantiles around it agree).
    near_constant_share: float = Field(0.99, gt=0.5, le=1.0)
    # Of two features whose absolute Pearson correlation exceeds this, the later one is dropped.
    max_abs_correlation: float = Field(0.95, gt=0.0, le=1.0)
    # A feature that the features kept before it determine almost exactly (multiple correlation R
    # above this: shares summing to 1, one-hot columns) is dropped too; it makes covariances singular.
    max_multiple_correlation: float = Field(0.999, gt=0.0, le=1.0)
    keep: list[str] = Field(default_factory=list)  # never dropped (canonical features, say)


class FamiliesConfig(_Section):
    """Equal weight per family of correlated features. Many features measure one trait (how active a
    user is: sessions, events, views, carts, active days, recency...). Equally weighted, that trait
    would outvote traits measured once (price level, time of day), so each family of features whose
    every pair correlates with |r| >= min_abs_correlation (complete linkage) gets the total weight of
    one feature: each member is scaled by 1 / sqrt(family size)."""

    enabled: bool = True
    min_abs_correlation: float = Field(0.5, gt=0.0, le=1.0)


class PrepareConfig(_Section):
    """From user_features to model inputs; fitted once per run, saved, and reused when scoring."""

    features: list[str] | None = None  # model inputs; None: every feature of the catalog
    # Per-feature imputation of nulls: zero | mean | median | max | a number | feature:<name>
    # (that feature's value for the same user). `default` applies to the features not listed.
    impute: dict[str, ImputeRule] = Field(default_factory=lambda: {"default": "zero"})
    log1p: list[str] = Field(default_factory=list)  # heavy-tailed counts and money (signed log1p)
    cap: CapConfig = Field(default_factory=CapConfig)
    # standard: mean 0, unit variance. minmax: [0, 1]. quantile: each feature through the training
    # users' distribution (its rank, ties at their middle rank), then mean 0 and unit variance:
    # heavy tails and skew no longer decide which users look far apart.
    scaling: Literal["standard", "minmax", "quantile"] = "quantile"
    quantile_knots: int = Field(33, ge=3, le=1001)  # quantile scaling: knots of the piecewise-linear rank map
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    families: FamiliesConfig = Field(default_factory=lambda: FamiliesConfig())

    @field_validator("impute", mode="before")
    @classmethod
    def _numbers_as_float(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in value.items()}
        return value


class KSelectionConfig(_Section):
    """How k is chosen when a model has no fixed k: a sweep over k_min..k_max, several seeds per k,
    each fitted with scikit-learn on a bounded user sample as a Spark task; the chosen k is then
    fitted once on every user with MLlib."""

    k_min: int = Field(3, ge=2)
    k_max: int = Field(8, ge=2)
    seeds: int = Field(3, ge=1)  # fits per k; the best by the model's objective is kept
    sample_size: int = Field(50_000, ge=100)  # users the sweep fits and measures on (hash of user_id)
    sample_seed: int = 42  # seed of the user sample's hash (also the autoencoder's and HDBSCAN's samples)
    parallelism: int = Field(2, ge=1)  # full-scale MLlib fits submitted to Spark at once (driver threads)
    silhouette_sample: int = Field(2000, ge=50)  # sampled rows for the silhouette and the Dunn index
    silhouette_tolerance: float = Field(0.01, ge=0.0, le=1.0)  # relative, see evaluation.selection

    @model_validator(mode="after")
    def _range(self) -> KSelectionConfig:
        if self.k_max < self.k_min:
            raise ValueError(f"k_max ({self.k_max}) must be >= k_min ({self.k_min})")
        return self


class ClusteringConfig(_Section):
    enabled: bool = True
    k: int | None = Field(None, ge=2)  # fixed k; null = chosen by models.selection
    max_iter: int = Field(40, ge=1)
    seed: int = 42
    contamination: float = Field(0.01, ge=0.0, lt=1.0)  # share of users flagged is_anomaly


class KMeansConfig(ClusteringConfig):
    pass


class BisectingKMeansConfig(ClusteringConfig):
    max_iter: int = Field(20, ge=1)  # every iteration of every split is a Spark job (no convergence test)
    min_divisible_cluster_size: float = Field(1.0, gt=0.0)


class GMMConfig(ClusteringConfig):
    max_iter: int = Field(100, ge=1)
    tol: float = Field(0.01, gt=0.0)
    max_retries: int = Field(3, ge=0)  # new seeds tried after a degenerate fit
    min_component_weight: float = Field(0.001, ge=0.0, lt=1.0)
    principal_components: int | None = Field(8, ge=1)  # GMM input dimensions (null: every prepared feature)
    # Added to every covariance's diagonal (prepared units): many users sharing one exact value (no
    # repeat order, no weekend visit) would otherwise let a component shrink onto that value and win
    # the likelihood with a partition that is not the segments' (scikit-learn's reg_covar).
    reg_covar: float = Field(0.01, ge=0.0)


class AutoencoderConfig(_Section):
    """Keras autoencoder on the prepared features; its embeddings feed HDBSCAN (model `ae_hdbscan`)."""

    enabled: bool = True  # the deep path (autoencoder + HDBSCAN) as a whole
    variational: bool = False  # a VAE: the embedding is the mean of q(z|x)
    hidden_layers: list[int] = Field(default_factory=lambda: [64, 32])  # encoder widths; the decoder mirrors them
    embedding_size: int = Field(4, ge=1)
    activation: Literal["relu", "tanh", "elu", "selu"] = "relu"
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)  # held out for early stopping
    patience: int = Field(5, ge=1)  # epochs without a better validation loss before stopping
    kl_weight: float = Field(1.0, ge=0.0)  # VAE only: weight of the KL term (beta)
    # Denoising (plain autoencoder): Gaussian noise of this standard deviation, in prepared units, is
    # added to the inputs while training only; 0 turns it off.
    input_noise: float = Field(1.0, ge=0.0)
    sample_size: int = Field(200_000, ge=100)  # users the autoencoder is trained on (uniform sample)
    seed: int = 42


class HdbscanConfig(_Section):
    """HDBSCAN on a bounded sample of embeddings; every user is then assigned with approximate prediction."""

    min_cluster_size: int | None = Field(None, ge=2)  # null: min_cluster_share of the sample
    min_cluster_share: float = Field(0.05, gt=0.0, lt=1.0)
    # Density smoothing; prediction looks at 2 x min_samples neighbours per user, so it sets the cost of
    # assigning every user. null: min_cluster_size (the library's default; slow and noisy at scale).
    min_samples: int | None = Field(10, ge=1)
    cluster_selection_method: Literal["eom", "leaf"] = "eom"
    cluster_selection_epsilon: float = Field(0.0, ge=0.0)
    sample_size: int = Field(50_000, ge=100)  # embeddings HDBSCAN is fitted on (uniform sample)
    seed: int = 42
    contamination: float = Field(0.01, ge=0.0, lt=1.0)  # share flagged is_anomaly by GLOSH score
    # Noise users (between clusters) join their nearest cluster; only anomalies keep segment -1.
    assign_noise: bool = True


class ModelsConfig(_Section):
    selection: KSelectionConfig = Field(default_factory=KSelectionConfig)
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)
    bisecting_kmeans: BisectingKMeansConfig = Field(default_factory=BisectingKMeansConfig)
    gmm: GMMConfig = Field(default_factory=GMMConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    hdbscan: HdbscanConfig = Field(default_factory=HdbscanConfig)

    def enabled(self) -> dict[str, ClusteringConfig | AutoencoderConfig]:
        """Enabled models by table name, in the registry's order, with each one's config section
        (ae_hdbscan: models.autoencoder; its HDBSCAN settings are models.hdbscan)."""
        from segspark.models import registry

        return {m.name: m.settings(self) for m in registry.enabled(self)}


class OutputConfig(_Section):
    root: str = "out/local"
    catalog: str | None = None
    schema_: str | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class BundleConfig(_Section):
    # The NAME of an environment variable holding the HMAC-SHA256 key that signs bundle manifests
    # (never the key itself: config is logged, hashed and sent to MLflow). Set: training signs each
    # bundle, and score/stream refuse bundles that are unsigned or signed with another key.
    signing_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # set: each run logs params, metrics and its model bundle
    experiment: str = "segspark"  # on Databricks an absolute workspace path, e.g. /Users/me/segspark
    # The bundle's per-user files (HDBSCAN's fitting sample of embeddings) go to MLflow only when true:
    # a tracking server is often readable by more people than the output tables.
    log_samples: bool = False


class EmergingConfig(_Section):
    """Emerging segments (segspark.streaming.emerging): when the users the live models fit badly (noise
    of a density model, anomalies of the others) pass `outlier_share` of the users of the last
    `window_batches` batches, HDBSCAN runs on those outliers' embeddings (beside training users') and
    its clusters of outliers are proposed as candidate segments (`candidate_segments`) with a retrain
    recommendation."""

    enabled: bool = True
    # Share of the window's scored users that are outliers above which the outliers are clustered.
    # Training users are outliers at about 1 - anomaly_quantile per model (3% each, up to 6% for two
    # models): 15% is far above that.
    outlier_share: float = Field(0.15, gt=0, le=1)
    window_batches: int = Field(5, ge=1)  # the current batch and the ones before it
    # Whose verdict makes an outlier: noise (segment -1) of a noise model, or an anomaly (below).
    outlier_models: list[str] = Field(default_factory=lambda: ["ae_hdbscan", "kmeans"], min_length=1)
    # A user is an outlier of a model when its anomaly score is above this quantile of the training
    # users' scores (null: the model's own is_anomaly, at its contamination, 1%). The trained threshold
    # is made to flag single odd users; a new group sits at the edge of the trained space (prepare's
    # quantile scaling bounds every feature to the training range), so a looser gate is needed to
    # see all of it, and HDBSCAN then tells a group from scattered outliers.
    anomaly_quantile: float | None = Field(0.97, gt=0, lt=1)
    # Outliers of the window clustered on the driver (the latest row per user, a hash sample beyond).
    max_users: int = Field(5000, ge=10, le=200_000)
    # HDBSCAN settings, as models.hdbscan's: a candidate has at least min_cluster_size outlier users.
    min_cluster_size: int = Field(25, ge=2)
    min_samples: int | None = Field(5, ge=1)
    cluster_selection_method: Literal["eom", "leaf"] = "eom"
    # The outliers are clustered together with up to max_users training users (the deep model's
    # HDBSCAN sample), which stand for the known segments: a cluster is a candidate only where the
    # outliers are at least this share of its members, i.e. a dense group outside the known segments.
    min_outlier_share: float = Field(0.5, gt=0, le=1)

    @field_validator("outlier_models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        from segspark.models import registry

        unknown = [m for m in value if m not in registry.names()]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; expected some of {list(registry.names())}")
        return value


class StreamDriftConfig(_Section):
    """Per micro-batch drift against the training run; crossing any threshold recommends a retrain."""

    features: list[str] = Field(
        default_factory=lambda: ["recency_days", "frequency", "monetary", "tenure_days", "sessions"], min_length=1
    )
    bins: int = Field(10, ge=2, le=100)
    psi: float = Field(0.25, gt=0)
    centroid_shift: float = Field(0.5, gt=0)
    size_change: float = Field(0.10, gt=0, le=1)
    noise_share: float = Field(0.20, gt=0, le=1)
    emerging: EmergingConfig = Field(default_factory=lambda: EmergingConfig())


class StreamingConfig(_Section):
    # Stable id of the stream's Delta transactions (txn app id). Keep it when moving a checkpoint; a
    # new checkpoint needs a new app_id: the tables record which checkpoint's query wrote each batch,
    # and a checkpoint that does not own them is refused (streaming.identity).
    app_id: str = Field("segspark-stream", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    checkpoint: str | None = None  # default: <output.root>/_checkpoints/<app_id>
    max_files_per_trigger: int | None = Field(None, ge=1)  # file sources: files per micro-batch
    # Micro-batch interval in seconds, fractions allowed (unless --available-now). An idle stream looks
    # for new files this often, so a file arriving then waits up to this long before its batch starts;
    # a batch that takes longer than the interval is followed at once by the next.
    trigger_seconds: float = Field(10.0, ge=0.1)
    # Model bundle that scores the stream; None: the bundle of the latest successful training run.
    bundle: str | None = None
    # The feature state is partitioned into this many buckets of users.
    state_buckets: int = Field(16, ge=1, le=4096)
    # A micro-batch appends its users' new state rows; when the rows appended since the last
    # compaction reach this many times the rows it wrote, the batch compacts the state to one row per
    # user instead (streaming/state_store.py). 0: every batch compacts.
    state_compaction: float = Field(0.5, ge=0.0)
    # Online k-means (Spark StreamingKMeans semantics): history weight per batch or per point.
    decay: float = Field(1.0, ge=0.0, le=1.0)
    time_unit: Literal["batches", "points"] = "batches"
    drift: StreamDriftConfig = Field(default_factory=lambda: StreamDriftConfig())

    @field_validator("app_id")
    @classmethod
    def _run_id_like(cls, value: str) -> str:
        # It names the checkpoint folder and begins every run id the stream writes: the run-id rule.
        if not RUN_ID_PATTERN.fullmatch(value):
            raise ValueError(f"expected {RUN_ID_RULE}")
        return value

    def checkpoint_path(self, output: OutputConfig) -> str:
        return self.checkpoint or f"{output.root.rstrip('/')}/_checkpoints/{self.app_id}"


class PrivacyConfig(_Section):
    """Pseudonymised user ids and how much of a rejected record quarantine keeps (README, Data protection)."""

    # Replace every user id at ingest by HMAC-SHA256(key, id) in hex, before anything is stored.
    pseudonymise_user_id: bool = False
    # Where the key comes from (never from config): this environment variable, or, when both are set and
    # dbutils is available (Databricks), the secret `secret_key` of the secret scope `secret_scope`.
    key_env: str = Field("SEGSPARK_PSEUDONYM_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_scope: str | None = Field(None, min_length=1)
    secret_key: str | None = Field(None, min_length=1)
    # quarantine.raw: full (the whole source record), mapped (only the mapped source columns), none (null).
    quarantine_raw: Literal["full", "mapped", "none"] = "full"

    @model_validator(mode="after")
    def _scope_and_key(self) -> PrivacyConfig:
        if (self.secret_scope is None) != (self.secret_key is None):
            raise ValueError("secret_scope and secret_key go together: set both (a Databricks secret) or neither")
        return self


class Config(_Section):
    spark: SparkConfig = Field(default_factory=SparkConfig)
    input: InputConfig
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def config_hash(self) -> str:
        """sha256 of the resolved config (canonical JSON): equal hashes mean equal settings."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def redacted(self) -> dict[str, Any]:
        return redact(self.as_dict())


# --- loading -------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, found {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any], origin: str, sources: dict[str, str], prefix=""):
    """Deep-merge `top` into `base`, recording which file set each leaf key."""
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and value:
            _merge(base[key], value, origin, sources, dotted + ".")
        else:
            base[key] = _plain(value)
            sources[dotted] = origin
            if isinstance(value, Mapping):
                for leaf in _leaves(value, dotted + "."):
                    sources[leaf] = origin


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _leaves(mapping: Mapping[str, Any], prefix: str) -> Iterable[str]:
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _load_file(path: Path, sources: dict[str, str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    merged: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"key 'extends' in {path}: expected a file name (str), found {parent!r}")
        merged = _load_file(path.parent / parent, sources, seen + (path,))
    _merge(merged, data, str(path), sources)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set input.path=/data/events")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key {key!r} is not a dotted key like output.root")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # Keep paths and other text that YAML would turn into something else as the string given.
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw
    return key, value


# Sections whose keys are free-form and may contain dots themselves (Spark settings, reader
# options, source event-type values): `--set spark.conf.spark.driver.memory=8g` sets one key.
FREE_FORM_SECTIONS = ("spark.conf", "input.options", "input.event_types", "prepare.impute")


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for section in FREE_FORM_SECTIONS:
        if key.startswith(section + "."):
            parts = [*section.split("."), key[len(section) + 1 :]]
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    expected = {
        "int_type": "an integer",
        "string_type": "a string",
        "bool_type": "true or false",
        "float_type": "a number",
        "dict_type": "a mapping",
        "list_type": "a list",
        "model_type": "a mapping (section)",
        "literal_error": None,
    }.get(kind)
    found = error.get("input")
    if expected:
        return f"expected {expected}, found {found!r} ({type(found).__name__})"
    return f"{error.get('msg', 'invalid value')}, found {found!r}"


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load, merge, override and validate a config file. Raises ConfigError with every problem."""
    sources: dict[str, str] = {}
    data = _load_file(Path(path), sources)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
        sources[key] = "--set"
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            dotted = ".".join(str(p) for p in error["loc"])
            origin = _origin(dotted, sources, str(Path(path).resolve()))
            lines.append(f"  {dotted} (in {origin}): {_describe(error)}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
    _log_loaded(config, Path(path))
    return config


def _log_loaded(config: Config, path: Path) -> None:
    # One INFO line says what this run reads, writes and fits; the whole resolved config (several KB)
    # goes to DEBUG, and in full to the runs table and MLflow, where it is kept with the run.
    shown = config.redacted()
    digest = config.config_hash()[:12]
    models = list(config.models.enabled())
    log.info(
        "config %s (hash %s) | input %s (%s) | output %s | models %s",
        path, digest, shown["input"]["path"], config.input.format, shown["output"]["root"],
        ", ".join(models) or "none",
    )
    log.debug("resolved config (hash %s): %s", digest, json.dumps(shown, sort_keys=True))


def _origin(dotted: str, sources: Mapping[str, str], default: str) -> str:
    # The most specific key that a file or --set gave, walking up the dotted path.
    parts = dotted.split(".")
    while parts:
        key = ".".join(parts)
        if key in sources:
            return sources[key]
        parts.pop()
    return default

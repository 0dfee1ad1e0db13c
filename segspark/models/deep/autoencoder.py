"""Train the Keras autoencoder that compresses users' prepared features into embeddings for HDBSCAN.

Why this shape: the prepared features (standardised, d ~ 30-60) mix counts, shares and one-hot
columns, and density-based clustering works poorly in that many dimensions. A small dense
autoencoder trained on a bounded sample (on the driver) learns an ~8-dimensional embedding; every
user is then embedded on the executors by `segspark.models.deep.encoder.NumpyEncoder`, a NumPy copy of
the encoder, so Spark workers never import TensorFlow. TensorFlow and Keras are imported inside the
functions here, so importing this module stays cheap.

Model: encoder Dense(hidden_layers, activation) -> linear Dense(embedding_size); the decoder mirrors
the hidden widths back to a linear Dense(d). The plain autoencoder is a functional model trained on
the mean squared error. With `variational: true` the encoder has two linear heads, z_mean and
z_log_var, a `Sampling` layer draws z = z_mean + exp(z_log_var / 2) * eps (the reparameterisation
trick), and a subclassed `VariationalAutoencoder` with its own `train_step`/`test_step` minimises

    loss = reconstruction_loss + kl_weight * kl_loss
    reconstruction_loss = mean over rows of sum over features of (x - x_hat)^2   (= d x MSE)
    kl_loss = mean over rows of -1/2 sum_j (1 + log s_j^2 - m_j^2 - s_j^2)

(Keras 3 removed `add_loss` on functional models, hence the subclass.) Summing over features, as in
the usual ELBO, keeps kl_weight = 1 meaningful whatever d is; the price is that a VAE's `loss` is
on a different scale from the plain autoencoder's MSE. The validation loss reconstructs from z_mean
(no sampling), so early stopping watches a deterministic number. The embedding of a VAE is z_mean.

Validation and early stopping: a seeded random permutation holds out `validation_split` of the rows
(Keras's own split takes the last rows, which would be whatever order the sample arrived in);
training stops after `patience` epochs without a lower `val_loss` and the best epoch's weights are
restored. With validation_split 0 the training loss is monitored instead and the reported
reconstruction error is measured on the training rows.

Reproducibility: the same data, config and seed give bit-identical weights and embeddings on the same
machine. Every initializer and the sampling layer get explicit seeds, batches are shuffled by a
seeded `tf.data` shuffle, `keras.utils.set_random_seed` is called and TensorFlow op determinism is
enabled. Op determinism is process-wide and cannot be switched off again; on a GPU it makes a few
ops slower or unavailable, which does not affect dense layers. Python's and NumPy's global RNG
states, which `set_random_seed` overwrites, are restored afterwards.

Minimum input: at least MIN_ROWS rows (the smallest `sample_size` the config allows), at least one
full batch of training rows after the validation rows are held out (otherwise every epoch is a single
partial gradient step: lower `batch_size` instead), and at least MIN_VALIDATION_ROWS validation
rows when validation_split > 0 (a loss over fewer rows is noise, and early stopping would act on it).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segspark.config import AutoencoderConfig
from segspark.models.deep.encoder import ACTIVATIONS, NumpyEncoder

log = logging.getLogger(__name__)

MIN_ROWS = 100
MIN_VALIDATION_ROWS = 20
KERAS_FILE = "autoencoder.keras"
ENCODER_FILE = "encoder.npz"
NUMPY_MATCH_ATOL = 1e-4  # NumpyEncoder vs Keras on the same rows: float32 rounding only
_CHECK_ROWS = 512


@dataclass
class TrainedAutoencoder:
    """A trained autoencoder: the NumPy encoder for inference plus what is worth reporting."""

    encoder: NumpyEncoder
    keras_model: Any  # the whole Keras autoencoder (functional, or VariationalAutoencoder)
    keras_encoder: Any  # its encoder sub-model; a VAE's returns [z_mean, z_log_var]
    history: dict[str, Any]  # per-epoch logs plus epochs_run, best_epoch (1-based), stopped_early, monitor
    reconstruction_mse: float  # mean squared error per feature, on the validation rows (see below)
    reconstruction_rows: str  # "validation", or "training" when validation_split is 0
    train_seconds: float
    sample_rows: int  # rows trained and validated on (after the sample_size cap)
    train_rows: int
    validation_rows: int
    input_dim: int
    embedding_size: int
    variational: bool
    device: str  # "cpu" or the GPU's name
    numpy_max_abs_diff: float  # NumpyEncoder vs the Keras encoder on up to 512 rows
    config: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Everything above except the model objects, as JSON-able values."""
        out = {
            "history": self.history,
            "reconstruction_mse": self.reconstruction_mse,
            "reconstruction_rows": self.reconstruction_rows,
            "train_seconds": self.train_seconds,
            "sample_rows": self.sample_rows,
            "train_rows": self.train_rows,
            "validation_rows": self.validation_rows,
            "input_dim": self.input_dim,
            "embedding_size": self.embedding_size,
            "variational": self.variational,
            "device": self.device,
            "numpy_max_abs_diff": self.numpy_max_abs_diff,
            "encoder_sha256": self.encoder.sha256,
            "config": self.config,
        }
        json.dumps(out, allow_nan=False)  # fail here, not in whoever writes it
        return out

    def save(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write `autoencoder.keras` (the full Keras model) and `encoder.npz`; returns their paths.

        Reload the Keras file with `load_keras_model`, which registers the VAE's custom classes.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        keras_path, encoder_path = out / KERAS_FILE, out / ENCODER_FILE
        self.keras_model.save(keras_path)
        self.encoder.save(encoder_path)
        log.info(
            "saved autoencoder to %s and encoder %s to %s", keras_path, self.encoder.sha256[:12], encoder_path
        )
        return {"keras_model": str(keras_path), "encoder": str(encoder_path)}


# ------------------------------------------------------------------------------------- TF imports


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _keras() -> Any:
    _tf()
    import keras

    return keras


_importer_lock = threading.Lock()
_importer: threading.Thread | None = None


def import_in_background() -> None:
    """Start importing TensorFlow and Keras in a thread of their own (once per process), so that the
    autoencoder's fit finds them loaded. The import takes about 5 s of one core (4.6-5.5 s here, a
    fresh process); a run's deep model otherwise paid it when its fit began, on the segments stage's
    critical path (the demo's log: 5.0 s between the model's sample and the start of its training).
    Started when a training run starts, it overlaps the ingest and feature stages, whose work is in
    the JVM. The fit's own import then waits for this one (Python's per-module import locks). Not a
    daemon thread: a process that ends while the import runs (a run that failed early) waits for it
    rather than finalising the interpreter under a half-imported TensorFlow."""
    global _importer
    with _importer_lock:
        if _importer is None:
            _importer = threading.Thread(target=_keras, name="segspark-import-keras")
            _importer.start()


def device_name() -> str:
    """ "cpu", or the name of the first GPU TensorFlow sees (Keras places the model there)."""
    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    try:
        details = tf.config.experimental.get_device_details(gpus[0])
    except (RuntimeError, ValueError):  # pragma: no cover - depends on the driver
        details = {}
    return str(details.get("device_name") or gpus[0].name)


@functools.cache
def _vae_classes() -> tuple[type, type]:
    """Define (once) and register the VAE's custom Keras classes, so saved models reload."""
    tf = _tf()
    keras = _keras()
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="segspark")
    class Sampling(keras.layers.Layer):
        """z = z_mean + exp(z_log_var / 2) * eps, eps ~ N(0, I) from a seeded generator."""

        def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, inputs: Any) -> Any:
            z_mean, z_log_var = inputs
            eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
            return z_mean + ops.exp(0.5 * z_log_var) * eps

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape[0]

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "seed": self.seed}

    @keras.saving.register_keras_serializable(package="segspark")
    class VariationalAutoencoder(keras.Model):
        """encoder(x) -> [z_mean, z_log_var]; sampler; decoder(z) -> x_hat. Embedding: z_mean."""

        def __init__(
            self, encoder: Any, decoder: Any, kl_weight: float = 1.0, seed: int | None = None, **kwargs: Any
        ) -> None:
            super().__init__(**kwargs)
            self.encoder = encoder
            self.decoder = decoder
            self.kl_weight = float(kl_weight)
            self.seed = seed
            self.sampler = Sampling(seed=seed, name="sampling")
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
            self.kl_tracker = keras.metrics.Mean(name="kl_loss")

        @property
        def metrics(self) -> list[Any]:
            return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker]

        def build(self, input_shape: Any) -> None:
            # encoder and decoder are functional models, built when created; Sampling has no weights.
            self.built = True

        def call(self, inputs: Any, training: bool = False) -> Any:
            z_mean, z_log_var = self.encoder(inputs, training=training)
            z = self.sampler([z_mean, z_log_var]) if training else z_mean
            return self.decoder(z, training=training)

        def _elbo_terms(self, x: Any, training: bool) -> tuple[Any, Any, Any]:
            z_mean, z_log_var = self.encoder(x, training=training)
            z = self.sampler([z_mean, z_log_var]) if training else z_mean
            x_hat = self.decoder(z, training=training)
            rec = ops.mean(ops.sum(ops.square(x - x_hat), axis=1))
            kl = ops.mean(-0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1))
            return rec + self.kl_weight * kl, rec, kl

        def _track(self, x: Any, total: Any, rec: Any, kl: Any) -> dict[str, Any]:
            n = ops.shape(x)[0]
            self.loss_tracker.update_state(total, sample_weight=n)
            self.reconstruction_tracker.update_state(rec, sample_weight=n)
            self.kl_tracker.update_state(kl, sample_weight=n)
            return {m.name: m.result() for m in self.metrics}

        def train_step(self, data: Any) -> dict[str, Any]:
            x = data[0] if isinstance(data, tuple) else data
            with tf.GradientTape() as tape:
                total, rec, kl = self._elbo_terms(x, training=True)
            grads = tape.gradient(total, self.trainable_weights)
            self.optimizer.apply(grads, self.trainable_weights)
            return self._track(x, total, rec, kl)

        def test_step(self, data: Any) -> dict[str, Any]:
            x = data[0] if isinstance(data, tuple) else data
            total, rec, kl = self._elbo_terms(x, training=False)
            return self._track(x, total, rec, kl)

        def get_config(self) -> dict[str, Any]:
            return {
                "name": self.name,
                "encoder": keras.saving.serialize_keras_object(self.encoder),
                "decoder": keras.saving.serialize_keras_object(self.decoder),
                "kl_weight": self.kl_weight,
                "seed": self.seed,
            }

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> Any:
            config = dict(config)
            config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
            config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
            return cls(**config)

    return Sampling, VariationalAutoencoder


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a saved `autoencoder.keras` (plain or variational)."""
    keras = _keras()
    _vae_classes()
    return keras.saving.load_model(path)


# ------------------------------------------------------------------------------------------ model


def build_autoencoder(input_dim: int, cfg: AutoencoderConfig) -> tuple[Any, Any]:
    """(autoencoder, encoder) Keras models for `cfg`, with seeded initial weights; not compiled."""
    keras = _keras()
    layers = keras.layers
    widths = list(cfg.hidden_layers)
    if any(w < 1 for w in widths):
        raise ValueError(f"hidden_layers must be positive widths, got {widths}")
    seeds = iter(range(cfg.seed, cfg.seed + 10 * (len(widths) + 2)))

    def dense(units: int, name: str, activation: str | None = None) -> Any:
        # LeCun-normal is what makes SELU self-normalising; Glorot suits the others.
        init = keras.initializers.LecunNormal if activation == "selu" else keras.initializers.GlorotUniform
        return layers.Dense(
            units, activation=activation, kernel_initializer=init(seed=next(seeds)), name=name
        )

    x_in = keras.Input(shape=(input_dim,), name="features")
    h = x_in
    for i, w in enumerate(widths):
        h = dense(w, f"encoder_dense_{i}", cfg.activation)(h)
    if cfg.variational:
        z_mean = dense(cfg.embedding_size, "z_mean")(h)
        z_log_var = dense(cfg.embedding_size, "z_log_var")(h)
        encoder = keras.Model(x_in, [z_mean, z_log_var], name="encoder")
    else:
        encoder = keras.Model(x_in, dense(cfg.embedding_size, "embedding")(h), name="encoder")

    z_in = keras.Input(shape=(cfg.embedding_size,), name="embedding_input")
    h = z_in
    for i, w in enumerate(reversed(widths)):
        h = dense(w, f"decoder_dense_{i}", cfg.activation)(h)
    decoder = keras.Model(z_in, dense(input_dim, "reconstruction")(h), name="decoder")

    if cfg.variational:
        _, vae_cls = _vae_classes()
        model = vae_cls(encoder, decoder, kl_weight=cfg.kl_weight, seed=cfg.seed, name="vae")
        model.build((None, input_dim))
    else:
        # Denoising: the autoencoder learns to rebuild each user from a blurred copy, so the
        # embedding keeps what many users share (their segment) rather than each user's exact
        # values (ties, spikes). GaussianNoise acts only while training; the encoder model, which
        # embeds users, never sees it.
        corrupted = x_in
        if cfg.input_noise > 0:
            corrupted = layers.GaussianNoise(cfg.input_noise, seed=next(seeds), name="input_noise")(x_in)
        model = keras.Model(x_in, decoder(encoder(corrupted)), name="autoencoder")
    return model, encoder


def from_keras(encoder_model: Any, feature_names: list[str] | None = None) -> NumpyEncoder:
    """NumpyEncoder with the weights of a Keras encoder: a chain of Dense layers (a VAE's: z_mean head).

    The layers are taken in the model's order; a VAE's `z_log_var` head is dropped.
    """
    keras = _keras()
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    activations: list[str] = []
    variational = False
    for layer in encoder_model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(
                f"layer {layer.name!r} ({type(layer).__name__}) is not Dense; NumpyEncoder cannot run it"
            )
        if layer.name == "z_log_var":
            variational = True
            continue
        activation = layer.get_config()["activation"]
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(
                f"layer {layer.name!r}: activation {activation!r} is not supported by NumpyEncoder"
            )
        kernel = np.asarray(layer.kernel.numpy(), dtype=np.float32)
        bias = (
            np.asarray(layer.bias.numpy(), np.float32)
            if layer.use_bias
            else np.zeros(kernel.shape[1], np.float32)
        )
        pairs.append((kernel, bias))
        activations.append(activation)
    return NumpyEncoder(
        tuple(pairs), tuple(activations), variational, None if feature_names is None else tuple(feature_names)
    )


# ---------------------------------------------------------------------------------------- training


def _check_sample(sample: np.ndarray, feature_names: list[str] | None) -> np.ndarray:
    x = np.asarray(sample)
    if x.ndim != 2:
        raise ValueError(f"the training sample must be 2-D (rows x features), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"the training sample must be numeric, got dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError("the training sample has no feature columns")
    if feature_names is not None and len(feature_names) != x.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {x.shape[1]} feature columns")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        per_col = bad.sum(axis=0)
        cols = np.flatnonzero(per_col)
        names = [feature_names[c] if feature_names else f"column {c}" for c in cols]
        shown = ", ".join(f"{n}: {int(per_col[c])}" for n, c in zip(names[:10], cols[:10], strict=False))
        more = f" and {len(cols) - 10} more columns" if len(cols) > 10 else ""
        raise ValueError(
            f"the training sample has {int(bad.sum())} NaN/infinite values in {int(bad.any(axis=1).sum())} rows "
            f"and {len(cols)} columns ({shown}{more}); the prepared features must be finite"
        )
    return x


def sample_problem(n: int, cfg: AutoencoderConfig) -> str | None:
    """Why a training sample of `n` rows is too small for these settings (None: it is enough)."""
    if n < MIN_ROWS:
        return f"the training sample has {n} rows; the autoencoder needs at least {MIN_ROWS}"
    n_val = int(round(n * cfg.validation_split))
    if cfg.validation_split > 0 and n_val < MIN_VALIDATION_ROWS:
        return (
            f"validation_split {cfg.validation_split} of {n} rows leaves {n_val} validation rows, fewer than "
            f"{MIN_VALIDATION_ROWS}: raise validation_split, or set it to 0 to train without early stopping on "
            "validation loss"
        )
    if n - n_val < cfg.batch_size:
        return (
            f"{n - n_val} training rows (of {n}, after holding out {n_val} for validation) are fewer than one "
            f"batch (batch_size {cfg.batch_size}); every epoch would be a single partial step: lower batch_size"
        )
    return None


def _split(n: int, cfg: AutoencoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices from a seeded permutation, after checking there are enough rows."""
    problem = sample_problem(n, cfg)
    if problem is not None:
        raise ValueError(problem)
    n_val = int(round(n * cfg.validation_split))
    perm = np.random.default_rng(cfg.seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _forward(model: Any, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """model(x, training=False) in chunks, as NumPy; a VAE encoder's first output (z_mean).

    Direct calls rather than `predict`, which builds a new tf.function per model (and warns about
    retracing when a process trains several models)."""
    parts = []
    for start in range(0, len(x), chunk):
        out = model(x[start : start + chunk], training=False)
        parts.append(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _set_seeds(seed: int) -> None:
    tf = _tf()
    keras = _keras()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        keras.utils.set_random_seed(seed)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    tf.config.experimental.enable_op_determinism()


def train_autoencoder(
    sample: np.ndarray, cfg: AutoencoderConfig, feature_names: list[str] | None = None
) -> TrainedAutoencoder:
    """Train on `sample` (rows x prepared features, finite) and return the encoder and training report.

    More than `cfg.sample_size` rows are cut down to a seeded uniform subsample of that size.
    """
    x = _training_rows(sample, cfg, feature_names)
    n, d = x.shape
    train_idx, val_idx = _split(n, cfg)
    x_train, x_val = np.ascontiguousarray(x[train_idx]), np.ascontiguousarray(x[val_idx])
    device = device_name()
    kind = "VAE" if cfg.variational else "autoencoder"
    log.info("training %s on %d rows x %d features (%d train, %d validation) on %s",
             kind, n, d, len(x_train), len(x_val), device)
    _set_seeds(cfg.seed)
    model, encoder = build_autoencoder(d, cfg)
    start = time.perf_counter()
    history = _fit(model, x_train, x_val, cfg)
    seconds = time.perf_counter() - start

    rec_x = x_val if len(x_val) else x_train
    recon = _forward(model, rec_x)  # a VAE reconstructs from z_mean here (training=False)
    reconstruction_mse = float(np.mean((recon.astype(np.float64) - rec_x) ** 2))
    numpy_encoder, max_diff = _numpy_encoder(encoder, feature_names, rec_x[:_CHECK_ROWS])
    log.info(
        "%s trained on %d rows in %.1fs: %d/%d epochs%s, best %s %.5g at epoch %d, "
        "reconstruction MSE %.5g on %s rows, device %s",
        kind, n, seconds, history["epochs_run"], cfg.epochs, " (stopped early)" if history["stopped_early"] else "",
        history["monitor"], history["best_loss"], history["best_epoch"], reconstruction_mse,
        "validation" if len(x_val) else "training", device,
    )
    return TrainedAutoencoder(
        encoder=numpy_encoder,
        keras_model=model,
        keras_encoder=encoder,
        history=history,
        reconstruction_mse=reconstruction_mse,
        reconstruction_rows="validation" if len(x_val) else "training",
        train_seconds=seconds,
        sample_rows=n,
        train_rows=len(x_train),
        validation_rows=len(x_val),
        input_dim=d,
        embedding_size=cfg.embedding_size,
        variational=cfg.variational,
        device=device,
        numpy_max_abs_diff=max_diff,
        config=cfg.model_dump(mode="json"),
    )


def _training_rows(sample: np.ndarray, cfg: AutoencoderConfig, feature_names: list[str] | None) -> np.ndarray:
    """The checked sample, cut to a seeded uniform subsample of cfg.sample_size rows when larger."""
    x = _check_sample(sample, feature_names)
    if len(x) > cfg.sample_size:
        log.warning("autoencoder sample has %d rows; using a seeded subsample of %d", len(x), cfg.sample_size)
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(x), cfg.sample_size, replace=False))
        x = x[keep]
    if cfg.embedding_size >= x.shape[1]:
        log.warning("embedding_size %d is not smaller than the %d input features", cfg.embedding_size, x.shape[1])
    return x


def _fit(model: Any, x_train: np.ndarray, x_val: np.ndarray, cfg: AutoencoderConfig,
         steps_per_execution: int | None = None) -> dict[str, Any]:
    """Compile and fit with early stopping on the validation loss (the training loss without a
    validation set); the per-epoch history, the best epoch and whether training stopped early.
    A diverged training (a non-finite loss) is an error that says which setting to lower.
    steps_per_execution: batches per call of Keras' compiled training function (default: an epoch's)."""
    tf, keras = _tf(), _keras()
    optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate)
    # A whole epoch's steps in one call of the compiled training function: the model is small, and
    # Keras' per-call overhead (Python, the eager dispatch) outweighed its arithmetic. The same batches
    # go through the same ops in the same order, so the weights are bit-identical (checked for the
    # autoencoder at 4,500 and 20,000 rows and for the VAE). Batch-level callbacks now run once per
    # epoch: TerminateOnNaN stops a diverged training at the end of its epoch instead of its batch, and
    # the check after `fit` still makes it an error. The demo's 4,500 x 33 rows, 60 epochs, alone: 4.5-6.0 s
    # against 5.8-7.4 s (three runs each, twice).
    steps = steps_per_execution or max(1, math.ceil(len(x_train) / cfg.batch_size))
    if cfg.variational:
        model.compile(optimizer=optimizer, steps_per_execution=steps)  # the VAE adds its own loss terms
    else:
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps)

    def batches(arr: np.ndarray, shuffle: bool) -> Any:
        ds = tf.data.Dataset.from_tensor_slices(arr)
        if shuffle:
            ds = ds.shuffle(len(arr), seed=cfg.seed, reshuffle_each_iteration=True)
        ds = ds.batch(cfg.batch_size)
        if not cfg.variational:
            ds = ds.map(lambda b: (b, b))
        return ds.prefetch(tf.data.AUTOTUNE)

    monitor = "val_loss" if len(x_val) else "loss"
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: log.debug(
                "epoch %d: %s", epoch + 1, ", ".join(f"{k}={float(v):.5g}" for k, v in (logs or {}).items())
            )
        ),
    ]
    fit = model.fit(
        batches(x_train, shuffle=True),
        validation_data=batches(x_val, shuffle=False) if len(x_val) else None,
        epochs=cfg.epochs,
        shuffle=False,  # the tf.data pipeline shuffles, with its own seed
        callbacks=callbacks,
        verbose=0,
    )
    logs = {k: [float(v) for v in vs] for k, vs in fit.history.items()}
    watched = logs.get(monitor, [])
    if not watched or not np.all(np.isfinite(watched)):
        raise RuntimeError(
            f"autoencoder training diverged ({monitor} per epoch: {watched}); lower learning_rate "
            f"(now {cfg.learning_rate}) or check the feature scaling"
        )
    best = int(np.argmin(watched))
    return {
        **logs,
        "monitor": monitor,
        "epochs_run": len(watched),
        "best_epoch": best + 1,
        "best_loss": watched[best],
        "stopped_early": len(watched) < cfg.epochs,
    }


def _numpy_encoder(encoder: Any, feature_names: list[str] | None, check: np.ndarray) -> tuple[NumpyEncoder, float]:
    """The numpy copy of the Keras encoder that scoring ships to executors, checked to give the
    same embeddings on `check` rows (a mismatch is a bug, never a silent drift)."""
    numpy_encoder = from_keras(encoder, feature_names)
    keras_z = _forward(encoder, check)
    max_diff = float(np.max(np.abs(numpy_encoder.encode(check) - keras_z))) if len(check) else 0.0
    if not max_diff <= NUMPY_MATCH_ATOL * max(1.0, float(np.max(np.abs(keras_z)))):
        raise RuntimeError(f"NumpyEncoder differs from the Keras encoder by {max_diff:g}; this is a bug")
    return numpy_encoder, max_diff

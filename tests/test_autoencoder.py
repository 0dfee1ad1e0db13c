"""Autoencoder training (Keras) and its NumPy encoder.

Real TensorFlow training, kept to a few hundred rows, small layers and a few epochs so that each test
takes seconds on two cores. The NumPy encoder is what runs on the executors, so most of the weight
is on it agreeing with Keras and surviving serialisation.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from segspark.config import AutoencoderConfig
from segspark.models.deep.autoencoder import NUMPY_MATCH_ATOL
from segspark.models.deep.encoder import NumpyEncoder

from .conftest import REPO

N_FEATURES = 12
FIT = {"learning_rate": 0.01, "epochs": 5}  # enough for the blobs to come apart in the embedding


def _cfg(**overrides) -> AutoencoderConfig:
    base = {"hidden_layers": [16, 8], "embedding_size": 3, "epochs": 3, "batch_size": 32, "seed": 42}
    return AutoencoderConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 12 dimensions, standardised per column."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (3, N_FEATURES))
    labels = rng.integers(0, 3, 600)
    x = centers[labels] + rng.normal(0.0, 1.0, (600, N_FEATURES))
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained(blobs):
    from segspark.models.deep.autoencoder import train_autoencoder

    names = [f"f{i}" for i in range(N_FEATURES)]
    return train_autoencoder(blobs[0], _cfg(**FIT), feature_names=names)


def _small_encoder(**kwargs) -> NumpyEncoder:
    rng = np.random.default_rng(1)
    layers = ((rng.normal(size=(5, 4)), rng.normal(size=4)), (rng.normal(size=(4, 2)), rng.normal(size=2)))
    return NumpyEncoder(layers, ("tanh", "linear"), **kwargs)


# ----------------------------------------------------------------------------- NumPy vs Keras


@pytest.mark.parametrize("variational", [False, True], ids=["ae", "vae"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "elu", "selu"])
def test_numpy_encoder_matches_keras(activation, variational):
    from segspark.models.deep.autoencoder import build_autoencoder, from_keras

    cfg = _cfg(activation=activation, variational=variational, hidden_layers=[16, 8], embedding_size=4)
    _, encoder = build_autoencoder(N_FEATURES, cfg)
    rng = np.random.default_rng(3)
    for layer in encoder.layers[1:]:  # non-zero biases, so that they are tested too
        layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape).astype(np.float32))
    x = rng.normal(0.0, 2.0, (257, N_FEATURES)).astype(np.float32)  # plenty of negative pre-activations

    out = encoder(x, training=False)
    expected = np.asarray(out[0] if variational else out)
    numpy_encoder = from_keras(encoder)
    assert numpy_encoder.variational is variational
    assert numpy_encoder.activations == (activation, activation, "linear")
    got = numpy_encoder.encode(x)
    assert got.dtype == np.float32 and got.shape == (257, 4)
    # float32 rounding only: the library's own bound (kernels differ between CPUs and TensorFlow builds)
    np.testing.assert_allclose(got, expected, rtol=0, atol=NUMPY_MATCH_ATOL * max(1.0, float(np.abs(expected).max())))


def test_trained_encoder_matches_keras(trained, blobs):
    x = blobs[0]
    expected = np.asarray(trained.keras_encoder(x, training=False))
    bound = NUMPY_MATCH_ATOL * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(trained.encoder.encode(x), expected, rtol=0, atol=bound)
    assert trained.numpy_max_abs_diff <= bound


# ----------------------------------------------------------------------------------- training


def test_training_report(trained, blobs):
    m = trained.metrics()
    json.dumps(m, allow_nan=False)
    assert m["sample_rows"] == 600 and m["validation_rows"] == 60 and m["train_rows"] == 540
    assert m["input_dim"] == N_FEATURES and m["embedding_size"] == 3 and m["variational"] is False
    assert m["device"] == "cpu" or m["device"]  # a GPU's name where TensorFlow sees one
    h = m["history"]
    assert h["monitor"] == "val_loss" and h["epochs_run"] == 5 and len(h["loss"]) == len(h["val_loss"]) == 5
    assert 1 <= h["best_epoch"] <= 5 and h["stopped_early"] is False
    assert h["loss"][-1] < h["loss"][0]  # it learns something
    # The best epoch's weights are the ones kept: their validation MSE is the best val_loss.
    assert m["reconstruction_mse"] == pytest.approx(min(h["val_loss"]), rel=1e-4)
    assert m["reconstruction_rows"] == "validation" and m["train_seconds"] > 0
    assert m["encoder_sha256"] == trained.encoder.sha256
    assert trained.encoder.feature_names == tuple(f"f{i}" for i in range(N_FEATURES))


def test_embeddings_separate_the_blobs(trained, blobs):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    x, labels = blobs
    z = trained.encoder.encode(x)
    pred = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(labels, pred) > 0.9


def test_same_seed_is_bit_identical_and_another_seed_differs(trained, blobs):
    from segspark.models.deep.autoencoder import train_autoencoder

    x = blobs[0]
    names = [f"f{i}" for i in range(N_FEATURES)]
    again = train_autoencoder(x, _cfg(**FIT), feature_names=names)
    for (w1, b1), (w2, b2) in zip(trained.encoder.layers, again.encoder.layers, strict=True):
        assert np.array_equal(w1, w2) and np.array_equal(b1, b2)
    assert np.array_equal(trained.encoder.encode(x), again.encoder.encode(x))
    assert again.history["loss"] == trained.history["loss"]
    assert again.encoder.sha256 == trained.encoder.sha256

    other = train_autoencoder(x, _cfg(**FIT, seed=43), feature_names=names)
    assert not np.allclose(other.encoder.encode(x), trained.encoder.encode(x))


@pytest.mark.parametrize("variational", [False, True], ids=["ae", "vae"])
def test_an_epoch_per_call_trains_the_weights_of_a_batch_per_call(blobs, variational):
    # Training runs a whole epoch's batches in one call of Keras' compiled function (less overhead per
    # batch): the same batches through the same ops, so the same weights to the bit as one batch per call.
    from segspark.models.deep.autoencoder import _fit, _set_seeds, _split, build_autoencoder

    x = blobs[0]
    cfg = _cfg(epochs=4, variational=variational)  # 540 training rows: 17 batches of 32, the last partial
    train, val = _split(len(x), cfg)
    weights, histories = [], []
    for steps in (1, None):  # one batch per call; the default, an epoch's
        _set_seeds(cfg.seed)
        model, _ = build_autoencoder(N_FEATURES, cfg)
        histories.append(_fit(model, x[train], x[val], cfg, steps_per_execution=steps))
        weights.append(model.get_weights())
    assert histories[0]["loss"] == histories[1]["loss"] and histories[0]["val_loss"] == histories[1]["val_loss"]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))


def test_early_stopping_stops_and_restores_the_best_weights(blobs):
    from segspark.models.deep.autoencoder import train_autoencoder

    # A learning rate this large makes the validation loss jump around, so patience 1 runs out.
    cfg = _cfg(epochs=40, patience=1, learning_rate=0.5, batch_size=16)
    result = train_autoencoder(blobs[0][:300], cfg)
    h = result.history
    assert h["stopped_early"] is True and h["epochs_run"] < 40
    assert len(h["val_loss"]) == h["epochs_run"]
    assert h["best_epoch"] == h["epochs_run"] - 1  # patience 1: stopped one epoch after the best
    assert h["val_loss"][-1] >= h["best_loss"]
    # The mechanism, not a particular loss curve: the best epoch is the validation minimum, and the
    # final model is restored to it (it scores that epoch's loss, not the last one's).
    assert h["best_epoch"] == int(np.argmin(h["val_loss"])) + 1
    assert h["best_loss"] == pytest.approx(min(h["val_loss"]), rel=1e-6)
    assert result.reconstruction_mse == pytest.approx(h["best_loss"], rel=1e-4)
    if min(h["val_loss"]) < h["val_loss"][-1] * (1 - 1e-3):  # the last epoch was clearly worse
        assert result.reconstruction_mse != pytest.approx(h["val_loss"][-1], rel=1e-4)


def test_no_validation_split_monitors_training_loss_and_caps_the_sample(blobs):
    from segspark.models.deep.autoencoder import train_autoencoder

    result = train_autoencoder(blobs[0], _cfg(validation_split=0.0, epochs=2, sample_size=400))
    h = result.history
    assert h["monitor"] == "loss" and "val_loss" not in h and h["epochs_run"] == 2
    assert result.validation_rows == 0 and result.sample_rows == result.train_rows == 400
    assert result.reconstruction_rows == "training"


def test_vae_trains_saves_and_reloads_in_a_fresh_process(blobs, tmp_path):
    from segspark.models.deep.autoencoder import train_autoencoder

    x = blobs[0][:400]
    result = train_autoencoder(x, _cfg(variational=True, kl_weight=0.5))
    h = result.history
    for key in (
        "loss",
        "reconstruction_loss",
        "kl_loss",
        "val_loss",
        "val_reconstruction_loss",
        "val_kl_loss",
    ):
        assert len(h[key]) == h["epochs_run"] and np.all(np.isfinite(h[key])), key
    assert all(v > 0 for v in h["kl_loss"])
    assert h["loss"][-1] == pytest.approx(h["reconstruction_loss"][-1] + 0.5 * h["kl_loss"][-1], rel=1e-4)
    assert result.encoder.variational and result.encoder.embedding_size == 3
    z_mean = np.asarray(result.keras_encoder(x, training=False)[0])
    np.testing.assert_allclose(result.encoder.encode(x), z_mean, rtol=1e-5, atol=1e-5)
    # The sampling layer is seeded too: a second run gives the same weights.
    assert train_autoencoder(x, _cfg(variational=True, kl_weight=0.5)).encoder.sha256 == result.encoder.sha256

    paths = result.save(tmp_path / "vae")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import json
        import numpy as np
        from segspark.models.deep.autoencoder import load_keras_model
        from segspark.models.deep.encoder import NumpyEncoder
        x = np.load({str(tmp_path / "x.npy")!r})
        model = load_keras_model({paths["keras_model"]!r})
        z_keras = np.asarray(model.encoder(x, training=False)[0])
        z_numpy = NumpyEncoder.load({paths["encoder"]!r}).encode(x)
        recon = np.asarray(model(x, training=False))
        print(json.dumps([type(model).__name__, float(np.abs(z_keras - z_numpy).max()), list(recon.shape)]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    name, diff, shape = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "VariationalAutoencoder" and diff < 1e-5 and shape == [len(x), N_FEATURES]


def test_plain_autoencoder_saves_and_reloads(trained, blobs, tmp_path):
    from segspark.models.deep.autoencoder import load_keras_model

    paths = trained.save(tmp_path / "ae")
    model = load_keras_model(paths["keras_model"])
    x = blobs[0][:50]
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(trained.keras_model(x)))
    loaded = NumpyEncoder.load(paths["encoder"])
    assert np.array_equal(loaded.encode(x), trained.encoder.encode(x))
    assert loaded.sha256 == trained.encoder.sha256


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("sample", "overrides", "message"),
    [
        (np.zeros(300, np.float32), {}, "must be 2-D"),
        (np.zeros((300, 4, 2), np.float32), {}, "must be 2-D"),
        (np.array([["a", "b"]] * 300), {}, "must be numeric"),
        (np.zeros((99, 4), np.float32), {}, "99 rows; the autoencoder needs at least 100"),
        (np.zeros((300, 4), np.float32), {"batch_size": 280}, "fewer than one batch"),
        (np.zeros((150, 4), np.float32), {"validation_split": 0.1}, "15 validation rows"),
    ],
)
def test_bad_input(sample, overrides, message):
    from segspark.models.deep.autoencoder import train_autoencoder

    with pytest.raises(ValueError, match=message):
        train_autoencoder(sample, _cfg(**overrides))


def test_non_finite_input_names_counts_and_columns():
    from segspark.models.deep.autoencoder import train_autoencoder

    x = np.zeros((300, 4), np.float32)
    x[[1, 2, 3], 1] = np.nan
    x[5, 3] = np.inf
    with pytest.raises(ValueError, match=r"4 NaN/infinite values in 4 rows and 2 columns \(b: 3, d: 1\)"):
        train_autoencoder(x, _cfg(), feature_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="3 feature names for 4 feature columns"):
        train_autoencoder(x, _cfg(), feature_names=["a", "b", "c"])


# --------------------------------------------------------------------------- NumPy encoder alone


def test_encode_shapes_and_width_errors():
    enc = _small_encoder()
    assert (enc.input_dim, enc.embedding_size) == (5, 2)
    empty = enc.encode(np.zeros((0, 5)))
    assert empty.shape == (0, 2) and empty.dtype == np.float32
    assert enc.encode(np.ones((3, 5), np.float64)).dtype == np.float32
    with pytest.raises(ValueError, match="input has 6 features but the encoder was trained on 5"):
        enc.encode(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="2-D"):
        enc.encode(np.zeros(5))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    expected = np.tanh(x @ enc.layers[0][0] + enc.layers[0][1]) @ enc.layers[1][0] + enc.layers[1][1]
    np.testing.assert_allclose(enc.encode(x), expected, rtol=1e-6, atol=1e-6)
    assert not enc.layers[0][0].flags.writeable


def test_encoder_rejects_inconsistent_layers():
    w = np.zeros((5, 4))
    with pytest.raises(ValueError, match="takes 3 inputs but the previous layer gives 4"):
        NumpyEncoder(((w, np.zeros(4)), (np.zeros((3, 2)), np.zeros(2))), ("relu", "linear"))
    with pytest.raises(ValueError, match="unsupported activation"):
        NumpyEncoder(((w, np.zeros(4)),), ("gelu",))
    with pytest.raises(ValueError, match="1 layers but 2 activation names"):
        NumpyEncoder(((w, np.zeros(4)),), ("relu", "linear"))


def test_save_load_and_bytes_round_trip(tmp_path):
    enc = _small_encoder(variational=True, feature_names=("a", "b", "c", "d", "e"))
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    path = tmp_path / "encoder.npz"
    enc.save(path)

    with np.load(path, allow_pickle=False) as npz:  # plain arrays only, nothing pickled
        assert sorted(npz.files) == ["b0", "b1", "meta", "w0", "w1"]
        meta = json.loads(npz["meta"].tobytes())
    assert meta["activations"] == ["tanh", "linear"] and meta["feature_names"] == ["a", "b", "c", "d", "e"]

    for other in (
        NumpyEncoder.load(path),
        NumpyEncoder.from_bytes(enc.to_bytes()),
        pickle.loads(pickle.dumps(enc)),
    ):
        assert np.array_equal(other.encode(x), enc.encode(x))
        assert other.variational and other.feature_names == enc.feature_names
        assert other.activations == enc.activations
        assert other.to_bytes() == enc.to_bytes() and other.sha256 == enc.sha256
    assert path.read_bytes() == enc.to_bytes()
    assert _small_encoder(variational=True).sha256 != enc.sha256  # metadata is part of the key

    with pytest.raises(ValueError, match="not a segspark encoder"):
        bad = tmp_path / "bad.npz"
        np.savez(bad, w0=np.zeros((2, 2)))
        NumpyEncoder.load(bad)


def test_importing_the_modules_does_not_import_tensorflow():
    code = (
        "import sys, segspark.models.deep.encoder, segspark.models.deep.autoencoder; "
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_training_run_imports_tensorflow_in_the_background_only_for_the_deep_model():
    """registry.warm_up (a training run's start): with the deep model disabled nothing is imported (a
    fresh process); enabled, a thread of its own imports TensorFlow and Keras, once per process."""
    from segspark.config import load_config
    from segspark.models import registry
    from segspark.models.deep import autoencoder

    code = textwrap.dedent("""
        import sys, threading
        from segspark.config import load_config
        from segspark.models import registry
        from segspark.models.deep import autoencoder

        registry.warm_up(load_config("conf/local.yaml", ["models.autoencoder.enabled=false"]).models)
        assert autoencoder._importer is None
        assert not [t for t in threading.enumerate() if t.name == "segspark-import-keras"]
        assert not [m for m in ("tensorflow", "keras") if m in sys.modules]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

    enabled = load_config(REPO / "conf/local.yaml", []).models
    registry.warm_up(enabled)
    started = autoencoder._importer  # this process's (an earlier training run here may have started it)
    assert started is not None and started.name == "segspark-import-keras" and not started.daemon
    registry.warm_up(enabled)
    assert autoencoder._importer is started
    started.join(120)
    assert not started.is_alive() and "tensorflow" in sys.modules and "keras" in sys.modules


def test_denoising_noise_acts_only_while_training(blobs):
    """models.autoencoder.input_noise: a GaussianNoise layer corrupts the training inputs; the encoder
    that embeds users has none, so embeddings are deterministic and the NumPy encoder matches it."""
    from segspark.models.deep.autoencoder import build_autoencoder, train_autoencoder

    model, encoder = build_autoencoder(N_FEATURES, _cfg(input_noise=0.5))
    assert "input_noise" in [layer.name for layer in model.layers]
    assert "input_noise" not in [layer.name for layer in encoder.layers]
    plain, _ = build_autoencoder(N_FEATURES, _cfg(input_noise=0.0))
    assert "input_noise" not in [layer.name for layer in plain.layers]

    trained = train_autoencoder(blobs[0], _cfg(input_noise=0.5, **FIT))
    once, again = trained.encoder.encode(blobs[0]), trained.encoder.encode(blobs[0])
    np.testing.assert_array_equal(once, again)
    keras_embedding = trained.keras_model.get_layer("encoder").predict(blobs[0], verbose=0)
    np.testing.assert_allclose(once, keras_embedding, atol=NUMPY_MATCH_ATOL)

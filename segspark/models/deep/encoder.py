"""NumPy-only inference for the autoencoder's encoder.

Training happens once on the driver (`segspark.models.deep.autoencoder`, Keras), but every user is embedded
on the Spark executors, inside pandas UDFs, one Arrow batch at a time. Importing TensorFlow in a
Python worker costs seconds and hundreds of MB per worker process (measured: 5.4 s and ~670 MB RSS,
against 0.15 s and 30 MB for this module), for no speed gain: on 10k x 40 batches this forward pass
ran at 2.5-3.5M rows/s (one BLAS thread), Keras's `predict_on_batch` at 3-4M rows/s and
`model.predict` per batch at ~20k rows/s. The encoder is a small stack of dense layers, so the
forward pass here is `x @ W + b` and an elementwise activation per layer in float32, which matches
Keras to float32 rounding.

This module must therefore never import tensorflow or keras (a test checks it). The weights travel as
one `.npz` file (or the same bytes in memory, for a Spark closure or broadcast): arrays `w0, b0, ...`
plus a JSON `meta` entry stored as a uint8 array, so `np.load(..., allow_pickle=False)` reads it and
nothing is unpickled. The bytes are written deterministically (fixed zip timestamps, stored entries),
so `sha256` is a stable cache key for a given set of weights.

Threads: the matrix products go through NumPy's BLAS (OpenBLAS), which by default starts one thread per
core in every Python worker. Spark runs one worker per task slot and only sets OMP_NUM_THREADS (to
spark.executor.cores, when that is set), so the workers oversubscribe the cores; on a busy 2-core
machine a 10k-row batch took 3-6x longer with the default BLAS threads than with one. The scoring
function (segspark.models.deep.scoring) therefore limits BLAS to one thread per task with threadpoolctl.

For a variational autoencoder the encoder has two heads, the mean and the log-variance of q(z|x);
only the mean head is kept here, because the embedding used for clustering is the deterministic
z_mean.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from segspark.models.npz import open_npz

log = logging.getLogger(__name__)

FORMAT = "segspark.numpy_encoder"
FORMAT_VERSION = 1

# Constants of keras.activations.selu (Klambauer et al. 2017), as Keras uses them.
_SELU_ALPHA = np.float32(1.6732632423543772848170429916717)
_SELU_SCALE = np.float32(1.0507009873554804934193349852946)


def _relu(h: np.ndarray) -> np.ndarray:
    return np.maximum(h, np.float32(0.0), out=h)


def _tanh(h: np.ndarray) -> np.ndarray:
    return np.tanh(h, out=h)


def _elu(h: np.ndarray) -> np.ndarray:
    # alpha = 1 (Keras's default); expm1 keeps precision near 0 like tf.nn.elu.
    return np.where(h > 0, h, np.expm1(np.minimum(h, np.float32(0.0))))


def _selu(h: np.ndarray) -> np.ndarray:
    neg = _SELU_ALPHA * np.expm1(np.minimum(h, np.float32(0.0)))
    return _SELU_SCALE * np.where(h > 0, h, neg)


def _linear(h: np.ndarray) -> np.ndarray:
    return h


ACTIVATIONS = {"linear": _linear, "relu": _relu, "tanh": _tanh, "elu": _elu, "selu": _selu}


def _frozen_float32(a: Any, name: str) -> np.ndarray:
    arr = np.array(a, dtype=np.float32, copy=True, order="C")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class NumpyEncoder:
    """A dense encoder: per layer `h = activation(h @ weight + bias)`; the last layer is the embedding.

    `layers` holds (weight d_in x d_out, bias d_out) float32 pairs (read-only copies) and
    `activations` one name per layer (see ACTIVATIONS; the embedding layer is normally "linear").
    `variational` records that the weights are a VAE's z_mean head, for the reader's benefit only.
    """

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    activations: tuple[str, ...]
    variational: bool = False
    feature_names: tuple[str, ...] | None = None
    _fns: tuple[Any, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        layers = tuple(
            (_frozen_float32(w, f"layer {i} weight"), _frozen_float32(b, f"layer {i} bias"))
            for i, (w, b) in enumerate(self.layers)
        )
        activations = tuple(str(a) for a in self.activations)
        if not layers:
            raise ValueError("an encoder needs at least one layer")
        if len(activations) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(activations)} activation names")
        unknown = sorted(set(activations) - ACTIVATIONS.keys())
        if unknown:
            raise ValueError(f"unsupported activation(s) {unknown}; supported: {sorted(ACTIVATIONS)}")
        width = None
        for i, (w, b) in enumerate(layers):
            if w.ndim != 2 or b.shape != (w.shape[1],):
                raise ValueError(f"layer {i}: weight {w.shape} and bias {b.shape} do not form a dense layer")
            if width is not None and w.shape[0] != width:
                raise ValueError(f"layer {i} takes {w.shape[0]} inputs but the previous layer gives {width}")
            width = w.shape[1]
        names = None if self.feature_names is None else tuple(str(n) for n in self.feature_names)
        if names is not None and len(names) != layers[0][0].shape[0]:
            raise ValueError(f"{len(names)} feature names for an input width of {layers[0][0].shape[0]}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "activations", activations)
        object.__setattr__(self, "variational", bool(self.variational))
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "_fns", tuple(ACTIVATIONS[a] for a in activations))

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def embedding_size(self) -> int:
        return int(self.layers[-1][0].shape[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (float32, n x embedding_size) of the rows of `x` (n x input_dim; any n >= 0).

        Non-finite inputs are not checked here (this runs per Arrow batch on the executors); they
        propagate into the affected rows' embeddings.
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array (rows x {self.input_dim} features), got shape {x.shape}")
        if x.shape[1] != self.input_dim:
            raise ValueError(
                f"input has {x.shape[1]} features but the encoder was trained on {self.input_dim}"
            )
        h = x.astype(np.float32, copy=False)
        for (w, b), fn in zip(self.layers, self._fns, strict=True):
            h = h @ w  # a new array, so the activations below may work in place
            h += b
            h = fn(h)
        return h

    # ---------------------------------------------------------------- serialisation

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "activations": list(self.activations),
            "variational": self.variational,
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "input_dim": self.input_dim,
            "embedding_size": self.embedding_size,
        }

    def to_bytes(self) -> bytes:
        """The `.npz` file's bytes; identical for identical weights and metadata."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(self._meta(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        }
        for i, (w, b) in enumerate(self.layers):
            arrays[f"w{i}"] = w
            arrays[f"b{i}"] = b
        buf = io.BytesIO()
        # np.savez stamps the current time into every zip entry; fixed timestamps keep sha256 stable.
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w") as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    @cached_property
    def sha256(self) -> str:
        """Hex digest of `to_bytes()`: a cache key for these weights."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one `.npz` file (readable with `np.load(path, allow_pickle=False)`)."""
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NumpyEncoder:
        with open_npz(path) as npz:
            return cls._from_npz(npz, str(path))

    @classmethod
    def from_bytes(cls, data: bytes) -> NumpyEncoder:
        with open_npz(data) as npz:
            return cls._from_npz(npz, "<bytes>")

    @classmethod
    def _from_npz(cls, npz: Any, source: str) -> NumpyEncoder:
        if "meta" not in npz.files:
            raise ValueError(f"{source} is not a segspark encoder file (no 'meta' entry)")
        meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported encoder format {meta.get('format')!r} version {meta.get('version')!r}"
                f" (this code reads {FORMAT!r} version {FORMAT_VERSION})"
            )
        activations: Sequence[str] = meta["activations"]
        layers = tuple((npz[f"w{i}"], npz[f"b{i}"]) for i in range(len(activations)))
        enc = cls(layers, tuple(activations), meta["variational"], meta["feature_names"])
        if (enc.input_dim, enc.embedding_size) != (meta["input_dim"], meta["embedding_size"]):
            raise ValueError(f"{source}: weights do not match the recorded input/embedding sizes")
        return enc

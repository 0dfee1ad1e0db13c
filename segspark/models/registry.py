"""The one list of segmentation models. Config, segments, the bundle, scoring, streaming and the
report read it; adding a model is an entry here plus its implementation module.

Each entry names its implementation module (imported on first use, so that reading the registry
costs nothing) and says how the model is trained:
- `swept`: k is chosen by the k sweep on the user sample (models.sample_grid; the module offers
  `options`, `fit_sample`, `fit_one` and `users_per_cluster`), then fitted once on every user;
- otherwise the model finds its own k (the deep model: `train` and `users_problem`).
A module may also offer `warm_up()`: what its fit needs, started loading when a training run
starts (the deep model imports TensorFlow in a thread of its own; `warm_up` below).

An implementation module also names its fitted class (`FITTED`), which keeps the contract
(models.contract.SegmentModel) and loads itself from a bundle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class ModelType:
    name: str  # the `model` column of the tables, the bundle's file name
    module: str  # the implementation
    config_key: str  # models.<config_key> holds its settings and `enabled`
    swept: bool  # k from the k sweep (else the model finds its own k)
    noise: bool = False  # segment -1 holds the users the model calls noise
    soft: bool = False  # gives every user a full membership vector (`probabilities`)
    outputs: tuple[str, ...] = ()  # tables it writes besides the segment tables (contract.Scored.outputs)
    online: bool = False  # its centres start the stream's online k-means (streaming.online_kmeans)
    description: str = ""

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def fitted_class(self) -> type:
        return self.implementation().FITTED

    def settings(self, models_cfg: Any) -> Any:
        """This model's config section (models.<config_key>)."""
        return getattr(models_cfg, self.config_key)

    def enabled(self, models_cfg: Any) -> bool:
        return bool(self.settings(models_cfg).enabled)


MODELS: tuple[ModelType, ...] = (
    ModelType("kmeans", "segspark.models.kmeans", "kmeans", swept=True, online=True,
              description="MLlib k-means; soft membership from a spherical-Gaussian reading"),
    ModelType("bisecting_kmeans", "segspark.models.bisecting", "bisecting_kmeans", swept=True,
              description="MLlib bisecting k-means (a hierarchy of splits)"),
    ModelType("gmm", "segspark.models.gmm", "gmm", swept=True, soft=True,
              description="Gaussian mixture: soft memberships and a likelihood-based anomaly score"),
    ModelType("ae_hdbscan", "segspark.models.deep.model", "autoencoder", swept=False, noise=True,
              outputs=("user_embeddings",),
              description="Keras autoencoder embeddings, HDBSCAN segments and noise"),
)
_BY_NAME = {m.name: m for m in MODELS}


def names() -> tuple[str, ...]:
    return tuple(m.name for m in MODELS)


def get(name: str) -> ModelType:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"model {name!r} is not one segspark knows; expected one of {list(names())}") from None


def producer(table: str) -> ModelType:
    """The model that writes `table` (one of the models' `outputs`)."""
    return next(m for m in MODELS if table in m.outputs)


def warm_up(models_cfg: Any) -> None:
    """Let every enabled model whose implementation offers `warm_up` start loading what its fit needs
    (the deep model: TensorFlow, in a background thread) while a training run's first stages run."""
    for model in enabled(models_cfg):
        hook = getattr(model.implementation(), "warm_up", None)
        if hook is not None:
            hook()


def online_base() -> ModelType:
    """The model whose centres the stream updates online."""
    return next(m for m in MODELS if m.online)


def enabled(models_cfg: Any) -> list[ModelType]:
    """The enabled models, in registry order."""
    return [m for m in MODELS if m.enabled(models_cfg)]

"""Saving a fitted model into a model bundle and loading it back for scoring.

A fitted baseline (kmeans, bisecting_kmeans, gmm) is a dataclass holding Spark ML models (the
clustering model) next to plain numbers (centroids, variances, thresholds, GMM's principal axes). The Spark ML models go to `mllib/<name>/<field>` with MLlib's own writer; the numbers
to `models/<name>.json`, together with what scoring needs to reproduce the run's segments: the map
from the model's cluster numbers to the run's stable segment ids, and the segment names. The deep
model (ae_hdbscan) writes its encoder and HDBSCAN artifact itself (models.deep.FittedDeep.save);
its JSON holds its metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

from pyspark.ml.util import MLReadable

DEEP_MODEL = "ae_hdbscan"
# model name -> (module, fitted class); the Spark ML fields are recognised by their type
_FITTED = {
    "kmeans": ("segspark.models.kmeans", "FittedKMeans"),
    "bisecting_kmeans": ("segspark.models.bisecting", "FittedBisectingKMeans"),
    "gmm": ("segspark.models.gmm", "FittedGMM"),
}
_SPARK_MODELS = {  # field -> class per model
    "kmeans": {"model": "pyspark.ml.clustering.KMeansModel"},
    "bisecting_kmeans": {"model": "pyspark.ml.clustering.BisectingKMeansModel"},
    "gmm": {},  # plain numbers: weights, means, covariances, principal axes
}
# Bundles of earlier versions saved GMM's principal axes as an MLlib PCAModel (read back as numbers)
# and its MLlib GaussianMixtureModel (not needed: the mixture's numbers are in the JSON).
_LEGACY_SPARK_FIELDS = {("gmm", "projection"): "pyspark.ml.feature.PCAModel"}


@dataclasses.dataclass(frozen=True)
class SavedSegments:
    """A baseline loaded from a bundle, with the run's stable ids and names."""

    fitted: Any
    segment_ids: dict[int, int]  # the model's cluster number -> stable segment id
    segment_names: dict[int, str]  # stable segment id -> name


def save_fitted(
    name: str, fitted: Any, bundle_dir: str, segment_ids: dict[int, int], segment_names: dict[int, str]
) -> None:
    root = Path(bundle_dir)
    numbers: dict[str, Any] = {}
    if name == DEEP_MODEL:
        fitted.save(bundle_dir)
        numbers = fitted.metrics()
    for f in dataclasses.fields(fitted) if name != DEEP_MODEL else ():
        value = getattr(fitted, f.name)
        if f.name in _SPARK_MODELS[name]:
            if value is not None:
                value.write().overwrite().save(str(root / "mllib" / name / f.name))
            numbers[f.name] = None if value is None else f"mllib/{name}/{f.name}"
        else:
            numbers[f.name] = value
    document = {
        "model": name,
        "fitted": numbers,
        "segment_ids": {str(a): int(b) for a, b in segment_ids.items()},
        "segment_names": {str(a): b for a, b in segment_names.items()},
    }
    target = root / "models" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(document, indent=1, allow_nan=False, default=float) + "\n")
    os.replace(partial, target)


def load_fitted(name: str, bundle_dir: str) -> SavedSegments:
    if name not in _FITTED and name != DEEP_MODEL:
        raise ValueError(f"model {name!r}: expected one of {sorted([*_FITTED, DEEP_MODEL])}")
    root = Path(bundle_dir)
    document = json.loads((root / "models" / f"{name}.json").read_text())
    ids = {int(a): int(b) for a, b in document["segment_ids"].items()}
    names = {int(a): b for a, b in document["segment_names"].items()}
    if name == DEEP_MODEL:
        from segspark.models.deep import FittedDeep

        return SavedSegments(FittedDeep.load(bundle_dir, document["fitted"]), ids, names)
    module_name, class_name = _FITTED[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    values = dict(document["fitted"])
    for field_name, spark_class in _SPARK_MODELS[name].items():
        relative = values.get(field_name)
        values[field_name] = None if relative is None else _spark_class(spark_class).load(str(root / relative))
    for (model, field_name), spark_class in _LEGACY_SPARK_FIELDS.items():
        if model == name and isinstance(values.get(field_name), str):
            legacy = _spark_class(spark_class).load(str(root / values[field_name]))
            values[field_name] = legacy.pc.toArray().tolist()
    known = {f.name for f in dataclasses.fields(cls)}
    fitted = cls(**{k: v for k, v in values.items() if k in known})
    return SavedSegments(fitted, ids, names)


def _spark_class(dotted: str) -> type[MLReadable]:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

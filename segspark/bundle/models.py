"""Saving a fitted model into a model bundle and loading it back for scoring.

A fitted baseline (kmeans, bisecting_kmeans, gmm) is a dataclass holding Spark ML models (the
clustering model) next to plain numbers (centroids, variances, thresholds, GMM's principal axes). The Spark ML models go to `mllib/<name>/<field>` with MLlib's own writer; the numbers
to `models/<name>.json`, together with what scoring needs to reproduce the run's segments: the map
from the model's cluster numbers to the run's stable segment ids, and the segment names. The deep
model (ae_hdbscan) writes its encoder and HDBSCAN artifact itself (models.deep.FittedDeep.save);
its JSON holds its metrics.

Loading follows paths from the bundle's JSON (the MLlib directories), so every path is confined to
the bundle and, when the verified manifest is given (scoring always gives it), must be a file or
directory the manifest lists: an edited JSON cannot make scoring load a file no checksum covers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

from pyspark.ml.util import MLReadable

from segspark.bundle.manifest import BundleError, Manifest, confined

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


def load_fitted(name: str, bundle_dir: str, manifest: Manifest | None = None) -> SavedSegments:
    """The model `name` saved in `bundle_dir`. `manifest`: the bundle's verified manifest; every file
    and directory read must then be listed in it (without one, paths are only confined to the bundle)."""
    if name not in _FITTED and name != DEEP_MODEL:
        raise BundleError(f"bundle {bundle_dir}: model {name!r} is not one segspark knows; expected one of "
                          f"{sorted([*_FITTED, DEEP_MODEL])}. Retrain, or score with the segspark that trained it")

    def file(rel: str, what: str) -> Path:
        return manifest.file(rel, what=what) if manifest is not None else confined(bundle_dir, rel, what=what)

    def directory(rel: object, what: str) -> str:
        found = manifest.directory(rel, what=what) if manifest is not None else confined(bundle_dir, rel, what=what)
        return str(found)

    document = json.loads(file(f"models/{name}.json", f"the JSON of model {name}").read_text())
    ids = {int(a): int(b) for a, b in document["segment_ids"].items()}
    names = {int(a): b for a, b in document["segment_names"].items()}
    if name == DEEP_MODEL:
        from segspark.models.deep.model import DENSITY_FILE, ENCODER_FILE, FittedDeep

        file(ENCODER_FILE, "the encoder of ae_hdbscan")
        file(DENSITY_FILE, "the HDBSCAN artifact of ae_hdbscan")
        return SavedSegments(FittedDeep.load(bundle_dir, document["fitted"]), ids, names)
    module_name, class_name = _FITTED[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    values = dict(document["fitted"])
    for field_name, spark_class in _SPARK_MODELS[name].items():
        relative = values.get(field_name)
        what = f"models/{name}.json fitted.{field_name} (an MLlib model directory)"
        values[field_name] = None if relative is None else _spark_class(spark_class).load(directory(relative, what))
    for (model, field_name), spark_class in _LEGACY_SPARK_FIELDS.items():
        if model == name and isinstance(values.get(field_name), str):
            what = f"models/{name}.json fitted.{field_name} (an MLlib model directory)"
            legacy = _spark_class(spark_class).load(directory(values[field_name], what))
            values[field_name] = legacy.pc.toArray().tolist()
    known = {f.name for f in dataclasses.fields(cls)}
    fitted = cls(**{k: v for k, v in values.items() if k in known})
    return SavedSegments(fitted, ids, names)


def _spark_class(dotted: str) -> type[MLReadable]:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

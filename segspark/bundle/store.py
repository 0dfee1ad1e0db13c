"""A run's model bundle: written after training, applied by `segspark score` without retraining.

The bundle is `<output.root>/_models/<run_id>/` (layout in models.bundle): the fitted preparation,
the feature spec, every model of the run with its map to the run's stable segment ids and names,
and a manifest with checksums written last. Scoring opens it only after every checksum matches and
the new data's features match the spec, so a changed file or a different feature set is refused
with a message saying what differs instead of producing silently wrong segments. With
`bundle.signing_key_env` set, training signs the manifest and scoring and streaming accept only
bundles signed with that key (models.bundle, "Signing").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from segspark.bundle.manifest import (
    BundleError,
    FeatureSpec,
    Manifest,
    SigningKey,
    bundle_path,
    open_bundle,
    signing_key_from_env,
    write_manifest,
)
from segspark.bundle.models import load_fitted, save_fitted
from segspark.config import BundleConfig, OutputConfig
from segspark.features.behaviour import FeatureSlots
from segspark.models.prepare import FittedPreparation
from segspark.runtime.expressions import memoised
from segspark.runtime.run_ids import owned_child, remove_owned
from segspark.segments.ids import stable_segment
from segspark.segments.profiles import segment_name_column

log = logging.getLogger(__name__)

_OBJECT_STORE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


def models_folder(output: OutputConfig) -> str:
    """`output.root/_models`, the folder segspark owns for bundles; BundleError for an object-store output.root."""
    root = output.root.rstrip("/")
    if _OBJECT_STORE.match(root) and not root.startswith("file:"):
        raise BundleError(
            f"output.root={output.root!r}: model bundles are checksummed with plain file IO, so they need a "
            "local or FUSE-mounted path (on Databricks /dbfs/... or /Volumes/...); set output.root to one"
        )
    return str(bundle_path(f"{root}/_models"))


def bundle_signing(cfg: BundleConfig) -> SigningKey | None:
    """The manifest signing key from the environment variable bundle.signing_key_env names (None:
    signing off); a ConfigError when that variable is unset or too short. Commands call it before
    any work, so a missing key fails at once rather than after training."""
    return signing_key_from_env(cfg.signing_key_env)


def bundle_location(output: OutputConfig, run_id: str) -> str:
    """Where run `run_id` keeps its bundle: `output.root/_models/<run_id>`, for a valid run id only
    (segspark.runtime.run_ids), checked to resolve to a folder inside `_models`."""
    return str(owned_child(models_folder(output), run_id))


def start_bundle(location: str, owner: str) -> None:
    """An empty bundle directory: files of an earlier attempt of the same run would fail the manifest.
    The old folder is deleted only if it resolves strictly inside `owner` (`models_folder`)."""
    remove_owned(location, owner)
    Path(location).mkdir(parents=True)


def save_model(location: str, name: str, fitted, segment_ids: Mapping[int, int], segment_names: Mapping[int, str]):
    save_fitted(name, fitted, location, dict(segment_ids), dict(segment_names))


def finish_bundle(
    location: str,
    *,
    run_id: str,
    config_hash: str,
    as_of,
    features: DataFrame,
    preparation: FittedPreparation,
    models: list[str],
    training_data: Mapping,
    signing: SigningKey | None = None,
) -> Manifest:
    FeatureSpec.from_schema(features.schema, preparation.features).write(location)
    return write_manifest(
        location, run_id=run_id, config_hash=config_hash, as_of=as_of, training_data=training_data, models=models,
        signing=signing,
    )


def bundle_slots(location: str, signing: SigningKey | None = None, manifest: Manifest | None = None) -> FeatureSlots | None:
    """The category and one-hot slot values the bundle's models were trained on (None for bundles
    written before they were recorded: the new data's own are used then, as before). With `signing`
    the manifest they come from is authenticated first. `manifest`: the bundle's, verified by the
    caller a moment ago (not read again)."""
    manifest = manifest or open_bundle(location, verify=False, signing=signing)
    recorded = manifest.training_data.get("feature_slots")
    if recorded is None:
        log.warning("bundle %s does not record its feature slots; resolving them from the data to score", location)
        return None
    return FeatureSlots(categories=list(recorded["categories"]), one_hot={k: list(v) for k, v in recorded["one_hot"].items()})


@dataclass(frozen=True)
class BundleScores:
    manifest: Manifest
    assignments: dict[str, DataFrame]  # model -> user_id, segment (stable), segment_name, probability, ...
    outputs: dict[str, DataFrame]  # the tables the models add (table -> frame, user_id first): user_embeddings
    cached: list[DataFrame]  # persisted on the way (the deep scores, read twice): unpersist when written


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle with its preparation and models loaded (a stream loads it once)."""

    location: str
    manifest: Manifest
    preparation: FittedPreparation
    models: dict  # name -> persist.SavedSegments


def load_bundle(location: str, signing: SigningKey | None = None, manifest: Manifest | None = None) -> LoadedBundle:
    """Verify the bundle (checksums, and the signature when a key is given), then load only files
    its manifest lists. `manifest`: the bundle's, verified by the caller a moment ago (not again)."""
    manifest = manifest or open_bundle(location, signing=signing)
    preparation = FittedPreparation.load(str(manifest.file("prepare/prepare.json", what="the fitted preparation")))
    models = {name: load_fitted(name, location, manifest) for name in manifest.models}
    return LoadedBundle(location, manifest, preparation, models)


def score_with_bundle(
    bundle: str | LoadedBundle, features: DataFrame, signing: SigningKey | None = None
) -> BundleScores:
    """Every model of a verified bundle (a path, or one loaded already) applied to `features`
    (user_id + feature columns)."""
    loaded = load_bundle(bundle, signing) if isinstance(bundle, str) else bundle
    return score_prepared(loaded, prepare_with_bundle(loaded, features))


def prepare_with_bundle(loaded: LoadedBundle, features: DataFrame) -> DataFrame:
    """`features` (user_id + feature columns) checked against the bundle's feature spec, cast where the
    spec allows, and prepared by its fitted preparation: what every model of the bundle scores."""
    spec = loaded.manifest.feature_spec()
    spec.check(features.schema, what="the features of the data to score")
    casts = spec.casts(features.schema)
    if casts:
        features = features.withColumns({c: F.col(c).cast(t) for c, t in casts.items()})
    return loaded.preparation.transform(features)


def _stable_columns(saved) -> tuple[Column, Column]:
    """(stable segment id, segment name) of a saved model's assignments (`segments.ids.apply_mapping`)."""
    return stable_segment(saved.segment_ids), F.coalesce(segment_name_column(saved.segment_names), F.lit("unnamed segment"))


def score_prepared(loaded: LoadedBundle, prepared: DataFrame) -> BundleScores:
    """Every model of a loaded bundle applied to users it prepared (`prepare_with_bundle`): a stream
    prepares each batch once and reads the prepared users for its own online model too."""
    manifest = loaded.manifest
    assignments: dict[str, DataFrame] = {}
    outputs: dict[str, DataFrame] = {}
    cached: list[DataFrame] = []
    for name in manifest.models:
        saved = loaded.models[name]
        scored = saved.fitted.score(prepared)
        outputs.update(scored.outputs)
        cached += scored.cached
        # The stable ids and names: expressions of the saved model, built once (a stream scores every batch).
        segment, segment_name = memoised(saved, "stable", lambda saved=saved: _stable_columns(saved))
        assignments[name] = scored.assignments.withColumn("segment", segment).withColumn("segment_name", segment_name)
    log.info("bundle %s (run %s) applied: models %s", loaded.location, manifest.run_id, ", ".join(manifest.models))
    return BundleScores(manifest, assignments, outputs, cached)


__all__ = ["BundleError", "BundleScores", "LoadedBundle", "bundle_location", "bundle_signing", "bundle_slots", "load_bundle",
           "finish_bundle", "models_folder", "prepare_with_bundle", "save_model", "score_prepared", "score_with_bundle",
           "start_bundle"]

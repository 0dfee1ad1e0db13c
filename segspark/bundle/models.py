"""Saving a fitted model into a model bundle and loading it back for scoring.

Every model saves itself (models.contract: `save` writes its files into the bundle folder and
returns the numbers for its JSON; the MLlib baselines write their MLlib models under
`mllib/<name>/` with MLlib's own writer, the deep model its encoder and HDBSCAN artifact). This
module writes `models/<name>.json`: those numbers, with what scoring needs to reproduce the run's
segments: the map from the model's cluster numbers to the run's stable segment ids, and the names.

Loading follows paths from the bundle's JSON (the MLlib directories), so every path is confined to
the bundle and, when the verified manifest is given (scoring always gives it), must be a file or
directory the manifest lists: an edited JSON cannot make scoring load a file no checksum covers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from segspark.bundle.manifest import BundleError, Manifest, confined
from segspark.models import registry


@dataclasses.dataclass(frozen=True)
class SavedSegments:
    """A baseline loaded from a bundle, with the run's stable ids and names."""

    fitted: Any
    segment_ids: dict[int, int]  # the model's cluster number -> stable segment id
    segment_names: dict[int, str]  # stable segment id -> name


def save_fitted(
    name: str, fitted: Any, bundle_dir: str, segment_ids: dict[int, int], segment_names: dict[int, str]
) -> None:
    document = {
        "model": name,
        "fitted": fitted.save(bundle_dir),
        "segment_ids": {str(a): int(b) for a, b in segment_ids.items()},
        "segment_names": {str(a): b for a, b in segment_names.items()},
    }
    target = Path(bundle_dir) / "models" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(document, indent=1, allow_nan=False, default=float) + "\n")
    os.replace(partial, target)


@dataclasses.dataclass(frozen=True)
class _BundleFiles:
    """models.contract.BundleFiles of one bundle: paths listed in its verified manifest, or (without
    one) only confined to the bundle folder."""

    bundle_dir: str
    manifest: Manifest | None

    def file(self, relative: str, what: str) -> Path:
        if self.manifest is not None:
            return self.manifest.file(relative, what=what)
        return confined(self.bundle_dir, relative, what=what)

    def directory(self, relative: str, what: str) -> str:
        if self.manifest is not None:
            return str(self.manifest.directory(relative, what=what))
        return str(confined(self.bundle_dir, relative, what=what))


def load_fitted(name: str, bundle_dir: str, manifest: Manifest | None = None) -> SavedSegments:
    """The model `name` saved in `bundle_dir`. `manifest`: the bundle's verified manifest; every file
    and directory read must then be listed in it (without one, paths are only confined to the bundle)."""
    if name not in registry.names():
        raise BundleError(f"bundle {bundle_dir}: model {name!r} is not one segspark knows; expected one of "
                          f"{sorted(registry.names())}. Retrain, or score with the segspark that trained it")
    files = _BundleFiles(bundle_dir, manifest)
    document = json.loads(files.file(f"models/{name}.json", f"the JSON of model {name}").read_text())
    ids = {int(a): int(b) for a, b in document["segment_ids"].items()}
    names = {int(a): b for a, b in document["segment_names"].items()}
    fitted = registry.get(name).fitted_class().load(name, document["fitted"], files)
    return SavedSegments(fitted, ids, names)

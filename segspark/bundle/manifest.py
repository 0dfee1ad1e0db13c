"""The model bundle: one directory per trained model set, checked before anything is scored with it.

`segspark score` applies models trained earlier to new data without retraining. That is only safe
when (1) the bundle on disk is exactly what training wrote, and (2) the data being scored has the
features the models were trained on. This module provides the container for both checks; the
contents are written by the model code:

    <bundle>/
      manifest.json          written last by `write_manifest`: checksums of every other file
      feature_spec.json      `FeatureSpec`: feature names, order and Spark types used for training
      prepare/prepare.json   fitted preparation (models.prepare)
      autoencoder/ hdbscan/  deep path (encoder.npz, autoencoder.keras, hdbscan.npz)
      mllib/<model>/         Spark MLlib model directories, incl. their .crc and _SUCCESS files
      models/<model>.json    small per-model JSON (centroids, thresholds)
      manifest.sig           optional: HMAC-SHA256 of manifest.json under the signing key

Integrity rules (`open_bundle`):
- manifest.json is written last and atomically (temp file + os.replace), so a bundle without one is
  an unfinished training run, never a half-written manifest.
- Every file is covered by a sha256, hidden ones included: Spark's checksums are hidden files
  (`.part-00000.crc`, `._SUCCESS.crc`) and `_SUCCESS` is a marker; skipping them would let a
  swapped file through. A file that is missing, changed, or present but not in the manifest is an
  error: a bundle is immutable once its manifest is written, and a file nobody recorded could be
  loaded by a model reader (MLlib reads every part file in a directory).
- The only names ignored are desktop/notebook litter that no reader loads (`IGNORED_NAMES`:
  .DS_Store, Thumbs.db, desktop.ini, .ipynb_checkpoints, __pycache__). They are ignored both when
  writing and when verifying.
- `content_sha256` (one hash over all paths and file hashes) identifies a bundle's contents: scoring
  code can key per-worker model caches by it.
- Every path read from a bundle file (a model directory named in models/<model>.json, say) is
  confined to the bundle (`Manifest.file` / `Manifest.directory`): an absolute path, a `..` or a
  link that resolves outside is refused, and so is a file the manifest does not list. Otherwise an
  edited JSON could make scoring load a file that no checksum covers. Symbolic links that resolve
  outside the bundle are refused by `open_bundle` for the same reason.

Signing (optional, `bundle.signing_key_env`): checksums catch corruption, not someone who rewrites a
model file and then the manifest's checksums to match. With a key (read from the environment variable
the config names, never from the config itself), `write_manifest` writes `manifest.sig`, the
HMAC-SHA256 of manifest.json's bytes, and `open_bundle` refuses a bundle whose signature is missing
or does not match that key. The signature covers the manifest, the manifest covers every file.

Paths are local file system paths, which includes FUSE mounts such as Databricks' /dbfs/... and
/Volumes/...; `file:` URIs are accepted. Object-store URIs (s3://, abfss://, dbfs:/) are refused
for now: checksumming needs plain file IO.

Library versions are recorded so that a mismatch (say a Keras model opened by another Keras) can be
reported; a mismatch only logs a warning, because most upgrades read old models fine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import platform
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from segspark.errors import ConfigError, UsageError

if TYPE_CHECKING:  # only for annotations: pyspark's types need no JVM, but keep imports light
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the manifest layout changes in a way older readers cannot handle
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # hex HMAC-SHA256 of manifest.json's bytes (signed bundles only)
SIGNING_SETTING = "bundle.signing_key_env"
MIN_KEY_BYTES = 16  # a shorter HMAC key can be guessed; `openssl rand -hex 32` gives 64 characters
FEATURE_SPEC_NAME = "feature_spec.json"
# Names skipped wherever they appear (files or directories): litter from desktops and notebooks.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints", "__pycache__"})
# Libraries whose versions are recorded; "python" is added from the running interpreter.
LIBRARIES = (
    "segspark",
    "pyspark",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "hdbscan",
    "numba",  # compiles the neighbour query of HDBSCAN assignment
    "tensorflow",
    "keras",
    "deltalake",
)
# A version difference in these is worth a warning: they read and write the model files.
_MODEL_LIBRARIES = ("pyspark", "scikit-learn", "hdbscan", "tensorflow", "keras")
NOT_INSTALLED = "not installed"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: C:\ is a Windows path
_CHUNK = 1 << 20


class BundleError(UsageError):
    """The bundle cannot be used: not found, incomplete, tampered with, or not fitting the data (exit 2)."""


# --- signing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """An HMAC-SHA256 key for bundle manifests, and where it came from (named in messages; the key never is)."""

    key: bytes = field(repr=False)
    source: str  # e.g. "$SEGSPARK_BUNDLE_KEY (bundle.signing_key_env)"

    def sign(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()


def signing_key_from_env(variable: str | None) -> SigningKey | None:
    """The key in environment variable `variable` (the value of bundle.signing_key_env); None when
    signing is off. A configured variable that is unset, empty or too short is a ConfigError now,
    before any training or scoring: silently falling back to unsigned bundles would defeat it."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if value is None or not value.strip():
        state = "not set" if value is None else "empty"
        raise ConfigError(
            f"{SIGNING_SETTING}={variable!r} names the environment variable that holds the bundle signing key, "
            f"but ${variable} is {state}. Export it (e.g. export {variable}=$(openssl rand -hex 32)), with the same "
            f"key for training, scoring and streaming, or set {SIGNING_SETTING} to null to use unsigned bundles"
        )
    key = value.strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"${variable} ({SIGNING_SETTING}) holds a {len(key)}-byte key; expected at least {MIN_KEY_BYTES} bytes "
            f"(e.g. export {variable}=$(openssl rand -hex 32))"
        )
    return SigningKey(key, f"${variable} ({SIGNING_SETTING})")


def _check_signature(root: Path, manifest_bytes: bytes, signing: SigningKey) -> None:
    where = root / SIGNATURE_NAME
    try:
        found = where.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise BundleError(
            f"bundle {root} is not signed ({SIGNATURE_NAME} is missing), but a signing key is configured "
            f"({signing.source}): only bundles trained with that key are accepted. Retrain with the key set, "
            f"or set {SIGNING_SETTING} to null to accept unsigned bundles"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where} cannot be read as a signature ({exc}); retrain with {signing.source} set") from None
    if not hmac.compare_digest(found.lower(), signing.sign(manifest_bytes)):
        raise BundleError(
            f"bundle {root}: {SIGNATURE_NAME} does not match {MANIFEST_NAME} under the key in {signing.source}. "
            "Either the manifest was changed after training (someone rewrote files and their checksums), or the "
            "bundle was signed with another key. Retrain with this key, or score with the key it was trained with"
        )
    log.info("bundle %s: manifest signature verified (%s)", root, signing.source)


# --- paths read from a bundle --------------------------------------------------------------------


def confined(root: str | os.PathLike[str], rel: object, *, what: str) -> Path:
    """`root/rel` for a path read from a bundle's own files, refused (BundleError) unless it is a
    relative path that stays inside the bundle once resolved (`..` and links included)."""
    root = bundle_path(root)
    text = rel if isinstance(rel, str) else None
    problem = None
    if not text:
        problem = f"is {rel!r}, expected a path relative to the bundle"
    elif text.startswith(("/", "\\")) or _SCHEME.match(text) or re.match(r"^[A-Za-z]:", text):
        problem = f"is the absolute path or URI {text!r}, expected a path relative to the bundle"
    elif "\\" in text or ".." in PurePosixPath(text).parts:
        problem = f"is {text!r}, which climbs out of its folder (or uses backslashes); expected a path inside the bundle"
    else:
        base, target = root.resolve(), (root / text).resolve()
        if target == base or not target.is_relative_to(base):
            problem = f"is {text!r}, which resolves to {target}, outside the bundle"
        else:
            return target
    raise BundleError(
        f"bundle {root}: {what} {problem}. A bundle loads only its own files, each covered by its manifest; "
        "this one was edited or built by hand. Retrain, or restore the bundle from where it was copied"
    )


# --- feature spec --------------------------------------------------------------------------------

# Accepted type differences, found -> expected. Each is exact for the values features take: integers
# widen to wider integers and to double (exact up to 2**53, far above any count here), float widens
# to double. Everything else (narrowing, string, decimal, timestamp) is refused: a silent cast could
# change values or hide a wrong input, and the fix (a cast, or recomputing the features) is the user's.
_INTEGRAL_RANK = {"tinyint": 0, "smallint": 1, "int": 2, "bigint": 3}


def _widening_ok(found: str, expected: str) -> bool:
    if found in _INTEGRAL_RANK and expected in _INTEGRAL_RANK:
        return _INTEGRAL_RANK[found] <= _INTEGRAL_RANK[expected]
    if expected == "double":
        return found == "float" or found in _INTEGRAL_RANK
    return False


ACCEPTED_WIDENING = "tinyint -> smallint -> int -> bigint, any integer type -> double, float -> double"


@dataclass(frozen=True)
class FeatureSpec:
    """Feature columns the models were trained on: (name, Spark simpleString type), in training order."""

    features: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise BundleError(f"feature spec lists columns more than once: {', '.join(duplicates)}")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.features]

    @classmethod
    def from_schema(cls, schema: StructType, names: Sequence[str]) -> FeatureSpec:
        """The spec of columns `names` (in this order) as typed in `schema` (the training input)."""
        fields = {f.name: f.dataType.simpleString() for f in schema.fields}
        missing = [n for n in names if n not in fields]
        if missing:
            raise BundleError(
                f"cannot build the feature spec: {len(missing)} feature column(s) not in the training "
                f"schema: {', '.join(missing)} (columns present: {', '.join(fields)})"
            )
        return cls(tuple((n, fields[n]) for n in names))

    def to_json(self) -> str:
        doc = {
            "format_version": FORMAT_VERSION,
            "features": [{"name": n, "type": t} for n, t in self.features],
        }
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str, *, source: str = FEATURE_SPEC_NAME) -> FeatureSpec:
        try:
            doc = json.loads(text)
            items = doc["features"]
            features = tuple((str(item["name"]), str(item["type"])) for item in items)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(
                f"{source} is not a valid feature spec ({type(exc).__name__}: {exc}); expected "
                '{"features": [{"name": ..., "type": ...}, ...]} as written by FeatureSpec.to_json'
            ) from None
        return cls(features)

    def write(self, bundle_dir: str | os.PathLike[str]) -> Path:
        """Write feature_spec.json into the bundle (before `write_manifest`)."""
        target = bundle_path(bundle_dir) / FEATURE_SPEC_NAME
        _atomic_write(target, self.to_json())
        return target

    @classmethod
    def read(cls, bundle_dir: str | os.PathLike[str]) -> FeatureSpec:
        target = bundle_path(bundle_dir) / FEATURE_SPEC_NAME
        try:
            text = target.read_text()
        except FileNotFoundError:
            raise BundleError(
                f"bundle {target.parent} has no {FEATURE_SPEC_NAME}: not a complete bundle"
            ) from None
        return cls.from_json(text, source=str(target))

    def problems(self, schema: StructType) -> tuple[list[str], list[str]]:
        """(missing, wrong_type) descriptions for `schema`; empty lists when it fits."""
        found = {f.name: f.dataType.simpleString() for f in schema.fields}
        by_lower = {name.lower(): name for name in found}
        missing: list[str] = []
        wrong: list[str] = []
        for name, expected in self.features:
            if name not in found:
                near = by_lower.get(name.lower())
                missing.append(f"{name} (found {near!r}: names are case-sensitive)" if near else name)
            elif found[name] != expected and not _widening_ok(found[name], expected):
                wrong.append(f"{name} is {found[name]}, expected {expected}")
        return missing, wrong

    def check(self, schema: StructType, *, what: str = "the data to score") -> None:
        """Raise one BundleError listing every missing column and every type that does not fit.

        Extra columns are fine (user_id, as_of and anything else pass through). Accepted type
        differences: see ACCEPTED_WIDENING; `casts` says which columns need a cast to the trained type.
        """
        missing, wrong = self.problems(schema)
        if not missing and not wrong:
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing column(s): {', '.join(missing)}")
        if wrong:
            parts.append(f"{len(wrong)} column(s) with another type: {'; '.join(wrong)}")
        raise BundleError(
            f"{what} does not fit the features the models were trained on: {' and '.join(parts)}. "
            f"Accepted type differences: {ACCEPTED_WIDENING}. Fix: compute the features with the "
            "same segspark version and config as the bundle (segspark features), or cast the columns "
            "to the expected types."
        )

    def casts(self, schema: StructType) -> dict[str, str]:
        """Columns of `schema` whose accepted type differs from the trained one: {name: trained type}.

        Apply with df.withColumns({c: F.col(c).cast(t) for c, t in spec.casts(df.schema).items()})
        after `check`, so models see exactly the trained types."""
        found = {f.name: f.dataType.simpleString() for f in schema.fields}
        return {n: t for n, t in self.features if n in found and found[n] != t and _widening_ok(found[n], t)}


# --- manifest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds, plus the bundle directory it was read from or written to."""

    path: Path
    format_version: int
    run_id: str
    config_hash: str
    as_of: str
    created_at: str
    segspark_version: str
    models: tuple[str, ...]
    training_data: dict[str, Any]
    libraries: dict[str, str]
    files: dict[str, FileEntry]
    content_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "as_of": self.as_of,
            "created_at": self.created_at,
            "segspark_version": self.segspark_version,
            "models": list(self.models),
            "training_data": self.training_data,
            "libraries": self.libraries,
            "content_sha256": self.content_sha256,
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in sorted(self.files.items())},
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: Path) -> Manifest:
        where = path / MANIFEST_NAME
        version = doc.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(
                f"{where}: format_version is {version!r}, expected an integer: not a segspark bundle manifest"
            )
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {version} was written by a newer segspark; this one reads up to "
                f"{FORMAT_VERSION}. Upgrade segspark to score with this bundle."
            )
        if version < 1:
            raise BundleError(
                f"{where}: format_version {version} is not valid (expected 1..{FORMAT_VERSION})"
            )
        try:
            files = {str(p): FileEntry(str(e["sha256"]), int(e["size"])) for p, e in doc["files"].items()}
            return cls(
                path=path,
                format_version=version,
                run_id=str(doc["run_id"]),
                config_hash=str(doc["config_hash"]),
                as_of=str(doc["as_of"]),
                created_at=str(doc["created_at"]),
                segspark_version=str(doc["segspark_version"]),
                models=tuple(str(m) for m in doc["models"]),
                training_data=dict(doc["training_data"]),
                libraries={str(k): str(v) for k, v in doc["libraries"].items()},
                files=files,
                content_sha256=str(doc["content_sha256"]),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(
                f"{where} is incomplete or malformed ({type(exc).__name__}: {exc}); it was not written by "
                "segspark's write_manifest or was edited. Retrain to get a new bundle."
            ) from None

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.read(self.file(FEATURE_SPEC_NAME, what="the feature spec").parent)

    def file(self, rel: object, *, what: str) -> Path:
        """The bundle file `rel` (read from a bundle file), inside the bundle and listed in the manifest."""
        target = confined(self.path, rel, what=what)
        name = target.relative_to(self.path.resolve()).as_posix()
        if name not in self.files:
            raise BundleError(
                f"bundle {self.path}: {what} is {rel!r}, which the manifest does not list (no checksum covers it); "
                "the bundle was edited or built by hand. Retrain, or restore it from where it was copied"
            )
        return target

    def directory(self, rel: object, *, what: str) -> Path:
        """The bundle directory `rel` (an MLlib model), inside the bundle and holding manifest-listed files."""
        target = confined(self.path, rel, what=what)
        prefix = target.relative_to(self.path.resolve()).as_posix() + "/"
        if not any(name.startswith(prefix) for name in self.files):
            raise BundleError(
                f"bundle {self.path}: {what} is {rel!r}, a directory with no file in the manifest; "
                "the bundle was edited or built by hand. Retrain, or restore it from where it was copied"
            )
        return target

    def library_mismatches(self) -> dict[str, tuple[str, str]]:
        """Model libraries whose installed version differs from training: {name: (trained, installed)}."""
        now = library_versions()
        return {
            name: (self.libraries.get(name, NOT_INSTALLED), now[name])
            for name in _MODEL_LIBRARIES
            if name in self.libraries and self.libraries[name] != now.get(name)
        }


def library_versions() -> dict[str, str]:
    """Installed versions from package metadata (nothing is imported: TensorFlow would take seconds)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    if versions["segspark"] == NOT_INSTALLED:  # a source checkout that was never pip-installed
        from segspark import __version__

        versions["segspark"] = __version__
    return versions


def write_manifest(
    bundle_dir: str | os.PathLike[str],
    *,
    run_id: str,
    config_hash: str,
    as_of: dt.date | str,
    training_data: Mapping[str, Any],
    models: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    signing: SigningKey | None = None,
) -> Manifest:
    """Checksum every file of the bundle and write manifest.json atomically, last.

    Call it after everything else (feature_spec.json included) is written: files added later make
    `open_bundle` fail. `training_data` describes the fitting input (path, first/last event time,
    users, events); dates and datetimes in it are written as ISO strings. With `signing`, manifest.sig
    (the HMAC of the manifest's bytes) is written just before the manifest, so that a finished bundle
    (one with a manifest) is never missing its signature.
    """
    root = bundle_path(bundle_dir)
    if not root.is_dir():
        raise BundleError(
            f"bundle directory {root} does not exist: write the models into it before the manifest"
        )
    if not (root / FEATURE_SPEC_NAME).is_file():
        raise BundleError(
            f"bundle {root} has no {FEATURE_SPEC_NAME}: write FeatureSpec.write(bundle_dir) before the manifest, "
            "so scoring can check its input"
        )
    files = {rel: _hash_file(root / rel) for rel in _bundle_files(root)}
    versions = library_versions()
    manifest = Manifest(
        path=root,
        format_version=FORMAT_VERSION,
        run_id=run_id,
        config_hash=config_hash,
        as_of=as_of.isoformat() if isinstance(as_of, dt.date) else str(as_of),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        segspark_version=versions["segspark"],
        models=tuple(models),
        training_data=_jsonable(dict(training_data), "training_data"),
        libraries=versions,
        files=files,
        content_sha256=_content_hash(files),
        extra=_jsonable(dict(extra or {}), "extra"),
    )
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    if signing is not None:
        _atomic_write(root / SIGNATURE_NAME, signing.sign(text.encode("utf-8")) + "\n")
    else:  # a signature left by an earlier attempt would not match this manifest
        (root / SIGNATURE_NAME).unlink(missing_ok=True)
    _atomic_write(root / MANIFEST_NAME, text)
    total = sum(e.size for e in files.values())
    log.info(
        "bundle %s: manifest written (%d files, %d bytes, content %s)%s",
        root,
        len(files),
        total,
        manifest.content_sha256[:12],
        f", signed with the key in {signing.source}" if signing is not None else "",
    )
    return manifest


def open_bundle(
    bundle_dir: str | os.PathLike[str], *, verify: bool = True, signing: SigningKey | None = None
) -> Manifest:
    """Read manifest.json and (by default) check every file against it; BundleError names each problem.

    verify=False only reads the manifest (for listing bundles); never score without verifying.
    signing: the configured key (`signing_key_from_env`); the manifest's signature is checked before
    anything in it is used, with or without `verify`. None: signatures are not checked.
    """
    root = bundle_path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist (check the path given for the bundle)")
    where = root / MANIFEST_NAME
    try:
        raw = where.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise BundleError(
            f"{where} is missing: {root} is not a finished bundle (training writes the manifest last, so a "
            "run that failed or is still running leaves none). Retrain, or point to another bundle."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where} cannot be read ({exc}); check the file's permissions, or retrain") from None
    if signing is not None:
        _check_signature(root, raw, signing)
    elif (root / SIGNATURE_NAME).exists():
        log.info("bundle %s is signed, but no key is configured (%s): signature not checked", root, SIGNING_SETTING)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BundleError(
            f"{where} is not valid JSON ({exc}); the file was damaged or edited. Retrain."
        ) from None
    if not isinstance(doc, dict):
        raise BundleError(
            f"{where} holds a JSON {type(doc).__name__}, expected an object: not a segspark manifest"
        )
    try:
        manifest = Manifest.from_dict(doc, root)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{where} is not a segspark manifest ({type(exc).__name__}: {exc}); the file was damaged or edited. Retrain."
        ) from None
    if verify:
        _verify(manifest)
        for name, (trained, installed) in manifest.library_mismatches().items():
            log.warning("bundle %s was trained with %s %s; installed is %s", root, name, trained, installed)
    return manifest


def _verify(manifest: Manifest) -> None:
    root = manifest.path
    present = set(_bundle_files(root))
    expected = set(manifest.files)
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    escaping = _links_outside(root)
    changed = []
    for rel in sorted(expected & present):
        want = manifest.files[rel]
        got = _hash_file(root / rel)
        if got != want:
            changed.append(
                f"{rel} (sha256 {got.sha256[:12]}.. size {got.size}, expected {want.sha256[:12]}.. size {want.size})"
            )
    if not (missing or unexpected or changed or escaping):
        log.info("bundle %s verified: %d files, content %s", root, len(present), manifest.content_sha256[:12])
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {', '.join(missing)}")
    if changed:
        parts.append(f"{len(changed)} changed: {', '.join(changed)}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the manifest: {', '.join(unexpected)}")
    if escaping:
        parts.append(f"{len(escaping)} link(s) to outside the bundle: {', '.join(escaping)}")
    raise BundleError(
        f"bundle {root} does not match its manifest (run {manifest.run_id}): {'; '.join(parts)}. "
        "A bundle must not be changed after training; restore it from where it was copied, or retrain."
    )


# --- helpers -------------------------------------------------------------------------------------


def bundle_path(bundle_dir: str | os.PathLike[str]) -> Path:
    """A bundle location as a local Path: plain paths (FUSE mounts included) and file: URIs."""
    text = os.fspath(bundle_dir)
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise BundleError(f"bundle path {text!r} names a remote host; use a local path")
        return Path(unquote(parsed.path))
    if _SCHEME.match(text):
        hint = (
            " (on Databricks use the FUSE path: /dbfs/... or /Volumes/...)"
            if text.startswith("dbfs:")
            else ""
        )
        raise BundleError(
            f"bundle path {text!r} is a URI: bundles must be on a local or FUSE-mounted path for now{hint}. "
            "Copy the bundle to local disk, or use a mounted path."
        )
    return Path(text)


def _links_outside(root: Path) -> list[str]:
    """Symbolic links under root (files or directories) that resolve outside it: what they point at
    is no bundle file (a linked directory is not even walked, so no checksum would cover it)."""
    base = root.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                found.append(f"{path.relative_to(root).as_posix()} -> {os.readlink(path)}")
    return sorted(found)


def _bundle_files(root: Path) -> list[str]:
    """Relative posix paths of every file under root except the manifest, its signature and
    IGNORED_NAMES, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in IGNORED_NAMES]
        for name in filenames:
            if name in IGNORED_NAMES:
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, SIGNATURE_NAME):
                found.append(rel)
    return sorted(found)


def _hash_file(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(digest.hexdigest(), size)


def _content_hash(files: Mapping[str, FileEntry]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel].sha256}\n".encode())
    return digest.hexdigest()


def _atomic_write(target: Path, text: str) -> None:
    """Write through a temp file in the same directory and os.replace: readers see old or new, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any, key: str) -> Any:
    """Dates -> ISO strings, numpy scalars -> Python numbers; anything else not JSON -> TypeError naming the key."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _jsonable(value.item(), key)
    raise TypeError(
        f"manifest {key} is a {type(value).__name__} ({value!r}): expected JSON values, dates or numbers"
    )

"""Model bundle: manifest round trip, tamper detection, feature spec checks (Spark-free but one test)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from segspark.bundle.manifest import (
    FEATURE_SPEC_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    FeatureSpec,
    bundle_path,
    open_bundle,
    write_manifest,
)
from segspark.errors import UsageError

TRAIN_SCHEMA = StructType(
    [
        StructField("user_id", StringType()),
        StructField("recency_days", IntegerType()),
        StructField("frequency", LongType()),
        StructField("monetary", DoubleType()),
    ]
)
FEATURES = ["recency_days", "frequency", "monetary"]


def _write_bundle(root: Path) -> Path:
    """A bundle with files in each known subdirectory, including Spark-style hidden .crc and _SUCCESS."""
    files = {
        "prepare/prepare.json": '{"steps": []}',
        "models/kmeans.json": '{"centroids": [[0.0, 1.0]]}',
        "hdbscan/hdbscan.npz": b"\x93NUMPY\x00\x01",
        "mllib/kmeans/metadata/part-00000": '{"class": "KMeansModel"}',
        "mllib/kmeans/metadata/.part-00000.crc": b"crc\x00\x01",
        "mllib/kmeans/metadata/_SUCCESS": "",
        "mllib/kmeans/metadata/._SUCCESS.crc": b"crc",
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    FeatureSpec.from_schema(TRAIN_SCHEMA, FEATURES).write(root)
    write_manifest(
        root,
        run_id="r1",
        config_hash="c" * 64,
        as_of=dt.date(2024, 3, 31),
        training_data={"input": "/data/events", "last_event": dt.datetime(2024, 3, 31, 23, 0), "users": 400},
        models=["kmeans"],
        extra={"note": "test"},
    )
    return root


@pytest.fixture
def bundle(tmp_path) -> Path:
    return _write_bundle(tmp_path / "bundle")


def _error(bundle: Path) -> str:
    with pytest.raises(BundleError) as info:
        open_bundle(bundle)
    return str(info.value)


def test_manifest_round_trip_covers_every_file(bundle):
    manifest = open_bundle(bundle)
    assert isinstance(BundleError("x"), UsageError)  # the CLI exits 2 with the message alone
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.run_id == "r1" and manifest.as_of == "2024-03-31" and manifest.models == ("kmeans",)
    assert manifest.training_data["last_event"] == "2024-03-31T23:00:00"
    assert manifest.extra == {"note": "test"}
    assert "mllib/kmeans/metadata/._SUCCESS.crc" in manifest.files
    assert "mllib/kmeans/metadata/_SUCCESS" in manifest.files
    assert FEATURE_SPEC_NAME in manifest.files and MANIFEST_NAME not in manifest.files
    assert list(manifest.files) == sorted(manifest.files)
    libs = manifest.libraries
    assert {"python", "pyspark", "scikit-learn", "hdbscan", "numba", "tensorflow", "keras", "deltalake"} <= set(libs)
    assert all(isinstance(v, str) and v for v in libs.values())
    assert len(manifest.content_sha256) == 64
    doc = json.loads((bundle / MANIFEST_NAME).read_text())
    assert doc["created_at"].endswith("+00:00")
    assert not [p.name for p in bundle.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file
    assert manifest.feature_spec().names == FEATURES


def test_changed_byte_names_the_file(bundle):
    target = bundle / "hdbscan" / "hdbscan.npz"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    message = _error(bundle)
    assert "1 changed: hdbscan/hdbscan.npz (sha256" in message
    assert "expected" in message and "missing" not in message


def test_changed_crc_file_is_detected(bundle):
    (bundle / "mllib/kmeans/metadata/.part-00000.crc").write_bytes(b"other")
    assert "changed: mllib/kmeans/metadata/.part-00000.crc" in _error(bundle)


def test_deleted_file_is_named(bundle):
    (bundle / "mllib/kmeans/metadata/_SUCCESS").unlink()
    assert "1 missing: mllib/kmeans/metadata/_SUCCESS" in _error(bundle)


def test_unexpected_file_is_an_error_but_desktop_litter_is_not(bundle):
    (bundle / ".DS_Store").write_bytes(b"finder")
    (bundle / "mllib" / ".DS_Store").write_bytes(b"finder")
    open_bundle(bundle)  # ignored names pass
    (bundle / "mllib/kmeans/metadata/part-00001").write_text("{}")
    message = _error(bundle)
    assert "1 not in the manifest: mllib/kmeans/metadata/part-00001" in message


def test_missing_and_malformed_manifest(bundle, tmp_path):
    manifest = bundle / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text("{not json")
    assert "not valid JSON" in _error(bundle)
    doc = json.loads(text)
    manifest.write_text(json.dumps({**doc, "format_version": FORMAT_VERSION + 1}))
    assert "newer segspark" in _error(bundle)
    manifest.write_text(json.dumps({k: v for k, v in doc.items() if k != "files"}))
    assert "malformed" in _error(bundle) and "'files'" in _error(bundle)
    manifest.write_text("[]")
    assert "expected an object" in _error(bundle)
    manifest.unlink()
    assert "manifest.json is missing" in _error(bundle)
    assert "does not exist" in str(pytest.raises(BundleError, open_bundle, tmp_path / "nope").value)


def test_manifest_needs_the_feature_spec(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="no feature_spec.json"):
        write_manifest(
            tmp_path / "b", run_id="r", config_hash="c", as_of="2024-01-01", training_data={}, models=[]
        )


def test_paths_local_file_uri_and_refused_schemes(tmp_path):
    assert bundle_path(f"file://{tmp_path}") == tmp_path
    assert bundle_path("/dbfs/mnt/bundles/r1") == Path("/dbfs/mnt/bundles/r1")
    for uri in ("s3://bucket/bundles/r1", "abfss://c@acct.dfs.core.windows.net/b", "dbfs:/mnt/b"):
        with pytest.raises(BundleError, match="local or FUSE-mounted path"):
            bundle_path(uri)
    with pytest.raises(BundleError, match=r"/dbfs/\.\.\."):
        open_bundle("dbfs:/mnt/b")


# --- feature spec --------------------------------------------------------------------------------


def _schema(**types) -> StructType:
    return StructType([StructField(name, t) for name, t in types.items()])


SPEC = FeatureSpec.from_schema(TRAIN_SCHEMA, FEATURES)


def test_feature_spec_json_round_trip():
    assert SPEC.features == (("recency_days", "int"), ("frequency", "bigint"), ("monetary", "double"))
    assert FeatureSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(BundleError, match="not a valid feature spec"):
        FeatureSpec.from_json('{"features": [{"nam": "x"}]}')
    with pytest.raises(BundleError, match="not in the training schema: tenure_days"):
        FeatureSpec.from_schema(TRAIN_SCHEMA, ["tenure_days"])


def test_feature_spec_accepts_exact_widened_and_extra_columns():
    SPEC.check(TRAIN_SCHEMA)
    widened = _schema(
        user_id=StringType(),
        recency_days=IntegerType(),
        frequency=IntegerType(),
        monetary=LongType(),
        extra_col=StringType(),
    )
    SPEC.check(widened)
    assert SPEC.casts(widened) == {"frequency": "bigint", "monetary": "double"}
    assert SPEC.casts(TRAIN_SCHEMA) == {}


def test_feature_spec_check_lists_every_problem_in_one_message():
    data = _schema(
        user_id=StringType(), Recency_Days=IntegerType(), frequency=DoubleType(), monetary=StringType()
    )
    with pytest.raises(BundleError) as info:
        SPEC.check(data)
    message = str(info.value)
    assert "1 missing column(s): recency_days (found 'Recency_Days': names are case-sensitive)" in message
    assert (
        "2 column(s) with another type: frequency is double, expected bigint; monetary is string, expected double"
        in message
    )
    assert "Accepted type differences" in message and "int -> bigint" in message


def test_feature_spec_refuses_narrowing():
    data = _schema(recency_days=LongType(), frequency=LongType(), monetary=DoubleType())
    with pytest.raises(BundleError, match="recency_days is bigint, expected int"):
        SPEC.check(data)


# --- one real MLlib save ------------------------------------------------------------------------


def test_mllib_model_directory_round_trip(spark, tmp_path):
    from pyspark.ml.clustering import KMeans, KMeansModel
    from pyspark.ml.linalg import Vectors

    df = spark.createDataFrame(
        [(Vectors.dense([float(i % 2), float(i)]),) for i in range(8)], ["features"]
    ).coalesce(1)
    root = tmp_path / "bundle"
    model = KMeans(k=2, seed=1, maxIter=1, initMode="random").fit(df)
    model.write().save(str(root / "mllib" / "kmeans"))
    FeatureSpec((("a", "double"), ("b", "double"))).write(root)
    written = write_manifest(
        root, run_id="r", config_hash="c", as_of="2024-01-01", training_data={}, models=["kmeans"]
    )

    crc = [rel for rel in written.files if rel.endswith(".crc")]
    assert crc and any(rel.endswith("_SUCCESS") for rel in written.files)
    assert open_bundle(root).content_sha256 == written.content_sha256
    assert KMeansModel.load(str(root / "mllib" / "kmeans")).clusterCenters()[0].shape == (2,)

    (root / crc[0]).unlink()
    with pytest.raises(BundleError, match="1 missing: " + crc[0].replace(".", r"\.")):
        open_bundle(root)


# --- paths read from a bundle stay inside it ------------------------------------------------------


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _rechecksum(root: Path, **fields) -> None:
    """What someone who edits a bundle does next: a new manifest whose checksums match the edit."""
    old = open_bundle(root, verify=False)
    write_manifest(root, run_id=old.run_id, config_hash=old.config_hash, as_of=old.as_of,
                   training_data=old.training_data, models=list(old.models), **fields)


def test_paths_read_from_a_bundle_are_confined_to_it(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-00000").write_text("{}")
    manifest = open_bundle(bundle)
    assert manifest.file("models/kmeans.json", what="x") == (bundle / "models/kmeans.json").resolve()
    assert manifest.directory("mllib/kmeans", what="x") == (bundle / "mllib/kmeans").resolve()
    refused = {
        str(outside): "absolute path",
        f"file://{outside}": "absolute path or URI",
        "../outside": "climbs out",
        "mllib/../../outside": "climbs out",
        "": "expected a path relative",
        "models/other.json": "does not list",
    }
    for rel, reason in refused.items():
        with pytest.raises(BundleError, match=reason) as info:
            manifest.file(rel, what="fitted.model of models/kmeans.json")
        assert "fitted.model of models/kmeans.json" in str(info.value)
    with pytest.raises(BundleError, match="a directory with no file in the manifest"):
        manifest.directory("mllib/gmm", what="x")
    # A link inside the bundle that resolves outside it: refused as a path, and by verification.
    (bundle / "mllib" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="resolves to .*outside the bundle"):
        manifest.directory("mllib/linked", what="x")
    assert "1 link(s) to outside the bundle: mllib/linked -> " in _error(bundle)


def test_load_fitted_refuses_a_model_path_outside_the_bundle(bundle, tmp_path):
    from segspark.bundle.models import load_fitted

    elsewhere = tmp_path / "elsewhere" / "model"
    elsewhere.mkdir(parents=True)
    for target in (str(elsewhere), "../elsewhere/model"):
        document = {"model": "kmeans", "fitted": {"model": target}, "segment_ids": {"0": 0}, "segment_names": {"0": "a"}}
        (bundle / "models/kmeans.json").write_text(json.dumps(document))
        _rechecksum(bundle)  # the checksums match the edit: only confinement stops it
        manifest = open_bundle(bundle)
        for given in (manifest, None):  # with the verified manifest, and confined to the folder alone
            with pytest.raises(BundleError, match=r"models/kmeans.json fitted.model \(an MLlib model directory\)"):
                load_fitted("kmeans", str(bundle), given)
    with pytest.raises(BundleError, match="model '../x' is not one segspark knows"):
        load_fitted("../x", str(bundle), manifest)


# --- signed manifests ------------------------------------------------------------------------------

KEY_ENV = "SEGSPARK_TEST_BUNDLE_KEY"


@pytest.fixture
def key(monkeypatch):
    from segspark.bundle.manifest import signing_key_from_env

    monkeypatch.setenv(KEY_ENV, "k" * 32)
    return signing_key_from_env(KEY_ENV)


def test_signed_manifest_verifies_and_an_edit_with_new_checksums_does_not(bundle, key, monkeypatch):
    from segspark.bundle.manifest import SIGNATURE_NAME, signing_key_from_env

    with pytest.raises(BundleError, match=rf"is not signed \(manifest.sig is missing\).*\${KEY_ENV}"):
        open_bundle(bundle, signing=key)
    _rechecksum(bundle, signing=key)
    assert (bundle / SIGNATURE_NAME).is_file() and SIGNATURE_NAME not in open_bundle(bundle).files
    assert open_bundle(bundle, signing=key).run_id == "r1"
    assert "k" * 32 not in repr(key)  # the key never shows in logs or messages

    # Someone rewrites a model file and the manifest's checksums (the signature stays as it was).
    target = bundle / "models/kmeans.json"
    target.write_text('{"centroids": [[9.0, 9.0]]}')
    doc = json.loads((bundle / MANIFEST_NAME).read_text())
    doc["files"]["models/kmeans.json"] = _entry(target)
    (bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    open_bundle(bundle)  # checksums alone no longer see it
    with pytest.raises(BundleError, match="manifest.sig does not match manifest.json .*rewrote files"):
        open_bundle(bundle, signing=key)
    with pytest.raises(BundleError, match="does not match"):
        open_bundle(bundle, verify=False, signing=key)  # checked even when files are not

    # Signed with another key.
    _rechecksum(bundle, signing=key)
    monkeypatch.setenv(KEY_ENV, "another key of 32 bytes or more!!")
    with pytest.raises(BundleError, match="signed with another key"):
        open_bundle(bundle, signing=signing_key_from_env(KEY_ENV))
    # An unsigned rewrite removes the stale signature rather than leaving one that cannot match.
    _rechecksum(bundle)
    assert not (bundle / SIGNATURE_NAME).exists()


def test_signing_key_must_be_in_the_environment(monkeypatch):
    from segspark.bundle.manifest import signing_key_from_env
    from segspark.errors import ConfigError

    assert signing_key_from_env(None) is None
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"bundle.signing_key_env='{KEY_ENV}'.*\${KEY_ENV} is not set"):
        signing_key_from_env(KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ConfigError, match="holds a 5-byte key; expected at least 16"):
        signing_key_from_env(KEY_ENV)

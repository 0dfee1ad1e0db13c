"""MLflow tracking against a local file store in tmp_path: what is logged is read back with MlflowClient."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segspark.config import MlflowConfig
from segspark.io.tracking import (
    BUNDLE_ARTIFACT_PATH,
    MAX_PARAM_VALUE,
    TRUNCATED,
    TrackingError,
    check_tracking,
    log_run,
    param_items,
)


@pytest.fixture
def mlflow(monkeypatch):
    # Not skipped when missing: scripts/setup.sh installs the mlflow extra, and CI must run these.
    import mlflow as module
    # MLflow 3.13+ refuses file stores unless opted in; a database store would need sqlalchemy + alembic.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return module


@pytest.fixture
def store(tmp_path) -> MlflowConfig:
    return MlflowConfig(tracking_uri=(tmp_path / "mlruns").as_uri())


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    (root / "mllib" / "kmeans" / "metadata").mkdir(parents=True)
    (root / "manifest.json").write_text('{"format_version": 1}')
    (root / "mllib" / "kmeans" / "metadata" / "part-00000").write_bytes(bytes(range(256)))
    (root / "mllib" / "kmeans" / "metadata" / ".part-00000.crc").write_bytes(b"crc")
    return root


def test_params_metrics_and_bundle_are_logged(mlflow, store, bundle, tmp_path):
    uri_before = mlflow.get_tracking_uri()
    params = {
        "input": {"path": "/data/ev", "format": "parquet"},
        "models": {"kmeans": {"k": 6, "enabled": True}, "autoencoder": {"hidden_layers": [64, 32]}},
        "output": {"catalog": None},
        **{f"extra.p{i}": i for i in range(150)},  # more than one batch of 100
    }
    metrics = {
        "rows": {"input": 1200, "clean": 1190},
        "silhouette": 0.42,
        "converged": True,
        "bic": float("nan"),
        "aic": float("inf"),
        "note": "text",
        "missing": None,
        "per_k": [0.1, 0.2],
    }
    run_id = log_run(
        store,
        run_id="run-1",
        experiment="seg-test",
        params=params,
        metrics=metrics,
        bundle_dir=bundle,
        tags={"team": "growth"},
    )

    assert run_id
    assert mlflow.get_tracking_uri() == uri_before  # no global state changed
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri)
    experiment = client.get_experiment_by_name("seg-test")
    [found] = client.search_runs([experiment.experiment_id], filter_string="tags.`segspark.run_id` = 'run-1'")
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    run = client.get_run(run_id)
    assert run.info.run_name == "run-1"
    assert run.data.tags["team"] == "growth" and run.data.tags["segspark.version"]
    data = run.data.params
    assert data["input.path"] == "/data/ev" and data["models.kmeans.k"] == "6"
    assert data["models.kmeans.enabled"] == "true" and data["output.catalog"] == "null"
    assert data["models.autoencoder.hidden_layers"] == "[64, 32]"
    assert data["extra.p149"] == "149" and len(data) == 6 + 150
    assert run.data.metrics == {
        "rows.input": 1200.0,
        "rows.clean": 1190.0,
        "silhouette": 0.42,
        "converged": 1.0,
    }

    listed = {f.path for f in client.list_artifacts(run_id, "bundle/mllib/kmeans/metadata")}
    assert listed == {
        "bundle/mllib/kmeans/metadata/part-00000",
        "bundle/mllib/kmeans/metadata/.part-00000.crc",
    }
    assert "bundle/manifest.json" in {f.path for f in client.list_artifacts(run_id, "bundle")}
    (tmp_path / "dl").mkdir()  # MLflow 2.x needs the destination to exist
    local = client.download_artifacts(run_id, "bundle/mllib/kmeans/metadata/part-00000", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == bytes(range(256))


def test_long_param_values_are_truncated(mlflow, store):
    long = "x" * (MAX_PARAM_VALUE + 500)
    run_id = log_run(store, run_id="r", params={"big": long, "ok": "y"}, metrics={}, bundle_dir=None)
    value = mlflow.MlflowClient(tracking_uri=store.tracking_uri).get_run(run_id).data.params["big"]
    assert len(value) == MAX_PARAM_VALUE and value.endswith(TRUNCATED)


def test_param_keys_are_made_acceptable():
    items = param_items({"a": {"b:c@d": 1}, "/lead": 2, "x/../y": 3, "k" * 300: 4})
    assert set(items) >= {"a.b_c_d", "_/lead", "x/_/y"}
    assert max(len(k) for k in items) == 250


def test_a_failure_ends_the_run_as_failed(mlflow, store, bundle, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("artifact store down")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifacts", boom)
    with pytest.raises(RuntimeError, match="artifact store down"):
        log_run(store, run_id="r-fail", params={"a": 1}, metrics={"m": 1.0}, bundle_dir=bundle)
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri)
    experiment = client.get_experiment_by_name("segspark")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.data.params == {"a": "1"}


def test_missing_bundle_dir_fails_the_run_with_a_clear_error(mlflow, store, tmp_path):
    with pytest.raises(TrackingError, match="is not a directory"):
        log_run(store, run_id="r", params={}, metrics={}, bundle_dir=tmp_path / "nope")


def test_file_store_refusal_is_explained(mlflow, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    from mlflow.store.tracking.file_store import FileStore

    try:
        FileStore(str(Path(store.tracking_uri.removeprefix("file://")) / "probe"))
    except mlflow.exceptions.MlflowException:
        with pytest.raises(TrackingError, match="MLFLOW_ALLOW_FILE_STORE=true"):
            check_tracking(store)
    else:  # MLflow before 3.13 still opens file stores
        check_tracking(store)


def test_missing_mlflow_is_a_clear_error(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(TrackingError, match=r"pip install 'segspark\[mlflow\]'"):
        log_run(store, run_id="r", params={}, metrics={}, bundle_dir=None)


def test_no_tracking_uri_does_nothing_and_imports_no_mlflow():
    code = textwrap.dedent(
        """
        import sys
        from segspark.config import MlflowConfig
        from segspark.io.tracking import check_tracking, log_run
        check_tracking(MlflowConfig())
        assert log_run(MlflowConfig(), run_id="r", params={"a": 1}, metrics={"m": 1.0}, bundle_dir="/nope") is None
        assert "mlflow" not in sys.modules, "mlflow was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_metric_filter_edge_cases():
    from segspark.io.tracking import metric_items

    assert metric_items({"a": 1, "b": -math.inf, "c": {"d": 2.5}, "e": False}) == {
        "a": 1.0,
        "c.d": 2.5,
        "e": 0.0,
    }


def test_sqlite_artifacts_go_next_to_the_database(tmp_path, monkeypatch):
    from segspark.io.tracking import default_artifact_location

    assert (
        default_artifact_location(f"sqlite:///{tmp_path}/db/mlflow.db")
        == (tmp_path / "db" / "mlartifacts").as_uri()
    )
    monkeypatch.chdir(tmp_path)
    assert default_artifact_location("sqlite:///mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("sqlite:///:memory:") is None
    assert default_artifact_location("http://mlflow:5000") is None
    assert default_artifact_location((tmp_path / "mlruns").as_uri()) is None


def test_database_store_without_sqlalchemy_is_explained(mlflow, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a)
    )
    with pytest.raises(TrackingError, match="pip install sqlalchemy alembic"):
        check_tracking(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))


def test_a_pipeline_run_logs_its_params_metrics_and_bundle(spark, mlflow, tmp_path, sample_parquet):
    from segspark import usecases
    from segspark.config import load_config

    from .conftest import FAST_MODELS, REPO

    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(
        REPO / "conf/local.yaml",
        [f"input.path={sample_parquet}/events", f"output.root={tmp_path / 'out'}", *FAST_MODELS,
         "models.kmeans.k=3", "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false",
         "models.autoencoder.enabled=false", f"mlflow.tracking_uri={uri}", "mlflow.experiment=segments"],
    )
    result = usecases.run(spark, cfg, run_id="tracked")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["models.kmeans.k"] == "3" and run.data.params["input.path"].endswith("events")
    assert run.data.metrics["kmeans.k"] == 3
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/feature_spec.json", "bundle/models"} <= logged
    assert client.get_experiment(run.info.experiment_id).name == "segments"


def test_secrets_in_params_never_reach_mlflow(mlflow, store):
    params = {"spark": {"conf": {"fs.s3a.secret.key": "s3-secret-3", "spark.sql.shuffle.partitions": "8"},
                        "remote": "sc://h:15002/;token=connect-tok-3"},
              "spark.conf.fs.azure.account.key.acct.dfs.core.windows.net": "azure-key-3"}
    run_id = log_run(store, run_id="r", params=params, metrics={}, bundle_dir=None,
                     tags={"source": "https://u:tag-pass-3@host/x"})
    run = mlflow.MlflowClient(tracking_uri=store.tracking_uri).get_run(run_id)
    logged = json.dumps([run.data.params, run.data.tags])
    assert not any(s in logged for s in ("s3-secret-3", "connect-tok-3", "azure-key-3", "tag-pass-3"))
    assert run.data.params["spark.conf.spark.sql.shuffle.partitions"] == "8"
    assert run.data.params["spark.remote"] == "sc://h:15002/;token=***"


def test_bundle_goes_to_mlflow_without_per_user_samples_unless_asked(mlflow, store, bundle, tmp_path):
    from segspark.models.deep.model import PER_USER_FILES

    for name in PER_USER_FILES:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(b"embedding points of users")
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri)

    def logged(run_id):
        found, folders = set(), [BUNDLE_ARTIFACT_PATH]
        while folders:
            for entry in client.list_artifacts(run_id, folders.pop()):
                (folders.append if entry.is_dir else found.add)(entry.path)
        return found

    default = log_run(store, run_id="r1", params={}, metrics={}, bundle_dir=bundle)
    files = logged(default)
    assert "bundle/manifest.json" in files and "bundle/mllib/kmeans/metadata/part-00000" in files
    assert not any(f"bundle/{name}" in files for name in PER_USER_FILES)
    assert "log_samples" in client.get_run(default).data.tags["segspark.bundle_left_out"]
    assert all((bundle / name).exists() for name in PER_USER_FILES)  # the bundle itself is untouched

    asked = log_run(MlflowConfig(tracking_uri=store.tracking_uri, log_samples=True), run_id="r2", params={},
                    metrics={}, bundle_dir=bundle)
    assert {f"bundle/{name}" for name in PER_USER_FILES} <= logged(asked)
    assert "segspark.bundle_left_out" not in client.get_run(asked).data.tags

"""MLflow tracking of pipeline runs: params, metrics and the model bundle, only when configured.

Why it looks like this:
- MLflow is an optional extra (`pip install 'segspark[mlflow]'`). With `mlflow.tracking_uri`
  unset nothing here imports it, so runs without tracking pay nothing.
- Everything goes through an `MlflowClient` built for the configured URI; the fluent API
  (`mlflow.start_run`, `mlflow.set_tracking_uri`) keeps process-global state, and a library must
  not change the caller's tracking URI or leave an active run behind. The run is always ended: FINISHED,
  or FAILED when logging fails half way (then the error is raised again).
- MLflow's limits are applied here rather than discovered as a failed batch at the end of a long
  run: at most 100 params per log_batch call, param values of at most 6,000 characters (truncated
  with a marker, logged), keys limited to the characters MLflow accepts, metrics only finite numbers.
- MLflow 3.13+ refuses the file store (`file:` URIs, plain paths) unless MLFLOW_ALLOW_FILE_STORE=true;
  that is the user's decision, so it surfaces as a TrackingError saying so. Database stores
  (sqlite:///...) need SQLAlchemy and Alembic, which mlflow-skinny lacks: also a TrackingError.
  `check_tracking` opens the store up front so that a pipeline can fail at the start instead of
  after the models are fitted.
- With a SQLite store, a new experiment keeps its artifacts beside the database file rather than
  in ./mlruns of whatever directory the job happens to run in.
- Params and tags pass through the one redaction (segspark.runtime.redaction) whoever calls, so `spark.conf`
  keys such as fs.s3a.secret.key never reach the server; URIs in messages are redacted the same way.
- A tracking server is often readable by more people than the tables: the bundle's per-user files
  (models.deep.PER_USER_FILES, HDBSCAN's fitting sample of embeddings) are left out of the upload
  unless `mlflow.log_samples` is true; the run's tag segspark.bundle_left_out names them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segspark.config import MlflowConfig
from segspark.errors import UsageError
from segspark.runtime.redaction import redact, redact_text

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # MLflow's MAX_PARAM_VAL_LENGTH (2.16 through 3.17)
MAX_TAG_VALUE = 5000  # MLflow 2.x limit (3.x allows 8,000)
MAX_KEY = 250
BUNDLE_ARTIFACT_PATH = "bundle"
TRUNCATED = "...[truncated]"
_DATABASE_SCHEMES = frozenset({"sqlite", "postgresql", "mysql", "mssql"})
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")  # MLflow accepts alphanumerics, _ - . space and /


class TrackingError(UsageError):
    """MLflow tracking is configured but cannot be used as configured (exit 2)."""


def log_run(
    tracking: MlflowConfig,
    *,
    run_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    bundle_dir: str | os.PathLike[str] | None,
    experiment: str = "segspark",
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Log one pipeline run to MLflow; returns the MLflow run id, or None when tracking is off.

    params: redacted (segspark.runtime.redaction), nested dicts flattened with dotted keys (the resolved
    config fits as is); values are stringified (JSON for non-strings) and truncated to MLflow's limit.
    metrics: flattened the same way; finite numbers are logged (bools as 0/1), None, NaN, inf,
    strings and lists are skipped (logged at debug level).
    bundle_dir: logged as artifacts under "bundle/" (the directory, manifest included; its per-user
    files only with tracking.log_samples).
    tags: added to segspark.run_id and segspark.version.
    """
    if not tracking.tracking_uri:
        return None
    bundle = None if bundle_dir is None else os.fspath(bundle_dir)
    if bundle is not None and not os.path.isdir(bundle):
        raise TrackingError(f"bundle_dir {bundle!r} is not a directory: cannot log the bundle to MLflow")
    client = _client(tracking.tracking_uri)
    experiment_id = _experiment_id(client, experiment, tracking.tracking_uri)

    from segspark import __version__

    all_tags = redact({
        "segspark.run_id": run_id,
        "segspark.version": __version__,
        **{str(k): v for k, v in (tags or {}).items()},
    })
    run = client.create_run(
        experiment_id,
        tags={_key(k): _truncate(_text(v), MAX_TAG_VALUE) for k, v in all_tags.items()},
        run_name=run_id,
    )
    mlflow_run_id: str = run.info.run_id
    try:
        _log_params(client, mlflow_run_id, redact(params))
        _log_metrics(client, mlflow_run_id, metrics)
        if bundle is not None:
            _log_bundle(client, mlflow_run_id, bundle, tracking.log_samples)
    except BaseException:
        try:
            client.set_terminated(mlflow_run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - keep the original error; this one is secondary
            log.warning("could not mark MLflow run %s as FAILED", mlflow_run_id, exc_info=True)
        raise
    client.set_terminated(mlflow_run_id, status="FINISHED")
    log.info(
        "MLflow run %s logged to %s (experiment %r)",
        mlflow_run_id,
        redact_text(tracking.tracking_uri),
        experiment,
    )
    return mlflow_run_id


def _log_bundle(client: MlflowClient, run_id: str, bundle: str, log_samples: bool) -> None:
    """The bundle under "bundle/"; without log_samples, a copy without its per-user files."""
    from segspark.models.deep.model import PER_USER_FILES

    left_out = [] if log_samples else [name for name in PER_USER_FILES if os.path.exists(os.path.join(bundle, name))]
    if not left_out:
        client.log_artifacts(run_id, bundle, BUNDLE_ARTIFACT_PATH)
        return
    with tempfile.TemporaryDirectory(prefix="segspark-bundle-") as scratch:
        copy = os.path.join(scratch, "bundle")
        skipped = {os.path.normpath(os.path.join(bundle, name)) for name in left_out}
        shutil.copytree(bundle, copy, copy_function=_link_or_copy, ignore=lambda folder, names: [
            n for n in names if os.path.normpath(os.path.join(folder, n)) in skipped])
        client.log_artifacts(run_id, copy, BUNDLE_ARTIFACT_PATH)
    note = f"{', '.join(left_out)} (per-user embedding points; mlflow.log_samples: true logs them)"
    client.set_tag(run_id, "segspark.bundle_left_out", note)
    log.info("MLflow: bundle logged without %s; the manifest lists them, so the logged copy does not pass "
             "open_bundle: the bundle under output.root does", note)


def _link_or_copy(source: str, target: str) -> None:
    # A hard link costs no space; across file systems it fails and the file is copied.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def check_tracking(tracking: MlflowConfig) -> None:
    """Raise TrackingError now if tracking is configured but MLflow or its store cannot be used.

    Opens the store (a local store is created; a server is not contacted until the first call)."""
    if tracking.tracking_uri:
        _client(tracking.tracking_uri)


# --- flattening and limits -----------------------------------------------------------------------


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) for nested mappings; lists and other values are leaves."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def param_items(params: Mapping[str, Any], limit: int = MAX_PARAM_VALUE) -> dict[str, str]:
    """Flattened params as MLflow accepts them: clean keys, string values of at most `limit` chars."""
    out: dict[str, str] = {}
    truncated = []
    for key, value in flatten(params):
        text = _text(value)
        if len(text) > limit:
            truncated.append(key)
            text = _truncate(text, limit)
        out[_key(key)] = text
    if truncated:
        log.warning("MLflow params truncated to %d characters: %s", limit, ", ".join(truncated))
    return out


def metric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flattened metrics that are finite numbers (bools as 0/1); everything else is skipped."""
    out: dict[str, float] = {}
    skipped = []
    for key, value in flatten(metrics):
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            out[_key(key)] = float(value)
        else:
            skipped.append(f"{key}={value!r}"[:80])
    if skipped:
        log.debug("MLflow metrics skipped (not finite numbers): %s", ", ".join(skipped))
    return out


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except ValueError:  # circular structures
        return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no empty or '..' path segments, at most 250 chars."""
    cleaned = _BAD_KEY_CHARS.sub("_", key)
    cleaned = "/".join(part if part not in ("", ".", "..") else "_" for part in cleaned.split("/"))
    return cleaned[:MAX_KEY]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    entries = [Param(k, v) for k, v in param_items(params).items()]
    for chunk in _chunks(entries, PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, 0) for k, v in metric_items(metrics).items()]
    for chunk in _chunks(entries, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


# --- client --------------------------------------------------------------------------------------


def _client(uri: str) -> MlflowClient:
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise TrackingError(
            f"mlflow.tracking_uri is set ({redact_text(uri)}) but MLflow is not installed: "
            "pip install 'segspark[mlflow]', or unset mlflow.tracking_uri to run without tracking"
        ) from None
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise TrackingError(
            f"mlflow.tracking_uri {redact_text(uri)!r} is a database store, which needs SQLAlchemy and Alembic "
            "besides mlflow-skinny: pip install sqlalchemy alembic (or the full mlflow package)"
        )
    try:
        return MlflowClient(tracking_uri=uri)
    except ImportError as exc:
        raise TrackingError(
            f"mlflow.tracking_uri {redact_text(uri)!r} needs a package that is not installed ({exc}); "
            "install it or use another tracking URI"
        ) from None
    except MlflowException as exc:
        hint = ""
        if "MLFLOW_ALLOW_FILE_STORE" in str(exc):
            hint = (
                " MLflow 3.13+ refuses file stores by default: set the environment variable "
                "MLFLOW_ALLOW_FILE_STORE=true, or use a database store such as sqlite:///path/mlflow.db "
                "(needs sqlalchemy and alembic) or a tracking server (http://...)."
            )
        raise TrackingError(
            f"mlflow.tracking_uri {redact_text(uri)!r} cannot be opened: {_first_line(exc)}.{hint}"
        ) from None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(uri))
        except MlflowException:  # created meanwhile by a concurrent run
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} at {redact_text(uri)} is deleted: restore it (mlflow experiments restore) "
            "or log to another experiment"
        )
    return found.experiment_id


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite database, else MLflow's default.

    With sqlite:///..., MLflow would put artifacts under ./mlruns of whatever directory the
    process runs in (a spark-submit or notebook working directory); beside the database they stay
    with the runs that point to them. Servers and file stores choose their own location (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlartifacts").as_uri()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__

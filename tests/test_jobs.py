"""jobs/*.py under a real spark-submit: the JVM's session is used, exit codes come through.

spark-submit merges the Python driver's stderr into its stdout (PythonRunner), so segspark's log
and error lines are looked for in both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deltalake import DeltaTable
from pyspark.find_spark_home import _find_spark_home

from .conftest import REPO


def _spark_submit(job: str, *args: str, conf: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # PYTHONPATH: the driver imports this checkout's segspark (an editable install may name another).
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}
    env.pop("SPARK_REMOTE", None)
    command = [
        os.path.join(_find_spark_home(), "bin", "spark-submit"), "--master", "local[2]", "--driver-memory", "1g",
        "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false", *[x for c in conf for x in ("--conf", c)], str(REPO / "jobs" / job), *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_features_job_under_spark_submit(sample_parquet, tmp_path):
    done = _spark_submit(
        "features.py", "--config", str(REPO / "conf/local.yaml"), "--run-id", "submitted",
        "--set", f"input.path={sample_parquet}/events", f"output.root={tmp_path}",
        conf=("spark.sql.shuffle.partitions=3",),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "run submitted succeeded" in done.stdout
    assert "started SparkSession" in output and "master local[2])" in output  # spark-submit's session
    # The job's start-up lines: the master, the executors and their Python; conf/local.yaml's 4g driver
    # memory is not applied over the submit line's 1g, with a warning.
    assert "cluster: Spark " in output and "cluster: executors: 1, 2 cores: driver on " in output
    assert "cluster: executor Python on " in output and f": {sys.executable} (Python " in output
    assert "config ignored for spark.driver.memory (config 4g, in effect 1g)" in output
    runs = DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()
    assert [(r["run_id"], r["status"]) for r in runs] == [("submitted", "succeeded")]
    # spark.shuffle_partitions `auto` yields to the submit line's spark.sql.shuffle.partitions
    assert "shuffle_partitions" not in json.loads(runs[0]["metrics"])


def test_a_bad_config_fails_the_submitted_job_with_exit_2(tmp_path):
    done = _spark_submit("pipeline.py", "--config", str(tmp_path / "missing.yaml"))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "missing.yaml" in output and "Traceback" not in output

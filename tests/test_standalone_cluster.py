"""jobs/*.py submitted to a real Spark standalone cluster, with the executors' Python shipped as an archive.

A master and one worker (2 cores) are started from the pyspark installation on 127.0.0.1, with their
work and log folders under the test's tmp folder. The executor runs in a JVM of its own, apart from
the driver's, with two Python workers: nothing may depend on driver-local state (this run replaces the
suite's earlier `local-cluster[2,1,1024]` run, which tested that without the shipped environment; two
executors of one core each cost another JVM and unpacked archive per job, 44 s more in the suite).
scripts/package.sh builds segspark's wheel and the packed executor environment
(dist/segspark-env.tar.gz; reused while nothing that goes into it changed). `jobs/pipeline.py`, then
`jobs/score.py` with the bundle the first wrote, are submitted in client mode with `--archives dist/segspark-env.tar.gz#environment` and
`spark.pyspark.python=./environment/bin/python`; the driver runs the project's interpreter. The
executors' Python, as reported from inside a task by the job's start-up lines, must be the unpacked
archive in the worker's work folder, never the project's .venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.compute as pc
import pyspark
import pytest
from deltalake import DeltaTable
from pyspark.find_spark_home import _find_spark_home

from .conftest import FAST_MODELS, REPO

pytestmark = pytest.mark.slow

# Kept short: k fixed. Every model runs: the k-means sample fit (scikit-learn in mapInPandas), the GMM
# (mapInPandas, pandas_udf) and the deep model (numpy encoder + HDBSCAN in mapInArrow) run Python on the
# executors, the bisecting k-means runs MLlib's jobs.
QUICK = ("models.kmeans.k=3", "models.gmm.k=3", "models.bisecting_kmeans.k=3", "spark.shuffle_partitions=4")
MODELS = {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"}
# Variables of the surrounding shell that would point Spark or Python elsewhere.
CLEARED = ("SPARK_REMOTE", "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON",
           "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SPARK_CONF_DIR", "SPARK_HOME", "SPARK_LOCAL_DIRS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(spark_home: str, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    conf_dir = scratch / "conf"  # empty: no spark-defaults.conf or spark-env.sh from elsewhere
    conf_dir.mkdir(exist_ok=True)
    local_dirs = scratch / "local"
    local_dirs.mkdir(exist_ok=True)
    env.update(SPARK_HOME=spark_home, SPARK_LOCAL_IP="127.0.0.1", SPARK_CONF_DIR=str(conf_dir),
               SPARK_LOCAL_DIRS=str(local_dirs), SPARK_LOG_DIR=str(scratch / "logs"))
    return env


def _stop(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group (a worker's executors and their Python workers are in it), then
    SIGKILL to whatever is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group, even when its leader already exited
    process.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


@pytest.fixture(scope="module")
def packaged():
    """scripts/package.sh: the wheel and the executors' environment under dist/ (built once, then reused
    while the lock, segspark's code and the interpreter are the same)."""
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "scripts" / "package.sh")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "SEGSPARK_VENV": sys.prefix}, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    archive = REPO / "dist" / "segspark-env.tar.gz"
    assert archive.is_file() and list((REPO / "dist").glob("segspark-*.whl")), done.stdout
    # Unless reused: the KD-tree's machine code went into the archive, and loads from another folder.
    assert "reused" in done.stdout or "numba KD-tree: compiled ahead, loaded from another folder" in done.stdout, done.stdout
    print(f"\npackage.sh: {time.monotonic() - started:.1f} s\n{done.stdout}")
    return archive


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master and one worker (2 cores, 1.5 GB) on 127.0.0.1; stopped, with their
    executors, however the test ends. Yields (master URL, worker work folder)."""
    scratch = tmp_path_factory.mktemp("standalone")
    spark_home = _find_spark_home()
    env = _base_env(spark_home, scratch)
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    port, ui_port = _free_port(), _free_port()
    work_dir = scratch / "work"
    logs = {name: scratch / f"{name}.log" for name in ("master", "worker")}
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(logs[name], "w") as log:
            processes.append(subprocess.Popen([spark_class, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                              cwd=scratch, start_new_session=True))

    def failed(message: str) -> None:
        pytest.fail(f"{message}\n--- master ---\n{_tail(logs['master'])}\n--- worker ---\n{_tail(logs['worker'])}")

    try:
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
              "--webui-port", str(ui_port))
        master = f"spark://127.0.0.1:{port}"
        start("worker", "org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1",
              "--port", str(_free_port()), "--webui-port", str(_free_port()), "--cores", "2", "--memory", "1536m",
              "--work-dir", str(work_dir))
        deadline = time.monotonic() + 180
        while True:  # the master's status page lists the worker once it registered
            for process, name in zip(processes, ("master", "worker"), strict=True):
                if process.poll() is not None:
                    failed(f"the {name} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
                    status = json.load(response)
                if status.get("aliveworkers", 0) >= 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                failed("the worker did not register with the master within 180 s")
            time.sleep(1)
        yield master, work_dir
    finally:
        for process in reversed(processes):  # the worker (and its executors) first
            _stop(process)


def _submit(cluster, archive: Path, scratch: Path, job: str, *args: str) -> str:
    """spark-submit a jobs/*.py in client mode; returns its output (stdout and stderr)."""
    master, _ = cluster
    spark_home = _find_spark_home()
    env = _base_env(spark_home, scratch)
    env["PYTHONPATH"] = str(REPO)  # the driver imports this checkout's segspark
    command = [
        os.path.join(spark_home, "bin", "spark-submit"), "--master", master, "--deploy-mode", "client",
        "--driver-memory", "1g", "--executor-memory", "1g", "--total-executor-cores", "2",
        "--archives", f"{archive}#environment",
        "--conf", "spark.pyspark.python=./environment/bin/python",
        "--conf", f"spark.pyspark.driver.python={sys.executable}",
        "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
        str(REPO / "jobs" / job), *args,
    ]
    with open(scratch / f"{job}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=scratch,
                                   start_new_session=True)
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(process, grace=10)
    output = (scratch / f"{job}.log").read_text(errors="replace")
    assert process.returncode == 0, f"{job} exited with {process.returncode}:\n{output[-5000:]}"
    return output


def _executor_pythons(output: str) -> list[tuple[str, str, str]]:
    """(interpreter, prefix, segspark) from the job's start-up lines, one per host and interpreter."""
    pattern = re.compile(r"cluster: executor Python on \S+: (\S+) \(Python [\d.]+, prefix (\S+); segspark (.+)\)$")
    return [match.groups() for line in output.splitlines() if (match := pattern.search(line))]


def _check_shipped_python(output: str, work_dir: Path) -> None:
    pythons = _executor_pythons(output)
    assert pythons, "no executor Python reported:\n" + output[-4000:]
    work = str(work_dir.resolve())
    for executable, prefix, segspark in pythons:
        assert ".venv" not in executable and ".venv" not in prefix, f"an executor ran the project's .venv: {executable}"
        assert executable.startswith(work) and "/environment/bin/python" in executable, executable
        assert os.path.realpath(prefix).startswith(work) and prefix.rstrip("/").endswith("environment"), prefix
        # segspark itself came from the archive (the wheel inside it), not from this checkout
        assert segspark.startswith("0.1.0 at ") and segspark.split(" at ", 1)[1].startswith(prefix), segspark


def _segments(root: Path, run_id: str) -> dict[tuple[str, str], int]:
    table = DeltaTable(str(root / "user_segments")).to_pyarrow_table(columns=["user_id", "model", "segment", "run_id"])
    rows = table.filter(pc.equal(table["run_id"], run_id)).to_pylist()
    keyed = {(str(r["user_id"]), r["model"]): r["segment"] for r in rows}
    assert len(keyed) == len(rows), "one row per user and model"
    return keyed


def test_jobs_on_a_standalone_cluster_run_the_shipped_environment(packaged, cluster, sample_parquet, tmp_path):
    master, work_dir = cluster
    out = tmp_path / "out"
    common = ["--config", str(REPO / "conf/local.yaml"), "--set", f"input.path={sample_parquet}/events",
              f"output.root={out}"]
    started = time.monotonic()
    # conf/local.yaml sets spark.driver.memory 4g, and this run asks for 2g executors: under spark-submit
    # the submit line's 1g stays in effect for both, with one warning.
    trained = _submit(cluster, packaged, tmp_path, "pipeline.py", *common, "--run-id", "cluster-train",
                      *FAST_MODELS, *QUICK, "spark.conf.spark.executor.memory=2g")
    train_seconds = time.monotonic() - started
    assert "run cluster-train succeeded" in trained
    assert f"cluster: Spark {pyspark.__version__}, master {master} (deploy mode client)" in trained
    assert "driver memory 1g, executor memory 1g" in trained
    assert re.search(r"cluster: executors: 1, 2 cores: 0 on 127\.0\.0\.1:\d+ \(2 cores", trained), trained[-4000:]
    assert "\r" not in trained and "\x1b[" not in trained  # the output is a file: no progress line
    warnings = [line for line in trained.splitlines() if "spark-submit job: memory, cores and master" in line]
    assert len(warnings) == 1, trained[-4000:]
    assert "spark.driver.memory (config 4g, in effect 1g)" in warnings[0]
    assert "spark.executor.memory (config 2g, in effect 1g)" in warnings[0]
    _check_shipped_python(trained, work_dir)

    segments = _segments(out, "cluster-train")
    users = {user for user, _ in segments}
    assert {model for _, model in segments} == MODELS
    assert len(segments) == len(MODELS) * len(users) > 0
    features = DeltaTable(str(out / "user_features")).to_pyarrow_table(columns=["user_id"])
    embeddings = DeltaTable(str(out / "user_embeddings")).to_pyarrow_table(columns=["user_id", "embedding"])
    assert features.num_rows == embeddings.num_rows == len(users)  # every user embedded on the executors
    runs = DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist()
    assert [(r["run_id"], r["status"]) for r in runs] == [("cluster-train", "succeeded")]
    assert runs[0]["users"] == len(users)
    assert runs[0]["input_rows"] == runs[0]["clean_rows"] + runs[0]["quarantined_rows"]

    # The bundle the first job wrote, applied by jobs/score.py on the cluster to the same events: every
    # user keeps the segment of every model.
    started = time.monotonic()
    scored = _submit(cluster, packaged, tmp_path, "score.py", *common, "spark.shuffle_partitions=4",
                     "--run-id", "cluster-score", "--bundle", str(out / "_models" / "cluster-train"))
    score_seconds = time.monotonic() - started
    assert "run cluster-score succeeded" in scored
    _check_shipped_python(scored, work_dir)
    assert "spark-submit job: memory" in scored  # conf/local.yaml's 4g driver memory, again
    assert _segments(out, "cluster-score") == segments
    print(f"\nstandalone cluster: pipeline.py {train_seconds:.1f} s, score.py {score_seconds:.1f} s")

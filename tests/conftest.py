"""Shared fixtures: one local SparkSession per test process, and data and trained runs built once
for the whole test run.

The test files are spread over several processes (pytest-xdist), each with its own session-scoped
fixtures. The expensive read-only ones (generated samples, a trained run of every model) are built
once for all of them: the first process to ask builds the folder under a file lock in the run's
shared temporary folder, the others wait and then read it. Tests treat these folders as read-only and
copy them (`copied`) before writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from segspark.runtime.session import get_spark

# The same results on any machine: before any JVM starts, the process runs in UTC (pyspark turns naive
# datetimes into timestamps, and collected timestamps back into datetimes, in the machine's zone) and
# ignores settings of the surrounding shell that would point Spark elsewhere.
os.environ["TZ"] = "UTC"
time.tzset()
for _variable in ("SPARK_REMOTE", "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_HOME", "SPARK_CONF_DIR"):
    os.environ.pop(_variable, None)
# TensorFlow's oneDNN kernels follow the CPU's instruction set (AVX-512 here, AVX2 on other machines of
# this kind): held at AVX2 so that trainings in the tests round the same way on both.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

# The suite starts about forty JVMs (42 in a whole run sampled from /proc: CLI and spark-submit subprocesses,
# a Connect server, cluster daemons and executors, the test processes' own two) on 2 cores. In a JVM that lives a minute, the C2 compiler's
# threads and G1's concurrent threads cost more CPU than they win back: C1 only and the serial collector
# halved the CPU of the suite's local-cluster run of that time (248-279 -> 120-125 cpu-s, /proc/stat over the test), a
# code cache of 512 MB (see below) took it from 109 to 98 cpu-s, and leaving the bytecode of Spark's jars
# unverified (each JVM loads some 20,000 classes) from 85 to 81 (a small spark-submit: 8.1-9.3 -> 7.3-7.5).
# The test processes' own sessions live for the whole run and do most of the in-process work: C1 there
# too, with a code cache of 512 MB (IN_PROCESS_JVM). C1 with the default cache had lost in the whole
# suite (its two sessions 722 cpu-s against 692 on the defaults, 14 min 29 s against 13 min 23 s): Spark's
# generated classes keep arriving, and the sweeper thread that makes room in the cache took 19.6 cpu-s
# over three test files. With room to spare (69 MB used of 512 at the end), tests/test_pipeline.py,
# test_privacy.py and test_baselines.py in one process took 116 JVM cpu-s against 189 on the defaults
# (86 of them in C2's compiler threads), and 130 s against 149 (per-thread CPU from /proc). Their
# collector is the parallel one: the same three files took 141, 147, 144 and 133 busy cpu-s with it
# against 148, 163, 154 and 148 with G1, the default (/proc/stat, alternated; likely G1's concurrent
# threads and costlier write barriers, in a JVM that mostly makes short-lived garbage). The streaming
# tests gain from C2 in time but not in CPU (tests/test_stream_job.py, test_stream_emerging.py,
# test_state_store.py and test_feature_state.py in one process: 205 s against 277 s with C1, but 335
# busy cpu-s against 319), and the suite is CPU-bound, so C1 stays. A subprocess
# whose one JVM computes for long keeps C2, with the larger cache (`long_lived_jvm_env`). Results do not change
# either way (Java's floating point is strict since 17). Test-only: segspark itself sets neither.
#   SPARK_SUBMIT_OPTS: every driver JVM started by spark-submit (the CLI, jobs, the Connect server); its
#     -Dspark.executor.extraJavaOptions reaches the executors those drivers start.
#   SPARK_DAEMON_JAVA_OPTS: a standalone master and worker started with spark-class.
SHORT_LIVED_JVM = ("-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:ReservedCodeCacheSize=512m -XX:+IgnoreUnrecognizedVMOptions "
                   "-XX:+UnlockDiagnosticVMOptions -XX:-BytecodeVerificationRemote")
SHORT_LIVED_SUBMIT_OPTS = f"{SHORT_LIVED_JVM} -Dspark.executor.extraJavaOptions='{SHORT_LIVED_JVM}'"
IN_PROCESS_JVM = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=512m -XX:+UseParallelGC"
LONG_LIVED_JVM = "-XX:ReservedCodeCacheSize=512m"
os.environ.setdefault("SPARK_SUBMIT_OPTS", SHORT_LIVED_SUBMIT_OPTS)
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", SHORT_LIVED_JVM)


def long_lived_jvm_env() -> dict[str, str]:
    """This process's environment for a subprocess whose one JVM computes for a minute or more (the
    skew job: a million events on a 512 MB heap): C2 and a code cache of 512 MB, without the short-lived options
    above. Measured alone: C1 and the serial collector took 74 cpu-s and 58 s there, the defaults 67
    cpu-s and 39 s. The larger cache: 78 and 77 cpu-s against 82 and 80 on the defaults (/proc/stat over
    the test, two runs each); C1 with it stayed worse (115 cpu-s against 94, counted over every process).
    The collector stays G1, the default: the parallel one was ~5 cpu-s quicker (55 and 58 against 63 and
    60), but its old generation has a fixed share of the heap, and with Spark's execution pages on that
    heap the job ran out of memory in a window over the heavy user's events in 4 of 15 runs (0 of 4 with
    G1, alternated with it, and none in the sessions before the parallel one)."""
    env = dict(os.environ)
    if env.get("SPARK_SUBMIT_OPTS") == SHORT_LIVED_SUBMIT_OPTS:
        env["SPARK_SUBMIT_OPTS"] = LONG_LIVED_JVM
    return env


def start_process_session():
    """This test process's own SparkSession (local[2]), started on first use; the `spark` fixture's.
    Its JVM lives for the whole run: started with IN_PROCESS_JVM, not the short-lived options (unless
    the surrounding shell set SPARK_SUBMIT_OPTS: then that, as for every JVM). Whatever starts it
    first, the fixture or a collection hook (tests/test_table_writers.py asks the session which
    writers it has while the files are collected, before any fixture runs), gets these options: until
    2026-12-07 that hook started it with the short-lived ones, so in a whole run both test processes'
    sessions had the serial collector (tests/test_pipeline.py, test_baselines.py, test_features.py
    and test_deep_pipeline.py in one process, alternated: 237 and 196 busy cpu-s, 197 and 166 s with
    them; 210 and 182 cpu-s, 174 and 153 s with IN_PROCESS_JVM)."""
    short_lived = os.environ.get("SPARK_SUBMIT_OPTS") == SHORT_LIVED_SUBMIT_OPTS
    if short_lived:
        os.environ["SPARK_SUBMIT_OPTS"] = IN_PROCESS_JVM
    try:
        return get_spark(
            app_name="segspark-tests",
            master="local[2]",
            conf={"spark.sql.shuffle.partitions": "4", "spark.default.parallelism": "4"},
        )
    finally:
        if short_lived:
            os.environ["SPARK_SUBMIT_OPTS"] = SHORT_LIVED_SUBMIT_OPTS


@pytest.fixture(scope="session")
def spark():
    session = start_process_session()
    yield session
    # Stop before exit: a process that loaded delta-rs and left Spark running was seen aborting
    # with code 134, which would hide the real exit status.
    session.stop()


@pytest.fixture(autouse=True)
def _quiet_py4j():
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield


REPO = Path(__file__).resolve().parents[1]

# A short k sweep keeps the end-to-end tests quick on 2 cores (the default sweeps k = 3..8, 3 seeds).
FAST_MODELS = (
    "models.selection.k_min=3",
    "models.selection.k_max=4",
    "models.selection.seeds=1",
    "models.selection.silhouette_sample=200",
    "models.bisecting_kmeans.max_iter=5",  # MLlib's bisecting runs every iteration as a Spark job
    # A small autoencoder trained for a few epochs: the deep path runs end to end in seconds.
    "models.autoencoder.hidden_layers=[32]",
    "models.autoencoder.epochs=30",
    "models.autoencoder.batch_size=32",
    "models.hdbscan.min_cluster_share=0.05",
    "models.hdbscan.min_samples=5",
)


@pytest.fixture
def make_config(tmp_path):
    """Config from conf/local.yaml with `--set`-style overrides; output under tmp_path."""
    from segspark.config import load_config

    def make(*overrides: str, config: str = "conf/local.yaml"):
        return load_config(REPO / config, [f"output.root={tmp_path / 'out'}", *FAST_MODELS, *overrides])

    return make


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, built by `build(folder)` once for the whole test run (every xdist worker):
    the first caller builds it under an exclusive lock, later callers find it marked done. A build
    that failed leaves no mark, so the next caller starts it again from an empty folder."""
    base = tmp_path_factory.getbasetemp()
    # Workers' temporary folders (popen-gw0, ...) sit in the run's own folder; a run without xdist has
    # only its own. Never the folder above that: it holds earlier test runs.
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def copied(folder: Path, tmp_path: Path) -> Path:
    """A writable copy of a shared folder (shared fixtures are read-only)."""
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="session")
def sample_parquet(tmp_path_factory):
    """A small generated clickstream (Parquet) shared by the end-to-end tests. Read-only. The shared
    samples are written as `segspark generate` writes them, without a Spark job (datagen_local: the
    files the Spark job writes, tests/test_datagen.py)."""
    from segspark.datagen import GenerateSpec
    from segspark.datagen_local import write_dataset_on_driver

    return built_once(tmp_path_factory, "sample-parquet",
                      lambda out: write_dataset_on_driver(GenerateSpec(users=400, days=30, seed=11), str(out), "parquet"))


@pytest.fixture(scope="session")
def noisy_json(tmp_path_factory):
    """A small generated clickstream as JSON lines with duplicates, missing prices, malformed lines.
    Read-only."""
    from segspark.datagen import GenerateSpec
    from segspark.datagen_local import write_dataset_on_driver

    spec = GenerateSpec(users=300, days=30, seed=5, duplicate_share=0.02, missing_price_share=0.02, malformed_share=0.01)
    return built_once(tmp_path_factory, "noisy-json", lambda out: write_dataset_on_driver(spec, str(out), "json"))


TRAINED_RUN_ID = "r1"  # the run id of `trained_run`


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """`segspark run --run-id r1` of every model on `sample_parquet` (FAST_MODELS), as the CLI ran it."""

    root: Path  # the output root: tables and _models/r1 (read-only; `copied` before writing)
    exit_code: int
    stdout: str  # what the command printed: the run's summary
    overrides: tuple[str, ...]  # the --set values, output.root aside

    def config(self, root: Path | None = None):
        """The run's config, with its output under `root` (default: the shared, read-only root)."""
        from segspark.config import load_config

        return load_config(REPO / "conf/local.yaml", [f"output.root={root or self.root}", *self.overrides])


@pytest.fixture(scope="session")
def trained_run(spark, sample_parquet, tmp_path_factory) -> TrainedRun:
    """One trained run of all four models, shared by every test that reads a run's tables, bundle or
    summary (the report, the deep model's scoring, the CLI's summary): trained once per test run."""
    from segspark.cli import main

    overrides = (f"input.path={sample_parquet}/events", *FAST_MODELS)

    def build(folder: Path) -> None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["run", "--config", str(REPO / "conf/local.yaml"), "--run-id", TRAINED_RUN_ID,
                         "--set", f"output.root={folder / 'out'}", *overrides])
        (folder / "stdout.txt").write_text(printed.getvalue())
        (folder / "exit_code.txt").write_text(str(code))

    folder = built_once(tmp_path_factory, "trained-run", build)
    return TrainedRun(folder / "out", int((folder / "exit_code.txt").read_text()), (folder / "stdout.txt").read_text(),
                      overrides)


def data_lines(folder) -> int:
    """Non-empty lines in the data files of a folder written by Spark (independent of Spark)."""
    import pathlib

    total = 0
    for path in pathlib.Path(folder).rglob("*"):
        if path.is_file() and not path.name.startswith(("_", ".")) and not path.name.endswith(".crc"):
            total += sum(1 for line in path.read_text().splitlines() if line.strip())
    return total


# The test files that take longest (by `--durations` on this project's 2-core machines), longest
# first. pytest-xdist hands out whole files (--dist loadfile) in collection order when told not to
# sort them by their number of tests (scripts/test.sh: --no-loadscope-reorder, else a file of one
# 4-minute test comes last): starting the long ones first keeps one worker from picking up a long
# file when the others are nearly done.
LONGEST_FIRST = (  # each file's summed test times on a fresh clone of 2026-12-06 (scripts/test.sh)
    "test_standalone_cluster.py",  # 173 s (before it ran the bisecting k-means too, 2026-12-07)
    "test_stream_job.py",  # 125 s, the shared training run's ~38 s included
    "test_spark_connect.py",  # 82 s
    "test_stream_emerging.py",  # 70 s
    "test_concurrency.py",  # 57 s
    "test_report.py",  # 56 s
    "test_pipeline.py",  # 50 s
    "test_mqtt_stream.py",  # 48 s
    "test_deep_pipeline.py",  # 37 s
    "test_skew.py",  # ~32 s (60 s before its million events on 512 MB)
    "test_cli.py",  # 29 s
    "test_privacy.py",  # 27 s
    "test_state_store.py",  # 24 s
    "test_jobs.py",  # 24 s
    "test_features.py",  # 24 s
    "test_baselines.py",  # 23 s
    "test_progress.py",  # 22 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

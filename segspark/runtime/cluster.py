"""What a job runs on: the master, the executors and the Python each executor uses.

`log_cluster` is called once at the start of the jobs/*.py entry points (spark-submit, Databricks
Python script tasks), not by library calls or the local CLI: it runs one small Spark job (one task per
task slot, at most 64) that reports each Python worker's host and interpreter, so that a job that
ships its environment (`--archives ...#environment`) shows in its first lines whether the executors
really run it. Over Spark Connect there is no SparkContext and no RDD: only the server is named.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from pyspark.sql import SparkSession

from segspark.runtime.redaction import redact_text
from segspark.runtime.session import is_connect

log = logging.getLogger(__name__)

PROBE_TASKS_MAX = 64


@dataclass(frozen=True)
class ExecutorPython:
    """The interpreter a Python worker of an executor ran, as reported from inside a task."""

    host: str
    executable: str
    prefix: str
    version: str
    segspark: str  # "0.1.0 at /path/to/segspark", or why it could not be imported


@dataclass(frozen=True)
class Executor:
    id: str
    host_port: str
    cores: int
    max_memory: int  # bytes of storage memory


def executor_pythons(spark: SparkSession, tasks: int | None = None) -> list[ExecutorPython]:
    """The distinct (host, interpreter) pairs of the Python workers that ran one small job of
    `tasks` tasks (default: the session's task slots, at most PROBE_TASKS_MAX)."""
    sc = spark.sparkContext
    count = max(1, min(int(tasks or sc.defaultParallelism), PROBE_TASKS_MAX))
    rows = sc.parallelize(range(count), count).mapPartitions(_probe()).collect()
    return sorted({ExecutorPython(*row) for row in rows}, key=lambda row: (row.host, row.executable))


def _probe():
    # A function defined inside a function is pickled by value, and it yields plain tuples: the probe
    # runs, and reports, even on an executor whose Python cannot import segspark.
    def probe(_rows):
        import os
        import socket
        import sys

        try:
            import segspark

            found = f"{segspark.__version__} at {os.path.dirname(segspark.__file__)}"
        except Exception as exc:  # noqa: BLE001 - the report is the point
            found = f"not importable ({type(exc).__name__}: {exc})"
        yield socket.gethostname(), sys.executable, sys.prefix, ".".join(map(str, sys.version_info[:3])), found

    return probe


def executors(spark: SparkSession) -> list[Executor]:
    """The executors registered with the application (Spark's status store; the same list as the
    UI's Executors page, also without the UI). The driver is listed only when it is the sole one
    (local mode)."""
    jsc = spark.sparkContext._jsc.sc()  # type: ignore[union-attr]
    with contextlib.suppress(Exception):  # best effort: an internal API
        jsc.listenerBus().waitUntilEmpty()  # executors registered during the probe are listed
    found = []
    iterator = jsc.statusStore().executorList(True).iterator()
    while iterator.hasNext():
        summary = iterator.next()
        found.append(Executor(str(summary.id()), str(summary.hostPort()), int(summary.totalCores()),
                              int(summary.maxMemory())))
    workers = [e for e in found if e.id != "driver"]
    return sorted(workers or found, key=lambda e: (len(e.id), e.id))


def describe_cluster(spark: SparkSession) -> list[str]:
    """A few lines: the master and sizing, the executors, and each executor's Python."""
    if is_connect(spark):
        return [f"Spark Connect session (Spark {spark.version}): the server runs the executors, not visible "
                "from the client"]
    sc = spark.sparkContext
    conf = sc.getConf()
    lines = [
        f"Spark {spark.version}, master {redact_text(sc.master)} (deploy mode "
        f"{conf.get('spark.submit.deployMode', 'client')}), application {sc.applicationId}, driver memory "
        f"{conf.get('spark.driver.memory', '1g (default)')}, executor memory {conf.get('spark.executor.memory', '1g (default)')}"
    ]
    pythons = executor_pythons(spark)  # first: a cluster's executors may still be registering
    try:
        listed = executors(spark)
        lines.append(
            f"executors: {len(listed)}, {sum(e.cores for e in listed)} cores: "
            + ", ".join(f"{e.id} on {e.host_port} ({_cores(e.cores)}, {e.max_memory / 2**20:,.0f} MiB storage)"
                        for e in listed)
        )
    except Exception as exc:  # noqa: BLE001 - an internal API: the list is informative only
        lines.append(f"executors: not listed ({type(exc).__name__})")
    for python in pythons:
        lines.append(
            f"executor Python on {python.host}: {python.executable} (Python {python.version}, prefix "
            f"{python.prefix}; segspark {python.segspark})"
        )
    return lines


def _cores(n: int) -> str:
    return f"{n} core" if n == 1 else f"{n} cores"


def log_cluster(spark: SparkSession) -> None:
    """Log describe_cluster's lines at INFO; a failure is a warning (the job itself goes on, and fails
    on its own if the executors cannot run it)."""
    try:
        for line in describe_cluster(spark):
            log.info("cluster: %s", line)
    except Exception as exc:  # noqa: BLE001 - informative only
        log.warning("cluster: could not describe the executors: %s: %s", type(exc).__name__,
                    redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else ""))

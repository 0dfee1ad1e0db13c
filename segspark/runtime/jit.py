"""The just-in-time compiler of a driver JVM that segspark launches itself for a batch command (`spark.jit`).

By default a JVM compiles hot code twice: at once with C1, then again with the optimising C2 compiler
in background threads. A small input's run ends before C2's work pays back, and on a 2-core machine
those threads compete with the run itself. Measured with `segspark run` on the demo's 5,000 users
(7.7 MB of Parquet, local[2], the machine's busy CPU from /proc/stat): with C1 alone
(`-XX:TieredStopAtLevel=1`) 46.6 s and 64-68 busy cpu-s against 51.8 s and 89-98 cpu-s with both
(`--set spark.jit=auto` and `full`, three alternated pairs; the option given through SPARK_SUBMIT_OPTS
before: 48.1 s and 59-75 cpu-s against 53.6 s and 90-104, four pairs). At 20,000 users (26 MB) they
were even (84.3 s against 81.5 s, 117 against 146 cpu-s), and past that C2 wins: the ingest and
features of 1.4M events took 17.8 s with C1 alone against 10.5 s (`scripts/bench.py --suite
ingest_features --scale 1200000`).

So `auto` (the default) gives C1 alone to the local session of a `run`, `features`, `train` or `score`
whose input is at most QUICK_MAX_BYTES (16 MiB of Parquet or Delta files, six times that of CSV or
JSON: text takes about six times the bytes per event, as in runtime/shuffle_sizing.py); `quick`
gives it to every such session, `full` to none. Nothing changes for a session segspark does not launch
(spark-submit, a Databricks cluster, a notebook's session, Spark Connect), for an input it cannot size
(not on a local file system), for a stream (it runs for hours), or when `spark.conf` sets the driver's
compilation itself.
"""

from __future__ import annotations

import glob
import logging
import os

from pyspark.sql import SparkSession

from segspark.config import InputConfig, SparkConfig
from segspark.io.files import local_path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
QUICK_MAX_BYTES = {"parquet": 16 * MIB, "delta": 16 * MIB, "csv": 96 * MIB, "json": 96 * MIB}
QUICK = "-XX:TieredStopAtLevel=1"
DRIVER_OPTIONS = "spark.driver.extraJavaOptions"
# Options by which a user's spark.conf already decides the driver's compilation.
_COMPILATION_OPTIONS = ("TieredStopAtLevel", "TieredCompilation", "-Xint", "-Xcomp")


def driver_jit_conf(spark_cfg: SparkConfig, input_cfg: InputConfig) -> dict[str, str]:
    """The spark.driver.extraJavaOptions setting that gives a batch command's local session C1 alone,
    the config's own options kept; {} when the JVM's default compilation stays, and always when a
    session is active already (a notebook's, a test's): it is used as it is."""
    return {} if SparkSession.getActiveSession() is not None else quick_jit_conf(spark_cfg, input_cfg)


def quick_jit_conf(spark_cfg: SparkConfig, input_cfg: InputConfig) -> dict[str, str]:
    """driver_jit_conf's choice when no session is active: nothing for a JVM segspark does not launch
    (spark-submit's, a Spark Connect server's, a cluster's)."""
    own = spark_cfg.conf.get(DRIVER_OPTIONS, "")
    launched_elsewhere = (spark_cfg.remote or os.environ.get("SPARK_REMOTE") or os.environ.get("PYSPARK_GATEWAY_PORT")
                          or not spark_cfg.master.startswith("local"))
    if launched_elsewhere or spark_cfg.jit == "full" or any(option in own for option in _COMPILATION_OPTIONS):
        return {}
    if spark_cfg.jit == "auto":
        limit = QUICK_MAX_BYTES.get(input_cfg.format)
        size = None if limit is None else local_input_bytes(input_cfg, stop_above=limit)
        if size is None or limit is None or size > limit:
            return {}
        log.info("driver JVM: C1 compiler alone (spark.jit auto: %.1f MB of %s input, at most %d MiB)",
                 size / 1e6, input_cfg.format, limit // MIB)
    else:
        log.info("driver JVM: C1 compiler alone (spark.jit quick)")
    return {DRIVER_OPTIONS: f"{own} {QUICK}".strip()}


def local_input_bytes(input_cfg: InputConfig, stop_above: int | None = None) -> int | None:
    """The bytes of the files under input.path (a file, a folder or a glob on a local file system);
    None when the path is not local or holds nothing. With `stop_above`, the count stops as soon as it
    passes that many bytes (a large input's folder is not walked to the end only to learn it is large)."""
    local = local_path(input_cfg.path)
    if local is None:
        return None
    pattern = str(local)
    matches = glob.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
    total, found = 0, False
    for match in matches:
        files = [("", [], [match])] if os.path.isfile(match) else os.walk(match)
        for folder, _, names in files:
            for name in names:
                total, found = total + os.path.getsize(os.path.join(folder, name)), True
                if stop_above is not None and total > stop_above:
                    return total
    return total if found else None

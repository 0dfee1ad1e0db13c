"""A class-data archive of Spark's classpath for the suite's JVMs (test-only; segspark itself uses none).

Each JVM the suite starts (about forty: the CLI and spark-submit subprocesses, the Connect server,
executors, the test processes' own sessions) loads some 19,000 classes from Spark's jars: it opens,
parses and links each one again. Java's dynamic class-data sharing (AppCDS, JDK 13+) keeps them,
parsed, in an archive file that every later JVM maps instead. Measured on a cold `segspark run` of
400 users with the suite's short-lived JVM options: 46-48 busy cpu-s and 36-37 s without the archive,
42-43 cpu-s and 32-34 s with it (`/work/notes/cpu.sh`, two runs each, alternating).

`python -m tests.jvm_class_archive` (scripts/test.sh, before pytest) builds it once per environment:
a short Spark workload (`_workload`: the data sources, aggregations, MLlib and Python/Arrow paths the
tests use) runs in a JVM started with -XX:ArchiveClassesAtExit. The archive lives under build/ (not
committed), named by a key of what it depends on (the JVM, pyspark's jars, this file), so a changed
JVM or Spark builds a new one and a clone reuses its own. tests/conftest.py adds it to the JVM
options only when the archive for this environment exists (`existing_archive`).

A JVM that cannot use it (a different class path, such as the standalone cluster test's own conf
folder first) loads its classes from the jars as before; its warning is switched off with the cds
log tags, because several tests read a JVM's stdout line by line.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "build" / "jvm-class-archive"
# The JVM that dumps the archive verifies the bytecode it loads (the default): an archive dumped with
# verification off would be refused by a JVM that verifies (the test processes' own sessions).
DUMP_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:ReservedCodeCacheSize=512m"
# Used with the archive: without it, a JVM that cannot map the archive prints a warning on stdout.
QUIET = "-Xlog:cds=off,cds+dynamic=off"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java:
        raise FileNotFoundError("no java on PATH and no JAVA_HOME")
    return os.path.realpath(java)


def _key() -> str:
    """What the archive depends on: the JVM (its path and version), pyspark's jars and this file."""
    from pyspark.find_spark_home import _find_spark_home

    java = _java()
    version = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    jars = sorted(p.name for p in (Path(_find_spark_home()) / "jars").glob("*.jar"))
    text = "\n".join([java, version, *jars, Path(__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def archive_path() -> Path:
    return FOLDER / f"spark-{_key()}.jsa"


def existing_archive() -> Path | None:
    """The archive for this environment when it was built, else None (the JVMs run without one)."""
    try:
        path = archive_path()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if path.is_file() else None


def jvm_options(archive: Path | None) -> str:
    """JVM options that use `archive` (empty for None)."""
    return f"-XX:SharedArchiveFile={archive} {QUIET}" if archive else ""


def build() -> tuple[Path, str]:
    """The archive for this environment, built unless it exists; (path, what was done)."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    path = archive_path()
    with open(FOLDER / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; released if this process dies
        if path.is_file():
            return path, "reused"
        started = time.monotonic()
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="jvm-class-archive-") as scratch:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("SPARK_CONF_DIR", "SPARK_HOME", "SPARK_REMOTE", "PYSPARK_GATEWAY_PORT")}
            env.update(SPARK_SUBMIT_OPTS=f"{DUMP_OPTIONS} -XX:ArchiveClassesAtExit={partial} {QUIET}",
                       PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
            # The JVM writes the archive as it exits, after the workload's Python has exited: its output
            # pipes (inherited from the workload) close only then, so run() returns after the JVM.
            done = subprocess.run([sys.executable, __file__, "--workload", scratch], env=env, cwd=scratch,
                                  capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"the workload exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
        for old in FOLDER.glob("spark-*.jsa"):  # archives of an earlier JVM or Spark
            old.unlink()
        partial.rename(path)
        return path, f"built in {time.monotonic() - started:.0f} s"


def _workload(scratch: str) -> None:
    """Loads the classes the suite's JVMs load: Parquet, JSON and CSV, aggregations with sets,
    percentiles and modes, windows, joins, MLlib's three clusterings, Arrow to and from pandas,
    mapInPandas."""
    import pandas as pd
    from pyspark.ml.clustering import BisectingKMeans, GaussianMixture, KMeans
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    spark = (SparkSession.builder.master("local[2]").appName("jvm-class-archive")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    events = spark.range(2000).select(
        F.col("id").alias("user"), (F.col("id") % 7).cast("double").alias("x"), F.rand(1).alias("y"),
        F.current_timestamp().alias("ts"), F.lit("View").alias("kind"))
    events.write.parquet(f"{scratch}/parquet")
    events.write.json(f"{scratch}/json")
    events.write.option("header", True).csv(f"{scratch}/csv")
    read = spark.read.parquet(f"{scratch}/parquet").unionByName(spark.read.schema(events.schema).json(f"{scratch}/json"))
    text = spark.read.option("header", True).csv(f"{scratch}/csv")
    users = (read.withColumn("kind", F.lower("kind")).groupBy("user")
             .agg(F.count("*").alias("n"), F.sum("x").alias("s"), F.percentile_approx("y", 0.5).alias("m"),
                  F.collect_set("kind").alias("kinds"), F.mode("kind"), F.max("ts"), F.countDistinct("x")))
    users.join(text.groupBy("user").count(), "user", "left").orderBy("user").toPandas()
    vectors = VectorAssembler(inputCols=["s", "m"], outputCol="features").transform(users.fillna(0))
    for estimator in (KMeans(k=2, maxIter=2), GaussianMixture(k=2, maxIter=2), BisectingKMeans(k=2, maxIter=2)):
        estimator.fit(vectors).transform(vectors).count()
    users.mapInPandas(lambda batches: (batch for batch in batches), users.schema).count()
    spark.createDataFrame(pd.DataFrame({"a": [1, 2]})).collect()
    ranked = read.withColumn("rank", F.row_number().over(Window.partitionBy("user").orderBy("ts")))
    ranked.write.mode("overwrite").parquet(f"{scratch}/ranked")
    spark.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--workload"]:
        _workload(sys.argv[2])
    else:
        try:
            archive, how = build()
        except Exception as error:  # the suite runs without the archive, only slower
            print(f"test: no JVM class archive ({error}); the JVMs load Spark's classes from the jars", file=sys.stderr)
        else:
            print(f"test: JVM class archive {archive.relative_to(REPO)} ({archive.stat().st_size / 1e6:.0f} MB, {how})",
                  file=sys.stderr)

"""SparkSession factory.

Uses the active session when there is one (Databricks notebooks and jobs, spark-submit, Spark
Connect), otherwise builds a local session that listens on loopback only. Also tells whether the
Delta Spark connector is on the classpath, which decides how Delta tables are written.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from contextlib import contextmanager

from pyspark.sql import DataFrame, SparkSession

from segspark.runtime.redaction import redact_text

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Settings every segspark session needs, whoever built it. Timestamps as microseconds, because
# Spark's default INT96 arrives in delta-rs as nanoseconds and makes it refuse the table; UTC so
# that "as of a date" means the same on every machine.
REQUIRED_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Ingest leaves events partitioned and sorted by user, so the feature aggregations can stream
    # through each user's rows instead of hashing them; percentile, collect_set and mode otherwise
    # spill out of the object hash map and sort everything again (about 40% of the feature stage).
    # Spark applies it only where the input is already sorted by the grouping keys. (The plain
    # counts and sums keep the generated hash aggregation: features.behaviour._plain_event_aggregates.)
    "spark.sql.execution.replaceHashWithSortAgg": "true",
}

# Defaults for a session we build ourselves: modest parallelism for a laptop or CI box.
LOCAL_DEFAULTS: dict[str, str] = {
    "spark.driver.host": LOOPBACK,
    "spark.driver.bindAddress": LOOPBACK,
    "spark.ui.enabled": "false",
    # Console progress bars garble logs that schedulers and CI capture; segspark logs each stage.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "10000",
    "spark.driver.memory": "4g",
}


# Defaults wherever segspark creates the SparkContext (locally, or in a job spark-submit started; a
# submit line's --conf wins). PySpark 4 records the Python call site of every DataFrame and Column
# call for its error messages, at several Py4J round trips per call (the active session, a setting,
# the origin set and cleared); segspark builds its plans from thousands of such calls, and a stream
# micro-batch of 10k events took 17.2 s without it against 20.2 s with it. Errors keep Spark's own context, not
# the Python line. PySpark reads the setting once per process, when the first call is made.
BUILT_CONTEXT_DEFAULTS: dict[str, str] = {
    "spark.python.sql.dataFrameDebugging.enabled": "false",
    # Work no run sizes itself (a stream's micro-batches, `train` on stored features) gets modest
    # parallelism for a laptop or CI box; batch runs size theirs from their input (shuffle_sizing.py).
    "spark.sql.shuffle.partitions": "8",
    # Spark keeps the classes it generates for whole-stage codegen in a cache of 100 entries, and a
    # segspark run or stream micro-batch generates several hundred distinct ones (wide feature and
    # preparation plans, one per model and stage): with 100 they evict each other, and every
    # micro-batch compiled ~400 classes again (4-5 s of its 15-18 s). With room for them, a stream's
    # later batches compile a few dozen and repeated runs in one process reuse theirs. A static
    # setting: only a session built with it has it (Databricks: the cluster's Spark config).
    "spark.sql.codegen.cache.maxEntries": "2000",
    # That cache is keyed by the generated source, and Spark names each whole-stage class after its
    # stage's number in the query (GeneratedIteratorForCodegenStage24): a stream's state is read as
    # one scan per write folder, and each appended batch adds a folder, so every later stage of the
    # next batch's merge had a new number, a new source and a fresh compile (and ran interpreted
    # until the JIT caught up). Without the number in the name (an internal setting; only stack
    # traces show it), a 10k-event batch compiled 7 classes in 145 ms instead of 15-17 in 300-360 ms,
    # and a compacting one 29 in 0.46 s instead of 61 in 1.3 s.
    "spark.sql.codegen.useIdInClassName": "false",
    # Spark 4.2 reads this internal setting for every array element that an interpreted expression
    # (a higher-order function: the centres' distances, the stream's state merge) reads on an executor
    # (`TypeOps.apply`), and its default is a function that looks the SPARK_TESTING environment
    # variable up each time: 17 % of the JFR samples of 200,000 distances to 8 centres, 5 % of those
    # of ten 100k-event stream batches. Set, it is a lookup in the task's properties instead;
    # false is the default's value outside Spark's own tests, so nothing else changes.
    "spark.sql.types.framework.enabled": "false",
}

# The settings of this process's SparkContext that segspark chose rather than its launcher: all of
# them for a session segspark built locally, its defaults for a job spark-submit started.
_CHOSEN_BY_SEGSPARK: set[str] = set()

# Settings that a spark-submit line owns. The driver JVM has started (with its memory) before segspark
# runs, and memory, cores, executors and master are the submitter's to choose: a config value for one
# of these cannot take effect (spark.driver.*) or would silently replace the submit line's (the rest).
# Under spark-submit segspark leaves them out and warns (README, "Running on a cluster").
SUBMIT_LINE_KEYS: tuple[str, ...] = (
    "spark.master",
    "spark.submit.",
    "spark.driver.memory",
    "spark.driver.memoryOverhead",
    "spark.driver.cores",
    "spark.driver.extraJavaOptions",
    "spark.driver.extraClassPath",
    "spark.driver.extraLibraryPath",
    "spark.executor.memory",
    "spark.executor.memoryOverhead",
    "spark.executor.pyspark.memory",
    "spark.executor.cores",
    "spark.executor.instances",
    "spark.cores.max",
    "spark.dynamicAllocation.",
)


def is_submit_line_key(key: str) -> bool:
    """True for a setting a spark-submit line owns (SUBMIT_LINE_KEYS: memory, cores, master, ...)."""
    return any(key == owned or (owned.endswith(".") and key.startswith(owned)) for owned in SUBMIT_LINE_KEYS)


def submitted_job_conf(conf: Mapping[str, str], submitted: Mapping[str, str]) -> dict[str, str]:
    """The settings of `conf` (the config's spark.* settings) that a job launched by spark-submit
    applies: not those the submit line owns (is_submit_line_key), and not those the submit line set
    to another value (its --conf wins). `submitted`: the settings the JVM was started with. Logs one
    warning naming what was left out."""
    owned = [key for key in conf if is_submit_line_key(key)]
    overridden = [key for key in conf if key not in owned and key in submitted and submitted[key] != str(conf[key])]
    if owned or overridden:
        parts = []
        if owned:
            parts.append(
                "memory, cores and master come from the spark-submit line, config ignored for "
                + ", ".join(_both(key, conf[key], submitted.get(key)) for key in owned)
            )
        if overridden:
            parts.append("the submit line's --conf wins for "
                         + ", ".join(_both(key, conf[key], submitted[key]) for key in overridden))
        log.warning("spark-submit job: %s", "; ".join(parts))
    return {key: str(value) for key, value in conf.items() if key not in owned and key not in overridden}


def submitted_session_settings(conf: Mapping[str, str], submitted: Mapping[str, str]) -> dict[str, str]:
    """What segspark sets on the SparkContext of a job spark-submit launched: its defaults where the
    submit line set nothing, REQUIRED_CONF, and the config's settings that apply (submitted_job_conf)."""
    defaults = {key: value for key, value in BUILT_CONTEXT_DEFAULTS.items() if key not in submitted}
    return {**defaults, **REQUIRED_CONF, **submitted_job_conf(conf, submitted)}


def _both(key: str, configured: object, in_effect: str | None) -> str:
    if ".extra" in key or "secret" in key.lower() or "password" in key.lower():
        return key  # JVM options and the like may carry a password: named, not shown
    effect = "Spark's default" if in_effect is None else redact_text(in_effect)
    return f"{key} (config {redact_text(str(configured))}, in effect {effect})"


def _submitted_conf() -> dict[str, str]:
    """The settings the spark-submit line started the JVM with (its system properties), read before
    the SparkContext exists."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM (PYSPARK_GATEWAY_PORT)
    return dict(SparkConf().getAll())


def _prepare_local_environment() -> None:
    # Python workers must run this interpreter (with segspark's dependencies), not whatever
    # `python3` is on PATH, or pandas UDFs fail with ModuleNotFoundError.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Nothing may listen beyond loopback.
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)


def get_spark(
    app_name: str = "segspark",
    master: str = "local[2]",
    conf: Mapping[str, str] | None = None,
    remote: str | None = None,
) -> SparkSession:
    """Return the active SparkSession, or build one: a Spark Connect client when `remote` (or the
    SPARK_REMOTE variable) names a server, otherwise a local session.

    An active session (Databricks, spark-submit, a notebook) is reused as is, apart from the few
    SQL settings segspark relies on (REQUIRED_CONF), which are set at session level.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        log.info("using the active SparkSession (Spark %s)", active.version)
        return apply_required_conf(active)

    remote = remote or os.environ.get("SPARK_REMOTE")
    if remote:
        return _connect_session(app_name, remote, conf)
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Launched by spark-submit (or the pyspark shell): the JVM already holds the master and
        # settings the user submitted with; add only what segspark needs and the config's settings
        # that the submit line neither owns nor set.
        builder = SparkSession.builder.appName(app_name)
        submitted = _submitted_conf()
        settings = submitted_session_settings(dict(conf or {}), submitted)
        _CHOSEN_BY_SEGSPARK.update(key for key in BUILT_CONTEXT_DEFAULTS if key not in submitted)
    else:
        _prepare_local_environment()
        builder = SparkSession.builder.appName(app_name).master(master)
        settings = {**BUILT_CONTEXT_DEFAULTS, **LOCAL_DEFAULTS, **REQUIRED_CONF, **dict(conf or {})}
        _CHOSEN_BY_SEGSPARK.update(settings)
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("started SparkSession (Spark %s, master %s)", spark.version, spark.sparkContext.master)
    return _remembering_lookups(spark)


def _remembering_lookups(spark: SparkSession) -> SparkSession:
    """The session with PySpark's lookups of Spark's static classes kept in Python (runtime.jvm:
    two of every column's three py4j round trips)."""
    from segspark.runtime.jvm import remember_static_lookups  # runtime.jvm imports this module

    remember_static_lookups(spark)
    return spark


def _connect_session(app_name: str, remote: str, conf: Mapping[str, str] | None) -> SparkSession:
    # The server owns master, memory and the rest: a client can set SQL settings only.
    spark = SparkSession.builder.remote(remote).appName(app_name).getOrCreate()
    for key, value in {**dict(conf or {}), **REQUIRED_CONF}.items():
        if key.startswith("spark.sql."):
            spark.conf.set(key, str(value))
    # A Connect URL may carry `;token=...` or user info: logged redacted.
    log.info("connected to Spark Connect server %s (Spark %s)", redact_text(remote), spark.version)
    return spark


def apply_required_conf(spark: SparkSession) -> SparkSession:
    """Set the session-level SQL settings segspark relies on (REQUIRED_CONF) on a session someone
    else built: a notebook's `spark`, a Spark Connect session. Library entry points call it, so
    `usecases.run(spark, cfg)` works on any session. On a classic session it also keeps PySpark's
    lookups of Spark's static classes in Python (`_remembering_lookups`)."""
    for key, value in REQUIRED_CONF.items():
        if spark.conf.get(key, None) != value:
            spark.conf.set(key, value)
    return _remembering_lookups(spark)


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session (Databricks serverless and shared clusters, `sc://` remotes):
    no SparkContext and no JVM gateway on this side."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def set_at_launch(spark: SparkSession, key: str) -> bool:
    """Whether whoever launched the session's SparkContext set `key`: a spark-submit --conf,
    spark-defaults.conf, a cluster's Spark config. Not for a context segspark built locally (its
    settings are segspark's defaults and config), and never known with Spark Connect (False)."""
    if is_connect(spark) or key in _CHOSEN_BY_SEGSPARK:
        return False
    return bool(spark.sparkContext.getConf().contains(key))


def task_slots(spark: SparkSession) -> int | None:
    """How many tasks the session runs at once (its default parallelism: every core of a local
    session, every executor core of a cluster); None when the client cannot tell (Spark Connect
    without spark.default.parallelism set)."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    value = spark.conf.get("spark.default.parallelism", None)
    return int(value) if value and str(value).isdigit() else None


TARGET_PARTITION_BYTES = 128 * 1024 * 1024  # Spark's own default split size for files


def right_sized(df: DataFrame, rows: int, bytes_per_row: int) -> DataFrame:
    """`df` with at most max(task slots, its size / 128 MB) partitions (a coalesce: no shuffle, and on
    a persisted frame no recomputation). Small runs otherwise pay for many near-empty tasks in every
    job, and an iterative MLlib fit runs dozens of jobs."""
    slots = task_slots(df.sparkSession) or 1
    # coalesce never adds partitions: a frame that already has fewer keeps them.
    return df.coalesce(max(slots, math.ceil(rows * bytes_per_row / TARGET_PARTITION_BYTES)))


def share_session(spark: SparkSession) -> None:
    """Make `spark` this thread's active session: a thread-pool initializer. Spark Connect keeps
    the active session per thread, and MLlib's remote calls (model.clusterCenters() and the like)
    look it up there, so a worker thread without it fails. Classic sessions need nothing."""
    if is_connect(spark) and type(spark).getActiveSession() is None:
        type(spark)._set_default_and_active_session(spark)  # no public setter in pyspark 4.2


def has_delta_connector(spark: SparkSession) -> bool:
    """True when the Delta Spark connector is usable in this session (Databricks, or the
    delta-spark package on the classpath). Without it, segspark commits Delta itself."""
    cached = getattr(spark, "_segspark_has_delta", None)
    if cached is not None:
        return cached
    try:
        # Resolving the data source class is cheap and touches no data.
        spark._jvm.java.lang.Class.forName("io.delta.sql.DeltaSparkSessionExtension")  # type: ignore[union-attr]
        present = True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        present = _connect_has_delta(spark)
    spark._segspark_has_delta = present  # type: ignore[attr-defined]
    log.info("Delta Spark connector %s", "present" if present else "absent: using the embedded committer")
    return present


def _connect_has_delta(spark: SparkSession) -> bool:
    # Under Spark Connect there is no JVM gateway to ask: ask the server to resolve the data
    # source instead (analysis only, no data read). Without Delta the error names the missing source.
    if not is_connect(spark):
        return False
    try:
        spark.read.format("delta").load("/segspark-delta-probe-does-not-exist").schema  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - the kind of error is the answer
        text = str(exc)
        return not ("DATA_SOURCE_NOT_FOUND" in text or "Failed to find the data source" in text)
    return True


@contextmanager
def spark_session(
    app_name: str = "segspark",
    master: str = "local[2]",
    conf: Mapping[str, str] | None = None,
    remote: str | None = None,
):
    """`get_spark` for a command's lifetime: stops the session at the end only if this call built
    it, so a notebook's or job's session is left running. Stopping matters: a process that loaded
    delta-rs and left Spark running was seen aborting at exit (code 134), hiding the exit status."""
    existed = SparkSession.getActiveSession() is not None
    spark = get_spark(app_name, master, conf, remote)
    try:
        yield spark
    finally:
        if not existed:
            spark.stop()

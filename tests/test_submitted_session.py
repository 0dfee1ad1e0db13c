"""A job launched by spark-submit: the submit line keeps memory, cores and master; the start-up lines
name the master, the executors and the Python each executor runs."""

from __future__ import annotations

import logging
import sys

from segspark.runtime.cluster import describe_cluster
from segspark.runtime.session import (
    BUILT_CONTEXT_DEFAULTS,
    REQUIRED_CONF,
    is_submit_line_key,
    submitted_job_conf,
    submitted_session_settings,
)


def test_config_cannot_override_what_the_submit_line_owns(caplog):
    conf = {
        "spark.driver.memory": "10g",
        "spark.executor.memory": "2g",
        "spark.executor.cores": "4",
        "spark.driver.extraJavaOptions": "-Dtrust.password=hunter2",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.adaptive.enabled": "true",
    }
    submitted = {"spark.master": "spark://10.0.0.1:7077", "spark.driver.memory": "1g",
                 "spark.executor.memory": "4g", "spark.sql.shuffle.partitions": "200"}
    with caplog.at_level(logging.WARNING, logger="segspark.runtime.session"):
        applied = submitted_job_conf(conf, submitted)
    # Only what the submit line neither owns nor set is applied.
    assert applied == {"spark.sql.adaptive.enabled": "true"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "spark.driver.memory (config 10g, in effect 1g)" in warnings[0]
    assert "spark.executor.memory (config 2g, in effect 4g)" in warnings[0]
    assert "spark.executor.cores (config 4, in effect Spark's default)" in warnings[0]
    assert "spark.sql.shuffle.partitions (config 8, in effect 200)" in warnings[0]
    assert "spark.driver.extraJavaOptions" in warnings[0] and "hunter2" not in warnings[0]


def test_nothing_to_warn_about_when_config_agrees(caplog):
    with caplog.at_level(logging.WARNING, logger="segspark.runtime.session"):
        applied = submitted_job_conf({"spark.sql.shuffle.partitions": "8"}, {"spark.sql.shuffle.partitions": "8"})
    assert applied == {"spark.sql.shuffle.partitions": "8"} and not caplog.records


def test_a_submitted_job_gets_segsparks_defaults_unless_the_submit_line_set_them():
    debugging = "spark.python.sql.dataFrameDebugging.enabled"
    assert BUILT_CONTEXT_DEFAULTS[debugging] == "false"
    settings = submitted_session_settings({"spark.sql.shuffle.partitions": "8"}, {"spark.master": "yarn"})
    assert settings == {**BUILT_CONTEXT_DEFAULTS, **REQUIRED_CONF, "spark.sql.shuffle.partitions": "8"}
    # The submit line's --conf wins: segspark sets nothing over it.
    assert debugging not in submitted_session_settings({}, {debugging: "true"})


def test_a_session_segspark_builds_records_no_python_call_sites(spark):
    """PySpark's call-site capture (several Py4J round trips per DataFrame or Column call) is off in
    the sessions segspark builds, and PySpark sees it so."""
    from pyspark.errors.utils import is_debugging_enabled

    assert spark.conf.get("spark.python.sql.dataFrameDebugging.enabled") == "false"
    assert not is_debugging_enabled()


def test_a_session_segspark_builds_keeps_its_generated_code(spark):
    """Spark's codegen cache (100 classes by default) has room for the several hundred classes a run
    or a stream micro-batch generates, so a later one reuses them instead of compiling them again."""
    assert spark.conf.get("spark.sql.codegen.cache.maxEntries") == BUILT_CONTEXT_DEFAULTS[
        "spark.sql.codegen.cache.maxEntries"] == "2000"


def test_submit_line_keys():
    for key in ("spark.master", "spark.submit.deployMode", "spark.driver.memory", "spark.executor.instances",
                "spark.cores.max", "spark.dynamicAllocation.enabled", "spark.executor.memoryOverhead"):
        assert is_submit_line_key(key), key
    for key in ("spark.sql.shuffle.partitions", "spark.driver.maxResultSize", "spark.executor.memoryFraction",
                "spark.masterx"):
        assert not is_submit_line_key(key), key


def test_describe_cluster_names_master_executors_and_their_python(spark):
    lines = describe_cluster(spark)
    assert lines[0].startswith(f"Spark {spark.version}, master local[2] (deploy mode client)")
    assert lines[1].startswith("executors: 1, 2 cores: driver on ")  # local mode: the driver runs the tasks
    # The local session's Python workers run this interpreter, with this segspark importable.
    pythons = [line for line in lines if line.startswith("executor Python on ")]
    assert len(pythons) == 1, lines
    assert f": {sys.executable} (Python {'.'.join(map(str, sys.version_info[:3]))}, prefix {sys.prefix}; segspark 0.1.0 at " \
        in pythons[0]

"""The suite's own set-up: the test process's session runs the JVM options conftest means it to."""

from __future__ import annotations

import os
import shlex

from .conftest import IN_PROCESS_JVM, SHORT_LIVED_SUBMIT_OPTS


def test_the_test_process_session_has_the_in_process_jvm_options(spark):
    # Every file is collected before any test runs, and tests/test_table_writers.py's collection hook
    # starts the session: it must get the long-lived options, not the short-lived ones of subprocesses.
    arguments = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    submit_opts = os.environ.get("SPARK_SUBMIT_OPTS")
    expected = IN_PROCESS_JVM if submit_opts == SHORT_LIVED_SUBMIT_OPTS else submit_opts  # else the shell's own
    # Split as Spark's launcher splits SPARK_SUBMIT_OPTS (quotes group words), so a shell's own options with
    # quoted values compare whole.
    assert set(shlex.split(expected or "")) <= set(arguments), arguments
    if submit_opts == SHORT_LIVED_SUBMIT_OPTS:
        assert "-XX:+UseSerialGC" not in arguments, arguments

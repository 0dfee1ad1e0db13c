"""Stage progress: drawn in place on a terminal, absent when output is captured."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading
import time

from segspark.runtime import progress

from .conftest import REPO


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_drawn_off_a_terminal():
    with progress.watch(io.StringIO()) as shown:
        assert shown is None
        progress.stage_started("ingest", {"input_rows": 10})
        progress.stage_finished("ingest")


def test_disabled_progress_draws_nothing_on_a_terminal():
    terminal = _Terminal()
    with progress.watch(terminal, enabled=False) as shown:
        assert shown is None
    assert terminal.getvalue() == ""


def test_terminal_line_shows_stage_rows_and_elapsed_then_clears():
    terminal = _Terminal()
    with progress.watch(terminal) as shown:
        counts: dict = {}
        progress.stage_started("features", counts)
        counts["users"] = 12345
        shown.draw()
        line = terminal.getvalue().rsplit(progress.CLEAR_LINE, 1)[-1]
        assert line.startswith("segspark: features |") and " s |" in line and "users 12,345" in line
        progress.stage_finished("features")
        assert terminal.getvalue().endswith(progress.CLEAR_LINE)
        shown.draw()  # between stages there is nothing to draw
        assert terminal.getvalue().endswith(progress.CLEAR_LINE)


def test_spark_tasks_are_counted_while_a_job_runs(spark):
    seen = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            tasks = progress.spark_tasks(spark)
            if tasks:
                seen.append(tasks)
            done.wait(0.01)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        spark.range(0, 2_000_000, numPartitions=16).selectExpr("sum(length(sha2(cast(id AS string), 256)))").collect()
    finally:
        done.set()
        watcher.join()
    assert seen and all(0 <= completed <= total for completed, total in seen)
    # Idle again: the status store is updated asynchronously, so give it a moment after the job.
    deadline = time.monotonic() + 30
    while progress.spark_tasks(spark) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert progress.spark_tasks(spark) is None


def test_cli_draws_progress_on_a_real_terminal(sample_parquet, tmp_path):
    """`segspark features` with stderr on a pseudo-terminal: the status line appears and is wiped."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "segspark", "features", "--config", str(REPO / "conf/local.yaml"),
         "--set", f"input.path={sample_parquet}/events", f"output.root={tmp_path}"],
        stdout=subprocess.PIPE, stderr=slave, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal[-3000:]
    assert "segspark: ingest |" in terminal or "segspark: features |" in terminal
    # A 400-user sample: the session segspark launches for it compiles with C1 alone (runtime/jit.py).
    assert "driver JVM: C1 compiler alone (spark.jit auto:" in terminal
    assert progress.CLEAR_LINE in terminal
    assert "\x1b[" not in stdout.decode()  # the summary on stdout has no control codes

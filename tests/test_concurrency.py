"""Real processes on one output root: two writers at once, and a run killed (-9) then run again.
Nothing may be lost and nothing duplicated: every table readable, each run's rows exactly once.

The run again after the kill is the same command in this process (`segspark.cli.main` on the test
session): it starts after the killed process is gone, so it needs no process of its own, and it saves a
JVM's start and warm-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deltalake import DeltaTable

from segspark.cli import main

from .conftest import REPO

TABLES = ("quarantine", "user_features", "runs")


def _features_args(events: Path, root: Path, run_id: str) -> list[str]:
    return ["-q", "features", "--config", str(REPO / "conf/local.yaml"), "--run-id", run_id,
            "--set", f"input.path={events}", f"output.root={root}"]


def _features(events: Path, root: Path, run_id: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "segspark", *_features_args(events, root, run_id)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _rows(root: Path, table: str) -> dict[str, int]:
    frame = DeltaTable(str(root / table)).to_pandas()
    return frame["run_id"].value_counts().to_dict()


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_two_runs_writing_one_new_output_root_at_once(sample_parquet, tmp_path):
    root = tmp_path / "out"
    runs = [_features(sample_parquet / "events", root, run_id) for run_id in ("left", "right")]
    outputs = [proc.communicate(timeout=600)[0] for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], outputs
    users = _rows(root, "user_features")
    assert set(users) == {"left", "right"} and users["left"] == users["right"] > 0
    assert _rows(root, "runs") == {"left": 1, "right": 1}
    runs_table = DeltaTable(str(root / "runs")).to_pandas()
    assert set(runs_table.status) == {"succeeded"}


def test_a_run_killed_at_any_moment_then_run_again_lands_once(spark, sample_parquet, tmp_path, capsys):
    root = tmp_path / "out"
    events = sample_parquet / "events"
    # Killed between two commits of one run: the quarantine table written, the features being
    # computed. (Every commit is atomic, so any moment is before or after some commit; a commit
    # another writer beat is tested in tests/test_delta.py.)
    first_commit = {
        "after the quarantine commit": root / "quarantine" / "_delta_log" / f"{0:020d}.json",
    }
    expected = None
    for moment, marker in first_commit.items():
        proc = _features(events, root, "nightly")
        _wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # The same command again completes the run: one copy of its rows and one runs row.
        code = main(_features_args(events, root, "nightly"))
        assert code == 0, (moment, capsys.readouterr())
        counts = {table: _rows(root, table) for table in TABLES if (root / table / "_delta_log").exists()}
        assert counts["runs"] == {"nightly": 1}, moment
        expected = expected or counts["user_features"]
        assert counts["user_features"] == expected, moment
        assert DeltaTable(str(root / "runs")).to_pandas().status.tolist() == ["succeeded"]

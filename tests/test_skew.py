"""A single user with a million events does not exhaust one task's memory.

The job runs in its own JVM with a 512 MB heap (local mode: all tasks share it), whose 127 MB of
Spark memory cannot hold the heavy user's events, so that holding them in memory anywhere would fail
it; every per-user step must stream or stay bounded, and the job's sorts spill to disk."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, long_lived_jvm_env

HEAVY_EVENTS = 1_000_000


@pytest.mark.slow
def test_a_user_with_a_million_events_on_a_small_heap(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "skew_job.py"), str(tmp_path), str(HEAVY_EVENTS)],
        capture_output=True, text=True, timeout=900, env=long_lived_jvm_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy["users"] == 501
    assert heavy["spilled_bytes"] > 0  # the events did not fit in memory, and the job went on
    assert heavy["events"] == HEAVY_EVENTS
    assert heavy["purchases"] == HEAVY_EVENTS // 200
    assert heavy["sessions"] == HEAVY_EVENTS // 100
    assert heavy["distinct_items"] == 50_000
    assert heavy["frequency"] == HEAVY_EVENTS // 200  # one purchase per 200 events, each in its own session

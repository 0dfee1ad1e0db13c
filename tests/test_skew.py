"""A single user with millions of events does not exhaust one task's memory.

The job runs in its own JVM with a 1 GB heap (local mode: all tasks share it), so that holding one
user's events in memory anywhere would fail it; every per-user step must stream or stay bounded."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, long_lived_jvm_env

HEAVY_EVENTS = 2_000_000


@pytest.mark.slow
def test_a_user_with_millions_of_events_on_a_small_heap(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "skew_job.py"), str(tmp_path), str(HEAVY_EVENTS)],
        capture_output=True, text=True, timeout=900, env=long_lived_jvm_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy["users"] == 501
    assert heavy["events"] == HEAVY_EVENTS
    assert heavy["purchases"] == HEAVY_EVENTS // 200
    assert heavy["sessions"] == HEAVY_EVENTS // 100
    assert heavy["distinct_items"] == 50_000
    assert heavy["frequency"] == HEAVY_EVENTS // 200  # one purchase per 200 events, each in its own session

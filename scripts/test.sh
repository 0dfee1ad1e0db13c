#!/usr/bin/env bash
# Set up and run the test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k ingest).
# The test files are spread over SEGSPARK_TEST_WORKERS processes (default: the machine's cores, at
# most 4; pytest-xdist, one file per worker at a time so that a file's fixtures are built once, the
# longest files first: tests/conftest.py's LONGEST_FIRST); the 25 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh || echo "test: without Chromium, tests/test_report.py fails (the rest runs)" >&2
bash scripts/install_mosquitto.sh || echo "test: without Mosquitto, tests/test_mqtt_stream.py fails (the rest runs)" >&2
cores=$(nproc 2>/dev/null || echo 2)
workers=${SEGSPARK_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec "${SEGSPARK_VENV:-.venv}/bin/python" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder --durations=25 "$@"

#!/usr/bin/env bash
# Set up and run the test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh || echo "test: without Chromium, tests/test_report.py fails (the rest runs)" >&2
exec "${SEGSPARK_VENV:-.venv}/bin/python" -m pytest "$@"

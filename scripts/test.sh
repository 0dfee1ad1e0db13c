#!/usr/bin/env bash
# Set up and run the test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

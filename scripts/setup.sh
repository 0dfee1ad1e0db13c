#!/usr/bin/env bash
# Create .venv and install segspark with its dev tools. Idempotent: a second run only checks.
# Needs Python 3.11+ and Java 17+; installs a headless JRE with apt when Java is missing and we are
# root on Debian/Ubuntu, otherwise stops with a clear message.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

java_major() {
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}

if [ "$(java_major)" -lt 17 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: Java 17+ not found; installing a headless JRE with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "setup: segspark needs Java 17 or newer for Spark (found: $(java -version 2>&1 | head -1 || echo none))." >&2
    echo "       Install a JDK/JRE 17+ (e.g. 'apt-get install openjdk-17-jre-headless' or 'brew install openjdk@17')" >&2
    echo "       and make 'java' available on PATH or set JAVA_HOME." >&2
    exit 2
  fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: segspark needs Python 3.11+ (found $("$PYTHON" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.segspark-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,mlflow]"
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), $(java -version 2>&1 | head -1))" >&2

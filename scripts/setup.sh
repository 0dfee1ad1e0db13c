#!/usr/bin/env bash
# Create .venv and install segspark with its dev tools. Idempotent: a second run only checks.
# Needs Python 3.11+ and Java 17+; installs a headless JRE with apt when Java is missing and we are
# root on Debian/Ubuntu, otherwise stops with a clear message.
#
# Installs from the lock (locks/py311-linux-x86_64.txt: exact versions with sha256 hashes, the set the
# suite passed with) on Python 3.11 / Linux x86-64, so every machine gets the same libraries. Elsewhere,
# or with SEGSPARK_LOCK=none, pip resolves pyproject.toml's ranges instead (what users get when they
# `pip install segspark` into their own environment). SEGSPARK_VENV picks another environment folder
# (scripts/lock.sh and scripts/test_latest.sh use that to test a new resolve beside .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${SEGSPARK_VENV:-.venv}
LOCK=${SEGSPARK_LOCK:-locks/py311-linux-x86_64.txt}

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

# The lock is for CPython 3.11 on Linux x86-64 (wheels and hashes are per platform).
platform=$("$PYTHON" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if [ "$LOCK" != none ] && [ "$platform" != "3.11-Linux-x86_64" ]; then
  echo "setup: the lock $LOCK is for Python 3.11 on Linux x86-64, this is $platform: installing from pyproject.toml's ranges" >&2
  LOCK=none
fi
if [ "$LOCK" != none ] && [ ! -f "$LOCK" ]; then
  echo "setup: lock file $LOCK not found (SEGSPARK_LOCK=none installs from pyproject.toml's ranges)" >&2
  exit 2
fi

# The venv starts without pip: venv's ensurepip (pip installing its bundled copy of itself) took 3.9 s
# on a fresh clone, and the lock's pip replaced that copy right after. The base interpreter's pip
# installs the lock's pip and build tools into it instead (`pip --python`, pip 22.3 or newer); without
# one, ensurepip runs as before (`venv_pip`).
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --without-pip "$VENV"
# `venv_pip ARGS...`: pip, installing into $VENV: its own pip, else the base interpreter's, else the one
# ensurepip puts there.
venv_pip() {
  if "$VENV/bin/python" -c 'import pip' 2>/dev/null; then
    "$VENV/bin/python" -m pip "$@"
  elif "$PYTHON" -m pip --version 2>/dev/null | awk '{split($2, v, "."); exit !(v[1] > 22 || (v[1] == 22 && v[2] >= 3))}'; then
    "$PYTHON" -m pip --python "$VENV/bin/python" "$@"
  else
    "$VENV/bin/python" -m ensurepip >/dev/null && "$VENV/bin/python" -m pip "$@"
  fi
}
# The stamp names what was installed: a changed lock or pyproject.toml installs again ("bytecode": an
# environment installed before its packages were compiled goes through the install once more).
want="bytecode lock=$LOCK $(cat pyproject.toml "$([ "$LOCK" = none ] && echo /dev/null || echo "$LOCK")" | sha256sum | cut -c1-16)"
stamp="$VENV/.segspark-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ "$LOCK" = none ]; then
    venv_pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[dev,mlflow]"
  else
    # Every package, pip and the build tools included, comes from the lock and is checked against its
    # hashes; segspark itself is then installed on top, without dependencies or a build environment.
    # The build tools go first: pyspark ships only as a source distribution, built without an isolated
    # build environment (which would fetch an unpinned setuptools).
    # The rest is installed by uv (from the lock too): the same files against the same hashes, in
    # about a fifth of pip's time on a fresh clone (unpacking TensorFlow and friends dominates).
    tools=$(mktemp)
    awk '/^(pip|setuptools|wheel|uv)==/ {keep=1} /^[A-Za-z0-9]/ && !/^(pip|setuptools|wheel|uv)==/ {keep=0} keep' "$LOCK" > "$tools"
    venv_pip install -q --require-hashes --no-deps -r "$tools"
    rm -f "$tools"
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --require-hashes --no-deps --no-build-isolation -r "$LOCK"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    # uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE is set (CI images, this
    # project's machines) Python then compiles every module on every import: `import tensorflow` took
    # 16 s instead of 6.6 s in every process that trains, and every Spark Python worker paid the same
    # for pandas, pyarrow and scikit-learn. Compiled here once, the editable segspark included (files
    # already compiled are skipped, so an environment uv left as it was is compiled too). The packages'
    # own test suites (tests/ and test/ folders: a fifth of the sources, never imported) are left out:
    # 14.5 s instead of 18.8 s on 2 cores.
    "$VENV/bin/python" -m compileall -q -j 0 -x '/tests?/' \
      "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" segspark >/dev/null
    "$VENV/bin/python" -m pip check >&2 || { echo "setup: the lock $LOCK is inconsistent (pip check above); rebuild it with scripts/lock.sh" >&2; exit 1; }
  fi
  echo "$want" > "$stamp"
fi
echo "setup: ready in $VENV ($("$VENV/bin/python" --version), $(java -version 2>&1 | head -1), $([ "$LOCK" = none ] && echo "pyproject.toml ranges" || echo "lock $LOCK"))" >&2

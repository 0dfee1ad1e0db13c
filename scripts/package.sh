#!/usr/bin/env bash
# Build what a Spark cluster needs to run segspark's jobs, under dist/ (not committed):
#   dist/segspark-<version>-py3-none-any.whl   segspark's wheel (python -m build)
#   dist/segspark-env.tar.gz                   a packed virtual environment for the executors
#                                              (venv-pack): segspark's wheel and the packages its
#                                              executor-side code imports (locks/executor.in), at the
#                                              lock's exact versions, checked against its hashes
#                                              (SEGSPARK_LOCK=none: the driver environment's versions),
#                                              with the machine code of segspark's numba KD-tree cached
# Submit with --archives dist/segspark-env.tar.gz#environment --conf spark.pyspark.python=./environment/bin/python
# (README, "Running on a cluster").
#
# The build tools (build, venv-pack, uv, setuptools, wheel, pip) are installed from the lock, with their
# hashes, into build/package-tools; .venv is not touched. The environment is built on this machine's
# Python 3.11 (the one .venv was made from, i.e. the driver's): venv-pack does not pack the
# interpreter, so the nodes need the same Python at the same path, or set SEGSPARK_PYTHON_PREFIX to
# the prefix of the nodes' Python 3.11 (venv-pack --python-prefix).
#
# Cache: the archive is rebuilt only when what goes into it changes. Its key (dist/segspark-env.key) is
# the sha256 of the executor packages' lock lines, the wheel's RECORD (the sha256 of every file in the
# wheel, so any change to segspark's code changes it), the interpreter, SEGSPARK_PYTHON_PREFIX and this
# script; with an archive of the same key in dist/, it is reused. The wheel is always rebuilt (seconds).
# SEGSPARK_REBUILD=1 rebuilds the archive regardless.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s%N)

LOCK=${SEGSPARK_LOCK:-locks/py311-linux-x86_64.txt}
# SEGSPARK_LOCK=none: the driver was installed from pyproject.toml's ranges (scripts/test_latest.sh), so
# the executors get the driver's installed versions (no hashes); the project lock still says which
# packages the executor packages need and provides the build tools.
FROM_DRIVER=
if [ "$LOCK" = none ]; then FROM_DRIVER=1; LOCK=locks/py311-linux-x86_64.txt; fi
VENV=${SEGSPARK_VENV:-.venv}
DIST=${SEGSPARK_DIST:-dist}
WORK=build/package
TOOLS=build/package-tools
ENV_NAME=segspark-env
ARCHIVE=$DIST/$ENV_NAME.tar.gz
PYTHON_PREFIX=${SEGSPARK_PYTHON_PREFIX:-}
numba_state=

[ -f "$LOCK" ] || { echo "package: lock file $LOCK not found" >&2; exit 2; }
# The executors' interpreter is the driver's: the base Python that .venv was created from.
if [ -x "$VENV/bin/python" ]; then
  PYTHON=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
else
  PYTHON=${PYTHON:-python3.11}
  command -v "$PYTHON" >/dev/null 2>&1 || { echo "package: no $VENV and no $PYTHON (run scripts/setup.sh)" >&2; exit 2; }
  PYTHON=$(command -v "$PYTHON")
fi
platform=$("$PYTHON" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if [ "$platform" != "3.11-Linux-x86_64" ]; then
  echo "package: the lock $LOCK is for Python 3.11 on Linux x86-64; $PYTHON is $platform" >&2
  exit 2
fi
mkdir -p "$DIST" "$WORK"

# 1. Build tools, from the lock with hashes (a stamp names the lock lines they came from).
tools_req=$WORK/tools.txt
awk '/^(pip|setuptools|wheel|build|pyproject-hooks|packaging|venv-pack|uv)==/ {keep=1; print; next}
     /^[A-Za-z0-9]/ {keep=0} keep && !/^ *#/' "$LOCK" > "$tools_req"
tools_key=$(sha256sum < "$tools_req" | cut -c1-16)
if [ ! -x "$TOOLS/bin/venv-pack" ] || [ "$(cat "$TOOLS/.installed" 2>/dev/null)" != "$tools_key" ]; then
  rm -rf "$TOOLS"
  if [ -x "$VENV/bin/uv" ]; then
    # With the driver environment's uv (scripts/setup.sh installs it from the lock): the same lock lines
    # and hashes, in 1-2 s instead of 8 (venv's ensurepip and pip's own start-up).
    "$VENV/bin/uv" venv -q --python "$PYTHON" "$TOOLS"
    "$VENV/bin/uv" pip install -q --python "$TOOLS/bin/python" --require-hashes --no-deps -r "$tools_req"
  else
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$tools_req"
  fi
  echo "$tools_key" > "$TOOLS/.installed"
fi

# 2. The wheel, built from a copy of the sources (no egg-info or build/lib left in the tree, and no
# stale file of an earlier build in the wheel), without an isolated build environment: setuptools
# and wheel are the lock's.
wheel_start=$(date +%s%N)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp pyproject.toml README.md "$src/"
(tar cf - --exclude=__pycache__ --exclude='*.pyc' segspark) | (cd "$src" && tar xf -)
rm -f "$DIST"/segspark-*.whl
"$TOOLS/bin/python" -m build --wheel --no-isolation --outdir "$DIST" "$src" > "$WORK/build-wheel.log" 2>&1 \
  || { cat "$WORK/build-wheel.log" >&2; echo "package: building the wheel failed" >&2; exit 1; }
wheel=$(ls "$DIST"/segspark-*.whl)
wheel_ms=$(( ($(date +%s%N) - wheel_start) / 1000000 ))

# 3. The executors' environment: the executor packages (locks/executor.in and what they need, with the
# lock's versions and hashes) and the wheel, in a venv without pip, packed with venv-pack.
executor_req=$WORK/executor-requirements.txt
installed=()
if [ -n "$FROM_DRIVER" ]; then
  [ -x "$VENV/bin/python" ] || { echo "package: SEGSPARK_LOCK=none needs the driver's environment $VENV" >&2; exit 2; }
  "$VENV/bin/python" -c 'from importlib import metadata
for d in metadata.distributions(): print(d.name + "==" + d.version)' > "$WORK/driver-installed.txt"
  installed=("$WORK/driver-installed.txt")
fi
packages=$("$TOOLS/bin/python" scripts/executor_requirements.py "$LOCK" locks/executor.in "$executor_req" "${installed[@]}")
record=$("$TOOLS/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    print(next(wheel.read(n) for n in wheel.namelist() if n.endswith(".dist-info/RECORD")).decode())
EOF
)
key=$({ cat "$executor_req"; echo "$record"; "$PYTHON" -VV; echo "$PYTHON $PYTHON_PREFIX"; cat "$0"; } | sha256sum | cut -c1-32)
if [ -f "$ARCHIVE" ] && [ "$(cat "$DIST/$ENV_NAME.key" 2>/dev/null)" = "$key" ] && [ -z "${SEGSPARK_REBUILD:-}" ]; then
  state="reused (same key $key)"
else
  rm -f "$ARCHIVE" "$DIST/$ENV_NAME.key"
  env_dir=$WORK/$ENV_NAME
  rm -rf "$env_dir"
  "$PYTHON" -m venv --without-pip "$env_dir"
  # uv, not pip, installs into the environment: the same lock lines and hashes, several times faster.
  pip_into=("$TOOLS/bin/uv" pip install -q --python "$env_dir/bin/python" --no-deps)
  if [ -n "$FROM_DRIVER" ]; then "${pip_into[@]}" -r "$executor_req"; else "${pip_into[@]}" --require-hashes -r "$executor_req"; fi
  "${pip_into[@]}" "$wheel"
  # The archive carries .pyc files (uv writes none), else every Python worker compiles what it
  # imports, on every start where PYTHONDONTWRITEBYTECODE is set. The modules that are the same files
  # as .venv's (uv links both from its cache) get .venv's compiled ones (scripts/link_bytecode.py);
  # the rest (segspark's wheel among them) is compiled here, the packages' own tests aside (left out
  # of the archive below). The whole script then took 24 cpu-s instead of 35-36 (SEGSPARK_REBUILD=1).
  env_site=$(cd "$env_dir" && echo "$(pwd)"/lib/python3.*/site-packages)
  bytecode="compiled"
  if [ -x "$VENV/bin/python" ]; then
    venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    bytecode="$("$TOOLS/bin/python" scripts/link_bytecode.py "$venv_site" "$env_site") .pyc files linked from $VENV, the rest compiled"
  fi
  "$env_dir/bin/python" -m compileall -q -j 0 -x '/tests?/' "$env_site" >/dev/null
  # What the executors import must import here, with pyspark from the Spark installation only (as on
  # a cluster's nodes): a package missing from locks/executor.in fails the build, not a job. Run from an
  # empty folder: `python -c` puts the working folder (here the checkout, with its segspark) first on
  # sys.path.
  env_python=$(cd "$env_dir" && pwd)/bin/python
  site=$env_site
  neutral=$(pwd)/$WORK/neutral
  rm -rf "$neutral" && mkdir -p "$neutral"
  spark_home=$("$VENV/bin/python" -c 'from pyspark.find_spark_home import _find_spark_home; print(_find_spark_home())')
  (cd "$neutral" && PYTHONPATH=$(ls "$spark_home"/python/lib/pyspark.zip "$spark_home"/python/lib/py4j-*-src.zip | paste -sd:) \
    PYTHONNOUSERSITE=1 "$env_python" -c '
import importlib, sys
import segspark
assert segspark.__file__.startswith(sys.argv[1]), f"segspark imported from {segspark.__file__}, not {sys.argv[1]}"
for name in ("segspark.models.deep.scoring", "segspark.models.sample_grid", "segspark.models.gmm", "segspark.models.kmeans",
             "segspark.models.bisecting", "segspark.models.prepare", "segspark.models.deep.density",
             "segspark.models.deep.encoder", "segspark.models.deep.knn", "segspark.datagen"):
    importlib.import_module(name)
assert "tensorflow" not in sys.modules, "tensorflow imported on the executor side"
' "$site") || { echo "package: the executor environment cannot import segspark's executor code (locks/executor.in)" >&2; exit 1; }
  # HDBSCAN assignment's KD-tree (segspark/models/deep/knn.py) compiled into the environment's numba
  # cache, beside the module: each Python worker of every application would otherwise compile it
  # (~8 s of CPU). Numba keys its cache by the source's content and the CPU, not the path, so an
  # archive unpacked anywhere loads it; checked from a copy of the package in another folder.
  (cd "$neutral" && env -u NUMBA_CACHE_DIR PYTHONNOUSERSITE=1 "$env_python" -c '
from segspark.models.deep.knn import compile_ahead
compile_ahead()')
  cp -r "$site/segspark" "$neutral/"
  numba_cache=$(cd "$neutral" && env -u NUMBA_CACHE_DIR PYTHONNOUSERSITE=1 "$env_python" -c '
import sys
from segspark.models.deep import knn
assert knn.__file__.startswith(sys.argv[1]), knn.__file__
print(", ".join(f"{name} {how}" for name, how in knn.compile_ahead().items()))' "$neutral")
  rm -rf "$neutral"
  case "$numba_cache" in
    *compiled*) echo "package: warning: the KD-tree's machine code is not found from another folder ($numba_cache): executors will compile it" >&2 ;;
    *) numba_state="compiled ahead, loaded from another folder: $numba_cache" ;;
  esac
  # The packages' own test suites (over 40% of the files) are left out; the .pyc files are kept (each
  # Python worker would otherwise compile what it imports).
  "$TOOLS/bin/venv-pack" -q -p "$env_dir" -o "$ARCHIVE" --exclude 'lib/python*/site-packages/*/tests/*' \
    ${PYTHON_PREFIX:+--python-prefix "$PYTHON_PREFIX"}
  echo "$key" > "$DIST/$ENV_NAME.key"
  state="built"
fi

total_ms=$(( ($(date +%s%N) - start) / 1000000 ))
size() { stat -c %s "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
echo "package: wheel   $wheel ($(size "$wheel"), built in $(( wheel_ms / 1000 )).$(( wheel_ms % 1000 / 100 )) s)"
echo "package: archive $ARCHIVE ($(size "$ARCHIVE"), $state)"
echo "package:         executor packages: $packages"
echo "package:         interpreter $PYTHON${PYTHON_PREFIX:+, linked as $PYTHON_PREFIX on the nodes}"
[ -z "${bytecode:-}" ] || echo "package:         bytecode: $bytecode"
[ -z "${numba_state:-}" ] || echo "package:         numba KD-tree: $numba_state"
echo "package: done in $(( total_ms / 1000 )).$(( total_ms % 1000 / 100 )) s"

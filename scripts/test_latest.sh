#!/usr/bin/env bash
# Run the suite against a fresh resolve of pyproject.toml's ranges (what a user who installs segspark
# into a new environment gets today), in .venv-latest, and report the drift from the lock: the
# packages whose newest allowed version differs from the locked one. Run it before a release and
# whenever the lock is refreshed; a failure here is a release blocker that the lock hides.
#   scripts/test_latest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=locks/py311-linux-x86_64.txt
rm -rf .venv-latest
SEGSPARK_VENV=.venv-latest SEGSPARK_LOCK=none bash scripts/setup.sh
echo "test_latest: drift from $LOCK (locked -> resolved today):" >&2
.venv-latest/bin/python - "$LOCK" <<'PY' >&2
import re, sys
from importlib import metadata
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = dict(
    (norm(m.group(1)), m.group(2))
    for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", open(sys.argv[1]).read(), re.M)
)
drift = 0
for dist in sorted(metadata.distributions(), key=lambda d: norm(d.metadata["Name"])):
    name = norm(dist.metadata["Name"])
    if name in locked and locked[name] != dist.version:
        print(f"  {name}: {locked[name]} -> {dist.version}")
        drift += 1
print(f"  {drift} package(s) differ" if drift else "  none: today's resolve equals the lock")
PY
SEGSPARK_VENV=.venv-latest SEGSPARK_LOCK=none bash scripts/test.sh -q "$@"

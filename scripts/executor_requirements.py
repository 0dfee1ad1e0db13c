"""Write the part of the lock that Spark executors need: the packages of locks/executor.in and every
package the lock says they depend on, with the lock's exact versions and hashes.

    python scripts/executor_requirements.py locks/py311-linux-x86_64.txt locks/executor.in OUT [INSTALLED]

The dependencies come from the lock's `# via` notes (uv writes, under every package, the packages
that require it), so nothing is resolved again and the result is a subset of what the driver has.
With INSTALLED (a file of `name==version` lines: what the driver's environment holds, for a driver
installed from the ranges rather than the lock, SEGSPARK_LOCK=none), the same packages are pinned to
the driver's versions instead, without hashes. Prints the package names, one line. Used by
scripts/package.sh.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
VIA_ONE = re.compile(r"^\s+# via (\S.*)$")
VIA_ITEM = re.compile(r"^\s+#\s{3}(\S.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Per package: its lines in the lock, and the packages that require it."""
    blocks: dict[str, list[str]] = {}
    parents: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        match = ENTRY.match(line)
        if match:
            current = canonical(match.group(1))
            blocks[current] = [line]
            parents[current] = set()
            continue
        if current is None or not line.startswith(" "):
            current = None
            continue
        blocks[current].append(line)
        via = VIA_ONE.match(line) or VIA_ITEM.match(line)
        if via:
            parent = via.group(1).split(" (")[0].strip()
            if not parent.startswith("-r "):
                parents[current].add(canonical(parent.split("[")[0]))
    return blocks, parents


def closure(roots: list[str], parents: dict[str, set[str]]) -> list[str]:
    missing = [root for root in roots if root not in parents]
    if missing:
        raise SystemExit(f"executor packages not in the lock: {', '.join(missing)}")
    wanted = set(roots)
    changed = True
    while changed:
        changed = False
        for name, required_by in parents.items():
            if name not in wanted and required_by & wanted:
                wanted.add(name)
                changed = True
    return sorted(wanted)


def main(lock: str, roots_file: str, out: str, installed: str | None = None) -> None:
    blocks, parents = parse_lock(Path(lock).read_text())
    roots = [
        canonical(line.split("#")[0].strip())
        for line in Path(roots_file).read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    names = closure(roots, parents)
    if installed is None:
        body = "\n".join(line for name in names for line in blocks[name] if not line.lstrip().startswith("#"))
        source = lock
    else:
        versions = {}
        for line in Path(installed).read_text().splitlines():
            name, _, version = line.partition("==")
            versions[canonical(name)] = version.strip()
        absent = [name for name in names if name not in versions]
        if absent:
            raise SystemExit(f"executor packages not installed in the driver's environment: {', '.join(absent)}")
        body = "\n".join(f"{name}=={versions[name]}" for name in names)
        source = f"the driver's environment ({installed}), packages chosen by {lock}"
    Path(out).write_text(f"# Executor packages: {roots_file} and their dependencies, from {source}\n{body}\n")
    print(" ".join(names))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])

"""Give a new environment the compiled bytecode of another one that holds the same source files.

    python scripts/link_bytecode.py FROM_SITE_PACKAGES TO_SITE_PACKAGES

scripts/package.sh builds the executors' environment with uv from the same cache as the driver's
`.venv`, and uv links each installed file from that cache: a module of the same version is then
the same file (inode) in both environments, with the mtime and size its .pyc records. For every
such module the .pyc that FROM holds (scripts/setup.sh compiled `.venv`) is hard-linked into TO
(copied where a link cannot be made). A module whose source is not the very same file gets
nothing here; the caller compiles what is still missing afterwards (`compileall` skips every .pyc
that matches its source). Compiling the whole environment again took about 16 s of CPU.

Prints how many .pyc files were linked.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys


def link_bytecode(source_site: str, target_site: str) -> int:
    linked = 0
    for folder, subfolders, files in os.walk(target_site):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        for name in files:
            if not name.endswith(".py"):
                continue
            target = os.path.join(folder, name)
            source = os.path.join(source_site, os.path.relpath(target, target_site))
            try:
                if not os.path.samefile(source, target):
                    continue  # another file (another version, or not linked by uv): compiled afterwards
            except OSError:
                continue
            compiled = importlib.util.cache_from_source(source)
            if not os.path.isfile(compiled):
                continue
            destination = importlib.util.cache_from_source(target)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            if os.path.exists(destination):
                continue
            try:
                os.link(compiled, destination)
            except OSError:
                shutil.copy2(compiled, destination)
            linked += 1
    return linked


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(link_bytecode(sys.argv[1], sys.argv[2]))

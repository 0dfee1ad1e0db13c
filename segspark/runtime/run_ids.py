"""Run ids: the one pattern every run id must match, and deletes kept inside the folders segspark owns.

A run id becomes a folder name (`output.root/_models/<run_id>`, `output.root/_reports/<run_id>`) and
a Delta predicate value, so it is checked wherever it enters: the CLI's `--run-id`, the library's
`usecases.run(run_id=...)`, and ids read back from tables (`segspark train` takes the latest features
run from `runs`, `segspark report` the latest run with segments).

RUN_ID_PATTERN: 1 to 128 characters, letters, digits, `.`, `_` and `-`, starting with a letter or a
digit, and no `..` anywhere. So an id is never a path separator, `.`, `..` or a hidden name, and means
the same folder on every file system and object store. The default id (`20261031T120000Z-1a2b3c`)
matches it.

Stream namespace: `segspark stream` writes its quarantine rows under `<streaming.app_id>-<batch id>`
and its `runs` row under `<streaming.app_id>-<start time>`. A batch run id that starts with
`<streaming.app_id>-`, or with `segspark-stream` (the default app id, reserved whatever the config
says), is refused, so that a batch run can never replace a stream batch's rows or the reverse.

Deletes: `remove_owned` removes a folder only when its resolved path (symbolic links and `..`
followed) lies strictly inside the resolved folder that segspark owns for it (`_models`, say).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from segspark.errors import UsageError

log = logging.getLogger(__name__)

RUN_ID_PATTERN = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"
# The default streaming.app_id: its namespace is reserved for streams even when a config names another.
STREAM_NAMESPACE = "segspark-stream"


class RunIdError(UsageError):
    """A run id that does not match RUN_ID_PATTERN or lies in a stream's namespace (exit code 2)."""


def check_run_id(run_id: object, source: str = "--run-id") -> str:
    """`run_id` when it matches RUN_ID_PATTERN; RunIdError naming `source` (where it came from) otherwise."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise RunIdError(
            f"{source} {run_id!r} is not a valid run id: expected {RUN_ID_RULE} "
            "(e.g. daily-2026-10-31); run ids become folder names under output.root. Choose another id"
        )
    return run_id


def check_batch_run_id(run_id: object, app_id: str, source: str = "--run-id") -> str:
    """`check_run_id`, and not in a stream's namespace (`<app_id>-...` or `segspark-stream...`)."""
    checked = check_run_id(run_id, source)
    for prefix in dict.fromkeys((f"{app_id}-", STREAM_NAMESPACE)):
        if checked.startswith(prefix):
            raise RunIdError(
                f"{source} {checked!r} starts with {prefix!r}, which is reserved for `segspark stream` "
                f"(its batches write rows under <streaming.app_id>-<batch id>, app id {app_id!r}); "
                "a batch run under this id would replace a stream batch's rows. Choose another id"
            )
    return checked


def owned_child(owner: str | Path, run_id: str) -> Path:
    """`owner/run_id` for a valid run id, checked to resolve to a folder directly inside `owner`."""
    path = Path(owner) / check_run_id(run_id, "run id")
    _check_inside(path, owner)
    return path


def remove_owned(path: str | Path, owner: str | Path) -> None:
    """Delete the folder `path` (if there) after checking that it resolves strictly inside `owner`."""
    target = _check_inside(path, owner)
    if Path(path).is_symlink():
        raise UsageError(f"refusing to delete {str(path)!r}: it is a symbolic link (to {str(target)!r}), not a folder "
                         f"segspark wrote under {str(owner)!r}; remove it yourself")
    if target.exists():
        log.debug("removing %s (inside %s)", target, owner)
        shutil.rmtree(target)


def _check_inside(path: str | Path, owner: str | Path) -> Path:
    target, root = Path(path).resolve(), Path(owner).resolve()
    if target == root or root not in target.parents:
        raise UsageError(
            f"refusing to touch {str(path)!r}: it resolves to {str(target)!r}, which is not inside {str(root)!r}, "
            "the folder segspark owns for it. Check the run id and output.root (and any symbolic links there)"
        )
    return target


__all__ = ["RUN_ID_PATTERN", "RUN_ID_RULE", "STREAM_NAMESPACE", "RunIdError", "check_batch_run_id", "check_run_id",
           "owned_child", "remove_owned"]

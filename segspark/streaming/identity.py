"""Stream identity: which checkpoint owns an app_id's commits, checked before the first batch, and a
lock that keeps two live streams off one app_id.

Exactly-once rests on the Delta transaction `<app_id>.<table>` of each commit: a batch whose id the
table's txn version already reaches is skipped. That is right for a query restarted from its own
checkpoint and silently wrong for any other query with the same app_id: a deleted checkpoint numbers
its batches from 0 again, so every batch up to the old high-water mark would be skipped as "already
committed" (its events lost), and two streams on one app_id would skip each other's batches. So:

- every commit of a stream records its app id and the checkpoint's query id (Spark's
  `StreamingQuery.id`, kept in `<checkpoint>/metadata` across restarts) in the commit's metadata,
  next to the txn (`commit_metadata`; also the `query_id` column of `stream_batches`);
- before the query starts, `check_identity` compares the checkpoint with the tables and refuses
  (exit 2, saying how to start afresh) a checkpoint that is new, belongs to another query, or has not
  reached the batches the tables hold; `confirm_query` repeats the owner check with the id of the
  started query, before its first batch is let through (for checkpoints that cannot be read here);
- `StreamLock`: an exclusive OS file lock (`fcntl.flock`) on `<output.root>/_checkpoints/<app_id>.lock`
  held while the stream runs. The kernel drops it when the process ends, kill -9 included, so it is
  never stale; the file names the holder (pid, host, checkpoint, query id) for the second stream's
  message. Object-store output roots cannot be locked this way: a warning says so, and the
  identity check still refuses a checkpoint that does not own the tables.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from segspark.errors import UsageError
from segspark.io.delta import commit_history, transaction_version

log = logging.getLogger(__name__)

APP_KEY = "segsparkStreamAppId"  # commitInfo keys of every stream commit
QUERY_KEY = "segsparkStreamQueryId"
HISTORY_LIMIT = 200  # commits per table searched for the app's latest one (other apps may interleave)
AFRESH = "README, 'Starting a stream afresh'"

try:  # POSIX only; elsewhere the stream runs unlocked (with a warning)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class StreamRefused(UsageError):
    """The stream may not start: another live stream holds its app_id, or its checkpoint and its
    tables disagree about who wrote them (exit 2)."""


def commit_metadata(app_id: str, query_id: str | None) -> dict[str, str]:
    """What a stream records in each commit next to its txn."""
    return {APP_KEY: app_id, QUERY_KEY: query_id} if query_id else {APP_KEY: app_id}


# --- the checkpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointState:
    path: str
    readable: bool  # False: a location this process cannot list (then only confirm_query checks)
    query_id: str | None = None  # from <checkpoint>/metadata; None: a new checkpoint
    last_batch: int | None = None  # the highest batch id in <checkpoint>/offsets (planned batches)


def read_checkpoint(path: str) -> CheckpointState:
    """The query id and the last planned batch of a Structured Streaming checkpoint (Spark's own
    layout: `metadata` holds {"id": ...}, `offsets/<batch id>` one file per planned batch)."""
    local = local_path(path)
    if local is None:
        log.warning("stream: checkpoint %s is not a local path; its query id is checked once the query starts", path)
        return CheckpointState(path, readable=False)
    query_id = None
    try:
        first = (local / "metadata").read_text().splitlines()[0]
        query_id = str(json.loads(first)["id"])
    except FileNotFoundError:
        pass
    except (OSError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise StreamRefused(
            f"stream checkpoint {path}: its metadata file cannot be read ({type(exc).__name__}: {exc}); it was "
            f"damaged or is not a Structured Streaming checkpoint. Restore it, or start afresh ({AFRESH})"
        ) from None
    batches = [int(p.name) for p in (local / "offsets").glob("*") if p.name.isdigit()] if (local / "offsets").is_dir() else []
    return CheckpointState(path, True, query_id, max(batches, default=None))


def local_path(path: str) -> Path | None:
    """A plain path or file: URI as a local Path; None for other schemes (object stores)."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if len(parsed.scheme) <= 1:  # no scheme (or a Windows drive letter)
        return Path(path)
    return None


# --- the tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableCommits:
    table: str
    version: int  # the app's high-water batch id in this table (its txn version)
    query_id: str | None  # recorded with the app's latest commit; None: none found (older segspark)


def committed_batches(tables: Mapping[str, str], app_id: str) -> list[TableCommits]:
    """For each table path -> txn app id that holds commits of the app: its txn version and the
    query id recorded with the app's latest commit in the table."""
    found = []
    for path, txn_app in tables.items():
        version = transaction_version(path, txn_app)
        if version is None:
            continue
        found.append(TableCommits(path, version, _recorded_query(path, app_id)))
    return found


def _recorded_query(path: str, app_id: str) -> str | None:
    for entry in commit_history(path, HISTORY_LIMIT):  # newest first
        recorded = {**entry, **_user_metadata(entry.get("userMetadata"))}
        if recorded.get(APP_KEY) == app_id:
            return recorded.get(QUERY_KEY)
    return None


def _user_metadata(text: object) -> dict:
    """The JSON the Delta connector writes as userMetadata (custom keys are top-level with delta-rs)."""
    if not isinstance(text, str):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _owner(commits: list[TableCommits]) -> TableCommits | None:
    """The commit of the table that got furthest, with a recorded query id."""
    recorded = [c for c in commits if c.query_id]
    return max(recorded, key=lambda c: c.version) if recorded else None


# --- the checks ----------------------------------------------------------------------------------


def check_identity(app_id: str, root: str, checkpoint: CheckpointState, commits: list[TableCommits]) -> None:
    """Refuse (StreamRefused) a checkpoint that does not own the app's batches in the tables."""
    if not commits:
        if checkpoint.last_batch is not None:
            log.warning(
                "stream %s: checkpoint %s has read up to batch %d, but no table under %s holds a batch of this "
                "app_id: the files it read before are not read again", app_id, checkpoint.path,
                checkpoint.last_batch, root,
            )
        return
    high = max(commits, key=lambda c: c.version)
    owner = _owner(commits)
    held = (f"the tables under {root} already hold micro-batches of this app_id up to batch {high.version} "
            f"({Path(high.table).name}{f', written by query {owner.query_id}' if owner else ''})")
    if not checkpoint.readable:
        return  # confirm_query checks the owner once the query has its id
    if checkpoint.query_id is None:
        raise StreamRefused(
            f"stream app_id {app_id!r}: checkpoint reset or another stream uses app_id {app_id!r}: {held}, but the "
            f"checkpoint {checkpoint.path} is new. A new checkpoint numbers its batches from 0 again, so every batch up "
            f"to {high.version} would be skipped as already committed and its events lost. Resume with the checkpoint "
            f"that wrote them, or to start afresh give the stream a new streaming.app_id (--set "
            f"streaming.app_id={app_id}-2; its checkpoint defaults to _checkpoints/<app_id>) after moving the files "
            f"already processed out of the landing folder, or use a new output.root ({AFRESH})"
        )
    if owner is not None and owner.query_id != checkpoint.query_id:
        raise _other_query(app_id, held, checkpoint.path, checkpoint.query_id, owner.query_id)
    if checkpoint.last_batch is None or checkpoint.last_batch < high.version:
        planned = "no batch" if checkpoint.last_batch is None else f"batches up to {checkpoint.last_batch}"
        raise StreamRefused(
            f"stream app_id {app_id!r}: {held}, but checkpoint {checkpoint.path} (query {checkpoint.query_id}) has "
            f"planned {planned}: its next batches would be skipped as already committed and their events lost. The "
            f"checkpoint is older than the tables (restored from a backup?) or belongs to another stream. Resume with "
            f"the checkpoint that wrote batch {high.version}, or start afresh with a new streaming.app_id ({AFRESH})"
        )


def confirm_query(app_id: str, root: str, checkpoint: CheckpointState, commits: list[TableCommits], query_id: str) -> None:
    """After the query started (before its first batch runs): its id must be the tables' owner's."""
    owner = _owner(commits)
    if owner is not None and owner.query_id != query_id:
        high = max(commits, key=lambda c: c.version)
        held = (f"the tables under {root} already hold micro-batches of this app_id up to batch {high.version} "
                f"({Path(high.table).name}, written by query {owner.query_id})")
        raise _other_query(app_id, held, checkpoint.path, query_id, owner.query_id)


def _other_query(app_id: str, held: str, checkpoint: str, mine: str, theirs: str) -> StreamRefused:
    return StreamRefused(
        f"stream app_id {app_id!r}: another stream uses app_id {app_id!r}, or its checkpoint was replaced: {held}, "
        f"but checkpoint {checkpoint} belongs to query {mine}. Two queries on one app_id skip each other's batches. "
        f"Resume with the checkpoint of query {theirs}, or give this stream its own streaming.app_id ({AFRESH})"
    )


# --- the lock ------------------------------------------------------------------------------------


class StreamLock:
    """An exclusive lock on one app_id under one output root, held while a stream runs."""

    def __init__(self, root: str, app_id: str):
        self.app_id = app_id
        base = local_path(root.rstrip("/") or "/")
        self.path = None if base is None else base / "_checkpoints" / f"{app_id}.lock"
        self._fd: int | None = None
        self._holder: dict = {}

    def acquire(self, **holder) -> StreamLock:
        """Take the lock or raise StreamRefused naming its holder; `holder` is recorded in the file."""
        if self.path is None or fcntl is None:
            log.warning("stream %s: no lock on %s (not a local file system): nothing keeps a second stream with this "
                        "app_id from starting", self.app_id, self.path or "this output.root")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StreamRefused(self._held_message()) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._holder = {"app_id": self.app_id, "pid": os.getpid(), "host": socket.gethostname(),
                        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **holder}
        self._write()
        log.info("stream %s: lock %s taken", self.app_id, self.path)
        return self

    def update(self, **fields) -> None:
        """Add to what the lock file says about its holder (the query id, once the query started)."""
        if self._fd is not None:
            self._holder.update(fields)
            self._write()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # the file stays (removing it would race a waiting stream); empty = free
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
        log.info("stream %s: lock %s released", self.app_id, self.path)

    def __enter__(self) -> StreamLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _write(self) -> None:
        data = (json.dumps(self._holder, sort_keys=True, default=str) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _held_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started_at')} (checkpoint "
               f"{holder.get('checkpoint')}, query {holder.get('query_id', 'starting')})" if holder else "another process")
        return (
            f"stream app_id {self.app_id!r} is already running: {who} holds the lock {self.path}. Two live streams "
            f"on one app_id would skip each other's batches. Stop that stream first, or give this one its own "
            f"streaming.app_id (and checkpoint)"
        )


__all__ = [
    "APP_KEY", "QUERY_KEY", "CheckpointState", "StreamLock", "StreamRefused", "TableCommits", "check_identity",
    "commit_metadata", "committed_batches", "confirm_query", "read_checkpoint",
]

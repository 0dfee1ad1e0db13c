"""What the use cases share: the run record (`RunResult`), the stage timer, the frames a run keeps
cached, and `execute`, which records every run in the `runs` table whether it succeeds or fails."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from segspark.config import Config
from segspark.io.catalog import RunRow
from segspark.io.readers import corrupt_file_error
from segspark.io.tables import check_output, table_path, write_rows
from segspark.runtime import progress
from segspark.runtime.redaction import redact_text
from segspark.runtime.run_ids import check_batch_run_id
from segspark.runtime.session import apply_required_conf
from segspark.runtime.shuffle_sizing import (
    ADAPTIVE,
    apply_settings,
    settings_for,
    sized_partitions,
    sizing_is_on,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    as_of: dt.date | None
    status: str = "running"
    input_rows: int = 0
    clean_rows: int = 0
    quarantined_rows: int = 0
    users: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    segments: list[dict] = field(default_factory=list)  # model, segment, name, size
    tables: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]



@dataclass
class RunContext:
    """One run in progress: its session and config, its record, and the frames it keeps cached
    (unpersisted when the run ends, however it ends)."""

    spark: SparkSession
    cfg: Config
    result: RunResult
    started_at: dt.datetime
    cached: list[DataFrame] = field(default_factory=list)
    session_settings: dict[str, str] | None = None  # the session's own, while the run has sized ones

    @property
    def run_id(self) -> str:
        return self.result.run_id

    def size_shuffles(self, records: DataFrame) -> DataFrame:
        """With spark.shuffle_partitions `auto`, this run's shuffle partitions sized from the input
        `records`, and adaptive execution off where that is one partition (runtime/shuffle_sizing.py),
        until the run ends. Returns `records`."""
        if not sizing_is_on(self.spark, self.cfg.spark):
            return records
        sized = sized_partitions(records, self.cfg.input.format)
        if sized is not None:
            partitions, size = sized
            settings = settings_for(partitions)
            previous = apply_settings(self.spark, settings)
            if self.session_settings is None:
                self.session_settings = previous
            adaptive = str(self.spark.conf.get(ADAPTIVE)).lower() == "true"
            self.result.metrics["shuffle_partitions"] = {"partitions": partitions, "input_bytes": size,
                                                         "adaptive": adaptive}
            log.info("shuffle partitions: %d for %.1f MB of %s input (spark.shuffle_partitions auto)%s",
                     partitions, size / 1e6, self.cfg.input.format, "" if adaptive else ", adaptive execution off")
        return records

    def restore_session(self) -> None:
        """The session's own shuffle partitions (and adaptive execution) again: a notebook's session
        outlives the run."""
        if self.session_settings is not None:
            apply_settings(self.spark, self.session_settings)
            self.session_settings = None

    def keep(self, frame: DataFrame) -> DataFrame:
        """`frame`, persisted until the run ends."""
        kept = frame.persist(StorageLevel.MEMORY_AND_DISK)
        self.cached.append(kept)
        return kept

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Times a stage and logs one line with its row counts when it ends."""
        counts: dict = {}
        start = time.perf_counter()
        progress.stage_started(name, counts)
        try:
            yield counts
        finally:
            progress.stage_finished(name)
        seconds = time.perf_counter() - start
        self.result.stage_seconds[name] = round(seconds, 3)
        detail = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in counts.items())
        log.info("stage %-9s %6.1f s  %s", name, seconds, detail)


def begin(spark: SparkSession, cfg: Config, run_id: str | None) -> None:
    """Checks made before anything is read or written: a run id names folders and rows, so an invalid
    one is refused first; catalog output needs the Delta connector."""
    if run_id is not None:
        check_batch_run_id(run_id, cfg.streaming.app_id)
    apply_required_conf(spark)
    check_output(spark, cfg.output)


def execute(ctx: RunContext, body: Callable[[RunContext], None]) -> RunResult:
    """Run `body` as run `ctx.run_id` and record the run in the `runs` table, also when it fails."""
    spark, cfg, result = ctx.spark, ctx.cfg, ctx.result
    log.info("run %s starting (config hash %s)", result.run_id, cfg.config_hash()[:12])
    try:
        body(ctx)
        result.status = "succeeded"
    except BaseException as exc:
        result.status = "failed"
        # A file the first read got through but a later stage's re-read did not: still the file's fault.
        unreadable = corrupt_file_error(exc, cfg.input) if isinstance(exc, Exception) else None
        failure = unreadable or exc
        result.metrics["error"] = redact_text(f"{type(failure).__name__}: {failure}")[:2000]
        if unreadable is not None:
            raise unreadable from None
        raise
    finally:
        for df in ctx.cached:
            df.unpersist()
        ctx.restore_session()
        _record_run(spark, cfg, result, ctx.started_at)
    return result


def _record_run(spark: SparkSession, cfg: Config, result: RunResult, started_at: dt.datetime) -> None:
    metrics = {**result.metrics, "stage_seconds": result.stage_seconds, "quarantine_reasons": result.reasons}
    row = RunRow(
        run_id=result.run_id,
        started_at=started_at,
        finished_at=dt.datetime.now(dt.UTC),
        status=result.status,
        config_hash=cfg.config_hash(),
        as_of=result.as_of,
        input_rows=result.input_rows,
        clean_rows=result.clean_rows,
        quarantined_rows=result.quarantined_rows,
        users=result.users,
        metrics=json.dumps(metrics, sort_keys=True, default=str),
    )
    try:
        write_rows(spark, cfg.output, "runs", [row], result.run_id)
        result.tables["runs"] = table_path(cfg.output, "runs")
    except Exception:
        if result.status == "succeeded":
            raise
        # The run already failed; keep its original error as the one reported.
        log.exception("could not record failed run %s in the runs table", result.run_id)

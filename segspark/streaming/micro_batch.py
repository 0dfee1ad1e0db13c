"""One micro-batch of a stream through the batch ingest, exactly once, and the query that drives it.

`ingest_micro_batch` types and tags a micro-batch's records with the batch runs' own ingest
(`ingest.ingest_records`: same rules, same reasons, same quarantine rows) and writes its quarantine rows under the run id
`<app_id>-<batch_id>` in one Delta commit that carries the transaction (`<app_id>.quarantine`,
batch id). A batch replayed after a failure (Spark re-runs the last micro-batch when its commit
did not reach the checkpoint) finds that transaction already in the table and writes nothing again.
Every record is counted: input = clean + quarantined, per batch.

`start_stream` runs a callback for every micro-batch of the configured source with the checkpoint
from `streaming.checkpoint`; `available_now` processes what is there and stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession

from segspark.config import Config
from segspark.ingest import Ingested, ingest_records, write_quarantine
from segspark.ingest.privacy import Protection, resolve_protection
from segspark.io.catalog import TABLES
from segspark.io.readers import check_required_columns
from segspark.streaming.source import read_event_stream

log = logging.getLogger(__name__)


@dataclass
class IngestedBatch(Ingested):
    """A micro-batch's tagged records and counts (`tagged` persisted: `unpersist` when the batch is done)."""

    batch_id: int = 0
    run_id: str = ""
    replayed: bool = False  # the quarantine commit of this batch id was already in the table


def batch_run_id(cfg: Config, batch_id: int) -> str:
    return f"{cfg.streaming.app_id}-{batch_id}"


def ingest_micro_batch(
    spark: SparkSession,
    cfg: Config,
    records: DataFrame,
    batch_id: int,
    protection: Protection | None = None,
    *,
    commit_metadata: dict[str, str] | None = None,
) -> IngestedBatch:
    """Tag one micro-batch's source records and write its quarantine rows exactly once. protection:
    the stream's resolved privacy settings (default: resolved from cfg.privacy now), the same
    pseudonyms as the batch runs so that ids match across runs. commit_metadata: recorded in the
    quarantine commit next to its txn (the stream's identity)."""
    batch = tag_micro_batch(spark, cfg, records, batch_id, protection)
    commit_quarantine(spark, cfg, batch, commit_metadata=commit_metadata)
    return batch


def tag_micro_batch(
    spark: SparkSession,
    cfg: Config,
    records: DataFrame,
    batch_id: int,
    protection: Protection | None = None,
    *,
    clean_aggregates: Mapping[str, Column] | None = None,
) -> IngestedBatch:
    """The first half of `ingest_micro_batch`: the records tagged and counted (one job), nothing
    written yet. A stream commits its assignments before the quarantine rows, which they do not need.
    clean_aggregates: see `ingest.ingest_records`."""
    check_required_columns(records, cfg.input)
    protection = protection or resolve_protection(cfg.privacy, spark)
    ingested = ingest_records(records, cfg.input, protection, clean_aggregates=clean_aggregates)
    batch = IngestedBatch(**vars(ingested), batch_id=batch_id, run_id=batch_run_id(cfg, batch_id))
    log.info("stream batch %d: %d records = %d clean + %d quarantined %s", batch_id, batch.input_rows,
             batch.clean_rows, batch.quarantined_rows, batch.reasons or "")
    return batch


def commit_quarantine(spark: SparkSession, cfg: Config, batch: IngestedBatch, *,
                      commit_metadata: dict[str, str] | None = None) -> None:
    """The second half: the batch's quarantine rows in one commit that carries its txn (none written
    again for a replayed batch: `batch.replayed`). The tagged rows stay persisted (`unpersist`)."""
    try:
        written = write_quarantine(spark, cfg.output, batch, batch.run_id, cfg.input.path,
                                   txn=(TABLES["quarantine"].txn_app(cfg.streaming.app_id), batch.batch_id),
                                   commit_metadata=commit_metadata)
    except BaseException:
        batch.unpersist()
        raise
    batch.replayed = written.skipped
    if written.skipped:
        log.info("stream batch %d: replay, its quarantine rows were already committed", batch.batch_id)


def start_stream(
    spark: SparkSession,
    cfg: Config,
    on_batch: Callable[[DataFrame, int], None],
    *,
    available_now: bool = False,
):
    """Start the query: `on_batch(records, batch_id)` for each micro-batch. Returns the StreamingQuery."""
    records = read_event_stream(spark, cfg.input, cfg.streaming)
    writer = (
        records.writeStream.queryName(cfg.streaming.app_id)
        .foreachBatch(lambda frame, batch_id: on_batch(frame, int(batch_id)))
        .option("checkpointLocation", cfg.streaming.checkpoint_path(cfg.output))
    )
    writer = writer.trigger(availableNow=True) if available_now else writer.trigger(
        processingTime=f"{round(cfg.streaming.trigger_seconds * 1000)} milliseconds"  # 0.5 s as well as 10 s
    )
    return writer.start()


__all__ = ["IngestedBatch", "batch_run_id", "commit_quarantine", "ingest_micro_batch", "start_stream", "tag_micro_batch"]

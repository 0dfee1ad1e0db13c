"""The stream's feature state as a Delta table: a log of per-user rows, compacted now and then.

A micro-batch appends the merged rows of the users it touched, each stamped with its batch_id
(`VERSION`); a user's current state is its row of the latest batch (`current_rows`), as a user's
current segment is in `user_segments_live`. A batch so merges and writes only its own users' rows:
before, every batch rewrote each bucket it touched (copy-on-write), and a batch touches nearly all of
them: a 10k-event batch on top of 1M events of history rewrote 47k rows to change 1.4k.

Appended rows go to one partition of their own, bucket `LOG_BUCKET` (-1): a batch adds one file,
where its users' hash buckets would add one per bucket, and every file is opened by the next batches'
merges (with 16 buckets, each appended batch made the next ones' merge about 0.1-0.2 s slower).

When the rows appended since the last compaction reach `streaming.state_compaction` times the rows
that compaction wrote, the batch compacts instead: its merge reads every bucket, keeps each user's
current row, and replaces all buckets with one row per user (a Delta MERGE's copy-on-write, which
the embedded committer lacks). The table, and the rows a batch's merge reads, so stay within
(1 + state_compaction) times the users. `state_compaction: 0` compacts in every batch.

Rows written before the state carried versions have a null batch_id: older than any batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from segspark.config import Config
from segspark.features.behaviour import FeatureSlots
from segspark.io.catalog import TABLES
from segspark.io.tables import output_table_exists, read_output_table
from segspark.streaming.feature_state import TOUCHED, VERSION, merge_state

logger = logging.getLogger(__name__)

STATE = "stream_feature_state"
(BUCKET,) = TABLES[STATE].partition_by
LOG_BUCKET = -1  # the partition of the rows appended since the last compaction (hash buckets are 0..n-1)


def bucket_of(cfg: Config):
    """The state partition of a user: a hash bucket of user_id."""
    return F.pmod(F.xxhash64("user_id"), F.lit(cfg.streaming.state_buckets)).cast("int")


def current_rows(stored: DataFrame) -> DataFrame:
    """The current state: each user's row of its latest batch (rows without a batch_id are oldest)."""
    latest = Window.partitionBy("user_id").orderBy(F.col(VERSION).desc_nulls_last())
    return stored.withColumn("_latest", F.row_number().over(latest)).where(F.col("_latest") == 1).drop("_latest")


def read_current_state(spark: SparkSession, cfg: Config) -> DataFrame:
    """The stream's current feature state, one row per user (what downstream readers want)."""
    return current_rows(_stored(spark, cfg))


def _stored(spark: SparkSession, cfg: Config) -> DataFrame:
    """Every row of the state table (a table from before versions has its batch_id added, null)."""
    stored = read_output_table(spark, cfg.output, STATE)
    return stored if VERSION in stored.columns else stored.withColumn(VERSION, F.lit(None).cast("long"))


@dataclass
class StateLog:
    """How much of the state table is one row per user (the last compaction's) and how much was
    appended since: whether the next batch compacts."""

    compacted_rows: int = 0
    appended_rows: int = 0
    # The table's rows are bucketed for another streaming.state_buckets (it was changed): the next
    # batch compacts, re-bucketing every row and replacing every bucket the table has.
    misplaced: bool = False
    buckets: tuple[int, ...] = ()  # the buckets the table has (counted when the stream starts)

    @classmethod
    def of_table(cls, spark: SparkSession, cfg: Config) -> StateLog:
        """Counted once when the stream starts (then kept up to date by `wrote`)."""
        if not output_table_exists(spark, cfg.output, STATE):
            return cls()
        rows, users, misplaced, buckets = read_output_table(spark, cfg.output, STATE).agg(
            F.count(F.lit(1)), F.count_distinct("user_id"),
            F.count_if((F.col(BUCKET) != LOG_BUCKET) & (F.col(BUCKET) != bucket_of(cfg))),
            F.collect_set(BUCKET)).first()
        if misplaced:
            logger.warning("stream: the feature state's rows are bucketed for another streaming.state_buckets than %d: "
                        "the next batch re-buckets them (a compaction)", cfg.streaming.state_buckets)
        return cls(compacted_rows=users, appended_rows=rows - users, misplaced=bool(misplaced), buckets=tuple(sorted(buckets)))

    def compacts(self, ratio: float) -> bool:
        return self.misplaced or self.appended_rows >= ratio * self.compacted_rows

    def wrote(self, update: StateUpdate, rows: int) -> None:
        if update.compaction:
            self.compacted_rows, self.appended_rows = rows, 0
            self.misplaced, self.buckets = False, tuple(update.replaced)
        else:
            self.appended_rows += rows


@dataclass
class StateUpdate:
    """A batch's state: the touched users' merged rows, and what the batch writes to the table
    (`rows`, replacing the buckets `replaced`; none: appended)."""

    touched: DataFrame
    rows: DataFrame
    replaced: list[int]
    compaction: bool


def merge_batch(spark: SparkSession, cfg: Config, log: StateLog, batch: DataFrame, buckets: list[int],
                batch_id: int, slots: FeatureSlots) -> StateUpdate:
    """The batch (`batch_state` rows with their bucket) merged into the state. The merged rows are
    checkpointed once: the state is shuffled by user once per batch."""
    if not log.compacts(cfg.streaming.state_compaction):
        old = stored_rows_of(spark, cfg, batch, buckets, log)
        rows = merge_state(old.drop(BUCKET), batch.drop(BUCKET), cfg.features, slots, batch_id)
        rows = rows.drop(TOUCHED).withColumn(BUCKET, F.lit(LOG_BUCKET)).localCheckpoint()
        return StateUpdate(rows.drop(VERSION), rows, replaced=[], compaction=False)
    if output_table_exists(spark, cfg.output, STATE):
        old = current_rows(_stored(spark, cfg))
    else:
        old = batch.limit(0).withColumn(VERSION, F.lit(None).cast("long"))
    rows = merge_state(old.drop(BUCKET), batch.drop(BUCKET), cfg.features, slots, batch_id)
    rows = rows.withColumn(BUCKET, bucket_of(cfg)).localCheckpoint()
    touched = rows.where(F.col(TOUCHED)).drop(TOUCHED, VERSION)
    replaced = sorted(set(range(cfg.streaming.state_buckets)) | set(log.buckets) | {LOG_BUCKET})
    return StateUpdate(touched, rows.drop(TOUCHED), replaced=replaced, compaction=True)


def stored_rows_of(spark: SparkSession, cfg: Config, batch: DataFrame, buckets: list[int], log: StateLog) -> DataFrame:
    """The current state rows of the batch's users (none for a stream's first batch), read from the
    buckets they fall in and the appended rows (from every bucket while the table is bucketed
    otherwise)."""
    if not output_table_exists(spark, cfg.output, STATE):
        return batch.limit(0).withColumn(VERSION, F.lit(None).cast("long"))
    stored = _stored(spark, cfg)
    if not log.misplaced:
        stored = stored.where(F.col(BUCKET).isin([*buckets, LOG_BUCKET]))
    # The batch's user ids are broadcast, so the scan drops the other users' rows where it reads them:
    # a shuffle join would move every stored row (nested maps and arrays) to find a few.
    return current_rows(stored.join(F.broadcast(batch.select("user_id")), "user_id", "left_semi"))


__all__ = ["BUCKET", "LOG_BUCKET", "STATE", "StateLog", "StateUpdate", "bucket_of", "current_rows", "merge_batch",
           "read_current_state", "stored_rows_of"]

"""The one ingest of batch runs and of the stream's micro-batches: records in, counted and tagged
events out, and their quarantine rows written, so that both apply the same rules and keep the same
promise: input records = clean + quarantined.

`ingest_records` tags the records (events.tag_events), keeps the tagged rows persisted on local disk
(the features and the quarantine write read them) and counts them in one small aggregation that also
gives the range of the clean events. `write_quarantine` writes the rejected rows of a run id in one
commit; the stream passes its transaction (app id, batch id) so that a replayed batch writes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from segspark.config import InputConfig, OutputConfig
from segspark.features.behaviour import SourceKeys
from segspark.ingest.events import REASON, clean_events, quarantine_rows, tag_events
from segspark.ingest.privacy import Protection
from segspark.io.delta import WriteResult
from segspark.io.tables import write_rows
from segspark.runtime.shuffle_sizing import apply_settings

log = logging.getLogger(__name__)

_STAMP = "yyyy-MM-dd HH:mm:ss"
# Spark's columnar cache encodes each column of each batch, and choosing the encoding (a hash map of
# every value, per column and batch) was most of the time the pass that sorts and keeps the tagged
# events spent keeping them. Left out: at 11.7M events, blocks of 532 MB against 496 MB, and the
# summary pass 18.7-19.8 s against 22.2-23.8 s (the features read them back 0.3-1.2 s slower).
# Set for the cache this module builds only (the session's own value is back once it is built).
_UNENCODED_CACHE = {"spark.sql.inMemoryColumnarStorage.compressed": "false"}


@dataclass
class Ingested:
    """Tagged records and their counts. `tagged` is persisted: `unpersist` when done with it."""

    tagged: DataFrame
    clean_rows: int = 0
    quarantined_rows: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_event: str | None = None  # of the clean events, "yyyy-MM-dd HH:mm:ss" in the session's zone
    last_event: str | None = None
    last_day: dt.date | None = None
    # The values of `ingest_records(clean_aggregates=...)` over the clean events (None: no clean event).
    clean_values: dict[str, object] = field(default_factory=dict)
    # Clean events without the source's session id, and with an order id (`source_keys`).
    clean_without_session: int = 0
    clean_with_order: int = 0

    @property
    def input_rows(self) -> int:
        return self.clean_rows + self.quarantined_rows

    @property
    def source_keys(self) -> SourceKeys:
        """What the clean events carry of the source's own keys: it lets the features group sessions
        (and orders) by them (features.behaviour, "two paths")."""
        return SourceKeys(every_event_has_session=self.clean_rows > 0 and self.clean_without_session == 0,
                          some_event_has_order=self.clean_with_order > 0)

    @property
    def clean(self) -> DataFrame:
        """Valid, de-duplicated canonical events."""
        return clean_events(self.tagged)

    def unpersist(self) -> None:
        self.tagged.unpersist()


def ingest_records(
    records: DataFrame, cfg: InputConfig, protection: Protection | None = None, *, now: dt.datetime | None = None,
    clean_aggregates: Mapping[str, Column] | None = None,
) -> Ingested:
    """Tag `records` and count them: one pass over the input (so an unreadable file fails here).
    clean_aggregates: more aggregates of the tagged rows, read off the clean events' group into
    `clean_values` by the same pass (a stream takes the state buckets its batch touches from it)."""
    extra = dict(clean_aggregates or {})
    # On local disk, not in the heap: a cached partition of tagged events is built and read back as
    # one block, and at 1M users / 58.5M events such blocks ran a 4 GB driver out of heap (both when
    # built in memory and when read back from disk into memory). Disk blocks are streamed both ways
    # and the operating system's page cache keeps them in memory when there is room (10M events:
    # 68 s against 63 s for ingest + features).
    spark = records.sparkSession
    previous = _set_for_the_cache(spark)
    tagged = tag_events(records, cfg, protection, now=now).persist(StorageLevel.DISK_ONLY)
    try:
        # Dates and times are formatted by Spark in the session's zone (UTC): a collected timestamp
        # would come back in the driver machine's local zone.
        summary = (
            tagged.groupBy(F.col(REASON).alias("reason"))
            .agg(F.count(F.lit(1)).alias("rows"), F.date_format(F.min("event_time"), _STAMP).alias("first_event"),
                 F.date_format(F.max("event_time"), _STAMP).alias("last_event"),
                 F.to_date(F.max("event_time")).alias("last_day"),
                 F.count_if(F.col("session_id").isNull()).alias("without_session"),
                 F.count_if(F.col("order_id").isNotNull()).alias("with_order"),
                 *[aggregate.alias(f"_extra_{name}") for name, aggregate in extra.items()])
            .collect()
        )
    except BaseException:
        tagged.unpersist()
        raise
    finally:
        apply_settings(spark, previous)
    reasons = {row.reason: int(row.rows) for row in summary if row.reason is not None}
    clean = next((row for row in summary if row.reason is None), None)
    return Ingested(
        tagged,
        clean_rows=0 if clean is None else int(clean.rows),
        quarantined_rows=sum(reasons.values()),
        reasons=reasons,
        first_event=None if clean is None else clean.first_event,
        last_event=None if clean is None else clean.last_event,
        last_day=None if clean is None else clean.last_day,
        clean_values={name: None if clean is None else clean[f"_extra_{name}"] for name in extra},
        clean_without_session=0 if clean is None else int(clean.without_session),
        clean_with_order=0 if clean is None else int(clean.with_order),
    )


def _set_for_the_cache(spark: SparkSession) -> dict[str, str]:
    """_UNENCODED_CACHE in the session; returns the values it replaced. A session that refuses the
    setting (a managed service may allow only some) keeps its own: the cache is then encoded."""
    previous = {}
    for key, value in _UNENCODED_CACHE.items():
        try:
            previous[key] = str(spark.conf.get(key))
            spark.conf.set(key, value)
        except Exception as refused:  # noqa: BLE001 - whatever the session raises, the run goes on
            previous.pop(key, None)
            log.debug("ingest: %s stays as the session has it (%s)", key, refused)
    return previous


def write_quarantine(
    spark: SparkSession,
    output: OutputConfig,
    ingested: Ingested,
    run_id: str,
    source: str,
    *,
    txn: tuple[str, int] | None = None,
    commit_metadata: dict[str, str] | None = None,
) -> WriteResult:
    """The rejected records of run `run_id` (their earlier rows replaced) in one commit of `quarantine`.
    With none (the counts say so), the commit is made on the driver without a Spark job."""
    rows = quarantine_rows(ingested.tagged, run_id, source) if ingested.quarantined_rows else []
    return write_rows(spark, output, "quarantine", rows, run_id, txn=txn, commit_metadata=commit_metadata)

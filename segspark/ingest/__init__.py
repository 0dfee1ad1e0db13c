"""Ingest: raw events -> tagged events (user ids pseudonymised, every record kept) -> clean events
and quarantine rows, one reason each (`events`), for batch runs and the stream alike."""

from segspark.ingest.events import (
    EVENT_COLUMNS,
    RAW,
    REASON,
    REASONS,
    clean_events,
    quarantine_rows,
    reason_counts,
    tag_events,
)
from segspark.ingest.records import Ingested, ingest_records, write_quarantine

__all__ = ["EVENT_COLUMNS", "RAW", "REASON", "REASONS", "clean_events", "quarantine_rows", "reason_counts", "tag_events",
           "Ingested", "ingest_records", "write_quarantine"]

"""`spark.shuffle_partitions: auto`: a batch run's shuffle partitions sized from the bytes of its input.

Spark's partition count is a fixed session setting (200 by default, 8 in segspark's local sessions),
and every shuffle of a run pays for each partition: a task per partition in every stage after the
shuffle, a Python worker per task of every pandas step, a file per partition of every table written.
On a few thousand users that overhead is most of the run (400 users: 19 s with 4 partitions against
15 s with one, warm, in-process), while a large input needs the partitions to spread and bound its
memory. So a run with `auto` sets `spark.sql.shuffle.partitions` from its input for its own duration
(RunContext restores the session's value when the run ends): one partition for an input of up to
32 MiB of Parquet or Delta (192 MiB of text: CSV and JSON take about six times the bytes per event),
else one per that many bytes and never fewer than the session's task slots, so that a large input
keeps every core busy. A stream sizes each micro-batch the same way, from the files of that batch
(`sized_for_block`), and sets the value back when the batch ends. The session's setting stays where
it is pinned: a number in `spark.shuffle_partitions`, `spark.sql.shuffle.partitions` in `spark.conf`,
or the setting given when the session was launched (a spark-submit --conf, a cluster's Spark config).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from pyspark.sql import DataFrame, SparkSession

from segspark.config import SparkConfig
from segspark.runtime.session import is_connect, set_at_launch, task_slots

log = logging.getLogger(__name__)

SETTING = "spark.sql.shuffle.partitions"
ADAPTIVE = "spark.sql.adaptive.enabled"
MIB = 1024 * 1024
# Input bytes per shuffle partition, by input.format: text carries about six times the bytes of
# compressed columnar files for the same events (10M generated events: 243 MB Parquet, 1.5 GB CSV).
BYTES_PER_PARTITION = {"parquet": 32 * MIB, "delta": 32 * MIB, "csv": 192 * MIB, "json": 192 * MIB}


def input_bytes(records: DataFrame) -> int | None:
    """The size of `records` as Spark's plan estimates it (the bytes of the files it listed, scaled by
    the columns the reader adds); with Spark Connect, the bytes of the local files it names. None
    when it cannot be told."""
    try:
        if not is_connect(records.sparkSession):
            return int(str(records._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))
        paths = [urlparse(uri).path for uri in records.inputFiles() if uri.startswith(("file:", "/"))]
        return sum(os.path.getsize(path) for path in paths) if paths else None
    except Exception:  # noqa: BLE001 - sizing is an optimisation: without it the session's setting stays
        log.debug("input size unknown; shuffle partitions left as the session has them", exc_info=True)
        return None


def shuffle_partitions_for(size: int, input_format: str, slots: int | None) -> int:
    """One partition for a small input, else one per BYTES_PER_PARTITION and at least `slots`."""
    wanted = math.ceil(size / BYTES_PER_PARTITION.get(input_format, 32 * MIB))
    return 1 if wanted <= 1 else max(wanted, slots or 1)


def settings_for(partitions: int) -> dict[str, str]:
    """The session settings of a run or micro-batch sized to `partitions`. With one, adaptive execution
    is off as well: there is nothing in a single partition for it to coalesce or split, and its
    re-planning of the rest of a query after each stage cost 7% of a small run's CPU (a cold
    `segspark run` of 400 users: 42 and 40 busy cpu-s with it, 39 and 37 without, alternated)."""
    return {SETTING: str(partitions), **({ADAPTIVE: "false"} if partitions == 1 else {})}


def apply_settings(spark: SparkSession, settings: dict[str, str]) -> dict[str, str]:
    """Set `settings` in the session; returns what they replace (to give back with this function)."""
    previous = {key: str(spark.conf.get(key)) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    return previous


def sized_partitions(records: DataFrame, input_format: str) -> tuple[int, int] | None:
    """(partitions, input bytes) for a run reading `records`, or None when the size is unknown."""
    size = input_bytes(records)
    if size is None:
        return None
    return shuffle_partitions_for(size, input_format, task_slots(records.sparkSession)), size


def sizing_is_on(spark: SparkSession, spark_cfg: SparkConfig) -> bool:
    """`spark.shuffle_partitions: auto`, and the setting pinned nowhere else (module docstring)."""
    return spark_cfg.shuffle_partitions == "auto" and SETTING not in spark_cfg.conf and not set_at_launch(spark, SETTING)


@contextmanager
def sized_for_block(records: DataFrame, input_format: str, *sessions: SparkSession) -> Iterator[int | None]:
    """Within the block, the `sessions`' shuffle partitions sized from `records` (`settings_for`; a micro-batch: its
    frame belongs to the query's own copy of the session, and the frames read from the tables to the
    caller's), then each session's own value again. Yields the partitions, or None when the size of
    `records` is unknown (the sessions are then left as they are)."""
    sized = sized_partitions(records, input_format)
    if sized is None:
        yield None
        return
    settings = settings_for(sized[0])
    previous = []
    try:
        for session in sessions:
            previous.append((session, apply_settings(session, settings)))
        yield sized[0]
    finally:
        for session, values in reversed(previous):  # the first one saved holds the values from before
            apply_settings(session, values)

"""A skewed log: one user with a million events among ordinary users, featurised on a 512 MB heap.

Run by tests/test_skew.py in its own JVM (the heap is fixed when the JVM starts):
    python tests/skew_job.py WORKDIR HEAVY_EVENTS
Prints one JSON line with the heavy user's features, the number of users, and the bytes the job's
tasks spilled from memory to disk.
"""

import datetime as dt
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark.sql import functions as F  # noqa: E402

from segspark import ingest  # noqa: E402
from segspark.config import load_config  # noqa: E402
from segspark.features import user_features  # noqa: E402
from segspark.io.readers import read_raw_events  # noqa: E402
from segspark.runtime.session import spark_session  # noqa: E402

HEAVY = 1


def skewed_events(spark, heavy_events: int):
    """user 1: `heavy_events` events over 90 days; users 2..501: 40 events each."""
    start = int(dt.datetime(2026, 8, 1, tzinfo=dt.UTC).timestamp())
    heavy = spark.range(heavy_events).select(
        F.lit(HEAVY).cast("long").alias("user_id"),
        (F.lit(start) + F.floor(F.col("id") * (90 * 86_400) / heavy_events)).alias("ts"),
        F.col("id"),
    )
    light = spark.range(500 * 40).select(
        (F.floor(F.col("id") / 40) + 2).alias("user_id"),
        (F.lit(start) + F.col("id") * 7919 % (90 * 86_400)).alias("ts"),
        F.col("id"),
    )
    kind = (
        F.when(F.col("id") % 200 == 0, "purchase").when(F.col("id") % 50 == 0, "cart").otherwise("view")
    )
    return heavy.unionByName(light).select(
        F.date_format(F.timestamp_seconds("ts"), "yyyy-MM-dd HH:mm:ss").alias("event_time"),
        kind.alias("event_type"),
        (F.col("id") % 50_000).alias("product_id"),
        F.concat(F.lit("cat"), (F.col("id") % 7).cast("string"), F.lit(".x")).alias("category_code"),
        F.lit("acme").alias("brand"),
        (F.col("id") % 100 + 1).cast("double").alias("price"),
        "user_id",
        F.concat(F.col("user_id").cast("string"), F.lit("-"), F.floor(F.col("id") / 100).cast("string")).alias(
            "user_session"
        ),
    )


def spilled_bytes(spark) -> int:
    """Bytes spilled from memory by every stage so far, from the driver's status store (what the UI's
    stage pages show; the store exists without the UI). Internal API: its Scala defaults are passed
    explicitly, as py4j cannot leave them out."""
    store = spark.sparkContext._jsc.sc().statusStore()
    stages = store.stageList(None, *(getattr(store, f"stageList$default${i}")() for i in range(2, 6))).iterator()
    spilled = 0
    while stages.hasNext():  # a Scala iterator
        spilled += stages.next().memoryBytesSpilled()
    return spilled


def main(work: str, heavy_events: int) -> int:
    # 512 MB: Spark's execution and storage memory is then (512 - 300 reserved) x 0.6 = 127 MB, less than
    # the heavy user's million rows (~140 bytes each as Spark's rows), so that they cannot all be held.
    # G1's regions are 1 MB on a heap this small, and Spark's memory pages (1-2 MB here) are then
    # "humongous" objects that each take whole regions, up to half of them empty: the heap ran out with
    # Spark's pool inside its limit (3 of 6 runs, two at once; Java heap space while allocating a page in
    # the session window over the heavy user). 16 MB regions make the pages ordinary objects (14 of 14 two at once), as
    # Spark's tuning guide advises for large objects; on the default 4 GB driver the pages are 64 MB,
    # where humongous regions waste ~3 %.
    conf = {"spark.driver.memory": "512m", "spark.sql.shuffle.partitions": "4",
            "spark.driver.extraJavaOptions": "-XX:G1HeapRegionSize=16m"}
    with spark_session("segspark-skew", "local[2]", conf) as spark:
        path = f"{work}/events"
        skewed_events(spark, heavy_events).write.mode("overwrite").parquet(path)
        cfg = load_config(REPO / "conf" / "base.yaml", [f"input.path={path}"])
        clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input))
        features = user_features(clean, dt.date(2026, 10, 31), cfg.features)
        # One pass: every user's row (a few hundred), the heavy user's picked out here.
        rows = features.collect()
        heavy = next(row for row in rows if row.user_id == str(HEAVY)).asDict()
        users, spilled = len(rows), spilled_bytes(spark)
    print(json.dumps({"users": users, "spilled_bytes": spilled, **{k: v for k, v in heavy.items() if k != "as_of"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

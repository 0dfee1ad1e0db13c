"""Benchmarks: one JSON object per line (format in DESIGN.md), ratios against a baseline measured
in the same process on the same data, because absolute times on shared machines are not stable.

    python scripts/bench.py --suite ingest_features [--scale 10000000] [--repeat 3]

Suites:
  ingest_features  metric features_vs_plain_aggregation: (ingest + features) time / time of a plain
                   Spark read + groupBy(user) count/max/sum over the same Parquet files.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark.sql import functions as F  # noqa: E402

from segspark import ingest  # noqa: E402
from segspark.config import load_config  # noqa: E402
from segspark.datagen import GenerateSpec, write_dataset  # noqa: E402
from segspark.features import user_features  # noqa: E402
from segspark.io.readers import read_raw_events  # noqa: E402
from segspark.session import get_spark  # noqa: E402

EVENTS_PER_USER = 50  # the generator's default mix gives about this many events per user


def emit(suite, metric, value, unit, baseline=None, ratio=None, **extra):
    print(json.dumps({"suite": suite, "metric": metric, "value": value, "unit": unit,
                      "baseline": baseline, "ratio": ratio, **extra}), flush=True)


def timed(action, repeat):
    """Median wall time of `repeat` runs (after one warm-up run)."""
    action()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ensure_events(spark, scale: int, work: Path) -> Path:
    users = max(scale // EVENTS_PER_USER, 1)
    target = work / f"events-{users}u"
    if not (target / "events" / "_SUCCESS").exists():
        write_dataset(spark, GenerateSpec(users=users, days=90, seed=7), str(target), "parquet")
    return target / "events"


def suite_ingest_features(spark, args):
    path = ensure_events(spark, args.scale, Path(args.work))
    events = spark.read.parquet(str(path)).count()
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={path}"])
    as_of = spark.read.parquet(str(path)).agg(F.max("event_time")).collect()[0][0][:10]
    import datetime as dt

    as_of = dt.date.fromisoformat(as_of)

    def segspark_features():
        raw = read_raw_events(spark, cfg.input)
        clean = ingest.clean_events(ingest.tag_events(raw, cfg.input))
        user_features(clean, as_of, cfg.features).write.format("noop").mode("overwrite").save()

    def plain_aggregation():
        (
            spark.read.parquet(str(path))
            .groupBy("user_id")
            .agg(F.count(F.lit(1)).alias("n"), F.max("event_time").alias("last"), F.sum("price").alias("spend"))
            .write.format("noop").mode("overwrite").save()
        )

    baseline = timed(plain_aggregation, args.repeat)
    ours = timed(segspark_features, args.repeat)
    emit("ingest_features", "features_vs_plain_aggregation", round(ours, 3), "s",
         baseline=round(baseline, 3), ratio=round(ours / baseline, 3), events=events)


SUITES = {"ingest_features": suite_ingest_features}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--scale", type=int, default=10_000_000, help="number of events (default 10M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / "bench-out"), help="where generated data is cached")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spark = get_spark("segspark-bench", args.master, {"spark.driver.memory": "8g", "spark.sql.shuffle.partitions": "16"})
    try:
        SUITES[args.suite](spark, args)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

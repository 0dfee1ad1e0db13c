"""The run whose loaded classes go into the suite's class-data-sharing archive (tests/jvm_archive.py).

A few seconds of what the suite's JVMs do: segspark's own session settings, SQL with windows,
joins and higher-order functions, JSON, CSV and Parquet files, Python workers over Arrow, an MLlib
fit and a file stream with foreachBatch. Its results are not used; its JVM writes the archive when it
exits.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd
from pyspark.ml.clustering import KMeans
from pyspark.ml.feature import VectorAssembler
from pyspark.sql import Window
from pyspark.sql import functions as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segspark.runtime.session import get_spark  # noqa: E402


def main() -> None:
    spark = get_spark(app_name="segspark-jvm-archive", master="local[2]",
                      conf={"spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"})
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        events = spark.range(2000).select(
            (F.col("id") % 50).alias("user_id"), (F.col("id") % 7).alias("item"),
            (F.col("id") * 1.5).alias("price"),
            F.timestamp_seconds(F.lit(1_700_000_000) + F.col("id") * 60).alias("event_time"))
        events.write.parquet(str(root / "p"))
        events.write.json(str(root / "j"))
        events.write.option("header", True).csv(str(root / "c"))
        read = spark.read.parquet(str(root / "p")).unionByName(
            spark.read.schema(events.schema).json(str(root / "j")))
        spark.read.option("header", True).csv(str(root / "c")).select(
            F.to_timestamp("event_time", "yyyy-MM-dd HH:mm:ss z")).count()
        by_user = Window.partitionBy("user_id").orderBy("event_time")
        per_user = (read.withColumn("gap", F.col("event_time").cast("long") - F.lag("event_time").over(by_user)
                                    .cast("long"))
                    .groupBy("user_id").agg(F.count("*").alias("n"), F.collect_list("price").alias("prices"),
                                            F.map_from_entries(F.collect_set(F.struct("item", F.lit(1.0)))).alias("m"),
                                            F.percentile_approx("price", 0.5).alias("median"), F.max("gap").alias("gap")))
        per_user = per_user.withColumn("total", F.aggregate("prices", F.lit(0.0), lambda a, x: a + x)).withColumn(
            "pairs", F.zip_with("prices", "prices", lambda a, b: a * b)).localCheckpoint()
        per_user.join(F.broadcast(per_user.select("user_id")), "user_id", "left_semi").join(
            per_user.select("user_id", "n"), "user_id").collect()

        def doubled(batches):
            for frame in batches:
                yield frame.assign(n=frame["n"] * 2)

        per_user.select("user_id", "n").mapInPandas(doubled, "user_id long, n long").collect()
        F.pandas_udf(lambda v: v + 1.0, "double")
        spark.createDataFrame(pd.DataFrame({"x": [1.0, 2.0]})).select(
            F.pandas_udf(lambda v: v + 1.0, "double")("x")).collect()
        features = VectorAssembler(inputCols=["n", "total"], outputCol="features").transform(per_user)
        KMeans(k=2, maxIter=2, seed=1).fit(features).transform(features).count()

        landing = root / "landing"
        landing.mkdir()
        (landing / "a.json").write_text('{"user_id": 1, "price": 2.0}\n')
        query = (spark.readStream.schema("user_id long, price double").json(str(landing))
                 .writeStream.trigger(availableNow=True).option("checkpointLocation", str(root / "checkpoint"))
                 .foreachBatch(lambda frame, _: frame.groupBy("user_id").count().collect()).start())
        query.awaitTermination()
    jvm = spark.sparkContext._gateway.proc  # the JVM pyspark launched
    spark.stop()
    # The JVM writes the archive as it exits, which it does when its standard input closes: wait for
    # that, so that the archive is whole when this process ends.
    jvm.stdin.close()
    jvm.wait(timeout=600)


if __name__ == "__main__":
    main()

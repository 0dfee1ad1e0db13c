"""The scoring stage of a run: every model of an existing bundle applied to the run's users."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from segspark.bundle.store import score_with_bundle
from segspark.ingest.privacy import check_same_pseudonyms
from segspark.io.catalog import USER_SEGMENTS_COLUMNS
from segspark.io.tables import read_output_table, table_path, write_rows
from segspark.usecases.context import RunContext


def score_users(ctx: RunContext, features: DataFrame, bundle: str, signing=None) -> None:
    """`segspark score`: every model of an existing bundle applied to this run's users."""
    spark, cfg, result = ctx.spark, ctx.cfg, ctx.result
    out, run_id = cfg.output, result.run_id
    with ctx.stage("score") as counts:
        scored = score_with_bundle(bundle, features, signing)
        check_same_pseudonyms(scored.manifest.training_data.get("privacy"), result.metrics.get("privacy"), bundle)
        keys = [F.lit(result.as_of).cast("date").alias("as_of"), F.lit(run_id).alias("run_id")]
        try:
            for table, frame in scored.outputs.items():
                write_rows(spark, out, table, frame.select("user_id", *keys, *frame.columns[1:]), run_id)
                result.tables[table] = table_path(out, table)
            rows = None
            for name, assignments in scored.assignments.items():
                frame = assignments.select("user_id", *keys, F.lit(name).alias("model"), *USER_SEGMENTS_COLUMNS[4:])
                rows = frame if rows is None else rows.unionByName(frame)
            written = write_rows(spark, out, "user_segments", rows, run_id)
            result.tables["user_segments"] = table_path(out, "user_segments")
        finally:
            for frame in scored.cached:
                frame.unpersist()
        result.metrics["scored_with_bundle"] = {
            "path": bundle, "run_id": scored.manifest.run_id, "content_sha256": scored.manifest.content_sha256,
            "models": list(scored.manifest.models),
        }
        # Segment sizes from the rows just written (a small aggregate; the scoring is not recomputed).
        sizes = (
            read_output_table(spark, out, "user_segments")
            .filter(F.col("run_id") == run_id)
            .groupBy("model", "segment", "segment_name")
            .count()
            .collect()
        )
        order = {name: i for i, name in enumerate(scored.manifest.models)}
        result.segments = [
            {"model": r.model, "segment": r.segment, "name": r.segment_name, "size": r["count"]}
            for r in sorted(sizes, key=lambda r: (order.get(r.model, len(order)), r.segment))
        ]
        counts.update(bundle_run=scored.manifest.run_id, rows=written.rows)



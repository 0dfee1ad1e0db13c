"""Segment quality on planted personas: every model's ARI against the generator's truth/.

    python scripts/quality.py [--users 5000] [--seed 21] [--set models.selection.seeds=1 ...]

Generates a clickstream with the generator's default personas, runs the whole pipeline on it and
prints one JSON object per model: the chosen k and its reason, the adjusted Rand index against the
planted personas over all users, and for models with a noise label (segment -1) the noise share
and the ARI over the users not called noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltalake import DeltaTable  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from segspark import pipeline  # noqa: E402
from segspark.config import load_config  # noqa: E402
from segspark.datagen import GenerateSpec, write_dataset  # noqa: E402
from segspark.session import get_spark  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides, dotted.key=value")
    parser.add_argument("--work", default=None, help="where data and tables go (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="segspark-quality-"))
    spark = get_spark("segspark-quality", "local[2]", {"spark.sql.shuffle.partitions": "8"})
    try:
        write_dataset(spark, GenerateSpec(users=args.users, seed=args.seed), str(work), "parquet", overwrite=True)
        cfg = load_config(
            REPO / "conf/local.yaml", [f"input.path={work}/events", f"output.root={work}/out", *args.overrides]
        )
        result = pipeline.run(spark, cfg, run_id="quality")
        truth = spark.read.parquet(f"{work}/truth").toPandas().astype({"user_id": str})
    finally:
        spark.stop()
    segments = DeltaTable(f"{work}/out/user_segments").to_pandas().merge(truth, on="user_id")
    for model, rows in segments.groupby("model", sort=False):
        kept = rows[rows.segment != -1]
        metrics = result.metrics.get(model, {})
        print(json.dumps({
            "model": model,
            "users": len(rows),
            "k": metrics.get("k"),
            "reason": metrics.get("reason"),
            "ari": round(adjusted_rand_score(rows.persona, rows.segment), 4),
            "noise_share": round(1 - len(kept) / len(rows), 4),
            "ari_non_noise": round(adjusted_rand_score(kept.persona, kept.segment), 4) if len(kept) else None,
            "seconds": result.stage_seconds,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

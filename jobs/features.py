"""spark-submit / Databricks Python job entry point for ingest + features only (`segspark features`).

    spark-submit jobs/features.py --config conf/local.yaml --run-id ID [--as-of YYYY-MM-DD] [--set k=v ...]

With jobs/train.py as the next task of the same job, on the same run id.
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]], job=True))

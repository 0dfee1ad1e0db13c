"""spark-submit / Databricks Python job entry point for streaming assignment (`segspark stream`).

    spark-submit jobs/stream.py --config conf/local.yaml [--available-now] [--set k=v ...]
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["stream", *sys.argv[1:]], job=True))

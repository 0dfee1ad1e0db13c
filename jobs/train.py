"""spark-submit / Databricks Python job entry point for training on a features run (`segspark train`).

    spark-submit jobs/train.py --config conf/local.yaml --run-id ID [--set k=v ...]
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], job=True))

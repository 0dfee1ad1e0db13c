"""spark-submit / Databricks Python job entry point for scoring new data with a trained bundle.

    spark-submit jobs/score.py --config conf/local.yaml --bundle out/local/_models/<run_id> [--run-id ID] [--set k=v ...]

Same arguments as `segspark score`: applies the bundle's models without retraining. Under
spark-submit or on Databricks the job's own SparkSession is used (and left running).
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]], job=True))

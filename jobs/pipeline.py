"""spark-submit / Databricks Python job entry point for the batch pipeline.

    spark-submit jobs/pipeline.py --config conf/local.yaml [--run-id ID] [--as-of YYYY-MM-DD] [--set k=v ...]

Same arguments as `segspark run`. Under spark-submit or on Databricks the job's own SparkSession is
used (and left running); locally a session is built.
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], job=True))

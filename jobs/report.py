"""spark-submit / Databricks Python job entry point for the HTML report of a run.

    spark-submit jobs/report.py --config conf/local.yaml [--run-id ID] [--out FILE] [--set k=v ...]

Same arguments as `segspark report`; prints the path of the report written. Under spark-submit or
on Databricks the job's own SparkSession is used (and left running); locally a session is built.
"""

import sys

from segspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]], job=True))

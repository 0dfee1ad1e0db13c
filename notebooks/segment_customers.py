# Databricks notebook source
# MAGIC %md
# MAGIC # Segment customers with segspark
# MAGIC
# MAGIC Runs the batch pipeline on the notebook's own `spark` (classic or Spark Connect / serverless),
# MAGIC shows the segments and writes the HTML report. Import this file as a notebook (it is in
# MAGIC Databricks' source format), or run it as a plain Python script where a `spark` exists.
# MAGIC Install first: `%pip install /Workspace/Repos/<you>/segspark` (or the built wheel).

# COMMAND ----------

import os

try:  # Databricks: parameters from widgets (also the parameters of a notebook task)
    dbutils.widgets.text("config", "conf/databricks.yaml")
    dbutils.widgets.text("overrides", "")
    config_path = dbutils.widgets.get("config")
    overrides = dbutils.widgets.get("overrides").split()
except NameError:  # elsewhere: environment variables
    config_path = os.environ.get("SEGSPARK_CONFIG", "conf/local.yaml")
    overrides = os.environ.get("SEGSPARK_OVERRIDES", "").split()

# COMMAND ----------

from segspark import usecases
from segspark.config import load_config
from segspark.io.tables import read_output_table
from segspark.report import write_report

cfg = load_config(config_path, overrides)
result = usecases.run(spark, cfg)  # `spark`: the notebook's own session (Databricks defines it)
print(f"run {result.run_id} {result.status}: {result.users:,} users")

# COMMAND ----------

segments = read_output_table(spark, cfg.output, "segment_profiles").where(f"run_id = '{result.run_id}'")
segments.select("model", "segment", "segment_name", "size", "share").orderBy("model", "segment").show(50, False)

# COMMAND ----------

report = write_report(spark, cfg, result.run_id)
print(f"report: {report.path}")

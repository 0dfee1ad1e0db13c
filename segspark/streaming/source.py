"""Event streams: a landing folder of json/csv/parquet files, MQTT or Kafka, read with the batch mapping.

Each micro-batch is an ordinary DataFrame of source records with the same columns the batch readers
give (`segspark.io.readers`): text formats arrive with every mapped column as a string and a
`_corrupt_record` column, so `ingest.tag_events` types them and quarantines what is bad exactly as
in batch. File streams need their schema up front: json takes it from the column mapping; csv and
parquet from the files already in the folder (the stream refuses to start on an empty one, saying
so). Kafka records are JSON objects in the message value; the connector is not part of Spark's
distribution, and without it the stream stops with a usage error that says how to add it. MQTT
messages are landed as JSON-lines files in input.path first (`mqtt_landing`: durable before they
are acknowledged); the stream reads those files and parses each message's payload like a Kafka value.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from segspark.config import InputConfig, StreamingConfig
from segspark.errors import InputSchemaError
from segspark.io.readers import CORRUPT_COLUMN, check_required_columns
from segspark.streaming import mqtt_landing

log = logging.getLogger(__name__)

KAFKA_PACKAGE = "org.apache.spark:spark-sql-kafka-0-10_2.13:{version}"


def mapped_text_schema(cfg: InputConfig) -> StructType:
    """The mapped source columns as strings, plus the corrupt-record column (json and Kafka values)."""
    names = list(dict.fromkeys(cfg.columns.mapped().values()))
    return StructType([StructField(n, StringType(), True) for n in names] + [StructField(CORRUPT_COLUMN, StringType(), True)])


def read_event_stream(spark: SparkSession, cfg: InputConfig, streaming: StreamingConfig) -> DataFrame:
    """A streaming DataFrame of source records from `cfg.path` (files) or Kafka (`cfg.options`)."""
    if cfg.format == "kafka":
        return _kafka(spark, cfg)
    if cfg.format == "delta":
        raise InputSchemaError("input.format delta: streaming reads a landing folder of json, csv or parquet files, "
                               "mqtt or kafka")
    reader = spark.readStream
    if streaming.max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", str(streaming.max_files_per_trigger))
    if cfg.format == "mqtt":
        return _mqtt_landed(reader, cfg)
    if cfg.format == "json":
        options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COLUMN, **cfg.options}
        return reader.schema(mapped_text_schema(cfg)).options(**options).json(cfg.path)
    existing = _existing_files(spark, cfg)
    if cfg.format == "csv":
        options = {"header": "true", **cfg.options}
        schema = StructType([StructField(c, StringType(), True) for c in existing.columns])
        schema = schema.add(StructField(CORRUPT_COLUMN, StringType(), True))
        options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COLUMN, **options, "enforceSchema": "false"}
        return reader.schema(schema).options(**options).csv(cfg.path)
    stream = reader.schema(existing.schema).options(**cfg.options).parquet(cfg.path)
    return stream.withColumn(CORRUPT_COLUMN, F.lit(None).cast(StringType()))


def _existing_files(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """The folder's files as a static DataFrame: csv and parquet streams take their columns from it."""
    try:
        if cfg.format == "csv":
            existing = spark.read.options(**{"header": "true", **cfg.options}).csv(cfg.path)
        else:
            existing = spark.read.options(**cfg.options).parquet(cfg.path)
    except Exception as exc:  # noqa: BLE001 - an empty or missing folder, said plainly below
        text = str(exc)
        if "PATH_NOT_FOUND" in text or "Path does not exist" in text or "UNABLE_TO_INFER_SCHEMA" in text:
            raise InputSchemaError(
                f"input.path {cfg.path!r}: a {cfg.format} stream takes its columns from the files already in the "
                "landing folder, and there are none yet; drop one file there first (or use json, whose columns "
                "come from input.columns)"
            ) from None
        raise
    check_required_columns(existing.withColumn(CORRUPT_COLUMN, F.lit(None)), cfg)
    return existing


LANDED_SCHEMA = StructType([StructField(name, StringType(), True) for name in ("id", "topic", "received_at", "payload")])


def _mqtt_landed(reader, cfg: InputConfig) -> DataFrame:
    """The landed MQTT messages (mqtt_landing writes them: one JSON line each, the payload as text),
    with each payload parsed like a line of a json file: the mapped columns as strings, and the
    payload itself in the corrupt-record column when it is not a JSON object."""
    # Only the landing's files; their lines are written by segspark, so one that does not parse is
    # damage to stop at (FAILFAST), not a bad event.
    landed = (reader.schema(LANDED_SCHEMA).option("mode", "FAILFAST")
              .option("pathGlobFilter", f"{mqtt_landing.PREFIX}*{mqtt_landing.SUFFIX}").json(str(mqtt_landing.landing_folder(cfg))))
    return _parse_payload(landed, F.col("payload"), cfg, cfg.options)


def _parse_payload(frame: DataFrame, text, cfg: InputConfig, options: dict[str, str]) -> DataFrame:
    """A message's text parsed with the mapped schema. from_json gives a null struct (not a corrupt
    record) for text that is JSON but no object (`42`, `[1]`, `null`) or empty: those are malformed too."""
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COLUMN, **options}
    parsed = F.from_json(text, mapped_text_schema(cfg), options)
    record = frame.select(parsed.alias("record"), text.alias("_text"))
    names = [f.name for f in mapped_text_schema(cfg).fields if f.name != CORRUPT_COLUMN]
    return record.select(
        *[F.col("record").getField(name).alias(name) for name in names],
        F.when(F.col("record").isNull() | F.col("record").getField(CORRUPT_COLUMN).isNotNull(), F.col("_text"))
        .alias(CORRUPT_COLUMN),
    )


def _kafka(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    missing = [key for key in ("kafka.bootstrap.servers",) if key not in cfg.options]
    topics = [key for key in ("subscribe", "subscribePattern", "assign") if key in cfg.options]
    if missing or not topics:
        raise InputSchemaError(
            "input.format kafka needs input.options kafka.bootstrap.servers and one of subscribe, "
            "subscribePattern or assign (e.g. --set input.options.subscribe=events)"
        )
    try:
        raw = spark.readStream.format("kafka").options(**cfg.options).load()
    except Exception as exc:  # noqa: BLE001 - the connector's absence, said plainly below
        if "kafka" in str(exc).lower() and ("DATA_SOURCE_NOT_FOUND" in str(exc) or "Failed to find data source" in str(exc)):
            raise InputSchemaError(
                "input.format kafka: the Kafka connector is not on the classpath. Add it with spark-submit "
                f"--packages {KAFKA_PACKAGE.format(version=spark.version)} (or spark.jars.packages), or on "
                "Databricks use a runtime that includes it"
            ) from None
        raise
    return _parse_payload(raw, F.col("value").cast("string"), cfg, {})  # options here are the connector's

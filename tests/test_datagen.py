"""The synthetic generator: deterministic, parallel, personas that differ as intended, noise."""

import datetime as dt

import pandas as pd
import pytest
from pyspark.sql.types import StringType, StructField, StructType

from segspark.datagen import EVENT_SCHEMA, PERSONAS, GenerateSpec, generate_events, write_dataset

from .conftest import data_lines


@pytest.fixture(scope="module")
def generated(spark):
    spec = GenerateSpec(users=1500, days=60, seed=3)
    events, truth = generate_events(spark, spec)
    return spec, events.toPandas(), truth.toPandas()


def sort(df):
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_schema_truth_and_time_window(generated):
    spec, events, truth = generated
    assert list(events.columns) == [f.name for f in EVENT_SCHEMA.fields]
    assert sorted(truth.user_id) == list(range(1, spec.users + 1))
    assert set(events.user_id) == set(truth.user_id)  # every user has events
    assert set(truth.persona) == set(PERSONAS) and len(PERSONAS) >= 5
    assert set(events.event_type) == {"view", "cart", "remove_from_cart", "purchase"}
    times = pd.to_datetime(events.event_time)
    assert times.min() >= pd.Timestamp(spec.end_date - dt.timedelta(days=spec.days - 1))
    assert times.max() < pd.Timestamp(spec.end_date + dt.timedelta(days=1))
    assert events.price.gt(0).all()


def test_same_seed_same_data_whatever_the_partitioning(spark, generated):
    spec, events, truth = generated
    again, again_truth = generate_events(spark, GenerateSpec(users=1500, days=60, seed=3, partitions=5))
    assert sort(again.toPandas()).equals(sort(events))
    assert sort(again_truth.toPandas()).equals(sort(truth))
    other = generate_events(spark, GenerateSpec(users=1500, days=60, seed=4))[0].toPandas()
    assert not sort(other).equals(sort(events))


def test_personas_differ_in_the_intended_direction(generated):
    _, events, truth = generated
    df = events.merge(truth, on="user_id")
    df["revenue"] = df.price.where(df.event_type == "purchase", 0.0)
    df["night"] = pd.to_datetime(df.event_time).dt.hour < 5
    per = df.groupby("persona")
    users = per.user_id.nunique()
    revenue = per.revenue.sum() / users
    share = lambda kind: per.event_type.apply(lambda s: (s == kind).mean())  # noqa: E731
    sessions = per.user_session.nunique() / users
    df["ts"] = pd.to_datetime(df.event_time)
    last_seen = df.groupby(["persona", "user_id"]).ts.max().groupby("persona").median()

    assert revenue.idxmax() == "loyal_high_spender"
    assert revenue["loyal_high_spender"] > 10 * revenue["window_shopper"]
    assert share("remove_from_cart").idxmax() == "cart_abandoner"
    assert share("purchase")["cart_abandoner"] < share("purchase")["bargain_hunter"] / 5
    assert per.night.mean().idxmax() == "night_owl_browser"
    assert per.price.median().idxmin() == "bargain_hunter"
    orders = df[df.event_type == "purchase"].groupby("persona").user_session.nunique() / users
    assert sessions.idxmin() == "one_time_buyer" and sessions.idxmax() == "night_owl_browser"
    assert orders.idxmax() == "loyal_high_spender"
    assert last_seen.idxmin() == "one_time_buyer"  # lapsed: the oldest last visit


def test_noise_parquet_duplicates_and_missing_prices(spark, tmp_path):
    spec = GenerateSpec(users=400, days=30, seed=9, duplicate_share=0.05, missing_price_share=0.05)
    summary = write_dataset(spark, spec, str(tmp_path), "parquet")
    events = spark.read.parquet(str(tmp_path / "events")).toPandas()
    assert summary["events"] == len(events) and summary["users"] == 400
    assert sum(summary["personas"].values()) == 400
    duplicates = len(events) - len(events.drop_duplicates())
    assert 0.03 * len(events) < duplicates < 0.07 * len(events)
    assert 0.02 < events.price.isna().mean() < 0.08
    assert spark.read.parquet(str(tmp_path / "truth")).count() == 400


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_malformed_lines_in_text_formats(spark, tmp_path, fmt):
    spec = GenerateSpec(users=300, days=30, seed=2, malformed_share=0.02)
    write_dataset(spark, spec, str(tmp_path), fmt)
    clean = generate_events(spark, GenerateSpec(users=300, days=30, seed=2))[0].count()
    reader = spark.read.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt_record")
    if fmt == "csv":
        schema = StructType([*EVENT_SCHEMA.fields, StructField("_corrupt_record", StringType())])  # add() mutates
        df = reader.option("header", "true").schema(schema).csv(str(tmp_path / "events"))
    else:
        df = reader.json(str(tmp_path / "events"))
    df = df.cache()
    bad = df.filter(df["_corrupt_record"].isNotNull()).count()
    assert 0.01 * clean < bad < 0.03 * clean
    assert df.count() == clean + bad
    header_lines = 1 if fmt == "csv" else 0
    assert data_lines(tmp_path / "events") == clean + bad + header_lines * len(
        [p for p in (tmp_path / "events").iterdir() if p.name.startswith("part-")]
    )
    df.unpersist()


def test_bad_spec_is_refused(spark, tmp_path):
    with pytest.raises(ValueError, match="duplicate_share"):
        GenerateSpec(users=10, duplicate_share=1.5)
    with pytest.raises(ValueError, match="text format"):
        write_dataset(spark, GenerateSpec(users=10, malformed_share=0.1), str(tmp_path), "parquet")


def _files_in_order(folder, suffix):
    """A folder's part files in partition order (Spark's and the driver's names both start part-NNNNN)."""
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.name.endswith(suffix))


@pytest.mark.parametrize("fmt, spec", [
    ("parquet", GenerateSpec(users=2500, days=20, seed=8, duplicate_share=0.01, missing_price_share=0.01)),
    ("csv", GenerateSpec(users=1200, days=20, seed=9, layout="invoices", malformed_share=0.01)),
    ("json", GenerateSpec(users=700, days=10, seed=10, malformed_share=0.02, missing_price_share=0.01)),
], ids=["parquet", "csv-invoices", "json"])
def test_the_driver_writes_the_sample_the_spark_job_writes(spark, tmp_path, fmt, spec):
    """The same records in the same partitions and order, the same schema, `_SUCCESS`, the same summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segspark.datagen_local import write_dataset_on_driver, writes_on_driver

    assert writes_on_driver(spec, str(tmp_path / "driver"))
    by_spark = write_dataset(spark, spec, str(tmp_path / "spark"), fmt)
    by_driver = write_dataset_on_driver(spec, str(tmp_path / "driver"), fmt)
    assert by_driver == by_spark

    def parquet(root, name):
        return pa.concat_tables([pq.read_table(p) for p in _files_in_order(root / name, ".parquet")])

    def lines(root):  # every line of every file, files in partition order; csv headers apart
        text = [p.read_text(encoding="utf-8").splitlines() for p in _files_in_order(root / "events", ".txt")]
        header = [f[0] for f in text if fmt == "csv"]
        return [line for f in text for line in f[1 if fmt == "csv" else 0:]], set(header)

    spark_root, driver_root = tmp_path / "spark", tmp_path / "driver"
    for name in ("events", "truth"):
        assert (driver_root / name / "_SUCCESS").exists()
    assert parquet(driver_root, "truth").equals(parquet(spark_root, "truth"))
    for name in ("events", "truth") if fmt == "parquet" else ("truth",):  # rows per file: the same partitions
        assert [pq.read_metadata(p).num_rows for p in _files_in_order(driver_root / name, ".parquet")] == \
            [pq.read_metadata(p).num_rows for p in _files_in_order(spark_root / name, ".parquet")]
    if fmt == "parquet":
        written, expected = parquet(driver_root, "events"), parquet(spark_root, "events")
        assert written.schema.equals(expected.schema) and written.num_rows == by_spark["events"] > 0
        assert written.equals(expected)
    else:
        assert lines(driver_root) == lines(spark_root) and lines(driver_root)[0]
    # What a run reads: the same rows through Spark's own reader.
    read = {"parquet": spark.read.parquet, "json": spark.read.text, "csv": spark.read.text}[fmt]
    ours, theirs = read(str(driver_root / "events")), read(str(spark_root / "events"))
    assert ours.schema == theirs.schema and ours.exceptAll(theirs).count() == 0 == theirs.exceptAll(ours).count()

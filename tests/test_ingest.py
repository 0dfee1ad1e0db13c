"""Ingest: typing through the mapping, and every bad record quarantined with its reason."""

import json

import pytest

from segspark import ingest
from segspark.errors import InputSchemaError
from segspark.io.readers import read_raw_events

GOOD = {
    "event_time": "2026-10-01 10:00:00",
    "event_type": "view",
    "product_id": 11,
    "category_code": "electronics.phone",
    "brand": "acme",
    "price": 10.5,
    "user_id": 1,
    "user_session": "s1",
}


def rec(**changes):
    return {**GOOD, **changes}


def tag(spark, make_config, path, fmt):
    cfg = make_config(f"input.path={path}", f"input.format={fmt}")
    return ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input)


def reasons_by_product(tagged):
    rows = tagged.select("item_id", ingest.REASON, ingest.RAW).collect()
    return rows


@pytest.fixture
def json_log(tmp_path):
    lines = [
        json.dumps(rec(product_id=1)),
        json.dumps(rec(product_id=2, user_id=None)),  # missing_user_id
        json.dumps(rec(product_id=3, event_time="01/10/2026 10:00")),  # unparseable_timestamp
        json.dumps(rec(product_id=4, price=-1.0)),  # negative_price
        json.dumps(rec(product_id=5, event_type="wishlist")),  # unknown_event_type
        json.dumps(rec(product_id=6, event_type="purchase", price=None)),  # missing_price
        json.dumps(rec(product_id=7)),
        json.dumps(rec(product_id=7)),  # duplicate of the line above
        json.dumps(rec(product_id=8, event_time=None)),  # missing_event_time
        json.dumps(rec(product_id=9, price="ten")),  # unparseable_price
        '{"event_time": "2026-10-01 1',  # malformed_record
        json.dumps(rec(product_id=10, user_id="17850.0", event_type="PURCHASE")),  # clean; id normalised
    ]
    path = tmp_path / "events"
    path.mkdir()
    (path / "part-0.json").write_text("\n".join(lines) + "\n")
    return path


def test_json_bad_records_get_their_reason_and_nothing_is_lost(spark, make_config, json_log):
    tagged = tag(spark, make_config, json_log, "json")
    rows = tagged.select("item_id", "user_id", "event_type", ingest.REASON, ingest.RAW).collect()
    by_item = {}
    for row in rows:
        by_item.setdefault(row.item_id, []).append(row)
    reason = {item: sorted(str(r[ingest.REASON]) for r in group) for item, group in by_item.items()}
    assert reason["1"] == ["None"]
    assert reason["2"] == ["missing_user_id"]
    assert reason["3"] == ["unparseable_timestamp"]
    assert reason["4"] == ["negative_price"]
    assert reason["5"] == ["unknown_event_type"]
    assert reason["6"] == ["missing_price"]
    assert reason["7"] == ["None", "duplicate"]
    assert reason["8"] == ["missing_event_time"]
    assert reason["9"] == ["unparseable_price"]
    assert reason[None] == ["malformed_record"]
    assert reason["10"] == ["None"]
    normalised = next(r for r in rows if r.item_id == "10")
    assert normalised.user_id == "17850" and normalised.event_type == "purchase"
    # The raw record travels with every quarantined row, the malformed line verbatim.
    malformed = next(r for r in rows if r[ingest.REASON] == "malformed_record")
    assert malformed[ingest.RAW].startswith('{"event_time": "2026-10-01 1')
    assert all(r[ingest.RAW] for r in rows if r[ingest.REASON])

    clean = ingest.clean_events(tagged).count()
    quarantined = ingest.quarantine_rows(tagged, "r1", str(json_log)).count()
    assert (clean, quarantined) == (3, 9)
    assert clean + quarantined == 12  # every input line is accounted for


def test_csv_malformed_lines_and_types(spark, make_config, tmp_path):
    path = tmp_path / "csv"
    path.mkdir()
    header = "event_time,event_type,product_id,category_code,brand,price,user_id,user_session"
    (path / "a.csv").write_text(
        "\n".join(
            [
                header,
                "2026-10-01 10:00:00,purchase,1,c.a,b,12.5,42,s1",
                "2026-10-01 10:05:00,view,2,c.a,b,,42,s1",  # view without price is fine
                "garbage line without enough fields",
                "2026-10-01 10:06:00,cart,3,c.a,b,3.0,43,s2,EXTRA",
            ]
        )
        + "\n"
    )
    tagged = tag(spark, make_config, path, "csv")
    rows = tagged.collect()
    assert sorted(str(r[ingest.REASON]) for r in rows) == ["None", "None", "malformed_record", "malformed_record"]
    purchase = next(r for r in rows if r.item_id == "1")
    assert purchase.price == 12.5 and purchase.quantity == 1.0 and purchase.user_id == "42"
    assert str(purchase.event_time) == "2026-10-01 10:00:00"


def test_parquet_and_delta_inputs_are_typed(spark, make_config, tmp_path):
    from segspark.io.delta import write_table

    df = spark.createDataFrame([rec(product_id=1), rec(product_id=2, price=-3.0)])
    df.write.parquet(str(tmp_path / "pq"))
    write_table(spark, df, str(tmp_path / "dl"))
    for path, fmt in ((tmp_path / "pq", "parquet"), (tmp_path / "dl", "delta")):
        got = sorted((r.item_id, r[ingest.REASON]) for r in tag(spark, make_config, path, fmt).collect())
        assert got == [("1", None), ("2", "negative_price")], fmt


def test_source_time_zone_is_converted_to_utc(spark, make_config, tmp_path):
    path = tmp_path / "tz"
    path.mkdir()
    (path / "e.json").write_text(json.dumps(rec(event_time="2026-07-01 12:00:00")) + "\n")
    cfg = make_config(f"input.path={path}", "input.format=json", "input.time_zone=Europe/London")
    row = ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input).collect()[0]
    assert str(row.event_time) == "2026-07-01 11:00:00"  # BST is UTC+1


def test_missing_required_columns_lists_missing_and_present(spark, make_config, tmp_path):
    spark.createDataFrame([{"uid": 1, "ts": "2026-10-01 10:00:00"}]).write.parquet(str(tmp_path / "p"))
    cfg = make_config(f"input.path={tmp_path / 'p'}")
    with pytest.raises(InputSchemaError) as err:
        read_raw_events(spark, cfg.input)
    message = str(err.value)
    assert "'user_id' (for user_id)" in message and "'event_time' (for event_time)" in message
    assert "Columns present: ts, uid" in message


def test_missing_input_path_is_a_usage_error(spark, make_config, tmp_path):
    cfg = make_config(f"input.path={tmp_path / 'nowhere'}")
    with pytest.raises(InputSchemaError, match="no parquet data found"):
        read_raw_events(spark, cfg.input)


def _json_folder(tmp_path, name, records):
    path = tmp_path / name
    path.mkdir()
    (path / "part-0.json").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_non_finite_and_implausible_prices_and_quantities_are_quarantined(spark, make_config, tmp_path):
    # Prices as JSON text and numbers (read as text), quantities in their own column.
    path = _json_folder(tmp_path, "values", [
        rec(product_id=1, event_type="purchase", price="NaN", qty=1),
        rec(product_id=2, event_type="purchase", price="Infinity", qty=1),
        rec(product_id=3, event_type="view", price="-Infinity", qty=1),  # negative, but not a number first
        '{"event_time": "2026-10-01 10:00:00", "event_type": "purchase", "product_id": 4, "price": 1e308, '
        '"user_id": 1, "user_session": "s1", "category_code": "c", "brand": "b", "qty": 1}',
        rec(product_id=5, event_type="purchase", price="1e999", qty=1),  # overflows to infinity
        rec(product_id=6, event_type="purchase", price=10.0, qty="NaN"),
        rec(product_id=7, event_type="purchase", price=10.0, qty=5e6),
        rec(product_id=8, event_type="purchase", price=999999999.0, qty=-1000000),  # both at the bounds: a return
        rec(product_id=9, event_type="view", price=0.5, qty=1),
    ])
    cfg = make_config(f"input.path={path}", "input.format=json", "input.columns.quantity=qty")
    tagged = ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input)
    got = {r.item_id: r[ingest.REASON] for r in tagged.collect()}
    assert got == {
        "1": "unparseable_price", "2": "unparseable_price", "3": "unparseable_price", "4": "implausible_price",
        "5": "unparseable_price", "6": "unparseable_quantity", "7": "implausible_quantity", "8": None, "9": None,
    }
    assert ingest.clean_events(tagged).count() + ingest.quarantine_rows(tagged, "r", str(path)).count() == 9
    # The bounds are configuration: a wider price range keeps 1e308 (and still refuses infinity).
    wide = make_config(f"input.path={path}", "input.format=json", "input.columns.quantity=qty",
                       "input.price_bounds=[0, 1e308]")
    again = {r.item_id: r[ingest.REASON] for r in ingest.tag_events(read_raw_events(spark, wide.input), wide.input).collect()}
    assert again["4"] is None and again["5"] == "unparseable_price"


def test_non_finite_doubles_in_parquet_are_quarantined(spark, make_config, tmp_path):
    rows = [rec(product_id=i, event_type="purchase", price=p) for i, p in
            enumerate([float("nan"), float("inf"), float("-inf"), 1e308, 12.5])]
    spark.createDataFrame(rows).write.parquet(str(tmp_path / "pq"))
    got = sorted((r.item_id, r[ingest.REASON]) for r in tag(spark, make_config, tmp_path / "pq", "parquet").collect())
    assert got == [("0", "unparseable_price"), ("1", "unparseable_price"), ("2", "unparseable_price"),
                   ("3", "implausible_price"), ("4", None)]


def test_event_times_outside_the_plausible_window_are_quarantined(spark, make_config, tmp_path):
    import datetime as dt

    path = _json_folder(tmp_path, "times", [
        rec(product_id=1, event_time="1970-01-01 00:00:00"),
        rec(product_id=2, event_time="1999-12-31 23:59:59"),
        rec(product_id=3, event_time="2000-01-01 00:00:00"),  # the first plausible instant
        rec(product_id=4, event_time="2026-10-02 20:00:00"),  # 20 h after the run started: clock skew
        rec(product_id=5, event_time="2026-10-03 02:00:00"),  # 26 h after
        rec(product_id=6, event_time="2999-01-01 00:00:00"),
    ])
    started = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
    cfg = make_config(f"input.path={path}", "input.format=json")
    got = {r.item_id: r[ingest.REASON] for r in
           ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input, now=started).collect()}
    assert got == {"1": "implausible_timestamp", "2": "implausible_timestamp", "3": None, "4": None,
                   "5": "implausible_timestamp", "6": "implausible_timestamp"}
    # Archives older than 2000: the window is configuration (null: no bound).
    old = make_config(f"input.path={path}", "input.format=json", "input.plausible_time.earliest=null",
                      "input.plausible_time.max_future_hours=48")
    again = {r.item_id: r[ingest.REASON] for r in
             ingest.tag_events(read_raw_events(spark, old.input), old.input, now=started).collect()}
    assert again == {"1": None, "2": None, "3": None, "4": None, "5": None, "6": "implausible_timestamp"}


def test_readme_documents_every_quarantine_reason_once():
    import re

    from .conftest import REPO

    text = (REPO / "README.md").read_text()
    paragraph = text[text.index("Quarantine reasons"):].split("\n\n")[0]
    documented = re.findall(r"`([a-z_]+)`", paragraph)
    assert [r for r in documented if r in ingest.REASONS] == list(ingest.REASONS), "README lists REASONS in order"


def test_utc_suffixed_times_read_as_the_pattern_reads_them(spark):
    """`yyyy-MM-dd HH:mm:ss z` (the REES46 layout): UTC values of that exact shape skip the pattern's
    formatter; every value, of that shape or not, gets what the pattern itself gives."""
    from pyspark.sql import functions as F

    from segspark.ingest.events import UTC_SUFFIXED_FORMAT, _utc_suffixed_time

    values = [
        "2019-10-01 00:00:03 UTC", "2019-12-31 23:59:59 UTC", "2020-02-29 12:00:00 UTC",  # valid, the fast path
        "2019-02-29 12:00:00 UTC", "2019-13-01 00:00:00 UTC", "2019-10-01 24:00:00 UTC",  # impossible dates, times
        "2019-10-01 00:60:00 UTC", "2019-1a-01 00:00:00 UTC", "2019-10-01T00:00:03 UTC",  # wrong digits, separator
        "2019-10-01 00:00:03 CET", "2019-10-01 00:00:03 Europe/Paris", "2019-10-01 00:00:03 GMT+2",  # other zones
        "2019-10-01 0:00:03 UTC", "2019-10-01 00:00:03.5 UTC", "2019-10-01 00:00:03", "2019-10-01 00:00:03 utc",
        " 2019-10-01 00:00:03 UTC", "+2019-10-01 00:00:0 UTC", "UTC", "",
        # the shape is a LIKE: its wildcards in a value, and a line break, are characters like any other
        "2019_10_01 00:00:03 UTC", "2019-10-01 00:00:0% UTC", "2019-10-01 00:0\n:03 UTC", "2019-10-01 00:00:03 UTC\n",
    ]
    df = spark.createDataFrame([(v,) for v in values], "text string")
    rows = df.select(
        "text",
        _utc_suffixed_time(F.col("text")).alias("fast"),
        F.try_to_timestamp(F.col("text"), F.lit(UTC_SUFFIXED_FORMAT)).alias("pattern"),
    ).collect()
    assert [(r.text, r.fast) for r in rows] == [(r.text, r.pattern) for r in rows]
    parsed = {r.text: r.fast for r in rows}
    assert str(parsed["2019-10-01 00:00:03 UTC"]) == "2019-10-01 00:00:03"
    assert str(parsed["2019-10-01 00:00:03 CET"]) == "2019-09-30 22:00:03"  # CEST in October: UTC+2
    assert parsed["2019-02-29 12:00:00 UTC"] is None


def test_event_types_are_lowered_as_spark_lowers_them(spark):
    """Event types match input.event_types whatever their case: ASCII values are lowered by a letter map
    (ICU's case tables cost a second or two to build in each JVM); every value gets what lower() gives."""
    from pyspark.sql import functions as F

    from segspark.ingest.events import _lower

    values = ["view", "VIEW", "Purchase", "remove_from_CART", "cart-2", " Cart ", "", None,
              "ÉVÉNEMENT", "İstanbul", "\u212aelvin", "straße", "ΣΊΣΥΦΟΣ", "日本VIEW", "view\u0301", "\x00A\x7f"]
    df = spark.createDataFrame([(v,) for v in values], "text string")
    rows = df.select("text", _lower(F.col("text")).alias("mine"), F.lower("text").alias("spark")).collect()
    assert [(r.text, r.mine) for r in rows] == [(r.text, r.spark) for r in rows]
    assert {r.text: r.mine for r in rows}["remove_from_CART"] == "remove_from_cart"


def test_counting_keeps_the_tagged_events_unencoded_and_gives_the_session_its_setting_back(
    spark, make_config, tmp_path, monkeypatch
):
    """ingest_records keeps the tagged events in Spark's columnar cache without its per-column
    encoding (records._UNENCODED_CACHE): the setting is in the session while the cache is built, and
    the session's own value is back afterwards, the cache still readable."""
    from segspark.ingest import records

    key = "spark.sql.inMemoryColumnarStorage.compressed"
    path = tmp_path / "events.json"
    path.write_text("\n".join(json.dumps(rec(product_id=i)) for i in range(5)) + "\n")
    cfg = make_config(f"input.path={path}", "input.format=json")
    seen = []
    real = records.tag_events

    def tag_and_look(*args, **kwargs):
        seen.append(spark.conf.get(key))
        return real(*args, **kwargs)

    monkeypatch.setattr(records, "tag_events", tag_and_look)
    spark.conf.set(key, "true")
    ingested = records.ingest_records(read_raw_events(spark, cfg.input), cfg.input)
    try:
        assert seen == ["false"] and spark.conf.get(key) == "true"
        assert ingested.clean_rows == 5 and ingested.clean.count() == 5
    finally:
        ingested.unpersist()
        spark.conf.unset(key)

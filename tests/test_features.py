"""Features: definitions on hand-made events, point-in-time correctness."""

import datetime as dt

import pytest
from pyspark.sql import Row

from segspark.config import FeaturesConfig
from segspark.features import user_features
from segspark.features.catalog import catalog
from segspark.io.catalog import EVENTS

AS_OF = dt.date(2026, 10, 10)


def ev(user, when, kind="view", price=None, qty=1.0, session=None, order=None, item="i", category="c",
       country=None, device=None):
    return Row(
        user_id=user,
        event_time=dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC),
        event_type=kind,
        item_id=item,
        category=category,
        price=price,
        quantity=qty,
        session_id=session,
        order_id=order,
        country=country,
        device=device,
    )


EVENTS_ROWS = [
    # user a: two gap-sessions on 10-01 (the 40-minute gap splits them), one purchase each
    ev("a", "2026-10-01 10:00:00"),
    ev("a", "2026-10-01 10:10:00", "cart", 20.0),
    ev("a", "2026-10-01 10:15:00", "purchase", 20.0, 2.0),
    ev("a", "2026-10-01 10:55:00", "purchase", 5.0),
    ev("a", "2026-10-05 09:00:00", "return", 5.0, -1.0),
    ev("a", "2026-10-05 09:01:00", "remove_from_cart", 5.0),
    # user b: only views, all on one day
    ev("b", "2026-10-09 23:00:00"),
    ev("b", "2026-10-09 23:10:00"),
]


@pytest.fixture
def events(spark):
    return spark.createDataFrame(EVENTS_ROWS, EVENTS)


def features_of(df, as_of=AS_OF, **cfg):
    return {r.user_id: r for r in user_features(df, as_of, FeaturesConfig(**cfg)).collect()}


def test_feature_definitions(events):
    got = features_of(events)
    a = got["a"]
    # Cutoff is 2026-10-11 00:00 UTC; last purchase 2026-10-01 10:55.
    assert a.recency_days == pytest.approx(9 + (13 * 60 + 5) / 1440)
    assert a.tenure_days == pytest.approx(9 + 14 / 24)
    assert a.frequency == 2  # two purchase sessions (no order id in the source)
    assert a.monetary == pytest.approx(20 * 2 + 5 - 5)  # purchases minus the return
    assert a.sessions == 3  # 10:00-10:15, 10:55, and 10-05
    assert (a.views, a.carts, a.removes_from_cart, a.purchases, a.returns) == (1, 1, 1, 2, 1)
    assert a.as_of == AS_OF

    b = got["b"]
    assert b.recency_days is None  # never purchased
    assert b.frequency == 0 and b.monetary == 0 and b.sessions == 1
    assert b.tenure_days == pytest.approx(1 + 1 / 24)  # first event 10-09 23:00, cutoff 10-11 00:00


def test_session_gap_is_configurable(events):
    assert features_of(events, session_gap_minutes=60)["a"].sessions == 2


def test_source_sessions_and_order_ids_are_used_when_present(spark):
    rows = [
        ev("c", "2026-10-01 10:00:00", session="x"),
        ev("c", "2026-10-01 15:00:00", "purchase", 1.0, session="x", order="o1"),
        ev("c", "2026-10-01 15:01:00", "purchase", 2.0, session="x", order="o1"),
        ev("c", "2026-10-02 15:00:00", "purchase", 3.0, session="y", order="o2"),
    ]
    c = features_of(spark.createDataFrame(rows, EVENTS))["c"]
    assert c.sessions == 2 and c.frequency == 2 and c.monetary == pytest.approx(6.0)
    assert features_of(spark.createDataFrame(rows, EVENTS), use_source_sessions=False)["c"].sessions == 3


def test_events_after_as_of_change_nothing(spark, events):
    later = [
        ev("a", "2026-10-11 00:00:00", "purchase", 999.0),  # first instant after the as-of day
        ev("a", "2026-12-01 10:00:00", "view"),
        ev("z", "2026-10-12 10:00:00", "purchase", 1.0),  # a user who only appears later
    ]
    with_later = events.unionByName(spark.createDataFrame(later, EVENTS))
    assert features_of(with_later) == features_of(events)


def test_as_of_before_a_users_first_event_excludes_the_user(events):
    assert set(features_of(events, as_of=dt.date(2026, 10, 2))) == {"a"}


def test_every_feature_column_is_in_the_catalog_in_table_order(events):
    for cfg in (FeaturesConfig(), FeaturesConfig(top_categories=2, one_hot={"country": {"top_n": 1}})):
        columns = user_features(events, AS_OF, cfg).columns
        entries = catalog(cfg)
        assert columns == ["user_id", "as_of", *[f.name for f in entries]]
        assert all(f.definition and f.unit and f.source for f in entries)
    assert "top_category_2_share" in columns and "country_top_1" in columns and "device_top_1" not in columns


# A user with two sessions on two days (one a Saturday), in two categories and two countries.
RICH = [
    # Session s1, Thursday 2026-10-01 (UTC): 07:00 view, 07:10 cart, 07:20 purchase of 2 x 10.0 (order o1)
    ev("r", "2026-10-01 07:00:00", "view", 8.0, session="s1", item="i1", category="home.decor", country="DE"),
    ev("r", "2026-10-01 07:10:00", "cart", 10.0, session="s1", item="i2", category="home.decor", country="DE"),
    ev("r", "2026-10-01 07:20:00", "purchase", 10.0, 2.0, session="s1", order="o1", item="i2",
       category="home.decor", country="DE"),
    # Session s2, Saturday 2026-10-03: 20:00 view, 20:30 cart, 20:31 remove, 20:40 purchase of 1 x 30.0 (o2),
    # 21:00 return of one item of o1 (10.0)
    ev("r", "2026-10-03 20:00:00", "view", 40.0, session="s2", item="i3", category="sport.bike", country="DE"),
    ev("r", "2026-10-03 20:30:00", "cart", 30.0, session="s2", item="i4", category="sport.bike", country="DE"),
    ev("r", "2026-10-03 20:31:00", "remove_from_cart", 30.0, session="s2", item="i4", category="sport.bike",
       country="AT"),
    ev("r", "2026-10-03 20:40:00", "purchase", 30.0, session="s2", order="o2", item="i4", category="sport.bike",
       country="DE"),
    ev("r", "2026-10-03 21:00:00", "return", 10.0, -1.0, session="s2", order="o1r", item="i2",
       category="home.decor", country="DE"),
    # Another user, so that the slots have a ranking: "home" is the most common top-level category.
    ev("q", "2026-10-05 12:00:00", "view", 5.0, session="q1", category="home.garden", country="FR"),
    ev("q", "2026-10-05 12:05:00", "view", 5.0, session="q1", category="home.garden", country="FR"),
]


def test_rich_feature_definitions(spark):
    cfg = FeaturesConfig(top_categories=2, trend_window_days=7, one_hot={"country": {"top_n": 1}})
    df = spark.createDataFrame(RICH, EVENTS)
    r = {row.user_id: row for row in user_features(df, AS_OF, cfg).collect()}["r"]
    assert r.events == 8 and r.sessions == 2 and r.events_per_session == 4.0
    assert r.session_duration_mean_min == pytest.approx((20 + 60) / 2)
    assert r.session_duration_median_min in (20.0, 60.0)  # approximate median of two values
    assert r.active_days == 2
    assert r.tenure_days == pytest.approx(10 - 7 / 24)  # 10-01 07:00 to the cutoff 10-11 00:00
    assert r.sessions_per_week == pytest.approx(2 / ((10 - 7 / 24) / 7))
    assert r.frequency == 2  # o1 and o2; the return is not an order
    assert r.purchase_interval_mean_days == pytest.approx((2 * 24 + 13 + 20 / 60) / 24)
    assert r.purchase_interval_std_days == 0.0  # one interval
    assert r.basket_size == 1.5 and r.avg_order_value == 25.0  # (2 + 1) items, (20 + 30) / 2
    assert r.monetary == 40.0 and r.return_value == 10.0 and r.return_share == pytest.approx(10 / 50)
    assert r.view_to_cart_rate == 1.0 and r.cart_to_purchase_rate == 1.0 and r.remove_share == 0.5
    assert r.price_viewed_mean == 24.0 and r.price_viewed_median in (8.0, 40.0)
    assert r.price_bought_mean == 20.0 and r.price_bought_median in (10.0, 30.0)
    assert (r.night_share, r.morning_share, r.afternoon_share, r.evening_share) == (0.0, 3 / 8, 0.0, 5 / 8)
    assert r.weekend_share == 5 / 8
    assert r.distinct_items == 4 and r.distinct_categories == 2
    # Trend windows of 7 days before the cutoff 10-11: last = 10-04..10-10 (none), prior = 09-27..10-03.
    assert (r.events_last_window, r.events_prior_window, r.activity_trend) == (0, 8, -1.0)
    # Slots: top-level categories by events: home (5 events over both users), sport (4).
    assert (r.top_category_1_share, r.top_category_2_share, r.other_category_share) == (4 / 8, 4 / 8, 0.0)
    # Countries by events: DE (7) is the slot; r's most frequent country is DE.
    assert (r.country_top_1, r.country_other) == (1, 0)
    q = {row.user_id: row for row in user_features(df, AS_OF, cfg).collect()}["q"]
    assert (q.country_top_1, q.country_other) == (0, 1)


def test_pinned_slots_keep_their_meaning(spark):
    cfg = FeaturesConfig(categories=["sport", "toys"], one_hot={"country": {"values": ["FR", "DE"]}})
    r = {row.user_id: row for row in user_features(spark.createDataFrame(RICH, EVENTS), AS_OF, cfg).collect()}["r"]
    assert (r.top_category_1_share, r.top_category_2_share, r.other_category_share) == (0.5, 0.0, 0.5)
    assert (r.country_top_1, r.country_top_2, r.country_other) == (0, 1, 0)


def test_a_single_day_user_has_sane_rates(spark):
    rows = [
        ev("d", "2026-10-10 09:00:00", "view", 5.0),
        ev("d", "2026-10-10 09:01:00", "cart", 5.0),
        ev("d", "2026-10-10 09:02:00", "purchase", 5.0),
    ]
    d = features_of(spark.createDataFrame(rows, EVENTS))["d"]
    assert d.active_days == 1 and d.sessions == 1
    assert d.sessions_per_week == 1.0  # tenure below a week counts as one week, not 1 / 0.6 days
    assert d.purchase_interval_mean_days is None and d.purchase_interval_std_days is None
    assert d.view_to_cart_rate == 1.0 and d.cart_to_purchase_rate == 1.0 and d.remove_share == 0.0
    assert d.recency_days == pytest.approx(d.tenure_days - 2 / 1440)
    assert d.events_last_window == 3 and d.activity_trend == 1.0


def test_zero_denominators_give_null_never_nan_or_infinity(spark, sample_parquet):
    from pyspark.sql import functions as F

    odd = [
        ev("only-return", "2026-10-01 10:00:00", "return", 5.0, -1.0),
        ev("only-cart", "2026-10-01 10:00:00", "cart", 5.0),
        ev("only-remove", "2026-10-01 10:00:00", "remove_from_cart", None),
        ev("only-view-no-price", "2026-10-01 10:00:00", "view", None, category=None, item=None),
        ev("free-purchase-lines", "2026-10-01 10:00:00", "purchase", 0.0, 0.0),
    ]
    from segspark import ingest
    from segspark.config import load_config
    from segspark.io.readers import read_raw_events

    input_cfg = load_config(make_features_config(), [f"input.path={sample_parquet}/events"]).input
    clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, input_cfg), input_cfg))
    df = clean.unionByName(spark.createDataFrame(odd, EVENTS))
    features = user_features(df, dt.date(2026, 10, 31), FeaturesConfig())
    numeric = [f.name for f in features.schema.fields if f.dataType.typeName() in ("double", "long", "integer")]
    bad = features.select(
        *[F.count_if(F.isnan(F.col(n)) | (F.abs(F.col(n)) == float("inf"))).alias(n) for n in numeric]
    ).first()
    assert {n: bad[n] for n in numeric if bad[n]} == {}
    rows = {r.user_id: r for r in features.filter(F.col("user_id").startswith("only")).collect()}
    assert rows["only-return"].return_share is None and rows["only-return"].monetary == -5.0
    assert rows["only-cart"].view_to_cart_rate is None and rows["only-cart"].cart_to_purchase_rate == 0.0
    assert rows["only-remove"].remove_share is None
    assert rows["only-view-no-price"].price_viewed_mean is None and rows["only-view-no-price"].distinct_items == 0


def make_features_config():
    from .conftest import REPO

    return REPO / "conf" / "local.yaml"


@pytest.mark.parametrize("zone", ["UTC", "Europe/London", "America/St_Johns", "Asia/Kathmandu"])
def test_local_hour_day_and_weekday_are_those_of_the_zone(spark, zone):
    """The arithmetic the time-of-day, weekend and active-day features use gives what Spark's own
    hour(), dayofweek() and to_date() give in features.time_zone: before 1970, at midnight, across
    daylight-saving changes and in zones with half- and quarter-hour offsets."""
    from pyspark.sql import functions as F

    from segspark.features.behaviour import _local_day, _local_hour, _local_weekday

    instants = ["1965-03-01 23:59:59.999999", "1969-12-31 23:59:59.5", "1970-01-01 00:00:00", "2024-02-29 23:30:00",
                "2026-03-29 00:59:59.999999", "2026-03-29 01:00:00", "2026-10-25 00:30:00", "2026-10-25 01:30:00",
                "2026-11-01 03:29:59", "2026-12-31 23:59:59.999999", "2038-01-19 03:14:08"]
    instants += [f"2026-06-0{d} {h:02d}:45:00" for d in range(1, 8) for h in range(0, 24, 5)]
    cfg = FeaturesConfig(time_zone=zone)
    events = spark.createDataFrame([(t,) for t in instants], "t string").select(F.col("t").cast("timestamp").alias("event_time"))
    local = F.from_utc_timestamp(F.col("event_time"), zone)
    rows = events.select(
        _local_hour(cfg).alias("hour"), F.hour(local).alias("spark_hour"),
        _local_weekday(cfg).alias("weekday"), (F.dayofweek(local) - 1).alias("spark_weekday"),
        _local_day(cfg).alias("day"), F.unix_date(F.to_date(local)).alias("spark_day"),
    ).collect()
    assert len(rows) == len(instants)
    for row in rows:
        assert (row.hour, row.weekday, row.day) == (row.spark_hour, row.spark_weekday, row.spark_day), row


@pytest.mark.parametrize("as_of", [dt.date(2026, 10, 20), dt.date(2026, 10, 31)])
def test_sessions_by_source_id_give_the_features_of_gap_numbering(spark, sample_parquet, as_of):
    """Where every clean event has a session id, sessions (and, without order ids, orders) are grouped
    by it with no window (SourceKeys): the features are those of the general path, to the float's
    rounding, with and without order ids and with events after the as-of day. ingest's counts tell
    which path applies: the generated clickstream has every session id and no order id."""
    import math

    from pyspark.sql import functions as F

    from segspark import ingest
    from segspark.config import load_config
    from segspark.features.behaviour import SourceKeys
    from segspark.io.readers import read_raw_events

    input_cfg = load_config(make_features_config(), [f"input.path={sample_parquet}/events"]).input
    ingested = ingest.ingest_records(read_raw_events(spark, input_cfg), input_cfg)
    try:
        assert ingested.source_keys == SourceKeys(every_event_has_session=True, some_event_has_order=False)
        clean = ingested.clean.localCheckpoint()
        # Order ids on a third of the purchase lines (one per user and day), so that orders and sessions differ.
        with_orders = clean.withColumn("order_id", F.when(
            (F.col("event_type") == "purchase") & (F.abs(F.hash("user_id")) % 3 == 0),
            F.concat_ws("-", "user_id", F.to_date("event_time").cast("string"))))
        cfg = FeaturesConfig()
        for events, keys in ((clean, ingested.source_keys), (with_orders, SourceKeys(True, True))):
            general = {r.user_id: r.asDict() for r in user_features(events, as_of, cfg).collect()}
            by_id = {r.user_id: r.asDict() for r in user_features(events, as_of, cfg, keys=keys).collect()}
            assert set(by_id) == set(general) and len(general) > 100
            for user, row in general.items():
                for column, value in row.items():
                    mine = by_id[user][column]
                    assert mine == value or (isinstance(value, float) and math.isclose(mine, value, rel_tol=1e-9)), (
                        user, column, mine, value)
            assert any(r["frequency"] > 1 for r in general.values())
    finally:
        ingested.unpersist()


def test_a_missing_session_id_keeps_the_gap_numbering(spark):
    """One event without a session id among events with them: its session is numbered over all the
    user's events, so the source-id path does not apply, and ingest's counts say so."""
    from segspark import ingest
    from segspark.config import load_config

    times = ("2026-10-01 10:00:00", "2026-10-01 10:20:00", "2026-10-01 10:40:00")
    raw = spark.createDataFrame(
        [("m", t, "view", 1, "c", 1.0, session, None) for t, session in zip(times, ("s1", None, "s2"), strict=True)],
        "user_id string, event_time string, event_type string, product_id long, category_code string, price double, "
        "user_session string, _corrupt_record string")  # the columns read_raw_events gives
    input_cfg = load_config(make_features_config(), ["input.path=unused"]).input
    ingested = ingest.ingest_records(raw, input_cfg)
    try:
        assert ingested.clean_rows == 3 and ingested.clean_without_session == 1
        assert not ingested.source_keys.every_event_has_session
    finally:
        ingested.unpersist()
    rows = [ev("m", t, session=session) for t, session in zip(times, ("s1", None, "s2"), strict=True)]
    assert features_of(spark.createDataFrame(rows, EVENTS))["m"].sessions == 3

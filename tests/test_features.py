"""Features: definitions on hand-made events, point-in-time correctness."""

import datetime as dt

import pytest
from pyspark.sql import Row

from segspark.config import FeaturesConfig
from segspark.features import user_features
from segspark.schema import EVENTS

AS_OF = dt.date(2026, 10, 10)


def ev(user, when, kind="view", price=None, qty=1.0, session=None, order=None):
    return Row(
        user_id=user,
        event_time=dt.datetime.fromisoformat(when),
        event_type=kind,
        item_id="i",
        category="c",
        price=price,
        quantity=qty,
        session_id=session,
        order_id=order,
        country=None,
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
    from segspark.features.catalog import CATALOG

    columns = user_features(events, AS_OF, FeaturesConfig()).columns
    assert columns == ["user_id", "as_of", *[f.name for f in CATALOG]]
    assert all(f.definition and f.unit and f.source for f in CATALOG)

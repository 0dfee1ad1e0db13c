"""conf/clickstream.yaml runs unchanged on a log in the REES46 layout (tests/data/rees46).

Expected figures are computed independently with pandas from the same CSV file."""

import pandas as pd
import pytest

from segspark import usecases
from segspark.config import load_config

from .conftest import REPO
from .test_pipeline import rows_of

DATA = REPO / "tests" / "data" / "rees46"


@pytest.fixture(scope="module")
def expected():
    raw = pd.read_csv(DATA / "events.csv", dtype=str, keep_default_na=False)
    when = pd.to_datetime(raw.event_time.str.removesuffix(" UTC"), format="%Y-%m-%d %H:%M:%S", errors="coerce")
    valid = raw[when.notna() & raw.event_type.isin(["view", "cart", "remove_from_cart", "purchase"])]
    clean = valid[~valid.duplicated()].assign(price=lambda d: d.price.astype(float))
    return raw, clean


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("clickstream")
    cfg = load_config(REPO / "conf" / "clickstream.yaml", [f"input.path={DATA / 'events.csv'}", f"output.root={out}"])
    return cfg, usecases.features(spark, cfg, run_id="rees46")


def test_records_are_counted_and_quarantined_with_reasons(run, expected):
    raw, clean = expected
    _, result = run
    assert result.input_rows == len(raw) == result.clean_rows + result.quarantined_rows
    assert result.clean_rows == len(clean)
    assert result.reasons == {"duplicate": 2, "unparseable_timestamp": 1, "unknown_event_type": 1}
    assert str(result.as_of) == "2019-10-31"


def test_features_match_pandas(run, expected):
    _, clean = expected
    cfg, result = run
    features = {r["user_id"]: r for r in rows_of(cfg, "user_features") if r["run_id"] == "rees46"}
    assert result.users == len(features) == clean.user_id.nunique()
    per_user = clean.groupby("user_id")
    purchases = clean[clean.event_type == "purchase"]
    revenue = purchases.groupby("user_id").price.sum()
    orders = purchases.groupby("user_id").user_session.nunique()
    for user_id, group in per_user:
        row = features[user_id]
        assert row["events"] == len(group)
        assert row["sessions"] == group.user_session.nunique()  # the source's sessions, as given
        assert row["monetary"] == pytest.approx(round(revenue.get(user_id, 0.0), 2))
        assert row["frequency"] == orders.get(user_id, 0)
        levels = group.category_code[group.category_code != ""].str.split(".").str[0]
        assert row["distinct_categories"] == levels.nunique()

"""conf/online_retail.yaml on a committed excerpt of the real data, checked against figures that
pandas computes independently from the same files."""

import pandas as pd
import pytest
from deltalake import DeltaTable

from segspark import usecases

from .conftest import FAST_MODELS, REPO

EXCERPT = REPO / "tests/data/online_retail/by-day"
ONLY_KMEANS = ("models.kmeans.k=3", "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false",
               "models.autoencoder.enabled=false")


@pytest.fixture(scope="module")
def expected():
    df = pd.concat(
        [pd.read_csv(p, dtype={"CustomerID": str, "InvoiceNo": str, "StockCode": str}) for p in sorted(EXCERPT.glob("*.csv"))],
        ignore_index=True,
    )
    has_customer = df.CustomerID.notna()
    zero_price = has_customer & (df.UnitPrice == 0)
    valid = df[has_customer & (df.UnitPrice > 0)]
    duplicate = valid.duplicated(keep="first")
    clean = valid[~duplicate]
    return {
        "input": len(df),
        "missing_user_id": int((~has_customer).sum()),
        "zero_price": int(zero_price.sum()),
        "duplicate": int(duplicate.sum()),
        "clean": len(clean),
        "customers": clean.CustomerID.str.replace(r"\.0$", "", regex=True).nunique(),
        "net_revenue": float((clean.Quantity * clean.UnitPrice).sum()),
        "return_lines": int((clean.Quantity < 0).sum()),
        "invoices": clean[clean.Quantity > 0].InvoiceNo.nunique(),
    }


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    from segspark.config import load_config

    out = tmp_path_factory.mktemp("online-retail")
    # What is checked here is ingest and features; one cheap model (k fixed) still takes the config
    # through training end to end.
    cfg = load_config(REPO / "conf/online_retail.yaml", [f"input.path={EXCERPT}", f"output.root={out}", *FAST_MODELS,
                                                         *ONLY_KMEANS])
    result = usecases.run(spark, cfg, run_id="or")
    assert result.status == "succeeded" and {s["model"] for s in result.segments} == {"kmeans"}
    return cfg, result


def test_record_counts_match_pandas(run, expected):
    cfg, result = run
    assert result.input_rows == expected["input"]
    assert result.clean_rows == expected["clean"]
    assert result.quarantined_rows == result.input_rows - result.clean_rows
    assert result.reasons.get("missing_user_id", 0) == expected["missing_user_id"] > 0
    assert result.reasons.get("zero_price", 0) == expected["zero_price"]
    assert result.reasons.get("duplicate", 0) == expected["duplicate"]
    assert sum(result.reasons.values()) == result.quarantined_rows


def test_customers_revenue_and_returns_match_pandas(run, expected):
    cfg, result = run
    features = DeltaTable(f"{cfg.output.root}/user_features").to_pandas()
    assert result.users == len(features) == expected["customers"]
    assert not features.user_id.str.endswith(".0").any()  # "17850.0" became "17850"
    # monetary is rounded to cents per customer
    assert features.monetary.sum() == pytest.approx(expected["net_revenue"], abs=0.01 * len(features))
    assert features.returns.sum() == expected["return_lines"] > 0
    assert features.frequency.sum() == expected["invoices"]

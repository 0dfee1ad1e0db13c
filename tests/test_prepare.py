"""Feature preparation: imputation rules, signed log1p, caps, scaling, selection, persistence, scoring."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from segspark.config import CapConfig, FamiliesConfig, PrepareConfig, SelectionConfig
from segspark.errors import ConfigError, UsageError
from segspark.features.catalog import feature_columns
from segspark.models.prepare import (
    FILE_NAME,
    PREPARED_VECTOR,
    FittedPreparation,
    Imputation,
    check_config,
    fit_preparation,
    signed_log1p,
)

N = 300
NAMES = ["recency", "tenure", "money", "count", "rate", "price", "spend", "fixed", "twin", "mostly_zero", "empty"]
SCHEMA = "user_id string, " + ", ".join(f"{n} {'bigint' if n == 'count' else 'double'}" for n in NAMES)


def _data(seed: int = 0) -> dict[str, list]:
    """Columns as lists (None = null) with known statistics; rows are users."""
    rng = np.random.default_rng(seed)
    tenure = rng.uniform(10, 400, N)
    money = rng.normal(100, 300, N)  # about a third negative: net revenue after returns
    cols = {
        "user_id": [f"u{i}" for i in range(N)],
        "recency": [None if i % 3 == 0 else float(tenure[i] * rng.uniform(0, 1)) for i in range(N)],
        "tenure": [None if i % 50 == 7 and i % 3 == 0 else float(t) for i, t in enumerate(tenure)],
        "money": [float(m) for m in money],
        "count": [int(c) for c in rng.negative_binomial(1, 0.05, N)],  # heavy tail
        "rate": [None if i % 4 == 0 else float(rng.uniform(0, 1)) for i in range(N)],
        "price": [None if i % 5 == 0 else float(rng.lognormal(3, 1)) for i in range(N)],
        "spend": [None if i % 6 == 0 else float(rng.uniform(0, 50)) for i in range(N)],
        "fixed": [None if i % 7 == 0 else float(rng.uniform(0, 1)) for i in range(N)],
        "twin": [float(2 * m + rng.normal(0, 30)) for m in money],  # |r| with money about 0.99
        "mostly_zero": [1.0 if i == 0 else 0.0 for i in range(N)],  # 99.7% zero
        "empty": [None] * N,  # null for every user
    }
    return cols


def _frame(spark, cols: dict[str, list]):
    rows = list(zip(*[cols[c] for c in ["user_id", *NAMES]], strict=True))
    return spark.createDataFrame(rows, SCHEMA)


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def train(spark, data):
    return _frame(spark, data).cache()


def _cfg(**kw) -> PrepareConfig:
    """No caps, no log1p, standard scaling, no family weights, selection that drops nothing unless
    asked: one step at a time.

    (A constant feature is dropped even at share 1.0: `empty`, constant once imputed, is kept.)"""
    base = {
        "impute": {"default": "zero"},
        "cap": CapConfig(lower=0.0, upper=1.0),
        "selection": SelectionConfig(near_constant_share=1.0, max_abs_correlation=1.0, keep=["empty"]),
        "scaling": "standard",
        "families": FamiliesConfig(enabled=False),
    }
    return PrepareConfig(**{**base, **kw})


def _unscaled(fitted: FittedPreparation, df) -> dict[str, np.ndarray]:
    """Prepared values before scaling (scaling inverted with the fitted constants), ordered by user."""
    rows = fitted.transform(df).orderBy(F.expr("int(substr(user_id, 2))")).collect()
    return {
        name: np.array([r[name] for r in rows]) * fitted.scale[name] + fitted.centre[name]
        for name in fitted.selected
    }


def _arr(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@pytest.fixture(scope="module")
def basic(train):
    """Every imputation rule, standard scaling, nothing else: shared by several tests (fits are slow)."""
    impute = {
        "default": "zero",
        "recency": "feature:tenure",
        "rate": "mean",
        "price": "median",
        "spend": "max",
        "fixed": 7.5,
        "empty": "mean",  # null for every user: no statistic to fit
    }
    return fit_preparation(train, NAMES, _cfg(impute=impute))


@pytest.fixture(scope="module")
def selection(train):
    """Default selection thresholds (near-constant share 0.99, |r| 0.95); `empty` kept."""
    return fit_preparation(train, NAMES, _cfg(selection=SelectionConfig(keep=["empty"])))


# --- imputation ---------------------------------------------------------------------------------


def test_each_imputation_rule(train, data, basic):
    fitted = basic
    out = _unscaled(fitted, train)

    rate, price, spend, fixed = (_arr(data[n]) for n in ("rate", "price", "spend", "fixed"))
    assert fitted.impute["rate"].value == pytest.approx(np.nanmean(rate))
    assert fitted.impute["spend"].value == pytest.approx(np.nanmax(spend))
    ordered = np.sort(price[~np.isnan(price)])
    middle = len(ordered) // 2
    assert ordered[middle - 1] <= fitted.impute["price"].value <= ordered[middle]  # approximate median
    assert fitted.impute["fixed"] == Imputation("value", 7.5)
    for name, column in {"rate": rate, "price": price, "spend": spend, "fixed": fixed}.items():
        expected = np.where(np.isnan(column), fitted.impute[name].value, column)
        np.testing.assert_allclose(out[name], expected, rtol=1e-9, atol=1e-9)

    # feature:tenure: the same user's tenure, and the tenure median where that is null too.
    recency, tenure = _arr(data["recency"]), _arr(data["tenure"])
    assert (np.isnan(recency) & np.isnan(tenure)).any() and (np.isnan(recency) & ~np.isnan(tenure)).any()
    spec = fitted.impute["recency"]
    assert (spec.rule, spec.source) == ("feature", "tenure")
    assert spec.value == pytest.approx(np.nanmedian(tenure), rel=0.02)
    expected = np.where(np.isnan(recency), np.where(np.isnan(tenure), spec.value, tenure), recency)
    np.testing.assert_allclose(out["recency"], expected, rtol=1e-9, atol=1e-9)

    # zero by default; the mean of a feature without values falls back to 0.
    np.testing.assert_array_equal(out["tenure"][np.isnan(tenure)], 0.0)
    assert fitted.impute["empty"] == Imputation("mean", 0.0)
    np.testing.assert_array_equal(out["empty"], np.zeros(N))


# --- log1p, caps, scaling -----------------------------------------------------------------------


def test_signed_log1p_and_caps(spark, train, data):
    rows = spark.createDataFrame([(-9.0,), (0.0,), (9.0,)], ["x"]).select(signed_log1p(F.col("x")).alias("y"))
    assert [r.y for r in rows.collect()] == pytest.approx([-math.log(10), 0.0, math.log(10)])

    fitted = fit_preparation(train, NAMES, _cfg(log1p=["money", "count"], cap=CapConfig(lower=0.05, upper=0.95)))
    out = _unscaled(fitted, train)
    money = _arr(data["money"])
    assert (money < 0).sum() > 50
    logged = np.sign(money) * np.log1p(np.abs(money))  # capped after log1p
    ordered = np.sort(logged)
    lower, upper = fitted.caps["money"]
    # approxQuantile returns a sample value within 0.1% of the rank: about the exact one at this size.
    assert ordered[int(0.05 * N) - 1] <= lower <= ordered[int(0.05 * N) + 1]
    assert ordered[int(0.95 * N) - 2] <= upper <= ordered[int(0.95 * N)]
    assert out["money"].min() == pytest.approx(lower) and out["money"].max() == pytest.approx(upper)
    np.testing.assert_allclose(out["money"], np.clip(logged, lower, upper), rtol=1e-9, atol=1e-9)
    count_caps = fitted.caps["count"]
    expected = np.clip(np.log1p(_arr(data["count"])), *count_caps)
    np.testing.assert_allclose(out["count"], expected, rtol=1e-9, atol=1e-9)


def test_quantiles_zero_and_one_do_not_cap(basic):
    assert basic.caps["money"] == [None, None]


@pytest.mark.parametrize("scaling", ["standard", "minmax"])
def test_scaling_matches_numpy(train, data, basic, scaling):
    fitted = basic if scaling == "standard" else fit_preparation(train, NAMES, _cfg(scaling="minmax"))
    rows = fitted.transform(train).orderBy(F.expr("int(substr(user_id, 2))")).collect()
    for name in ("money", "tenure", "count"):
        x = np.nan_to_num(_arr(data[name]))  # imputed with zero
        centre, scale = (x.mean(), x.std()) if scaling == "standard" else (x.min(), x.max() - x.min())
        np.testing.assert_allclose([r[name] for r in rows], (x - centre) / scale, rtol=1e-7, atol=1e-9)
    # The vector holds the selected features in order.
    assert list(rows[5][PREPARED_VECTOR]) == pytest.approx([rows[5][n] for n in fitted.selected])


def _mid_ranks(x: np.ndarray) -> np.ndarray:
    """Empirical CDF with ties at their middle rank, in [0, 1] (what the rank map approximates)."""
    from scipy.stats import rankdata

    return (rankdata(x, method="average") - 1) / (len(x) - 1)


def test_quantile_scaling_is_the_rank_map_standardised(train, data):
    knots = 101
    fitted = fit_preparation(train, NAMES, _cfg(scaling="quantile", quantile_knots=knots))
    rows = fitted.transform(train).orderBy(F.expr("int(substr(user_id, 2))")).collect()
    for name in ("money", "count", "price"):
        raw = np.nan_to_num(_arr(data[name]))  # imputed with zero
        prepared = np.array([r[name] for r in rows])
        # Standardised on the training users ...
        assert prepared.mean() == pytest.approx(0.0, abs=1e-9)
        assert prepared.std() == pytest.approx(1.0, rel=1e-6)
        # ... of a monotone map: equal values stay equal (ties: `count`, the zeros of `price`) and order is kept.
        order = np.argsort(raw, kind="stable")
        assert np.all(np.diff(prepared[order]) >= -1e-12)
        for value in np.unique(raw):
            assert np.ptp(prepared[raw == value]) < 1e-12
        # ... and that map is the mid-rank CDF, within one knot's spacing.
        ranks = prepared * fitted.scale[name] + fitted.centre[name]
        assert np.abs(ranks - _mid_ranks(raw)).max() <= 1.0 / (knots - 1) + 0.01
    # Heavy tails no longer stretch the scale: the extreme users sit within a few units.
    assert np.abs([r["count"] for r in rows]).max() < 2.5


def test_families_give_correlated_features_the_weight_of_one(train, data):
    cfg = _cfg(families=FamiliesConfig(enabled=True, min_abs_correlation=0.5))
    fitted = fit_preparation(train, NAMES, cfg)
    family = next(f for f in fitted.families if "money" in f)
    assert family == ["money", "twin"]  # |r| about 0.99; nothing else correlates with money
    assert fitted.weights == {"money": pytest.approx(2 ** -0.5), "twin": pytest.approx(2 ** -0.5)}
    assert ["money", "twin"] in fitted.metrics()["families"]
    assert sorted(n for f in fitted.families for n in f) == sorted(fitted.selected)  # each feature once

    plain = fit_preparation(train, NAMES, _cfg())
    weighted, unweighted = (p.transform(train).orderBy("user_id").collect() for p in (fitted, plain))
    for a, b in zip(weighted, unweighted, strict=True):
        assert a["money"] == pytest.approx(b["money"] * 2 ** -0.5)
        assert a["tenure"] == pytest.approx(b["tenure"])  # a family of one keeps weight 1


def test_a_version_1_preparation_still_loads(train, tmp_path):
    """Bundles saved before quantile scaling and family weights hold no knots or weights."""
    fitted = fit_preparation(train, NAMES, _cfg())
    old = {k: v for k, v in fitted.to_dict().items() if k not in ("knots", "weights", "families")}
    loaded = FittedPreparation.from_dict({**old, "version": 1})
    assert loaded.transform(train).collect() == fitted.transform(train).collect()


# --- selection ----------------------------------------------------------------------------------


def test_near_constant_and_correlated_features_are_dropped_with_reasons(train, selection, caplog):
    dropped = {d["feature"]: d for d in selection.dropped}
    assert set(dropped) == {"mostly_zero", "twin"}  # `empty` is in keep
    assert dropped["mostly_zero"] == {
        "feature": "mostly_zero",
        "reason": "near_constant",
        "detail": "99.7% of users have 0.0",
    }
    # The later of the correlated pair goes.
    assert dropped["twin"]["reason"] == "correlated"
    assert re.fullmatch(r"\|r\|=0\.9\d\d with money", dropped["twin"]["detail"])
    assert "money" in selection.selected and "empty" in selection.selected
    assert not {"mostly_zero", "twin"} & set(selection.transform(train).columns)
    assert selection.metrics()["dropped"] == selection.dropped
    assert selection.metrics()["selected"] == selection.selected

    # keep protects the later feature: the earlier one of the pair goes instead. Drops are logged.
    cfg = _cfg(selection=SelectionConfig(keep=["twin"]))
    with caplog.at_level("INFO", logger="segspark.models.prepare"):
        fitted = fit_preparation(train, NAMES, cfg)
    reasons = {d["feature"]: (d["reason"], d["detail"]) for d in fitted.dropped}
    assert set(reasons) == {"money", "mostly_zero", "empty"}
    assert reasons["money"][0] == "correlated" and reasons["money"][1].endswith("with twin")
    assert reasons["empty"] == ("near_constant", "100.0% of users have 0.0")
    assert "twin" in fitted.selected
    assert any("dropped money (correlated: |r|=0.9" in r.getMessage() for r in caplog.records)


# --- outputs, persistence, scoring ----------------------------------------------------------------


def test_no_nan_or_inf_with_all_null_and_constant_columns(train):
    cfg = _cfg(
        log1p=list(NAMES),
        cap=CapConfig(lower=0.01, upper=0.99),
        selection=SelectionConfig(keep=["empty", "mostly_zero"]),
    )
    fitted = fit_preparation(train, NAMES, cfg)
    assert {"empty", "mostly_zero"} <= set(fitted.selected)
    assert fitted.scale["empty"] == 1.0 and fitted.scale["mostly_zero"] == 1.0  # capped at 0.99: constant
    out = fitted.transform(train).select(vector_to_array(PREPARED_VECTOR).alias("v"), *fitted.selected)
    rows = out.collect()
    values = np.array([r.v for r in rows])
    assert values.shape == (N, len(fitted.selected)) and np.isfinite(values).all()
    assert all(r.empty == 0.0 and r.mostly_zero == 0.0 for r in rows)


def test_save_load_round_trip_gives_identical_output(train, tmp_path):
    cfg = _cfg(
        log1p=["money", "count"],
        impute={"default": "median", "recency": "feature:tenure"},
        cap=CapConfig(lower=0.01, upper=0.99),
        scaling="quantile",
        families=FamiliesConfig(enabled=True),
    )
    fitted = fit_preparation(train, NAMES, cfg)
    assert fitted.knots and fitted.weights  # the constants the round trip must keep
    written = fitted.save(str(tmp_path / "run" / "prepare"))
    assert written == str(tmp_path / "run" / "prepare" / FILE_NAME)
    loaded = FittedPreparation.load(str(tmp_path / "run" / "prepare"))
    assert loaded == fitted
    assert FittedPreparation.load(f"file://{tmp_path}/run/prepare/{FILE_NAME}") == fitted
    assert fitted.transform(train).collect() == loaded.transform(train).collect()

    fitted.save(f"file:{tmp_path}/uri")
    assert FittedPreparation.load(str(tmp_path / "uri")) == fitted
    with pytest.raises(UsageError, match="needs a SparkSession"):
        fitted.save("s3://bucket/models")


def test_scoring_other_users_uses_the_fitted_constants(spark, data, basic):
    fitted = basic
    # Other users: tenure shifted by +100 days, rate always null.
    other = dict(data)
    other["user_id"] = [f"s{i}" for i in range(N)]
    other["tenure"] = [None if t is None else t + 100 for t in data["tenure"]]
    other["rate"] = [None] * N
    scored = fitted.transform(_frame(spark, other))
    assert scored.count() == N and set(scored.columns) == {"user_id", *fitted.selected, PREPARED_VECTOR}
    stats = scored.agg(
        F.mean("tenure").alias("tenure"), F.mean("rate").alias("rate"), F.stddev_pop("rate").alias("rate_sd")
    ).first()
    # Not refitted: scaled with the training mean and std, so the shifted users' mean is not 0.
    train_tenure, other_tenure = (np.nan_to_num(_arr(d["tenure"])) for d in (data, other))
    assert fitted.centre["tenure"] == pytest.approx(train_tenure.mean())
    assert fitted.scale["tenure"] == pytest.approx(train_tenure.std())
    expected = ((other_tenure - train_tenure.mean()) / train_tenure.std()).mean()
    assert expected > 0.8 and stats.tenure == pytest.approx(expected)
    # Every rate is imputed with the training mean, which is the centre: 0 after scaling.
    assert stats.rate == pytest.approx(0.0, abs=1e-9) and stats.rate_sd == pytest.approx(0.0, abs=1e-9)


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (PrepareConfig(features=["money", "nope"]), r"prepare.features names unknown features \['nope'\]"),
        (PrepareConfig(log1p=["nope"]), r"prepare.log1p names unknown features \['nope'\]; known: recency, tenure"),
        (PrepareConfig(impute={"default": "zero", "nope": "mean"}), r"prepare.impute names unknown features"),
        (PrepareConfig(selection=SelectionConfig(keep=["nope"])), r"prepare.selection.keep names unknown"),
        (PrepareConfig(impute={"money": "feature:nope"}), r"prepare.impute.money: 'feature:nope' names an unknown"),
        (PrepareConfig(impute={"money": "average"}), r"prepare.impute.money: unknown imputation rule 'average'"),
        (PrepareConfig(features=[]), r"prepare.features is empty"),
    ],
)
def test_unknown_names_raise_config_error(train, cfg, message):
    with pytest.raises(ConfigError, match=message):
        fit_preparation(train, NAMES, cfg)


def test_base_config_names_catalog_features(make_config):
    cfg = make_config()
    inputs = check_config(cfg.prepare, feature_columns(cfg.features))
    assert inputs == list(feature_columns(cfg.features))
    assert cfg.prepare.impute["recency_days"] == "feature:tenure_days"


def test_exact_linear_combinations_are_dropped(spark):
    # Four time-of-day shares sum to 1: no pair is highly correlated, but together they make any
    # covariance matrix singular, so the last one goes.
    rng = np.random.default_rng(4)
    parts = rng.dirichlet([2, 2, 2, 2], size=400)
    rows = [(f"u{i}", *map(float, p), float(rng.normal())) for i, p in enumerate(parts)]
    names = ["night", "morning", "afternoon", "evening", "noise"]
    frame = spark.createDataFrame(rows, ["user_id", *names])
    prep = fit_preparation(frame, names, PrepareConfig(impute={}, log1p=[], cap=CapConfig(lower=0.0, upper=1.0)))
    assert prep.selected == ["night", "morning", "afternoon", "noise"]
    (entry,) = prep.dropped
    assert entry["feature"] == "evening" and entry["reason"] == "linear_combination"
    assert entry["detail"].startswith("R=1.0000")


def test_non_finite_inputs_are_refused_naming_the_feature_and_the_users(spark, data):
    # Features written by another tool or an older version: NaN is not null (imputation keeps it)
    # and one infinite value wrecks every user's scaling, so fitting stops.
    from segspark.errors import NonFiniteError

    cols = dict(data)
    cols["money"] = [math.nan if i < 3 else v for i, v in enumerate(data["money"])]
    cols["price"] = [math.inf if i == 5 else v for i, v in enumerate(data["price"])]
    with pytest.raises(NonFiniteError) as error:
        fit_preparation(_frame(spark, cols), NAMES, _cfg())
    message = str(error.value)
    assert message.startswith("prepare: NaN or infinite values in 2 features")
    assert f"'money' (3 of {N} users)" in message and f"'price' (1 of {N} users)" in message

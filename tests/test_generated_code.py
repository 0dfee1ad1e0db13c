"""Every row-path plan compiles to methods the JVM's JIT will compile.

Spark generates one Java method per whole-stage-codegen stage (plus the pieces it splits off). The
JVM's JIT leaves a method of more than 8,000 bytes of bytecode to the interpreter
(-XX:-DontCompileHugeMethods, the default); Spark falls back from codegen only past 64 KB
(spark.sql.codegen.hugeMethodLimit). Between the two a stage runs interpreted bytecode, tens of
times slower and silently: ingest's typing and rules, written as one projection, grew to 8.8 KB
(16 KB for CSV text) and took 118 s for 10M events instead of 5. These tests read the size of every
generated method of the plans that touch each event or each user.
"""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest

from segspark import ingest
from segspark.bundle.store import load_bundle, prepare_with_bundle, score_prepared
from segspark.config import load_config
from segspark.features import user_features
from segspark.ingest.privacy import Protection
from segspark.io.readers import read_raw_events

from .conftest import REPO, TRAINED_RUN_ID

JIT_LIMIT = 8000  # HotSpot's HugeMethodLimit: bytes of bytecode


@contextlib.contextmanager
def _without_aqe(spark):
    # Adaptive execution plans its stages at run time: the plan must be final to show its code.
    before = spark.conf.get("spark.sql.adaptive.enabled")
    spark.conf.set("spark.sql.adaptive.enabled", "false")
    try:
        yield
    finally:
        spark.conf.set("spark.sql.adaptive.enabled", before)


def _largest_methods(df) -> list[tuple[int, str]]:
    """(largest method's bytes, the stage's first line) for each codegen stage of `df`'s plan."""
    with _without_aqe(df.sparkSession):
        stages = df._jdf.queryExecution().debug().codegenToSeq()
    found, it = [], stages.iterator()
    while it.hasNext():
        stage = it.next()
        found.append((int(stage._3().maxMethodCodeSize()), stage._1().strip().splitlines()[0][:160]))
    assert found, "no whole-stage codegen in the plan"
    return found


def _assert_compilable(df, what: str) -> None:
    huge = [(size, stage) for size, stage in _largest_methods(df) if size > JIT_LIMIT]
    assert not huge, f"{what}: generated methods over {JIT_LIMIT} bytes run interpreted: {huge}"


@pytest.mark.parametrize(("config", "path", "key"), [
    ("conf/local.yaml", None, None),  # typed Parquet (the sample)
    ("conf/clickstream.yaml", "tests/data/rees46/events.csv", None),  # CSV text, zone in the timestamp
    ("conf/online_retail.yaml", "tests/data/online_retail/by-day", b"k" * 32),  # quantities, orders, pseudonyms
])
def test_ingest_and_features_compile_to_jit_sized_methods(spark, sample_parquet, config, path, key):
    source = REPO / path if path else sample_parquet / "events"
    cfg = load_config(REPO / config, [f"input.path={source}"])
    tagged = ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input, Protection(key))
    _assert_compilable(tagged, f"tag_events ({config})")
    _assert_compilable(ingest.quarantine_rows(tagged, "r", str(source)), f"quarantine rows ({config})")
    features = user_features(ingest.clean_events(tagged), dt.date(2030, 1, 1), cfg.features)
    _assert_compilable(features, f"user_features ({config})")


def test_bundle_preparation_and_scoring_compile_to_jit_sized_methods(spark, trained_run):
    features = spark.read.parquet(*[str(p) for p in (trained_run.root / "user_features").rglob("*.parquet")])
    loaded = load_bundle(str(trained_run.root / "_models" / TRAINED_RUN_ID))
    prepared = prepare_with_bundle(loaded, features.drop("as_of", "run_id"))
    _assert_compilable(prepared, "the bundle's preparation")
    for name, assignments in score_prepared(loaded, prepared).assignments.items():
        _assert_compilable(assignments, f"scoring {name}")

"""spark.shuffle_partitions `auto`: a batch run's shuffle partitions follow the size of its input, for
the run's duration only, unless a number (or the session's launcher) pins them."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from deltalake import DeltaTable

from segspark.config import load_config
from segspark.io.readers import read_raw_events
from segspark.runtime.session import set_at_launch
from segspark.runtime.shuffle_sizing import (
    ADAPTIVE,
    MIB,
    SETTING,
    input_bytes,
    settings_for,
    shuffle_partitions_for,
    sized_for_block,
    sizing_is_on,
)
from segspark.usecases.context import RunContext, RunResult

from .conftest import REPO, TRAINED_RUN_ID


def test_partitions_follow_the_input_size():
    assert shuffle_partitions_for(0, "parquet", slots=2) == 1
    assert shuffle_partitions_for(32 * MIB, "parquet", slots=16) == 1  # small: one task, whatever the cores
    assert shuffle_partitions_for(32 * MIB + 1, "parquet", slots=16) == 16  # larger: every core busy
    assert shuffle_partitions_for(243_000_000, "parquet", slots=2) == 8  # 10M generated events
    assert shuffle_partitions_for(1_523_343_887, "csv", slots=2) == 8  # the same events as CSV
    assert shuffle_partitions_for(150 * MIB, "json", slots=2) == 1


def test_input_bytes_estimate_the_size_of_the_input_files(spark, sample_parquet):
    files = sum(f.stat().st_size for f in (sample_parquet / "events").iterdir() if f.suffix == ".parquet")
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={sample_parquet}/events"])
    # Spark's estimate: the files' bytes, scaled by the columns the reader adds (_corrupt_record)
    assert files <= input_bytes(read_raw_events(spark, cfg.input)) <= 1.5 * files


def _context(spark, *overrides: str) -> RunContext:
    cfg = load_config(REPO / "conf/local.yaml", list(overrides))
    return RunContext(spark, cfg, RunResult(run_id="sizing", as_of=None), started_at=dt.datetime.now(dt.UTC))


@pytest.mark.parametrize("pin", [None, "spark.shuffle_partitions=3", "spark.conf.spark.sql.shuffle.partitions=3"])
def test_a_run_sizes_its_shuffles_unless_pinned_and_gives_the_session_its_setting_back(spark, sample_parquet, pin):
    session_value = spark.conf.get(SETTING)
    assert not set_at_launch(spark, SETTING)  # the tests' session is built by segspark, not launched
    ctx = _context(spark, f"input.path={sample_parquet}/events", *([pin] if pin else []))
    records = read_raw_events(spark, ctx.cfg.input)
    assert ctx.size_shuffles(records) is records
    if pin is None:
        # A few hundred kB of events: one partition, and no adaptive execution for it to re-plan.
        assert (spark.conf.get(SETTING), spark.conf.get(ADAPTIVE)) == ("1", "false")
        assert ctx.result.metrics["shuffle_partitions"] == {"partitions": 1, "input_bytes": input_bytes(records),
                                                            "adaptive": False}
    else:
        assert spark.conf.get(SETTING) == session_value and "shuffle_partitions" not in ctx.result.metrics
        assert spark.conf.get(ADAPTIVE) == "true"
    ctx.restore_session()
    assert (spark.conf.get(SETTING), spark.conf.get(ADAPTIVE)) == (session_value, "true")


def test_only_a_single_partition_turns_adaptive_execution_off():
    assert settings_for(1) == {SETTING: "1", ADAPTIVE: "false"}
    assert settings_for(8) == {SETTING: "8"}  # adaptive execution as the session has it


def test_the_run_records_its_shuffle_partitions(trained_run, spark):
    runs = DeltaTable(str(trained_run.root / "runs")).to_pyarrow_table().to_pylist()
    (run,) = [r for r in runs if r["run_id"] == TRAINED_RUN_ID]
    sized = json.loads(run["metrics"])["shuffle_partitions"]
    assert (sized["partitions"], sized["adaptive"]) == (1, False) and sized["input_bytes"] > 0
    # the shared session's own settings, restored after the run
    assert (spark.conf.get(SETTING), spark.conf.get(ADAPTIVE)) == ("4", "true")


def test_a_block_sizes_every_session_given_and_gives_each_its_setting_back(spark, sample_parquet):
    """What a stream does per micro-batch: its frame belongs to the query's copy of the session, the
    tables' frames to the caller's; both are sized for the batch, then set back, also on failure."""
    other = spark.newSession()  # like the query's copy: its own SQL settings
    other.conf.set(SETTING, "7")
    session_value = spark.conf.get(SETTING)
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={sample_parquet}/events"])
    records = read_raw_events(other, cfg.input)
    with sized_for_block(records, "parquet", spark, other) as partitions:
        assert partitions == 1 and spark.conf.get(SETTING) == other.conf.get(SETTING) == "1"
        assert spark.conf.get(ADAPTIVE) == other.conf.get(ADAPTIVE) == "false"
    assert (spark.conf.get(SETTING), other.conf.get(SETTING)) == (session_value, "7")
    assert spark.conf.get(ADAPTIVE) == other.conf.get(ADAPTIVE) == "true"
    with pytest.raises(RuntimeError, match="batch failed"), sized_for_block(records, "parquet", spark, other):
        raise RuntimeError("batch failed")
    assert (spark.conf.get(SETTING), other.conf.get(SETTING)) == (session_value, "7")


@pytest.mark.parametrize(("overrides", "on"), [([], True), (["spark.shuffle_partitions=3"], False),
                                               (["spark.conf.spark.sql.shuffle.partitions=3"], False)])
def test_sizing_is_on_only_with_auto_and_nothing_pinned(spark, overrides, on):
    assert sizing_is_on(spark, load_config(REPO / "conf/local.yaml", overrides).spark) is on

"""spark.jit: the C1 compiler alone for the driver JVM segspark launches for a small batch input."""

import pytest

from segspark.config import load_config
from segspark.runtime.jit import MIB, QUICK, driver_jit_conf, local_input_bytes, quick_jit_conf

from .conftest import REPO

OPTIONS = "spark.driver.extraJavaOptions"


def config(*overrides: str):
    return load_config(REPO / "conf/local.yaml", list(overrides))


@pytest.fixture
def events(tmp_path):
    """A folder of two data files, 3 MiB in all, beside Spark's marker files."""
    folder = tmp_path / "events"
    (folder / "day=1").mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"x" * (2 * MIB))
    (folder / "day=1" / "part-1.parquet").write_bytes(b"x" * MIB)
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def test_a_small_local_input_gets_c1_alone_with_the_configs_own_options_kept(events):
    assert local_input_bytes(config(f"input.path={events}").input) == 3 * MIB
    assert 1 * MIB < local_input_bytes(config(f"input.path={events}").input, stop_above=MIB) <= 3 * MIB
    assert quick_jit_conf(*parts(f"input.path={events}")) == {OPTIONS: QUICK}
    own = parts(f"input.path={events}", 'spark.conf={"spark.driver.extraJavaOptions": "-Dmine=1"}')
    assert quick_jit_conf(*own) == {OPTIONS: f"-Dmine=1 {QUICK}"}
    assert quick_jit_conf(*parts(f"input.path={events}/*")) == {OPTIONS: QUICK}  # a glob
    assert quick_jit_conf(*parts(f"input.path=file://{events}")) == {OPTIONS: QUICK}


def test_a_larger_input_an_unknown_one_or_the_users_choice_keeps_the_default(events, tmp_path):
    (events / "part-2.parquet").write_bytes(b"x" * (14 * MIB))  # 17 MiB of Parquet: over 16
    assert quick_jit_conf(*parts(f"input.path={events}")) == {}
    assert quick_jit_conf(*parts(f"input.path={events}", "input.format=json")) == {OPTIONS: QUICK}  # text: 96 MiB
    assert quick_jit_conf(*parts(f"input.path={events}", "spark.jit=quick")) == {OPTIONS: QUICK}
    assert quick_jit_conf(*parts(f"input.path={events}/part-0.parquet", "spark.jit=full")) == {}
    assert quick_jit_conf(*parts("input.path=s3://bucket/events")) == {}  # not sized: not local
    assert quick_jit_conf(*parts(f"input.path={tmp_path}/missing")) == {}
    tiered = 'spark.conf={"spark.driver.extraJavaOptions": "-XX:-TieredCompilation"}'
    assert quick_jit_conf(*parts(f"input.path={events}/part-0.parquet", tiered)) == {}


def test_only_a_session_segspark_launches_gets_it(spark, events, monkeypatch):
    small = f"input.path={events}/part-0.parquet"
    assert driver_jit_conf(*parts(small)) == {}  # this process's session is active: it is used as it is
    assert quick_jit_conf(*parts(small)) == {OPTIONS: QUICK}
    assert quick_jit_conf(*parts(small, "spark.master=spark://127.0.0.1:7077")) == {}
    assert quick_jit_conf(*parts(small, "spark.remote=sc://127.0.0.1:15002")) == {}
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")  # launched by spark-submit: its JVM already runs
    assert quick_jit_conf(*parts(small)) == {}


def parts(*overrides: str):
    cfg = config(*overrides)
    return cfg.spark, cfg.input

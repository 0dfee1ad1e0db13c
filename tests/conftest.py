"""Shared fixtures: one local SparkSession for the whole test run."""

from __future__ import annotations

import logging

import pytest

from segspark.session import get_spark


@pytest.fixture(scope="session")
def spark():
    session = get_spark(
        app_name="segspark-tests",
        master="local[2]",
        conf={"spark.sql.shuffle.partitions": "4", "spark.default.parallelism": "4"},
    )
    yield session
    # Stop before exit: a process that loaded delta-rs and left Spark running was seen aborting
    # with code 134, which would hide the real exit status.
    session.stop()


@pytest.fixture(autouse=True)
def _quiet_py4j():
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def make_config(tmp_path):
    """Config from conf/local.yaml with `--set`-style overrides; output under tmp_path."""
    from segspark.config import load_config

    def make(*overrides: str, config: str = "conf/local.yaml"):
        return load_config(REPO / config, [f"output.root={tmp_path / 'out'}", *overrides])

    return make

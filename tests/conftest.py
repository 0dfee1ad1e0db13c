"""Shared fixtures: one local SparkSession for the whole test run."""

from __future__ import annotations

import logging
import os
import time

import pytest

from segspark.runtime.session import get_spark

# The same results on any machine: before any JVM starts, the process runs in UTC (pyspark turns naive
# datetimes into timestamps, and collected timestamps back into datetimes, in the machine's zone) and
# ignores settings of the surrounding shell that would point Spark elsewhere.
os.environ["TZ"] = "UTC"
time.tzset()
for _variable in ("SPARK_REMOTE", "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_HOME", "SPARK_CONF_DIR"):
    os.environ.pop(_variable, None)
# TensorFlow's oneDNN kernels follow the CPU's instruction set (AVX-512 here, AVX2 on other machines of
# this kind): held at AVX2 so that trainings in the tests round the same way on both.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


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

# A short k sweep keeps the end-to-end tests quick on 2 cores (the default sweeps k = 3..8, 3 seeds).
FAST_MODELS = (
    "models.selection.k_min=3",
    "models.selection.k_max=4",
    "models.selection.seeds=1",
    "models.selection.silhouette_sample=200",
    "models.bisecting_kmeans.max_iter=5",  # MLlib's bisecting runs every iteration as a Spark job
    # A small autoencoder trained for a few epochs: the deep path runs end to end in seconds.
    "models.autoencoder.hidden_layers=[32]",
    "models.autoencoder.epochs=30",
    "models.autoencoder.batch_size=32",
    "models.hdbscan.min_cluster_share=0.05",
    "models.hdbscan.min_samples=5",
)


@pytest.fixture
def make_config(tmp_path):
    """Config from conf/local.yaml with `--set`-style overrides; output under tmp_path."""
    from segspark.config import load_config

    def make(*overrides: str, config: str = "conf/local.yaml"):
        return load_config(REPO / config, [f"output.root={tmp_path / 'out'}", *FAST_MODELS, *overrides])

    return make


@pytest.fixture(scope="session")
def sample_parquet(spark, tmp_path_factory):
    """A small generated clickstream (Parquet) shared by the end-to-end tests."""
    from segspark.datagen import GenerateSpec, write_dataset

    out = tmp_path_factory.mktemp("sample-parquet")
    write_dataset(spark, GenerateSpec(users=400, days=30, seed=11), str(out), "parquet")
    return out


@pytest.fixture(scope="session")
def noisy_json(spark, tmp_path_factory):
    """A small generated clickstream as JSON lines with duplicates, missing prices, malformed lines."""
    from segspark.datagen import GenerateSpec, write_dataset

    out = tmp_path_factory.mktemp("noisy-json")
    spec = GenerateSpec(users=300, days=30, seed=5, duplicate_share=0.02, missing_price_share=0.02, malformed_share=0.01)
    write_dataset(spark, spec, str(out), "json")
    return out


def data_lines(folder) -> int:
    """Non-empty lines in the data files of a folder written by Spark (independent of Spark)."""
    import pathlib

    total = 0
    for path in pathlib.Path(folder).rglob("*"):
        if path.is_file() and not path.name.startswith(("_", ".")) and not path.name.endswith(".crc"):
            total += sum(1 for line in path.read_text().splitlines() if line.strip())
    return total

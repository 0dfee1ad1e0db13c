"""`segspark run` end to end on `local-cluster[2,1,1024]` in a subprocess: two executor JVMs, so
nothing may depend on driver-local state. In a file of its own so that the test runner can give it a
worker while the rest of the CLI tests run."""

import os
import subprocess
import sys

import pytest
from deltalake import DeltaTable

from .conftest import FAST_MODELS, REPO


@pytest.mark.slow
def test_end_to_end_on_local_cluster_with_two_executor_jvms(sample_parquet, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "segspark", "run", "--config", str(REPO / "conf/local.yaml"), "--run-id", "lc",
            "--set", "spark.master=local-cluster[2,1,1024]", f"input.path={sample_parquet}/events",
            f"output.root={out}", *FAST_MODELS, "models.kmeans.k=3", "models.bisecting_kmeans.k=3", "models.gmm.k=3",
        ],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "local-cluster[2,1,1024]" in proc.stderr  # the session really ran on the cluster master
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr  # stderr is a pipe: no progress line
    segments = DeltaTable(str(out / "user_segments")).to_pyarrow_table()
    features = DeltaTable(str(out / "user_features")).to_pyarrow_table()
    runs = DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist()
    assert segments.num_rows == 4 * features.num_rows == 4 * runs[0]["users"] > 0  # three baselines + ae_hdbscan
    # The autoencoder and HDBSCAN ran in the executors' Python workers (mapInArrow): every user has both.
    embeddings = DeltaTable(str(out / "user_embeddings")).to_pyarrow_table()
    assert embeddings.num_rows == features.num_rows
    assert set(segments.column("model").to_pylist()) == {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"}
    assert runs[0]["status"] == "succeeded"
    assert runs[0]["input_rows"] == runs[0]["clean_rows"] + runs[0]["quarantined_rows"]

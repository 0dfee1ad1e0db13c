"""The notebook in notebooks/ runs on an existing `spark` (as in Databricks) with the library alone."""

from __future__ import annotations

import runpy

from deltalake import DeltaTable

from .conftest import FAST_MODELS, REPO


def test_notebook_runs_on_the_existing_session(spark, sample_parquet, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    overrides = [
        f"input.path={sample_parquet}/events", f"output.root={out}", *FAST_MODELS, "models.kmeans.k=4",
        "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.autoencoder.enabled=false",
    ]
    monkeypatch.setenv("SEGSPARK_CONFIG", str(REPO / "conf/local.yaml"))
    monkeypatch.setenv("SEGSPARK_OVERRIDES", " ".join(overrides))
    runpy.run_path(str(REPO / "notebooks/segment_customers.py"), init_globals={"spark": spark}, run_name="__main__")
    printed = capsys.readouterr().out
    assert "succeeded" in printed and "report: " in printed
    report = printed.split("report: ", 1)[1].split()[0]
    assert report.endswith(".html") and (tmp_path / report).exists()
    assert not spark.sparkContext._jsc.sc().isStopped()  # the notebook's session is left running
    segments = DeltaTable(str(out / "user_segments")).to_pyarrow_table(columns=["model"])
    assert set(segments.column("model").to_pylist()) == {"kmeans"}

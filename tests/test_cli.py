"""CLI: exit codes and messages, in-process on the shared session (the jobs on a cluster, with an
executor JVM apart from the driver's, are tests/test_standalone_cluster.py)."""

import json
import subprocess
import sys

import pytest
from deltalake import DeltaTable

from segspark.cli import main

from .conftest import FAST_MODELS, REPO


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_prints_summary_and_exits_0(trained_run):
    # `segspark run --run-id r1` of every model, in this process's CLI (conftest.trained_run).
    code, out = trained_run.exit_code, trained_run.stdout
    assert code == 0, out
    assert "run r1 succeeded" in out and "kmeans: k=" in out and "user_segments" in out
    # The summary table: a header, a rule, then one row per model and segment.
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["model", "segment", "users", "share", "name"])
    assert set(lines[header + 1].strip()) <= {"-", " "}
    rows = [line.split() for line in lines[header + 2:] if line.strip()]
    assert {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"} <= {row[0] for row in rows}
    assert any(line.split()[:2] == ["stage", "seconds"] for line in lines)
    assert DeltaTable(str(trained_run.root / "user_segments")).to_pyarrow_table().num_rows > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "models.kmeans.k=lots"], "models.kmeans.k (in --set): expected an integer"),
        (["--set", "models.kmeans.colour=red"], "models.kmeans.colour (in --set): unknown key"),
        (["--set", "input.path=/nonexistent/events"], "no parquet data found"),
        (["--as-of", "31/10/2026"], "is not a date like"),
        (["stray-argument"], "unexpected argument"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_message(spark, capsys, tmp_path, args, message):
    code, out, err = run_cli(
        capsys, "run", "--config", str(REPO / "conf/local.yaml"), "--set", f"output.root={tmp_path}", *args
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_columns_exit_2_listing_missing_and_present(spark, capsys, tmp_path):
    spark.createDataFrame([{"uid": 1, "ts": "2026-01-01 00:00:00"}]).write.parquet(str(tmp_path / "ev"))
    code, _, err = run_cli(
        capsys, "run", "--config", str(REPO / "conf/local.yaml"),
        "--set", f"input.path={tmp_path / 'ev'}", f"output.root={tmp_path / 'out'}",
    )
    assert code == 2
    assert "lacks required columns" in err and "Columns present: ts, uid" in err


def test_invalid_yaml_exits_2_naming_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed\n")
    code, _, err = run_cli(capsys, "run", "--config", str(bad))
    assert code == 2 and "bad.yaml" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def _damage(bundle, how: str) -> None:
    bundle.mkdir()
    manifest = bundle / "manifest.json"
    if how == "garbage":
        manifest.write_text("{not json")
    elif how == "binary":
        manifest.write_bytes(b"\xff\xfe\x00\x81" * 8)
    elif how == "not-a-manifest":
        manifest.write_text('{"format_version": 1}')
    elif how == "a-folder":
        manifest.mkdir()


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "manifest.json is missing"),
        ("garbage", "is not valid JSON"),
        ("binary", "cannot be read"),
        ("not-a-manifest", "manifest"),
        ("a-folder", "cannot be read"),
    ],
)
@pytest.mark.parametrize("command", ["score", "stream"])
def test_unreadable_bundle_exits_2_with_one_message(capsys, tmp_path, how, message, command):
    bundle = tmp_path / "bundle"
    _damage(bundle, how)
    code, _, err = run_cli(capsys, command, "--config", str(REPO / "conf/local.yaml"), "--bundle", str(bundle),
                           "--set", f"output.root={tmp_path / 'out'}")
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def test_catalog_tables_without_the_delta_connector_exit_2(spark, capsys, sample_parquet, tmp_path):
    code, _, err = run_cli(
        capsys, "run", "--config", str(REPO / "conf/local.yaml"),
        "--set", f"input.path={sample_parquet}/events", f"output.root={tmp_path}", "output.catalog=main",
        "output.schema=crm",
    )
    assert code == 2 and "Traceback" not in err
    assert "catalog tables are written by the Delta Spark connector" in err and "output.catalog" in err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_every_command_has_help_with_an_example(capsys):
    from segspark.cli import cli

    for name in ["", *cli.commands]:
        code, out, _ = run_cli(capsys, *([name] if name else []), "--help")
        assert code == 0 and "Usage:" in out, name
        assert "Example" in out, f"segspark {name} --help shows no example"


def test_missing_config_file_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "not found" in err


def test_features_list_prints_the_catalog(capsys):
    code, out, _ = run_cli(capsys, "features", "--list")
    assert code == 0
    assert "recency_days" in out and "net revenue" in out
    code, out, _ = run_cli(capsys, "features", "--list", "--config", str(REPO / "conf/online_retail.yaml"))
    assert code == 0 and "country_top_5" in out  # the config widens the one-hot family


def test_docs_feature_catalog_is_the_generated_one(capsys):
    code, out, _ = run_cli(capsys, "features", "--list", "--markdown")
    assert code == 0
    assert (REPO / "docs" / "features.md").read_text() == out, "regenerate: segspark features --list --markdown"


def test_features_stage_alone_writes_features_but_no_segments(spark, capsys, sample_parquet, tmp_path):
    code, out, err = run_cli(
        capsys, "features", "--config", str(REPO / "conf/local.yaml"), "--run-id", "f-only",
        "--set", f"input.path={sample_parquet}/events", f"output.root={tmp_path}",
    )
    assert code == 0, err
    assert DeltaTable(str(tmp_path / "user_features")).to_pyarrow_table().num_rows > 0
    assert not (tmp_path / "user_segments").exists()
    runs = DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()
    assert runs[0]["status"] == "succeeded"


def test_train_completes_a_features_run_under_its_run_id(spark, capsys, sample_parquet, tmp_path):
    base = ["--config", str(REPO / "conf/local.yaml"), "--set", f"output.root={tmp_path}"]
    only_kmeans = ["models.autoencoder.enabled=false", "models.gmm.enabled=false",
                   "models.bisecting_kmeans.enabled=false", "models.kmeans.k=4"]
    assert run_cli(capsys, "features", *base, f"input.path={sample_parquet}/events", "--run-id", "split")[0] == 0
    features_run = DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()[0]

    code, out, err = run_cli(capsys, "train", *base, *FAST_MODELS, *only_kmeans)  # the latest run by default
    assert code == 0, err
    assert "run split succeeded" in out and "kmeans: k=4" in out
    segments = DeltaTable(str(tmp_path / "user_segments")).to_pandas()
    assert set(segments.run_id) == {"split"} and set(segments.model) == {"kmeans"}
    assert len(segments) == features_run["users"]
    assert (tmp_path / "_models" / "split" / "manifest.json").is_file()
    runs = DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()
    assert len(runs) == 1, "train completes the features run's row, it does not add one"
    run = runs[0]
    assert run["status"] == "succeeded" and run["started_at"] == features_run["started_at"]
    for key in ("as_of", "input_rows", "clean_rows", "quarantined_rows", "users"):
        assert run[key] == features_run[key], key
    assert run["input_rows"] == run["clean_rows"] + run["quarantined_rows"]
    stages = json.loads(run["metrics"])["stage_seconds"]
    assert {"ingest", "features", "prepare", "segments", "bundle"} <= set(stages)
    manifest = json.loads((tmp_path / "_models" / "split" / "manifest.json").read_text())
    assert manifest["training_data"]["first_event"] not in (None, "None")

    # A training that fails keeps the run's features usable: train again and it succeeds.
    deep_only = ["models.kmeans.enabled=false", "models.gmm.enabled=false", "models.bisecting_kmeans.enabled=false",
                 "models.autoencoder.batch_size=100000"]  # fewer users than one batch: fails at once
    code, _, err = run_cli(capsys, "train", *base, *FAST_MODELS, *deep_only, "--run-id", "split")
    assert code == 2 and "fewer than one batch" in err  # too few users for the deep model: stopped before fitting
    assert DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()[0]["status"] == "failed"
    assert run_cli(capsys, "train", *base, *FAST_MODELS, *only_kmeans)[0] == 0
    assert DeltaTable(str(tmp_path / "runs")).to_pyarrow_table().to_pylist()[0]["status"] == "succeeded"

    for args, message in [
        (["--run-id", "nope"], "--run-id 'nope' is not in"),
        (["--run-id", "split", "--as-of", "1999-01-01"], "not --as-of 1999-01-01"),
    ]:
        code, _, err = run_cli(capsys, "train", *base, *only_kmeans, *args)
        assert code == 2 and message in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "train", "--config", str(REPO / "conf/local.yaml"),
                           "--set", f"output.root={tmp_path / 'empty'}")
    assert code == 2 and "run `segspark features --config FILE` first" in err


def test_generate_refuses_malformed_lines_in_parquet(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--out", str(tmp_path), "--users", "10", "--malformed", "0.1")
    assert code == 2 and "--format json" in err


@pytest.mark.parametrize("master", [[], ["--master", "local[2]"]], ids=["on-the-driver", "in-spark"])
def test_generate_writes_events_and_truth(spark, capsys, tmp_path, master):
    code, out, err = run_cli(capsys, "generate", "--out", str(tmp_path), "--users", "50", "--format", "csv", *master)
    assert code == 0, err
    assert "truth" in out and (tmp_path / "truth").is_dir() and (tmp_path / "events").is_dir()
    assert "users: 50" in out


def test_log_format_json_gives_one_object_per_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "segspark", "--log-format", "json", "generate", "--out", str(tmp_path / "g"),
         "--users", "20", "--days", "3"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"time"')]
    assert ours and all(set(entry) >= {"time", "level", "logger", "message"} for entry in ours)
    assert any(entry["logger"].startswith("segspark") and entry["level"] == "INFO" for entry in ours)
    assert not [line for line in proc.stderr.splitlines() if " INFO  segspark" in line]  # no text lines of ours
    # A sample this small is written by the process alone: no Spark session is started for it.
    assert not [entry for entry in ours if "SparkSession" in entry["message"]]


def test_generate_refuses_to_overwrite_events_or_truth_without_overwrite(spark, capsys, tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "mine.json").write_text('{"user_id": 1}\n')  # the user's own data
    code, _, err = run_cli(capsys, "generate", "--out", str(tmp_path), "--users", "20", "--days", "3")
    assert code == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "events" / "mine.json").read_text() == '{"user_id": 1}\n' and not (tmp_path / "truth").exists()
    code, _, err = run_cli(capsys, "generate", "--out", str(tmp_path), "--users", "20", "--days", "3", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "events" / "mine.json").exists() and (tmp_path / "truth").is_dir()
    code, _, err = run_cli(capsys, "generate", "--out", str(tmp_path), "--users", "20", "--days", "3")
    assert code == 2 and "events and" in err and "truth already exist" in err  # a sample is not replaced either

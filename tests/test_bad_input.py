"""Bad input ends in a clear exit 2 or a quarantine row, never in a poisoned model (issue 17):
corrupt files, non-finite features, an input without events, too few users for the models."""

import gzip
import json
import os
from pathlib import Path

import pytest
from deltalake import DeltaTable

from segspark import ingest
from segspark.cli import main
from segspark.errors import NotEnoughUsersError
from segspark.io.readers import CorruptFileError, read_raw_events, read_with_corrupt_files

from .conftest import FAST_MODELS, REPO

CONFIG = str(REPO / "conf/local.yaml")


def event(user, time, kind="view", price=10.0, product=1):
    return {"event_time": time, "event_type": kind, "product_id": product, "category_code": "c.x", "price": price,
            "user_id": user, "user_session": f"s{user}"}


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def runs_row(out):
    return DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist()[0]


# --- corrupt files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_file(spark, tmp_path_factory):
    """One good Parquet file of 30 events written by Spark (its bytes; copies go where a test wants)."""
    folder = tmp_path_factory.mktemp("good-parquet") / "events"
    rows = [event(u, f"2026-10-0{1 + i % 3} 1{i}:00:00", product=i) for u in (1, 2, 3) for i in range(10)]
    spark.createDataFrame(rows).coalesce(1).write.parquet(str(folder))
    (part,) = folder.glob("part-*.parquet")
    return part.read_bytes()


@pytest.fixture
def parquet_with_truncated_file(parquet_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(parquet_file)
    (folder / "b.parquet").write_bytes(parquet_file[: len(parquet_file) // 2])  # cut in the middle
    return folder


def test_truncated_parquet_exits_2_naming_the_file(spark, capsys, parquet_with_truncated_file, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "features", "--config", CONFIG, "--run-id", "cut",
                           "--set", f"input.path={parquet_with_truncated_file}", f"output.root={out}")
    assert code == 2, err
    assert "b.parquet" in err and "cannot be read" in err and "input.on_corrupt_file=skip" in err
    assert "Traceback" not in err and "Py4J" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    assert runs_row(out)["status"] == "failed" and not (out / "user_features").exists()


def test_skipped_files_are_counted_in_runs_and_listed_in_the_report(spark, capsys, parquet_with_truncated_file,
                                                                      tmp_path):
    from segspark.config import load_config
    from segspark.report import write_report

    out = tmp_path / "out"
    overrides = [f"input.path={parquet_with_truncated_file}", f"output.root={out}", "input.on_corrupt_file=skip"]
    code, stdout, err = run_cli(capsys, "features", "--config", CONFIG, "--run-id", "skip", "--set", *overrides)
    assert code == 0, err
    assert "skipped 1 unreadable input files" in stdout and "b.parquet" in stdout
    run = runs_row(out)
    skipped = json.loads(run["metrics"])["skipped_files"]
    assert len(skipped) == 1 and skipped[0].endswith("/b.parquet")
    assert run["input_rows"] == 30 == run["clean_rows"] + run["quarantined_rows"]  # every record of a.parquet
    report = write_report(spark, load_config(CONFIG, overrides), run_id="skip", out=str(tmp_path / "r.html"))
    page = Path(report.path).read_text(encoding="utf-8")
    assert "1 unreadable input file was skipped" in page and skipped[0] in page


def test_truncated_gzip_json_is_named_or_skipped(spark, make_config, tmp_path):
    lines = "".join(json.dumps(event(u, "2026-10-01 10:00:00", product=i)) + "\n" for u in (1, 2) for i in range(5))
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "a.json").write_text(lines)
    packed = gzip.compress(lines.encode() * 200)
    (folder / "b.json.gz").write_bytes(packed[: len(packed) // 2])
    cfg = make_config(f"input.path={folder}", "input.format=json")
    with pytest.raises(CorruptFileError, match=r"b\.json\.gz .*cannot be read") as error:
        read_with_corrupt_files(spark, cfg.input, lambda raw: raw.count())
    assert error.value.path.endswith("b.json.gz")
    skip = make_config(f"input.path={folder}", "input.format=json", "input.on_corrupt_file=skip")
    rows, skipped = read_with_corrupt_files(spark, skip.input, lambda raw: raw.count())
    assert rows == 10 and [os.path.basename(p) for p in skipped] == ["b.json.gz"]


def test_binary_garbage_json_and_invalid_bytes_in_csv_are_quarantined_not_lost(spark, make_config, tmp_path):
    # A text file is read line by line: garbage lines are records that could not be parsed.
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "a.json").write_text("".join(json.dumps(event(1, "2026-10-01 10:00:00", product=i)) + "\n"
                                           for i in range(4)))
    (folder / "b.json").write_bytes(bytes(range(256)) * 3 + b"\n\xff\xfe\x00garbage\n")
    cfg = make_config(f"input.path={folder}", "input.format=json")
    tagged = ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input)
    reasons = [r[ingest.REASON] for r in tagged.collect()]
    assert reasons.count(None) == 4 and set(reasons) == {None, "malformed_record"}
    assert ingest.quarantine_rows(tagged, "r", str(folder)).filter("raw is null").count() == 0

    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "a.csv").write_bytes(b"event_time,event_type,product_id,category_code,price,user_id,user_session\n"
                                b"2026-10-01 10:00:00,view,1,c.x,2.5,7,s1\n"
                                b"2026-10-01 10:\xff\xfe:00,view,2,c.x,2.5,7,s1\n"
                                b"\x00\x81\xc3,view\n")
    cfg = make_config(f"input.path={csv}", "input.format=csv")
    tagged = ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input)
    assert sorted(str(r[ingest.REASON]) for r in tagged.collect()) == ["None", "malformed_record",
                                                                        "unparseable_timestamp"]


# --- non-finite features -------------------------------------------------------------------------


def test_infinite_features_stop_the_feature_stage_naming_them(spark, capsys, tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    records = [event(1, "2026-10-01 10:00:00", "purchase", 1e308, 1), event(1, "2026-10-02 10:00:00", "purchase",
                                                                           1e308, 2),
               event(2, "2026-10-01 11:00:00", "purchase", 20.0, 3), event(3, "2026-10-02 12:00:00")]
    (folder / "e.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    # Prices up to 1e308 are allowed here, so user 1's revenue overflows to infinity.
    code, _, err = run_cli(capsys, "features", "--config", CONFIG, "--set", f"input.path={folder}", "input.format=json",
                           f"output.root={out}", "input.price_bounds=[0, 1e308]")
    assert code == 2, err
    assert "features: NaN or infinite values" in err and "'monetary' (1 of 3 users)" in err
    assert "input.price_bounds" in err
    assert not (out / "user_features").exists()  # poisoned features are never written


# --- no events, too few users --------------------------------------------------------------------


def test_input_with_a_header_and_no_rows_exits_2(spark, capsys, tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    (folder / "e.csv").write_text("event_time,event_type,product_id,category_code,price,user_id,user_session\n")
    code, _, err = run_cli(capsys, "run", "--config", CONFIG, "--set", f"input.path={folder}", "input.format=csv",
                           f"output.root={tmp_path / 'out'}")
    assert code == 2, err
    assert "holds no events" in err and "as-of" not in err and "Traceback" not in err


def test_three_users_narrow_the_k_range_with_a_warning(spark, capsys, caplog, tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    records = [event(u, f"2026-10-0{d} 1{u}:00:00", kind, float(u * 3 + d), u * 10 + d)
               for u in (1, 2, 3) for d in range(1, 2 + 2 * u) for kind in ("view", "purchase")[: 1 + (u + d) % 2]]
    (folder / "e.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "run", "--config", CONFIG, "--run-id", "tiny", "--set", f"input.path={folder}",
                                 "input.format=json", f"output.root={out}", *FAST_MODELS, "models.gmm.enabled=false",
                                 "models.autoencoder.enabled=false")
    assert code == 0, err
    assert "k range 3..4 is narrowed to 2..2" in caplog.text  # logged as a warning
    assert "warning: 3 users: kmeans's k range" in printed and "kmeans: k=2" in printed
    segments = DeltaTable(str(out / "user_segments")).to_pandas()
    assert len(segments) == 6 and set(segments.model) == {"kmeans", "bisecting_kmeans"}
    assert json.loads(runs_row(out)["metrics"])["warnings"]


def test_each_model_says_how_many_users_it_needs():
    from segspark.config import load_config
    from segspark.segments.train import users_check

    models = load_config(CONFIG).models
    with pytest.raises(NotEnoughUsersError) as error:
        users_check(models, 3, dims=5)
    message = str(error.value)
    assert "gmm needs k x (5 + 1) users" in message and "at least 12 for k=2" in message
    assert "ae_hdbscan needs at least 284 users with these settings, the run has 3" in message
    assert "kmeans" not in message  # kmeans and bisecting_kmeans can narrow their range instead

    fixed = load_config(CONFIG, ["models.kmeans.k=4", "models.autoencoder.enabled=false", "models.gmm.enabled=false"])
    with pytest.raises(NotEnoughUsersError, match=r"models\.kmeans\.k=4 needs k \+ 1 users: at least 5"):
        users_check(fixed.models, 3, dims=5)

    ranges, warnings = users_check(load_config(CONFIG, ["models.autoencoder.enabled=false"]).models, 50, dims=12)
    assert ranges == {"gmm": (3, 5)}  # 50 users carry 5 components of 8 + 1 (principal_components: 8)
    assert len(warnings) == 1 and "gmm's k range 3..8 is narrowed to 3..5" in warnings[0]


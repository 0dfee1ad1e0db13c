"""Run ids: one pattern everywhere (CLI, library, ids read back from tables), deletes confined to the
folder segspark owns, and batch ids kept out of the stream's namespace (issue 17, item 1)."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from segspark.cli import main
from segspark.errors import UsageError
from segspark.runtime.run_ids import RunIdError, check_batch_run_id, check_run_id

from .conftest import FAST_MODELS, REPO

CONFIG = str(REPO / "conf/local.yaml")
# One cheap model: these tests are about ids and folders, not segments.
ONLY_KMEANS = (*FAST_MODELS, "models.kmeans.k=2", "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false",
               "models.autoencoder.enabled=false")


def write_events(folder, users: int = 12) -> str:
    """A small JSON clickstream: every user views, carts and buys on a few days of October 2026."""
    folder.mkdir(parents=True)
    lines = []
    for u in range(1, users + 1):
        for day in range(1, 2 + u % 5):
            for minute, kind in enumerate(["view", "cart", "purchase"][: 1 + (u + day) % 3]):
                lines.append(json.dumps({
                    "event_time": f"2026-10-{day:02d} {8 + u % 12:02d}:{minute:02d}:00", "event_type": kind,
                    "product_id": u * 100 + day, "category_code": f"cat{u % 3}.x", "price": 5.0 + u * day,
                    "user_id": u, "user_session": f"s{u}-{day}",
                }))
    (folder / "part-0.json").write_text("\n".join(lines) + "\n")
    return str(folder)


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root) -> dict[str, int]:
    """Every file under root with its size: what a refused command must leave exactly as it was."""
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def earlier_run(spark, tmp_path_factory):
    """A good `segspark run` (tables, bundle) that the refused commands must leave alone."""
    root = tmp_path_factory.mktemp("run-ids")
    events = write_events(root / "events")
    out = root / "out"
    code = main(["run", "--config", CONFIG, "--run-id", "good", "--set", f"input.path={events}", "input.format=json",
                 f"output.root={out}", *ONLY_KMEANS])
    assert code == 0
    assert {"quarantine", "user_features", "user_segments", "model_selection", "segment_profiles", "runs",
            "_models"} <= set(os.listdir(out))
    return out, events


@pytest.fixture
def copied_run(earlier_run, tmp_path):
    """A copy of the earlier run's output root, for tests that add rows to its tables."""
    out, events = earlier_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy, events


def common(out, events):
    return ["--config", CONFIG, "--set", f"input.path={events}", "input.format=json", f"output.root={out}", *ONLY_KMEANS]


def test_run_id_dotdot_is_refused_and_every_earlier_table_survives(earlier_run):
    out, events = earlier_run
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "segspark", "run", "--run-id", "..", *common(out, events)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--run-id '..' is not a valid run id" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == before  # nothing deleted, nothing added (not even a runs row)


@pytest.mark.parametrize("command", ["run", "features", "train", "report"])
@pytest.mark.parametrize("run_id", ["..", "a/b", ".hidden", "x" * 129, "a\nb"])
def test_every_command_refuses_a_bad_run_id_before_any_work(earlier_run, capsys, command, run_id):
    out, events = earlier_run
    before = snapshot(out)
    args = ["--config", CONFIG, "--set", f"output.root={out}"] if command == "report" else common(out, events)
    code, _, err = run_cli(capsys, command, "--run-id", run_id, *args)
    assert code == 2 and "is not a valid run id" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_library_refuses_a_nested_run_id(spark, earlier_run, make_config):
    from segspark import usecases
    from segspark.bundle.store import bundle_location

    out, events = earlier_run
    cfg = make_config(f"input.path={events}", "input.format=json", f"output.root={out}", *ONLY_KMEANS)
    before = snapshot(out)
    with pytest.raises(RunIdError, match="'a/b' is not a valid run id"):
        usecases.run(spark, cfg, run_id="a/b")
    with pytest.raises(RunIdError):
        bundle_location(cfg.output, "a/b")  # one run's bundle can never nest inside another's
    assert snapshot(out) == before


def _append_row(table_path, run_id: str, **changes) -> None:
    """Add a copy of the table's first row under another run id (as another tool might have)."""
    table = DeltaTable(str(table_path)).to_pyarrow_table().slice(0, 1)
    table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array([run_id]))
    for name, value in changes.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.array([value], table.schema.field(name).type))
    write_deltalake(str(table_path), table, mode="append")


def test_train_refuses_a_bad_run_id_read_back_from_the_runs_table(copied_run, capsys):
    out, events = copied_run
    latest = pc.max(DeltaTable(str(out / "runs")).to_pyarrow_table().column("finished_at")).as_py()
    _append_row(out / "runs", "..", finished_at=latest + dt.timedelta(hours=1))  # the latest run
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", *common(out, events))
    assert code == 2, err
    assert "the run id read from" in err and "'..' is not a valid run id" in err
    assert snapshot(out) == before


def test_report_refuses_a_bad_run_id_read_back_for_its_folder(copied_run, capsys):
    out, _ = copied_run
    latest = pc.max(DeltaTable(str(out / "runs")).to_pyarrow_table().column("finished_at")).as_py()
    _append_row(out / "runs", "a/b", finished_at=latest + dt.timedelta(hours=1))
    _append_row(out / "segment_profiles", "a/b")  # the latest succeeded run with segments
    before = snapshot(out)
    code, _, err = run_cli(capsys, "report", "--config", CONFIG, "--set", f"output.root={out}")
    assert code == 2, err
    assert "'a/b' is not a valid run id" in err and "_reports" in err
    assert snapshot(out) == before and not (out / "_reports").exists()


def test_batch_run_ids_cannot_collide_with_stream_batch_ids(spark, earlier_run, make_config, capsys):
    from segspark import usecases
    from segspark.streaming.micro_batch import batch_run_id

    out, events = earlier_run
    cfg = make_config(f"input.path={events}", "input.format=json", f"output.root={out}")
    stream_id = batch_run_id(cfg, 3)  # the run id of a stream batch's quarantine rows
    assert stream_id == "segspark-stream-3"
    before = snapshot(out)
    code, _, err = run_cli(capsys, "run", "--run-id", stream_id, *common(out, events))
    assert code == 2 and "reserved for `segspark stream`" in err
    with pytest.raises(RunIdError, match="reserved"):
        usecases.run(spark, cfg, run_id=stream_id)
    # Another app id reserves its own namespace; the default one stays reserved.
    code, _, err = run_cli(capsys, "features", "--run-id", "nightly-7", *common(out, events),
                           "streaming.app_id=nightly")
    assert code == 2 and "'nightly-'" in err
    with pytest.raises(RunIdError):
        check_batch_run_id("segspark-stream-9", "nightly")
    assert check_batch_run_id("nightly-7", "segspark-stream") == "nightly-7"
    assert snapshot(out) == before


@pytest.mark.parametrize("run_id", ["daily-2026-10-31", "r1", "A.b_c-9", "x" * 128, "20261031T120000Z-1a2b3c"])
def test_valid_run_ids(run_id):
    assert check_run_id(run_id) == run_id


def test_default_run_ids_match_the_pattern():
    from segspark.usecases import new_run_id

    assert check_batch_run_id(new_run_id(), "segspark-stream")


def test_stream_app_id_follows_the_run_id_rule():
    from segspark.config import load_config
    from segspark.errors import ConfigError

    with pytest.raises(ConfigError, match="streaming.app_id"):
        load_config(CONFIG, ["streaming.app_id=.."])


def test_start_bundle_deletes_only_inside_the_models_folder(tmp_path):
    from segspark.bundle.store import start_bundle

    owner = tmp_path / "_models"
    (owner / "r1").mkdir(parents=True)
    (owner / "r1" / "old.json").write_text("{}")
    keep = tmp_path / "quarantine.keep"
    keep.write_text("a table")
    start_bundle(str(owner / "r1"), str(owner))  # an earlier attempt of the same run: emptied
    assert (owner / "r1").is_dir() and not list((owner / "r1").iterdir())

    for escape in (owner / "..", owner, owner / "r1" / ".." / ".."):
        with pytest.raises(UsageError, match="not inside"):
            start_bundle(str(escape), str(owner))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data").write_text("precious")
    (owner / "linked").symlink_to(outside)
    with pytest.raises(UsageError, match="not inside"):
        start_bundle(str(owner / "linked"), str(owner))
    assert keep.read_text() == "a table" and (outside / "data").read_text() == "precious"


def test_the_committer_deletes_only_its_staging_folders(spark, tmp_path):
    from segspark.io.delta import STAGE_PREFIX, _Committer

    table = tmp_path / "table"
    (table / f"{STAGE_PREFIX}1").mkdir(parents=True)
    (table / "part-0.parquet").write_text("data")
    committer = _Committer(spark, spark.createDataFrame([(1,)], "n int"), str(table), {}, None, None)
    for path in (table, table / "..", table / f"{STAGE_PREFIX}1" / "..", table / "part-0.parquet", tmp_path / "write-x"):
        with pytest.raises(ValueError, match="refusing to delete"):
            committer._delete(str(path))
    committer._delete(str(table / f"{STAGE_PREFIX}1"))
    assert sorted(p.name for p in table.iterdir()) == ["part-0.parquet"]

"""`segspark stream` end to end: a trained bundle scores a landing folder replayed in steps (late
and out-of-order files, a malformed file), the query is killed mid-batch and restarted from its
checkpoint, and every table holds each batch exactly once; the merged feature state equals the
batch features of the same events."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from segspark import ingest
from segspark.bundle.manifest import BundleError
from segspark.cli import main
from segspark.features import user_features
from segspark.io.delta import read_table
from segspark.io.readers import read_raw_events
from segspark.runtime.expressions import memoised
from segspark.streaming import job
from segspark.streaming.feature_state import state_features
from segspark.streaming.identity import (
    QUERY_KEY,
    CheckpointState,
    StreamLock,
    StreamRefused,
    TableCommits,
    check_identity,
)
from segspark.streaming.state_store import read_current_state

from .conftest import REPO, TRAINED_RUN_ID, data_lines


def _table(cfg, name):
    return DeltaTable(f"{cfg.output.root}/{name}").to_pandas()


@pytest.fixture(scope="module")
def trained(spark, trained_run, tmp_path_factory):
    """The shared training run of every model (conftest.trained_run), copied so that the stream can
    add its tables beside the run's, and generated JSON events (other users than the training's) as
    the lines the stream's files are made of."""
    from segspark.config import load_config
    from segspark.datagen import GenerateSpec
    from segspark.datagen_local import write_dataset_on_driver

    root = tmp_path_factory.mktemp("stream-job")
    shutil.copytree(trained_run.root, root / "out")
    write_dataset_on_driver(GenerateSpec(users=300, days=30, seed=5), str(root / "data"), "json")
    cfg = load_config(REPO / "conf/local.yaml", [*trained_run.overrides, f"input.path={root}/data/events",
                                                 "input.format=json", f"output.root={root}/out"])
    lines = sorted(line for p in (root / "data/events").glob("part-*") for line in p.read_text().splitlines() if line.strip())
    return cfg, root, lines


def test_stream_replay_kill_restart_exactly_once(spark, trained, monkeypatch):
    base, root, lines = trained
    landing = root / "landing"
    landing.mkdir()
    cfg = base.model_copy(update={
        "input": base.input.model_copy(update={"path": str(landing)}),
        "streaming": base.streaming.model_copy(update={"max_files_per_trigger": 1, "state_buckets": 4,
                                                       "checkpoint": str(root / "checkpoint")}),
    })
    # Files arrive out of order: the later half of the lines (by text, so users and days are mixed)
    # first, then the earlier half (late events), then a malformed file.
    middle = len(lines) // 2
    (landing / "a.json").write_text("\n".join(lines[middle:]) + "\n")
    first = job.run_stream(spark, cfg, available_now=True)
    assert [r.batch_id for r in first.reports] == [0] and first.reports[0].users > 0
    # spark.shuffle_partitions auto: the batch's shuffles sized from its file (one partition for a few
    # hundred kB), and the session's own setting back once the batch is done.
    assert first.reports[0].shuffle_partitions == 1 and spark.conf.get("spark.sql.shuffle.partitions") == "4"
    assert first.reports[0].state_compacted  # the first batch writes the state one row per user

    (landing / "b.json").write_text("\n".join(lines[:middle]) + "\n")
    (landing / "c.json").write_text('{"user_id": "u1", "event_time": \nnot json\n')
    # The query dies in batch 1 twice, between two of its commits: first after its assignments were
    # committed, before its feature state (the re-run merges the batch into the state as it was);
    # then after the state, before the drift (the re-run reads the merged state back).
    dies = {"state": 1, "drift": 1}
    real_write, real_drift = job.write_rows, job._drift

    def write_dies_once(spark, output, table, *args, **kwargs):
        if table == job.STATE and dies["state"]:
            dies["state"] -= 1
            raise RuntimeError("killed before the state")
        return real_write(spark, output, table, *args, **kwargs)

    def drift_dies_once(*args, **kwargs):
        if dies["drift"]:
            dies["drift"] -= 1
            raise RuntimeError("killed before the drift")
        return real_drift(*args, **kwargs)

    monkeypatch.setattr(job, "write_rows", write_dies_once)
    monkeypatch.setattr(job, "_drift", drift_dies_once)

    def txn(table: str, suffix: str) -> int | None:
        return DeltaTable(f"{cfg.output.root}/{table}").transaction_version(f"{cfg.streaming.app_id}.{suffix}")

    with pytest.raises(Exception, match="killed before the state"):
        job.run_stream(spark, cfg, available_now=True)
    assert (txn("user_segments_live", "live"), txn("stream_feature_state", "state")) == (1, 0)
    with pytest.raises(Exception, match="killed before the drift"):
        job.run_stream(spark, cfg, available_now=True)
    assert (txn("stream_feature_state", "state"), txn("segment_drift", "drift")) == (1, 0)
    restarted = job.run_stream(spark, cfg, available_now=True)  # from the checkpoint: batch 1 again, then 2
    assert [r.batch_id for r in restarted.reports] == [1, 2]

    # Every record counted once: input = clean + quarantined over the batches.
    batches = _table(cfg, "stream_batches").sort_values("batch_id")
    assert batches.batch_id.tolist() == [0, 1, 2]
    assert batches.input_rows.sum() == data_lines(landing) == batches.clean_rows.sum() + batches.quarantined_rows.sum()
    assert batches.iloc[2].quarantined_rows == 2 and batches.iloc[2].clean_rows == 0
    # The late batch did not move the as-of date back.
    assert batches.iloc[1].as_of >= batches.iloc[0].as_of

    # Assignments: one row per user, model and batch; every touched user of each batch, every model.
    live = _table(cfg, "user_segments_live")
    assert not live.duplicated(["user_id", "model", "batch_id"]).any()
    models = {"kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan", "kmeans_online"}
    assert set(live.model) == models
    per_batch = live.groupby("batch_id").user_id.nunique().to_dict()
    assert per_batch == {0: batches.iloc[0].users, 1: batches.iloc[1].users}
    assert (live.groupby(["batch_id", "model"]).size().unstack().nunique(axis=1) == 1).all()

    # Batch 1 appended its users' rows (state_compaction 0.5 of batch 0's rows not reached): the users
    # of both batches have two rows, and their current one is batch 1's.
    stored = _table(cfg, "stream_feature_state")
    assert set(stored.batch_id) == {0, 1} and stored.user_id.duplicated().any()
    assert not stored.duplicated(["user_id", "batch_id"]).any()
    # The merged state is the batch job's features of all the events (no batch merged twice).
    clean = ingest.clean_events(ingest.tag_events(read_raw_events(spark, cfg.input), cfg.input))
    as_of = batches.as_of.max()
    slots = job.bundle_slots(restarted.bundle)
    state = read_current_state(spark, cfg).drop("bucket", "batch_id")  # each user's row of its latest batch
    got = {r.user_id: r.asDict() for r in state_features(state, as_of, cfg.features, slots).collect()}
    expected = {r.user_id: r.asDict() for r in user_features(clean, as_of, cfg.features, slots).collect()}
    assert set(got) == set(expected)
    for user, row in expected.items():
        for column, value in row.items():
            mine = got[user][column]
            assert mine == value or (isinstance(value, float) and math.isclose(mine, value, rel_tol=1e-9, abs_tol=1e-9)), (
                user, column, mine, value)

    # A user's latest live row carries the time of the user's newest event.
    newest = {r.user_id: r.t for r in clean.groupBy("user_id").agg(F.max("event_time").alias("t")).collect()}
    latest = live.sort_values("batch_id").groupby("user_id").latest_event_time.last()
    assert all(latest[u].to_pydatetime().replace(tzinfo=None) == newest[u].replace(tzinfo=None) for u in latest.index)

    # Online k-means: a snapshot per batch with the bundle's stable ids; drift rows per batch and model.
    centroids = _table(cfg, "segment_centroids_online")
    assert sorted(centroids.batch_id.unique()) == [0, 1]
    assert set(centroids.segment) == set(job.load_stream_models(spark, cfg, restarted.bundle).kmeans_ids.values())
    assert set(live[live.model == "kmeans_online"].segment) <= set(centroids.segment)
    assert (live[live.model == "kmeans_online"].anomaly_score >= 0).all()
    drift = _table(cfg, "segment_drift")
    assert sorted(drift.batch_id.unique()) == [0, 1] and set(drift.model) == models
    assert drift[drift.model == "kmeans_online"].max_centroid_shift.notna().all()
    runs = read_table(spark, f"{cfg.output.root}/runs").where(F.col("run_id") == restarted.run_id).collect()
    assert runs[0].status == "succeeded" and '"batches": 2' in runs[0].metrics


def test_the_scoring_is_built_when_the_models_load_not_in_the_first_batch(spark, trained):
    """load_stream_models builds the preparation's and every model's scoring expressions (memoised per
    loaded bundle) before the query starts: the first batch's assignments do not wait for them."""
    cfg, _, _ = trained
    models = job.load_stream_models(spark, cfg, str(Path(cfg.output.root) / "_models" / TRAINED_RUN_ID))

    def built_again():
        raise AssertionError("built again by the first batch")

    memoised(models.loaded.preparation, "capped", built_again)
    memoised(models.loaded.preparation, "scaled", built_again)
    for name, saved in models.loaded.models.items():
        memoised(saved, "stable", built_again)
        if name in ("kmeans", "bisecting_kmeans"):
            memoised(saved.fitted, "scores", built_again)


def test_a_restart_in_the_same_session_reuses_the_loaded_bundle_and_still_verifies_it(spark, trained, tmp_path):
    """A stream started again in this session (a notebook, a restarted query) takes the bundle's models
    and training inputs as the earlier start loaded them, its scoring already built; the bundle's files
    are still checked at every start, so a file changed since is refused."""
    cfg, _, _ = trained
    bundle = tmp_path / "bundle"  # a bundle of its own: the other tests' starts share the original's
    shutil.copytree(Path(cfg.output.root) / "_models" / TRAINED_RUN_ID, bundle)
    first = job.load_stream_models(spark, cfg, str(bundle))
    again = job.load_stream_models(spark, cfg, str(bundle))
    assert again.loaded is first.loaded and again.population is first.population
    assert again.online is not first.online  # what a start reads anew: the online centres, the window, the state
    assert again.online_batch == first.online_batch and np.array_equal(again.online.centers, first.online.centers)
    # Other settings read from the training run: loaded again, not mixed up with the first.
    other = cfg.model_copy(update={"streaming": cfg.streaming.model_copy(update={
        "drift": cfg.streaming.drift.model_copy(update={"bins": cfg.streaming.drift.bins + 1})})})
    assert job.load_stream_models(spark, other, str(bundle)).loaded is not first.loaded

    target = bundle / "models" / "kmeans.json"
    document = json.loads(target.read_text())
    document["segment_ids"] = {k: v + 1 for k, v in document["segment_ids"].items()}
    target.write_text(json.dumps(document))
    with pytest.raises(BundleError, match="models/kmeans.json"):
        job.load_stream_models(spark, cfg, str(bundle))


def test_stream_cli_exit_codes(trained, tmp_path):
    cfg, root, _ = trained
    config = str(REPO / "conf/local.yaml")
    # Its own app_id: the checkpoint is new, and the tables may hold the default app's batches.
    kafka = ["--set", "input.format=kafka", "input.options.kafka.bootstrap.servers=127.0.0.1:9", "input.options.subscribe=events",
             f"output.root={cfg.output.root}", f"streaming.checkpoint={tmp_path / 'ck'}", "streaming.app_id=kafka-test"]
    assert main(["stream", "--config", config, "--available-now", *kafka]) == 2
    empty = ["--set", f"output.root={tmp_path / 'nothing'}", f"input.path={tmp_path}"]
    assert main(["stream", "--config", config, "--available-now", *empty]) == 2


# --- stream identity: a reset checkpoint, another stream's checkpoint, two live streams ------------


def _own_root(base, root, tmp_path, **streaming):
    """A config on a copy of the training run's tables and bundle (no stream tables, no checkpoint),
    reading the landing folder tmp_path/landing."""
    out = tmp_path / "out"
    for name in ("user_features", "user_segments", "_models"):
        shutil.copytree(Path(base.output.root) / name, out / name)
    landing = tmp_path / "landing"
    landing.mkdir()
    return base.model_copy(update={
        "input": base.input.model_copy(update={"path": str(landing)}),
        "output": base.output.model_copy(update={"root": str(out)}),
        "streaming": base.streaming.model_copy(update={"state_buckets": 2, "bundle": str(out / "_models" / TRAINED_RUN_ID),
                                                       **streaming}),
    })


def _stream_args(cfg, *extra):
    return ["stream", "--config", str(REPO / "conf/local.yaml"), "--available-now", "--set", f"input.path={cfg.input.path}",
            "input.format=json", f"output.root={cfg.output.root}", f"streaming.bundle={cfg.streaming.bundle}", *extra]


def test_a_reset_checkpoint_is_refused_and_a_new_app_id_processes_every_new_file(spark, trained, tmp_path):
    base, root, lines = trained
    cfg = _own_root(base, root, tmp_path)  # the default app_id, the default checkpoint
    landing, app = Path(cfg.input.path), cfg.streaming.app_id
    (landing / "a.json").write_text("\n".join(lines[:150]) + "\n")
    assert [r.batch_id for r in job.run_stream(spark, cfg, available_now=True).reports] == [0]
    checkpoint = Path(cfg.streaming.checkpoint_path(cfg.output))
    query_id = json.loads((checkpoint / "metadata").read_text().splitlines()[0])["id"]
    # Every commit of the batch records the checkpoint's query id next to its txn.
    for table in job.STREAM_TXNS:
        assert DeltaTable(f"{cfg.output.root}/{table}").history(1)[0][QUERY_KEY] == query_id, table
    assert set(_table(cfg, "stream_batches").query_id) == {query_id}

    # "Starting afresh" by deleting the checkpoint: batch ids restart at 0, which the tables hold.
    shutil.rmtree(checkpoint)
    (landing / "b.json").write_text("\n".join(lines[150:300]) + "\n")
    done = subprocess.run([sys.executable, "-m", "segspark", *_stream_args(cfg)], capture_output=True, text=True,
                          timeout=600, env=os.environ)
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(error) == 1 and f"checkpoint reset or another stream uses app_id '{app}'" in error[0]
    assert "up to batch 0" in error[0] and f"streaming.app_id={app}-2" in error[0]
    assert not checkpoint.exists() and _table(cfg, "stream_batches").batch_id.tolist() == [0]

    # The documented way: processed files moved out, a new app_id (its checkpoint by default its own).
    (tmp_path / "processed").mkdir()
    (landing / "a.json").rename(tmp_path / "processed" / "a.json")
    fresh = cfg.model_copy(update={"streaming": cfg.streaming.model_copy(update={"app_id": f"{app}-2"})})
    assert [r.batch_id for r in job.run_stream(spark, fresh, available_now=True).reports] == [0]
    batches = _table(cfg, "stream_batches").set_index("app_id")
    assert batches.loc[f"{app}-2", "input_rows"] == 150 == data_lines(landing)  # every new record, none skipped
    live = _table(cfg, "user_segments_live")
    assert set(live[live.app_id == f"{app}-2"].user_id) == {str(json.loads(line)["user_id"]) for line in lines[150:300]}

    # The old app_id with the new app's checkpoint: another query's checkpoint, refused.
    other = cfg.model_copy(update={"streaming": cfg.streaming.model_copy(update={
        "checkpoint": fresh.streaming.checkpoint_path(fresh.output)})})
    with pytest.raises(StreamRefused, match=f"another stream uses app_id '{app}'.*written by query {query_id}"):
        job.check_stream_identity(other)


def test_a_second_live_stream_on_one_app_id_is_refused(spark, trained, tmp_path, capsys):
    base, root, _ = trained
    cfg = _own_root(base, root, tmp_path, app_id="live-app", trigger_seconds=0.5)  # a fractional interval
    first = threading.Thread(target=job.run_stream, args=(spark, cfg), daemon=True)
    first.start()
    deadline = time.monotonic() + 300
    while not any(q.name == "live-app" for q in spark.streams.active):
        assert first.is_alive() and time.monotonic() < deadline
        time.sleep(0.5)
    try:
        code = main(_stream_args(cfg, "streaming.app_id=live-app"))
        err = capsys.readouterr().err
        assert code == 2 and f"stream app_id 'live-app' is already running: pid {os.getpid()} on host" in err
        assert "Traceback" not in err
        with pytest.raises(StreamRefused, match="already running"):
            job.run_stream(spark, cfg, available_now=True)
    finally:
        for query in spark.streams.active:
            if query.name == "live-app":
                query.stop()
        first.join(120)
    StreamLock(cfg.output.root, "live-app").acquire().release()  # released when the stream stopped


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from segspark.streaming.identity import StreamLock; "
         "StreamLock(sys.argv[1], 'app').acquire(checkpoint='ck'); print('held', flush=True); sys.stdin.read()",
         str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StreamRefused, match=f"pid {holder.pid} on host .*checkpoint ck.* holds the lock"):
            StreamLock(str(tmp_path), "app").acquire()
    finally:
        holder.kill()  # SIGKILL: the holder cleans nothing up
        holder.wait()
    with StreamLock(str(tmp_path), "app").acquire(checkpoint="mine"):  # the kernel dropped the lock
        assert json.loads((tmp_path / "_checkpoints/app.lock").read_text())["checkpoint"] == "mine"


def test_identity_rules():
    commits = [TableCommits("/o/stream_batches", 4, "q1"), TableCommits("/o/stream_feature_state", 5, "q1")]
    check_identity("a", "/o", CheckpointState("/c", True, "q1", 5), commits)  # its own checkpoint
    check_identity("a", "/o", CheckpointState("/c", True, "q1", 6), commits)
    check_identity("a", "/o", CheckpointState("/c", True, None, None), [])  # a new app
    check_identity("a", "/o", CheckpointState("/c", True, "q0", 5), [TableCommits("/o/x", 5, None)])  # older tables
    with pytest.raises(StreamRefused, match="checkpoint reset .* up to batch 5 .*but the checkpoint /c is new"):
        check_identity("a", "/o", CheckpointState("/c", True, None, None), commits)
    with pytest.raises(StreamRefused, match="belongs to query q2"):
        check_identity("a", "/o", CheckpointState("/c", True, "q2", 9), commits)
    with pytest.raises(StreamRefused, match="has planned batches up to 3: its next batches would be skipped"):
        check_identity("a", "/o", CheckpointState("/c", True, "q0", 3), [TableCommits("/o/x", 5, None)])


def test_an_app_id_whose_batch_ids_a_batch_run_took_is_refused(spark, tmp_path):
    """A batch run named `nightly-3` (allowed while the app id was another) would have its rows
    replaced by batch 3 of a stream with app_id `nightly`: that stream does not start."""
    import datetime as dt

    from segspark.config import load_config
    from segspark.io.catalog import RUNS
    from segspark.io.tables import write_run_rows

    cfg = load_config(REPO / "conf/local.yaml", [f"output.root={tmp_path / 'out'}", "streaming.app_id=nightly"])
    now = dt.datetime.now(dt.UTC)
    row = ("nightly-3", now, now, "succeeded", "h", None, 0, 0, 0, 0, "{}")
    write_run_rows(spark, cfg.output, "runs", spark.createDataFrame([row], RUNS), "nightly-3")
    with pytest.raises(StreamRefused, match=r"batch run\(s\) nightly-3"):
        job.run_stream(spark, cfg, available_now=True)

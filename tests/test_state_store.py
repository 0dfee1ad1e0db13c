"""The stream's feature state table (`streaming.state_store`): batches append their users' rows,
compactions rewrite it to one row per user, and its current rows are the batch features of all the
events merged so far, also when the table was written before rows carried their batch."""

from __future__ import annotations

from deltalake import DeltaTable
from pyspark.sql import functions as F

from segspark.config import load_config
from segspark.features import resolve_slots, user_features
from segspark.io.tables import write_rows
from segspark.streaming.feature_state import VERSION, batch_state, state_features
from segspark.streaming.state_store import (
    BUCKET,
    LOG_BUCKET,
    STATE,
    StateLog,
    bucket_of,
    merge_batch,
    read_current_state,
)

from .conftest import REPO
from .test_feature_state import _differences, _rows, stream_events  # noqa: F401 (the module's fixture)


def test_appends_then_compacts_and_its_current_rows_are_the_batch_features(spark, stream_events, tmp_path):  # noqa: F811
    base, clean, as_of = stream_events
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={base.input.path}", f"output.root={tmp_path}/out",
                                                 "streaming.state_buckets=4", "streaming.state_compaction=1.5"])
    slots = resolve_slots(clean, as_of, cfg.features)
    # Four micro-batches of about the same users, split by a hash: every batch holds early and late events.
    parts = [clean.where(F.abs(F.xxhash64("user_id", "event_time", "event_type", "item_id")) % 4 == i) for i in range(4)]
    txn = f"{cfg.streaming.app_id}.state"

    def state_rows(part):
        batch = batch_state(part, cfg.features, slots).withColumn(BUCKET, bucket_of(cfg)).localCheckpoint()
        return batch, sorted(r[0] for r in batch.select(BUCKET).distinct().collect())

    # Batch 0 as an earlier segspark wrote it: every bucket replaced, rows without their batch.
    first, buckets = state_rows(parts[0])
    write_rows(spark, cfg.output, STATE, first, partitions=buckets, txn=(txn, 0))
    users = first.count()
    log = StateLog.of_table(spark, cfg)
    assert (log.compacted_rows, log.appended_rows) == (users, 0)

    compactions, sizes = [], []
    for batch_id, part in enumerate(parts[1:], start=1):
        batch, buckets = state_rows(part)
        update = merge_batch(spark, cfg, log, batch, buckets, batch_id, slots)
        assert {r.user_id for r in update.touched.collect()} == {r.user_id for r in batch.collect()}
        written = write_rows(spark, cfg.output, STATE, update.rows, partitions=update.replaced, txn=(txn, batch_id))
        log.wrote(update, written.rows)
        compactions.append(update.compaction)
        table = DeltaTable(f"{cfg.output.root}/{STATE}").to_pandas()
        sizes.append((len(table), table.user_id.nunique(), (table.bucket == LOG_BUCKET).sum()))
        # The rows the stream counts in memory are the table's, as a stream starting now counts them.
        fresh = StateLog.of_table(spark, cfg)
        assert log.compacted_rows + log.appended_rows == fresh.compacted_rows + fresh.appended_rows == len(table)
    # Appended twice (the rows appended stay below 1.5 times the 0th batch's), then compacted.
    assert compactions == [False, False, True]
    (rows1, users1, log1), (rows2, users2, log2), (rows3, users3, log3) = sizes
    assert rows1 > users1 and rows2 > rows1 and rows3 == users3  # superseded rows, then one row per user
    # The appended rows were in the log partition until the compaction put every row in its hash bucket.
    assert log1 == rows1 - first.count() and log2 == rows2 - first.count() and log3 == 0
    assert set(table.bucket) == set(range(4))
    table = DeltaTable(f"{cfg.output.root}/{STATE}").to_pandas()
    # Each user's row carries its latest batch (null: untouched since batch 0, whose rows had none).
    assert set(table[VERSION].dropna()) <= {1, 2, 3} and (table[VERSION] == 3).sum() == parts[3].select("user_id").distinct().count()

    expected = _rows(user_features(clean, as_of, cfg.features, slots))

    def current_is_the_batch_features(cfg):
        current = read_current_state(spark, cfg)
        assert current.count() == current.select("user_id").distinct().count() == users3
        got = _rows(state_features(current.drop(BUCKET, VERSION), as_of, cfg.features, slots))
        assert set(got) == set(expected)
        differences = _differences(got, expected)
        assert not differences, differences[:5]

    current_is_the_batch_features(cfg)

    # streaming.state_buckets changed (4 -> 3): the stream finds rows in the wrong buckets when it
    # starts, and its next batch compacts, re-bucketing every row; the bucket 3 it no longer has goes.
    cfg3 = cfg.model_copy(update={"streaming": cfg.streaming.model_copy(update={"state_buckets": 3})})
    log = StateLog.of_table(spark, cfg3)
    assert log.misplaced and log.buckets == (0, 1, 2, 3)
    empty, _ = state_rows(parts[0].limit(0))  # a batch of no users: the state stays what it is
    update = merge_batch(spark, cfg3, log, empty, [], 4, slots)
    assert update.compaction and update.replaced == [LOG_BUCKET, 0, 1, 2, 3]
    written = write_rows(spark, cfg3.output, STATE, update.rows, partitions=update.replaced, txn=(txn, 4))
    log.wrote(update, written.rows)
    assert not log.misplaced and not StateLog.of_table(spark, cfg3).misplaced
    stored = read_current_state(spark, cfg3)
    assert stored.where(F.col(BUCKET) != bucket_of(cfg3)).count() == 0
    current_is_the_batch_features(cfg3)

"""The streaming source and per-batch ingest: files dropped in steps, processed with available-now,
restarted from the checkpoint, malformed files quarantined while the stream goes on, every record
counted, and a replayed batch id writing nothing twice."""

from __future__ import annotations

import pytest
from deltalake import DeltaTable

from segspark.errors import InputSchemaError
from segspark.io.readers import read_raw_events
from segspark.streaming.micro_batch import ingest_micro_batch, start_stream
from segspark.streaming.source import read_event_stream

from .conftest import data_lines


def _halves(folder):
    """The generated events' lines as two day files."""
    lines = [line for p in sorted(folder.glob("part-*")) for line in p.read_text().splitlines() if line.strip()]
    middle = len(lines) // 2
    return "\n".join(lines[:middle]) + "\n", "\n".join(lines[middle:]) + "\n"


def _run(spark, cfg):
    batches = []

    def on_batch(records, batch_id):
        batch = ingest_micro_batch(spark, cfg, records, batch_id)
        batch.unpersist()
        batches.append(batch)

    query = start_stream(spark, cfg, on_batch, available_now=True)
    query.awaitTermination()
    assert query.exception() is None
    return batches


def test_files_in_steps_restart_from_checkpoint_and_malformed_file(spark, make_config, noisy_json, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    day_one, day_two = _halves(noisy_json / "events")
    cfg = make_config(f"input.path={landing}", "input.format=json", "streaming.max_files_per_trigger=1",
                      f"streaming.checkpoint={tmp_path / 'checkpoint'}")
    (landing / "a.json").write_text(day_one)
    first = _run(spark, cfg)
    assert [b.batch_id for b in first] == [0]
    assert first[0].input_rows == data_lines(landing) == first[0].clean_rows + first[0].quarantined_rows

    # A new day's files and a broken one arrive; the restarted query reads only those, one per batch.
    (landing / "b.json").write_text(day_two)
    (landing / "c.json").write_text('{"user_id": "u1", "event_time": \nnot json at all\n')
    second = _run(spark, cfg)
    assert [b.batch_id for b in second] == [1, 2]
    broken = next(b for b in second if b.clean_rows == 0)
    assert broken.quarantined_rows == 2 and set(broken.reasons) == {"malformed_record"}

    every = first + second
    assert sum(b.input_rows for b in every) == data_lines(landing)
    quarantine = DeltaTable(f"{cfg.output.root}/quarantine").to_pandas()
    assert len(quarantine) == sum(b.quarantined_rows for b in every)
    assert quarantine.groupby("run_id").size().to_dict() == {
        b.run_id: b.quarantined_rows for b in every if b.quarantined_rows
    }


def test_a_replayed_batch_writes_its_quarantine_once(spark, make_config, noisy_json):
    cfg = make_config(f"input.path={noisy_json}/events", "input.format=json")
    records = read_raw_events(spark, cfg.input)
    once = ingest_micro_batch(spark, cfg, records, 7)
    again = ingest_micro_batch(spark, cfg, records, 7)
    once.unpersist(), again.unpersist()
    assert once.quarantined_rows > 0 and not once.replayed and again.replayed
    quarantine = DeltaTable(f"{cfg.output.root}/quarantine")
    assert len(quarantine.to_pandas()) == once.quarantined_rows
    assert quarantine.transaction_version("segspark-stream.quarantine") == 7


def test_sources_that_cannot_start_say_why(spark, make_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for fmt in ("csv", "parquet"):
        cfg = make_config(f"input.path={empty}", f"input.format={fmt}")
        with pytest.raises(InputSchemaError, match="there are none yet; drop one file there first"):
            read_event_stream(spark, cfg.input, cfg.streaming)
    cfg = make_config("input.format=kafka")
    with pytest.raises(InputSchemaError, match="needs input.options kafka.bootstrap.servers"):
        read_event_stream(spark, cfg.input, cfg.streaming)
    cfg = make_config("input.format=kafka", "input.options.kafka.bootstrap.servers=127.0.0.1:9",
                      "input.options.subscribe=events")
    with pytest.raises(InputSchemaError, match="Kafka connector is not on the classpath. Add it with spark-submit"):
        read_event_stream(spark, cfg.input, cfg.streaming)
    with pytest.raises(InputSchemaError, match="kafka is a streaming source"):
        read_raw_events(spark, cfg.input)

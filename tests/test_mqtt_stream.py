"""input.format mqtt against a real Mosquitto broker (started here on 127.0.0.1, a free port; no mocks):
the landing client lands each message once even when the broker re-sends it after a crash, the
stream killed with SIGKILL mid-way and restarted puts every published event into the tables exactly
once, a payload that is not JSON becomes a quarantine row, and an unreachable broker is exit 2.

Mosquitto comes from scripts/install_mosquitto.sh (scripts/test.sh runs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from segspark.streaming.mqtt_landing import MqttLanding

from .conftest import FAST_MODELS, REPO

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
# Only k-means: the stream's work per batch is what this file tests, not the other models.
KMEANS_ONLY = ("models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.autoencoder.enabled=false")
NOT_JSON = ["not json", "42", '{"user_id": "u1", "event_time": ']  # the last one cut short
NO_USER = '{"event_time": "2026-10-01 10:00:00", "event_type": "view"}'  # JSON, but no user id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A Mosquitto on 127.0.0.1 with persistence in a temp folder; yields its port."""
    if MOSQUITTO is None:
        pytest.fail("mosquitto not found: run `bash scripts/install_mosquitto.sh` (Debian: apt-get install mosquitto)")
    folder = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    conf = folder / "mosquitto.conf"
    # max_queued_messages: Mosquitto keeps at most 1000 messages for an offline session by default and
    # drops the rest; the tests publish more than that while no landing client is connected.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {folder}/\nmax_queued_messages 100000\n")
    log = open(folder / "mosquitto.log", "wb")  # noqa: SIM115 - closed when the broker stops
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: process.poll() is not None or _port_open(port), 15, "mosquitto to listen")
        assert process.poll() is None, (folder / "mosquitto.log").read_text()
        yield port
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def _publish(port: int, topic: str, payloads: list[bytes | str]) -> None:
    """Publish with QoS 1 and wait until the broker has acknowledged every message."""
    from paho.mqtt import client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{os.getpid()}", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for info in [client.publish(topic, payload, qos=1) for payload in payloads]:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _overrides(tmp_path: Path, port: int, topic: str, *extra: str) -> list[str]:
    return ["input.format=mqtt", f"input.path={tmp_path / 'landing'}", f"input.mqtt.port={port}",
            f"input.mqtt.topic={topic}", "input.mqtt.drain_idle_seconds=1", *extra]


def _landed(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("mqtt-*.jsonl")) for line in path.read_text().splitlines()]


def test_a_message_redelivered_after_a_crash_is_landed_once(broker, tmp_path):
    from segspark.config import load_config

    overrides = _overrides(tmp_path, broker, "redelivery")
    cfg = load_config(REPO / "conf/local.yaml", overrides).input
    MqttLanding(cfg, "redelivery").start().stop()  # the persistent session: messages from now on are kept
    _publish(broker, "redelivery", [json.dumps({"user_id": f"u{i}", "n": i}) for i in range(50)])

    # A landing process that lands every message durably and dies before any acknowledgement reaches
    # the broker (its acks are dropped, then SIGKILL): the broker still holds all 50 unacknowledged.
    crash = (
        "import os, signal, sys\n"
        "from segspark.config import load_config\n"
        "from segspark.streaming.mqtt_landing import MqttLanding\n"
        "cfg = load_config(sys.argv[1], sys.argv[2:]).input\n"
        "landing = MqttLanding(cfg, 'redelivery')\n"
        "landing._client.ack = lambda mid, qos: None\n"
        "landing.start().drain()\n"
        "print(landing.stats.landed, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(REPO / "conf/local.yaml"), *overrides],
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["50"], done.stderr
    assert len(_landed(tmp_path / "landing")) == 50

    # The restarted client gets all 50 again (the same packets, unacknowledged): acknowledged, not landed.
    stats = MqttLanding(cfg, "redelivery").start()
    stats.drain()
    again = stats.stop()
    assert (again.received, again.landed, again.redeliveries) == (50, 0, 50)
    # Acknowledged now: a further restart gets nothing; new messages land once each.
    _publish(broker, "redelivery", [json.dumps({"user_id": "v", "n": i}) for i in range(50, 60)])
    landing = MqttLanding(cfg, "redelivery").start()
    landing.drain()
    final = landing.stop()
    assert (final.received, final.landed, final.redeliveries) == (10, 10, 0)
    records = _landed(tmp_path / "landing")
    assert len(records) == 60 == len({r["id"] for r in records})
    assert sorted(json.loads(r["payload"])["n"] for r in records) == list(range(60))
    assert not list((tmp_path / "landing").glob(".*"))  # no temp file left behind


def test_record_ids_are_deterministic():
    from segspark.streaming.mqtt_landing import record_id

    payload = b'{"event_id": "e-17", "user_id": "u1"}'
    assert record_id("t", payload, None) == record_id("t", payload, None) != record_id("t2", payload, None)
    assert record_id("t", payload, None) != record_id("t", payload + b" ", None)
    # With id_field the event's own id decides (a re-sent event with other bytes is the same record).
    assert record_id("t", payload, "event_id") == record_id("t2", b'{"event_id":"e-17"}', "event_id") == "event_id:e-17"
    # Without it in the message (or no JSON object at all), the hash of topic and payload.
    assert record_id("t", b"not json", "event_id") == record_id("t", b"not json", None)
    assert record_id("t", b"[1]", "event_id") == record_id("t", b"[1]", None)


def test_an_unreachable_broker_is_exit_2_with_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    args = ["-m", "segspark", "stream", "--config", str(REPO / "conf/local.yaml"), "--available-now", "--set",
            *_overrides(tmp_path, port, "events"), f"output.root={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: input.mqtt: cannot reach the MQTT broker at 127.0.0.1:{port}"), errors


def test_the_source_is_checked_before_spark_starts(broker, tmp_path, monkeypatch):
    from segspark.config import load_config
    from segspark.errors import ConfigError
    from segspark.streaming.mqtt_landing import check_source

    def cfg(*extra):
        return load_config(REPO / "conf/local.yaml", _overrides(tmp_path, broker, "events", *extra)).input

    check_source(cfg())
    with pytest.raises(ConfigError, match="input.path 's3://bucket/landing': an MQTT stream lands messages in a local folder"):
        check_source(cfg("input.path=s3://bucket/landing"))
    monkeypatch.delenv("SEGSPARK_TEST_MQTT_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="environment variable SEGSPARK_TEST_MQTT_PASSWORD is not set"):
        check_source(cfg("input.mqtt.username=u", "input.mqtt.password_env=SEGSPARK_TEST_MQTT_PASSWORD"))


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    """A k-means training run on generated events, and 2000 of those events as JSON texts."""
    from segspark import usecases
    from segspark.config import load_config
    from segspark.datagen import GenerateSpec
    from segspark.datagen_local import write_dataset_on_driver

    root = tmp_path_factory.mktemp("mqtt-stream")
    write_dataset_on_driver(GenerateSpec(users=150, days=30, seed=7), str(root / "data"), "json")
    overrides = [f"input.path={root}/data/events", "input.format=json", f"output.root={root}/out", *FAST_MODELS,
                 *KMEANS_ONLY, "models.kmeans.k=3"]
    usecases.run(spark, load_config(REPO / "conf/local.yaml", overrides), run_id="train-1")
    lines = sorted(line for p in (root / "data/events").glob("part-*") for line in p.read_text().splitlines() if line.strip())
    assert len(lines) >= 2000
    return root, lines[:2000 - len(NOT_JSON) - 1]


def test_mqtt_stream_killed_and_restarted_lands_every_event_once(spark, broker, trained, tmp_path):
    from segspark.config import load_config
    from segspark.streaming import job

    root, events = trained
    payloads = events[:1000] + NOT_JSON + [NO_USER] + events[1000:]
    n = len(payloads)
    out = tmp_path / "out"
    shutil.copytree(root / "out/_models", out / "_models")
    for name in ("user_features", "user_segments"):
        shutil.copytree(root / "out" / name, out / name)
    overrides = _overrides(
        tmp_path, broker, "stream", f"output.root={out}", f"streaming.bundle={out / '_models/train-1'}",
        *FAST_MODELS, *KMEANS_ONLY, "input.mqtt.max_inflight=400", "streaming.trigger_seconds=1",
        "streaming.state_buckets=2", "streaming.app_id=mqtt-test",
        "streaming.drift.emerging.enabled=false",  # tested in test_stream_emerging.py; not this file's subject
    )
    cfg = load_config(REPO / "conf/local.yaml", overrides)
    MqttLanding(cfg.input, "mqtt-test").start().stop()  # the session exists before anything is published
    _publish(broker, "stream", payloads[:1200])

    # The stream runs as `segspark stream` in its own process and is killed (SIGKILL) in its first batch,
    # once that batch's quarantine rows are committed (or later, if the batch is quicker than the polling):
    # the restart re-runs the batch, skips what is committed and writes the rest.
    args = [sys.executable, "-m", "segspark", "stream", "--config", str(REPO / "conf/local.yaml"), "--set", *overrides]
    log = open(tmp_path / "stream.log", "wb")  # noqa: SIM115 - closed below
    stream = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    batches = out / "stream_batches"
    try:
        _wait_for(lambda: stream.poll() is not None or (out / "quarantine/_delta_log/00000000000000000000.json").exists(),
                  300, "the first batch's quarantine commit")
        assert stream.poll() is None, (tmp_path / "stream.log").read_text()[-3000:]
        # More messages arrive while it runs: it dies with some of them landed, some perhaps landed and
        # not yet acknowledged (the broker re-sends those), some still on the broker.
        _publish(broker, "stream", payloads[1200:])
    finally:
        stream.send_signal(signal.SIGKILL)
        stream.wait(60)
        log.close()
    # A publisher retrying (at least once) sends some messages again: the same record ids, skipped.
    _publish(broker, "stream", payloads[:5])

    restarted = job.run_stream(spark, cfg, available_now=True)  # from the checkpoint, the session
    assert restarted.reports, "the restart processed nothing"

    landed = _landed(tmp_path / "landing")
    assert len(landed) == n == len({r["id"] for r in landed})
    table = DeltaTable(str(batches)).to_pandas()
    assert not table.batch_id.duplicated().any()
    assert table.input_rows.sum() == n == table.clean_rows.sum() + table.quarantined_rows.sum()

    # Bad payloads are quarantine rows with the json file stream's reasons: not JSON (raw = the payload),
    # and JSON without a user id. The generated events themselves are clean.
    quarantine = DeltaTable(str(out / "quarantine")).to_pandas()
    quarantine = quarantine[quarantine.run_id.str.startswith("mqtt-test-")]
    assert len(quarantine) == table.quarantined_rows.sum() == len(NOT_JSON) + 1
    assert sorted(quarantine[quarantine.reason == "malformed_record"].raw) == sorted(NOT_JSON)
    assert json.loads(quarantine[quarantine.reason == "missing_user_id"].raw.item()) == json.loads(NO_USER)

    # No event counted twice: one live row per user, model and batch, and each user's events in the
    # feature state equal the user's clean events among those published.
    live = DeltaTable(str(out / "user_segments_live")).to_pandas()
    assert len(live) and not live.duplicated(["user_id", "model", "batch_id"]).any()
    stored = DeltaTable(str(out / "stream_feature_state")).to_pandas()
    assert not stored.duplicated(["user_id", "batch_id"]).any()
    state = stored.sort_values("batch_id").groupby("user_id").tail(1)  # each user's row of its latest batch
    published = {}
    for text in events:
        user = str(json.loads(text)["user_id"])
        published[user] = published.get(user, 0) + 1
    assert set(live.user_id) == set(state.user_id) == set(published)
    assert state.set_index("user_id").events.to_dict() == published

"""MQTT -> landing folder: the durable first step of an MQTT stream (input.format mqtt).

The broker delivers at least once; the tables must get each event exactly once. The work is split:

1. This module's client (paho-mqtt, on the driver) keeps a persistent session: a fixed client id,
   clean start off and a session expiry, QoS 1 and manual acknowledgements. Received messages are
   buffered and written as JSON lines to a temp file in `input.path` (a dot name: Spark's file
   source skips it), fsynced, renamed to `mqtt-<time>-<n>.jsonl` and the folder fsynced; only then
   are they acknowledged (PUBACK). A crash before the rename loses nothing (the broker re-sends what
   was not acknowledged); a crash after it but before the acknowledgement lands a message that the
   broker re-sends.
2. Every landed line carries a record id: the event's `id_field` when configured and present, else
   a hash of topic and payload. A message whose id is among the last `dedup_window` landed records
   (the ids are read back from the newest landed files when the client starts) is a redelivery: it
   is acknowledged and not landed again. So each message is in exactly one landed line.
3. The stream reads the landing folder with Spark's file source (checkpointed: each file in exactly
   one micro-batch) and every table's commit carries the batch's Delta transaction (job.py): each
   landed line reaches the tables exactly once.

A landed line is `{"id", "topic", "received_at", "payload"}` with the payload as text (JSON escaped, so
a payload with line breaks or one that is not JSON still is one line); `source.read_event_stream`
parses the payload with the json column mapping, and a payload that is not a JSON object becomes a
quarantine row (malformed_record) like a bad line of a json file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from segspark.config import InputConfig, MqttConfig
from segspark.errors import ConfigError, SourceUnavailableError

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "mqtt-", ".jsonl"
# Flush when the broker has gone quiet this long: with its in-flight window full it sends nothing
# more until we acknowledge, so waiting for flush_seconds would only add latency.
QUIET_SECONDS = 0.05


def landing_folder(cfg: InputConfig) -> Path:
    """input.path as a local folder: the client makes each file durable with fsync and rename, which
    object stores (s3://, abfss://, dbfs:/) do not offer."""
    path = cfg.path
    if path.startswith("file:"):
        path = "/" + path[len("file:"):].lstrip("/")
    elif "://" in path or (":" in path.split("/")[0] and len(path.split("/")[0]) > 2):  # a scheme, not C:
        raise ConfigError(
            f"input.path {cfg.path!r}: an MQTT stream lands messages in a local folder (fsync and rename "
            "make each file durable before the broker is acknowledged); set input.path to a local path"
        )
    return Path(path)


def client_id(cfg: InputConfig, app_id: str) -> str:
    return cfg.mqtt_settings().client_id or f"segspark-{app_id}"


def check_source(cfg: InputConfig) -> None:
    """Before Spark starts: the landing folder is local, and a TCP connection to the broker opens (no
    MQTT session: connecting with the client id would take the session over from a running landing).
    ConfigError or SourceUnavailableError when not."""
    landing_folder(cfg)
    mqtt = cfg.mqtt_settings()
    if mqtt.password_env and mqtt.password_env not in os.environ:
        raise ConfigError(f"input.mqtt.password_env: the environment variable {mqtt.password_env} is not set")
    try:
        with socket.create_connection((mqtt.host, mqtt.port), timeout=mqtt.connect_timeout_seconds):
            pass
    except OSError as exc:
        raise _unreachable(mqtt, exc) from None


def _unreachable(mqtt: MqttConfig, exc: BaseException) -> SourceUnavailableError:
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return SourceUnavailableError(
        f"input.mqtt: cannot reach the MQTT broker at {mqtt.host}:{mqtt.port} ({reason or type(exc).__name__}); "
        "start the broker or fix input.mqtt.host / input.mqtt.port"
    )


def record_id(topic: str, payload: bytes, id_field: str | None) -> str:
    """The landed record's deterministic id: the same message re-sent gets the same id."""
    if id_field:
        try:
            value = json.loads(payload).get(id_field)
        except (ValueError, AttributeError):
            value = None
        if value is not None and value != "":
            return f"{id_field}:{value}"
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]


@dataclass
class LandingStats:
    received: int = 0
    landed: int = 0
    redeliveries: int = 0  # acknowledged without landing (already landed)
    files: int = 0


class _Window:
    """The ids of the last `size` landed records, oldest first (a bounded, ordered set)."""

    def __init__(self, size: int):
        self.size, self.ids = size, OrderedDict()

    def add(self, rid: str) -> None:
        self.ids[rid] = None
        while len(self.ids) > self.size:
            self.ids.popitem(last=False)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ids


def _recent_ids(folder: Path, size: int) -> _Window:
    """The window rebuilt from the newest landed files (names sort by landing time)."""
    window, files = _Window(size), sorted(folder.glob(f"{PREFIX}*{SUFFIX}"), reverse=True)
    chosen, count = [], 0
    for path in files:
        chosen.append(path)
        count += sum(1 for _ in path.open("rb"))
        if count >= size:
            break
    for path in reversed(chosen):
        for line in path.read_text().splitlines():
            if line.strip():
                window.add(json.loads(line)["id"])
    return window


def _remove_dead_temp_files(folder: Path) -> None:
    """Temp files of a landing process that died while writing: their messages were never
    acknowledged (the broker sends them again), so the files are only litter. A live process's
    (its pid is in the name) are left alone."""
    for tmp in folder.glob(f".{PREFIX}*{SUFFIX}.tmp"):
        try:
            pid = int(tmp.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            log.info("mqtt landing: removed %s, left by a landing that died while writing it", tmp.name)
        except (ValueError, IndexError, PermissionError):
            continue


class MqttLanding:
    """The landing client (module docstring). `start()` connects and subscribes, a flusher thread
    lands and acknowledges; `drain()` waits until the broker has nothing more; `stop()` lands what is
    buffered and disconnects, leaving the session on the broker."""

    def __init__(self, cfg: InputConfig, app_id: str, on_error: Callable[[BaseException], None] | None = None):
        self.mqtt, self.folder, self.client_id = cfg.mqtt_settings(), landing_folder(cfg), client_id(cfg, app_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_temp_files(self.folder)
        self.window = _recent_ids(self.folder, self.mqtt.dedup_window)
        self.stats = LandingStats()
        self.error: BaseException | None = None
        self._on_error = on_error
        self._buffer: list = []  # received, not yet landed: (message, record id, received_at)
        self._first = self._last = 0.0  # monotonic times of the buffer's first and the latest message
        self._cond = threading.Condition()
        self._stopping = False
        self._seq = itertools.count()
        self._connected, self._subscribed = threading.Event(), threading.Event()
        self._connect_error: str | None = None
        self._client = self._make_client()
        self._flusher = threading.Thread(target=self._flush_loop, name="mqtt-landing", daemon=True)

    # --- the client -------------------------------------------------------------------------

    def _make_client(self):
        from paho.mqtt import client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5, manual_ack=True)
        if self.mqtt.username is not None or self.mqtt.password_env is not None:
            password = os.environ.get(self.mqtt.password_env) if self.mqtt.password_env else None
            if self.mqtt.password_env and password is None:
                raise ConfigError(f"input.mqtt.password_env: the environment variable {self.mqtt.password_env} is not set")
            client.username_pw_set(self.mqtt.username or "", password)
        if self.mqtt.tls:
            client.tls_set()
        client.reconnect_delay_set(1, 30)
        client.connect_timeout = self.mqtt.connect_timeout_seconds
        self._properties = Properties(PacketTypes.CONNECT)
        self._properties.SessionExpiryInterval = self.mqtt.session_expiry_seconds
        # How many unacknowledged messages the broker may send: one landed file's worth.
        self._properties.ReceiveMaximum = self.mqtt.max_inflight
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self._connect_error = f"the broker refused the connection: {reason}"
            self._connected.set()
            self._subscribed.set()  # nothing more to wait for
            return
        log.info("mqtt landing: connected to %s:%d as %s (%s)", self.mqtt.host, self.mqtt.port, self.client_id,
                 "session resumed" if flags.session_present else "new session")
        # Subscribed on every connect: a new session (expired, or a broker without persistence) has none.
        client.subscribe(self.mqtt.topic, qos=self.mqtt.qos)
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            self._connect_error = f"the broker refused the subscription to {self.mqtt.topic!r}: {failed[0]}"
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if not self._stopping:
            log.warning("mqtt landing: disconnected from %s:%d (%s); reconnecting", self.mqtt.host, self.mqtt.port, reason)

    def _on_message(self, client, userdata, message) -> None:
        payload = message.payload
        rid = record_id(message.topic, payload, self.mqtt.id_field)
        now = time.monotonic()
        with self._cond:
            if not self._buffer:
                self._first = now
            self._last = now
            self._buffer.append((message, rid, dt.datetime.now(dt.UTC)))
            self.stats.received += 1
            self._cond.notify_all()

    def start(self) -> MqttLanding:
        """Connect, subscribe and start landing; SourceUnavailableError when the broker cannot be used."""
        try:
            self._client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive_seconds,
                                 clean_start=False, properties=self._properties)
        except OSError as exc:
            raise _unreachable(self.mqtt, exc) from None
        self._client.loop_start()
        timeout = self.mqtt.connect_timeout_seconds
        if not (self._connected.wait(timeout) and self._subscribed.wait(timeout)) or self._connect_error:
            self._stopping = True
            self._client.loop_stop()
            self._client.disconnect()
            raise SourceUnavailableError(
                f"input.mqtt: {self._connect_error or f'no answer from the MQTT broker at {self.mqtt.host}:{self.mqtt.port} within {timeout:g} s'}"
                " (check input.mqtt host, port, topic, username and password_env)"
            )
        self._flusher.start()
        log.info("mqtt landing: topic %r (QoS %d) -> %s", self.mqtt.topic, self.mqtt.qos, self.folder)
        return self

    def drain(self) -> LandingStats:
        """Return once every message the broker sent is landed and none came for drain_idle_seconds."""
        idle = self.mqtt.drain_idle_seconds
        quiet_since = time.monotonic()
        while True:
            self._raise_error()
            with self._cond:
                if self._buffer:
                    quiet_since = time.monotonic()
                elif time.monotonic() - max(quiet_since, self._last) >= idle:
                    return self.stats
                self._cond.wait(0.05)

    def stop(self) -> LandingStats:
        """Land and acknowledge what is buffered, then disconnect (the session stays on the broker)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._flusher.is_alive():
            self._flusher.join()
        self._client.disconnect()
        self._client.loop_stop()
        log.info("mqtt landing: stopped; %d messages received, %d landed in %d files, %d redeliveries skipped",
                 self.stats.received, self.stats.landed, self.stats.files, self.stats.redeliveries)
        self._raise_error()
        return self.stats

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"mqtt landing failed: {type(self.error).__name__}: {self.error}") from self.error

    # --- landing ----------------------------------------------------------------------------

    def _due(self) -> bool:
        now = time.monotonic()
        return bool(self._buffer) and (
            self._stopping or len(self._buffer) >= self.mqtt.max_inflight
            or now - self._first >= self.mqtt.flush_seconds or now - self._last >= QUIET_SECONDS
        )

    def _flush_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._due():
                        if self._stopping and not self._buffer:
                            return
                        self._cond.wait(QUIET_SECONDS / 2)
                    batch, self._buffer = self._buffer, []
                self._land(batch)
        except BaseException as exc:  # noqa: BLE001 - kept, raised by drain/stop, and the stream stopped
            log.error("mqtt landing: %s: %s; unacknowledged messages stay on the broker", type(exc).__name__, exc)
            self.error = exc
            if self._on_error is not None:
                self._on_error(exc)

    def _land(self, batch: list) -> None:
        lines, acks = [], []
        for message, rid, received_at in batch:
            acks.append(message.mid)
            if rid in self.window:
                self.stats.redeliveries += 1
                log.info("mqtt landing: message %s (packet %d%s) was landed already: acknowledged, not landed again",
                         rid, message.mid, ", dup" if message.dup else "")
                continue
            self.window.add(rid)
            lines.append(json.dumps({
                "id": rid, "topic": message.topic, "received_at": received_at.isoformat(timespec="microseconds"),
                # Not UTF-8 (so not JSON): kept readable; the stream quarantines it as malformed_record.
                "payload": message.payload.decode("utf-8", errors="backslashreplace"),
            }))
        if lines:
            self._write(lines)
        # In the order received (MQTT wants PUBACKs in order), each packet id once.
        for mid in dict.fromkeys(acks):
            self._client.ack(mid, self.mqtt.qos)

    def _write(self, lines: list[str]) -> None:
        name = f"{PREFIX}{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}{SUFFIX}"
        tmp, target = self.folder / f".{name}.tmp", self.folder / name
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        folder = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
        self.stats.landed += len(lines)
        self.stats.files += 1


@contextmanager
def landing_for_stream(cfg: InputConfig, app_id: str, *, available_now: bool,
                       on_error: Callable[[BaseException], None] | None = None) -> Iterator[MqttLanding | None]:
    """For input.format mqtt: with available_now, land what the broker holds and disconnect before
    the query starts (the query then reads a folder that no longer changes); otherwise land in the
    background while the query runs, until it stops. Other formats: nothing (yields None)."""
    if cfg.format != "mqtt":
        yield None
        return
    landing = MqttLanding(cfg, app_id, on_error=on_error).start()
    try:
        if available_now:
            landing.drain()
            stats = landing.stop()
            log.info("mqtt landing: drained the session: %d messages landed, %d redeliveries skipped",
                     stats.landed, stats.redeliveries)
        yield landing
    finally:
        if not landing._stopping:
            landing.stop()


__all__ = ["LandingStats", "MqttLanding", "check_source", "client_id", "landing_folder", "landing_for_stream",
           "record_id"]

"""Progress of long stages on a terminal: one status line (stage, rows so far, elapsed, Spark tasks)
redrawn in place while the stage runs.

The library only announces stages (`stage_started`, `stage_finished`); showing them is the CLI's
choice (`watch`). Nothing is drawn when the stream is not a terminal, so the logs that schedulers,
CI and `--log-format json` capture stay one clean line per event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

from segspark.runtime.session import is_connect

CLEAR_LINE = "\r\x1b[K"


class _Stage:
    def __init__(self, name: str, counts: Mapping[str, object]):
        self.name = name
        self.counts = counts  # filled in by the stage as it learns its row counts
        self.started = time.monotonic()


class TerminalProgress:
    """Draws the current stage on `stream` every `interval` seconds from a daemon thread."""

    def __init__(self, stream: TextIO, spark=None, interval: float = 0.5):
        self.stream = stream
        self.spark = spark
        self.interval = interval
        self._stage: _Stage | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="segspark-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.clear()

    def stage_started(self, name: str, counts: Mapping[str, object]) -> None:
        with self._lock:
            self._stage = _Stage(name, counts)

    def stage_finished(self, name: str) -> None:
        with self._lock:
            self._stage = None
        self.clear()

    def clear(self) -> None:
        """Wipe the status line (before a log line is written, and at the end)."""
        with self._lock:
            if self._drawn:
                self.stream.write(CLEAR_LINE)
                self.stream.flush()
                self._drawn = False

    def line(self) -> str | None:
        """The status text for the current stage, None between stages."""
        stage = self._stage
        if stage is None:
            return None
        parts = [f"{stage.name}", f"{time.monotonic() - stage.started:6.1f} s"]
        rows = ", ".join(f"{k} {v:,}" for k, v in dict(stage.counts).items() if isinstance(v, int))
        if rows:
            parts.append(rows)
        tasks = spark_tasks(self.spark)
        if tasks:
            parts.append(f"Spark tasks {tasks[0]:,}/{tasks[1]:,}")
        return "segspark: " + " | ".join(parts)

    def draw(self) -> None:
        text = self.line()
        if text is None:
            return
        with self._lock:
            self.stream.write(CLEAR_LINE + text)
            self.stream.flush()
            self._drawn = True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw()


def spark_tasks(spark) -> tuple[int, int] | None:
    """(completed, total) tasks of the active Spark stages, from the status tracker; None where
    there is none (Spark Connect has no SparkContext) or nothing runs."""
    if spark is None or is_connect(spark):
        return None
    try:
        tracker = spark.sparkContext.statusTracker()
        infos = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
    except Exception:  # noqa: BLE001 - the session may be stopping; progress is best effort
        return None
    infos = [i for i in infos if i is not None]
    if not infos:
        return None
    return sum(i.numCompletedTasks for i in infos), sum(i.numTasks for i in infos)


_listeners: list[TerminalProgress] = []


def stage_started(name: str, counts: Mapping[str, object]) -> None:
    for listener in _listeners:
        listener.stage_started(name, counts)


def stage_finished(name: str) -> None:
    for listener in _listeners:
        listener.stage_finished(name)


def clear_line() -> None:
    for listener in _listeners:
        listener.clear()


@contextmanager
def watch(stream: TextIO, spark=None, *, enabled: bool = True) -> Iterator[TerminalProgress | None]:
    """Show stage progress on `stream` while the block runs, if it is a terminal and `enabled`."""
    if not (enabled and _is_terminal(stream)):
        yield None
        return
    progress = TerminalProgress(stream, spark)
    _listeners.append(progress)
    progress.start()
    try:
        yield progress
    finally:
        _listeners.remove(progress)
        progress.stop()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False

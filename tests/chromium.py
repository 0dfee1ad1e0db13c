"""A small DevTools-protocol client for headless Chromium: open a page, collect what went wrong.

Used by tests/test_report.py to check that the HTML report renders in a real browser: no console
error, no exception, no failed or outgoing network request, every figure's image decoded.

    with Chromium.launch(tmp_path / "profile") as browser:
        page = browser.open(path.as_uri())
        page.problems            # console errors/warnings, exceptions, log errors, network problems
        page.evaluate("document.title")

Launches `chromium --headless=new --no-sandbox --disable-gpu --remote-debugging-port=0
--user-data-dir=DIR about:blank`, reads the port from DIR/DevToolsActivePort, talks to the browser
over its websocket (flattened target sessions) and kills the browser at the end. The timeouts only
guard against a browser that never answers; they are not performance limits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import websocket

BINARY_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
STARTUP_SECONDS = 90.0
ANSWER_SECONDS = 120.0
ALLOWED_SCHEMES = ("file", "data")


class ChromiumError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The Chromium binary (`CHROMIUM` overrides), or None."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if shutil.which(override) or Path(override).exists() else None
    for candidate in BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@dataclass
class PageReport:
    url: str
    problems: list[str] = field(default_factory=list)  # everything that should not happen
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    browser: Chromium | None = None
    session: str | None = None

    def evaluate(self, expression: str, await_promise: bool = False):
        """The JSON value of a JavaScript expression in the page (exceptions raise ChromiumError)."""
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise ChromiumError(f"evaluating {expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")


class Chromium:
    def __init__(self, process: subprocess.Popen, socket: websocket.WebSocket, profile: Path):
        self.process, self.socket, self.profile = process, socket, profile
        self._next_id = 0
        self._events: list[dict] = []

    @classmethod
    def launch(cls, profile: Path, binary: str | None = None) -> Chromium:
        binary = binary or find_chromium()
        if binary is None:
            raise ChromiumError("chromium not found on PATH: run `bash scripts/install_chromium.sh` (Debian: apt-get install chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        log = open(profile / "chromium.log", "wb")  # noqa: SIM115 - closed with the browser
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise ChromiumError(f"chromium did not start (exit {process.poll()}); its output:\n{output}")
            time.sleep(0.1)
        port, path = lines[0].strip(), lines[1].strip()
        try:
            socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=ANSWER_SECONDS,
                                                 suppress_origin=True)
        except Exception:
            process.kill()
            raise
        return cls(process, socket, profile)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            received = self._receive()
            if received.get("id") == self._next_id:
                if "error" in received:
                    raise ChromiumError(f"{method} failed: {received['error']}")
                return received.get("result", {})
            if "method" in received:
                self._events.append(received)

    def wait_for(self, method: str, session: str | None = None) -> dict:
        """The next event `method` of `session` (earlier events are kept for `drain`)."""
        for i, event in enumerate(self._events):
            if event["method"] == method and event.get("sessionId") == session:
                return self._events.pop(i)
        while True:
            received = self._receive()
            if received.get("method") == method and received.get("sessionId") == session:
                return received
            if "method" in received:
                self._events.append(received)

    def drain(self, session: str | None = None) -> list[dict]:
        taken = [e for e in self._events if e.get("sessionId") == session]
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return taken

    def _receive(self) -> dict:
        try:
            return json.loads(self.socket.recv())
        except websocket.WebSocketTimeoutException:
            raise ChromiumError(f"chromium sent nothing for {ANSWER_SECONDS:.0f} s") from None

    def open(self, url: str) -> PageReport:
        """Navigate a fresh page to `url`, wait for its load event, and report what went wrong."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.drain(session)  # about:blank's own events
        report = PageReport(url=url, browser=self, session=session)
        navigated = self.call("Page.navigate", {"url": url}, session=session)
        if navigated.get("errorText"):
            report.problems.append(f"navigation failed: {navigated['errorText']}")
        self.wait_for("Page.loadEventFired", session)
        # A round trip after the load event: everything the page logged before it has arrived.
        self.call("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True}, session=session)
        for event in self.drain(session):
            _record(report, event["method"], event.get("params", {}))
        return report


def _record(report: PageReport, method: str, params: dict) -> None:
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        report.problems.append(f"console.{params['type']}: {text}")
    elif method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        report.problems.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        report.problems.append(f"log error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    elif method == "Network.requestWillBeSent":
        url = params.get("request", {}).get("url", "")
        report.requests.append(url)
        if urlparse(url).scheme not in ALLOWED_SCHEMES:
            report.problems.append(f"network request to {url}")
    elif method == "Network.loadingFailed":
        report.problems.append(f"loading failed: {params.get('errorText')} (request {params.get('requestId')})")

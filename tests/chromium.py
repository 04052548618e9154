"""Headless Chromium (Debian's ``chromium`` package) driven over the DevTools protocol, for tests.

A tiny client: start the browser with a fresh profile and ``--remote-debugging-port=0``, read the port
from ``DevToolsActivePort``, talk JSON over the page's websocket (``websockets``), collect console
errors, uncaught exceptions, log errors and every network request, evaluate JavaScript and take
screenshots. Nothing is downloaded; nothing leaves the machine (background networking is off).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


def chromium_path() -> str | None:
    """The Chromium executable (``chromium`` from Debian, or a like-named one), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class Page:
    """One page target: ``call`` a DevTools method, events are kept in ``events`` as they arrive."""

    ws: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    _next: int = 0

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        mid = self._next
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first event ``method`` (already received or arriving within ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic()))))

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (late console messages)."""
        end = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < end:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, end - time.monotonic()))))

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + str(p["entry"].get("text")))
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, width: int, height: int) -> Path:
        """A PNG of the top ``width`` x ``height`` CSS pixels of the page."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def browser_page(profile: Path, *, timeout: float = 60.0) -> Iterator[Page]:
    """A headless Chromium with a fresh profile under ``profile`` and one blank page to drive."""
    from websockets.sync.client import connect

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile / "chromium.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--window-size=1280,1000", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=str(profile)))
    try:
        port_file, end = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"chromium did not start: {(profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            targets = json.loads(r.read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        with connect(url, max_size=None, open_timeout=timeout) as ws:
            page = Page(ws=ws)
            for domain in ("Runtime", "Log", "Network", "Page"):
                page.call(f"{domain}.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def load(page: Page, url: str, *, timeout: float = 60.0) -> None:
    """Navigate to ``url`` and wait for its load event (plus a moment for late console messages)."""
    page.events.clear()
    page.call("Page.navigate", url=url)
    page.wait_for("Page.loadEventFired", timeout=timeout)
    page.drain(0.5)

"""A headless Chromium driven over the Chrome DevTools Protocol: pages, DOM queries, screenshots.

Layer L1 (one outside world: a browser). It runs Debian's `chromium` package
(`apt-get install chromium`), an optional dependency needed only for screenshots; the protocol
travels over one websocket (`websocket-client`) to one page of a fixed viewport size, so a
screenshot is exactly `width` x `height` pixels.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websocket

from backend.files import atomic_write_bytes
from backend.harness.processes import stop_process

#: Executable names tried in this order when none is given.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with `sudo apt-get install chromium` (Debian/Ubuntu)"


class BrowserError(RuntimeError):
    """The browser could not be started, or a page did not do what was waited for."""


def find_chromium(executable: str | None = None) -> Path:
    """The Chromium to run: `executable` (a path or a name on PATH), else the first of
    CHROMIUM_NAMES on PATH. Raises BrowserError saying how to install one."""
    names = (executable,) if executable else CHROMIUM_NAMES
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise BrowserError(f"no Chromium found (looked for {', '.join(names)}); {INSTALL_HINT}")


@dataclass(frozen=True)
class Box:
    """An element's bounding box in CSS pixels, relative to the viewport's top left corner."""

    x: float
    y: float
    width: float
    height: float

    @property
    def bottom(self) -> float:
        return self.y + self.height

    @property
    def right(self) -> float:
        return self.x + self.width

    def inside(self, width: float, height: float) -> bool:
        """Whether the whole box is visible in a `width` x `height` viewport."""
        return self.x >= 0 and self.y >= 0 and self.right <= width and self.bottom <= height


class HeadlessChromium:
    """One page of a headless Chromium; make it with `HeadlessChromium.launch(...)`."""

    def __init__(self, socket: websocket.WebSocket, width: int, height: int, timeout: float):
        self._socket = socket
        self.width = width
        self.height = height
        self.timeout = timeout
        self._next_id = 0

    @classmethod
    @contextmanager
    def launch(
        cls,
        *,
        width: int = 1600,
        height: int = 1000,
        executable: str | None = None,
        timeout: float = 60.0,
    ) -> Iterator[HeadlessChromium]:
        """Start Chromium headless with a fresh profile; yield its page; stop it on exit.

        `timeout` bounds the start, each protocol call and each `wait_for` by default.
        """
        chromium = find_chromium(executable)
        # Chromium's helper processes (renderer, crash handler) may still write into the
        # profile for a moment after the browser is stopped: never let that fail the caller.
        with tempfile.TemporaryDirectory(
            prefix="wafer-chromium-", ignore_cleanup_errors=True
        ) as tmp:
            profile = Path(tmp) / "profile"
            log_path = Path(tmp) / "chromium.log"
            command = [
                str(chromium),
                "--headless",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--hide-scrollbars",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "about:blank",
            ]
            if os.geteuid() == 0:
                command.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group, so all its helpers stop
                )
            try:
                port = _wait_for_port(profile / "DevToolsActivePort", process, log_path, timeout)
                page = _page_websocket_url(port, timeout)
                socket = websocket.create_connection(page, timeout=timeout, suppress_origin=True)
                try:
                    browser = cls(socket, width, height, timeout)
                    browser.send(
                        "Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                    )
                    yield browser
                finally:
                    socket.close()
            finally:
                stop_process(process, grace_seconds=10.0)

    def send(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call one DevTools Protocol method on the page and return its result (events that
        arrive meanwhile are dropped)."""
        self._next_id += 1
        call_id = self._next_id
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv())
            if message.get("id") != call_id:
                continue
            if "error" in message:
                raise BrowserError(f"{method} failed: {message['error'].get('message')}")
            return dict(message.get("result") or {})
        raise BrowserError(f"{method} got no answer within {self.timeout:.0f} s")

    def goto(self, url: str) -> None:
        """Open `url` in the page (returns once the navigation is committed, not loaded)."""
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"opening {url} failed: {answer['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        answer = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}")
        return answer.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value.

        Raises BrowserError naming `what` (and the page's address) on timeout."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                where = self.evaluate("location.href")
                raise BrowserError(f"waited {limit:.0f} s for {what} on {where}")
            time.sleep(0.25)

    def box(self, selector: str) -> Box | None:
        """The bounding box of the first element matching a CSS selector, or None."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; const r = e.getBoundingClientRect();"
            " return [r.x, r.y, r.width, r.height]; })()"
        )
        return None if found is None else Box(*(float(v) for v in found))

    def shows(self, selector: str) -> bool:
        """Whether the first element matching a CSS selector is wholly in sight: its box inside
        the viewport, and its centre and corners (2 px in) not covered by anything else nor
        clipped away by a scrolling parent (a hit test there finds the element or its child)."""
        return bool(
            self.evaluate(
                f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " if (!e) return false; const r = e.getBoundingClientRect();"
                " if (r.width < 4 || r.height < 4 || r.left < 0 || r.top < 0"
                "     || r.right > innerWidth || r.bottom > innerHeight) return false;"
                " const points = [[r.left + r.width / 2, r.top + r.height / 2],"
                "   [r.left + 2, r.top + 2], [r.right - 2, r.top + 2],"
                "   [r.left + 2, r.bottom - 2], [r.right - 2, r.bottom - 2]];"
                " return points.every(([x, y]) => {"
                "   const hit = document.elementFromPoint(x, y); return !!hit && e.contains(hit); });"
                " })()"
            )
        )

    def screenshot(self, path: Path) -> Path:
        """Save what the viewport shows as a PNG of `width` x `height` pixels."""
        answer = self.send("Page.captureScreenshot", {"format": "png", "fromSurface": True})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, base64.b64decode(answer["data"]))
        return path


def _wait_for_port(
    active_port: Path, process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> int:
    """The DevTools port Chromium writes into its profile once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserError(f"Chromium exited with code {process.returncode}: {_tail(log_path)}")
        if active_port.is_file():
            first = active_port.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.1)
    raise BrowserError(f"Chromium did not open its DevTools port within {timeout:.0f} s")


def _page_websocket_url(port: int, timeout: float) -> str:
    """The DevTools websocket of the browser's first page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=timeout).json()
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        time.sleep(0.1)
    raise BrowserError(f"Chromium on port {port} opened no page within {timeout:.0f} s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"

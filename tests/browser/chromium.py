"""A real headless Chromium (Debian's package), driven over the DevTools protocol with aiohttp."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (.ci/run installs it)"
)
"""Skip where Chromium is missing, except in CI, where a missing browser fails the test."""

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--window-size=1360,860", "--hide-scrollbars",
)  # fmt: skip


class Browser:
    """One page of a Chromium of its own: navigate, evaluate JavaScript, take screenshots."""

    def __init__(self, profile: Path) -> None:
        self._profile = profile
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.console: list[str] = []
        self.errors: list[str] = []

    async def __aenter__(self) -> Browser:
        assert CHROMIUM is not None, "chromium is missing: .ci/run installs Debian's chromium package"
        self._proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={self._profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        active = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().strip()):
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = active.read_text().split()[0]
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            page = next(t for t in await resp.json() if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._proc is not None:
            self._proc.kill()
            await self._proc.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(30):
            while True:
                message = json.loads((await self._ws.receive()).data)
                if message.get("method") == "Runtime.consoleAPICalled":
                    self.console.append(" ".join(str(a.get("value", "")) for a in message["params"]["args"]))
                elif message.get("method") == "Runtime.exceptionThrown":
                    self.errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
                if message.get("id") == call_id:
                    if "error" in message:
                        raise AssertionError(f"{method}: {message['error']}")
                    result: dict[str, Any] = message["result"]
                    return result

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'", what=f"{url} to load")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, *, timeout: float = 20.0, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression} (page errors: {self.errors})")
            await asyncio.sleep(0.1)

    async def until_console(self, predicate: Callable[[str], bool], *, timeout: float = 20.0) -> None:
        """Wait until the page has logged a console line that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while not any(predicate(line) for line in self.console):
            if time.monotonic() > deadline:
                raise AssertionError(f"no such console line: {self.console} (page errors: {self.errors})")
            await self.evaluate("0")  # console events arrive along with answers
            await asyncio.sleep(0.1)

    async def screenshot(self) -> bytes:
        """The page as it looks now, as PNG."""
        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])

"""The protocol page's own JavaScript example, unchanged but for the token, in a real headless Chromium."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tests.browser.chromium import CHROMIUM, needs_chromium
from tests.helpers import Cluster, psql, token, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges

# Verbatim from the SnackBase realtime page; only "your_jwt_token" is replaced by a real token.
SEED_EXAMPLE = """
const token = "your_jwt_token";
const ws = new WebSocket(`ws://localhost:8000/api/v1/realtime/ws?token=${token}`);
ws.onopen = () => {
// Subscribe to posts collection
ws.send(JSON.stringify({
action: "subscribe",
collection: "posts",
operations: ["create", "update", "delete"]
}));
};
ws.onmessage = (event) => {
const message = JSON.parse(event.data);
if (message.type === "posts.create") {
console.log("New post created:", message.data);
}
if (message.type === "heartbeat") {
console.log("Heartbeat received");
}
};
ws.onerror = (error) => {
console.error("WebSocket error:", error);
};
ws.onclose = () => {
console.log("WebSocket connection closed");
};
"""


def _port_8000_free() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 8000)) != 0


@needs_chromium
async def test_the_seed_javascript_example_works_in_chromium(
    dsn: str, posts: str, cluster: Cluster, tmp_path: Path, start_bridge: Bridges
) -> None:
    assert CHROMIUM is not None, "chromium is missing: .ci/run installs Debian's chromium package"
    assert _port_8000_free(), "the example connects to localhost:8000, which another program is using"
    page = tmp_path / "example.html"
    page.write_text(f"<!doctype html><script>{SEED_EXAMPLE.replace('your_jwt_token', token())}</script>")
    running = await start_bridge(dsn, port=8000, heartbeat=0.5)
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", page.as_uri(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    console: list[str] = []

    async def read_console() -> None:
        assert browser.stderr is not None
        async for line in browser.stderr:
            if b"CONSOLE" in line:
                console.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read_console())
    try:
        await wait_for(lambda: running.bridge.sessions and running.bridge.router.subscriptions(
            next(iter(running.bridge.sessions))), timeout=30, what="the browser to subscribe")  # fmt: skip
        psql(cluster, dsn, "INSERT INTO posts (title) VALUES ('from psql')")
        await wait_for(lambda: any("New post created:" in line for line in console), what="the create event")
        await wait_for(lambda: any("Heartbeat received" in line for line in console), what="a heartbeat")
    finally:
        browser.kill()
        await browser.wait()
        reader.cancel()
    assert not any("WebSocket error" in line for line in console), console

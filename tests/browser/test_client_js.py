"""``/client.js``, pgbridge's JavaScript client, running for real in a headless Chromium.

A page loads the client from the bridge, from the bridge's own origin (a page of it with no policy of
its own: ``/healthz``) or from a ``file://`` page (another origin), and records what the client gives
its callbacks in ``window.events`` and its states in ``window.states``. ``window.attempts`` records
every WebSocket and EventSource the page opens. Bridges that must die run as processes and are
SIGKILLed; the others run in this process, where the tests can look at their sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import pytest
from aiohttp import WSMsgType, web

from pgbridge import protocol
from pgbridge.session import Session
from tests.browser.chromium import Browser, needs_chromium
from tests.helpers import SECRET, Ledger, free_port, token, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes
    from tests.helpers import BridgeProcess

CLIENT = Path(__file__).resolve().parents[2] / "pgbridge" / "static" / "client"

# What every page runs first: records what the client does, and `start(config)` connects it.
HARNESS = r"""
window.events = []; window.states = []; window.attempts = []; window.heartbeats = []; window.tokenCalls = 0;
window.table = {};
for (const name of ["WebSocket", "EventSource"]) {
  const Native = window[name];
  window[name] = class extends Native {
    constructor(...args) {
      super(...args);
      window.attempts.push({ kind: name, url: String(args[0]), at: performance.now() });
    }
  };
}
// The rows of the collection as the events build them: what an application keeps.
window.apply = (event) => {
  const row = event.data;
  if (event.type === "snapshot_start") window.table = {};
  else if (event.type === "snapshot" || (event.type === "change" && event.op !== "delete")) window.table[row.id] = row;
  else if (event.type === "change") delete window.table[row.id];
};
window.start = async (config) => {
  window.client?.close();
  Object.assign(window, { events: [], states: [], attempts: [], heartbeats: [], tokenCalls: 0, table: {} });
  const { connect } = await import(config.module);
  const options = { ...config.options };
  if (config.storage) options.storage = localStorage;
  if (config.tokens) {
    options.getToken = async () => {
      window.tokenCalls += 1;
      return (await fetch(config.tokens, { cache: "no-store" })).text();
    };
  }
  window.startedAt = performance.now();
  const client = connect(config.url, options);
  client.onState((state, detail) => window.states.push({ state, ...detail, at: performance.now() }));
  client.onHeartbeat((timestamp) => window.heartbeats.push(timestamp));
  window.sub = client.subscribe(config.collection ?? "posts", config.subscribe ?? {}, (event) => {
    window.events.push({ ...event, at: performance.now() });
    window.apply(event);
  });
  window.client = client;
};
"""

STATE = "window.client && window.client.state"


@dataclass
class Page:
    """One page of a Chromium, running the harness against the bridge on ``port``."""

    browser: Browser
    port: int
    seen: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{protocol.WS_PATH}"

    async def start(self, **config: Any) -> None:
        config = {"module": f"http://127.0.0.1:{self.port}/client.js", "url": self.ws_url, **config}
        await self.browser.evaluate(
            f"window.client = null; start({json.dumps(config)}).catch((e) => window.startError = String(e))"
        )
        await self.browser.until("window.client || window.startError", what="the client to start")
        assert await self.browser.evaluate("window.startError || null") is None

    async def state(self) -> str:
        value: str = await self.browser.evaluate(STATE)
        return value

    async def until_state(self, state: str, *, after: int = 0, timeout: float = 30) -> dict[str, Any]:
        """Wait until the client reports ``state`` (as its ``after``-th state or later); return its detail."""
        found: dict[str, Any] = await self.browser.until(
            f"window.states.slice({after}).find((s) => s.state === {json.dumps(state)})",
            timeout=timeout,
            what=f"the client to be {state}",
        )
        return found

    async def states(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.browser.evaluate("window.states")
        return found

    async def events(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.browser.evaluate("window.events")
        return found

    async def changes(self) -> list[dict[str, Any]]:
        """The change events so far, as the protocol's data events (what :class:`Ledger` checks)."""
        events = await self.browser.evaluate(
            "window.events.filter((e) => e.type === 'change')"
            ".map((e) => ({ id: e.id, type: e.collection + '.' + e.op, data: { id: e.data.id, title: e.data.title } }))"
        )
        assert isinstance(events, list)
        return events

    async def grows(self, count: str, by: int, *, timeout: float = 30) -> None:
        """Wait until the number the expression ``count`` gives has grown by ``by``."""
        start = await self.browser.evaluate(count)
        await self.browser.until(f"{count} >= {start + by}", timeout=timeout, what=f"{count} to grow by {by}")

    async def attempts(self, kind: str = "WebSocket") -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.browser.evaluate(
            f"window.attempts.filter((a) => a.kind === {json.dumps(kind)})"
        )
        return found


@asynccontextmanager
async def page(tmp_path: Path, port: int, *, cross_origin: bool = False) -> AsyncIterator[Page]:
    """A page that can load ``/client.js`` from the bridge on ``port``: a ``file://`` page (another
    origin, so the module, the probes and the streams go through CORS) or a page of the bridge's origin."""
    async with Browser(Path(tempfile.mkdtemp(prefix="profile", dir=tmp_path))) as browser:  # a fresh Chromium
        if cross_origin:
            html = tmp_path / "page.html"
            html.write_text("<!doctype html><meta charset=utf-8><title>client.js</title>")
            await browser.goto(html.as_uri())
        else:
            await browser.goto(f"http://127.0.0.1:{port}/healthz")
        await browser.evaluate(HARNESS)
        yield Page(browser, port)
        assert browser.errors == []


async def insert(dsn: str, *titles: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO posts (title) VALUES ($1)", [(t,) for t in titles])
    finally:
        await conn.close()


async def write_for(dsn: str, stop: asyncio.Event, writer: int) -> None:
    """Commit (and sometimes roll back) small transactions of inserts until ``stop``."""
    rng = random.Random(writer)
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            try:
                async with conn.transaction():
                    for _ in range(rng.randint(1, 3)):
                        await conn.execute(
                            "INSERT INTO posts (title) SELECT $1 || '-' || g FROM generate_series(1, $2) g",
                            f"w{writer}",
                            rng.randint(1, 3),
                        )
                    if rng.random() < 0.2:
                        raise _Rollback
            except _Rollback:
                pass
            await asyncio.sleep(rng.uniform(0, 0.02))
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


async def until_marker(page: Page, dsn: str, title: str = "the last row") -> list[dict[str, Any]]:
    """Insert a row after everything else and wait for it: every earlier change has arrived by then."""
    await insert(dsn, title)
    await page.browser.until(
        f"window.events.some((e) => e.type === 'change' && e.data.title === {json.dumps(title)})",
        timeout=60,
        what="the last row",
    )
    return await page.changes()


# -- the ledger: SIGKILLed bridges, writers running ------------------------------------------------------------


async def restart_twice(bridge_process: Processes, dsn: str, first: BridgeProcess, p: Page) -> None:
    """SIGKILL the bridge and start it again on the same port, twice, each time once the page has had
    more rows; return once the page has rows from the third bridge."""
    current = first
    for _ in range(2):
        await p.grows("window.events.length", 20)
        current.proc.kill()
        await asyncio.to_thread(current.proc.wait)
        current = bridge_process(dsn, first.port)
        await current.ready()
    await p.grows("window.events.length", 20, timeout=60)


@pytest.mark.parametrize(
    ("transport", "cross_origin"), [("websocket", True), ("sse", False)], ids=["websocket-file-page", "sse-same-origin"]
)
@needs_chromium
async def test_every_committed_row_arrives_once_in_order_across_two_sigkills(
    dsn: str, db: asyncpg.Connection, posts: str, tmp_path: Path, bridge_process: Processes, transport: str,
    cross_origin: bool,
) -> None:  # fmt: skip
    port = free_port()
    first = bridge_process(dsn, port)
    await first.ready()
    stop = asyncio.Event()
    async with page(tmp_path, port, cross_origin=cross_origin) as p:
        await p.start(options={"token": token(ttl=3600), "transport": transport})
        await p.until_state("live")
        writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(2)]
        try:
            await restart_twice(bridge_process, dsn, first, p)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        ledger = Ledger()
        ledger.add(await until_marker(p, dsn))
        await ledger.verify(db, "posts")
        states = [s["state"] for s in await p.states()]
        assert states.count("reconnecting") >= 2 and states[-1] == "live", states
        if transport == "sse":
            assert await p.attempts("WebSocket") == []
        else:
            assert await p.attempts("EventSource") == []


BARE_EVENTSOURCE = r"""
window.log = []; window.failures = [];
const source = new EventSource(%s);
source.addEventListener("posts.create", (e) => window.log.push({ ...JSON.parse(e.data), lastEventId: e.lastEventId }));
source.onerror = () => window.failures.push({ at: performance.now(), state: source.readyState });
window.source = source;
"""


@needs_chromium
async def test_a_bare_eventsource_resumes_by_itself_across_two_sigkills(
    dsn: str, db: asyncpg.Connection, posts: str, tmp_path: Path, bridge_process: Processes
) -> None:
    """No client.js: the browser's EventSource reconnects by itself with Last-Event-ID (the server's SSE
    resume). The bridge answers 503 while it starts, and an EventSource never reconnects after a 503, so
    each restart begins just after a failed reconnect, well before the next one (see the report)."""
    port = free_port()
    env = {"PGBRIDGE_SSE_RETRY": "3"}  # time for a bridge to start: some 0.7 s, the browser tests running alone
    current = bridge_process(dsn, port, env=env)
    await current.ready()
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{port}{protocol.SSE_PATH}?collection=posts&token={token(ttl=3600)}"
    async with page(tmp_path, port, cross_origin=True) as p:
        await p.browser.evaluate(BARE_EVENTSOURCE % json.dumps(url))
        await p.browser.until("window.source.readyState === 1", what="the stream to open")
        writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(2)]
        try:
            for _ in range(2):
                await p.grows("window.log.length", 20)
                failed = await p.browser.evaluate("window.failures.length")
                current.proc.kill()
                await asyncio.to_thread(current.proc.wait)
                # The drop, then a reconnect that failed: the next comes in 3 s, when this bridge is up.
                await p.browser.until(f"window.failures.length >= {failed} + 2", what="a failed reconnect")
                current = bridge_process(dsn, port, env=env)
                await current.ready()
            await p.grows("window.log.length", 20)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        await insert(dsn, "the last row")
        await p.browser.until("window.log.some((e) => e.data.title === 'the last row')", timeout=30)
        assert await p.browser.evaluate("window.source.readyState") == 1  # never gave up
        log = await p.browser.evaluate("window.log")
        assert all(e["id"] == e["lastEventId"] for e in log)  # each event's id: is its position
        ledger = Ledger()
        ledger.add(log)
        await ledger.verify(db, "posts")


# -- a fake bridge: the client's side of the protocol, exactly -------------------------------------------------


@dataclass
class FakeBridge:
    """A WebSocket server speaking the protocol by script: connection n runs ``scripts[n]``."""

    scripts: list[Callable[[web.WebSocketResponse, list[dict[str, Any]]], Awaitable[None]]]
    received: list[list[dict[str, Any]]] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("bearer",))
        await ws.prepare(request)
        messages: list[dict[str, Any]] = []
        self.received.append(messages)
        script = self.scripts[min(len(self.received), len(self.scripts)) - 1]
        reader = asyncio.create_task(self._read(ws, messages))
        try:
            await script(ws, messages)
            await reader
        finally:
            reader.cancel()
        return ws

    async def _read(self, ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        async for frame in ws:
            if frame.type is WSMsgType.TEXT:
                message = json.loads(frame.data)
                messages.append(message)
                if message.get("action") == "ping":
                    await ws.send_json({"type": "pong", "timestamp": "2026-01-17T12:34:56.789Z"})


@asynccontextmanager
async def fake_bridge(
    *scripts: Callable[[web.WebSocketResponse, list[dict[str, Any]]], Awaitable[None]],
) -> AsyncIterator[FakeBridge]:
    fake = FakeBridge(list(scripts))
    app = web.Application()
    app.router.add_get(protocol.WS_PATH, fake.handle)
    app.router.add_get("/client.js", _serve_client)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


async def _serve_client(request: web.Request) -> web.Response:
    return web.Response(body=(CLIENT / "client.js").read_bytes(), content_type="text/javascript",
                        headers={"Access-Control-Allow-Origin": "*"})  # fmt: skip


async def _request(messages: list[dict[str, Any]], action: str = "subscribe") -> dict[str, Any]:
    await wait_for(lambda: any(m.get("action") == action for m in messages), what=f"the client's {action}")
    return next(m for m in messages if m.get("action") == action)


def change(id: str, title: str = "t", op: str = "create") -> dict[str, Any]:
    return {"type": f"posts.{op}", "timestamp": "2026-01-17T12:34:56.789Z", "id": id, "data": {"id": 1, "title": title}}


TWO53 = 2**53  # 9007199254740993 (2**53 + 1) is, as a JavaScript number, 2**53


@needs_chromium
async def test_events_at_or_before_the_position_are_dropped_and_resumes_start_after_it(tmp_path: Path) -> None:
    async def first(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        assert await _request(messages) == {"action": "subscribe", "collection": "posts", "operations": ["create"]}
        await ws.send_json({"type": "posts.create", "data": {"id": 0}, "id": "4.0.0"})  # before the confirmation
        await ws.send_json({"status": "subscribed", "type": "subscribed", "collection": "posts", "id": "5.0.0"})
        # Delivered: 6.0.0, 2^53.0.0, (2^53+1).0.0 (which numbers would take for 2^53.0.0), (2^53+1).0.1.
        # Dropped: a duplicate, an older id, and 2^53.5.0 (which numbers would take for a later one).
        for id in ("6.0.0", "6.0.0", "5.9.9", f"{TWO53}.0.0", f"{TWO53 + 1}.0.0", f"{TWO53}.5.0", f"{TWO53 + 1}.0.1"):
            await ws.send_json(change(id, f"at {id}"))
        await ws.send_json({"type": "resync_required", "collection": "posts"})
        await ws.send_json({"type": "resync_required", "collection": "posts", "id": "7.0.0"})  # before: dropped
        await ws.close(code=1013, message=b"Slow consumer")

    async def second(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        request = await _request(messages)
        assert request["since"] == f"{TWO53 + 1}.0.1", request  # after the last event it delivered, exactly
        await ws.send_json(
            {"status": "subscribed", "type": "subscribed", "collection": "posts", "id": request["since"]}
        )
        await ws.close(code=1001, message=b"Server shutting down")  # before its first event

    async def third(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        request = await _request(messages)
        assert request["since"] == f"{TWO53 + 1}.0.1", request
        await ws.send_json(
            {"status": "subscribed", "type": "subscribed", "collection": "posts", "id": f"{TWO53 + 1}.0.1"}
        )
        await ws.send_json(change(f"{TWO53 + 1}.0.1", "again"))
        await ws.send_json(change(f"{TWO53 + 2}.0.0", "after"))
        await _request(messages, "unsubscribe")  # the page unsubscribes once it has "after"
        await ws.send_json(change(f"{TWO53 + 3}.0.0", "after unsubscribing"))
        await ws.send_json({"type": "heartbeat", "timestamp": "2026-01-17T12:34:56.789Z"})

    async with fake_bridge(first, second, third) as fake, page(tmp_path, fake.port, cross_origin=True) as p:
        await p.start(options={"token": token(), "minReconnectDelay": 10}, subscribe={"operations": ["create"]})
        await p.browser.until("window.events.some((e) => e.data && e.data.title === 'after')")
        assert await p.browser.evaluate("window.sub.lastId") == f"{TWO53 + 2}.0.0"
        await p.browser.evaluate("window.sub.unsubscribe()")
        await p.browser.until("window.heartbeats.length === 1")  # sent after an event the page must not get
        events = [(e["type"], e.get("id")) for e in await p.events()]
        assert events == [
            ("change", "6.0.0"),
            ("change", f"{TWO53}.0.0"),
            ("change", f"{TWO53 + 1}.0.0"),
            ("change", f"{TWO53 + 1}.0.1"),
            ("resync_required", None),
            ("change", f"{TWO53 + 2}.0.0"),
        ]
        first_event = (await p.events())[0]
        assert {k: first_event[k] for k in ("collection", "op", "timestamp", "data", "old")} == {
            "collection": "posts", "op": "create", "timestamp": "2026-01-17T12:34:56.789Z",
            "data": {"id": 1, "title": "at 6.0.0"}, "old": None,
        }  # fmt: skip
        assert len(fake.received) == 3
        assert await p.browser.evaluate("window.sub.active") is False


@needs_chromium
async def test_a_drop_during_a_snapshot_takes_the_snapshot_again(tmp_path: Path) -> None:
    async def first(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        request = await _request(messages)
        assert request == {"action": "subscribe", "collection": "posts", "snapshot": True, "limit": 10}
        await ws.send_json({"status": "subscribed", "type": "subscribed", "collection": "posts"})
        for n in (1, 2):
            await ws.send_json({"type": "posts.snapshot", "data": {"id": n, "title": "old"}})
        await ws.close(code=1011, message=b"Internal error")

    async def second(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        request = await _request(messages)
        assert request == {"action": "subscribe", "collection": "posts", "snapshot": True, "limit": 10}  # no since
        await ws.send_json({"status": "subscribed", "type": "subscribed", "collection": "posts"})
        await ws.send_json({"type": "posts.snapshot", "data": {"id": 2, "title": "new"}})
        await ws.send_json({"type": "snapshot_end", "collection": "posts", "id": "7.0.0"})
        await ws.send_json({"type": "posts.snapshot", "data": {"id": 3, "title": "late"}})  # not in a snapshot
        await ws.send_json(change("7.0.0", "at the snapshot's position"))  # in the snapshot already
        await ws.send_json(change("7.1.0", "after the snapshot", op="update") | {"data": {"id": 2, "title": "newer"}})
        await ws.close(code=1001, message=b"Server shutting down")

    async def third(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
        request = await _request(messages)
        assert request == {"action": "subscribe", "collection": "posts", "since": "7.1.0"}  # had its snapshot
        await ws.send_json({"status": "subscribed", "type": "subscribed", "collection": "posts", "id": "7.1.0"})
        await ws.send_json(change("8.0.0", "done"))

    async with fake_bridge(first, second, third) as fake, page(tmp_path, fake.port, cross_origin=True) as p:
        await p.start(options={"token": token(), "minReconnectDelay": 10}, subscribe={"snapshot": True, "limit": 10})
        await p.browser.until("window.events.some((e) => e.data && e.data.title === 'done')")
        events = [(e["type"], e.get("id"), (e.get("data") or {}).get("title")) for e in await p.events()]
        assert events == [
            ("snapshot_start", None, None),
            ("snapshot", None, "old"),
            ("snapshot", None, "old"),
            ("snapshot_start", None, None),
            ("snapshot", None, "new"),
            ("snapshot_end", "7.0.0", None),
            ("change", "7.1.0", "newer"),
            ("change", "8.0.0", "done"),
        ]
        assert await p.browser.evaluate("window.table") == {
            "1": {"id": 1, "title": "done"},
            "2": {"id": 2, "title": "newer"},
        }
        assert len(fake.received) == 3


@needs_chromium
async def test_closes_that_retrying_cannot_help_end_the_client_and_the_others_are_retried(tmp_path: Path) -> None:
    def closing(code: int, reason: str) -> Callable[[web.WebSocketResponse, list[dict[str, Any]]], Awaitable[None]]:
        async def script(ws: web.WebSocketResponse, messages: list[dict[str, Any]]) -> None:
            await _request(messages)
            await ws.close(code=code, message=reason.encode())

        return script

    retried = [(1008, "Too many connections for this token"), (1013, "Slow consumer"), (1011, "Internal error"),
               (1001, "Server shutting down"), (1000, "No subscription for 60 s")]  # fmt: skip
    scripts = [closing(code, reason) for code, reason in [*retried, (1009, "Message too big")]]
    async with fake_bridge(*scripts) as fake, page(tmp_path, fake.port, cross_origin=True) as p:
        await p.start(options={"token": token(), "minReconnectDelay": 10})
        detail = await p.until_state("closed")
        assert (detail["code"], detail["reason"]) == (1009, "Message too big")
        assert len(fake.received) == len(scripts)  # one attempt each, and none after the last
        told = [(s["code"], s["reason"]) for s in await p.states() if s["state"] == "reconnecting" and "delay" in s]
        assert told == retried


# -- backoff -------------------------------------------------------------------------------------------------


async def _delays(p: Page, count: int) -> tuple[list[float], list[dict[str, Any]]]:
    """Once the page has made ``count`` WebSocket attempts: how long the client waited before each after
    the first (from the moment it learnt that the previous one failed), and the delays it reported.

    Measured from the failure, not from the previous attempt: Chromium itself holds back its report of
    repeated failed WebSocket connections (up to seconds), as RFC 6455 (7.2.3) suggests."""
    await p.browser.until(f"window.attempts.length >= {count}", timeout=90, what=f"{count} attempts")
    attempts = [a["at"] for a in (await p.attempts())[:count]]
    states = await p.states()
    waited, reported = [], []
    for before, after in itertools.pairwise(attempts):
        failed = next(s for s in states if s["state"] == "reconnecting" and before < s["at"] < after)
        reported.append(next(s for s in states if "delay" in s and before < s["at"] < after))
        waited.append(after - failed["at"])  # the probe and the delay
    return waited, reported


@asynccontextmanager
async def closed_port(tmp_path: Path) -> AsyncIterator[tuple[Page, str]]:
    """A page whose client connects to a port nothing listens on (the module comes from a fake bridge)."""
    async with fake_bridge() as fake, page(tmp_path, fake.port, cross_origin=True) as p:
        yield p, f"ws://127.0.0.1:{free_port()}{protocol.WS_PATH}"


@needs_chromium
async def test_reconnect_delays_grow_are_jittered_and_stop_at_the_cap(tmp_path: Path) -> None:
    async with closed_port(tmp_path) as (p, url):
        await p.start(url=url, options={"token": token(), "minReconnectDelay": 20, "maxReconnectDelay": 320})
        waited, reported = await _delays(p, 18)
    assert [r["attempt"] for r in reported] == list(range(1, 18))
    delays = [r["delay"] for r in reported]
    bounds = [min(320, 20 * 2**k) for k in range(17)]  # attempt n: [0, min(cap, base * 2^(n-1))]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True)), list(zip(delays, bounds, strict=True))
    for wait, delay in zip(waited, delays, strict=True):
        assert delay - 5 <= wait <= delay + 150, (wait, delay)  # what the client waited before the next attempt
    capped = delays[5:]  # attempts 6 to 17: at the cap
    assert len(set(capped)) > 3, f"not jittered: {capped}"
    assert sum(capped) / len(capped) > 60 and max(capped) > 80, f"the delays did not grow past the first: {delays}"


@needs_chromium
async def test_the_default_backoff_is_at_once_then_half_a_second_doubling_to_20_s(tmp_path: Path) -> None:
    async with closed_port(tmp_path) as (p, url):
        module = f"http://127.0.0.1:{p.port}/client.js"
        await p.browser.evaluate(
            f"import({json.dumps(module)}).then((m) => window.formula = [0, 1, 2, 3, 4, 5, 6, 7, 8, 60].map((n) =>"
            " [m.backoff(n, undefined, undefined, () => 0.999999), m.backoff(n, undefined, undefined, () => 0)]))"
        )
        bounds = await p.browser.until("window.formula")
        assert [high for high, _ in bounds] == [0, 500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]
        assert [low for _, low in bounds] == [0] * 10
        await p.start(url=url, options={"token": token()})  # the defaults
        waited, reported = await _delays(p, 3)
        first = (await p.attempts())[0]["at"] - await p.browser.evaluate("window.startedAt")
        assert first < 100, "the first try is not at once"
        assert [r["attempt"] for r in reported] == [1, 2]
        assert 0 <= reported[0]["delay"] <= 500 and 0 <= reported[1]["delay"] <= 1000
        assert all(r["delay"] - 5 <= w <= r["delay"] + 150 for w, r in zip(waited, reported, strict=True))


@needs_chromium
async def test_a_connection_that_stayed_up_reconnects_at_once_one_that_did_not_backs_off(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    port = free_port()
    running = await start_bridge(dsn, port=port)
    async with page(tmp_path, port, cross_origin=True) as p:
        # Live for stableAfter (1.5 s) resets the backoff.
        await p.start(options={"token": token(), "stableAfter": 1500, "minReconnectDelay": 1000})
        live = await p.until_state("live")
        await p.browser.until(f"performance.now() > {live['at']} + 1600", what="the connection to be stable")
        await running.stop()
        detail = await p.until_state("reconnecting")
        assert detail["code"] == 1001 and detail["reason"] == "Server shutting down"
        detail = await p.browser.until("window.states.find((s) => s.state === 'reconnecting' && 'delay' in s)")
        assert (detail["attempt"], detail["delay"]) == (0, 0)  # at once
        count = len(await p.states())
        running = await start_bridge(dsn, port=port)
        live = await p.until_state("live", after=count)
        count = len(await p.states())
        await running.stop()  # not stable yet
        detail = await p.browser.until(
            f"window.states.slice({count}).find((s) => s.state === 'reconnecting' && 'delay' in s)"
        )
        assert detail["at"] - live["at"] < 1500
        assert detail["attempt"] >= 1 and 0 <= detail["delay"] <= 1000 * 2 ** (detail["attempt"] - 1)


# -- tokens ----------------------------------------------------------------------------------------------------


@dataclass
class TokenServer:
    """What a page's ``getToken`` fetches: an application's token endpoint (another origin, with CORS)."""

    ttl: float = 600
    secret: str = SECRET
    expired_first: int = 0
    """How many of the first tokens it hands out are already expired."""
    calls: int = 0
    url: str = ""

    async def mint(self, request: web.Request) -> web.Response:
        self.calls += 1
        ttl = -10 if self.calls <= self.expired_first else self.ttl
        return web.Response(text=token(self.secret, ttl=ttl), headers={"Access-Control-Allow-Origin": "*"})


@asynccontextmanager
async def token_server(**settings: Any) -> AsyncIterator[TokenServer]:
    server = TokenServer(**settings)
    app = web.Application()
    app.router.add_get("/token", server.mint)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/token"
    try:
        yield server
    finally:
        await runner.cleanup()


@needs_chromium
async def test_a_token_that_expires_while_connected_is_refreshed_in_place_through_get_token(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    async with token_server(ttl=3) as tokens, page(tmp_path, running.port) as p:
        await p.start(tokens=tokens.url)  # no token: the first comes from getToken too
        await p.until_state("live")
        (session,) = running.bridge.sessions
        first_exp = session.grant.exp
        await wait_for(lambda: time.time() > first_exp + 2, timeout=10, what="the first token to have expired")
        assert running.bridge.sessions == {session}, "the client reconnected"  # the same connection
        assert session.grant.exp > time.time() and running.bridge.refreshes["accepted"] >= 2
        assert running.bridge.closed["Token expired"] == 0 and running.bridge.refreshes["refused"] == 0
        await insert(dsn, "after the first token expired")
        await p.browser.until("window.events.some((e) => e.data.title === 'after the first token expired')")
        assert [s["state"] for s in await p.states()] == ["connecting", "live"]
        assert len(await p.attempts()) == 1
        assert tokens.calls - 1 - running.bridge.refreshes["accepted"] in (0, 1)  # one call per refresh


@needs_chromium
async def test_over_sse_a_new_token_reopens_the_stream_after_its_position(
    dsn: str, db: asyncpg.Connection, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    """An event stream has no in-band refresh: before the token expires, the client reopens it with the
    new token and since = its position. No row is lost or doubled across the reopenings."""
    running = await start_bridge(dsn)
    stop = asyncio.Event()
    async with token_server(ttl=3) as tokens, page(tmp_path, running.port, cross_origin=True) as p:
        await p.start(tokens=tokens.url, options={"transport": "sse"})
        await p.until_state("live")
        first_exp = next(iter(running.bridge.sessions)).grant.exp
        writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(2)]
        try:
            await wait_for(lambda: time.time() > first_exp + 2, timeout=10, what="the first token to have expired")
        finally:
            stop.set()
            await asyncio.gather(*writers)
        ledger = Ledger()
        ledger.add(await until_marker(p, dsn))
        await ledger.verify(db, "posts")
        streams = await p.attempts("EventSource")
        assert len(streams) >= 3 and tokens.calls >= 3
        assert all("since=" in s["url"] for s in streams[1:])
        assert running.bridge.closed["Token expired"] == 0, "a stream outlived its token"
        assert [s["state"] for s in await p.states()] == ["connecting", "live"]
        assert await p.attempts("WebSocket") == []


@needs_chromium
@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_refused_token_ends_the_client_closed_with_the_reason(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges, transport: str
) -> None:
    running = await start_bridge(dsn)
    kind = "EventSource" if transport == "sse" else "WebSocket"
    async with (
        token_server(secret="not-the-secret-of-this-bridge-at-all!!") as wrong,
        page(tmp_path, running.port) as p,
    ):
        # A token and no getToken: refused once, closed.
        await p.start(options={"token": token(ttl=-10), "transport": transport})
        detail = await p.until_state("closed")
        assert (detail["code"], detail["reason"]) == (1008, "Token expired")
        assert len(await p.attempts(kind)) == 1
        assert [s["state"] for s in await p.states()] == ["connecting", "closed"]
        # getToken: called again once after its token is refused, then closed.
        await p.start(tokens=wrong.url, options={"transport": transport})
        detail = await p.until_state("closed")
        assert (detail["code"], detail["reason"]) == (1008, "Authentication failed")
        assert wrong.calls == 2 and len(await p.attempts(kind)) == 2
        assert [s["state"] for s in await p.states()] == ["connecting", "reconnecting", "closed"]
    async with token_server(expired_first=1) as tokens, page(tmp_path, running.port) as p:
        # getToken's first token is refused (expired); the next is accepted.
        await p.start(tokens=tokens.url, options={"transport": transport})
        await p.until_state("live")
        assert tokens.calls == 2 and len(await p.attempts(kind)) == 2
        assert "closed" not in [s["state"] for s in await p.states()]


@needs_chromium
async def test_a_collection_the_token_may_not_see_reaches_the_callback_as_an_error(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    for transport in ("websocket", "sse"):
        async with page(tmp_path, running.port) as p:
            await p.start(options={"token": token(collections=["other"]), "transport": transport})
            error = await p.browser.until("window.events.find((e) => e.type === 'error')")
            assert error == {"type": "error", "collection": "posts", "at": error["at"],
                             "error": "Collection 'posts' is not published or not allowed for this token"}  # fmt: skip
            assert await p.browser.evaluate("window.sub.active") is False
            if transport == "websocket":
                assert await p.state() == "live"  # the connection is fine; only the subscription ended


# -- the connection limit ----------------------------------------------------------------------------------------


@needs_chromium
@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_at_the_connection_limit_the_client_waits_as_retry_after_says(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges, transport: str
) -> None:
    running = await start_bridge(dsn, max_connections=1)
    kind = "EventSource" if transport == "sse" else "WebSocket"
    holder = await running.connect()  # holds the only slot
    try:
        await wait_for(lambda: len(running.bridge.sessions) == 1, what="the holder to connect")
        # A page of the bridge's origin: it may read the 503's Retry-After.
        async with page(tmp_path, running.port) as p:
            await p.start(options={"token": token(), "transport": transport})
            detail = await p.browser.until("window.states.find((s) => s.retryAfter != null)", what="the refusal")
            assert (detail["state"], detail["status"], detail["retryAfter"]) == ("reconnecting", 503, 5)
            assert 5000 <= detail["delay"] <= 5000 + 500
            await holder.close()
            await wait_for(lambda: not running.bridge.sessions, what="the slot to free")
            live = await p.until_state("live", timeout=30)
            first, second = await p.attempts(kind)  # no attempt in between: it waited
            # (the delay is counted from when the timer was set, a moment before the state was recorded)
            assert second["at"] - detail["at"] >= detail["delay"] - 50
            assert live["at"] - first["at"] >= 5000
            assert running.bridge.closed["Connection limit"] >= 1
    finally:
        await holder.close()


# -- snapshots -------------------------------------------------------------------------------------------------


async def churn(dsn: str, stop: asyncio.Event, seed: int) -> None:
    """Insert, update and delete rows of posts at random until ``stop``."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            top = await conn.fetchval("SELECT max(id) FROM posts") or 1
            what = rng.random()
            if what < 0.4:
                await conn.execute("INSERT INTO posts (title, author_id) VALUES ($1, $2)", f"new {seed}", seed)
            elif what < 0.8:
                await conn.execute("UPDATE posts SET title = title || '+' WHERE id = $1", rng.randint(1, top))
            else:
                await conn.execute("DELETE FROM posts WHERE id = $1", rng.randint(1, top))
            await asyncio.sleep(rng.uniform(0, 0.01))
    finally:
        await conn.close()


@needs_chromium
@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_snapshot_under_concurrent_writes_rebuilds_the_table_even_when_cut_off(
    dsn: str, db: asyncpg.Connection, posts: str, tmp_path: Path, start_bridge: Bridges,
    monkeypatch: pytest.MonkeyPatch, transport: str,
) -> None:  # fmt: skip
    await db.execute("INSERT INTO posts (title, author_id) SELECT 'row ' || g, g % 7 FROM generate_series(1, 3000) g")
    running = await start_bridge(dsn, sse_retry=0.2)
    cut = [300]  # the first snapshot's connection is cut after this many rows
    send_paced = Session.send_paced

    async def cut_once(self: Session, messages: Sequence[protocol.Message]) -> None:
        for message in messages:
            if message.event == "posts.snapshot" and cut[0] >= 0:
                cut[0] -= 1
                if cut[0] < 0:
                    self.transport.abort()
        await send_paced(self, messages)

    monkeypatch.setattr(Session, "send_paced", cut_once)
    stop = asyncio.Event()
    writers = [asyncio.create_task(churn(dsn, stop, i)) for i in range(2)]
    try:
        async with page(tmp_path, running.port, cross_origin=True) as p:
            await p.start(options={"token": token(), "transport": transport}, subscribe={"snapshot": True})
            await p.browser.until("window.events.some((e) => e.type === 'snapshot_end')", timeout=60)
            await p.browser.until("window.events.filter((e) => e.type === 'change').length > 20", timeout=30)
            stop.set()
            await asyncio.gather(*writers)
            await until_marker(p, dsn)
            table = await p.browser.evaluate("window.table")
            kinds = [e["type"] for e in await p.events() if e["type"] != "snapshot" and e["type"] != "change"]
    finally:
        stop.set()
        await asyncio.gather(*writers)
    rows = {
        str(r["id"]): json.loads(r["row"])
        for r in await db.fetch("SELECT id, to_jsonb(p) - 'secret' AS row FROM posts p")
    }
    assert kinds == ["snapshot_start", "snapshot_start", "snapshot_end"]  # cut off, then taken again, whole
    assert len(rows) > 2000 and table == rows


# -- positions across page reloads -----------------------------------------------------------------------------


@needs_chromium
async def test_storage_keeps_each_subscriptions_position_across_page_reloads(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    creates = {"operations": ["create"]}

    async def titles(p: Page) -> list[str]:
        return [e["data"]["title"] for e in await p.changes()]

    async with page(tmp_path, running.port) as p:  # the bridge's origin: its localStorage
        await p.start(options={"token": token()}, storage=True, subscribe=creates)
        await p.until_state("live")
        await insert(dsn, "a", "b")
        await p.browser.until("window.events.length === 2")
        keys = await p.browser.evaluate("Object.keys(localStorage)")
        assert len(keys) == 1 and keys[0].startswith(f"pgbridge:{p.ws_url}:posts:")
        assert await p.browser.evaluate(f"localStorage.getItem({json.dumps(keys[0])})") == (await p.changes())[-1]["id"]

        await p.browser.goto(f"http://127.0.0.1:{running.port}/healthz")  # a reload
        await p.browser.evaluate(HARNESS)
        await insert(dsn, "c", "d")  # while no page listens
        await p.start(options={"token": token()}, storage=True, subscribe=creates)
        await p.browser.until("window.events.length === 2")
        await insert(dsn, "e")
        await p.browser.until("window.events.length === 3")
        assert await titles(p) == ["c", "d", "e"]  # after the stored position: none missed, none twice

        await p.browser.goto(f"http://127.0.0.1:{running.port}/healthz")
        await p.browser.evaluate(HARNESS)
        routed = running.bridge.listener.delivered
        await insert(dsn, "f")  # after the stored position, before the next subscription starts:
        await wait_for(lambda: running.bridge.listener.delivered > routed, what="the bridge to route it")
        other = {"operations": ["create"], "filter": {"title": {"neq": "x"}}}  # other options: a position of its own
        await p.start(options={"token": token()}, storage=True, subscribe=other)
        await p.until_state("live")
        await insert(dsn, "g")
        await p.browser.until("window.events.length === 1")
        assert await titles(p) == ["g"]
        assert len(await p.browser.evaluate("Object.keys(localStorage)")) == 2


# -- the inspector and the package -----------------------------------------------------------------------------


@needs_chromium
async def test_the_inspector_runs_on_client_js_and_drops_the_token_from_its_address(
    dsn: str, posts: str, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    tok = token()
    async with Browser(tmp_path / "profile") as browser:
        await browser.goto(f"http://127.0.0.1:{running.port}/#collection=posts&token={tok}")
        await browser.until("document.getElementById('state').dataset.state === 'live'", what="the inspector")
        assert await browser.evaluate("document.getElementById('state').textContent") == "live"
        address = await browser.evaluate("location.href")
        assert tok not in address and address.endswith("#collection=posts")
        loaded = await browser.evaluate("performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname)")
        assert "/client.js" in loaded
        assert browser.errors == []


def test_the_client_is_an_npm_package_with_its_types() -> None:
    package = json.loads((CLIENT / "package.json").read_text())
    assert {k: package[k] for k in ("name", "type", "main", "types", "license")} == {
        "name": "pgbridge-client", "type": "module", "main": "./client.js", "types": "./client.d.ts", "license": "MIT"
    }  # fmt: skip
    assert package["exports"]["."] == {"types": "./client.d.ts", "default": "./client.js"}
    assert "dependencies" not in package and "devDependencies" not in package
    source, types = (CLIENT / "client.js").read_text(), (CLIENT / "client.d.ts").read_text()
    exported = set(re.findall(r"^export function (\w+)", source, re.M))
    assert exported == {"connect", "backoff", "compareIds"}
    assert exported == set(re.findall(r"^export function (\w+)", types, re.M))
    assert not re.search(r"^\s*(import|export) .* from ", source, re.M)  # no dependencies
    node = shutil.which("node")
    if node is not None:  # the module loads as ES module outside a browser too
        done = subprocess.run(
            [node, "--input-type=module", "-e",
             "const m = await import('./client.js'); console.log(Object.keys(m).sort().join(','), "
             "m.compareIds('9007199254740993.0.0', '9007199254740992.9.9'))"],
            cwd=CLIENT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.stdout.split() == ["backoff,compareIds,connect", "1"], done.stderr


async def test_the_bridge_serves_the_package_s_module_to_any_origin(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    url = f"http://127.0.0.1:{running.port}/client.js"
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Origin": "null"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/javascript"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert await resp.read() == (CLIENT / "client.js").read_bytes()

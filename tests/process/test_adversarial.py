"""Hostile clients: one token must not be able to freeze, flood or probe the bridge.

The heavy cases run the bridge as its own process, as in production, so that its event loop and its
memory are measured apart from the many clients attacking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import jwt
import pytest
import websockets

from tests.helpers import (
    SECRET,
    BridgeProcess,
    RunningBridge,
    assert_silent,
    close_frame,
    collect,
    http_get,
    metric,
    raw_upgrade,
    recv,
    send,
    subscribe,
    token,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes

POSTS = """CREATE TABLE posts (id bigserial PRIMARY KEY, title text, author_id int,
                               created_at timestamptz DEFAULT now(), account text);
           SELECT pgbridge.publish('posts')"""


@pytest.fixture
async def process(dsn: str, db: asyncpg.Connection, bridge_process: Processes) -> BridgeProcess:
    await db.execute(POSTS)
    bridge = bridge_process(dsn)
    await bridge.ready()
    return bridge


HEALTH_WATCH = """
import sys, time, urllib.request
url, slowest = sys.argv[1], 0.0
while True:
    started = time.monotonic()
    urllib.request.urlopen(url, timeout=30).read()
    slowest = max(slowest, time.monotonic() - started)
    print(slowest, flush=True)
    time.sleep(0.1)
"""


class HealthWatch:
    """Polls /healthz all along from a process of its own (not held up by this one), keeps the slowest.
    A request that fails, or goes unanswered for 30 s, ends the watch."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HEALTH_WATCH, f"http://127.0.0.1:{port}/healthz"], stdout=subprocess.PIPE, text=True
        )

    def stop(self) -> float:
        """The slowest answer; fails if any request failed."""
        failed = self.proc.poll() is not None
        self.proc.terminate()
        lines = self.proc.communicate()[0].split()
        assert not failed and lines, f"/healthz went unanswered (the watch ended with {self.proc.returncode})"
        return float(lines[-1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def _connect_many(url: str, count: int, **kwargs: Any) -> list[Any]:
    sockets = []
    for start in range(0, count, 100):
        sockets += await asyncio.gather(
            *(websockets.connect(url, **kwargs) for _ in range(start, min(count, start + 100)))
        )
    return sockets


async def test_costly_filters_from_many_connections_do_not_freeze_the_bridge(
    process: BridgeProcess, db: asyncpg.Connection
) -> None:
    """A thousand subscriptions with a 100-value filter cost the routing of a change next to nothing (one
    shared evaluation, through the index), so the bridge keeps answering. How fast is the benchmark's
    matter (its broad filters section); here, the work done is counted."""
    count = int(os.environ.get("PGBRIDGE_FLOOD_CONNECTIONS", "1000"))
    stamps = [f"2026-01-01T{h:02d}:{m:02d}:00+00:00" for h in range(10) for m in range(10)]
    flt = {"created_at": {"in": stamps}}
    health = HealthWatch(process.port)
    clients = []
    try:
        # many subjects: each token stays under its own connection limit
        for group in range(0, count, 50):
            clients += await _connect_many(process.url(token(sub=f"attacker{group}")), 50)
        for ws in clients:
            await send(ws, {"action": "subscribe", "collection": "posts", "filter": flt})
        for ws in clients:
            assert (await recv(ws))["status"] == "subscribed"
        async with websockets.connect(process.url(token())) as honest:
            await subscribe(honest, "posts", filter={"title": "marker"})
            await db.execute("INSERT INTO posts (title) SELECT 'row ' || g FROM generate_series(1, 100) g")
            started = time.monotonic()
            await db.execute("INSERT INTO posts (title) VALUES ('marker')")
            assert (await recv(honest))["data"]["title"] == "marker"
            marker = time.monotonic() - started
            metrics = (await http_get(process.port, "/metrics"))[1]
            evaluated = metric(metrics, "pgbridge_filter_conditions_evaluated_total")
    finally:
        slowest = health.stop()
        for ws in clients:
            await ws.close()
    print(f"\n{len(clients)} connections with 100-value filters: marker after {marker * 1000:.0f} ms, "
          f"slowest /healthz {slowest * 1000:.0f} ms, {evaluated:.0f} conditions evaluated")  # fmt: skip
    assert evaluated < 101 * 10, "the 101 rows cost an evaluation per subscriber: filters neither shared nor indexed"


async def test_resumes_for_clients_that_already_left_are_dropped(
    process: BridgeProcess, db: asyncpg.Connection
) -> None:
    await db.execute("INSERT INTO posts (title) SELECT repeat('x', 500) FROM generate_series(1, 6500)")
    first = await db.fetchval("SELECT min(id) FROM pgbridge.changes")
    before = _rss(process.proc.pid)
    ghosts = await _connect_many(process.url(token(sub="ghost")), 95)
    ghosts += await _connect_many(process.url(token(sub="ghost2")), 95)
    ghosts += await _connect_many(process.url(token(sub="ghost3")), 95)
    for ws in ghosts:
        await send(ws, {"action": "subscribe", "collection": "posts", "since": f"{first}.0"})
    for ws in ghosts:
        ws.transport.abort()  # a reset, without reading a single event
    peak = _rss(process.proc.pid)
    started = time.monotonic()
    async with websockets.connect(process.url(token()), max_size=None) as honest:
        await subscribe(honest, "posts", since=f"{first}.0")
        first_event = await recv(honest, 2)
        answered = time.monotonic() - started
        assert first_event["data"]["id"] == 2
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"http://127.0.0.1:{process.port}/healthz") as resp:
                body = await resp.json()
            if body["clients"] == 0 and body["catching_up"] == 0:
                break
            await asyncio.sleep(0.1)
    peak = max(peak, _rss(process.proc.pid))
    print(f"\n{len(ghosts)} resumes reset at once: a real since answered in {answered * 1000:.0f} ms, "
          f"RSS {before / 2**20:.0f} -> {peak / 2**20:.0f} MiB")  # fmt: skip
    assert (body["clients"], body["catching_up"]) == (0, 0), "ghost clients remained"
    assert peak - before < 200 * 2**20


async def test_connection_limits_shed_with_503_and_health_still_answers(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    await db.execute(POSTS)

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    bridge = bridge_process(dsn, env={"PGBRIDGE_MAX_CONNECTIONS_PER_SUBJECT": "1000"}, preexec=few_files)
    proc = bridge.proc
    clients: list[Any] = []
    refused = 0
    try:
        await bridge.ready()
        for _ in range(250):  # more than 200 descriptors allow
            try:
                clients.append(await websockets.connect(bridge.url(token())))
            except websockets.InvalidStatus as exc:
                assert exc.response.status_code == 503
                assert b"connection limit" in exc.response.body
                refused += 1
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bridge.port}/healthz") as resp:
            assert resp.status == 200
    finally:
        for ws in clients:
            await ws.close()
    proc.kill()
    log = proc.communicate()[0].decode()
    assert refused >= 50 and len(clients) >= 100
    assert len(log.splitlines()) < 20, log[-2000:]  # one line for the limit, not one per attempt


async def test_connections_per_token_and_filter_costs_are_limited(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, max_connections_per_subject=3, max_filter_cost=150,
                                 max_filter_cost_per_subject=250)  # fmt: skip
    clients = [await running.connect(token(sub="eve")).__aenter__() for _ in range(3)]
    async with running.connect(token(sub="eve")) as fourth:
        assert await close_frame(fourth) == (1008, "Too many connections for this token")
    async with running.connect(token(sub="bob")) as other:
        await subscribe(other, "posts")  # another subject is not affected
    big = {"author_id": {"in": list(range(100))}}
    await subscribe(clients[0], "posts", filter=big)
    await send(clients[0], {"action": "subscribe", "collection": "posts", "filter": {**big, "title": {"in": list(
        map(str, range(60)))}}})  # fmt: skip
    assert (await recv(clients[0]))["error"] == "Filters too complex: at most 150 conditions per connection"
    await subscribe(clients[1], "posts", filter=big)
    await send(clients[2], {"action": "subscribe", "collection": "posts", "filter": big})
    assert (await recv(clients[2]))["error"] == "Filters too complex: at most 250 conditions per token"
    await clients[1].close()
    await wait_for(lambda: len(running.bridge.sessions) == 2, what="a connection to go")
    await subscribe(clients[2], "posts", filter=big)  # what a closed connection spent is returned
    for ws in clients:
        await ws.close()


async def test_idle_connections_can_be_closed(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, idle_timeout=1)
    async with running.connect() as idle, running.connect() as busy:
        await subscribe(busy, "posts")
        assert await close_frame(idle, timeout=5) == (1000, "No subscription for 1s")
        await send(busy, {"action": "ping"})
        assert (await recv(busy))["type"] == "pong"


async def test_replays_wait_their_turn_and_all_complete(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    await db.execute("INSERT INTO posts (title) SELECT 'r' || g FROM generate_series(1, 3000) g")
    first = await db.fetchval("SELECT min(id) FROM pgbridge.changes")
    running = await start_bridge(dsn, max_replays=1, history_bytes=1024)
    clients = [await running.connect().__aenter__() for _ in range(20)]
    try:
        for ws in clients:
            await subscribe(ws, "posts", since=f"{first}.0")
        # One replay at a time: the last client's turn comes after 19 others', however long they take.
        results = await asyncio.gather(*(collect(ws, 2999, timeout=120) for ws in clients))
        wanted = [f"r{g}" for g in range(2, 3001)]  # everything after the first change, in order
        assert all([e["data"]["title"] for e in r] == wanted for r in results)
        await asyncio.gather(*(assert_silent(ws, 0.5) for ws in clients))  # and nothing twice
    finally:
        for ws in clients:
            await ws.close()


async def test_an_empty_grant_denies_even_beside_a_wildcard(bridge: RunningBridge) -> None:
    async with bridge.connect(token(collections={"posts": [], "*": "*"})) as ws:
        await send(ws, {"action": "subscribe", "collection": "posts"})
        assert (await recv(ws))["error"] == "Collection 'posts' is not published or not allowed for this token"


async def test_forbidden_and_unpublished_collections_look_the_same(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE secrets (id int); SELECT pgbridge.publish('secrets')")
    await wait_for(lambda: "secrets" in (bridge.bridge.publications or ()), what="the bridge to learn of secrets")
    async with bridge.connect(token(collections=["posts"])) as ws:
        await send(ws, {"action": "subscribe", "collection": "secrets"})
        forbidden = (await recv(ws))["error"]
        await send(ws, {"action": "subscribe", "collection": "nothing"})
        missing = (await recv(ws))["error"]
    assert forbidden.replace("secrets", "X") == missing.replace("nothing", "X")


async def test_tenants_are_compared_exactly(dsn: str, db: asyncpg.Connection, start_bridge: Bridges) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn, tenant_claim="account", tenant_column="account")
    async with running.connect(token(account="2024-01-01T00:00:00Z")) as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title, account) VALUES ('other', '2024-01-01T01:00:00+01:00')")
        await db.execute("INSERT INTO posts (title, account) VALUES ('mine', '2024-01-01T00:00:00Z')")
        assert [e["data"]["title"] for e in await collect(ws, 1)] == ["mine"]
        await assert_silent(ws, 0.5)  # not 'other', which the listener read first
    for claim in ([1, 2], {"a": 1}):
        async with running.connect(token(account=claim)) as ws:
            assert await close_frame(ws) == (1008, "Invalid account claim: must be a string, number or boolean")


async def test_health_does_not_show_database_details_while_it_is_down(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    bad = dsn.replace("postgres:@", "nosuchrole_4711:@")
    running = await start_bridge(bad, wait=False)  # the listener cannot log in: the error names the role
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{running.port}/healthz") as resp:
        assert resp.status == 503
        text = await resp.text()
    assert "nosuchrole" not in text and "/tmp" not in text and "socket" not in text
    await wait_for(lambda: "nosuchrole_4711" in str(running.bridge.listener.problem), what="the cause")


@pytest.mark.parametrize(
    "since", ["9223372036854775808.0", "99999999999999999999.0", "\u0665.0", "1.\u0665", "1.1000", "1.-1"]
)
async def test_out_of_range_and_non_ascii_since_are_invalid(
    bridge: RunningBridge, since: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with bridge.connect() as ws:
        await send(ws, {"action": "subscribe", "collection": "posts", "since": since})
        assert (await recv(ws))["error"] == 'Invalid since: expected the "id" of an event, such as "12.3456.0"'
        await subscribe(ws, "posts")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_absurd_expiry_times_do_not_crash_the_handshake(bridge: RunningBridge) -> None:
    huge = jwt.encode({"sub": "u", "exp": 10**400, "collections": "*"}, SECRET, algorithm="HS256")
    async with bridge.connect(huge) as ws:
        await subscribe(ws, "posts")  # valid, signed, and very long-lived: accepted
    for exp in ("1e400", "-1e400", "NaN", '"soon"', "true"):
        forged = _hs256('{"sub": "u", "collections": "*", "exp": ' + exp + "}")
        async with bridge.connect(forged) as ws:
            assert (await close_frame(ws))[0] == 1008


def _hs256(payload: str) -> str:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload.encode())
    return (signing_input + b"." + b64(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())).decode()


async def test_handshakes_reset_before_the_reply_are_not_worth_a_traceback(
    bridge: RunningBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """300 of them once wrote 4,500 lines of aiohttp's `RuntimeError: Call .prepare() first`."""
    caplog.set_level(logging.DEBUG)
    tok = token()
    request = (
        f"GET /api/v1/realtime/ws?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    async def reset() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(request)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, before the server can answer

    await asyncio.gather(*(reset() for _ in range(300)))
    await wait_for(lambda: bridge.bridge.handshakes == 0 and not bridge.bridge.sessions, what="the handshakes to end")
    async with bridge.connect() as ws:  # the server is fine
        await subscribe(ws, "posts")
    noisy = [r for r in caplog.records if r.name.startswith(("aiohttp", "pgbridge")) and r.levelno >= logging.INFO
             and r.name != "pgbridge.listener"]  # fmt: skip  # it may take the ticks only now, on a busy machine
    assert noisy == []
    about = [r for r in caplog.records if "during its WebSocket upgrade" in r.getMessage()]
    assert len(about) <= 1  # at most one line a minute, at DEBUG
    assert not any(r.exc_info for r in caplog.records)


async def test_unmasked_client_frames_close_with_1002(bridge: RunningBridge) -> None:
    reader, writer = await raw_upgrade(bridge.port, token())
    message = b'{"action": "ping"}'
    writer.write(bytes((0x81, len(message))) + message)  # mask bit not set
    frame = await asyncio.wait_for(reader.read(2), 5)
    assert frame[0] == 0x88  # a close frame...
    body = await reader.readexactly(frame[1])
    assert struct.unpack("!H", body[:2])[0] == 1002  # ...with 1002
    writer.close()


async def test_no_token_or_secret_is_ever_logged(
    dsn: str, posts: str, caplog: pytest.LogCaptureFixture, start_bridge: Bridges
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start_bridge(dsn)
    good, expired, wrong = token(), token(ttl=-60), token(secret="another-secret-another-secret-another!")
    for tok in (good, expired, wrong):
        for how in ("query", "bearer", "bare"):
            kwargs: dict[str, Any] = {}
            url = running.url(tok) if how == "query" else running.url()
            if how != "query":
                kwargs["subprotocols"] = ["bearer", tok] if how == "bearer" else [tok]
            try:
                async with websockets.connect(url, **kwargs) as ws:
                    await send(ws, {"action": "subscribe", "collection": "posts"})
                    await asyncio.wait_for(ws.recv(), 1)
            except (websockets.ConnectionClosed, websockets.InvalidHandshake, TimeoutError):
                pass
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(f"GET /api/v1/realtime/ws?token={good} HTTP/1.1\r\n\r\n".encode())  # not an upgrade
        await reader.read()
    finally:
        writer.close()
    await running.stop()  # what shutting down logs is checked too
    server_side = [r for r in caplog.records if not r.name.startswith("websockets")]  # not the test's own client
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") + str(r.args) for r in server_side)
    assert logged  # debug logging did run
    for secret in (good, expired, wrong, SECRET, good.split(".")[2], good.split(".")[1]):
        assert secret not in logged


async def test_clients_written_for_snackbase_see_their_confirmations(bridge: RunningBridge) -> None:
    async with bridge.connect() as ws:
        await send(ws, {"action": "subscribe", "collection": "posts"})
        reply = await recv(ws)
        assert reply["type"] == "subscribed"  # what SnackBase's server sends and its SDK waits for
        assert reply["status"] == "subscribed"  # what its documentation shows
        await send(ws, {"action": "unsubscribe", "collection": "posts"})
        reply = await recv(ws)
        assert (reply["type"], reply["status"]) == ("unsubscribed", "unsubscribed")


async def test_filters_that_defeat_the_index_cost_their_subjects_not_everyone(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """Broad bounds make every row evaluate every such filter. Past --routing-budget the subjects whose
    filters cost most are fed from the change log: others stay live, and nobody loses a row."""
    await db.execute(POSTS)
    running = await start_bridge(dsn, routing_budget=2_000)
    # The only numeric bound is the broad one, so the index takes it: every row is a candidate.
    broad = {"id": {"lt": 1e15}, "title": {"gte": "t9"}}
    async with contextlib.AsyncExitStack() as stack:
        attackers = [await stack.enter_async_context(running.connect(token(sub=f"mallory{s}")))
                     for s in range(5) for _ in range(4)]  # fmt: skip
        for i, ws in enumerate(attackers):
            await subscribe(ws, "posts", filter={**broad, "author_id": {"neq": -i}})
        async with running.connect(token(sub="alice")) as honest:
            await subscribe(honest, "posts", filter={"author_id": {"lt": 10}})
            await db.execute("INSERT INTO posts (title, author_id) SELECT 't' || g, g FROM generate_series(1, 100) g")
            got = await collect(honest, 9)
            assert [e["data"]["author_id"] for e in got] == list(range(1, 10))
            for ws in attackers:  # every row they asked for, once, in order: titles t9, t90..t99
                assert [e["data"]["author_id"] for e in await collect(ws, 11)] == [9, *range(90, 100)]
                await assert_silent(ws, 0.05)
        # 61 conditions a row, 2,000 for the statement: the four costliest subjects (12 conditions each) go,
        # the fifth and alice (1) stay live.
        assert running.bridge.router.deferred == 16

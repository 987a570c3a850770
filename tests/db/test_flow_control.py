"""Clients that fall behind are fed from the change log, not dropped; dead and silent peers are closed."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import websockets

from pgbridge import changelog
from tests.db.test_recovery import POSTS, listener_pid, write_for
from tests.helpers import (
    Ledger,
    RunningBridge,
    health,
    raw_upgrade,
    recv,
    small_receive_buffer,
    subscribe,
    token,
    until_quiet,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes

FLOOD = "INSERT INTO posts (title) SELECT repeat('q', 20000) FROM generate_series(1, 100)"


async def test_a_burst_reaches_a_client_reading_at_full_speed(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        for _ in range(6):  # about 12 MB of rows, far past the client's 1 MiB
            await db.execute(FLOOD)
        events = await until_quiet(ws, 2)
        assert [e["data"]["id"] for e in events] == list(range(1, 601))
        assert all(len(e["data"]["title"]) == 20000 for e in events)
        await ws.send('{"action": "ping"}')
        assert (await recv(ws))["type"] == "pong"  # still open
    assert running.bridge.closed["Slow consumer"] == 0


def _age(event: dict[str, Any]) -> float:
    return time.time() - datetime.fromisoformat(event["timestamp"]).timestamp()


async def test_a_throttled_client_gets_everything_once_in_order_and_others_are_not_held_up(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    seconds = float(os.environ.get("PGBRIDGE_THROTTLE_SECONDS", "6"))  # 30 for the longer run by hand
    running = await start_bridge(dsn, outbound_limit=64 * 1024, history_bytes=256 * 1024)
    slow_ledger, fast_ledger, stop = Ledger(), Ledger(), asyncio.Event()
    fast_ages: list[float] = []
    async with running.connect(max_queue=1) as slow, running.connect() as fast:
        small_receive_buffer(slow)
        await subscribe(slow, "posts")
        await subscribe(fast, "posts")

        async def read_fast() -> None:
            while not fast_ledger.received or fast_ledger.received[-1]["data"]["title"] != "end":
                event = await recv(fast, 10)
                fast_ages.append(_age(event))
                fast_ledger.add([event])

        async def read_slowly() -> None:
            while not stop.is_set():
                slow_ledger.add([await recv(slow, 10)])
                await asyncio.sleep(0.003)  # a fraction of the write rate

        fast_reader = asyncio.create_task(read_fast())
        slow_reader = asyncio.create_task(read_slowly())
        writers = [asyncio.create_task(write_for(dsn, stop, i, pad=2000)) for i in range(4)]
        behind = 0  # the most clients seen catching up while the writers run
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            behind = max(behind, len(running.bridge.feeds))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*writers)
        await db.execute("INSERT INTO posts (title) VALUES ('end')")
        await fast_reader
        slow_reader.cancel()
        slow_ledger.add(await until_quiet(slow, 2))  # now at full speed
    await fast_ledger.verify(db, "posts")
    await slow_ledger.verify(db, "posts")
    assert behind >= 1, "the slow client was expected to be catching up while the writers ran"
    assert running.bridge.catchup_reads > 0  # it went past the history window, to the change log
    p99 = statistics.quantiles(fast_ages, n=100)[98]
    print(f"\nfast client: {len(fast_ages)} events, latency p50 {statistics.median(fast_ages) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms beside a client catching up")  # fmt: skip
    assert p99 < 5, "the fast client was held up"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def test_a_client_that_stops_reading_costs_its_budget_then_is_closed_and_resumes(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    await db.execute(POSTS)
    bridge = bridge_process(dsn, env={"PGBRIDGE_HISTORY_BYTES": str(1 << 20), "PGBRIDGE_STALL_TIMEOUT": "3"})
    await bridge.ready()
    url = bridge.url(token())
    async with websockets.connect(url, max_size=None) as reader, websockets.connect(url, max_queue=1) as stalled:
        await subscribe(reader, "posts")
        await subscribe(stalled, "posts")
        await db.execute(FLOOD)  # a first burst: the stalled client's buffers fill up
        ledger = Ledger()
        ledger.add(await until_quiet(reader, 1))
        before = _rss(bridge.proc.pid)
        for _ in range(24):  # about 50 MB more
            await db.execute(FLOOD)
            ledger.add(await until_quiet(reader, 0.3))
        grown = _rss(bridge.proc.pid) - before
        # A client that reads nothing does not take the close frame either: after --close-timeout the
        # server drops the connection. Either way it is gone, and the log says why.
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await stalled.recv()
        assert closed.value.rcvd is None or (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            1013,
            "Slow consumer",
        )
        last = ledger.received[50]["id"]
    async with websockets.connect(url, max_size=None) as again:
        await subscribe(again, "posts", since=last)
        resumed = await until_quiet(again, 1)
    assert [e["data"]["id"] for e in resumed] == list(range(52, 2501))
    assert len(ledger.received) == 2500
    bridge.proc.kill()
    log = bridge.proc.communicate()[0].decode()
    assert "closing a client that took no data for 3s" in log
    print(f"\nserver RSS grew {grown / 2**20:.1f} MiB while 50 MB flowed past a client that read nothing")
    assert grown < 24 * 2**20


async def flood_until_behind(db: asyncpg.Connection, running: RunningBridge) -> int:
    """Write 2 MB bursts until the bridge feeds a client from the log; return how many rows were written."""
    for n in range(1, 40):
        await db.execute(FLOOD)
        await asyncio.sleep(0.05)  # paces the writer: the bridge routes one burst before the next comes
        if running.bridge.feeds:
            return 100 * n
    raise AssertionError("no client fell behind")


async def test_catching_up_survives_a_listener_reconnect_and_pruning(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn, probe_interval=0.5, history_bytes=64 * 1024, outbound_limit=64 * 1024)
    async with running.connect(max_queue=1) as slow:
        small_receive_buffer(slow)
        await subscribe(slow, "posts")
        written = await flood_until_behind(db, running)
        pid = await listener_pid(dsn)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        await db.execute(FLOOD)
        await wait_for(lambda: running.bridge.listener.reconnects > 0, what="the listener to reconnect")
        events = await until_quiet(slow, 2)
        assert [e["data"]["id"] for e in events] == list(range(1, written + 101))

        # Behind again, by more than one read of the log, and this time the log is pruned under it.
        more = await flood_until_behind(db, running)
        for _ in range(6):
            await db.execute(FLOOD)
        more += 600
        removed = await changelog.prune(db, max_age=0, max_transactions=1)
        assert removed > 0
        rest = await until_quiet(slow, 2)
        assert rest[0]["data"]["id"] == written + 101
        assert {"type": "resync_required", "collection": "posts"} in rest
        assert len(rest) < more  # what was pruned was not delivered...
        await db.execute("INSERT INTO posts (title) VALUES ('live again')")
        assert (await recv(slow))["data"]["title"] == "live again"  # ...and then it carries on live


async def test_a_peer_that_does_not_answer_pings_is_closed(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, ping_interval=0.5)
    reader, writer = await raw_upgrade(running.port, token())
    try:
        await wait_for(lambda: len(running.bridge.sessions) == 1, what="the connection")
        started = time.monotonic()
        # the peer answers no ping (it reads, but never writes): what a half-open connection looks like
        drained = asyncio.create_task(reader.read())
        await wait_for(lambda: not running.bridge.sessions, timeout=10, what="the silent peer to be closed")
        assert time.monotonic() - started < 3
        await asyncio.wait_for(drained, 5)  # and the server closed the socket
    finally:
        writer.close()


async def test_a_peer_that_answers_pings_stays(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, ping_interval=0.2)
    async with running.connect() as ws:  # the websockets library answers pings by itself
        await subscribe(ws, "posts")
        await asyncio.sleep(2)  # ten intervals
        conn = await asyncpg.connect(dsn)
        await conn.execute("INSERT INTO posts (title) VALUES ('still here')")
        await conn.close()
        assert (await recv(ws))["data"]["title"] == "still here"
        assert running.bridge.closed["No answer to ping"] == 0


async def test_connections_that_do_not_complete_the_upgrade_are_closed(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn, handshake_timeout=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(b"GET /api/v1/realtime/ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - started < 5
    finally:
        writer.close()


async def watch_lag(ws: Any, port: int, written: int) -> list[tuple[int, int]]:
    """Read ``ws`` to the end, a frame at a time, asking /healthz after each; return (received, lag events)."""
    seen: list[tuple[int, int]] = []
    received = 0
    while received < written:
        body = await health(port)
        if body["catching_up"]:
            [entry] = body["furthest_behind"]
            assert entry["collection"] == "posts" and body["catch_up_lag_events"] == entry["lag_events"]
            seen.append((received, entry["lag_events"]))
        await recv(ws)
        received += 1
    return seen


def held_back(running: RunningBridge) -> bool:
    """Whether a client is being caught up, counted, and sent nothing more for now: what waits for it
    fills asyncio's write buffer past its high-water mark (half the outbound limit), so writing to it is
    paused until it reads."""
    bridge = running.bridge
    high = bridge.settings.outbound_limit // 2
    return any(feed.lag is not None for feed in bridge.feeds) and all(
        session.transport.buffered() > high for session in bridge.sessions if session.feeds
    )


async def test_health_reports_clients_catching_up(dsn: str, db: asyncpg.Connection, start_bridge: Bridges) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn, outbound_limit=64 * 1024, history_bytes=64 * 1024)
    async with running.connect(max_queue=1) as slow:
        small_receive_buffer(slow)
        await subscribe(slow, "posts")
        before = running.bridge.frames_sent
        written = await flood_until_behind(db, running)
        # The kernel's send buffer, autotuned, may take what is left of a burst: write on until the server
        # itself must wait for the client.
        for _ in range(20):
            if held_back(running):
                break
            await db.execute(FLOOD)
            written += 100
            await asyncio.sleep(0.2)
        await wait_for(lambda: held_back(running), what="the slow client to be held back")
        await asyncio.sleep(1.1)  # the time passing is what is tested: the rows waiting grow a second old
        assert held_back(running)  # it reads nothing, so nothing more was sent meanwhile
        body = await health(running.port)
        assert body["catching_up"] == 1
        assert body["catch_up_lag_seconds"] >= 1  # the row it waits to send was written over a second ago
        assert body["furthest_behind"][0]["lag_seconds"] >= 1
        # It reads nothing, so the server waits to send more: every row not yet sent is counted.
        assert body["catch_up_lag_events"] == written - (running.bridge.frames_sent - before) > 0
        seen = await watch_lag(slow, running.port, written)
        assert seen and all(lag <= written - received for received, lag in seen)
        assert [lag for _, lag in seen] == sorted((lag for _, lag in seen), reverse=True)
        body = await health(running.port)
        assert (body["catching_up"], body["catch_up_lag_events"]) == (0, 0) and "furthest_behind" not in body


async def test_health_counts_the_lag_of_a_client_resuming_from_far_back(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn, outbound_limit=64 * 1024, history_bytes=64 * 1024)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        for _ in range(6):
            await db.execute(FLOOD)
        events = await until_quiet(ws, 1)
        assert len(events) == 600
    async with running.connect(max_queue=1) as again:
        small_receive_buffer(again)
        await subscribe(again, "posts", since=events[0]["id"])
        before = running.bridge.frames_sent
        await wait_for(lambda: held_back(running), what="the resuming client to be counted and held back")
        # Counted in the database (the history holds only the last few rows), less what was sent.
        body = await health(running.port)
        assert body["catch_up_lag_events"] == 599 - (running.bridge.frames_sent - before) > 0
        seen = await watch_lag(again, running.port, 599)
        assert seen and all(lag <= 599 - received for received, lag in seen)
        assert [lag for _, lag in seen] == sorted((lag for _, lag in seen), reverse=True)
        body = await health(running.port)
        assert body["catch_up_reads"] > 0 and body["catch_up_reads_per_second"] > 0

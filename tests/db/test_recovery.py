"""No lost changes: listener loss, PostgreSQL restarts, client resume, bridge crashes, retention."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import pytest
import websockets

from pgbridge import changelog
from pgbridge.client import Client
from pgbridge.errors import Pruned
from pgbridge.events import MAX_ID
from pgbridge.migrate import migrate
from pgbridge.protocol import WS_PATH
from tests.helpers import (
    Cluster,
    Ledger,
    close_frame,
    free_port,
    recv,
    subscribe,
    token,
    until_quiet,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes

POSTS = "CREATE TABLE posts (id bigserial PRIMARY KEY, title text); SELECT pgbridge.publish('posts')"


async def write_for(dsn: str, stop: asyncio.Event, writer: int, *, long_tx: bool = False, pad: int = 0) -> int:
    """Commit, roll back and interleave transactions until ``stop``; survive a database that goes away."""
    rng = random.Random(writer)
    done = 0
    conn: asyncpg.Connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn)
            async with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    await conn.execute(
                        "INSERT INTO posts (title) SELECT $1 || '-' || g || repeat('x', $3)"
                        " FROM generate_series(1, $2) g",
                        f"w{writer}",
                        rng.randint(1, 5),
                        pad,
                    )
                if long_tx:
                    await asyncio.sleep(rng.uniform(0.05, 0.3))  # overlaps many other commits
                if rng.random() < 0.2:
                    raise _Rollback
            done += 1
        except _Rollback:
            pass
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn = None
            await asyncio.sleep(0.1)  # the database is away: try again shortly
        await asyncio.sleep(rng.uniform(0, 0.01))  # paces the writer, at random: commits interleave
    if conn is not None and not conn.is_closed():
        await conn.close()
    return done


class _Rollback(Exception):
    pass


async def drain(ws: Any, ledger: Ledger, until: asyncio.Event) -> None:
    while True:
        try:
            ledger.add([await recv(ws, 2)])
        except TimeoutError:
            if until.is_set():
                return


async def listener_pid(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        pid: int | None = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'pgbridge-listener' AND datname = current_database()"
        )
        return pid
    finally:
        await conn.close()


async def test_listener_killed_repeatedly_while_writers_overlap(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn, probe_interval=0.5)
    ledger, stop, finished = Ledger(), asyncio.Event(), asyncio.Event()
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        reader = asyncio.create_task(drain(ws, ledger, finished))
        writers = [asyncio.create_task(write_for(dsn, stop, i, long_tx=i == 0)) for i in range(4)]
        kills = 0
        # PGBRIDGE_SOAK_KILLS=N makes this a longer run by hand (about 2 s per kill)
        for _ in range(int(os.environ.get("PGBRIDGE_SOAK_KILLS", "6"))):
            await asyncio.sleep(0.4 if kills < 6 else 2)  # the writers commit this long between two kills
            await wait_for(lambda: running.bridge.listener.connected, what="listener to reconnect")
            pid = await listener_pid(dsn)
            if pid is not None and await db.fetchval("SELECT pg_terminate_backend($1)", pid):
                kills += 1
        stop.set()
        commits = sum(await asyncio.gather(*writers))
        await wait_for(lambda: running.bridge.listener.connected, what="listener to reconnect")
        rows = await db.fetchval("SELECT count(*) FROM posts")
        await wait_for(lambda: len(ledger.received) >= rows, what=f"the {rows} rows committed to arrive")
        finished.set()
        await reader
    assert kills >= 5
    assert commits > 50
    await ledger.verify(db, "posts")
    rows = await db.fetchval("SELECT count(*) FROM posts")
    print(
        f"\nsoak: {kills} listener kills, {commits} transactions, {rows} rows committed, "
        f"{len(ledger.received)} events received, 0 lost, 0 duplicated"
    )


async def test_client_resumes_with_since_after_random_disconnects(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn)
    ledger, stop = Ledger(), asyncio.Event()
    rng = random.Random(7)
    writers = [asyncio.create_task(write_for(dsn, stop, i, long_tx=i == 0)) for i in range(3)]
    since: str | None = None
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        async with running.connect() as ws:
            extra = {"since": since} if since else {}
            await subscribe(ws, "posts", **extra)
            for _ in range(rng.randint(1, 40)):
                try:
                    event = await recv(ws, 1)
                except TimeoutError:
                    break
                assert "data" in event, event
                ledger.add([event])
                since = event["id"]
    stop.set()
    await asyncio.gather(*writers)
    async with running.connect() as ws:
        await subscribe(ws, "posts", since=since)
        ledger.add(await until_quiet(ws))
    assert len(ledger.received) > 100
    await ledger.verify(db, "posts")


async def test_since_that_is_unknown_or_pruned_asks_for_a_resync(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('old')")
        old = await recv(ws)
        for i in range(5):  # each in a tick of its own: delivered before the next commits
            await db.execute("INSERT INTO posts (title) VALUES ($1)", f"new{i}")
            assert (await recv(ws))["data"]["title"] == f"new{i}"
    removed = await changelog.prune(db, max_age=3600, max_transactions=3, batch=2)
    assert removed == 3
    assert (await changelog.stats(db)).changelog_transactions == 3
    assert await changelog.locate(db, int(old["id"].split(".")[1])) is None
    await running.stop()  # and another starts
    running = await start_bridge(dsn)  # whose memory holds none of it
    for since in (old["id"], "999999999.0"):  # pruned; and an id from before ids were positions
        async with running.connect() as ws:
            await subscribe(ws, "posts", since=since)
            assert await recv(ws) == {"type": "resync_required", "collection": "posts"}
            await db.execute("INSERT INTO posts (title) VALUES ('live')")
            assert (await recv(ws))["data"]["title"] == "live"


async def test_since_replays_only_the_subscribed_operations_then_goes_live(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('a'), ('b'), ('c')")
        first = await recv(ws)
    await db.execute("UPDATE posts SET title = title || '!'")
    await db.execute("DELETE FROM posts WHERE title = 'c!'")
    async with running.connect() as ws:
        await subscribe(ws, "posts", since=first["id"], operations=["create", "delete"])
        replayed = [await recv(ws) for _ in range(3)]
        assert [(e["type"], e["data"]["title"]) for e in replayed] == [
            ("posts.create", "b"),
            ("posts.create", "c"),
            ("posts.delete", "c!"),
        ]
        await db.execute("INSERT INTO posts (title) VALUES ('d')")
        assert (await recv(ws))["data"]["title"] == "d"


async def test_pruning_by_age_and_size_keeps_a_prefix_of_positions(db: asyncpg.Connection) -> None:
    await db.execute(POSTS)
    for i in range(10):
        await db.execute("INSERT INTO posts (title) VALUES ($1)", str(i))
        assert (await changelog.tick(db)).n == i + 1
    await db.execute("UPDATE pgbridge.ticks SET at = now() - interval '2 hours' WHERE n <= 4")
    assert await changelog.prune(db, max_age=3600, max_transactions=100, batch=3) == 4
    assert await changelog.prune(db, max_age=3600, max_transactions=5, batch=3) == 1
    assert [r["n"] for r in await db.fetch("SELECT n FROM pgbridge.ticks ORDER BY n")] == list(range(5, 11))
    titles = [r["title"] for r in await db.fetch(
        "SELECT body::json->>'title' AS title FROM pgbridge.changes ORDER BY id")]  # fmt: skip
    assert titles == ["5", "6", "7", "8", "9"]
    with pytest.raises(Pruned):
        await changelog.read(db, (4, 0), 10)
    changes, reached = await changelog.read(db, (5, MAX_ID), 10)
    assert [c.rows[0] for c in changes] == [b'{"id": %d, "title": "%d"}' % (i + 1, i) for i in range(5, 10)]
    assert reached == (10, MAX_ID)


async def test_counting_positions_agrees_with_reading_them(db: asyncpg.Connection) -> None:
    await db.execute(POSTS)
    await db.execute("CREATE TABLE notes (id bigserial PRIMARY KEY); SELECT pgbridge.publish('notes')")
    for statement, then_tick in (
        ("INSERT INTO posts (title) SELECT 'a' FROM generate_series(1, 3)", True),
        ("INSERT INTO notes DEFAULT VALUES", False),  # several changes in one tick
        ("UPDATE posts SET title = 'b' WHERE id <= 2", True),
        ("TRUNCATE posts", False),
        ("INSERT INTO posts (title) VALUES ('c')", True),
    ):
        await db.execute(statement)
        if then_tick:
            await changelog.tick(db)
    upto = await changelog.newest_tick(db)
    changes, _ = await changelog.read(db, (0, MAX_ID), upto)
    keys = [(c.tick, c.change_id) for c in changes]
    for start in [(0, MAX_ID), *keys]:
        for end in keys:
            expected = {
                name: sum(
                    c.units for c, key in zip(changes, keys, strict=True) if start < key <= end and c.collection == name
                )
                for name in ("posts", "notes")
            }
            counted = {name: await changelog.count(db, start, end, (name,)) for name in ("posts", "notes")}
            assert counted == expected, (start, end)
            assert await changelog.count(db, start, end, ("notes", "posts")) == sum(expected.values())
    assert await changelog.count(db, (0, MAX_ID), (upto, MAX_ID), ("posts",)) == 3 + 2 + 1 + 1
    both, _ = await changelog.read(db, (0, MAX_ID), upto, ("posts", "notes"))
    assert both == changes  # every change here is of one of the two
    posts, _ = await changelog.read(db, (0, MAX_ID), upto, ("posts",))
    assert posts == [c for c in changes if c.collection == "posts"]


async def test_bridge_killed_with_sigkill_loses_nothing_for_resuming_clients(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    await db.execute(POSTS)
    port = free_port()  # the second bridge listens where the first did: the client reconnects to it
    ledger, stop = Ledger(), asyncio.Event()
    first = bridge_process(dsn, port)
    await first.ready()
    writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(2)]

    async def committed(at_least: int) -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM posts") >= at_least)

    async with Client(f"ws://127.0.0.1:{port}{WS_PATH}", token=token(), base_delay=0.05, max_delay=0.5) as client:
        posts = client.subscribe("posts")

        async def receive() -> None:
            async for event in posts:
                ledger.add([{"type": f"{event.collection}.{event.op}", "id": event.id, "data": event.data}])

        reader = asyncio.create_task(receive())
        await wait_for(lambda: len(ledger.received) >= 30, what="events from the first bridge")
        first.proc.kill()
        await asyncio.to_thread(first.proc.wait)
        rows = await db.fetchval("SELECT count(*) FROM posts")
        await wait_for(lambda: committed(rows + 20), what="writes while no bridge runs")
        second = bridge_process(dsn, port)
        await second.ready()
        await wait_for(lambda: client.connections == 2, what="the client to resume on the second bridge")
        received = len(ledger.received)
        # and while the client resumes: the replay meets live writes
        await wait_for(lambda: len(ledger.received) >= received + 30, what="events from the second bridge")
        stop.set()
        await asyncio.gather(*writers)
        rows = await db.fetchval("SELECT count(*) FROM posts")
        await wait_for(lambda: len(ledger.received) >= rows, what=f"the {rows} rows committed to arrive")
    await reader  # the client's close ended its subscription
    await ledger.verify(db, "posts")
    assert posts.dropped == 0, "a bridge sent an event again: the client's guard dropped it"


async def test_sigterm_closes_clients_with_1001_and_exits_0(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    await db.execute(POSTS)
    bridge = bridge_process(dsn)
    await bridge.ready()
    async with websockets.connect(bridge.url(token())) as ws:
        await subscribe(ws, "posts")
        started = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)
        assert (await close_frame(ws))[0] == 1001
    assert await asyncio.to_thread(bridge.proc.wait, 10) == 0
    assert time.monotonic() - started < 6


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A PostgreSQL of this test's own, so that stopping it disturbs no other test."""
    c = await asyncio.to_thread(Cluster, tmp_path / "pg")
    yield c
    await asyncio.to_thread(c.cleanup)


async def test_postgresql_restart_loses_nothing_and_health_says_so(own_cluster: Cluster, start_bridge: Bridges) -> None:
    dsn = own_cluster.dsn()
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.execute(POSTS)
    await conn.close()
    running = await start_bridge(dsn, probe_interval=0.5, probe_timeout=1)
    ledger, stop, finished = Ledger(), asyncio.Event(), asyncio.Event()
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        reader = asyncio.create_task(drain(ws, ledger, finished))
        writers = [asyncio.create_task(write_for(dsn, stop, i, long_tx=i == 0)) for i in range(3)]
        await asyncio.sleep(1)  # the writers commit a while before the outage
        await asyncio.to_thread(own_cluster.stop)
        await wait_for(lambda: not running.bridge.listener.connected, what="listener to notice")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{running.port}/healthz") as resp,
        ):
            assert resp.status == 503
            assert (await resp.json())["status"] == "unavailable"
        await asyncio.sleep(1)  # the outage lasts a while
        await asyncio.to_thread(own_cluster.start)
        await wait_for(lambda: running.bridge.listener.connected, what="listener to reconnect", timeout=30)
        await asyncio.sleep(1.5)  # and the writers, reconnected, commit a while after it
        stop.set()
        commits = sum(await asyncio.gather(*writers))
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetchval("SELECT count(*) FROM posts")
        finally:
            await conn.close()
        await wait_for(lambda: len(ledger.received) >= rows, what=f"the {rows} rows committed to arrive")
        finished.set()
        await reader
    assert commits > 20
    conn = await asyncpg.connect(dsn)
    try:
        await ledger.verify(conn, "posts")
    finally:
        await conn.close()


async def test_resume_seam_has_no_gap_and_no_duplicate_while_writes_continue(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(POSTS)
    running = await start_bridge(dsn)
    ledger, stop = Ledger(), asyncio.Event()
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('first')")
        ledger.add([await recv(ws)])
    # a backlog of 2000 change-log entries takes many replay batches to read back...
    await db.execute("DO $$ BEGIN FOR i IN 1..2000 LOOP INSERT INTO posts (title) VALUES (i); END LOOP; END $$")
    writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(2)]
    await asyncio.sleep(0.2)  # the writers are under way before the client resumes
    async with running.connect() as ws:
        # ...while live changes keep arriving and are held back until the replay is done
        await subscribe(ws, "posts", since=ledger.received[0]["id"])
        await asyncio.sleep(0.5)  # they keep writing while it replays
        stop.set()
        await asyncio.gather(*writers)
        ledger.add(await until_quiet(ws))
    assert len(ledger.received) > 2000
    await ledger.verify(db, "posts")


async def freeze_between_statements(db: asyncpg.Connection, pid: int) -> None:
    """SIGSTOP backend ``pid`` while it is idle. Stopped inside a statement, it would keep the locks the
    statement took, and its replacement would wait on them for as long as it stays stopped: no client can
    end a stopped process, while a backend whose client went silent finishes its statement anyway."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        if await db.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "idle":
            return
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} was never idle")


async def test_a_connection_that_stops_answering_is_replaced_quickly(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """A frozen backend looks like a half-open TCP connection: open, but silent."""
    await db.execute(POSTS)
    running = await start_bridge(dsn, probe_interval=0.5, probe_timeout=1)
    pid = await listener_pid(dsn)
    assert pid is not None
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await freeze_between_statements(db, pid)
        try:
            await db.execute("INSERT INTO posts (title) VALUES ('while frozen')")
            started = time.monotonic()
            event = await recv(ws, 10)
            assert event["data"]["title"] == "while frozen"
            assert time.monotonic() - started < 5
            assert (
                await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbridge-listener'"
                    " AND datname = current_database() AND pid <> $1",
                    pid,
                )
                == 1
            )  # a new connection took over
        finally:
            os.kill(pid, signal.SIGCONT)


async def test_a_tick_the_database_lost_is_reported_not_skipped(
    dsn: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, start_bridge: Bridges
) -> None:
    """Ticks are durable before they are read; a database that loses one anyway (a failover to a replica
    that lagged) gets every client asked to resync, and an error in the log."""
    await db.execute(POSTS)
    running = await start_bridge(dsn, probe_interval=0.5)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('before')")
        assert (await recv(ws))["data"]["title"] == "before"
        # what a lost and re-taken tick looks like to the listener: another time for the same number
        await db.execute(
            "UPDATE pgbridge.ticks SET at = at - interval '1 s' WHERE n = (SELECT max(n) FROM pgbridge.ticks)"
        )
        pid = await listener_pid(dsn)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert await recv(ws) == {"type": "resync_required", "collection": "posts"}
        await db.execute("INSERT INTO posts (title) VALUES ('after')")
        assert (await recv(ws))["data"]["title"] == "after"
    assert any("lost committed data" in r.getMessage() for r in caplog.records)

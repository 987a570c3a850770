"""Sessions end to end: a snapshot then its changes, positions from the first frame, ids that order,
and tokens refreshed without reconnecting. Real PostgreSQL, writers running, independent clients."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import jwt
import pytest

from tests.conftest import Bridges
from tests.helpers import (
    SECRET,
    Ledger,
    assert_silent,
    close_frame,
    collect,
    recv,
    send,
    small_receive_buffer,
    subscribe,
    token,
    until_quiet,
    wait_for,
)

ITEMS = """CREATE TABLE items (id int PRIMARY KEY, account int NOT NULL, n int NOT NULL, secret text);
           SELECT pgbridge.publish('items', '{secret}')"""


async def _write_randomly(dsn: str, stop: asyncio.Event, seed: int, count: int) -> int:
    """Insert, update (moving rows between accounts and values) and delete until ``stop``; return how
    many transactions committed."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(dsn)
    done = 0
    try:
        while not stop.is_set():
            row = rng.randrange(count + 200)
            op = rng.random()
            if op < 0.4:
                await conn.execute(
                    "INSERT INTO items VALUES ($1, $2, $3, 'hidden') ON CONFLICT (id) DO UPDATE SET n = items.n + 1",
                    row, rng.choice((1, 2)), rng.randrange(100),
                )  # fmt: skip
            elif op < 0.85:
                await conn.execute(
                    "UPDATE items SET n = $2, account = $3 WHERE id = $1", row, rng.randrange(100), rng.choice((1, 2))
                )
            else:
                await conn.execute("DELETE FROM items WHERE id = $1", row)
            done += 1
            await asyncio.sleep(0)
    finally:
        await conn.close()
    return done


def _apply(state: dict[int, dict[str, Any]], event: dict[str, Any], keep: Any = lambda row: True) -> None:
    """What a client does with what it receives: keep the rows it currently sees. An update reaches a
    filtered subscription when the old or the new row matches: ``keep`` says whether the row stays."""
    kind = event["type"].rpartition(".")[2]
    row = event["data"]
    assert "secret" not in row and "secret" not in event.get("old", {}), event
    if kind in ("snapshot", "create"):
        state[row["id"]] = row
    elif kind == "update":
        state.pop(event["old"]["id"], None)
        if keep(row):
            state[row["id"]] = row
    elif kind == "delete":
        state.pop(row["id"], None)


@pytest.mark.parametrize("scope", ["filter", "tenant"])
async def test_a_snapshot_then_its_changes_rebuild_the_table_exactly(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges, scope: str
) -> None:
    count = 20_000
    await db.execute(ITEMS)
    await db.execute("INSERT INTO items SELECT g, 1 + g % 2, g % 100, 'hidden' FROM generate_series(1, $1) g", count)
    if scope == "tenant":
        running = await start_bridge(dsn, tenant_claim="account", tenant_column="account")
        tok, request = token(account=1), {}
        visible, keep = "account = 1", lambda row: True
    else:
        running = await start_bridge(dsn)
        tok, request = token(), {"filter": {"n": {"gte": 50}}}
        visible, keep = "n >= 50", lambda row: row["n"] >= 50
    stop = asyncio.Event()
    writers = [asyncio.create_task(_write_randomly(dsn, stop, seed, count)) for seed in range(3)]
    state: dict[int, dict[str, Any]] = {}
    try:
        async with running.connect(tok) as ws:
            await asyncio.sleep(0.2)  # the writers are under way when the snapshot is taken
            await subscribe(ws, "items", snapshot=True, **request)
            snapshot_rows = 0
            while (message := await recv(ws))["type"] == "items.snapshot":
                _apply(state, message, keep)
                snapshot_rows += 1
            assert message["type"] == "snapshot_end" and message["collection"] == "items", message
            end = message["id"]
            changes_during = sum(1 for w in writers if not w.done())
            await asyncio.sleep(1.0)  # changes after the snapshot, while the client reads them
            stop.set()
            written = sum(await asyncio.gather(*writers))
            after = await until_quiet(ws, 1.0)
            for event in after:
                _apply(state, event, keep)
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
    expected = {r["id"]: dict(r) for r in await db.fetch(f"SELECT id, account, n FROM items WHERE {visible}")}
    assert changes_during == 3 and written > 100 and after
    assert snapshot_rows > count // 3
    assert state == expected
    # snapshot_end's id works as since: a client resuming from it gets exactly what followed it
    async with running.connect(tok) as again:
        await subscribe(again, "items", since=end, **request)
        assert await until_quiet(again, 1.0) == after


async def test_a_slow_reader_of_a_large_snapshot_is_paced_and_one_that_stops_is_closed(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(ITEMS)
    await db.execute("INSERT INTO items SELECT g, 1, g, repeat('x', 2000) FROM generate_series(1, 4000) g")
    await db.execute("ALTER TABLE items ADD COLUMN padding text DEFAULT repeat('p', 1000)")
    limit = 64 * 1024
    running = await start_bridge(dsn, outbound_limit=limit, stall_timeout=1.0)
    peak = 0
    async with running.connect(max_queue=4) as ws:
        await wait_for(lambda: running.bridge.sessions, what="the session")
        (session,) = running.bridge.sessions
        measure = session.transport.buffered

        def watched() -> int:  # what the session sees each time it decides whether to write more
            nonlocal peak
            peak = max(peak, found := measure())
            return found

        session.transport.buffered = watched  # type: ignore[method-assign]
        small_receive_buffer(ws)  # autotuned, the kernel would take the whole snapshot (12 MB)
        await subscribe(ws, "items", snapshot=True)
        received = 0
        while (message := await recv(ws))["type"] == "items.snapshot":
            received += 1
            if received == 50:  # a reader that pauses: what waits fills the socket, then the server's buffer
                await wait_for(lambda: watched() > 0, what="the server to have data waiting for the client")
            elif received % 20 == 0:
                await asyncio.sleep(0.01)  # a reader slower than the server
        assert message["type"] == "snapshot_end" and received == 4000
    assert running.bridge.closed["Slow consumer"] == 0
    assert 0 < peak <= limit  # the snapshot never waited in memory beyond the client's budget
    async with running.connect(max_queue=1) as stopped:
        small_receive_buffer(stopped)
        await subscribe(stopped, "items", snapshot=True)
        await asyncio.sleep(4)  # reads nothing: past the stall timeout
        assert await close_frame(stopped, discard=True) == (1013, "Slow consumer")
    await wait_for(lambda: not running.bridge.sessions, what="the stalled session to end")
    open_snapshots = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbridge' AND xact_start IS NOT NULL"
    )
    assert open_snapshots == 0  # its snapshot transaction ended with it


async def test_a_snapshot_sees_through_tenants_filters_and_limits(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(ITEMS)
    await db.execute("INSERT INTO items SELECT g, 1 + g % 3, g, 'no' FROM generate_series(1, 300) g")
    running = await start_bridge(dsn, tenant_claim="account", tenant_column="account")
    async with running.connect(token(account=2)) as ws:
        await subscribe(ws, "items", snapshot=True, filter={"n": {"lt": 100}}, limit=20)
        rows = await collect(ws, 21)
    assert [r["type"] for r in rows] == ["items.snapshot"] * 20 + ["snapshot_end"]
    assert all(r["data"]["account"] == 2 and r["data"]["n"] < 100 and "secret" not in r["data"] for r in rows[:20])
    assert len({r["data"]["id"] for r in rows[:20]}) == 20


async def test_the_subscribed_id_resumes_a_client_that_dropped_before_its_first_event(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    await db.execute("INSERT INTO posts (title) VALUES ('before')")
    await wait_for(lambda: running.bridge.listener.delivered == 1, what="the row before to be routed")
    async with running.connect() as ws:
        start = (await subscribe(ws, "posts"))["id"]
        await assert_silent(ws, 0.3)
    await db.execute("INSERT INTO posts (title) VALUES ('while away 1')")
    await db.execute("INSERT INTO posts (title) SELECT 'while away ' || g FROM generate_series(2, 3) g")
    ledger = Ledger()
    async with running.connect() as ws:
        assert (await subscribe(ws, "posts", since=start))["id"] == start
        ledger.add(await collect(ws, 3))
        await db.execute("INSERT INTO posts (title) VALUES ('live')")
        ledger.add(await until_quiet(ws, 0.5))
    assert [e["data"]["title"] for e in ledger.received] == ["while away 1", "while away 2", "while away 3", "live"]
    await db.execute("DELETE FROM posts WHERE title = 'before'")  # the ledger holds what came after start
    await ledger.verify(db, "posts")


async def test_ids_increase_in_delivery_order_across_a_long_transaction(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    """A transaction that stays open while others commit takes its change ids early, yet is delivered
    after them: its events' ids are greater, so a client dropping ids <= the last applied loses none."""
    running = await start_bridge(dsn)
    long = await asyncpg.connect(dsn)
    try:
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            transaction = long.transaction()
            await transaction.start()
            await long.execute("INSERT INTO posts (title) SELECT 'long ' || g FROM generate_series(1, 3) g")
            for i in range(5):
                await db.execute("INSERT INTO posts (title) VALUES ($1)", f"short {i}")
            shorts = await collect(ws, 5)
            await transaction.commit()
            longs = await collect(ws, 3)
    finally:
        await long.close()
    received = shorts + longs
    keys = [tuple(int(x) for x in e["id"].split(".")) for e in received]
    assert keys == sorted(keys) and len(set(keys)) == 8
    assert [e["data"]["title"] for e in longs] == ["long 1", "long 2", "long 3"]
    assert min(int(e["id"].split(".")[1]) for e in longs) < max(int(e["id"].split(".")[1]) for e in shorts)


def _signed(secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "tester", "iat": now, "exp": now + 60, "collections": "*", **claims}, secret,
                      algorithm="HS256")  # fmt: skip


async def test_a_refreshed_token_keeps_the_connection_past_the_first_expiry(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    async with running.connect(token(ttl=2)) as ws:
        await subscribe(ws, "posts")
        fresh = _signed(exp=int(time.time()) + 120)
        await send(ws, {"action": "refresh", "token": fresh})
        assert await recv(ws) == {"type": "refreshed", "exp": jwt.decode(fresh, SECRET, algorithms=["HS256"])["exp"]}
        await asyncio.sleep(3)  # past the first token's expiry
        await db.execute("INSERT INTO posts (title) VALUES ('still here')")
        assert (await recv(ws))["data"]["title"] == "still here"
    assert running.bridge.refreshes["accepted"] == 1 and running.bridge.closed["Token expired"] == 0


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (lambda: _signed(sub="mallory"), "The new token is for another subject (sub); connect again to change it"),
        (lambda: _signed(exp=int(time.time()) - 10), "Token expired"),
        (lambda: _signed(secret="another-secret-of-enough-bytes-for-hs256"), "Authentication failed"),
        (lambda: "not.a.jwt", "Authentication failed"),
    ],
    ids=["another subject", "expired", "badly signed", "malformed"],
)
async def test_a_refused_refresh_leaves_the_old_token_and_its_expiry(
    dsn: str, posts: str, start_bridge: Bridges, new: Any, reason: str
) -> None:
    running = await start_bridge(dsn)
    async with running.connect(token(ttl=2)) as ws:
        await subscribe(ws, "posts")
        await send(ws, {"action": "refresh", "token": new()})
        assert await recv(ws) == {"error": f"Refresh refused: {reason}; the current token stands", "action": "refresh"}
        assert await close_frame(ws, timeout=5) == (1008, "Token expired")  # the first token's expiry stands
    assert running.bridge.refreshes["refused"] == 1


async def test_a_refresh_for_another_tenant_is_refused(dsn: str, db: asyncpg.Connection, start_bridge: Bridges) -> None:
    await db.execute(ITEMS)
    running = await start_bridge(dsn, tenant_claim="account", tenant_column="account")
    async with running.connect(token(account=1)) as ws:
        await send(ws, {"action": "refresh", "token": _signed(account=2)})
        assert await recv(ws) == {
            "error": "Refresh refused: The new token is for another tenant (account); the current token stands",
            "action": "refresh",
        }
        await send(ws, {"action": "refresh", "token": _signed(account=1)})
        assert (await recv(ws))["type"] == "refreshed"


async def test_a_narrower_refreshed_grant_ends_the_subscriptions_it_no_longer_allows(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    await db.execute("CREATE TABLE notes (id int); SELECT pgbridge.publish('notes')")
    running = await start_bridge(dsn)
    await wait_for(lambda: "notes" in (running.bridge.publications or ()), what="the new publication")
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await subscribe(ws, "notes")
        await send(ws, {"action": "refresh", "token": _signed(collections={"notes": "*", "posts": ["delete"]})})
        assert await recv(ws) == {
            "status": "unsubscribed", "type": "unsubscribed", "collection": "posts",
            "reason": "The new token does not allow this subscription",
        }  # fmt: skip
        assert (await recv(ws))["type"] == "refreshed"
        await db.execute("INSERT INTO posts (title) VALUES ('no longer'); INSERT INTO notes VALUES (1)")
        assert (await recv(ws))["data"] == {"id": 1}
        await assert_silent(ws, 0.3)


async def test_a_snapshot_and_a_resume_from_its_end_on_a_change_log_with_no_change_yet_need_no_resync(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    assert await db.fetchval("SELECT count(*) FROM pgbridge.changes") == 0
    async with running.connect() as ws:
        await subscribe(ws, "posts", snapshot=True)
        end = await recv(ws)
        assert end["type"] == "snapshot_end" and end["id"] is not None, end
        await db.execute("INSERT INTO posts (title) VALUES ('first')")
        first = await recv(ws)  # nothing was lost: no resync_required comes before it
        assert first["type"] == "posts.create" and first["data"]["title"] == "first", first
    async with running.connect() as ws:
        await subscribe(ws, "posts", since=end["id"])
        assert await recv(ws) == first
        await assert_silent(ws, 0.3)

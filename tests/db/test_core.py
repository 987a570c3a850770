"""The whole path: a write by any client (psql included) reaches subscribed WebSocket clients."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from tests.helpers import (
    Cluster,
    RunningBridge,
    assert_silent,
    collect,
    psql,
    recv,
    send,
    subscribe,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges


async def test_psql_writes_arrive_as_create_update_delete(bridge: RunningBridge, cluster: Cluster) -> None:
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", operations=["create", "update", "delete"])
        psql(cluster, bridge.dsn, "INSERT INTO posts (title, author_id, secret) VALUES ('hello', 7, 'hidden')")
        created = await recv(ws)
        assert created["type"] == "posts.create"
        assert created["data"]["title"] == "hello"
        assert created["data"]["author_id"] == 7
        assert "secret" not in created["data"]
        assert "old" not in created
        assert created["timestamp"].endswith("Z") and len(created["timestamp"]) == 24
        assert isinstance(created["id"], str)

        psql(cluster, bridge.dsn, "UPDATE posts SET title = 'changed'")
        updated = await recv(ws)
        assert updated["type"] == "posts.update"
        assert updated["data"]["title"] == "changed"
        assert updated["old"]["title"] == "hello"
        assert "secret" not in updated["old"]

        psql(cluster, bridge.dsn, "DELETE FROM posts")
        deleted = await recv(ws)
        assert deleted["type"] == "posts.delete"
        assert deleted["data"]["title"] == "changed"
        assert deleted["old"] == deleted["data"]
        assert len({created["id"], updated["id"], deleted["id"]}) == 3


async def test_operations_limit_what_arrives(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as only_deletes, bridge.connect() as everything:
        await subscribe(only_deletes, "posts", operations=["delete"])
        await subscribe(everything, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('a')")
        await db.execute("DELETE FROM posts")
        assert [e["type"] for e in await collect(everything, 2)] == ["posts.create", "posts.delete"]
        assert (await recv(only_deletes))["type"] == "posts.delete"
        await assert_silent(only_deletes, 0.3)


async def test_resubscribing_replaces_and_unsubscribe_stops(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", operations=["create"])
        await subscribe(ws, "posts", operations=["delete"])
        await db.execute("INSERT INTO posts (title) VALUES ('a')")
        await db.execute("DELETE FROM posts")
        assert (await recv(ws))["type"] == "posts.delete"
        await send(ws, {"action": "unsubscribe", "collection": "posts"})
        assert await recv(ws) == {"status": "unsubscribed", "type": "unsubscribed", "collection": "posts"}
        await db.execute("INSERT INTO posts (title) VALUES ('b')")
        await assert_silent(ws, 0.3)


async def test_ping_pong_and_heartbeat(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, heartbeat=0.2)
    async with running.connect() as ws:
        await send(ws, {"action": "ping"})
        pong = await recv(ws)
        assert pong["type"] == "pong" and pong["timestamp"].endswith("Z")
        beat = await recv(ws, 2, skip_heartbeats=False)
        assert beat["type"] == "heartbeat" and beat["timestamp"].endswith("Z")


async def test_a_statement_of_many_rows_arrives_row_by_row_in_order(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", operations=["create"])
        await db.execute("INSERT INTO posts (title) SELECT 'row ' || g FROM generate_series(1, 2500) g")
        events = await collect(ws, 2500)
        assert [e["data"]["title"] for e in events] == [f"row {i}" for i in range(1, 2501)]
        assert len({e["id"] for e in events}) == 2500
        # 2500 rows travel as three change-log entries, not one giant value
        assert await db.fetchval("SELECT count(*) FROM pgbridge.changes") == 3


async def test_a_one_megabyte_row_arrives_whole(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    big = "é" * 500_000 + "x" * 100  # over 1 MB of UTF-8
    async with bridge.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ($1)", big)
        await db.execute("UPDATE posts SET author_id = 1")
        created, updated = await collect(ws, 2)
        assert created["data"]["title"] == big
        assert updated["data"]["title"] == big and updated["old"]["title"] == big


async def test_types_tables_without_key_and_other_schemas(
    dsn: str, db: asyncpg.Connection, cluster: Cluster, start_bridge: Bridges
) -> None:
    await db.execute(
        """CREATE SCHEMA shop;
           CREATE TABLE shop.items (label text, price numeric, big numeric, tags text[], meta jsonb,
                                    at timestamptz, day date, ok boolean, n int);
           SELECT pgbridge.publish('shop.items');"""
    )
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "items")
        psql(
            cluster,
            dsn,
            """SET TIME ZONE 'Asia/Kolkata';
            INSERT INTO shop.items VALUES
              ('naïve ☃ "quoted"\n', 12.50, 123456789012345678901234567890.123456789, '{a,"b c"}',
               '{"k": [1, null, {"z": true}]}', '2026-01-17 12:34:56.789+00', '2026-01-17', true, 1),
              (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 2);
            UPDATE shop.items SET n = n * 10;""",
        )
        c1, c2, u1, u2 = await collect(ws, 4)
    assert c1["data"]["label"] == 'naïve ☃ "quoted"\n'
    assert c1["data"]["price"] == 12.5
    assert c1["data"]["tags"] == ["a", "b c"]
    assert c1["data"]["meta"] == {"k": [1, None, {"z": True}]}
    assert c1["data"]["at"] == "2026-01-17T18:04:56.789+05:30"
    assert c1["data"]["day"] == "2026-01-17" and c1["data"]["ok"] is True
    assert c2["data"] == {
        "label": None, "price": None, "big": None, "tags": None, "meta": None,
        "at": None, "day": None, "ok": None, "n": 2,
    }  # fmt: skip
    # Rows without a primary key still pair old with new.
    assert (u1["old"]["n"], u1["data"]["n"]) == (1, 10)
    assert (u2["old"]["n"], u2["data"]["n"]) == (2, 20)


async def test_big_numerics_arrive_exactly(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE amounts (v numeric); SELECT pgbridge.publish('amounts')")
    # the bridge learns of the new collection through a notification
    await wait_for(lambda: "amounts" in (bridge.bridge.publications or ()), what="the bridge to learn of amounts")
    async with bridge.connect() as ws:
        await subscribe(ws, "amounts")
        await db.execute("INSERT INTO amounts VALUES (123456789012345678901234567890.123456789)")
        raw = await asyncio.wait_for(ws.recv(), 10)
    assert '"v": 123456789012345678901234567890.123456789' in raw


async def test_update_that_changes_the_key_pairs_old_and_new(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO posts (id, title) VALUES (1, 'a'), (2, 'b')")
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", operations=["update"])
        await db.execute("UPDATE posts SET id = id + 100")
        events = await collect(ws, 2)
    assert {(e["old"]["id"], e["data"]["id"], e["data"]["title"]) for e in events} == {(1, 101, "a"), (2, 102, "b")}
    assert all(e["old"]["title"] == e["data"]["title"] for e in events)


async def test_every_client_gets_the_same_events(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    clients = [bridge.connect() for _ in range(20)]
    sockets = [await c.__aenter__() for c in clients]
    try:
        for ws in sockets:
            await subscribe(ws, "posts", operations=["create"])
        await db.execute("INSERT INTO posts (title) SELECT 'p' || g FROM generate_series(1, 50) g")
        results = await asyncio.gather(*(collect(ws, 50) for ws in sockets))
        assert all(r == results[0] for r in results)
        assert [e["data"]["title"] for e in results[0]] == [f"p{i}" for i in range(1, 51)]
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


async def test_rolled_back_writes_are_never_delivered(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as ws:
        await subscribe(ws, "posts")
        tx = db.transaction()
        await tx.start()
        await db.execute("INSERT INTO posts (title) VALUES ('ghost')")
        await tx.rollback()
        await db.execute("INSERT INTO posts (title) VALUES ('real')")
        assert (await recv(ws))["data"]["title"] == "real"
        await assert_silent(ws, 0.3)


async def test_healthz_reports_the_database(bridge: RunningBridge) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bridge.port}/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok" and body["database"] == "connected"


async def test_publishing_later_makes_a_collection_available(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as ws:
        await send(ws, {"action": "subscribe", "collection": "comments"})
        assert "not published" in (await recv(ws))["error"]
        await db.execute("CREATE TABLE comments (id int); SELECT pgbridge.publish('comments')")
        await wait_for(lambda: "comments" in (bridge.bridge.publications or ()), what="the bridge to learn of comments")
        await subscribe(ws, "comments")  # the same connection: what it was refused before, it may have now
        await db.execute("INSERT INTO comments VALUES (5)")
        assert (await recv(ws))["data"] == {"id": 5}

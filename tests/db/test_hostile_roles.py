"""Roles with no grants against the database side: a NOTIFY queue they fill, floods they send."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from pgbridge import changelog
from pgbridge.migrate import migrate
from tests.helpers import Cluster, Ledger, collect, fresh_name, health, recv, subscribe, until_quiet, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges

QUEUE_PAGES = 64  # 512 KiB of NOTIFY queue instead of 8 GB: filled in a second


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A PostgreSQL of its own whose NOTIFY queue is small enough for a test to fill."""
    cluster = Cluster(Path(tmp_path_factory.mktemp("small-queue")) / "data")
    try:
        if cluster.version < 17:
            pytest.skip(f"max_notify_queue_pages is new in PostgreSQL 17; this is {cluster.version}")
        cluster.configure(max_notify_queue_pages=QUEUE_PAGES)
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
async def queue_db(small_queue: Cluster) -> AsyncIterator[str]:
    admin = await asyncpg.connect(small_queue.dsn())
    try:
        await admin.execute("DROP DATABASE IF EXISTS app WITH (FORCE)")
        await admin.execute("CREATE DATABASE app")
        await admin.execute("DROP ROLE IF EXISTS mallory; CREATE ROLE mallory LOGIN")
    finally:
        await admin.close()
    dsn = small_queue.dsn("app")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(
            "CREATE TABLE posts (id bigserial PRIMARY KEY, title text); SELECT pgbridge.publish('posts')"
        )
    finally:
        await conn.close()
    yield dsn


async def _fill_queue(dsn: str) -> tuple[asyncpg.Connection, asyncpg.Connection]:
    """As a role with no grants: hold the queue's tail (LISTEN, then stay in a transaction) and notify
    until PostgreSQL refuses more. Returns the two sessions, which keep it full until closed."""
    as_mallory = dsn.replace("postgres:@", "mallory:@")
    holder = await asyncpg.connect(as_mallory)
    await holder.execute("LISTEN anything")
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1")
    sender = await asyncpg.connect(as_mallory)
    with pytest.raises(asyncpg.ProgramLimitExceededError, match="too many notifications"):
        for i in range(10 * QUEUE_PAGES):
            await sender.execute(f"SELECT pg_notify('anything', repeat('x', 7900) || '{i}')")
    return holder, sender


async def test_a_full_notify_queue_fails_no_write_and_drains_when_its_holder_leaves(
    queue_db: str, start_bridge: Bridges
) -> None:
    """Before 003, every write to a published table failed while the queue was full."""
    running = await start_bridge(queue_db, poll_interval=0.02)
    db = await asyncpg.connect(queue_db)
    try:
        ledger = Ledger()
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            await db.execute("INSERT INTO posts (title) VALUES ('before')")
            ledger.add(await collect(ws, 1))
            holder, sender = await _fill_queue(queue_db)
            assert await db.fetchval("SELECT pg_notification_queue_usage()") > 0.9
            for i in range(30):  # each its own transaction, as an application writes
                await db.execute("INSERT INTO posts (title) VALUES ($1)", f"while full {i}")
            await db.execute("UPDATE posts SET title = title || '!' WHERE id = 1")
            ledger.add(await collect(ws, 31))
            body = await health(running.port)
            assert body["status"] == "degraded", body
            assert body["notification_queue_usage"] > 0.9
            assert "notification_queue" in body

            await holder.close()
            await sender.close()
            await wait_for(lambda: running.bridge.listener.queue_usage < changelog.WAKE_BELOW,
                           what="the queue to drain once its holder left")  # fmt: skip
            assert await db.fetchval("SELECT pg_notification_queue_usage()") < changelog.WAKE_BELOW
            await wait_for(lambda: running.bridge.listener.queue_usage == 0.0, what="the queue to empty")
            assert (await health(running.port))["status"] == "ok"
            await db.execute("INSERT INTO posts (title) VALUES ('after')")
            ledger.add(await until_quiet(ws, 0.5))
        assert [e["data"]["title"] for e in ledger.received][-2:] == ["before!", "after"]
        await ledger.verify(db, "posts")
        assert len(ledger.received) == 33
    finally:
        await db.close()


async def test_a_bridge_starts_while_the_queue_is_full(queue_db: str, start_bridge: Bridges) -> None:
    """The listener's check of its connection (a NOTIFY round trip, see database.check_notifications)
    cannot send while the queue is full: it lets the listener in, which polls."""
    holder, sender = await _fill_queue(queue_db)
    db = await asyncpg.connect(queue_db)
    try:
        running = await start_bridge(queue_db, poll_interval=0.02)
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            await db.execute("INSERT INTO posts (title) VALUES ('while full')")
            assert [e["data"]["title"] for e in await collect(ws, 1)] == ["while full"]
    finally:
        await db.close()
        await holder.close()
        await sender.close()


async def test_wake_up_channels_are_secret(queue_db: str) -> None:
    """A role without grants cannot learn the channels: it can neither listen to nor forge wake-ups."""
    mallory = await asyncpg.connect(queue_db.replace("postgres:@", "mallory:@"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await mallory.fetch("SELECT * FROM pgbridge.channels")
        source = await mallory.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'capture_v3'")
        triggers = await mallory.fetchval("SELECT string_agg(encode(tgargs, 'escape'), ' ') FROM pg_trigger")
    finally:
        await mallory.close()
    owner = await asyncpg.connect(queue_db)
    try:
        names = set((await changelog.channels(owner)).values())
    finally:
        await owner.close()
    assert len(names) == 2
    for name in names:
        assert name not in source and name not in triggers


GUESSES = {"pgbridge": 10_000} | dict.fromkeys(
    ("posts", "pgbridge_wake", "pgbridge.wake", "wake", "pgbridge_publications", "changes"), 2_000
)


async def test_a_flood_on_guessed_channels_never_reaches_the_bridge(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Floods cost the flooder, not the bridge: its listener LISTENs only on the secret wake channel, so
    a role with no grants cannot make it read notifications, whatever channel it guesses."""
    heard: defaultdict[asyncpg.Connection, Counter[str]] = defaultdict(Counter)
    process = asyncpg.Connection._process_notification

    def counting(conn: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        heard[conn][channel] += 1  # every notification any connection of this process receives
        process(conn, pid, channel, payload)

    monkeypatch.setattr(asyncpg.Connection, "_process_notification", counting)
    role = fresh_name("flooder")  # roles are the cluster's: one name per test
    await db.execute(f"CREATE ROLE {role} LOGIN")
    wake = (await changelog.channels(db))["wake"]
    running = await start_bridge(dsn)
    await wait_for(lambda: running.bridge.listener.ticking, what="the bridge to take the ticks")
    witness = await asyncpg.connect(dsn)
    flooder = await asyncpg.connect(dsn.replace("postgres:@", f"{role}:@"))
    try:
        for channel in GUESSES:
            await witness.add_listener(channel, lambda *_: None)
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            for channel, count in GUESSES.items():  # one transaction per channel
                await flooder.execute("SELECT pg_notify($1, g::text) FROM generate_series(1, $2::int) g",
                                      channel, count)  # fmt: skip
            await wait_for(lambda: heard[witness] == Counter(GUESSES), what="the witness to hear the whole flood")

            def wakes() -> int:
                return sum(counts[wake] for conn, counts in heard.items() if conn is not witness)

            before = wakes()
            await db.execute("INSERT INTO posts (title) VALUES ('marker')")
            event = await recv(ws)
            assert event["type"] == "posts.create" and event["data"]["title"] == "marker", event
            # The marker's wake-up was queued after the whole flood, and a backend sends notifications in
            # queue order: once the ticker has it, its backend has gone past every notification of the flood.
            await wait_for(lambda: wakes() > before, what="the ticker to receive the marker's wake-up")
    finally:
        await flooder.close()
        await witness.close()
    reached = {
        id(conn): {channel: n for channel, n in counts.items() if channel in GUESSES}
        for conn, counts in heard.items()
        if conn is not witness
    }
    assert not any(reached.values()), f"notifications on guessed channels reached the bridge: {reached}"

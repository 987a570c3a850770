"""Bridges on one database: one takes the ticks, the others follow its announcements, and another takes
over when it stops or its lease lapses. Every bridge's clients get every change, once, in order."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import websockets

from pgbridge.events import MAX_ID
from pgbridge.listener import LEASE
from pgbridge.relay import Page
from tests.helpers import (
    RunningBridge,
    assert_silent,
    collect,
    health,
    small_receive_buffer,
    status_with_header,
    subscribe,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges


def tickers(bridges: list[RunningBridge]) -> list[RunningBridge]:
    return [b for b in bridges if not b.stopped and b.bridge.listener.ticking]


async def ticker_and_followers(
    start_bridge: Bridges, dsn: str, count: int, **overrides: Any
) -> tuple[RunningBridge, list[RunningBridge]]:
    """``count`` bridges on one database, once one of them ticks: that one, and the others."""
    bridges = [await start_bridge(dsn, **overrides) for _ in range(count)]
    await wait_for(lambda: len(tickers(bridges)) == 1, what="one ticker")
    (ticker,) = tickers(bridges)
    return ticker, [b for b in bridges if b is not ticker]


async def test_one_bridge_ticks_and_the_others_follow_it(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    bridges = [await start_bridge(dsn) for _ in range(3)]
    await wait_for(lambda: len(tickers(bridges)) == 1, what="one ticker")
    async with bridges[0].connect() as a, bridges[1].connect() as b, bridges[2].connect() as c:
        for ws in (a, b, c):
            await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) SELECT 'p' || g FROM generate_series(1, 5) g")
        for _ in range(20):  # one statement per transaction, as most writers commit
            await db.execute("INSERT INTO posts (title) VALUES ('one')")
        got = [[e["id"] for e in await collect(ws, 25)] for ws in (a, b, c)]
        assert got[0] == got[1] == got[2] and len(set(got[0])) == 25
    (ticker,) = tickers(bridges)
    for follower in (b for b in bridges if b is not ticker):
        assert follower.bridge.listener.ticks_taken == 0  # it read the ticks the ticker announced
        assert follower.bridge.listener.delivered == 25
        assert (await health(follower.port))["ticker"] is False
    assert ticker.bridge.listener.ticks_taken > 0 and (await health(ticker.port))["ticker"] is True


async def test_a_ticker_that_stops_hands_the_ticks_over_at_once(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    ticker, (follower,) = await ticker_and_followers(start_bridge, dsn, 2)
    async with follower.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('before')")
        assert (await collect(ws, 1))[0]["data"]["title"] == "before"
        stopped = time.monotonic()
        await ticker.stop()  # releases the lease on its way out
        await wait_for(lambda: follower.bridge.listener.ticking, timeout=LEASE, what="the follower to take over")
        assert time.monotonic() - stopped < LEASE  # sooner than a lapse
        await db.execute("INSERT INTO posts (title) VALUES ('after')")
        assert (await collect(ws, 1))[0]["data"]["title"] == "after"


async def test_a_lease_that_lapses_is_taken_over_and_nothing_committed_meanwhile_is_lost(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """A ticker that died or froze holding the lease: nobody ticks until it lapses, then another does."""
    lapses = await db.fetchval(
        "UPDATE pgbridge.leases SET holder = 'frozen', until = clock_timestamp() + make_interval(secs => $1) "
        "WHERE name = 'ticker' RETURNING until",
        LEASE,
    )
    bridges = [await start_bridge(dsn) for _ in range(2)]
    async with bridges[0].connect() as a, bridges[1].connect() as b:
        for ws in (a, b):
            await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) SELECT 'p' || g FROM generate_series(1, 10) g")
        held = (lapses - await db.fetchval("SELECT clock_timestamp()")).total_seconds()
        await assert_silent(a, held - 0.1)  # nobody ticks while 'frozen' holds the lease
        got = [await collect(ws, 10, timeout=4 * LEASE) for ws in (a, b)]
        assert (
            [e["data"]["title"] for e in got[0]]
            == [e["data"]["title"] for e in got[1]]
            == [f"p{i}" for i in range(1, 11)]
        )
    assert len(tickers(bridges)) == 1
    assert await db.fetchval("SELECT holder FROM pgbridge.leases WHERE name = 'ticker'") == (
        tickers(bridges)[0].bridge.listener.holder
    )


async def test_followers_route_what_the_ticker_relays_without_reading_the_change_log(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    ticker, followers = await ticker_and_followers(start_bridge, dsn, 3)
    await wait_for(lambda: all(f.bridge.listener.link is not None for f in followers), what="followers on the relay")
    reads = [f.bridge.listener.log_reads for f in followers]
    async with followers[0].connect() as a, followers[1].connect() as b:
        for ws in (a, b):
            await subscribe(ws, "posts")
        for i in range(30):
            await db.execute("INSERT INTO posts (title) VALUES ($1)", f"t{i}")
        got = [[e["data"]["title"] for e in await collect(ws, 30)] for ws in (a, b)]
    assert got[0] == got[1] == [f"t{i}" for i in range(30)]
    for follower, before in zip(followers, reads, strict=True):
        listener = follower.bridge.listener
        # the 30 transactions came in some ticks, through the relay, not from the change log (where each tick
        # takes a read at least; a lease check may still read one)
        assert listener.relayed_pages > 0 and listener.log_reads - before <= 2, listener.log_reads - before
        assert (await health(follower.port))["relay"] == "following the ticker's relay"
    assert (await health(ticker.port))["relay"] == "serving 2 bridges"


async def test_the_relay_serves_only_bridges_that_show_its_secret(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn)
    await wait_for(lambda: running.bridge.listener.ticking, what="the ticker")
    relay = running.bridge.listener.relay
    assert relay is not None and relay.url is not None
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": relay.secret}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(relay.url, headers=headers)
            assert refused.value.status == 403
    where = urlsplit(relay.url)
    assert where.port is not None
    answer = await status_with_header(where.port, "/relay", b"Authorization: Bearer \xff\xfe")  # not UTF-8
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert relay.followers == 0
    assert where.hostname == "127.0.0.1" and where.port != running.port  # a port of its own, on --host


async def test_followers_the_relay_drops_mid_stream_catch_up_from_the_change_log(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    ticker, (follower,) = await ticker_and_followers(start_bridge, dsn, 2)
    relay = ticker.bridge.listener.relay
    assert relay is not None
    await wait_for(lambda: relay.followers == 1, what="the follower on the relay")
    async with follower.connect() as ws:
        await subscribe(ws, "posts")
        for i in range(120):
            await db.execute("INSERT INTO posts (title) VALUES ($1)", f"t{i}")
            if i % 20 == 10:
                relay.drop_all()  # as it drops a follower that reads too slowly
        got = [e["data"]["title"] for e in await collect(ws, 120)]
        await assert_silent(ws, 0.3)
    assert got == [f"t{i}" for i in range(120)]  # all, once, in order
    assert follower.bridge.listener.relayed_pages > 0 and follower.bridge.listener.log_reads > 0


async def test_a_follower_cut_off_partway_through_a_large_transaction_gets_the_rest_without_another_write(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """One transaction of 2,500 statements is one tick in three pages; the ticker drops its follower after
    the first. The follower reads the rest from the change log at once, not when something next commits."""
    ticker, (follower,) = await ticker_and_followers(start_bridge, dsn, 2)
    relay = ticker.bridge.listener.relay
    assert relay is not None
    await wait_for(lambda: relay.followers == 1, what="the follower on the relay")
    publish, pages = relay.publish, []

    def first_page_only(page: Page) -> None:
        pages.append(page)
        if page.after[1] == MAX_ID:  # the first of its tick
            publish(page)
        else:
            relay.drop_all()

    relay.publish = first_page_only  # type: ignore[method-assign]
    async with follower.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute(
            "DO $$ BEGIN FOR i IN 1..2500 LOOP INSERT INTO posts (title) VALUES ('t' || i); END LOOP; END $$"
        )
        got = [e["data"]["title"] for e in await collect(ws, 2500)]
        await assert_silent(ws, 0.3)
    assert got == [f"t{i}" for i in range(1, 2501)]
    assert len({p.newest for p in pages}) == 1 and len(pages) >= 3, [(p.after, p.reached) for p in pages]
    assert follower.bridge.listener.relayed_pages >= 1


async def test_without_a_relay_followers_read_the_ticks_from_the_change_log(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    _, (follower,) = await ticker_and_followers(start_bridge, dsn, 2, relay_port=-1)
    async with follower.connect() as ws:
        await subscribe(ws, "posts")
        for i in range(10):
            await db.execute("INSERT INTO posts (title) VALUES ($1)", f"t{i}")
        assert [e["data"]["title"] for e in await collect(ws, 10)] == [f"t{i}" for i in range(10)]
    assert follower.bridge.listener.relayed_pages == 0 and follower.bridge.listener.log_reads > 0
    assert (await health(follower.port))["relay"] == "reading the ticks from the database"


async def test_a_follower_that_stops_reading_is_dropped_not_waited_for(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    await wait_for(lambda: running.bridge.listener.ticking, what="the ticker")
    relay = running.bridge.listener.relay
    assert relay is not None and relay.url is not None
    shown = {"Authorization": f"Bearer {relay.secret}"}
    async with websockets.connect(relay.url, additional_headers=shown, max_queue=1, max_size=None) as stuck:
        small_receive_buffer(stuck)
        await wait_for(lambda: relay.followers == 1, what="the follower that will not read")
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            big = "x" * 200_000
            for i in range(100):  # 20 MB of pages: past what a follower may leave unread, and the kernel holds
                await db.execute("INSERT INTO posts (title) VALUES ($1)", f"{i} {big}")
            got = await collect(ws, 100)  # the ticker's own clients are not held up meanwhile
        assert [e["data"]["title"].split()[0] for e in got] == [str(i) for i in range(100)]
        await wait_for(lambda: relay.dropped == 1 and relay.followers == 0, what="the follower to be dropped")

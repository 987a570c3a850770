"""Bridges on one database: one takes the ticks, the others follow its announcements, and another takes
over when it stops or its lease lapses. Every bridge's clients get every change, once, in order."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from pgbridge.listener import LEASE
from tests.helpers import RunningBridge, assert_silent, collect, subscribe, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges


def tickers(bridges: list[RunningBridge]) -> list[RunningBridge]:
    return [b for b in bridges if not b.stopped and b.bridge.listener.ticking]


async def health(bridge: RunningBridge) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bridge.port}/healthz") as resp:
        body: dict[str, object] = await resp.json()
        return body


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
        assert (await health(follower))["ticker"] is False
    assert ticker.bridge.listener.ticks_taken > 0 and (await health(ticker))["ticker"] is True


async def test_a_ticker_that_stops_hands_the_ticks_over_at_once(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    bridges = [await start_bridge(dsn) for _ in range(2)]
    await wait_for(lambda: len(tickers(bridges)) == 1, what="one ticker")
    (ticker,) = tickers(bridges)
    (follower,) = [b for b in bridges if b is not ticker]
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

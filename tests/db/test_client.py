"""``pgbridge.client`` against real bridges: no event lost or repeated across SIGKILLed bridges, a
snapshot rebuilt exactly through dropped connections, tokens refreshed in band, errors that cannot be
retried raised, the connection limit's ``Retry-After`` obeyed, and the reconnection backoff."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import jwt
import orjson
import pytest
from aiohttp import web

from pgbridge import protocol
from pgbridge.client import (
    Change,
    Client,
    Event,
    ResyncRequired,
    SnapshotEnd,
    SnapshotRestarted,
    State,
    Subscription,
    backoff,
    token_expiry,
)
from pgbridge.errors import PgBridgeError, SubscriptionRefused, TokenRefused
from tests.db.test_recovery import POSTS, write_for
from tests.helpers import SECRET, Ledger, free_port, token, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes


def test_importing_the_client_loads_neither_asyncpg_nor_the_server() -> None:
    check = (
        "import pgbridge.client, sys; assert 'asyncpg' not in sys.modules and 'pgbridge.server' not in sys.modules"
        " and 'pgbridge.hub' not in sys.modules,"
        " sorted(m for m in sys.modules if m.startswith(('pgbridge', 'asyncpg')))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


class Consumer:
    """Iterates a subscription in a task, keeping every event (and what it raised)."""

    def __init__(
        self, sub: Subscription, apply: Callable[[Event], None] | None = None, *, pause_at: int | None = None
    ) -> None:
        self.sub = sub
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._apply = apply
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self._pause_at = pause_at  # stop taking events after this many, until resume is set
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        try:
            async for event in self.sub:
                self.events.append(event)
                if self._apply is not None:
                    self._apply(event)
                if len(self.events) == self._pause_at:
                    self.paused.set()
                    await self.resume.wait()
        except PgBridgeError as exc:
            self.error = exc

    def changes(self) -> list[Change]:
        return [e for e in self.events if isinstance(e, Change) and e.type == "change"]

    def ledger(self) -> Ledger:
        ledger = Ledger()
        ledger.add({"type": f"{e.collection}.{e.op}", "id": e.id, "data": e.data} for e in self.changes())
        return ledger

    async def stop(self) -> None:
        await self.sub.unsubscribe()
        await self.task


# -- no loss across bridge crashes --------------------------------------------------------------------


async def test_a_client_across_two_sigkilled_bridges_receives_every_committed_row_once_in_order(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    await db.execute(POSTS)
    port = free_port()  # every bridge listens here: the client reconnects to the same URL
    bridge = bridge_process(dsn, port)
    await bridge.ready()
    states: list[State] = []
    stop = asyncio.Event()
    writers: list[asyncio.Task[int]] = []
    url = f"ws://127.0.0.1:{port}{protocol.WS_PATH}"
    async with Client(url, token=token(), base_delay=0.05, max_delay=0.5,
                      on_state=lambda state, _: states.append(state)) as client:  # fmt: skip
        consumer = Consumer(client.subscribe("posts"))
        await consumer.sub.ready()
        writers = [asyncio.create_task(write_for(dsn, stop, i)) for i in range(3)]
        for restart in range(2):
            received = len(consumer.events)
            await wait_for(lambda n=received: len(consumer.events) >= n + 30, what="events from this bridge")
            bridge.proc.kill()
            await asyncio.to_thread(bridge.proc.wait)
            committed = await db.fetchval("SELECT count(*) FROM posts")
            # the writers go on committing while no bridge runs
            await wait_for(lambda n=committed: _count(db, n + 20), what="rows committed while no bridge runs")
            bridge = bridge_process(dsn, port)
            await bridge.ready()
            await wait_for(lambda r=restart: client.connections == r + 2, what="the client to reconnect")
        received = len(consumer.events)
        await wait_for(lambda: len(consumer.events) >= received + 30, what="events from the third bridge")
        stop.set()
        commits = sum(await asyncio.gather(*writers))
        rows = await db.fetchval("SELECT count(*) FROM posts")
        await wait_for(lambda: len(consumer.changes()) >= rows, what=f"the {rows} committed rows to arrive")
        await consumer.stop()
    assert commits > 50 and consumer.error is None
    await consumer.ledger().verify(db, "posts")
    assert len(consumer.changes()) == rows
    assert client.connections == 3 and consumer.sub.subscribed == 3 and consumer.sub.dropped == 0
    assert states.count(State.CONNECTED) == 3 and states[-1] is State.CLOSED
    assert consumer.sub.last_id == consumer.changes()[-1].id


async def _count(db: asyncpg.Connection, at_least: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM posts") >= at_least)


async def _changes_logged(db: asyncpg.Connection, at_least: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM pgbridge.changes") >= at_least)


# -- a snapshot rebuilt exactly, through dropped connections ----------------------------------------

ITEMS = """CREATE TABLE items (id int PRIMARY KEY, account int NOT NULL, n int NOT NULL, secret text, pad text);
           SELECT pgbridge.publish('items', '{secret}')"""


async def _write_items(dsn: str, stop: asyncio.Event, seed: int, count: int) -> int:
    """Insert, update (moving rows in and out of ``n >= 50``) and delete until ``stop``."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(dsn)
    done = 0
    try:
        while not stop.is_set():
            row, op = rng.randrange(count + 200), rng.random()
            if op < 0.4:
                await conn.execute(
                    "INSERT INTO items VALUES ($1, $2, $3, 'hidden', 'p')"
                    " ON CONFLICT (id) DO UPDATE SET n = items.n + 1",
                    row, rng.choice((1, 2)), rng.randrange(100),
                )  # fmt: skip
            elif op < 0.85:
                await conn.execute("UPDATE items SET n = $2, account = $3 WHERE id = $1", row, rng.randrange(100),
                                   rng.choice((1, 2)))  # fmt: skip
            else:
                await conn.execute("DELETE FROM items WHERE id = $1", row)
            done += 1
            await asyncio.sleep(0.001)
    finally:
        await conn.close()
    return done


class Rebuilt:
    """What a consumer of a filtered snapshot subscription holds: the rows it currently sees. An update
    reaches the subscription when the old or the new row matches; ``keep`` says whether the row stays."""

    def __init__(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.keep = keep
        self.snapshot_rows = 0

    def apply(self, event: Event) -> None:
        if isinstance(event, SnapshotRestarted):
            self.rows.clear()  # what the interrupted snapshot gave is forgotten
            self.snapshot_rows = 0
        elif isinstance(event, ResyncRequired):
            raise AssertionError(f"unexpected {event}")
        elif isinstance(event, Change):
            row = {k: v for k, v in event.data.items() if k != "pad"}
            assert "secret" not in event.data and "secret" not in (event.old or {}), event
            if event.op == "snapshot":
                self.snapshot_rows += 1
                self.rows[row["id"]] = row
            elif event.op == "create":
                self.rows[row["id"]] = row
            elif event.op == "update":
                assert event.old is not None
                self.rows.pop(event.old["id"], None)
                if self.keep(row):
                    self.rows[row["id"]] = row
            else:
                self.rows.pop(row["id"], None)


def _abort_sessions(running: Any) -> int:
    """Cut every client's connection from the server's side, as a network failure would."""
    sessions = list(running.bridge.sessions)
    for session in sessions:
        session.transport.abort()
    return len(sessions)


async def test_a_filtered_snapshot_rebuilds_the_table_exactly_through_dropped_connections(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    count = 20_000  # about 10 MB of matching rows: more than sockets buffer, so a drop comes mid-snapshot
    await db.execute(ITEMS)
    await db.execute(
        "INSERT INTO items SELECT g, 1 + g % 2, g % 100, 'hidden', repeat('x', 1000) FROM generate_series(1, $1) g",
        count,
    )
    running = await start_bridge(dsn)
    state = Rebuilt(lambda row: row["n"] >= 50)
    stop = asyncio.Event()
    writers = [asyncio.create_task(_write_items(dsn, stop, seed, count)) for seed in range(3)]
    try:
        async with Client(running.url(), token=token(), base_delay=0.05, max_delay=0.2, max_queue=50) as client:
            await wait_for(lambda: _changes_logged(db, 30), what="the writers to be under way")
            sub = client.subscribe("items", filter={"n": {"gte": 50}}, snapshot=True)
            consumer = Consumer(sub, state.apply, pause_at=500)  # and the socket fills up behind it
            await asyncio.wait_for(consumer.paused.wait(), 30)
            assert _abort_sessions(running) == 1  # a drop during the snapshot: it has no position to resume from
            assert running.bridge.snapshot_rows == 0, "the first snapshot ended before the drop"
            consumer.resume.set()
            await wait_for(lambda: any(isinstance(e, SnapshotEnd) for e in consumer.events), timeout=60,
                           what="the restarted snapshot to end")  # fmt: skip
            await wait_for(lambda: len(consumer.changes()) >= 20, what="changes after the snapshot")
            assert _abort_sessions(running) == 1  # a drop after it: resumed after the last event
            await wait_for(lambda: client.connections == 3, what="the client to reconnect")
            await wait_for(lambda: len(consumer.changes()) >= 100, what="changes after the second drop")
            stop.set()
            written = sum(await asyncio.gather(*writers))
            # a last change, committed after every other: once it is applied, so is everything before it
            await db.execute("INSERT INTO items VALUES (-1, 1, 99, 'hidden', 'last')")
            await wait_for(lambda: -1 in state.rows, what="the last change")
            await consumer.stop()
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
    expected = {r["id"]: dict(r) for r in await db.fetch("SELECT id, account, n FROM items WHERE n >= 50")}
    assert written > 100 and consumer.error is None
    kinds = [type(e).__name__ for e in consumer.events if not isinstance(e, Change)]
    assert kinds == ["SnapshotRestarted", "SnapshotEnd"], kinds
    restarted = next(e for e in consumer.events if isinstance(e, SnapshotRestarted))
    assert restarted.reason == "connection lost" and restarted.collection == "items"
    assert consumer.events.index(restarted) > 0  # rows of the interrupted snapshot came before it
    assert state.snapshot_rows > count // 3
    assert state.rows == expected
    updates = [e for e in consumer.changes() if e.op == "update"]
    assert any(e.data["n"] < 50 for e in updates), "no update showed a row leaving the filter"
    ids = [e.id for e in consumer.changes()]
    assert len(set(ids)) == len(ids) and consumer.sub.dropped == 0
    keys = [tuple(map(int, i.split("."))) for i in ids if i is not None]
    assert keys == sorted(keys)


# -- tokens -------------------------------------------------------------------------------------------


class Tokens:
    """A ``get_token`` that hands out ``first``, then tokens from ``then``, counting the calls."""

    def __init__(self, first: str, then: Callable[[], str]) -> None:
        self.first, self.then = first, then
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        return self.first if self.calls == 1 else self.then()


def _signed(secret: str = SECRET, ttl: float = 600, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "tester", "iat": now, "exp": now + ttl, "collections": "*", **claims}, secret,
                      algorithm="HS256")  # fmt: skip


async def test_a_refreshed_token_keeps_the_one_connection_past_the_first_tokens_expiry(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    short = token(ttl=4)
    first_exp = token_expiry(short)
    assert first_exp is not None and first_exp == jwt.decode(short, SECRET, algorithms=["HS256"])["exp"]
    tokens = Tokens(short, lambda: token(ttl=600))
    async with Client(running.url(), get_token=tokens) as client:
        consumer = Consumer(client.subscribe("posts"))
        await consumer.sub.ready()
        await wait_for(lambda: client.refreshes >= 1, what="the token to be refreshed")
        refreshed_at = time.time()
        await wait_for(lambda: time.time() > first_exp + 1, what="the first token's expiry to pass")
        await db.execute("INSERT INTO posts (title) VALUES ('still here')")
        await wait_for(lambda: len(consumer.events) == 1, what="the row")
        await consumer.stop()
    assert refreshed_at < first_exp
    assert [e.data["title"] for e in consumer.changes()] == ["still here"]
    assert tokens.calls == 2 and client.attempts == 1 and client.connections == 1
    assert running.bridge.refreshes["accepted"] >= 1 and running.bridge.refreshes["refused"] == 0
    assert running.bridge.closed["Token expired"] == 0


async def test_a_token_refused_after_a_refresh_is_raised(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn)
    tokens = Tokens(token(ttl=4), lambda: _signed(sub="mallory"))
    async with Client(running.url(), get_token=tokens) as client:
        consumer = Consumer(client.subscribe("posts"))
        await asyncio.wait_for(consumer.task, 10)
    assert isinstance(consumer.error, TokenRefused)
    assert consumer.error.reason == (
        "Refresh refused: The new token is for another subject (sub); connect again to change it;"
        " the current token stands"
    )
    assert tokens.calls == 3  # the first token, then a second chance for get_token before giving up
    assert running.bridge.refreshes["refused"] == 2 and running.bridge.closed["Token expired"] == 0
    assert client.state is State.CLOSED and client.error is consumer.error


async def test_a_token_refused_at_connect_is_replaced_once_then_raised(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    bad = Tokens(_signed(secret="another-secret-of-enough-bytes-for-hs256"), lambda: _signed(ttl=-10))
    client = Client(running.url(), get_token=bad)
    with pytest.raises(TokenRefused) as refused:
        async with client:
            await client.connected()
    assert refused.value.reason == "Token expired"  # the second token's refusal, after the first's
    assert bad.calls == 2 and client.attempts == 2 and client.connections == 0
    assert client.disconnect is not None and client.disconnect.code == 1008
    assert running.bridge.closed["Authentication failed"] == 1 and running.bridge.closed["Token expired"] == 1
    # a token replaced once is enough when the new one is good
    fixed = Tokens(_signed(secret="another-secret-of-enough-bytes-for-hs256"), lambda: token())
    async with Client(running.url(), get_token=fixed) as client:
        await client.subscribe("posts").ready()
    assert fixed.calls == 2 and client.connections == 1
    # without get_token, nothing can replace it: raised at the end of the block that did not see it
    client = Client(running.url(), token=_signed(ttl=-10))
    with pytest.raises(TokenRefused, match="Token expired"):
        async with client:
            await wait_for(lambda: client.state is State.CLOSED, what="the client to give up")
    assert client.attempts == 1


# -- subscriptions refused ----------------------------------------------------------------------------


async def test_subscriptions_the_server_refuses_raise_and_the_others_go_on(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    await db.execute("CREATE TABLE notes (id int); SELECT pgbridge.publish('notes')")
    running = await start_bridge(dsn, max_filter_cost=2)
    await wait_for(lambda: "notes" in (running.bridge.publications or ()), what="the new publication")
    async with Client(running.url(), token=token(collections=["posts", "notes"])) as client:
        posts_sub = Consumer(client.subscribe("posts"))
        hidden = client.subscribe("orders")
        with pytest.raises(SubscriptionRefused) as not_allowed:
            await hidden.ready()
        assert not_allowed.value.text == "Collection 'orders' is not published or not allowed for this token"
        assert not_allowed.value.collection == "orders"
        with pytest.raises(SubscriptionRefused):
            await anext(hidden)  # the iterator raises it too
        costly = client.subscribe("notes", filter={"id": {"in": [1, 2, 3]}})
        with pytest.raises(SubscriptionRefused, match="Filters too complex: at most 2 conditions per connection"):
            async for _ in costly:
                pass
        # what the server would refuse is refused before it is sent, with the server's text
        with pytest.raises(SubscriptionRefused) as malformed:
            client.subscribe("notes", filter={"id": {"like": 1}})
        assert malformed.value.text.startswith("Invalid filter: unknown operator 'like' on id")
        with pytest.raises(SubscriptionRefused, match="Invalid limit: a positive integer, only with snapshot"):
            client.subscribe("notes", limit=10)
        with pytest.raises(SubscriptionRefused, match="Invalid since"):
            client.subscribe("notes", since="yesterday")
        await posts_sub.sub.ready()
        await db.execute("INSERT INTO posts (title) VALUES ('unaffected')")
        await wait_for(lambda: len(posts_sub.events) == 1, what="the row")
        assert client.state is State.CONNECTED and client.connections == 1
        assert [s.collection for s in client.subscriptions] == ["posts"]
        await posts_sub.stop()


async def test_a_subscription_a_refreshed_token_no_longer_allows_is_raised(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges
) -> None:
    await db.execute("CREATE TABLE notes (id int); SELECT pgbridge.publish('notes')")
    running = await start_bridge(dsn)
    await wait_for(lambda: "notes" in (running.bridge.publications or ()), what="the new publication")
    tokens = Tokens(token(ttl=4), lambda: _signed(collections={"notes": "*", "posts": ["delete"]}))
    async with Client(running.url(), get_token=tokens) as client:
        posts_sub, notes_sub = Consumer(client.subscribe("posts")), Consumer(client.subscribe("notes"))
        await asyncio.wait_for(posts_sub.task, 10)
        await db.execute("INSERT INTO notes VALUES (1)")
        await wait_for(lambda: len(notes_sub.events) == 1, what="the note")
        await notes_sub.stop()
    assert isinstance(posts_sub.error, SubscriptionRefused)
    assert posts_sub.error.text == "The new token does not allow this subscription"
    assert client.refreshes == 1 and client.connections == 1


# -- the connection limit and the backoff -------------------------------------------------------------


class Sleeps:
    """A ``sleep`` that records what it is asked to wait and when, then waits (or, ``real=False``, not)."""

    def __init__(self, *, real: bool = True) -> None:
        self.delays: list[float] = []
        self.at: list[float] = []
        self.real = real

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.at.append(time.monotonic())
        await asyncio.sleep(delay if self.real else 0)


async def test_a_bridge_at_its_connection_limit_is_retried_when_it_says(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn, max_connections=1)
    sleeps = Sleeps()
    client = Client(running.url(), token=token(), sleep=sleeps)
    try:
        async with running.connect():  # the one connection the bridge takes
            await wait_for(lambda: len(running.bridge.sessions) == 1, what="the first connection")
            await client.start()
            await wait_for(lambda: client.disconnect is not None, what="the refused attempt")
            refused = time.monotonic()
            assert client.disconnect is not None
            assert (client.disconnect.status, client.disconnect.retry_after) == (503, 5.0)
            assert client.state is State.CONNECTING
        # the slot is free at once, but the client waits as it was told
        await asyncio.wait_for(client.connected(), 15)
        waited = time.monotonic() - refused
        assert sleeps.delays == [5.0] and client.attempts == 2
        assert waited >= 4.8, waited
        assert running.bridge.closed["Connection limit"] == 1
    finally:
        await client.close()


async def test_reconnection_delays_grow_with_jitter_up_to_the_cap(start_bridge: Bridges) -> None:
    closed = f"ws://127.0.0.1:{free_port()}{protocol.WS_PATH}"  # nothing listens there
    sleeps = Sleeps()
    base, cap = 0.005, 0.08
    async with Client(closed, token=token(), base_delay=base, max_delay=cap, sleep=sleeps) as client:
        await wait_for(lambda: len(sleeps.delays) >= 40, what="40 retries")
        assert client.state is State.CONNECTING and client.connections == 0
        assert client.disconnect is not None and client.disconnect.code is None  # no WebSocket was made
    delays = sleeps.delays[:40]
    assert client.attempts >= 40
    bounds = [min(cap, base * 2**k) for k in range(40)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True)), delays
    capped = delays[5:]  # from the 5th retry on, the cap bounds them
    assert max(capped) > 0.6 * cap  # they reach up to the cap...
    assert len(set(capped)) == len(capped) and min(capped) < 0.4 * cap  # ...at random below it (jitter)
    assert sum(delays[:3]) / 3 < sum(capped) / len(capped)  # and grew to get there
    # measured: the time between two retries is the delay asked for, plus the failed attempt; uvloop's
    # timers round to whole milliseconds, so a wait may end a little early
    gaps = [b - a for a, b in zip(sleeps.at, sleeps.at[1:40], strict=False)]
    assert all(d - 0.002 <= g < d + 2 for d, g in zip(delays, gaps, strict=False)), (delays, gaps)


async def test_the_default_backoff_is_full_jitter_from_half_a_second_to_twenty() -> None:
    sleeps = Sleeps(real=False)
    closed = f"ws://127.0.0.1:{free_port()}{protocol.WS_PATH}"
    async with Client(closed, token=token(), random=lambda: 1.0, sleep=sleeps):  # the top of each range
        await wait_for(lambda: len(sleeps.delays) >= 9, what="9 retries")
    assert sleeps.delays[:9] == [0.5, 1, 2, 4, 8, 16, 20, 20, 20]
    assert [backoff(k, random=lambda: 0.25) for k in range(8)] == [0.125, 0.25, 0.5, 1, 2, 4, 5, 5]
    rng = random.Random(1)
    samples = [backoff(3, random=rng.random) for _ in range(1000)]
    assert 0 <= min(samples) < 0.2 and 3.8 < max(samples) <= 4.0  # uniform over [0, 4]
    assert backoff(10_000) <= 20.0


async def test_a_connection_that_stayed_up_is_retried_at_once(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn)
    for stable_after, retried_at_once in ((0.0, True), (3600.0, False)):
        sleeps = Sleeps()
        async with Client(running.url(), token=token(), sleep=sleeps, base_delay=0.05, random=lambda: 1.0,
                          stable_after=stable_after) as client:  # fmt: skip
            await client.subscribe("posts").ready()
            for connections in (1, 2):
                _abort_sessions(running)
                await wait_for(lambda n=connections: client.connections == n + 1, what="the client to reconnect")
        # after a connection that stayed up, the first retry is at once; else the backoff goes on growing
        assert sleeps.delays == ([] if retried_at_once else [0.05, 0.1]), (stable_after, sleeps.delays)


# -- what a bridge never does, from a scripted server -------------------------------------------------


class Scripted:
    """A WebSocket server that answers subscriptions from a script (``replies``: connection number and
    request to frames), to show the client what a real bridge never sends: repeated or older events."""

    def __init__(self, replies: Callable[[int, dict[str, Any]], list[protocol.Message | int]]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests: list[tuple[int, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("bearer",))
        await ws.prepare(request)
        self.connections += 1
        connection = self.connections
        async for frame in ws:
            message = orjson.loads(frame.data)
            if message["action"] == "ping":
                await ws.send_str(protocol.pong().json.decode())
                continue
            self.requests.append((connection, message))
            if message["action"] == "unsubscribe":
                await ws.send_str(protocol.unsubscribed(message["collection"]).json.decode())
                continue
            for reply in self.replies(connection, message):
                if isinstance(reply, int):
                    await ws.close(code=reply, message=b"Slow consumer")
                    return ws
                await ws.send_str(reply.json.decode())
        return ws

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get(protocol.WS_PATH, self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"ws://127.0.0.1:{self._runner.addresses[0][1]}{protocol.WS_PATH}"

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def _take(sub: Subscription, count: int) -> list[Event]:
    """The next ``count`` events of ``sub`` (failing, rather than hanging, when they do not come)."""
    async with asyncio.timeout(10):
        return [await anext(sub) for _ in range(count)]


def _event(id: str, title: str) -> protocol.Message:
    return protocol.data_event("posts", "create", "2026-01-17T12:34:56.789Z", id, orjson.dumps({"title": title}), None)


async def test_events_not_after_the_last_one_are_dropped_and_last_id_is_what_was_yielded() -> None:
    def replies(connection: int, request: dict[str, Any]) -> list[protocol.Message | int]:
        if connection == 1:
            return [protocol.subscribed("posts", (1, 0, 0)), _event("2.5.0", "a"), _event("2.5.0", "a again"),
                    _event("2.4.0", "older"), _event("3.1.0", "b"), 1013]  # fmt: skip
        return [protocol.subscribed("posts", (3, 1, 0)), _event("3.1.0", "b again"), _event("3.2.0", "c"),
                protocol.resync_required("posts", "3.3.0"), _event("3.3.0", "at the truncate"),
                _event("4.1.0", "d")]  # fmt: skip

    scripted = Scripted(replies)
    async with scripted as url, Client(url, token=token(), base_delay=0.01) as client:
        sub = client.subscribe("posts")
        await wait_for(lambda: scripted.connections == 2 and len(scripted.requests) == 2, what="the reconnection")
        assert sub.last_id == "1.0.0"  # where it started: what was received since, this consumer has yet to take
        (first,) = await _take(sub, 1)  # received long ago, with every event of the first connection
        assert (first.id, sub.last_id) == ("2.5.0", "2.5.0")  # the position of what was yielded, not received
        rest = await _take(sub, 4)
    assert [(type(e).__name__, e.id) for e in [first, *rest]] == [
        ("Change", "2.5.0"), ("Change", "3.1.0"), ("Change", "3.2.0"), ("ResyncRequired", "3.3.0"), ("Change", "4.1.0"),
    ]  # fmt: skip
    assert [e.data["title"] for e in [first, *rest] if isinstance(e, Change)] == ["a", "b", "c", "d"]
    assert sub.dropped == 4 and sub.last_id == "4.1.0"
    assert [r for _, r in scripted.requests] == [
        {"action": "subscribe", "collection": "posts"},
        {"action": "subscribe", "collection": "posts", "since": "3.1.0"},  # after the last received
    ]


async def test_a_snapshot_whose_events_were_lost_starts_again() -> None:
    def rows(*titles: str) -> list[protocol.Message | int]:
        return [protocol.snapshot_row("posts", orjson.dumps({"title": t})) for t in titles]

    def replies(connection: int, request: dict[str, Any]) -> list[protocol.Message | int]:
        if len(scripted.requests) == 1:
            return [protocol.subscribed("posts", None), *rows("a", "b"), protocol.snapshot_end("posts", (4, 7, 0)),
                    _event("5.1.0", "c"), protocol.resync_required("posts")]  # fmt: skip
        if len(scripted.requests) == 2:
            return [protocol.subscribed("posts", None), *rows("a", "c"), protocol.snapshot_end("posts", (6, 1, 0)),
                    _event("6.2.0", "d")]  # fmt: skip
        if "since" in request:
            return [protocol.subscribed("posts", (6, 2, 0)), _event("6.3.0", "e"), protocol.resync_required("posts")]
        return [protocol.subscribed("posts", None), *rows("z")]

    scripted = Scripted(replies)
    async with scripted as url, Client(url, token=token()) as client:
        sub = client.subscribe("posts", snapshot=True)
        events = await _take(sub, 9)
        assert client.connections == 1
        await sub.unsubscribe()
        # a position persisted earlier: continued after it, and a snapshot again once events are lost
        resumed = client.subscribe("posts", snapshot=True, since=sub.last_id)
        more = await _take(resumed, 3)
    assert [(e.type, e.id, e.data["title"] if e.data else None) for e in events] == [
        ("snapshot", None, "a"), ("snapshot", None, "b"), ("snapshot_end", "4.7.0", None), ("change", "5.1.0", "c"),
        ("snapshot_restarted", None, None), ("snapshot", None, "a"), ("snapshot", None, "c"),
        ("snapshot_end", "6.1.0", None), ("change", "6.2.0", "d"),
    ]  # fmt: skip
    restarted = events[4]
    assert isinstance(restarted, SnapshotRestarted) and restarted.reason == "resync required"
    assert [(e.type, e.id) for e in more] == [("change", "6.3.0"), ("snapshot_restarted", None), ("snapshot", None)]
    assert [r for _, r in scripted.requests] == [
        {"action": "subscribe", "collection": "posts", "snapshot": True},  # the same connection, again:
        {"action": "subscribe", "collection": "posts", "snapshot": True},
        {"action": "unsubscribe", "collection": "posts"},
        {"action": "subscribe", "collection": "posts", "since": "6.2.0"},
        {"action": "subscribe", "collection": "posts", "snapshot": True},
    ]


async def test_what_the_server_asks_to_subscribe_again_is_retried() -> None:
    """The texts a bridge sends while its database is away, the only refusals that pass."""

    def replies(connection: int, request: dict[str, Any]) -> list[protocol.Message | int]:
        attempt = len(scripted.requests)
        if attempt == 1:  # a bridge whose database has not answered yet
            return [protocol.error("The database is unavailable; subscribe again shortly", action="subscribe",
                                   collection="posts")]  # fmt: skip
        if attempt == 2:  # a snapshot the database stopped answering in the middle of
            return [protocol.subscribed("posts", None), protocol.snapshot_row("posts", b'{"title": "a"}'),
                    protocol.error("The snapshot of 'posts' failed: the database did not answer; subscribe again",
                                   action="subscribe", collection="posts")]  # fmt: skip
        return [protocol.subscribed("posts", None), protocol.snapshot_row("posts", b'{"title": "b"}'),
                protocol.snapshot_end("posts", (3, 1, 0))]  # fmt: skip

    scripted = Scripted(replies)
    async with scripted as url, Client(url, token=token(), base_delay=0.01) as client:
        sub = client.subscribe("posts", snapshot=True, limit=10)
        events = await _take(sub, 4)
        assert client.connections == 1 and sub.subscribed == 2
    assert [(e.type, e.data and e.data["title"]) for e in events] == [
        ("snapshot", "a"), ("snapshot_restarted", None), ("snapshot", "b"), ("snapshot_end", None),
    ]  # fmt: skip
    assert isinstance(events[1], SnapshotRestarted) and events[1].reason == "snapshot failed"
    assert [r for _, r in scripted.requests] == [
        {"action": "subscribe", "collection": "posts", "snapshot": True, "limit": 10}
    ] * 3

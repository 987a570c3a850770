"""The bridge's shared state and work: sessions, the listener and the router, admission, the database
pool for catching up and snapshots, and the side tasks (heartbeats, pings, the watchdog, maintenance).

It knows no transport: the WebSocket and SSE endpoints admit clients through :meth:`Bridge.admit` and
serve them as :class:`~pgbridge.session.Session` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from pgbridge import changelog, database, protocol
from pgbridge.auth import Grant, TokenPolicy
from pgbridge.config import Settings
from pgbridge.errors import AuthError, DatabaseUnavailable
from pgbridge.events import Change
from pgbridge.feed import Feed, Turns
from pgbridge.history import History
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.logs import OncePer
from pgbridge.metrics import Rate
from pgbridge.protocol import Close
from pgbridge.relay import RelayServer
from pgbridge.router import Router, Subscription
from pgbridge.session import Session

log = logging.getLogger(__name__)

SNAPSHOT_CURSOR = "pgbridge_snapshot"
_SNAPSHOT_NAME = re.compile(r"[0-9A-Fa-f-]+")
_SNAPSHOT_PAGE_BYTES = 4 << 20  # about this many bytes of rows per fetch of a snapshot


@dataclass(eq=False)
class Bridge:
    """Everything the endpoints share."""

    settings: Settings
    tokens: TokenPolicy
    max_connections: int = 0
    router: Router = field(init=False)
    history: History = field(init=False)
    listener: Listener = field(init=False)
    sessions: set[Session] = field(default_factory=set)
    handshakes: int = 0
    per_subject: Counter[str] = field(default_factory=Counter)
    cost_per_subject: Counter[str] = field(default_factory=Counter)
    feeds: set[Feed] = field(default_factory=set)
    turns: Turns = field(default_factory=Turns)
    """Catching-up feeds' turns on the event loop."""
    publications: frozenset[str] | None = None
    stats: changelog.Stats | None = None
    capture_problems: dict[str, str] = field(default_factory=dict)
    """Published collections whose capture does not fire, and why (see :func:`changelog.capture_problems`)."""
    pool: asyncpg.Pool | None = None
    replay_slots: asyncio.Semaphore = field(init=False)
    snapshot_slots: asyncio.Semaphore = field(init=False)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    closed: Counter[str] = field(default_factory=Counter)
    """Connections closed or refused by the server, by reason."""
    catchup_reads: int = 0
    catchup_rate: Rate = field(default_factory=Rate)
    catchup_failures: int = 0
    """Reads of the change log for catching-up clients that failed (each is retried)."""
    catchup_failure: tuple[str, float] | None = None
    """The last of them: the kind of error (a class name, which names no host or role), and when (monotonic)."""
    replays: int = 0
    refreshes: Counter[str] = field(default_factory=Counter)
    snapshots: int = 0
    snapshot_rows: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    task_failures: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Side tasks that failed: the error, and when (they are restarted)."""
    task_failure_count: Counter[str] = field(default_factory=Counter)
    _unflushed: list[Session] = field(default_factory=list)
    _shed_log: OncePer = field(default_factory=OncePer)

    def __post_init__(self) -> None:
        s = self.settings
        self.router = Router(s.tenant_column, self._fell_behind, s.routing_budget)
        self.history = History(s.history_bytes)
        self.listener = Listener(
            ListenerSettings(
                s.dsn if s.listen_dsn is None else s.listen_dsn,
                probe_interval=s.probe_interval,
                probe_timeout=s.probe_timeout,
                poll_interval=s.poll_interval,
                follow_only=s.follow_only,
            ),
            self.router.route,
            self._set_publications,
            self.history,
            self._gap,
            None if s.relay_port < 0 or s.follow_only else RelayServer(s.host, s.relay_port, s.advertise_host),
        )
        self.replay_slots = asyncio.Semaphore(s.max_replays)
        self.snapshot_slots = asyncio.Semaphore(s.max_snapshots)

    # -- admission: one path for every transport ------------------------------------------------------

    def full(self) -> bool:
        """Whether the process is at ``--max-connections`` (new clients get 503)."""
        if len(self.sessions) + self.handshakes < self.max_connections:
            return False
        self.closed["Connection limit"] += 1
        if self._shed_log():
            log.warning("refusing new connections: the connection limit is reached (reported once a minute)")
        return True

    def admit(self, token: str | None) -> Grant:
        """The grant of a new client's token; raise :class:`AuthError` with the reason to give it."""
        try:
            grant = self.tokens.verify(token)
            if self.per_subject[grant.subject] >= self.settings.max_connections_per_subject:
                raise AuthError("Too many connections for this token")
        except AuthError as exc:
            self.closed[exc.reason] += 1
            raise
        return grant

    # -- what sessions share --------------------------------------------------------------------------

    def to_flush(self, session: Session) -> None:
        """Have ``session`` write what it queued at the end of this loop turn, with every other session
        that did: one callback for a broadcast to thousands rather than one each."""
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unflushed.append(session)

    def _flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for session in unflushed:
            session.flush()

    def sent(self, messages: int, size: int) -> None:
        self.frames_sent += messages
        self.bytes_sent += size

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` in the background; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _set_publications(self, collections: frozenset[str]) -> None:
        self.publications = collections

    def _fell_behind(self, sub: Subscription, change: Change, row: int) -> None:
        sink = sub.sink
        assert isinstance(sink, Session)
        sink.fell_behind(sub, change, row)

    def _gap(self) -> None:
        """Changes were lost to retention before they were routed: every live subscription must resync."""
        for session in list(self.sessions):
            for sub in self.router.subscriptions(session).values():
                session.send(protocol.resync_required(sub.collection))

    def catch_up_lag(self) -> float:
        """Seconds since the oldest change a catching-up client still waits for was made (0: none waits)."""
        now = time.time()
        return max((_age(feed.at, now) for feed in self.feeds), default=0.0)

    def catch_up_lag_events(self) -> int:
        """Positions the furthest catching-up client has yet to pass (0: none is behind)."""
        return max((feed.lag or 0 for feed in self.feeds), default=0)

    def furthest_behind(self, limit: int = 10) -> list[dict[str, object]]:
        """The catching-up feeds furthest behind, each with its lag in events (None while a resumed one
        is being counted) and in seconds."""
        now = time.time()
        lags = ((feed.lag, _age(feed.at, now), feed) for feed in self.feeds)
        return [
            {"client": feed.client, "collection": ",".join(feed.collections), "lag_events": events,
             "lag_seconds": round(seconds, 3)}
            for events, seconds, feed in heapq.nlargest(limit, lags, key=lambda f: (f[0] or 0, f[1]))
        ]  # fmt: skip

    # -- the database, for catching up and snapshots --------------------------------------------------

    async def read(
        self, after: tuple[int, int], upto: int, collections: tuple[str, ...]
    ) -> tuple[list[Change], tuple[int, int]]:
        """The change log as catching-up clients read it."""

        async def query(conn: asyncpg.Connection) -> tuple[list[Change], tuple[int, int]]:
            self.catchup_reads += 1
            self.catchup_rate.add(time.monotonic())
            return await changelog.read(conn, after, upto, collections)

        found: tuple[list[Change], tuple[int, int]] = await self._with_pool(query)
        return found

    async def locate(self, change_id: int) -> int | None:
        tick: int | None = await self._with_pool(lambda conn: changelog.locate(conn, change_id))
        return tick

    async def count(self, after: tuple[int, int], upto: tuple[int, int], collections: tuple[str, ...]) -> int:
        found: int = await self._with_pool(lambda conn: changelog.count(conn, after, upto, collections))
        return found

    def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise DatabaseUnavailable("the bridge is starting")
        return self.pool

    async def _with_pool(self, query: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run ``query`` for a client catching up or resuming: at most ``--max-replays`` at a time."""
        pool = self._pool()
        try:
            with database.errors():
                async with self.replay_slots, pool.acquire() as conn:
                    return await query(conn)
        except DatabaseUnavailable as exc:
            self.catchup_failures += 1
            self.catchup_failure = (type(exc.__cause__ or exc).__name__, time.monotonic())
            raise

    @contextlib.asynccontextmanager
    async def snapshot(self, collection: str) -> AsyncIterator[tuple[int, AsyncIterator[list[bytes]]]]:
        """The rows of ``collection`` read in one database snapshot, page by page, and the tick that snapshot
        is: every change of a transaction it saw is at or before that tick, every other one after it.

        At most ``--max-snapshots`` run at once; more wait their turn.
        """
        pool = self._pool()
        async with self.snapshot_slots, _acquired(pool) as reader:
            with database.errors():
                tick = await self._snapshot_tick(pool, reader)
                await reader.execute(f"SELECT pgbridge.snapshot_v3($1, '{SNAPSHOT_CURSOR}')", collection)
            self.snapshots += 1
            pages = self._pages(reader)
            try:
                yield tick, pages
            finally:
                await pages.aclose()

    async def _snapshot_tick(self, pool: asyncpg.Pool, reader: asyncpg.Connection) -> int:
        """Start ``reader``'s transaction on the snapshot of a tick; return the tick.

        The tick's snapshot is exported by the transaction that takes it, imported by the reader before that
        transaction ends (PostgreSQL allows no later), and the tick committed durably before it is used.
        """
        async with pool.acquire() as ticker, ticker.transaction():
            await ticker.execute("SET LOCAL synchronous_commit = on")
            row = await ticker.fetchrow("SELECT n, snapshot FROM pgbridge.tick_v3(true)")
            assert _SNAPSHOT_NAME.fullmatch(row["snapshot"]), row["snapshot"]
            await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await reader.execute(f"SET TRANSACTION SNAPSHOT '{row['snapshot']}'")
        return int(row["n"])

    async def _pages(self, reader: asyncpg.Connection) -> AsyncGenerator[list[bytes]]:
        """The snapshot's rows as JSON, a page at a time (about 4 MB of rows per page). The next page is
        fetched while the one before is sent: the database and the client work at once."""

        async def fetch(size: int) -> list[asyncpg.Record]:
            with database.errors():
                page: list[asyncpg.Record] = await reader.fetch(f"FETCH {size} FROM {SNAPSHOT_CURSOR}")
            return page

        ahead = asyncio.ensure_future(fetch(100))
        try:
            while True:
                page = [record[0].encode() for record in await ahead]
                if not page:
                    return
                size = max(1, min(1000, _SNAPSHOT_PAGE_BYTES * len(page) // max(sum(map(len, page)), 1)))
                ahead = asyncio.ensure_future(fetch(size))
                await asyncio.sleep(0)  # it sends its FETCH now, not when sending this page next waits
                yield page
        finally:
            if not ahead.done():
                ahead.cancel()
            with contextlib.suppress(BaseException):  # its error, if any, is the reader's, which goes back
                await ahead

    # -- running --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The listener and the side tasks, for as long as the bridge serves; all stopped and awaited after."""
        s = self.settings
        # A --dsn of a pooler in transaction mode, where asyncpg's statement cache fails, comes with a
        # --listen-dsn of its own (the listener refuses one that receives no notifications) or --follow-only.
        # A bridge with one DSN otherwise keeps the cache, which saves planning each catch-up read again (2 ms
        # of a 3 ms read of ten entries).
        pooled = s.follow_only or (s.listen_dsn is not None and s.listen_dsn != s.dsn)
        relay = self.listener.relay
        if relay is not None:
            await relay.start()
        try:
            self.pool = await asyncpg.create_pool(
                s.dsn, min_size=0, max_size=s.max_replays + 2 * s.max_snapshots + 1, timeout=10,
                server_settings={"application_name": "pgbridge"}, **(database.POOLED if pooled else {}),
            )  # fmt: skip
        except BaseException:
            if relay is not None:
                await relay.stop()
            raise
        tasks = [asyncio.create_task(self.listener.run(), name="pgbridge-listener")]
        for name, run in SIDE_TASKS.items():
            tasks.append(asyncio.create_task(_supervise(self, name, run), name=f"pgbridge-{name}"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *self.background, return_exceptions=True)
            if relay is not None:
                await relay.stop()
            await self.pool.close()

    async def close_all(self, code: int, reason: str) -> None:
        """Close every session (at shutdown)."""
        await asyncio.gather(*(session.close(code, reason) for session in list(self.sessions)), return_exceptions=True)


@contextlib.asynccontextmanager
async def _acquired(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pool connection whose transaction, if one is left open, is rolled back before it is returned."""
    with database.errors():
        conn: asyncpg.Connection = await pool.acquire()
    try:
        yield conn
    finally:
        # Shielded: a session cancelled while this runs would otherwise never return the connection.
        await asyncio.shield(_release(pool, conn))


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    try:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except database.DRIVER_ERRORS:
        pass  # the pool replaces a connection it cannot reset
    finally:
        await pool.release(conn)


def _age(timestamp: str | None, now: float) -> float:
    if timestamp is None:
        return 0.0
    return max(0.0, now - datetime.fromisoformat(timestamp).timestamp())


async def _heartbeats(bridge: Bridge) -> None:
    while True:
        await asyncio.sleep(bridge.settings.heartbeat)
        message = protocol.heartbeat()  # one message, encoded once per transport kind
        for n, session in enumerate(list(bridge.sessions), 1):
            session.send(message)
            if n % 1000 == 0:
                await asyncio.sleep(0)  # thousands of clients: let deliveries through meanwhile


async def _pings(bridge: Bridge) -> None:
    """Ping every client each ``--ping-interval``; close one that has shown no sign of life since the
    previous ping (a half-open connection). One task for all clients rather than timers for each."""
    interval = bridge.settings.ping_interval
    while interval:
        await asyncio.sleep(interval)
        now = time.monotonic()
        for n, session in enumerate(list(bridge.sessions), 1):
            if session.closing:
                continue
            if not session.alive(now):
                log.debug("%s: no answer to a ping for %gs; closing", session.id, interval, extra=session.fields())
                bridge.closed["No answer to ping"] += 1
                session.closing = True
                session.transport.abort()
                continue
            session.ping(now)
            if n % 1000 == 0:
                await asyncio.sleep(0)


async def _watchdog(bridge: Bridge) -> None:
    """Close clients whose token expired, that take no data at all for ``--stall-timeout``, and idle ones
    if asked to."""
    s = bridge.settings
    while True:
        await asyncio.sleep(min(1.0, s.stall_timeout / 4))
        now, wall = time.monotonic(), time.time()
        for session in list(bridge.sessions):
            # checked here rather than by timers per session: memory
            if session.closing:
                continue
            if session.expired(wall):
                session.close_soon(Close.POLICY, protocol.TOKEN_EXPIRED)
            elif session.stalled(now):
                log.info("%s: closing a client that took no data for %gs", session.id, s.stall_timeout,
                         extra=session.fields(code=Close.TRY_AGAIN_LATER))  # fmt: skip
                session.close_soon(Close.TRY_AGAIN_LATER, protocol.SLOW_CONSUMER)
            elif session.idle(now):
                session.close_soon(Close.NORMAL, f"No subscription for {s.idle_timeout:g}s")


async def _maintenance(bridge: Bridge) -> None:
    """Watch the change log and the publications' capture; prune the log (one replica at a time)."""
    s = bridge.settings
    next_prune = 0.0
    while True:
        try:
            with database.errors():
                async with bridge._pool().acquire() as conn:
                    bridge.stats = await changelog.stats(conn)
                    problems = await changelog.capture_problems(conn)
                    for collection in problems.keys() - bridge.capture_problems.keys():
                        log.error("the table of collection %s does not capture its changes: %s", collection,
                                  problems[collection], extra={"collection": collection})  # fmt: skip
                    bridge.capture_problems = problems
                    if time.monotonic() >= next_prune:
                        removed = await changelog.prune(
                            conn, max_age=s.retention_age, max_transactions=s.retention_transactions
                        )
                        if removed:
                            log.info("pruned %d transactions from the change log", removed)
                        next_prune = time.monotonic() + s.prune_interval
        except DatabaseUnavailable as exc:
            log.debug("maintenance skipped: %s", exc)
        await asyncio.sleep(s.stats_interval)


SIDE_TASKS: dict[str, Callable[[Bridge], Awaitable[None]]] = {
    "heartbeat": _heartbeats,
    "ping": _pings,
    "maintenance": _maintenance,
    "watchdog": _watchdog,
}


async def _supervise(bridge: Bridge, name: str, run: Callable[[Bridge], Awaitable[None]]) -> None:
    """Run a side task for as long as the bridge runs: one that fails is logged, shown in /healthz, restarted."""
    delay = 1.0
    while True:
        try:
            await run(bridge)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the %s task failed; restarting it in %gs", name, delay)
            bridge.task_failures[name] = (f"{type(exc).__name__}: {exc}", time.monotonic())
            bridge.task_failure_count[name] += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, 60.0)
        else:
            return

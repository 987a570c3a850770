"""The listener: one dedicated PostgreSQL connection that turns committed changes into routed rows.

Of the bridges on one database, one at a time is the ticker: it holds the ``ticker`` lease (a time,
renewed every quarter of it, taken over by another bridge once it lapses). Writers wake the ticker with
an empty notification on a channel whose name only pgbridge's roles can read (``pgbridge.channels``),
so no other role can flood it. Woken (or every poll interval), it records a tick (``pgbridge.tick_v3``),
and once the tick is durable it announces it: it records it in the lease and lets go of an advisory
lock the others wait on (``pgbridge.await_tick_v4``). The others LISTEN to nothing: PostgreSQL signals
every listening backend of a database at every commit that notifies, whatever the channel. The ticker
reads the new ticks' changes from the change log in position order and routes them row by row; it also
relays each page it routes to the other bridges (:mod:`pgbridge.relay`), which route it in turn, so a
follower costs the database nothing per tick. A follower that has no relay, or whose relay does not
continue from where it is, waits for the announcement and reads the change log itself. A bridge's
position is durable (ticks are), so after a lost connection it reconnects and continues from the row
after the last one it routed: every committed change is routed once, in order, whatever happened to
the connection. The lease query doubles as the liveness probe, with a timeout, so a
connection that stops answering is replaced.

While the NOTIFY queue is half full or more, writers send no wake-ups (a full queue would fail their
commits), so the ticker polls; and it registers its LISTEN again, which moves its backend's place in
the queue to the end, so that it is never what holds the queue back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import asyncpg

from pgbridge import changelog, database
from pgbridge.errors import ConnectionLost, Pruned
from pgbridge.events import MAX_ID, Change, Position
from pgbridge.history import History
from pgbridge.logs import OncePer
from pgbridge.metrics import Histogram
from pgbridge.relay import Page, RelayLink, RelayLost, RelayServer

log = logging.getLogger(__name__)

_YIELD_EVERY = 0.005  # seconds of routing between two yields to the event loop
_RELISTEN_EVERY = 1.0  # seconds between two re-registrations while the NOTIFY queue is too full
LEASE = 1.0
"""Seconds the ticker lease lasts: a ticker that dies is replaced within about this much more a quarter."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    dsn: str | None
    probe_interval: float = 5.0
    """Seconds between ticks when nothing wakes the listener; each tick is also a liveness probe."""
    probe_timeout: float = 5.0
    """Bounds every query on the connection, so that a dead connection is noticed."""
    poll_interval: float = 0.01
    """Seconds between ticks while some table is published without wake-ups."""
    flush_patience: float = 0.001
    """Seconds to wait for a writer's commit to flush a new tick before flushing it ourselves."""
    connect_timeout: float = 10.0
    backoff_max: float = 10.0
    follow_only: bool = False
    """Never take the ticks: the connection runs one-statement transactions only, so it may go through a
    transaction-mode pooler (no LISTEN, no prepared statement kept)."""


class Listener:
    """Routes every committed change through ``route(change, row)`` for as long as :meth:`run` runs.

    ``on_publications`` receives the set of published collections whenever it changes, ``on_gap`` is
    called when changes were lost to retention before they could be routed (every live subscriber must
    resync), and ``history`` receives each change before its rows are routed.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        route: Callable[[Change, int], None],
        on_publications: Callable[[frozenset[str]], None],
        history: History,
        on_gap: Callable[[], None] = lambda: None,
        relay: RelayServer | None = None,
    ) -> None:
        self._settings = settings
        self.relay = relay
        """Where this bridge relays its pages while it ticks (None: it does not)."""
        self.link: RelayLink | None = None
        """While it follows: its connection to the ticker's relay, if it has one."""
        self._link_retry = 0.0
        self._link_log = OncePer(60)
        self._awaited: int | None = None  # a tick announced at the last lease check and not routed then
        self._behind_log = OncePer(60)
        self.relayed_pages = 0
        """Pages of changes routed as the ticker's relay brought them."""
        self.log_reads = 0
        """Reads of ticks' changes from the change log."""
        self._route = route
        self._on_publications = on_publications
        self._on_gap = on_gap
        self.history = history
        self._after: tuple[int, int] | None = None  # the change log is read after this (tick, id)
        self._finished: tuple[int, datetime] | None = None  # the last tick routed whole, and when it was taken
        self.head: Position = (0, 0, 0)
        """The last row routed; ``(tick, MAX_ID, 0)`` once all of ``tick`` is."""
        self._advanced = asyncio.Event()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.connected = False
        self.problem: str | None = "not connected yet"
        self.delivered = 0
        self.routed: Counter[str] = Counter()
        """Rows routed so far (positions up to :attr:`head`), by collection: how far behind a client is."""
        self.reconnects = 0
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This listener's name in the ticker lease."""
        self.ticking = False
        """Whether this bridge holds the ticker lease: it takes the ticks, the others follow them."""
        self.ticks_taken = 0
        """Tick queries this listener ran (only while it is the ticker)."""
        self.takeovers = 0
        self._announced = 0
        self._held: int | None = None  # the tick whose advisory lock this ticker holds (see changelog.announce)
        self._lock_class = 0
        self.ticks_read = 0
        self.newest_tick = 0
        self.forced_flushes = 0
        self.latency = Histogram()
        """Seconds from each change's statement time in the database to its routing to clients."""
        self.queue_usage = 0.0
        """How full the NOTIFY queue was at the last tick (0 to 1)."""
        self._failures = 0
        self._crowded_log = OncePer(60)

    async def advanced(self) -> None:
        """Wait until :attr:`head` moves."""
        await self._advanced.wait()

    @property
    def routing(self) -> bool:
        """Whether live routing is under way: feeds wait meanwhile (:meth:`quiet`)."""
        return not self._quiet.is_set()

    async def quiet(self) -> None:
        """Wait until no live routing is under way. Feeds (catching up, or deferred past the routing
        budget) call it before each row, so that live clients never wait behind them: however many feeds
        there are, none runs between two slices of the listener's routing."""
        await self._quiet.wait()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with capped, jittered backoff."""
        unavailable_log = OncePer(60)
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                self.connected = False
                self.problem = database.describe(exc)
                if unavailable_log(self.problem):
                    log.warning("database connection unavailable: %s; reconnecting", self.problem)
            self.reconnects += 1
            delay = random.uniform(0, min(self._settings.backoff_max, 0.1 * 2 ** min(self._failures, 10)))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        s = self._settings
        # Ticks commit without a flush of their own (see changelog.durable), and see every commit.
        ticks = {"synchronous_commit": "off", "default_transaction_isolation": "read committed"}
        conn: asyncpg.Connection = await asyncpg.connect(
            s.dsn,
            timeout=s.connect_timeout,
            command_timeout=s.probe_timeout,
            server_settings={"application_name": "pgbridge-listener", **({} if s.follow_only else ticks)},
            **(database.POOLED if s.follow_only else {}),
        )
        lost = asyncio.Event()
        wake = asyncio.Event()

        def on_lost(_c: object) -> None:
            lost.set()
            wake.set()

        conn.add_termination_listener(on_lost)

        def on_wake(_c: object, _pid: int, _channel: str, _payload: str) -> None:
            wake.set()

        self.ticking = False
        try:
            if not s.follow_only:
                await database.check_notifications(conn, s.dsn, s.probe_timeout)
            await changelog.check_schema(conn)
            wake_channel = (await changelog.channels(conn))["wake"]
            if self._after is None:
                # Start from now: what committed before is for clients that ask with `since`. Clients can
                # subscribe only once the publications are known, below: the position they are told, and
                # go live from, is this one, never one before the listener has it.
                newest = await changelog.newest_tick(conn)
                self._after = (newest, MAX_ID)
                self.head = (newest, MAX_ID, 0)
                self.history.reset(self._after)
            elif self._finished is not None and await changelog.tick_time(conn, self._finished[0]) not in (
                None,  # pruned: the next read says so
                self._finished[1],
            ):
                # Ticks are durable before they are read, so only a database that lost committed data (a
                # failover to a replica that lagged, fsync off) gets here: say so rather than skip.
                log.error(
                    "tick %d, already delivered, is not the tick the database has now: it lost committed "
                    "data; every client is asked to resync", self._finished[0],
                )  # fmt: skip
                self._restart_at(await changelog.newest_tick(conn))
            polled = await self._publications(conn)
            self.connected, self.problem, self._failures = True, None, 0
            log.info("reading changes from tick %d", self._after[0])
            relistened = leased = -LEASE
            publications = ""
            while not lost.is_set():
                wake.clear()
                if time.monotonic() - leased >= LEASE / 4:
                    leased = time.monotonic()
                    ours = None if self.relay is None else self.relay.address
                    lease = await changelog.lease(conn, self.holder, LEASE, ours, take=not s.follow_only)
                    self.queue_usage, self._lock_class = lease.queue, lease.key
                    if lease.publications != publications:
                        polled, publications = await self._publications(conn), lease.publications
                    if lease.held != self.ticking:
                        await self._take_turn(conn, wake_channel, on_wake, lease.held)
                    if not self.ticking:
                        await self._check_link(conn, lease)
                if self.link is not None and not self.ticking:
                    await self._follow(conn, self.link)
                    continue
                if not self.ticking:
                    # Wait for the ticker's next announcement (it made the tick durable before), then read.
                    whole = self._whole()
                    newest, at, waited = await changelog.await_tick(conn, whole, LEASE / 4)
                    if newest > whole and at is not None:
                        await self._deliver(conn, newest, at, flush=False)
                    elif not waited:  # nobody ticks: the lease is free, or its holder died holding it
                        await asyncio.sleep(LEASE / 4)
                    continue
                tick = await changelog.tick(conn)
                self.ticks_taken += 1
                self.queue_usage = tick.queue
                crowded = tick.queue >= changelog.WAKE_BELOW
                if crowded and time.monotonic() - relistened > _RELISTEN_EVERY:
                    await self._relisten(conn, wake_channel)
                    relistened = time.monotonic()
                await self._deliver(conn, tick.n, tick.at, flush=True)
                try:
                    timeout = s.poll_interval if polled or crowded else s.probe_interval
                    async with asyncio.timeout(min(timeout, LEASE / 4)):
                        await wake.wait()
                except TimeoutError:
                    pass
            raise ConnectionLost("the server closed the connection")
        except TimeoutError:
            raise ConnectionLost(f"no answer from the database within {s.probe_timeout:g}s") from None
        finally:
            if self.ticking and not lost.is_set():  # shutting down: hand the ticks over at once
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await changelog.release(conn, self.holder)
            if self.relay is not None:
                self.relay.drop_all()
            self.connected = self.ticking = False
            conn.terminate()
            await self._drop_link()

    async def _take_turn(
        self, conn: asyncpg.Connection, channel: str, on_wake: Callable[..., None], ticking: bool
    ) -> None:
        """Become the ticker (listen for writers' wake-ups, take the ticks, announce them) or stop being it."""
        if ticking:
            await self._drop_link()
            await conn.add_listener(channel, on_wake)
            self.takeovers += 1
            self._announced = -1  # the current tick is announced (again): its ticker may have died before it
            log.info("this bridge now takes the ticks (holder %s)", self.holder)
        else:
            await conn.remove_listener(channel, on_wake)
            await conn.execute("SELECT pg_advisory_unlock_all()")  # the followers wait on the new ticker's
            self._held = None
            if self.relay is not None:
                self.relay.drop_all()  # its followers find the new ticker's relay in the lease
            log.info("another bridge took the ticks over; this one follows them")
        self.ticking = ticking

    async def _relisten(self, conn: asyncpg.Connection, channel: str) -> None:
        """Register this connection's LISTEN again: a new registration starts at the end of the NOTIFY
        queue, so this backend is not among those that keep old entries in it. The callback stays."""
        await conn.execute("UNLISTEN *")
        await conn.execute(f'LISTEN "{channel}"')
        if self._crowded_log():
            log.warning(
            "the NOTIFY queue is %.0f%% full: writers send no wake-ups, so changes are polled every %gs; "
                "a session that LISTENs and stays in a transaction holds it (see pg_stat_activity; "
                "reported once a minute)", 100 * self.queue_usage, self._settings.poll_interval,
            )  # fmt: skip

    async def _publications(self, conn: asyncpg.Connection) -> bool:
        """Tell the bridge the published collections; return whether some of them must be polled."""
        self._on_publications(await changelog.publications(conn))
        return await changelog.any_polled(conn)

    async def _deliver(self, conn: asyncpg.Connection, newest: int, taken: datetime, *, flush: bool) -> None:
        """Route every change up to tick ``newest`` (taken at ``taken``), page by page, once it is durable
        (``flush``: make sure of it first; else it is known to be)."""
        assert self._after is not None
        unflushed = flush and newest > self.newest_tick
        self.newest_tick = max(newest, self.newest_tick)
        if not unflushed:
            await self._announce(conn, newest)
        while self._after < (newest, MAX_ID):
            wal: changelog.Wal | None = None
            try:
                self.log_reads += 1
                changes, reached, wal = await changelog.read_with_wal(conn, self._after, newest)
            except Pruned:
                changes, reached = [], None
            if unflushed:
                # Nothing of the tick is routed before it is durable; meanwhile its batch was read, and a
                # writer's commit has likely flushed it.
                await self._durable(conn, newest, wal)
                unflushed = False
            if reached is None:
                log.error(
                    "changes after tick %d left the change log before they were routed: raise the retention; "
                    "every client is asked to resync",
                    self._after[0],
                )
                self._restart_at(newest)
                break
            progressed = reached != self._after
            if progressed and self.ticking and self.relay is not None:
                self.relay.publish(Page(self._after, reached, newest, taken, changes))
            await self._apply(changes, reached)
            if not progressed:
                break
        if unflushed:
            await self._durable(conn, newest)
        if self._after == (newest, MAX_ID):
            self._finished = (newest, taken)

    async def _apply(self, changes: list[Change], reached: tuple[int, int]) -> None:
        """Route ``changes``, read after where this bridge is, and move on to ``reached``."""
        loop = asyncio.get_running_loop()
        yielded = loop.time()
        self._quiet.clear()
        try:
            for change in changes:
                self.history.append(change)
                for row in range(change.units):
                    self._route(change, row)
                    self.head = change.position(row)
                    self.delivered += 1
                    self.routed[change.collection] += 1
                    if loop.time() - yielded > _YIELD_EVERY:
                        self._signal()
                        await asyncio.sleep(0)
                        yielded = loop.time()
                self.latency.observe(time.time() - datetime.fromisoformat(change.timestamp).timestamp())
        finally:
            self._quiet.set()
        if reached == self._after:
            return
        self._after = reached
        if reached[1] == MAX_ID:
            self.head = (reached[0], MAX_ID, 0)
            self.ticks_read = reached[0]
        self._signal()

    async def _follow(self, conn: asyncpg.Connection, link: RelayLink) -> None:
        """Route the ticker's next relayed page, if one comes within a quarter of the lease: at once if it
        continues from where this bridge is, else by reading the change log up to its tick."""
        try:
            page = await link.receive(LEASE / 4)
        except RelayLost as exc:
            log.info("the ticker's relay went away (%s); following the ticks in the database meanwhile", exc)
            self._link_retry = time.monotonic() + LEASE
            await self._drop_link()
            return
        assert self._after is not None
        if page is None or page.reached <= self._after:
            return
        if page.after != self._after:  # joined, or left behind: the change log has what lies between
            await self._deliver(conn, page.newest, page.taken, flush=False)
            return
        self.relayed_pages += 1
        self.newest_tick = max(self.newest_tick, page.newest)
        await self._apply(page.changes, page.reached)
        if self._after == (page.newest, MAX_ID):
            self._finished = (page.newest, page.taken)

    async def _check_link(self, conn: asyncpg.Connection, lease: changelog.Lease) -> None:
        """Follow the ticker's relay: connect, or reconnect where the lease says it moved. Read from the
        change log what the relay did not bring: what the ticker announced before this bridge connected,
        or a quarter of a lease ago (the relay is slow, or dropped this bridge)."""
        joined = False
        if self.link is not None and self.link.address != lease.relay:  # gone, moved, or restarted (a new secret)
            await self._drop_link()
        if self.link is None and lease.relay is not None and time.monotonic() >= self._link_retry:
            url, secret = lease.relay
            try:
                async with asyncio.timeout(LEASE / 4):
                    self.link = await RelayLink.connect(url, secret)
                joined = True
                log.info("following the ticker's relay")
            except aiohttp.WSServerHandshakeError as exc:
                self._link_retry = time.monotonic() + LEASE
                if self._link_log():
                    log.warning(
                        "the ticker's relay at %s refused this bridge (%d %s): this bridge reads every tick from "
                        "the database instead; that address is not the ticker's relay (see its --advertise-host and "
                        "--relay-port), or something between the bridges changed the request (reported once a "
                        "minute)", url, exc.status, exc.message,
                    )  # fmt: skip
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                self._link_retry = time.monotonic() + LEASE
                if self._link_log():
                    log.warning(
                        "cannot reach the ticker's relay at %s (%s): this bridge reads every tick from the "
                        "database instead, one more read per tick for the database; the ticker's --advertise-host "
                        "and --relay-port say where it is reached (reported once a minute)",
                        url, str(exc) or type(exc).__name__,
                    )  # fmt: skip
        routed = self._whole()
        awaited, self._awaited = self._awaited, (lease.announced if lease.announced > routed else None)
        behind = awaited is not None and routed < awaited
        if self.link is not None and (joined or behind) and self._awaited is not None and lease.announced_at:
            if behind and self._behind_log():
                log.warning("the ticker's relay is a quarter of a lease behind the ticks it announced; reading "
                            "them from the database (reported once a minute)")  # fmt: skip
            await self._deliver(conn, lease.announced, lease.announced_at, flush=False)

    def _whole(self) -> int:
        """The newest tick this bridge has routed whole (a large tick comes in pages)."""
        assert self._after is not None
        tick, change = self._after
        return tick if change == MAX_ID else tick - 1

    async def _drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            await link.close()

    async def _durable(self, conn: asyncpg.Connection, newest: int, wal: changelog.Wal | None = None) -> None:
        self.forced_flushes += await changelog.durable(conn, self._settings.flush_patience, wal)
        await self._announce(conn, newest)

    async def _announce(self, conn: asyncpg.Connection, newest: int) -> None:
        """As the ticker, tell the others about durable tick ``newest``, once, before routing it: they route
        it meanwhile."""
        if not self.ticking or newest <= self._announced:
            return
        self._announced = newest
        self._held = await changelog.announce(conn, self.holder, self._lock_class, newest, self._held)

    def _restart_at(self, newest: int) -> None:
        """Continue after tick ``newest``; what lay between cannot be delivered, so every client resyncs."""
        self._after = (newest, MAX_ID)
        self.head = (newest, MAX_ID, 0)
        self.history.reset(self._after)
        self._on_gap()

    def _signal(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

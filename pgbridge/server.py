"""The aiohttp application: the realtime WebSocket endpoint, health, and the bridge's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import hmac
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from pgbridge import changelog, frames, protocol
from pgbridge.auth import Grant, TokenPolicy
from pgbridge.config import Settings
from pgbridge.errors import AuthError, DatabaseUnavailable, ProtocolError
from pgbridge.events import Change
from pgbridge.feed import Feed
from pgbridge.history import History
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.metrics import CONTENT_TYPE, Exposition, Rate
from pgbridge.router import Router, Subscription, tenant_key

log = logging.getLogger(__name__)

WS_PATH = "/api/v1/realtime/ws"
# What a database that is down, restarting or unreachable raises, wrapped once as DatabaseUnavailable.
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_RESERVED_FILES = 64  # descriptors kept for the database pool, health checks and the log
_ids = itertools.count(1)


@dataclass(eq=False)
class Bridge:
    """Everything the endpoint shares: subscriptions, the listener, the database pool, the clients."""

    settings: Settings
    tokens: TokenPolicy
    max_connections: int = 0
    router: Router = field(init=False)
    history: History = field(init=False)
    listener: Listener = field(init=False)
    connections: set[Connection] = field(default_factory=set)
    handshakes: int = 0
    per_subject: Counter[str | None] = field(default_factory=Counter)
    cost_per_subject: Counter[str | None] = field(default_factory=Counter)
    feeds: set[Feed] = field(default_factory=set)
    publications: frozenset[str] | None = None
    stats: changelog.Stats | None = None
    pool: asyncpg.Pool | None = None
    replay_slots: asyncio.Semaphore = field(init=False)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    closed: Counter[str] = field(default_factory=Counter)
    catchup_reads: int = 0
    catchup_rate: Rate = field(default_factory=Rate)
    replays: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    task_failures: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Side tasks that failed: the error, and when (they are restarted)."""
    task_failure_count: Counter[str] = field(default_factory=Counter)
    _unflushed: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.router = Router(s.tenant_column, self._fell_behind)
        self.history = History(s.history_bytes)
        self.listener = Listener(
            ListenerSettings(
                s.dsn, probe_interval=s.probe_interval, probe_timeout=s.probe_timeout, poll_interval=s.poll_interval
            ),
            self.router.route,
            self._set_publications,
            self.history,
            self._gap,
        )
        self.replay_slots = asyncio.Semaphore(s.max_replays)

    def catch_up_lag(self) -> float:
        """Seconds since the oldest change a catching-up client still waits for was made (0: none waits)."""
        now = time.time()
        return max((_age(feed.at, now) for feed in self.feeds), default=0.0)

    def catch_up_lag_events(self) -> int:
        """Positions the furthest catching-up client has yet to pass (0: none is behind)."""
        return max((feed.lag or 0 for feed in self.feeds), default=0)

    def furthest_behind(self, limit: int = 10) -> list[dict[str, object]]:
        """The catching-up subscriptions furthest behind, each with its lag in events (None while a
        resumed one is being counted) and in seconds."""
        now = time.time()
        lags = ((feed.lag, _age(feed.at, now), feed) for feed in self.feeds)
        return [
            {"client": feed.client, "collection": feed.sub.collection, "lag_events": events,
             "lag_seconds": round(seconds, 3)}
            for events, seconds, feed in heapq.nlargest(limit, lags, key=lambda f: (f[0] or 0, f[1]))
        ]  # fmt: skip

    def to_flush(self, conn: Connection) -> None:
        """Have ``conn`` write what it queued at the end of this loop turn, with every other client that
        did: one callback for a broadcast to thousands rather than one each."""
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unflushed.append(conn)

    def _flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for conn in unflushed:
            conn.flush()

    def _set_publications(self, collections: frozenset[str]) -> None:
        self.publications = collections

    def _fell_behind(self, sub: Subscription, change: Change, row: int) -> None:
        sink = sub.sink
        assert isinstance(sink, Connection)
        sink.catch_up(Feed(sub, sink, self.router, self.listener, self.history, self, change.position(row - 1), change))

    def _gap(self) -> None:
        """Changes were lost to retention before they were routed: every live subscription must resync."""
        for conn in list(self.connections):
            for sub in self.router.subscriptions(conn).values():
                conn.send(frames.text_frame(protocol.resync_required(sub.collection)))

    async def read(self, after: tuple[int, int], upto: int, collection: str) -> tuple[list[Change], tuple[int, int]]:
        """The change log as catching-up clients read it."""

        async def query(conn: asyncpg.Connection) -> tuple[list[Change], tuple[int, int]]:
            self.catchup_reads += 1
            self.catchup_rate.add(time.monotonic())
            return await changelog.read(conn, after, upto, collection)

        found: tuple[list[Change], tuple[int, int]] = await self._with_pool(query)
        return found

    async def locate(self, change_id: int) -> int | None:
        tick: int | None = await self._with_pool(lambda conn: changelog.locate(conn, change_id))
        return tick

    async def count(self, after: tuple[int, int], upto: tuple[int, int], collection: str) -> int:
        found: int = await self._with_pool(lambda conn: changelog.count(conn, after, upto, collection))
        return found

    async def _with_pool(self, query: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run ``query`` for a client catching up or resuming: at most ``--max-replays`` at a time."""
        if self.pool is None:
            raise DatabaseUnavailable("the bridge is starting")
        try:
            async with self.replay_slots, self.pool.acquire() as conn:
                return await query(conn)
        except DATABASE_ERRORS as exc:
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc


class Connection:
    """One client. Live frames are written together once per loop turn; how much may wait unsent is bounded.

    Live frames that do not fit in ``--outbound-limit`` are not queued: the subscription is fed from
    the change log instead (:class:`Feed`), at the pace the client reads.
    """

    __slots__ = (
        "bridge", "closing", "cost", "feeds", "grant", "id", "idle_since", "outbox", "peer", "pinged", "protocol",
        "queued", "seen", "stalled", "taken", "transport", "written", "ws",
    )  # fmt: skip

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, grant: Grant, bridge: Bridge) -> None:
        assert request.transport is not None
        self.ws = ws
        self.transport = request.transport
        self.protocol = request.protocol
        self.grant = grant
        self.bridge = bridge
        self.id = f"c{next(_ids)}"
        self.peer = request.remote
        self.closing = False
        self.written = 0
        self.outbox: list[bytes] = []  # live frames of this loop turn, written together by flush()
        self.queued = 0
        self.stalled: tuple[int, float] | None = None  # (bytes sent, when) while data waits unsent
        self.idle_since = self.seen = time.monotonic()  # seen: when the client last showed it is there
        self.pinged: float | None = None
        self.taken = 0  # bytes the kernel had taken for the client at the last ping
        self.cost = 0
        self.feeds: dict[str, asyncio.Task[None]] = {}
        limit = bridge.settings.outbound_limit
        # Catching up writes while less than half the limit waits; live frames may use all of it.
        self.transport.set_write_buffer_limits(high=limit // 2, low=limit // 8)

    def fields(self, **more: object) -> dict[str, object]:
        """What log lines about this client carry (see :mod:`pgbridge.logs`)."""
        return {"client": self.id, "peer": self.peer, **more}

    def offer(self, frame: bytes) -> bool:
        """Queue a live frame if it fits in the client's budget; frames go out once per loop turn."""
        if self.closing:
            return True
        waiting = self.transport.get_write_buffer_size() + self.queued
        if waiting and waiting + len(frame) > self.bridge.settings.outbound_limit:
            return False
        if not self.outbox:
            self.bridge.to_flush(self)
        self.outbox.append(frame)
        self.queued += len(frame)
        return True

    def flush(self) -> None:
        """Write what was queued in this loop turn, in one call: one system call for many frames."""
        outbox, self.outbox = self.outbox, []
        size, self.queued = self.queued, 0
        if not outbox:
            return
        if self.closing or self.transport.is_closing():
            self.closing = True
            return
        self.transport.writelines(outbox)
        self.written += size
        self.bridge.frames_sent += len(outbox)
        self.bridge.bytes_sent += size

    def send(self, frame: bytes) -> None:
        """Write a reply or a notice, whatever the backlog (they are small and few), after what is queued."""
        if self.closing or self.transport.is_closing():
            self.closing = True
            return
        if self.outbox:
            self.flush()
        self.transport.write(frame)
        self.written += len(frame)
        self.bridge.frames_sent += 1
        self.bridge.bytes_sent += len(frame)

    async def send_paced(self, frame: bytes) -> None:
        """Write a catch-up frame once the client has taken most of what waits for it."""
        await self._drained()
        self.send(frame)

    async def _drained(self) -> None:
        """Wait while asyncio's flow control has paused writing to this client (see the buffer limits)."""
        if self.protocol.writing_paused:
            try:
                await self.protocol._drain_helper()  # how aiohttp's own writers wait for a socket
            except ConnectionError:
                self.closing = True

    def catch_up(self, feed: Feed) -> None:
        """Feed one subscription from the change log (it is not live), then let it rejoin live delivery."""
        if self.closing:
            return
        name = feed.sub.collection
        self._stop_feed(name)
        self.feeds[name] = asyncio.get_running_loop().create_task(self._feed(feed), name=f"pgbridge-feed-{self.id}")

    async def _feed(self, feed: Feed) -> None:
        bridge = self.bridge
        bridge.feeds.add(feed)
        try:
            await feed.run()
        except Exception:
            log.exception(
                "%s: catching up %s failed",
                self.id,
                feed.sub.collection,
                extra=self.fields(collection=feed.sub.collection),
            )
            self.close_soon(1011, "Internal error")
        finally:
            bridge.feeds.discard(feed)
            if self.feeds.get(feed.sub.collection) is asyncio.current_task():
                del self.feeds[feed.sub.collection]

    def _stop_feed(self, collection: str) -> None:
        task = self.feeds.pop(collection, None)
        if task is not None:
            task.cancel()

    def close_soon(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.bridge.closed[reason] += 1
            task = asyncio.get_running_loop().create_task(self.close(code, reason), name="pgbridge-close")
            self.bridge.background.add(task)
            task.add_done_callback(self.bridge.background.discard)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; a client that does not take the close frame in time is cut off."""
        self.closing = True
        log.debug("%s: closing with %d %s", self.id, code, reason, extra=self.fields(code=code, reason=reason))
        try:
            async with asyncio.timeout(self.bridge.settings.close_timeout):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            self.transport.abort()

    async def serve(self) -> None:
        bridge = self.bridge
        bridge.connections.add(self)
        bridge.per_subject[self.grant.subject] += 1
        log.debug("%s: connected from %s", self.id, self.peer, extra=self.fields(subject=self.grant.subject))
        try:
            async for msg in self.ws:
                if self.closing:
                    break
                self.seen = time.monotonic()
                if msg.type is WSMsgType.PONG:
                    continue
                await self._drained()  # read no more requests while the client does not take its replies
                if msg.type is WSMsgType.PING:
                    await self.ws.pong(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    try:
                        await self._handle(msg.data)
                    except Exception:
                        log.exception("%s: internal error", self.id, extra=self.fields())
                        self.close_soon(1011, "Internal error")
                elif msg.type is WSMsgType.BINARY:
                    self.send(frames.text_frame(protocol.error("Binary frames are not supported")))
        finally:
            for collection in list(self.feeds):
                self._stop_feed(collection)
            bridge.router.drop(self)
            bridge.connections.discard(self)
            bridge.per_subject[self.grant.subject] -= 1
            bridge.cost_per_subject[self.grant.subject] -= self.cost
            log.debug("%s: disconnected (close code %s)", self.id, self.ws.close_code,
                      extra=self.fields(code=self.ws.close_code))  # fmt: skip

    async def _handle(self, text: str) -> None:
        reply: bytes
        try:
            message = protocol.parse_client_message(text)
            if isinstance(message, protocol.Ping):
                reply = protocol.pong()
            elif isinstance(message, protocol.Unsubscribe):
                self._unsubscribe(message.collection)
                reply = protocol.unsubscribed(message.collection)
            else:
                self._subscribe(message)
                return
        except ProtocolError as exc:
            reply = protocol.error(exc.text, action=exc.action, collection=exc.collection)
        self.send(frames.text_frame(reply))

    def _unsubscribe(self, collection: str) -> None:
        self._stop_feed(collection)
        sub = self.bridge.router.remove(self, collection)
        if sub is not None:
            self._spend(-sub.filter.cost)
        if not self.bridge.router.subscriptions(self):
            self.idle_since = time.monotonic()

    def _spend(self, cost: int) -> None:
        self.cost += cost
        self.bridge.cost_per_subject[self.grant.subject] += cost

    def _subscribe(self, message: protocol.Subscribe) -> None:
        bridge, name, s = self.bridge, message.collection, self.bridge.settings

        def refuse(text: str) -> ProtocolError:
            return ProtocolError(text, action="subscribe", collection=name)

        if bridge.publications is None:
            raise refuse("The database is unavailable; subscribe again shortly")
        allowed = self.grant.allowed(name)
        if name not in bridge.publications or not allowed:
            raise refuse(f"Collection {name!r} is not published or not allowed for this token")
        operations = message.operations or allowed
        if not operations <= allowed:
            raise refuse(f"This token may not receive {', '.join(sorted(operations - allowed))} on {name!r}")
        current = bridge.router.subscriptions(self)
        replaced = current.get(name)
        if replaced is None and len(current) >= s.max_subscriptions:
            raise refuse(f"Max subscriptions reached ({s.max_subscriptions})")
        extra = message.filter.cost - (replaced.filter.cost if replaced else 0)
        if self.cost + extra > s.max_filter_cost:
            raise refuse(f"Filters too complex: at most {s.max_filter_cost} conditions per connection")
        if bridge.cost_per_subject[self.grant.subject] + extra > s.max_filter_cost_per_subject:
            raise refuse(f"Filters too complex: at most {s.max_filter_cost_per_subject} conditions per token")
        tenant = tenant_key(self.grant.tenant) if s.tenant_column else None
        sub = Subscription(self, name, operations, message.filter, tenant)
        self._stop_feed(name)
        self._spend(extra)
        bridge.router.add(sub, live=message.since is None)
        self.send(frames.text_frame(protocol.subscribed(name)))
        if message.since is not None:
            bridge.replays += 1
            self.feeds[name] = asyncio.get_running_loop().create_task(
                self._resume(sub, message.since), name=f"pgbridge-resume-{self.id}"
            )

    async def _resume(self, sub: Subscription, since: tuple[int, int]) -> None:
        bridge = self.bridge
        change_id, row = since
        delay = 0.1
        while True:
            try:
                tick = await bridge.locate(change_id)
                break
            except DatabaseUnavailable as exc:
                log.debug(
                    "%s: resuming waits for the database: %s",
                    self.id,
                    exc,
                    extra=self.fields(collection=sub.collection),
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
        if tick is None:
            bridge.router.attach(sub)
            self.send(frames.text_frame(protocol.resync_required(sub.collection)))
            return
        feed = Feed(sub, self, bridge.router, bridge.listener, bridge.history, bridge, (tick, change_id, row))
        await self._feed(feed)


BRIDGE = web.AppKey("bridge", Bridge)


def _offered_protocols(request: web.Request) -> list[str]:
    return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


async def realtime(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/realtime/ws``: the SnackBase realtime protocol."""
    bridge = request.app[BRIDGE]
    if len(bridge.connections) + bridge.handshakes >= bridge.max_connections:
        bridge.closed["Connection limit"] += 1
        _shed()
        return web.json_response(
            {"error": "The server is at its connection limit; try again later"},
            status=503,
            headers={"Retry-After": "5"},
        )
    token = request.query.get("token")
    offered = _offered_protocols(request)
    if "bearer" in offered:
        token = token or next((p for p in offered if p != "bearer"), None)
    elif offered:
        # Not a protocol we speak; dropping the header keeps aiohttp from logging it (it may be a token).
        request = request.clone(headers={k: v for k, v in request.headers.items() if k != "Sec-WebSocket-Protocol"})
    s = bridge.settings
    ws = web.WebSocketResponse(
        protocols=("bearer",) if "bearer" in offered else (),
        max_msg_size=s.max_frame,
        compress=False,
        timeout=s.close_timeout,
        autoping=False,  # pings are sent by one task for all connections, and answered by Connection.serve
    )
    bridge.handshakes += 1
    try:
        await ws.prepare(request)
    except (ConnectionError, asyncio.CancelledError):
        log.debug("a client left during its WebSocket upgrade")
        return ws
    finally:
        bridge.handshakes -= 1
    _require_masking(request, ws)
    try:
        grant = bridge.tokens.verify(token)
        if bridge.per_subject[grant.subject] >= s.max_connections_per_subject:
            raise AuthError("Too many connections for this token")
    except AuthError as exc:
        bridge.closed[exc.reason] += 1
        await ws.close(code=1008, message=exc.reason.encode())
        return ws
    await Connection(request, ws, grant, bridge).serve()
    return ws


def _require_masking(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Close with 1002 on a client frame that is not masked (RFC 6455, section 5.1).

    aiohttp's reader accepts such frames, so the bytes are checked on their way to it.
    """
    handler = request.protocol
    parser: Any = getattr(handler, "_payload_parser", None)
    if parser is not None:
        handler._payload_parser = _MaskGuard(parser, ws, request.app[BRIDGE].background)


class _MaskGuard:
    """Stands between a connection's bytes and aiohttp's WebSocket parser (one per connection: small)."""

    __slots__ = ("_background", "_check", "_parser", "_ws")

    def __init__(self, parser: Any, ws: web.WebSocketResponse, background: set[asyncio.Task[None]]) -> None:
        self._parser, self._ws, self._background = parser, ws, background
        self._check = frames.MaskCheck()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._check.feed(data):
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        if not self._ws.closed:
            task = asyncio.get_running_loop().create_task(self._refuse())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return False, b""

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    async def _refuse(self) -> None:
        await self._ws.close(code=1002, message=b"Client frames must be masked")


_shed_logged = 0.0


def _shed() -> None:
    global _shed_logged
    now = time.monotonic()
    if now - _shed_logged > 60:
        _shed_logged = now
        log.warning("refusing new connections: the connection limit is reached (reported once a minute)")


async def healthz(request: web.Request) -> web.Response:
    """200 while the listener is connected and caught up, 503 otherwise, with the figures to watch."""
    bridge = request.app[BRIDGE]
    listener = bridge.listener
    failed = {name: error for name, (error, when) in bridge.task_failures.items() if time.monotonic() - when < 300}
    crowded = listener.queue_usage >= bridge.settings.queue_warning
    body: dict[str, object] = {
        "status": "unavailable" if not listener.connected else "degraded" if failed or crowded else "ok",
        "database": "connected" if listener.connected else "unavailable (the bridge's log says why)",
        "clients": len(bridge.connections),
        "changes_delivered": listener.delivered,
        "catching_up": len(bridge.feeds),
        "catch_up_lag_seconds": round(bridge.catch_up_lag(), 3),
        "catch_up_lag_events": bridge.catch_up_lag_events(),
        "catch_up_reads": bridge.catchup_reads,
        "catch_up_reads_per_second": bridge.catchup_rate.per_second(time.monotonic()),
    }  # fmt: skip
    if bridge.feeds:
        body["furthest_behind"] = bridge.furthest_behind()
    body["notification_queue_usage"] = listener.queue_usage
    if crowded:
        body["notification_queue"] = (
            "past the warning level: writers send no wake-ups and the bridge polls; a session that LISTENs "
            "and stays in a transaction may be holding it (see pg_stat_activity)"
        )
    if bridge.stats is not None:
        body["changelog_transactions"] = bridge.stats.changelog_transactions
        body["changelog_bytes"] = bridge.stats.changelog_bytes
    if failed:
        body["failed_tasks"] = failed  # in the last five minutes
    return web.json_response(body, status=200 if listener.connected else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the bridge's figures in the Prometheus text format (behind ``--metrics-token``)."""
    bridge = request.app[BRIDGE]
    expected = bridge.settings.metrics_token
    if expected is not None:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return web.json_response(
                {"error": "/metrics needs the header Authorization: Bearer <the --metrics-token value>"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    listener = bridge.listener
    per_collection: Counter[str] = Counter()
    for conn in bridge.connections:
        per_collection.update(bridge.router.subscriptions(conn).keys())
    out = Exposition()
    out.gauge("up", "1 while the listener is connected to the database", int(listener.connected))
    out.gauge("connections", "open client connections", len(bridge.connections))
    out.labelled("subscriptions", "gauge", "subscriptions, by collection", "collection", per_collection)
    out.counter("changes_received_total", "row changes read from the change log and routed", listener.delivered)
    out.counter("frames_sent_total", "WebSocket frames written to clients (events, replies, notices)",
                bridge.frames_sent)  # fmt: skip
    out.counter("bytes_sent_total", "bytes of WebSocket frames written to clients", bridge.bytes_sent)
    out.labelled("clients_closed_total", "counter", "connections the server closed or refused, by reason", "reason",
                 bridge.closed)  # fmt: skip
    out.counter("listener_reconnects_total", "times the listener reconnected to the database", listener.reconnects)
    out.counter("replays_total", "subscriptions that resumed with since", bridge.replays)
    out.counter("catch_up_reads_total", "change-log reads for clients catching up", bridge.catchup_reads)
    out.gauge("catching_up", "subscriptions fed from the change log, behind the live stream", len(bridge.feeds))
    out.gauge("catch_up_lag_seconds", "how far behind the furthest catching-up client is", bridge.catch_up_lag())
    out.gauge("catch_up_lag_events", "row changes the furthest catching-up client has yet to get past",
              bridge.catch_up_lag_events())  # fmt: skip
    out.gauge("notification_queue_usage", "fill of the NOTIFY queue, 0 to 1 (past 0.5 writers send no wake-ups)",
              listener.queue_usage)  # fmt: skip
    if bridge.stats is not None:
        out.gauge("changelog_transactions", "transactions in the change log", bridge.stats.changelog_transactions)
        out.gauge("changelog_bytes", "size of the change log on disk", bridge.stats.changelog_bytes)
    out.labelled("task_failures_total", "counter", "failures of the bridge's side tasks (each is restarted)", "task",
                 {name: bridge.task_failure_count[name] for name in SIDE_TASKS})  # fmt: skip
    out.histogram("delivery_latency_seconds", "from a change's statement time in the database to its sending",
                  listener.latency)  # fmt: skip
    return web.Response(body=out.text().encode(), headers={"Content-Type": CONTENT_TYPE})


_PAGES = {  # the inspector: static files of this package, served from memory
    "/": ("index.html", "text/html"),
    "/inspector/inspector.js": ("inspector.js", "text/javascript"),
    "/inspector/inspector.css": ("inspector.css", "text/css"),
}
# The page renders untrusted row values: even if one slipped through as markup, nothing but the page's
# own files could run or load.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _page(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    name, content_type = _PAGES[path]
    body = resources.files("pgbridge").joinpath("static", name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Content-Security-Policy": _PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                     "Cache-Control": "no-cache"},
        )  # fmt: skip

    return serve


def _age(timestamp: str | None, now: float) -> float:
    if timestamp is None:
        return 0.0
    return max(0.0, now - datetime.fromisoformat(timestamp).timestamp())


async def _heartbeats(bridge: Bridge) -> None:
    while True:
        await asyncio.sleep(bridge.settings.heartbeat)
        frame = frames.text_frame(protocol.heartbeat())
        for n, conn in enumerate(list(bridge.connections), 1):
            conn.send(frame)
            if n % 1000 == 0:
                await asyncio.sleep(0)  # thousands of clients: let deliveries through meanwhile


async def _pings(bridge: Bridge) -> None:
    """Ping every client each ``--ping-interval``; close one that has shown no sign of life since the
    previous ping (a half-open connection). One task for all clients rather than timers for each."""
    interval = bridge.settings.ping_interval
    while interval:
        await asyncio.sleep(interval)
        now = time.monotonic()
        for n, conn in enumerate(list(bridge.connections), 1):
            waiting = conn.transport.get_write_buffer_size()
            taken, conn.taken = conn.taken, conn.written - waiting
            if waiting and conn.taken > taken:
                # Data waits beyond what the kernel holds, and yet moves: the peer acknowledges it, so it is
                # there, even if its answer to a ping waits behind the backlog.
                conn.seen = now
            if conn.pinged is not None and conn.seen < conn.pinged and not conn.closing:
                log.debug("%s: no answer to a ping for %gs; closing", conn.id, interval, extra=conn.fields())
                bridge.closed["No answer to ping"] += 1
                conn.closing = True
                conn.transport.abort()
                continue
            conn.pinged = now
            conn.send(frames.PING)
            if n % 1000 == 0:
                await asyncio.sleep(0)


async def _watchdog(bridge: Bridge) -> None:
    """Close clients whose token expired, that take no data at all for ``--stall-timeout``, and idle ones
    if asked to."""
    s = bridge.settings
    while True:
        await asyncio.sleep(min(1.0, s.stall_timeout / 4))
        now, wall = time.monotonic(), time.time()
        for conn in list(bridge.connections):
            if wall >= conn.grant.expires_at:  # checked here rather than by a timer per connection: memory
                conn.close_soon(1008, "Token expired")
                continue
            waiting = conn.transport.get_write_buffer_size()
            if not waiting:
                conn.stalled = None
            else:
                sent = conn.written - waiting
                if conn.stalled is None or sent > conn.stalled[0]:
                    conn.stalled = (sent, now)
                elif now - conn.stalled[1] > s.stall_timeout:
                    log.info("%s: closing a client that took no data for %gs", conn.id, s.stall_timeout,
                             extra=conn.fields(code=1013))  # fmt: skip
                    conn.close_soon(1013, "Slow consumer")
            if s.idle_timeout and now - conn.idle_since > s.idle_timeout and not bridge.router.subscriptions(conn):
                conn.close_soon(1000, f"No subscription for {s.idle_timeout:g}s")


async def _maintenance(bridge: Bridge) -> None:
    """Watch the change log; prune it (one replica at a time)."""
    s = bridge.settings
    next_prune = 0.0
    while True:
        try:
            assert bridge.pool is not None
            async with bridge.pool.acquire() as conn:
                bridge.stats = await changelog.stats(conn)
                if time.monotonic() >= next_prune:
                    removed = await changelog.prune(
                        conn, max_age=s.retention_age, max_transactions=s.retention_transactions
                    )
                    if removed:
                        log.info("pruned %d transactions from the change log", removed)
                    next_prune = time.monotonic() + s.prune_interval
        except DATABASE_ERRORS as exc:
            log.debug("maintenance skipped: %s", exc)
        await asyncio.sleep(s.stats_interval)


SIDE_TASKS: dict[str, Callable[[Bridge], Awaitable[None]]] = {
    "heartbeat": _heartbeats,
    "ping": _pings,
    "maintenance": _maintenance,
    "watchdog": _watchdog,
}


async def _supervise(bridge: Bridge, name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a side task for as long as the bridge runs: one that fails is logged, shown in /healthz, restarted."""
    delay = 1.0
    while True:
        try:
            await run()
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


def _descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return what connections may use."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(16, soft - _RESERVED_FILES)


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Report running out of descriptors once a minute instead of once per attempt."""
    last = 0.0
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last
        if "out of system resource" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last > 60:
                last = now
                log.error("out of file descriptors: new connections wait (reported once a minute): %s",
                          context.get("exception"))  # fmt: skip
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _background(app: web.Application) -> AsyncIterator[None]:
    bridge = app[BRIDGE]
    s = bridge.settings
    _quiet_accept_errors(asyncio.get_running_loop())
    bridge.pool = await asyncpg.create_pool(s.dsn, min_size=0, max_size=s.max_replays + 1, timeout=10)
    tasks = [asyncio.create_task(bridge.listener.run(), name="pgbridge-listener")]
    for name, run in SIDE_TASKS.items():
        tasks.append(
            asyncio.create_task(_supervise(bridge, name, functools.partial(run, bridge)), name=f"pgbridge-{name}")
        )
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, *bridge.background, return_exceptions=True)
    await bridge.pool.close()


async def _close_clients(app: web.Application) -> None:
    bridge = app[BRIDGE]
    await asyncio.gather(
        *(conn.close(1001, "Server shutting down") for conn in list(bridge.connections)), return_exceptions=True
    )


class _ClientErrors(logging.Filter):
    """aiohttp logs a malformed or abandoned request at ERROR with a traceback: the client's doing, not
    the server's, and the request line may hold a token. Keep one line a minute, at DEBUG, without it."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError | ConnectionError):
            return True
        now = time.monotonic()
        if now - self._last > 60:
            self._last = now
            log.debug("a client sent a malformed request or left during it (%s; reported once a minute)",
                      type(error).__name__)  # fmt: skip
        return False


_client_errors = _ClientErrors()


def runner(app: web.Application) -> web.AppRunner:
    """How the bridge's application is served: no access log (request lines hold tokens), and connections
    that do not complete a request within ``--handshake-timeout`` are closed."""
    settings = app[BRIDGE].settings
    logging.getLogger("aiohttp.server").addFilter(_client_errors)
    return web.AppRunner(app, access_log=None, keepalive_timeout=settings.handshake_timeout, shutdown_timeout=5)


def create_app(settings: Settings, tokens: TokenPolicy) -> web.Application:
    """The bridge as an aiohttp application; its listener and tasks run while the app runs."""
    app = web.Application()
    limit = settings.max_connections or _descriptor_limit()
    app[BRIDGE] = Bridge(settings, tokens, limit)
    app.router.add_get(WS_PATH, realtime)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    for path in _PAGES:
        app.router.add_get(path, _page(path))
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_clients)
    return app

"""The aiohttp application: the realtime WebSocket endpoint, health, and the bridge's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from aiohttp import WSMsgType, web

from pgbridge import changelog, protocol
from pgbridge.auth import Grant, TokenPolicy
from pgbridge.config import Settings
from pgbridge.errors import AuthError, ProtocolError
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.router import Router, Subscription, direct, tenant_filter

log = logging.getLogger(__name__)

WS_PATH = "/api/v1/realtime/ws"
# What a database that is down, restarting or unreachable raises.
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(eq=False)
class Bridge:
    """Everything the endpoint shares: subscriptions, the listener, the database pool, the clients."""

    settings: Settings
    tokens: TokenPolicy
    router: Router = field(default_factory=Router)
    connections: set[Connection] = field(default_factory=set)
    publications: frozenset[str] | None = None
    stats: changelog.Stats | None = None
    listener: Listener = field(init=False)
    pool: asyncpg.Pool | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        s = self.settings
        self.listener = Listener(
            ListenerSettings(
                s.dsn, probe_interval=s.probe_interval, probe_timeout=s.probe_timeout, verify=s.verify_notifications
            ),
            self.router.route,
            self._set_publications,
        )

    def _set_publications(self, collections: frozenset[str]) -> None:
        self.publications = collections

    async def replay(self, sub: Subscription, since: tuple[int, int]) -> set[int]:
        """Send ``sub`` every change after event ``since``; return the change ids sent.

        Raises :class:`changelog.Pruned` when ``since`` is no longer (or never was) in the log.
        """
        assert self.pool is not None
        change_id, index = since
        send = direct(sub)
        sent: set[int] = set()
        async with self.pool.acquire() as conn:
            seq = await changelog.seq_of(conn, change_id)
            if seq is None:
                raise changelog.Pruned(f"change {change_id} is not in the change log")
            position = (seq, change_id - 1)  # the first batch starts with the since change itself
            while True:
                batch = await changelog.read_after(conn, *position, collection=sub.collection)
                for seq, change in batch:
                    position = (seq, change.change_id)
                    sent.add(change.change_id)
                    send(change, index + 1 if change.change_id == change_id else 0)
                if len(batch) < changelog.REPLAY_BATCH or sub.sink.closing:
                    return sent


class Connection:
    """One client: its token's grant, and a bounded outbound queue drained by its own writer task."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, grant: Grant, bridge: Bridge) -> None:
        self.ws = ws
        self._transport = request.transport
        self.grant = grant
        self.bridge = bridge
        self.closing = False
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._limit = bridge.settings.outbound_limit

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        if self._pending and self._pending_bytes + len(data) > self._limit:
            self.overflow()
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._wakeup.set()

    def overflow(self) -> None:
        if not self.closing:
            log.info("closing a slow client (%d bytes queued)", self._pending_bytes)
            self.close_soon(1013, "Slow consumer")

    def close_soon(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._pending.clear()
            self._pending_bytes = 0
            task = asyncio.get_running_loop().create_task(self.close(code, reason), name="pgbridge-close")
            self.bridge.background.add(task)
            task.add_done_callback(self.bridge.background.discard)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; a client that does not take the close frame in time is cut off."""
        self.closing = True
        try:
            async with asyncio.timeout(self.bridge.settings.close_timeout):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            if self._transport is not None:
                self._transport.abort()

    async def _write(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self.closing:
                data = self._pending.popleft()
                self._pending_bytes -= len(data)
                await self.ws.send_frame(data, WSMsgType.TEXT)

    async def serve(self) -> None:
        bridge = self.bridge
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._write(), name="pgbridge-writer")
        expiry = loop.call_later(max(0.0, self.grant.expires_at - time.time()), self.close_soon, 1008, "Token expired")
        bridge.connections.add(self)
        try:
            async for msg in self.ws:
                if self.closing:
                    break
                if msg.type is WSMsgType.TEXT:
                    try:
                        await self._handle(msg.data)
                    except Exception:
                        log.exception("internal error serving a client")
                        self.close_soon(1011, "Internal error")
                elif msg.type is WSMsgType.BINARY:
                    self.send(protocol.error("Binary frames are not supported"))
        finally:
            expiry.cancel()
            bridge.router.drop(self)
            bridge.connections.discard(self)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await writer

    async def _handle(self, text: str) -> None:
        try:
            message = protocol.parse_client_message(text)
            if isinstance(message, protocol.Ping):
                self.send(protocol.pong())
            elif isinstance(message, protocol.Unsubscribe):
                self.bridge.router.remove(self, message.collection)
                self.send(protocol.unsubscribed(message.collection))
            else:
                await self._subscribe(message)
        except ProtocolError as exc:
            self.send(protocol.error(exc.text, action=exc.action, collection=exc.collection))

    async def _subscribe(self, message: protocol.Subscribe) -> None:
        bridge, name = self.bridge, message.collection

        def refuse(text: str) -> ProtocolError:
            return ProtocolError(text, action="subscribe", collection=name)

        if bridge.publications is None:
            raise refuse("The database is unavailable; subscribe again shortly")
        if name not in bridge.publications:
            raise refuse(f"Collection {name!r} is not published")
        allowed = self.grant.allowed(name)
        if not allowed:
            raise refuse(f"This token may not subscribe to {name!r}")
        operations = message.operations or allowed
        if not operations <= allowed:
            raise refuse(f"This token may not receive {', '.join(sorted(operations - allowed))} on {name!r}")
        current = bridge.router.subscriptions(self)
        if name not in current and len(current) >= bridge.settings.max_subscriptions:
            raise refuse(f"Max subscriptions reached ({bridge.settings.max_subscriptions})")
        s = bridge.settings
        tenant = tenant_filter(s.tenant_column, self.grant.tenant) if s.tenant_column else None
        sub = Subscription(self, name, operations, message.filter, tenant)
        if message.since is None:
            bridge.router.add(sub)
            self.send(protocol.subscribed(name))
            return
        sub.hold(self._limit)
        bridge.router.add(sub)
        self.send(protocol.subscribed(name))
        replayed: set[int] = set()
        try:
            replayed = await bridge.replay(sub, message.since)
        except changelog.Pruned:
            self.send(protocol.resync_required(name))
        except DATABASE_ERRORS as exc:
            log.warning("replay for a client failed: %s", exc)
            bridge.router.remove(self, name)
            raise refuse(
                "Could not replay changes (database unavailable); subscribe again with the same since"
            ) from None
        finally:
            sub.release(replayed.__contains__)


BRIDGE = web.AppKey("bridge", Bridge)


async def realtime(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/realtime/ws``: the SnackBase realtime protocol."""
    bridge = request.app[BRIDGE]
    token = request.query.get("token")
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if not token and "bearer" in offered:
        token = next((p for p in offered if p != "bearer"), None)
    ws = web.WebSocketResponse(
        protocols=("bearer",) if "bearer" in offered else (),
        max_msg_size=bridge.settings.max_frame,
        compress=False,
        timeout=bridge.settings.close_timeout,
    )
    await ws.prepare(request)
    try:
        grant = bridge.tokens.verify(token)
    except AuthError as exc:
        await ws.close(code=1008, message=exc.reason.encode())
        return ws
    await Connection(request, ws, grant, bridge).serve()
    return ws


async def healthz(request: web.Request) -> web.Response:
    """200 while the listener is connected and caught up, 503 otherwise, with the figures to watch."""
    bridge = request.app[BRIDGE]
    listener = bridge.listener
    body: dict[str, object] = {
        "status": "ok" if listener.connected else "unavailable",
        "database": "connected" if listener.connected else listener.problem,
        "clients": len(bridge.connections),
        "changes_delivered": listener.delivered,
    }
    if bridge.stats is not None:
        body["notification_queue_usage"] = bridge.stats.notification_queue_usage
        body["changelog_transactions"] = bridge.stats.changelog_transactions
        body["changelog_bytes"] = bridge.stats.changelog_bytes
    return web.json_response(body, status=200 if listener.connected else 503)


async def _heartbeats(bridge: Bridge) -> None:
    while True:
        await asyncio.sleep(bridge.settings.heartbeat)
        data = protocol.heartbeat()
        for conn in list(bridge.connections):
            conn.send(data)


async def _maintenance(bridge: Bridge) -> None:
    """Watch the NOTIFY queue and the change log; prune the log (one replica at a time)."""
    s = bridge.settings
    assert bridge.pool is not None
    next_prune = 0.0
    while True:
        try:
            async with bridge.pool.acquire() as conn:
                bridge.stats = await changelog.stats(conn)
                if bridge.stats.notification_queue_usage > s.queue_warning:
                    log.warning(
                        "the NOTIFY queue is %.0f%% full: a listener of this database is not reading",
                        100 * bridge.stats.notification_queue_usage,
                    )
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


async def _background(app: web.Application) -> AsyncIterator[None]:
    bridge = app[BRIDGE]
    bridge.pool = await asyncpg.create_pool(bridge.settings.dsn, min_size=0, max_size=4, timeout=10)
    tasks = [
        asyncio.create_task(bridge.listener.run(), name="pgbridge-listener"),
        asyncio.create_task(_heartbeats(bridge), name="pgbridge-heartbeat"),
        asyncio.create_task(_maintenance(bridge), name="pgbridge-maintenance"),
    ]
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


def create_app(settings: Settings, tokens: TokenPolicy) -> web.Application:
    """The bridge as an aiohttp application; its listener and tasks run while the app runs."""
    app = web.Application()
    app[BRIDGE] = Bridge(settings, tokens)
    app.router.add_get(WS_PATH, realtime)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_clients)
    return app

"""A client's session: its grant, subscriptions and their costs, catch-up feeds and flow control.

A session knows no wire format. It decides what a client gets and in which order, as
:class:`~pgbridge.protocol.Message` values, and hands them to its :class:`Transport`, which turns each
into the bytes of its kind (a WebSocket frame, an SSE event) once for every session of that kind. The
WebSocket endpoint (:mod:`pgbridge.websocket`) and the SSE endpoint (:mod:`pgbridge.sse`) are small
transports around the same session.

Live messages are written together once per loop turn. Those that do not fit in ``--outbound-limit``
are not queued: the subscription is fed from the change log instead (:class:`~pgbridge.feed.Feed`), at
the pace the client reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pgbridge import protocol
from pgbridge.auth import Grant
from pgbridge.errors import AuthError, DatabaseUnavailable, ProtocolError
from pgbridge.events import MAX_ID, Change, LegacyId, Position
from pgbridge.feed import Feed
from pgbridge.protocol import Close, Message
from pgbridge.router import Subscription, tenant_key

if TYPE_CHECKING:
    from pgbridge.hub import Bridge

log = logging.getLogger(__name__)
# A snapshot's rows go out this many (or this many bytes of rows) to a write: one write a row cost most of
# a snapshot's time.
_SNAPSHOT_BATCH = 256
_SNAPSHOT_BATCH_BYTES = 64 * 1024
_ids = itertools.count(1)


class Transport(Protocol):
    """How a session's messages reach its client: the only part of a session that knows the bytes."""

    name: str
    """``websocket`` or ``sse``: for logs and metrics."""
    unidirectional: bool
    """True when the client cannot send (SSE): no requests, no pings to answer."""

    def write(self, messages: Sequence[Message]) -> int:
        """Write ``messages`` now, in one call; return how many bytes that was."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the operating system for the client."""

    def is_closing(self) -> bool:
        """True once the connection is closing or gone: writes are dropped."""

    def paused(self) -> bool:
        """Whether :meth:`drained` would wait."""

    async def drained(self) -> None:
        """Return once the client has taken most of what waits for it."""

    def ping(self) -> None:
        """Ask the client for a sign of life (a WebSocket ping); nothing where it cannot answer."""

    async def close(self, code: int, reason: str) -> None:
        """Say why and end the connection; cut it off if the client does not take that in time."""

    def abort(self) -> None:
        """End the connection at once."""


class Session:
    """One client, over one transport."""

    __slots__ = (
        "_pinged", "_stalled", "_taken", "bridge", "closing", "cost", "feeds", "grant", "id", "idle_since", "ordered",
        "outbox", "peer", "queued", "seen", "transport", "written",
    )  # fmt: skip

    def __init__(
        self, bridge: Bridge, transport: Transport, grant: Grant, peer: str | None, *, ordered: bool = False
    ) -> None:
        self.bridge = bridge
        self.transport = transport
        self.grant = grant
        self.peer = peer
        self.ordered = ordered
        """The client resumes all its subscriptions from one position (SSE): they fall behind and catch
        up together, so that the stream as a whole stays in position order."""
        self.id = f"c{next(_ids)}"
        self.closing = False
        self.written = 0
        self.outbox: list[Message] = []  # live messages of this loop turn, written together by flush()
        self.queued = 0
        self.cost = 0
        self.feeds: dict[str, asyncio.Task[None]] = {}
        self.idle_since = self.seen = time.monotonic()  # seen: when the client last showed it is there
        self._pinged: float | None = None
        self._taken = 0  # bytes the client had taken at the last liveness check
        self._stalled: tuple[int, float] | None = None  # (bytes taken, when) while data waits unsent

    def fields(self, **more: object) -> dict[str, object]:
        """What log lines about this client carry (see :mod:`pgbridge.logs`)."""
        return {"client": self.id, "peer": self.peer, **more}

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Count the session as connected (the bridge's limits and health see it from now on)."""
        self.bridge.sessions.add(self)
        self.bridge.per_subject[self.grant.subject] += 1
        log.debug("%s: connected from %s over %s", self.id, self.peer, self.transport.name,
                  extra=self.fields(subject=self.grant.subject))  # fmt: skip

    def end(self, code: int | None = None) -> None:
        """Forget the session: its feeds stop, its subscriptions go, its slots are freed."""
        bridge = self.bridge
        self.closing = True
        for task in set(self.feeds.values()):
            task.cancel()
        self.feeds.clear()
        bridge.router.drop(self)
        bridge.sessions.discard(self)
        bridge.per_subject[self.grant.subject] -= 1
        bridge.cost_per_subject[self.grant.subject] -= self.cost
        log.debug("%s: disconnected (close code %s)", self.id, code, extra=self.fields(code=code))

    def close_soon(self, code: int, reason: str) -> None:
        """Close in the background (from code that must not wait)."""
        if not self.closing:
            self.closing = True
            self.bridge.closed[reason] += 1
            self.bridge.spawn(self.close(code, reason), "pgbridge-close")

    async def close(self, code: int, reason: str) -> None:
        self.closing = True
        log.debug("%s: closing with %d %s", self.id, code, reason, extra=self.fields(code=code, reason=reason))
        if self.outbox:
            self._write_outbox()
        await self.transport.close(code, reason)

    # -- sending --------------------------------------------------------------------------------------

    def offer(self, message: Message) -> bool:
        """Queue a live message if it fits in the client's budget; messages go out once per loop turn."""
        if self.closing:
            return True
        waiting = self.transport.buffered() + self.queued
        if waiting and waiting + len(message.json) > self.bridge.settings.outbound_limit:
            return False
        if not self.outbox:
            self.bridge.to_flush(self)
        self.outbox.append(message)
        self.queued += len(message.json)
        return True

    def flush(self) -> None:
        """Write what was queued in this loop turn, in one call: one system call for many messages."""
        if self.outbox:
            if self.closing or self.transport.is_closing():
                self.closing = True
                self.outbox, self.queued = [], 0
            else:
                self._write_outbox()

    def _write_outbox(self) -> None:
        outbox, self.outbox, self.queued = self.outbox, [], 0
        size = self.transport.write(outbox)
        self.written += size
        self.bridge.sent(len(outbox), size)

    def send(self, message: Message) -> None:
        """Write a reply or a notice, whatever the backlog (they are small and few), after what is queued."""
        self._write((message,))

    def backlogged(self) -> bool:
        """Whether :meth:`send_paced` would first wait for the client."""
        return self.transport.paused()

    async def send_paced(self, messages: Sequence[Message]) -> None:
        """Write catch-up or snapshot messages, in one write, once the client has taken most of what waits
        for it."""
        await self.transport.drained()
        self._write(messages)

    def _write(self, messages: Sequence[Message]) -> None:
        """Write ``messages`` now, after what is queued; nothing once the connection is closing."""
        if self.closing or self.transport.is_closing():
            self.closing = True
            return
        self.outbox.extend(messages)
        self._write_outbox()

    # -- what the side tasks ask ----------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """The client showed it is there (a message, a pong)."""
        self.seen = now

    def alive(self, now: float) -> bool:
        """Whether the client showed a sign of life since the last :meth:`ping` (call once per ping
        interval). Data that waits yet moves counts: the client acknowledges it, even if its answer to a
        ping waits behind the backlog."""
        waiting = self.transport.buffered()
        taken, self._taken = self._taken, self.written - waiting
        if waiting and self._taken > taken:
            self.seen = now
        return self.transport.unidirectional or self._pinged is None or self.seen >= self._pinged

    def ping(self, now: float) -> None:
        self._pinged = now
        self.transport.ping()

    def stalled(self, now: float) -> bool:
        """Whether data has waited for the client for ``--stall-timeout`` without any of it being taken."""
        waiting = self.transport.buffered()
        if not waiting:
            self._stalled = None
            return False
        taken = self.written - waiting
        if self._stalled is None or taken > self._stalled[0]:
            self._stalled = (taken, now)
            return False
        return now - self._stalled[1] > self.bridge.settings.stall_timeout

    def expired(self, wall: float) -> bool:
        return wall >= self.grant.expires_at

    def idle(self, now: float) -> bool:
        """Whether the session has had no subscription for ``--idle-timeout`` (never, when that is 0)."""
        timeout = self.bridge.settings.idle_timeout
        return bool(timeout) and now - self.idle_since > timeout and not self.bridge.router.subscriptions(self)

    # -- requests -------------------------------------------------------------------------------------

    async def receive(self, text: str | bytes) -> None:
        """Serve one request of the client (a WebSocket text frame)."""
        try:
            message = protocol.parse_client_message(text)
            if isinstance(message, protocol.Ping):
                self.send(protocol.pong())
            elif isinstance(message, protocol.Unsubscribe):
                self.unsubscribe(message.collection)
                self.send(protocol.unsubscribed(message.collection))
            elif isinstance(message, protocol.Refresh):
                self.refresh(message.token)
            else:
                self.subscribe([message])
        except ProtocolError as exc:
            self.send(protocol.error(exc.text, action=exc.action, collection=exc.collection))

    def unsubscribe(self, collection: str, reason: str | None = None) -> None:
        self._stop_feed(collection)
        sub = self.bridge.router.remove(self, collection)
        if sub is not None:
            self._spend(-sub.filter.cost)
        if not self.bridge.router.subscriptions(self):
            self.idle_since = time.monotonic()
        if reason is not None:
            self.send(protocol.unsubscribed(collection, reason))

    def _spend(self, cost: int) -> None:
        self.cost += cost
        self.bridge.cost_per_subject[self.grant.subject] += cost

    def check(self, requests: Sequence[protocol.Subscribe]) -> list[tuple[Subscription, int]]:
        """Whether the session may take these subscriptions, together; raise :class:`ProtocolError` with
        the client-facing reason. Returns each subscription, not yet registered, with its added cost."""
        bridge, s = self.bridge, self.bridge.settings
        current = bridge.router.subscriptions(self)
        checked: list[tuple[Subscription, int]] = []
        count, cost = len(current), 0
        for request in requests:
            name = request.collection

            def refuse(text: str, *, forbidden: bool = False, name: str = name) -> ProtocolError:
                return ProtocolError(text, action="subscribe", collection=name, forbidden=forbidden)

            if bridge.publications is None:
                raise refuse("The database is unavailable; subscribe again shortly")
            allowed = self.grant.allowed(name)
            if name not in bridge.publications or not allowed:
                raise refuse(f"Collection {name!r} is not published or not allowed for this token", forbidden=True)
            operations = request.operations or allowed
            if not operations <= allowed:
                raise refuse(
                    f"This token may not receive {', '.join(sorted(operations - allowed))} on {name!r}", forbidden=True
                )
            replaced = current.get(name)
            if replaced is None:
                count += 1
                if count > s.max_subscriptions:
                    raise refuse(f"Max subscriptions reached ({s.max_subscriptions})")
            extra = request.filter.cost - (replaced.filter.cost if replaced else 0)
            cost += extra
            if self.cost + cost > s.max_filter_cost:
                raise refuse(f"Filters too complex: at most {s.max_filter_cost} conditions per connection")
            if bridge.cost_per_subject[self.grant.subject] + cost > s.max_filter_cost_per_subject:
                raise refuse(f"Filters too complex: at most {s.max_filter_cost_per_subject} conditions per token")
            tenant = tenant_key(self.grant.tenant) if s.tenant_column else None
            checked.append((Subscription(self, name, operations, request.filter, tenant, self.grant.subject), extra))
        return checked

    def subscribe(self, requests: Sequence[protocol.Subscribe]) -> None:
        """Take these subscriptions (each replacing one to the same collection) once :meth:`check` allows
        them all, and confirm each. Those with ``since`` or ``snapshot`` are fed before they are live."""
        checked = self.check(requests)
        bridge = self.bridge
        waiting: list[tuple[Subscription, protocol.Subscribe]] = []
        for (sub, extra), request in zip(checked, requests, strict=True):
            self._stop_feed(sub.collection)
            self._spend(extra)
            live = request.since is None and not request.snapshot
            bridge.router.add(sub, live=live)
            if live:
                self.send(protocol.subscribed(sub.collection, bridge.listener.head))
                continue
            if request.snapshot:
                self.send(protocol.subscribed(sub.collection, None))
                self._start(self._snapshot(sub, request.limit), [sub.collection])
                continue
            bridge.replays += 1
            since = request.since
            self.send(protocol.subscribed(sub.collection, None if isinstance(since, LegacyId) else since))
            waiting.append((sub, request))
        if not waiting:
            return
        # An ordered session resumes everything from one position, with one feed.
        groups = [waiting] if self.ordered else [[w] for w in waiting]
        for group in groups:
            since = group[0][1].since
            assert since is not None
            self._start(self._resume([sub for sub, _ in group], since), [sub.collection for sub, _ in group])

    def refresh(self, token: str) -> None:
        """Replace the session's token, keeping its subject and tenant; end what the new grant denies."""
        bridge = self.bridge
        try:
            grant = bridge.tokens.verify(token)
            if grant.sub != self.grant.sub:
                raise AuthError("The new token is for another subject (sub); connect again to change it")
            if tenant_key(grant.tenant) != tenant_key(self.grant.tenant):
                raise AuthError(f"The new token is for another tenant ({bridge.tokens.tenant_claim})")
        except AuthError as exc:
            bridge.refreshes["refused"] += 1
            self.send(protocol.error(f"Refresh refused: {exc.reason}; the current token stands", action="refresh"))
            return
        bridge.refreshes["accepted"] += 1
        self.grant = dataclasses.replace(grant, subject=self.grant.subject)  # limits keep counting it as before
        for name, sub in list(bridge.router.subscriptions(self).items()):
            allowed = grant.allowed(name)
            if not sub.operations <= allowed:
                self.unsubscribe(name, reason="The new token does not allow this subscription")
        self.send(protocol.refreshed(grant.exp))

    # -- feeding subscriptions that are not live ------------------------------------------------------

    def _start(self, work: Coroutine[Any, Any, None], collections: Iterable[str]) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"pgbridge-feed-{self.id}")
        for name in collections:
            self.feeds[name] = task
        task.add_done_callback(self._forget_feed)

    def _forget_feed(self, task: asyncio.Task[None]) -> None:
        for name in [n for n, t in self.feeds.items() if t is task]:
            del self.feeds[name]

    def _stop_feed(self, collection: str) -> None:
        task = self.feeds.pop(collection, None)
        if task is not None:
            task.cancel()

    def fell_behind(self, sub: Subscription, change: Change, row: int) -> None:
        """``sub`` had no room for row ``row`` of ``change``: feed it from there (an ordered session's
        other subscriptions with it)."""
        if self.closing:
            return
        router = self.bridge.router
        subs = [sub]
        if self.ordered:
            subs += [s for s in router.subscriptions(self).values() if s is not sub and s.live]
            for other in subs[1:]:
                router.detach(other)
        feed = self._feed(subs, change.position(row - 1), change)
        self._start(self._run(feed), [s.collection for s in subs])

    def _feed(self, subs: list[Subscription], done: Position, first: Change | None = None) -> Feed:
        bridge = self.bridge
        return Feed(subs, self, bridge.router, bridge.listener, bridge.history, bridge, bridge.turns, done, first)

    async def _run(self, feed: Feed) -> None:
        bridge = self.bridge
        bridge.feeds.add(feed)
        try:
            await feed.run()
        except Exception:
            log.exception("%s: catching up %s failed", self.id, ", ".join(feed.collections),
                          extra=self.fields(collection=",".join(feed.collections)))  # fmt: skip
            self.close_soon(Close.INTERNAL_ERROR, protocol.INTERNAL_ERROR)
        finally:
            bridge.feeds.discard(feed)

    async def _resume(self, subs: list[Subscription], since: Position | LegacyId) -> None:
        if isinstance(since, LegacyId):
            tick = await self._locate(since.change_id)
            if tick is None:
                for sub in subs:
                    self.bridge.router.attach(sub)
                    self.send(protocol.resync_required(sub.collection))
                return
            since = (tick, since.change_id, since.row)
        await self._run(self._feed(subs, since))

    async def _locate(self, change_id: int) -> int | None:
        """The tick of a change named by an id from before ids were positions, waiting for the database."""
        delay = 0.1
        while True:
            try:
                return await self.bridge.locate(change_id)
            except DatabaseUnavailable as exc:
                log.debug("%s: resuming waits for the database: %s", self.id, exc, extra=self.fields())
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _snapshot(self, sub: Subscription, limit: int | None) -> None:
        """Send the rows of ``sub``'s table read in one snapshot, then ``snapshot_end`` with the snapshot's
        position, then every change after it."""
        bridge, name = self.bridge, sub.collection
        sent = 0
        batch: list[Message] = []
        size = 0
        # Writing resumes below half the client's budget (stream.py): a batch of a quarter keeps it within.
        most = min(_SNAPSHOT_BATCH_BYTES, bridge.settings.outbound_limit // 4)
        try:
            async with bridge.snapshot(name) as (tick, pages):
                async for page in pages:
                    for raw in page:
                        message = bridge.router.snapshot_message(sub, raw)
                        if message is None:
                            continue
                        batch.append(message)
                        size += len(raw)
                        sent += 1
                        if sent == limit:
                            break
                        if len(batch) >= _SNAPSHOT_BATCH or size >= most:
                            await self.send_paced(batch)
                            if self.closing:
                                return
                            batch, size = [], 0
                    if sent == limit:
                        break
                if batch:
                    await self.send_paced(batch)
                if self.closing:
                    return
        except DatabaseUnavailable as exc:
            log.warning("%s: the snapshot of %s failed: %s", self.id, name, exc, extra=self.fields(collection=name))
            self.unsubscribe(name)
            self.send(protocol.error(f"The snapshot of {name!r} failed: the database did not answer; subscribe again",
                                     action="subscribe", collection=name))  # fmt: skip
            return
        bridge.snapshot_rows += sent
        position = (tick, MAX_ID, 0)
        self.send(protocol.snapshot_end(name, position))
        await self._run(self._feed([sub], position))

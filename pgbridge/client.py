"""pgbridge's Python client: subscriptions that never miss an event, over one WebSocket.

::

    from pgbridge.client import Client

    async with Client("ws://127.0.0.1:8000/api/v1/realtime/ws", token=token) as client:
        async for event in client.subscribe("posts", filter={"author_id": 42}, snapshot=True):
            print(event.type, event.id, event.data, event.old)

A :class:`Client` keeps one WebSocket to a bridge and carries every subscription of the program on it.
When the connection drops it reconnects, with full-jitter exponential backoff (:func:`backoff`), and
resumes each subscription after the last event it received (``since``), so that each subscription's
events arrive exactly once, in order, across bridge restarts and network failures. A subscription that
asked for a snapshot and lost its connection before the snapshot ended starts the snapshot again, and
says so first (:class:`SnapshotRestarted`). With ``get_token``, the token is refreshed in band before it
expires, and a token refused at connect is replaced once.

What cannot be retried is raised, from the subscriptions' iterators (and from :meth:`Client.connected`,
:meth:`Client.wait_closed` and the ``async with`` block), as :class:`~pgbridge.errors.ClientError`:
:class:`~pgbridge.errors.TokenRefused`, :class:`~pgbridge.errors.SubscriptionRefused`.

This module imports neither asyncpg nor the server's modules: only aiohttp, orjson and
:mod:`pgbridge.protocol` (the wire format, shared with the server). docs/clients.md documents it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random as _random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal

import aiohttp
import orjson

from pgbridge import protocol
from pgbridge.errors import ClientError, ProtocolError, SubscriptionRefused, TokenRefused

__all__ = [
    "Change",
    "Client",
    "ClientError",
    "Disconnect",
    "Event",
    "ResyncRequired",
    "SnapshotEnd",
    "SnapshotRestarted",
    "State",
    "Subscription",
    "SubscriptionRefused",
    "TokenRefused",
    "backoff",
    "token_expiry",
]

log = logging.getLogger(__name__)

_PING = orjson.dumps({"action": "ping"})
_TOO_MANY = "Too many connections for this token"
_MAX_RETRY_AFTER = 300.0
_REFUSED_FRAMES = (
    "the server closed the connection with {code} ({reason}): it refused a message of this client, which a "
    "reconnection would send again (1009: a subscription's filter larger than the server's --max-frame)"
)

# ---------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Change:
    """A change of a row (``type`` ``"change"``, ``op`` create, update or delete), or a row of a snapshot
    (``type`` and ``op`` ``"snapshot"``; no ``id``, ``timestamp`` or ``old``).

    ``data`` is the row (a delete's: the deleted row); ``old`` the row before an update or a delete;
    ``timestamp`` when the change was made in the database; ``id`` its position, which ``since`` takes.
    """

    type: Literal["change", "snapshot"]
    collection: str
    op: Literal["create", "update", "delete", "snapshot"]
    id: str | None
    timestamp: str | None
    data: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """Every row of the snapshot has been yielded; the changes committed after it follow.

    Every event has the fields of a :class:`Change`; those that do not apply are None, so that code
    reading any event's ``op``, ``data`` or ``old`` works."""

    collection: str
    id: str
    type: Literal["snapshot_end"] = "snapshot_end"
    op: None = None
    timestamp: None = None
    data: None = None
    old: None = None


@dataclass(frozen=True, slots=True)
class ResyncRequired:
    """The collection can no longer be kept up to date by events: reload it.

    With an ``id``, a ``TRUNCATE`` emptied the table at that position (the events after it follow); without
    one, events were lost to the server's retention (a subscription resumed after too long away) or to a
    database failover. A ``snapshot=True`` subscription never gets the latter: it restarts its snapshot
    instead (:class:`SnapshotRestarted`)."""

    collection: str
    id: str | None
    type: Literal["resync_required"] = "resync_required"
    op: None = None
    timestamp: None = None
    data: None = None
    old: None = None


@dataclass(frozen=True, slots=True)
class SnapshotRestarted:
    """The snapshot starts again: forget every row this subscription yielded so far; the rows of a fresh
    snapshot follow, then :class:`SnapshotEnd`.

    ``reason``: ``"connection lost"`` (the connection dropped before the snapshot ended, and a snapshot
    has no position to resume from), ``"snapshot failed"`` (the server could not read it), or
    ``"resync required"`` (events were lost: see :class:`ResyncRequired`)."""

    collection: str
    reason: str
    type: Literal["snapshot_restarted"] = "snapshot_restarted"
    id: None = None
    op: None = None
    timestamp: None = None
    data: None = None
    old: None = None


Event = Change | SnapshotEnd | ResyncRequired | SnapshotRestarted
"""What a :class:`Subscription` yields; ``event.type`` tells them apart."""


# ---------------------------------------------------------------------------------------------------
# Connection state


class State(StrEnum):
    """Where a :class:`Client` is (``client.state``)."""

    IDLE = "idle"
    """Created, not started."""
    CONNECTING = "connecting"
    """Connecting, or waiting to reconnect (``client.disconnect`` says why the last connection ended)."""
    CONNECTED = "connected"
    """The server accepted the token: subscriptions are served."""
    CLOSED = "closed"
    """For good: :meth:`Client.close` was called, or ``client.error`` could not be retried."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """How a connection, or an attempt at one, ended."""

    code: int | None
    """The WebSocket close code (1006 for a connection that was cut), or None when no WebSocket was
    established (``reason`` then says why: connection refused, HTTP status, timeout)."""
    reason: str
    """The server's close reason (``Server shutting down``, ``Slow consumer``, ``Token expired``, ...), or
    what went wrong."""
    status: int | None = None
    """The HTTP status of a refused upgrade (503 at the server's connection limit)."""
    retry_after: float | None = None
    """Seconds the server asked the client to wait before trying again (HTTP ``Retry-After``)."""


def backoff(
    attempt: int, *, base: float = 0.5, cap: float = 20.0, random: Callable[[], float] = _random.random
) -> float:
    """The delay before retry number ``attempt`` (0 for the first retry after the immediate first try):
    uniform in ``[0, min(cap, base * 2**attempt)]`` ("full jitter", as centrifuge-js does)."""
    return random() * min(cap, base * 2.0 ** min(attempt, 64))


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the payload is base64url JSON); None when
    the token has none or is not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, AttributeError):  # binascii.Error and orjson's are ValueErrors
        return None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def _retry_after(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` (seconds, or an HTTP date) in seconds from now, at most five minutes."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _newer(new: str, old: str | None) -> bool:
    """Whether event id ``new`` comes after ``old`` (always, when they cannot be compared)."""
    if old is None or new.count(".") != old.count("."):
        return True
    try:
        return protocol.compare_ids(new, old) > 0
    except ValueError:
        return True


# ---------------------------------------------------------------------------------------------------
# Subscriptions


@dataclass(frozen=True, slots=True)
class _Mark:
    """An inbox entry that moves ``last_id`` without being yielded (None: back to no position)."""

    id: str | None


class _Inbox:
    """A subscription's events on their way to its consumer: bounded for changes (a consumer that does not
    keep up stops the client reading its socket, so the server feeds it from the change log), unbounded
    for the few notices; ended by ``None`` (iteration stops) or an exception (raised)."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Event | _Mark] = deque()
        self._maxsize = maxsize
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.ended = False
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Event) -> None:
        while len(self._items) >= self._maxsize and not self.ended:
            self._writable.clear()
            await self._writable.wait()
        self.push(item)

    def push(self, item: Event | _Mark) -> None:
        if not self.ended:
            self._items.append(item)
            self._readable.set()

    def finish(self, error: BaseException | None = None, *, discard: bool = False) -> None:
        if not self.ended:
            self.ended, self.error = True, error
            if discard:
                self._items.clear()
            self._readable.set()
            self._writable.set()

    async def get(self) -> Event | _Mark:
        while not self._items:
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self._maxsize:
            self._writable.set()
        return item


class Subscription:
    """One subscription of a :class:`Client`: an async iterator of its :data:`Event` values.

    Made by :meth:`Client.subscribe`. It lasts across reconnections, until :meth:`unsubscribe` (or
    :meth:`aclose`, or leaving ``async with``), the client's close, or an error that cannot be retried,
    which its iterator raises (:class:`~pgbridge.errors.SubscriptionRefused`,
    :class:`~pgbridge.errors.TokenRefused`).
    """

    def __init__(
        self,
        client: Client,
        collection: str,
        options: dict[str, Any],
        *,
        since: str | None,
        snapshot: bool,
        limit: int | None,
        max_queue: int,
    ) -> None:
        self._client = client
        self.collection = collection
        """The collection subscribed to."""
        self.snapshot = snapshot
        """Whether the subscription started with a snapshot of the table's rows."""
        self.last_id: str | None = since
        """The position of the last event this iterator yielded (or, before the first, where the
        subscription started: its ``since``, the server's ``subscribed`` id, ``snapshot_end``'s id). Persist
        it once you have applied an event, and subscribe with ``since=last_id`` to continue after it, in
        this process or another: nothing is missed or repeated. None until there is a position: during a
        snapshot, or before the server confirmed a live subscription."""
        self.subscribed = 0
        """How many times the server confirmed this subscription (once per connection)."""
        self.dropped = 0
        """Events dropped because their id was not after the last one received (none in normal operation)."""
        self._options = options
        self._limit = limit
        self._inbox = _Inbox(max_queue)
        self._resume: str | None = since  # the last position received (queued or yielded): what since takes
        self._in_snapshot = False  # snapshot rows are arriving
        self._sent_snapshot = False  # the last subscribe sent asked for a snapshot
        self._started = since is not None  # the consumer may hold what an earlier start of it yielded
        self._restart_reason = "connection lost"
        self._waiting = False  # the server refused the last subscribe for a while: events until it is retried are stale
        self._retries = 0  # subscribe requests repeated in a row, for the backoff
        self._retried_at = float("-inf")
        self._settled = asyncio.Event()  # confirmed once, or ended
        self.error: BaseException | None = None
        """The error that ended this subscription, if one did."""

    def __repr__(self) -> str:
        return f"<Subscription {self.collection!r} last_id={self.last_id!r}>"

    # -- the consumer's side --------------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        """The next event; raises StopAsyncIteration once unsubscribed or the client closed, and the
        error that ended the subscription, if one did."""
        while True:
            try:
                item = await self._inbox.get()
            except StopAsyncIteration:
                raise
            except Exception as exc:
                self._client._reported(exc)
                raise
            if isinstance(item, _Mark):
                self.last_id = item.id
                continue
            if isinstance(item, SnapshotRestarted):
                self.last_id = None
            elif item.id is not None:
                self.last_id = item.id
            return item

    async def ready(self) -> None:
        """Return once the server has confirmed the subscription (the first time); raise what ended it
        if it ended first."""
        await self._settled.wait()
        if self.subscribed == 0:
            if self.error is not None:
                self._client._reported(self.error)
                raise self.error
            raise ClientError(
                f"the subscription to {self.collection!r} ended before the server confirmed it: "
                "it was unsubscribed, or its client closed"
            )

    async def unsubscribe(self) -> None:
        """End the subscription: the server stops sending it, and iteration stops (events not yet
        yielded are discarded; ``last_id`` stays the last one yielded)."""
        self._client._unsubscribe(self)
        self._end(None, discard=True)

    async def aclose(self) -> None:
        """The same as :meth:`unsubscribe` (as ``contextlib.aclosing`` expects of an async iterator)."""
        await self.unsubscribe()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()

    # -- the client's side ----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """False once the subscription has ended."""
        return not self._inbox.ended

    def _message(self) -> bytes:
        """The subscribe message that continues this subscription where it is."""
        options = dict(self._options)
        self._sent_snapshot = self._resume is None and self.snapshot
        if self._resume is not None:
            options["since"] = self._resume
        elif self.snapshot:
            options["snapshot"] = True
            if self._limit is not None:
                options["limit"] = self._limit
        return protocol.subscribe(self.collection, **options)

    def _advance(self, position: str | None) -> None:
        """``last_id`` becomes ``position`` once the consumer has taken what was received before it."""
        if len(self._inbox):
            self._inbox.push(_Mark(position))
        else:
            self.last_id = position

    def _confirmed(self, position: str | None) -> None:
        self._waiting = False
        if self._sent_snapshot:
            self._in_snapshot = True
            if self._started:
                self._inbox.push(SnapshotRestarted(self.collection, self._restart_reason))
        elif position is not None and position.count(".") == 2 and _newer(position, self._resume):
            self._resume = position
            self._advance(position)
        self._started = True
        self.subscribed += 1
        self._settled.set()

    async def _change(self, change: protocol.Change) -> None:
        if change.op == "snapshot":
            if self._in_snapshot:
                await self._inbox.put(Change("snapshot", change.collection, "snapshot", None, None, change.data, None))
            return
        if change.id is None or change.op not in ("create", "update", "delete"):
            log.warning("%s: ignoring a change without an id or with an unknown operation", self.collection)
            return
        if not _newer(change.id, self._resume):
            self.dropped += 1
            log.debug("%s: dropped event %s, not after %s", self.collection, change.id, self._resume)
            return
        self._resume = change.id
        op: Literal["create", "update", "delete"] = change.op  # type: ignore[assignment]
        await self._inbox.put(Change("change", change.collection, op, change.id, change.timestamp, change.data,
                                     change.old))  # fmt: skip

    def _snapshot_end(self, position: str | None) -> None:
        if not self._in_snapshot or position is None:
            return
        self._in_snapshot = False
        self._resume = position
        self._inbox.push(SnapshotEnd(self.collection, position))

    def _resync(self, position: str | None) -> bool:
        """A ``resync_required``; True when the snapshot must start again (the caller resubscribes)."""
        if position is not None:
            if not _newer(position, self._resume):
                self.dropped += 1
                return False
            self._resume = position
            self._inbox.push(ResyncRequired(self.collection, position))
            return False
        if self.snapshot:
            self._resume = None
            self._in_snapshot = False
            self._restart_reason = "resync required"
            return True
        self._inbox.push(ResyncRequired(self.collection, None))
        return False

    def _snapshot_failed(self) -> None:
        self._in_snapshot = False
        self._restart_reason = "snapshot failed"

    def _disconnected(self) -> None:
        self._waiting = False
        if self._in_snapshot:
            self._in_snapshot = False
            self._restart_reason = "connection lost"

    def _end(self, error: BaseException | None, *, discard: bool = False) -> None:
        if not self._inbox.ended:
            self.error = error
            self._inbox.finish(error, discard=discard)
            self._settled.set()


# ---------------------------------------------------------------------------------------------------
# The client


class _Connection:
    """One WebSocket and what is in flight on it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, token: str | None) -> None:
        self.ws = ws
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.outstanding: Counter[str] = Counter()  # requests per collection the server has yet to answer
        self.authenticated = False
        self.exp = token_expiry(token) if token else None
        self.token_time = time.time()
        self.refresh_reply: asyncio.Future[tuple[bool, Any]] | None = None
        self.fatal: BaseException | None = None
        self.timers: list[asyncio.TimerHandle] = []

    def send(self, message: bytes) -> None:
        self.outbox.put_nowait(message)

    async def write(self) -> None:
        """Send the outbox in order, until the connection ends."""
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            while True:
                message = await self.outbox.get()
                await self.ws.send_str(message.decode())


class Client:
    """A connection to a bridge that carries any number of subscriptions, reconnecting and resuming
    them for as long as it is open.

    ``url`` is the WebSocket endpoint (``ws://host:8000/api/v1/realtime/ws``, or ``wss://`` behind TLS).
    The token is sent as the ``bearer`` subprotocol, which keeps it out of URLs and logs; give either
    ``token`` (a JWT), ``get_token`` (an async function returning a fresh JWT, called at start, before the
    token expires, and once more when the server refuses one), or both. ``get_token`` should do its own
    retrying: what it raises ends the client.

    Tuning (the defaults suit production): reconnection delays are :func:`backoff` with ``base_delay``
    and ``max_delay``, starting over after a connection that stayed up ``stable_after`` seconds; a
    ``Retry-After`` of a refused upgrade (HTTP 503 at the server's connection limit) is waited instead.
    ``heartbeat`` is how often to ping the server (a dead connection is noticed within 1.5 times it);
    ``connect_timeout`` how long an attempt may take, from DNS to the upgrade;
    ``refresh_before`` how long before ``exp`` the token is refreshed (at most half its lifetime);
    ``max_queue`` how many events each subscription holds for its consumer before the client stops
    reading the socket. ``on_state`` is called with the new :class:`State` and the last
    :class:`Disconnect` at every change of state. ``session`` is an aiohttp session to use (else the
    client makes its own); ``random`` and ``sleep`` stand in for the backoff's randomness and waiting.

    Use it as ``async with Client(...) as client:``, or :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: Callable[[], Awaitable[str]] | None = None,
        on_state: Callable[[State, Disconnect | None], object] | None = None,
        session: aiohttp.ClientSession | None = None,
        base_delay: float = 0.5,
        max_delay: float = 20.0,
        stable_after: float = 5.0,
        heartbeat: float | None = 30.0,
        connect_timeout: float = 10.0,
        refresh_before: float = 60.0,
        max_queue: int = 10_000,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self._token = token
        self._get_token = get_token
        self._on_state = on_state
        self._http = session
        self._own_http = session is None
        self.base_delay, self.max_delay, self.stable_after = base_delay, max_delay, stable_after
        self.heartbeat, self.refresh_before, self.max_queue = heartbeat, refresh_before, max_queue
        self.connect_timeout = connect_timeout
        self._random, self._sleep = random, sleep
        self.state = State.IDLE
        """Where the client is: see :class:`State`."""
        self.disconnect: Disconnect | None = None
        """How the last connection, or attempt at one, ended (None before any did)."""
        self.error: BaseException | None = None
        """What closed the client, when it was not :meth:`close`."""
        self.attempts = 0
        """Connection attempts so far."""
        self.connections = 0
        """Connections the server accepted so far (each after the first is a reconnection)."""
        self.refreshes = 0
        """Tokens the server accepted in band (refresh) so far."""
        self._subs: dict[str, Subscription] = {}
        self._conn: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._wanted = asyncio.Event()  # there is something to connect for
        self._reported_error = False
        self._token_retried = False  # get_token was asked for a token to replace a refused one
        self._token_fresh = False  # the token is one get_token just gave

    # -- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        if exc_type is None and self.error is not None and not self._reported_error:
            self._reported(self.error)
            raise self.error

    async def start(self) -> None:
        """Start connecting (in the background: this returns at once)."""
        if self._task is not None:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._wanted.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pgbridge-client")

    async def close(self) -> None:
        """Close the connection and end every subscription (their iterators stop after the events they
        hold). Safe to call more than once."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finish(None)
        if self._own_http and self._http is not None:
            await self._http.close()

    async def connected(self) -> None:
        """Return once the client is connected (now, if it is); raise what closed it, if it closes first."""
        while not self._connected.is_set():
            if self._closed.is_set():
                break
            waits = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._closed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self.state is State.CLOSED:
            if self.error is not None:
                self._reported(self.error)
                raise self.error
            raise ClientError("the client is closed: make a new Client to connect again")

    async def wait_closed(self) -> None:
        """Return once the client has closed; raise what closed it, if it was not :meth:`close`."""
        await self._closed.wait()
        if self.error is not None:
            self._reported(self.error)
            raise self.error

    @property
    def subscriptions(self) -> Sequence[Subscription]:
        """The active subscriptions."""
        return tuple(self._subs.values())

    # -- subscriptions --------------------------------------------------------------------------------

    def subscribe(
        self,
        collection: str,
        *,
        operations: Sequence[str] | None = None,
        filter: Mapping[str, Any] | None = None,
        since: str | None = None,
        snapshot: bool = False,
        limit: int | None = None,
    ) -> Subscription:
        """Subscribe to ``collection``; return the :class:`Subscription`, an async iterator of its events.

        ``operations``: a subset of create, update, delete (default: all the token allows). ``filter``: a
        row filter (``{"author_id": 42, "score": {"gte": 10}}``). ``since``: an event id to continue after
        (a ``last_id`` persisted earlier). ``snapshot``: first the rows of the table (at most ``limit``)
        as ``snapshot`` events, then :class:`SnapshotEnd`, then the changes after it; a snapshot starts
        again (:class:`SnapshotRestarted`) if the connection drops before it ends or events are lost.
        ``snapshot`` with ``since``: continue after ``since`` if it is not None, else start with a
        snapshot, and take a snapshot again rather than yield :class:`ResyncRequired` without an id (the
        way to resume a table rebuilt from a snapshot with a persisted ``last_id``, which is None until
        the first snapshot ends). A request the server would refuse (a malformed filter) raises
        :class:`~pgbridge.errors.SubscriptionRefused` here; one it refuses (a collection the token may not
        see) raises it from the iterator. One subscription per collection and client.
        """
        if self.state is State.CLOSED:
            raise ClientError("the client is closed: make a new Client to connect again")
        if collection in self._subs:
            raise ValueError(f"already subscribed to {collection!r} on this client: unsubscribe first")
        options: dict[str, Any] = {}
        if operations is not None:
            options["operations"] = list(operations)
        if filter is not None:
            options["filter"] = dict(filter)
        try:  # the server's own validation, so that a request it would refuse fails here
            protocol.subscription(collection, since=since, **options)  # the client never sends both
            protocol.subscription(collection, snapshot=snapshot or None, limit=limit, **options)
        except ProtocolError as exc:
            raise SubscriptionRefused(exc.text, collection) from None
        sub = Subscription(self, collection, options, since=since, snapshot=snapshot, limit=limit,
                           max_queue=self.max_queue)  # fmt: skip
        self._subs[collection] = sub
        self._wanted.set()
        if self._conn is not None:
            self._send_subscribe(self._conn, sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.collection) is sub:
            del self._subs[sub.collection]
            conn = self._conn
            if conn is not None:
                conn.outstanding[sub.collection] += 1
                conn.send(protocol.unsubscribe(sub.collection))

    def _send_subscribe(self, conn: _Connection, sub: Subscription) -> None:
        conn.outstanding[sub.collection] += 1
        conn.send(sub._message())

    def _retry_subscribe(self, conn: _Connection, sub: Subscription) -> None:
        """Subscribe again (after a transient refusal, or to take a snapshot again), after a backoff delay
        that grows while the retries follow one another (so that a server that keeps asking for them is
        not hammered)."""
        sub._waiting = True
        now = time.monotonic()
        if now - sub._retried_at > self.max_delay + self.stable_after:
            sub._retries = 0
        sub._retried_at = now
        delay = backoff(sub._retries, base=self.base_delay, cap=self.max_delay, random=self._random)
        sub._retries += 1

        def again() -> None:
            if self._conn is conn and self._subs.get(sub.collection) is sub:
                self._send_subscribe(conn, sub)

        conn.timers.append(asyncio.get_running_loop().call_later(delay, again))

    # -- states and errors ----------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        self.state = state
        if state is State.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_state is not None:
            self._on_state(state, self.disconnect)

    def _reported(self, error: BaseException) -> None:
        if error is self.error:
            self._reported_error = True

    def _finish(self, error: BaseException | None) -> None:
        """Close for good: every subscription ends, with ``error`` if there is one."""
        if self.state is State.CLOSED:
            return
        if error is not None:
            self.error = error
        for sub in list(self._subs.values()):
            sub._end(error)
        self._subs.clear()
        self._set_state(State.CLOSED)
        self._closed.set()

    # -- connecting -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0  # tries in a row that failed or did not stay up
        retry_after: float | None = None
        try:
            while True:
                if retry_after is not None:
                    delay = retry_after
                elif failures:
                    delay = backoff(failures - 1, base=self.base_delay, cap=self.max_delay, random=self._random)
                else:
                    delay = 0.0
                self._set_state(State.CONNECTING)
                if delay > 0:
                    log.debug("reconnecting in %.3fs", delay)
                    await self._sleep(delay)
                await self._wanted.wait()
                self.attempts += 1
                started = time.monotonic()
                ended, authenticated = await self._connect_once()
                self.disconnect = ended
                retry_after = ended.retry_after
                if authenticated and time.monotonic() - started >= self.stable_after:
                    failures = 0
                else:
                    failures += 1
                code, reason = ended.code, ended.reason
                (log.info if authenticated or failures <= 1 else log.debug)(
                    "%s: %s %s", "connection lost" if authenticated else "cannot connect",
                    code if code is not None else "-", reason,
                )  # fmt: skip
                if code == protocol.Close.POLICY and reason != _TOO_MANY:
                    if self._get_token is None or self._token_retried:
                        raise TokenRefused(reason)
                    self._token_retried = True
                    self._token = await self._get_token()  # and try it at once
                    self._token_fresh = True
                    failures, retry_after = 0, None
                elif code in (protocol.Close.PROTOCOL_ERROR, protocol.Close.TOO_BIG):
                    raise ClientError(_REFUSED_FRAMES.format(code=code, reason=reason or "no reason given"))
                elif code == protocol.Close.NORMAL and not self._subs:
                    self._wanted.clear()  # closed as idle: reconnect once there is a subscription
        except Exception as exc:  # what cannot be retried, and errors of get_token or on_state
            log.debug("the client stops: %r", exc)
            self._finish(exc)

    async def _current_token(self) -> str | None:
        """The token to connect with: from ``get_token`` when there is none yet, or the one there is
        expires within a second (unless ``get_token`` just gave it)."""
        fresh, self._token_fresh = self._token_fresh, False
        if self._get_token is not None and not fresh:
            exp = token_expiry(self._token) if self._token else None
            if self._token is None or (exp is not None and exp - time.time() < 1.0):
                self._token = await self._get_token()
        return self._token

    async def _connect_once(self) -> tuple[Disconnect, bool]:
        """One connection, from the upgrade to its end; how it ended and whether the server accepted the
        token. Raises what cannot be retried."""
        token = await self._current_token()
        assert self._http is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._http.ws_connect(
                    self.url, protocols=("bearer", token) if token else (), heartbeat=self.heartbeat,
                    max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
            if 400 <= status < 500 and status not in (408, 429):
                raise ClientError(
                    f"the server refused the WebSocket upgrade: HTTP {status} {exc.message}; check "
                    f"the URL, which is a bridge's {protocol.WS_PATH}"
                ) from None
            wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            return Disconnect(None, f"HTTP {status}", status, wait), False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Disconnect(None, str(exc) or type(exc).__name__), False
        conn = _Connection(ws, token)
        writer = asyncio.get_running_loop().create_task(conn.write(), name="pgbridge-client-writer")
        refresher: asyncio.Task[None] | None = None
        self._conn = conn
        conn.send(_PING)  # its pong says the token was accepted, even with no subscription
        for sub in self._subs.values():
            self._send_subscribe(conn, sub)
        code: int | None = None
        reason = ""
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    if not conn.authenticated:
                        conn.authenticated = True
                        self._token_retried = False
                        self.connections += 1
                        self._set_state(State.CONNECTED)
                        if self._get_token is not None:
                            refresher = asyncio.get_running_loop().create_task(
                                self._refresh(conn), name="pgbridge-client-refresh"
                            )
                    await self._receive(conn, msg.data)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    code, reason = msg.data, msg.extra or ""
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    error = ws.exception() or (msg.data if msg.type is aiohttp.WSMsgType.ERROR else None)
                    code = ws.close_code if ws.close_code is not None else 1006
                    reason = str(error) if error else "connection lost"
                    break
        finally:
            self._conn = None
            for timer in conn.timers:
                timer.cancel()
            for task in (writer, refresher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            for sub in self._subs.values():
                sub._disconnected()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
        if conn.fatal is not None:
            raise conn.fatal
        return Disconnect(code, reason), conn.authenticated

    # -- what the server sends ------------------------------------------------------------------------

    async def _receive(self, conn: _Connection, text: str) -> None:
        try:
            message = protocol.decode(text)
        except ValueError:
            log.warning("ignoring a message that is not one of the protocol: %.200s", text)
            return
        if isinstance(message, protocol.Change):
            sub = self._subs.get(message.collection)
            if sub is not None and not conn.outstanding[message.collection] and not sub._waiting:
                await sub._change(message)
            return
        kind, name = message.type, message.collection
        if kind in ("heartbeat", "pong"):
            return
        if kind == "refreshed":
            if conn.refresh_reply is not None and not conn.refresh_reply.done():
                conn.refresh_reply.set_result((True, message.body.get("exp")))
            return
        if kind == "error":
            self._error(conn, message)
            return
        if name is None:
            return
        sub = self._subs.get(name)
        if kind == "unsubscribed" and "reason" in message.body:  # the server ended it: not a reply
            if sub is not None and not conn.outstanding[name]:
                del self._subs[name]
                sub._end(SubscriptionRefused(str(message.body["reason"]), name))
            return
        if kind in ("subscribed", "unsubscribed"):  # replies, in the order of the requests
            if conn.outstanding[name]:
                conn.outstanding[name] -= 1
            if kind == "subscribed" and sub is not None and not conn.outstanding[name]:
                sub._confirmed(message.id)
            return
        if sub is None or conn.outstanding[name] or sub._waiting:
            return  # about a subscription this client no longer has, or has replaced
        if kind == "snapshot_end":
            sub._snapshot_end(message.id)
        elif kind == "resync_required" and sub._resync(message.id):
            self._retry_subscribe(conn, sub)

    def _error(self, conn: _Connection, message: protocol.Notice) -> None:
        text = str(message.body.get("error"))
        action, name = message.body.get("action"), message.collection
        if action == "refresh":
            if conn.refresh_reply is not None and not conn.refresh_reply.done():
                conn.refresh_reply.set_result((False, text))
            return
        if action != "subscribe" or name is None:
            log.warning("the server said: %s", text)
            return
        sub = self._subs.get(name)
        # A failed snapshot is not a reply: the server had confirmed the subscription, then ended it.
        reply = bool(conn.outstanding[name]) and not text.startswith("The snapshot of ")
        if reply:
            conn.outstanding[name] -= 1
            if conn.outstanding[name] or sub is None:
                return  # about a request that a later one replaced
        elif sub is None or conn.outstanding[name]:
            return
        if "subscribe again" in text:  # the server's texts for what passes: the database was unavailable
            log.info("%s: %s", name, text)
            if not reply:
                sub._snapshot_failed()
            self._retry_subscribe(conn, sub)
            return
        del self._subs[name]
        sub._end(SubscriptionRefused(text, name))

    # -- refreshing the token -------------------------------------------------------------------------

    async def _refresh(self, conn: _Connection) -> None:
        """Replace the connection's token before it expires, for as long as the connection lasts."""
        assert self._get_token is not None
        refused: list[str] = []
        spacing = 0.0  # a get_token that gives the same token again is not asked more than once a second
        try:
            while conn.exp is not None:
                lifetime = max(conn.exp - conn.token_time, 0.0)
                at = conn.exp - min(self.refresh_before, lifetime / 2)
                await asyncio.sleep(max(at - time.time(), spacing))
                token = await self._get_token()
                conn.refresh_reply = asyncio.get_running_loop().create_future()
                conn.send(protocol.refresh(token))
                accepted, detail = await conn.refresh_reply
                if accepted:
                    refused.clear()
                    spacing = 1.0
                    self.refreshes += 1
                    self._token, conn.token_time = token, time.time()
                    conn.exp = float(detail) if isinstance(detail, int | float) else token_expiry(token)
                    log.debug("token refreshed; it expires at %s", conn.exp)
                    continue
                refused.append(str(detail))
                spacing = 0.0  # the second chance comes at once
                log.warning("the server refused a refreshed token: %s", detail)
                if len(refused) >= 2:  # a second token refused in a row: get_token gives what will not do
                    raise TokenRefused(refused[-1])
        except Exception as exc:
            conn.fatal = exc
            await conn.ws.close()

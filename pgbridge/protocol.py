"""The wire protocol in both directions: what clients send, what the server sends, and how each is
read back. No I/O; clients, tests and the server share it.

A server message is a :class:`Message`: its JSON (what a WebSocket text frame carries), the name an
SSE stream gives it, and its position when it has one (an SSE ``id:``). A transport turns a message
into bytes once (:meth:`Message.encoded`), however many sessions it goes to. :func:`decode` reads one
back into a typed value, as clients do.

Error texts are part of the protocol (see the README); clients may match on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import orjson

from pgbridge.errors import ProtocolError
from pgbridge.events import OPS, LegacyId, Op, Position, event_id, parse_event_id
from pgbridge.filters import MATCH_ALL, RowFilter, compile_filter

WS_PATH = "/api/v1/realtime/ws"
SSE_PATH = "/api/v1/realtime/subscribe"
MAX_SNAPSHOT_LIMIT = 2**31 - 1


class Close(IntEnum):
    """The close codes pgbridge sends (RFC 6455, section 7.4); an SSE stream's ``close`` event has them too."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


# Close reasons clients may match on.
MISSING_TOKEN = "Missing token"
AUTHENTICATION_FAILED = "Authentication failed"
TOKEN_EXPIRED = "Token expired"
SHUTTING_DOWN = "Server shutting down"
SLOW_CONSUMER = "Slow consumer"
INTERNAL_ERROR = "Internal error"

# ---------------------------------------------------------------------------------------------------
# Client to server


@dataclass(frozen=True, slots=True)
class Subscribe:
    collection: str
    operations: frozenset[Op] | None
    """None when the client named none: every operation it is allowed."""
    filter: RowFilter = MATCH_ALL
    since: Position | LegacyId | None = None
    snapshot: bool = False
    limit: int | None = None
    """At most this many snapshot rows."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    collection: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str


ClientMessage = Subscribe | Unsubscribe | Ping | Refresh
_ACTIONS = "subscribe, unsubscribe, ping or refresh"


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse and validate one text frame; raise :class:`ProtocolError` with the client-facing text."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("Invalid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("Message must be a JSON object")
    action = message.get("action")
    if action == "ping":
        return Ping()
    if action == "refresh":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("Invalid refresh: token must be the new JWT, as a string", action=action)
        return Refresh(token)
    if action not in ("subscribe", "unsubscribe"):
        if action is None:
            raise ProtocolError(f"Missing action (expected {_ACTIONS})")
        raise ProtocolError(
            f"Unknown action: {str(action)[:64]!r} (expected {_ACTIONS})",
            action=action if isinstance(action, str) else None,
        )
    collection = message.get("collection")
    if collection is None or collection == "":
        raise ProtocolError("Missing collection", action=action)
    if not isinstance(collection, str):
        raise ProtocolError("Invalid collection: must be a string", action=action)
    if action == "unsubscribe":
        return Unsubscribe(collection)
    try:
        return subscription(
            collection,
            operations=message.get("operations"),
            filter=message.get("filter"),
            since=message.get("since"),
            snapshot=message.get("snapshot"),
            limit=message.get("limit"),
        )
    except ProtocolError as exc:
        exc.action, exc.collection = action, collection
        raise


def subscription(
    collection: str, *, operations: Any = None, filter: Any = None, since: Any = None, snapshot: Any = None,
    limit: Any = None,
) -> Subscribe:  # fmt: skip
    """Validate a subscription's parts, as a WebSocket message or an SSE query carries them."""
    if snapshot not in (None, False, True):
        raise ProtocolError("Invalid snapshot: must be true or false")
    if snapshot and since is not None:
        raise ProtocolError(
            "since and snapshot cannot be combined: a snapshot starts from the table's rows, since from an event"
        )
    if limit is not None and (
        not snapshot or not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_SNAPSHOT_LIMIT
    ):
        raise ProtocolError("Invalid limit: a positive integer, only with snapshot")
    return Subscribe(collection, _operations(operations), compile_filter(filter), _since(since), bool(snapshot), limit)


def _operations(value: Any) -> frozenset[Op] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ProtocolError("Invalid operations: must be a non-empty list of create, update, delete")
    for op in value:
        if op not in OPS:
            raise ProtocolError(f"Unknown operation: {str(op)[:64]!r} (expected create, update or delete)")
    return frozenset(value)


def _since(value: Any) -> Position | LegacyId | None:
    if value is None:
        return None
    try:
        return parse_event_id(value)
    except ValueError:
        raise ProtocolError('Invalid since: expected the "id" of an event, such as "12.3456.0"') from None


def subscribe(collection: str, **options: Any) -> bytes:
    """A ``subscribe`` message, as a client sends it (``operations``, ``filter``, ``since``, ...)."""
    return orjson.dumps({"action": "subscribe", "collection": collection, **options})


def unsubscribe(collection: str) -> bytes:
    return orjson.dumps({"action": "unsubscribe", "collection": collection})


def refresh(token: str) -> bytes:
    return orjson.dumps({"action": "refresh", "token": token})


# ---------------------------------------------------------------------------------------------------
# Server to client


class Message:
    """One server message, before any transport has turned it into bytes.

    ``event`` is its SSE event name, ``id`` its position as an event id (an SSE ``id:``) when it has one.
    """

    __slots__ = ("_encoded", "event", "id", "json")

    def __init__(self, json: bytes, event: str, id: str | None = None) -> None:
        self.json = json
        self.event = event
        self.id = id
        self._encoded: dict[Callable[[Message], bytes], bytes] | None = None

    def encoded(self, codec: Callable[[Message], bytes]) -> bytes:
        """The bytes ``codec`` makes of this message, made once for all the sessions that use it."""
        cache = self._encoded
        if cache is None:
            cache = self._encoded = {}
        found = cache.get(codec)
        if found is None:
            found = cache[codec] = codec(self)
        return found

    def __repr__(self) -> str:
        return f"Message({self.json[:200]!r})"


def iso_now() -> str:
    """The current UTC time as the protocol writes it: ISO 8601, milliseconds, ``Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _message(body: dict[str, Any], event: str, id: str | None = None) -> Message:
    return Message(orjson.dumps(body), event, id)


# Confirmations carry "status" (what SnackBase documents) and "type" (what its server and SDK use).
def subscribed(collection: str, start: Position | None) -> Message:
    """``start`` is the subscription's starting position; None for a snapshot, which has none yet."""
    body: dict[str, Any] = {"status": "subscribed", "type": "subscribed", "collection": collection}
    if start is None:
        return _message(body, "subscribed")
    body["id"] = position = event_id(start)
    return _message(body, "subscribed", position)


def unsubscribed(collection: str, reason: str | None = None) -> Message:
    body = {"status": "unsubscribed", "type": "unsubscribed", "collection": collection}
    if reason is not None:
        body["reason"] = reason
    return _message(body, "unsubscribed")


def resync_required(collection: str, id: str | None = None) -> Message:
    """The client's view of ``collection`` cannot be brought up to date by events: it must reload.

    ``id`` is set when the cause is an event (a TRUNCATE), so that ``since`` can resume after it.
    """
    body = {"type": "resync_required", "collection": collection}
    if id is not None:
        body["id"] = id
    return _message(body, "resync_required", id)


def snapshot_end(collection: str, position: Position) -> Message:
    """After a snapshot's rows: every change after ``position`` follows, and it works as ``since``."""
    id = event_id(position)
    return _message({"type": "snapshot_end", "collection": collection, "id": id}, "snapshot_end", id)


def refreshed(exp: float) -> Message:
    return _message({"type": "refreshed", "exp": exp}, "refreshed")


def pong() -> Message:
    return _message({"type": "pong", "timestamp": iso_now()}, "pong")


def heartbeat() -> Message:
    return _message({"type": "heartbeat", "timestamp": iso_now()}, "heartbeat")


def error(text: str, *, action: str | None = None, collection: str | None = None) -> Message:
    body = {"error": text}
    if action is not None:
        body["action"] = action
    if collection is not None:
        body["collection"] = collection
    return _message(body, "error")


def closing(code: int, reason: str) -> Message:
    """How an SSE stream says it ends (a WebSocket has its close frame)."""
    return _message({"code": code, "reason": reason}, "close")


def data_event(collection: str, op: Op, timestamp: str, id: str, data: bytes, old: bytes | None) -> Message:
    """A change, around the row's JSON exactly as PostgreSQL rendered it."""
    head = orjson.dumps({"type": f"{collection}.{op}", "timestamp": timestamp, "id": id})
    if old is None:
        body = b"".join((head[:-1], b',"data":', data, b"}"))
    else:
        body = b"".join((head[:-1], b',"data":', data, b',"old":', old, b"}"))
    return Message(body, f"{collection}.{op}", id)


def snapshot_row(collection: str, data: bytes) -> Message:
    """One row of a snapshot: a row as it is now, with no position of its own."""
    event, prefix = _snapshot_event(collection)
    return Message(prefix + data + b"}", event)


@functools.lru_cache(maxsize=1024)
def _snapshot_event(collection: str) -> tuple[str, bytes]:
    event = f"{collection}.snapshot"
    return event, b'{"type":"' + event.encode() + b'","data":'


# ---------------------------------------------------------------------------------------------------
# Server messages read back, as clients see them


@dataclass(frozen=True, slots=True)
class Change:
    """A change (``op`` create, update or delete), or a row of a snapshot (``op`` is ``"snapshot"``)."""

    collection: str
    op: str
    id: str | None
    timestamp: str | None
    data: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Notice:
    """Any other message: ``type`` is ``subscribed``, ``unsubscribed``, ``snapshot_end``,
    ``resync_required``, ``refreshed``, ``pong``, ``heartbeat`` or ``error``; ``body`` is all of it."""

    type: str
    collection: str | None
    id: str | None
    body: dict[str, Any]


def decode(payload: str | bytes) -> Change | Notice:
    """Read one server message; raise ValueError if it is not one."""
    body = orjson.loads(payload)
    if not isinstance(body, dict):
        raise ValueError(f"not a server message: {payload[:200]!r}")
    kind = body.get("type")
    if "error" in body:
        return Notice("error", body.get("collection"), None, body)
    if not isinstance(kind, str):
        raise ValueError(f"not a server message: {payload[:200]!r}")
    collection, dot, op = kind.rpartition(".")
    if dot and isinstance(body.get("data"), dict):
        return Change(collection, op, body.get("id"), body.get("timestamp"), body["data"], body.get("old"))
    return Notice(kind, body.get("collection"), body.get("id"), body)


def compare_ids(a: str, b: str) -> int:
    """-1, 0 or 1 as event id ``a`` comes before, with, or after ``b`` (tuples of integers)."""
    ka, kb = tuple(map(int, a.split("."))), tuple(map(int, b.split(".")))
    return int(ka > kb) - int(ka < kb)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of an SSE stream: its ``id:`` (None when it has none), ``event:`` and ``data:``."""

    id: str | None
    event: str
    data: str


class EventStreamParser:
    """Reads an SSE stream (``text/event-stream``) as the WHATWG HTML standard says browsers do:
    lines ending in LF, CR or CRLF; ``field: value``; a blank line ends an event; ``:`` starts a comment
    (heartbeats). ``retry:`` values are kept in :attr:`retry`."""

    __slots__ = ("_buffer", "_data", "_event", "_id", "retry")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        """The events ``chunk`` completes."""
        self._buffer += chunk
        events: list[StreamEvent] = []
        lines = self._buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = lines.pop()
        for raw in lines:
            line = raw.decode()
            if not line:
                if self._data:
                    events.append(StreamEvent(self._id, self._event or "message", "\n".join(self._data)))
                self._data, self._event, self._id = [], "", None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self._id = value
            elif name == "retry" and value.isdigit():
                self.retry = int(value)
        return events

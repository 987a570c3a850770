"""The client protocol: parse what clients send, encode what the server sends. No I/O.

Error texts are part of the protocol (see the README); clients may match on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from pgbridge.errors import ProtocolError
from pgbridge.events import OPS, Op, parse_event_id
from pgbridge.filters import MATCH_ALL, RowFilter, compile_filter


@dataclass(frozen=True, slots=True)
class Subscribe:
    collection: str
    operations: frozenset[Op] | None
    """None when the client named none: every operation it is allowed."""
    filter: RowFilter = MATCH_ALL
    since: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    collection: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientMessage = Subscribe | Unsubscribe | Ping


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
    if action not in ("subscribe", "unsubscribe"):
        if action is None:
            raise ProtocolError("Missing action (expected subscribe, unsubscribe or ping)")
        raise ProtocolError(
            f"Unknown action: {str(action)[:64]!r} (expected subscribe, unsubscribe or ping)",
            action=action if isinstance(action, str) else None,
        )
    collection = message.get("collection")
    if collection is None or collection == "":
        raise ProtocolError("Missing collection", action=action)
    if not isinstance(collection, str):
        raise ProtocolError("Invalid collection: must be a string", action=action)
    if action == "unsubscribe":
        return Unsubscribe(collection)
    if message.get("snapshot") not in (None, False):
        # Ignoring it would leave the client waiting for rows that never come.
        raise ProtocolError(
            'Snapshots are not offered by this server: subscribe without "snapshot", then read the rows; '
            "every change committed after the subscribed reply arrives as an event",
            action=action,
            collection=collection,
        )
    try:
        return Subscribe(
            collection,
            _operations(message.get("operations")),
            compile_filter(message.get("filter")),
            _since(message.get("since")),
        )
    except ProtocolError as exc:
        exc.action, exc.collection = action, collection
        raise


def _operations(value: Any) -> frozenset[Op] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ProtocolError("Invalid operations: must be a non-empty list of create, update, delete")
    for op in value:
        if op not in OPS:
            raise ProtocolError(f"Unknown operation: {str(op)[:64]!r} (expected create, update or delete)")
    return frozenset(value)


def _since(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_event_id(value)
    except ValueError:
        raise ProtocolError('Invalid since: expected the "id" of an event, such as "1234.0"') from None


def iso_now() -> str:
    """The current UTC time as the protocol writes it: ISO 8601, milliseconds, ``Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


# Confirmations carry "status" (what SnackBase documents) and "type" (what its server and SDK use).
def subscribed(collection: str) -> bytes:
    return _dumps({"status": "subscribed", "type": "subscribed", "collection": collection})


def unsubscribed(collection: str) -> bytes:
    return _dumps({"status": "unsubscribed", "type": "unsubscribed", "collection": collection})


def resync_required(collection: str, event_id: str | None = None) -> bytes:
    """The client's view of ``collection`` cannot be brought up to date by events: it must reload.

    ``event_id`` is set when the cause is an event (a TRUNCATE), so that ``since`` can resume after it.
    """
    if event_id is None:
        return _dumps({"type": "resync_required", "collection": collection})
    return _dumps({"type": "resync_required", "collection": collection, "id": event_id})


def pong() -> bytes:
    return _dumps({"type": "pong", "timestamp": iso_now()})


def heartbeat() -> bytes:
    return _dumps({"type": "heartbeat", "timestamp": iso_now()})


def error(text: str, *, action: str | None = None, collection: str | None = None) -> bytes:
    message: dict[str, Any] = {"error": text}
    if action is not None:
        message["action"] = action
    if collection is not None:
        message["collection"] = collection
    return _dumps(message)


def data_event(collection: str, op: Op, timestamp: str, event_id: str, data: bytes, old: bytes | None) -> bytes:
    """Encode a data event around the row's JSON exactly as PostgreSQL rendered it."""
    head = _dumps({"type": f"{collection}.{op}", "timestamp": timestamp, "id": event_id})
    if old is None:
        return b"".join((head[:-1], b',"data":', data, b"}"))
    return b"".join((head[:-1], b',"data":', data, b',"old":', old, b"}"))

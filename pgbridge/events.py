"""Change events: what the triggers in ``sql/`` announce, decoded into typed values.

A notification carries a header line (JSON) followed by the changed rows, one JSON object per line,
exactly as PostgreSQL's ``to_jsonb`` rendered them. Rows stay raw bytes from here to the socket, so
values such as 30-digit numerics reach clients unaltered; they are parsed only when a filter needs
them (:func:`row_values`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from pgbridge.errors import PgBridgeError

Op = Literal["create", "update", "delete"]
OPS: tuple[Op, ...] = ("create", "update", "delete")

_EVENT_ID = re.compile(r"(\d{1,19})\.(\d{1,9})")


class DecodeError(PgBridgeError):
    """A payload did not have the shape the triggers write."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry: some rows changed by one statement (a chunk of at most 1000)."""

    change_id: int
    collection: str
    op: Op
    timestamp: str
    rows: tuple[bytes, ...]
    """The new rows (create, update) or the deleted rows (delete), as JSON."""
    olds: tuple[bytes, ...] | None
    """For an update, the row before the change, pairwise with :attr:`rows`."""

    def event_id(self, index: int) -> str:
        """The opaque id of row ``index`` of this change, as clients see it and send back in ``since``."""
        return f"{self.change_id}.{index}"


@dataclass(frozen=True, slots=True)
class ChangeRef:
    """A change whose rows were too large for a notification; read them back by ``change_id``."""

    change_id: int
    collection: str


def parse_event_id(value: object) -> tuple[int, int]:
    """Split an event id (``"<change>.<row>"``) into its parts; raise ValueError when malformed."""
    if not isinstance(value, str) or (m := _EVENT_ID.fullmatch(value)) is None:
        raise ValueError(value)
    return int(m.group(1)), int(m.group(2))


def decode_notification(payload: str) -> Change | ChangeRef:
    """Decode one ``pgbridge`` notification payload."""
    head, _, body = payload.partition("\n")
    try:
        header = orjson.loads(head)
        change_id, collection, op = header["id"], header["c"], header["op"]
        if header.get("ref"):
            return ChangeRef(int(change_id), collection)
        return make_change(change_id, collection, op, header["ts"], header["n"], body)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"malformed notification {payload[:200]!r}: {exc}") from exc


def make_change(change_id: int, collection: str, op: str, timestamp: str, nrows: int, body: str) -> Change:
    """Build a :class:`Change` from the columns of a ``pgbridge.changes`` row."""
    if op not in OPS:
        raise DecodeError(f"change {change_id}: unknown operation {op!r}")
    lines = tuple(body.encode().split(b"\n"))
    if op == "update":
        rows, olds = lines[0::2], lines[1::2]
    else:
        rows, olds = lines, None
    if len(rows) != nrows or (olds is not None and len(olds) != nrows):
        raise DecodeError(f"change {change_id}: expected {nrows} rows, found {len(lines)} lines")
    return Change(int(change_id), collection, op, timestamp, rows, olds)


def row_values(raw: bytes) -> dict[str, Any]:
    """Parse one row for filtering. Numbers beyond a double's range fall back to the exact parser."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = json.loads(raw)
    if not isinstance(value, dict):
        raise DecodeError(f"row is not a JSON object: {raw[:200]!r}")
    return value

"""Change events: entries of the change log (``sql/``) decoded into typed values, and their positions.

A change-log entry holds the rows one statement changed (a chunk of at most 1000), one JSON object per
line, exactly as PostgreSQL's ``to_jsonb`` rendered them. Rows stay raw bytes from here to the socket,
so values such as 30-digit numerics reach clients unaltered; they are parsed only when a filter needs
them (:func:`row_values`).

Every row of every change has a :data:`Position`, ``(tick, change id, row)``: the same on every bridge
process, in commit order (see ``sql/002_ticks.sql``). Clients see it as the event id
``"<tick>.<change id>.<row>"`` (:func:`event_id`), so ids compared as tuples of integers are in
delivery order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from pgbridge.errors import DecodeError

Op = Literal["create", "update", "delete"]
OPS: tuple[Op, ...] = ("create", "update", "delete")
Kind = Literal["create", "update", "delete", "truncate"]

Position = tuple[int, int, int]
"""``(tick, change id, row)``; tuples compare in delivery order."""

MAX_ID = 2**63 - 1
CHUNK_ROWS = 1000
"""The most rows one change-log entry holds (``pgb_max_rows`` in ``capture_v3``): a row index is below it."""
CHUNK_BYTES = 1 << 20
"""About the most bytes of rows one entry holds (``pgb_max_bytes``; one row may exceed it alone)."""
_EVENT_ID = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})\.([0-9]{1,4})")
_LEGACY_ID = re.compile(r"([0-9]{1,19})\.([0-9]{1,4})")


@dataclass(frozen=True, slots=True)
class LegacyId:
    """An event id as bridges handed them out before ids were positions: ``"<change id>.<row>"``."""

    change_id: int
    row: int


def event_id(position: Position) -> str:
    """The id clients see for ``position``: ``"<tick>.<change id>.<row>"``.

    The position after all of tick ``n``, ``(n, MAX_ID, 0)``, is written ``"<n+1>.0.0"``: no change has id
    0, so it comes before every change of tick ``n+1``, and it parses back to the same position.
    """
    tick, change_id, row = position
    if change_id >= MAX_ID:
        return f"{tick + 1}.0.0"
    return f"{tick}.{change_id}.{row}"


def parse_event_id(value: object) -> Position | LegacyId:
    """The position an event id names (or a :class:`LegacyId`); raise ValueError when malformed."""
    if not isinstance(value, str):
        raise ValueError(value)
    if m := _EVENT_ID.fullmatch(value):
        tick, change_id, row = (int(g) for g in m.groups())
        if tick > MAX_ID or change_id > MAX_ID or row >= CHUNK_ROWS or (change_id == 0 and row != 0):
            raise ValueError(value)
        return (tick - 1, MAX_ID, 0) if change_id == 0 else (tick, change_id, row)
    if m := _LEGACY_ID.fullmatch(value):
        change_id, row = int(m.group(1)), int(m.group(2))
        if change_id > MAX_ID or row >= CHUNK_ROWS:
            raise ValueError(value)
        return LegacyId(change_id, row)
    raise ValueError(value)


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry: some rows changed by one statement, or a table truncated."""

    tick: int
    change_id: int
    collection: str
    kind: Kind
    timestamp: str
    rows: tuple[bytes, ...]
    """The new rows (create, update) or the deleted rows (delete), as JSON; empty for a truncate."""
    olds: tuple[bytes, ...] | None
    """For an update, the row before the change, pairwise with :attr:`rows`."""

    @property
    def units(self) -> int:
        """How many positions the change spans: one per row, and one for a truncate."""
        return len(self.rows) or 1

    def position(self, row: int) -> Position:
        return (self.tick, self.change_id, row)

    def event_id(self, row: int) -> str:
        """The id of row ``row`` of this change, as clients see it and send back in ``since``."""
        return event_id((self.tick, self.change_id, row))


def make_change(tick: int, change_id: int, collection: str, kind: str, timestamp: str, nrows: int, body: str) -> Change:
    """Build a :class:`Change` from the columns of a ``pgbridge.changes`` row."""
    if kind == "truncate":
        return Change(tick, change_id, collection, "truncate", timestamp, (), None)
    if kind not in OPS:
        raise DecodeError(f"change {change_id}: unknown operation {kind!r}")
    lines = tuple(body.encode().split(b"\n"))
    if kind == "update":
        rows, olds = lines[0::2], lines[1::2]
    else:
        rows, olds = lines, None
    if len(rows) != nrows or (olds is not None and len(olds) != nrows):
        raise DecodeError(f"change {change_id}: expected {nrows} rows, found {len(lines)} lines")
    return Change(tick, change_id, collection, kind, timestamp, rows, olds)


def row_values(raw: bytes) -> dict[str, Any]:
    """Parse one row for filtering. Numbers beyond a double's range fall back to the exact parser."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = json.loads(raw)
    if not isinstance(value, dict):
        raise DecodeError(f"row is not a JSON object: {raw[:200]!r}")
    return value

"""Routing: which subscriptions receive which rows of a change. No I/O.

Subscriptions of one collection that share a filter and a tenant form a group; a row is checked
once per group, and each distinct message is encoded once per row, then the same bytes go to every
subscriber that wants that operation.

With tenant isolation, a subscription only sees rows whose tenant column equals its token's tenant.
An update that moves a row between tenants reaches the old tenant as a ``delete`` of the old row and
the new tenant as a ``create`` of the new row: neither sees the other's version of the row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pgbridge import protocol
from pgbridge.events import Change, Op, row_values
from pgbridge.filters import RowFilter, compile_filter


class Sink(Protocol):
    """Where a subscription's messages go: a client connection's outbound queue."""

    closing: bool
    """True once the sink is being closed; nothing more will be sent."""

    def send(self, data: bytes) -> None:
        """Queue ``data`` without waiting; a sink that is full closes itself as a slow consumer."""

    def overflow(self) -> None:
        """Close the sink as a slow consumer."""


class Subscription:
    """One connection's interest in one collection."""

    __slots__ = ("_held", "_held_bytes", "_hold_limit", "collection", "filter", "operations", "sink", "tenant")

    def __init__(
        self,
        sink: Sink,
        collection: str,
        operations: frozenset[Op],
        filter: RowFilter,
        tenant: RowFilter | None = None,
    ) -> None:
        self.sink = sink
        self.collection = collection
        self.operations = operations
        self.filter = filter
        self.tenant = tenant
        self._held: list[tuple[int, bytes]] | None = None
        self._held_bytes = 0
        self._hold_limit = 0

    def deliver(self, change_id: int, data: bytes) -> None:
        if self._held is None:
            self.sink.send(data)
            return
        self._held.append((change_id, data))
        self._held_bytes += len(data)
        if self._held_bytes > self._hold_limit:
            self._held.clear()
            self.sink.overflow()

    def hold(self, limit: int) -> None:
        """Keep live messages back (up to ``limit`` bytes) while a replay for this subscription runs."""
        self._held, self._held_bytes, self._hold_limit = [], 0, limit

    def release(self, replayed: Callable[[int], bool]) -> None:
        """Send the held messages, except those of changes the replay already sent."""
        held, self._held = self._held or [], None
        for change_id, data in held:
            if not replayed(change_id):
                self.sink.send(data)


class _Group:
    __slots__ = ("filter", "members", "tenant")

    def __init__(self, filter: RowFilter, tenant: RowFilter | None) -> None:
        self.filter = filter
        self.tenant = tenant
        self.members: dict[Subscription, None] = {}


def tenant_filter(column: str, tenant: Any) -> RowFilter:
    """The condition tenant isolation adds: ``column`` equals the token's tenant."""
    return compile_filter({column: {"eq": tenant}})


class Router:
    """Subscriptions by collection, and the fan-out of changes to them."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[tuple[bytes, bytes], _Group]] = {}
        self._by_sink: dict[Sink, dict[str, Subscription]] = {}

    def subscriptions(self, sink: Sink) -> dict[str, Subscription]:
        return self._by_sink.get(sink, {})

    def add(self, sub: Subscription) -> None:
        """Register ``sub``, replacing the sink's earlier subscription to the same collection."""
        self.remove(sub.sink, sub.collection)
        key = (sub.filter.key, sub.tenant.key if sub.tenant else b"")
        groups = self._groups.setdefault(sub.collection, {})
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(sub.filter, sub.tenant)
        group.members[sub] = None
        self._by_sink.setdefault(sub.sink, {})[sub.collection] = sub

    def remove(self, sink: Sink, collection: str) -> bool:
        subs = self._by_sink.get(sink)
        sub = subs.pop(collection, None) if subs else None
        if sub is None:
            return False
        if not subs:
            del self._by_sink[sink]
        groups = self._groups[collection]
        key = (sub.filter.key, sub.tenant.key if sub.tenant else b"")
        members = groups[key].members
        del members[sub]
        if not members:
            del groups[key]
            if not groups:
                del self._groups[collection]
        return True

    def drop(self, sink: Sink) -> None:
        """Forget every subscription of ``sink``."""
        for collection in list(self._by_sink.get(sink, ())):
            self.remove(sink, collection)

    def route(self, change: Change) -> None:
        """Deliver every row of ``change`` to the subscriptions it matches."""
        groups = self._groups.get(change.collection)
        if groups:
            _fan_out(change, list(groups.values()))


def direct(sub: Subscription) -> Callable[[Change, int], None]:
    """Deliver changes, from row ``start`` on, to ``sub``'s sink alone, past any hold: how a replay sends."""
    group = _Group(sub.filter, sub.tenant)
    group.members[Subscription(sub.sink, sub.collection, sub.operations, sub.filter, sub.tenant)] = None
    return lambda change, start: _fan_out(change, [group], start)


def _fan_out(change: Change, groups: list[_Group], start: int = 0) -> None:
    parse = any(g.filter.conditions or g.tenant is not None for g in groups)
    for index in range(start, len(change.rows)):
        raw = change.rows[index]
        old = change.olds[index] if change.olds is not None else None
        row = _Row(change, index, raw, old, parse)
        for g in groups:
            verdict = row.verdict(g.filter, g.tenant)
            if verdict is None:
                continue
            data: bytes | None = None
            for sub in g.members:
                if verdict in sub.operations:
                    if data is None:
                        data = row.encode(verdict)
                    sub.deliver(change.change_id, data)


class _Row:
    """One changed row while it is routed: parsed at most once, each message encoded at most once."""

    __slots__ = ("_encoded", "change", "index", "new_values", "old", "old_values", "raw")

    def __init__(self, change: Change, index: int, raw: bytes, old: bytes | None, parse: bool) -> None:
        self.change, self.index, self.raw, self.old = change, index, raw, old
        self.new_values = row_values(raw) if parse else None
        self.old_values = row_values(old) if parse and old is not None else None
        self._encoded: dict[Op, bytes] = {}

    def verdict(self, filter: RowFilter, tenant: RowFilter | None) -> Op | None:
        """The operation this row is delivered as to a group, or None when the group must not see it."""
        op = self.change.op
        if self.new_values is None:
            return op
        new, old = self.new_values, self.old_values
        if op == "update" and old is not None:
            if tenant is not None:
                in_new, in_old = tenant.matches(new), tenant.matches(old)
                if not in_new and not in_old:
                    return None
                if not in_new:
                    return "delete" if filter.matches(old) else None
                if not in_old:
                    return "create" if filter.matches(new) else None
            return op if filter.matches(new) or filter.matches(old) else None
        if tenant is not None and not tenant.matches(new):
            return None
        return op if filter.matches(new) else None

    def encode(self, op: Op) -> bytes:
        data = self._encoded.get(op)
        if data is None:
            change = self.change
            if op == "update":
                body, old = self.raw, self.old
            elif op == "create":
                body, old = self.raw, None
            else:  # a delete, or an update that moved the row out of a tenant: the row as it was
                body = self.old if self.old is not None else self.raw
                old = body
            data = self._encoded[op] = protocol.data_event(
                change.collection, op, change.timestamp, change.event_id(self.index), body, old
            )
        return data

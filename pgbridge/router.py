"""Routing: which subscriptions receive which rows of a change. No I/O.

Subscriptions of one collection that share a tenant, a filter and operations form a group. A row is
checked once per group, and each distinct message is built once per row (a
:class:`~pgbridge.protocol.Message`, which each transport encodes once); the same message then goes to
every subscriber of every group that wants it. Groups are found
through an index, so a row costs what its matches cost, not what the number of subscriptions costs:
by tenant, then by the value of a filter's equality (or ``in``), then by a filter's numeric bound;
only groups with no such condition are checked for every row.

With tenant isolation, a subscription only sees rows whose tenant column equals its token's tenant,
by exact JSON equality (``42`` is not ``"42"``, and two spellings of one instant are two tenants). An
update that moves a row between tenants reaches the old tenant as a ``delete`` of the old row and the
new tenant as a ``create`` of the new row: neither sees the other's version of the row.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from pgbridge import protocol
from pgbridge.events import Change, Kind, Op, row_values
from pgbridge.filters import Bound, Equality, RowFilter, value_key

_MISSING = object()
_counter = itertools.count()


class Sink(Protocol):
    """Where a subscription's messages go: a client's session."""

    closing: bool
    """True once the sink is being closed; nothing more will be sent."""

    def offer(self, message: protocol.Message) -> bool:
        """Queue ``message`` if there is room for it; False when the client is too far behind."""


def tenant_key(value: Any) -> Hashable:
    """The tenant a row or token value names, by exact JSON equality; None for no tenant at all."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    return ("s", value)


class Subscription:
    """One connection's interest in one collection."""

    __slots__ = ("collection", "filter", "live", "operations", "payer", "sink", "tenant")

    def __init__(
        self,
        sink: Sink,
        collection: str,
        operations: frozenset[Op],
        filter: RowFilter,
        tenant: Hashable = None,
        payer: Hashable = None,
    ) -> None:
        self.sink = sink
        self.collection = collection
        self.operations = operations
        self.filter = filter
        self.tenant = tenant
        """The token's :func:`tenant_key` under tenant isolation, else None."""
        self.payer = payer
        """Whose routing budget it draws on (the token's subject)."""
        self.live = False
        """Whether the router delivers to it; False while it catches up from the change log."""


class _Group:
    __slots__ = ("filter", "members", "operations", "seq", "tenant")

    def __init__(self, filter: RowFilter, tenant: Hashable, operations: frozenset[Op]) -> None:
        self.filter = filter
        self.tenant = tenant
        self.operations = operations
        self.members: dict[Subscription, None] = {}
        self.seq = next(_counter)  # orders groups with equal bounds


class _Bucket:
    """The groups of one collection and one tenant, indexed by their filters."""

    __slots__ = ("equal", "groups", "lower", "scan", "upper")

    def __init__(self) -> None:
        self.groups: dict[tuple[bytes, frozenset[Op]], _Group] = {}
        self.equal: dict[str, dict[Hashable, dict[_Group, None]]] = {}
        self.lower: dict[str, list[tuple[float, int, _Group]]] = {}  # gt/gte, by bound
        self.upper: dict[str, list[tuple[float, int, _Group]]] = {}  # lt/lte, by bound
        self.scan: dict[_Group, None] = {}

    def index(self, group: _Group) -> None:
        i = group.filter.index
        if isinstance(i, Equality):
            by_value = self.equal.setdefault(i.column, {})
            for key in i.keys:
                by_value.setdefault(key, {})[group] = None
        elif isinstance(i, Bound):
            bisect.insort((self.lower if i.lower else self.upper).setdefault(i.column, []), (i.value, group.seq, group))
        else:
            self.scan[group] = None

    def unindex(self, group: _Group) -> None:
        i = group.filter.index
        if isinstance(i, Equality):
            by_value = self.equal[i.column]
            for key in i.keys:
                del by_value[key][group]
                if not by_value[key]:
                    del by_value[key]
            if not by_value:
                del self.equal[i.column]
        elif isinstance(i, Bound):
            side = self.lower if i.lower else self.upper
            side[i.column].remove((i.value, group.seq, group))
            if not side[i.column]:
                del side[i.column]
        else:
            del self.scan[group]

    def candidates(self, rows: Iterable[dict[str, Any]]) -> Iterable[_Group]:
        """The groups whose filter can hold for one of ``rows`` (the new row, and an update's old row)."""
        if not self.equal and not self.lower and not self.upper:
            return self.scan
        found: dict[_Group, None] = dict(self.scan)
        for row in rows:
            for column, by_value in self.equal.items():
                value = row.get(column, _MISSING)
                if value is not _MISSING and (hit := by_value.get(value_key(value))):
                    found.update(hit)
            for column, bounds in self.lower.items():
                value = row.get(column)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # every bound at or below the value; an exclusive one at the value is checked anyway
                    found.update((g, None) for _, _, g in bounds[: bisect.bisect_right(bounds, (value, _INF))])
            for column, bounds in self.upper.items():
                value = row.get(column)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.update((g, None) for _, _, g in bounds[bisect.bisect_left(bounds, (value, -1)) :])
        return found


_INF = float("inf")


class Router:
    """Live subscriptions by collection, and the fan-out of changes to them.

    ``on_behind(sub, change, row)`` is called for a subscription whose sink had no room for row
    ``row`` of ``change``: the router has stopped delivering to it, and it must be fed from the change
    log starting with that row.

    Routing work is bounded per change (one change-log entry, up to 1000 rows): ``budget`` is how many
    filter conditions may be evaluated for it. Deliveries do not count (a row costs what its matches
    cost, and a broadcast must stay one), only evaluations, which filters whose indexed condition is
    broad (``{"id": {"lt": 1e15}, ...}``) can make every row pay for every subscription. Each row is priced
    before it is evaluated (its candidates' conditions, times the rows left in the change). Past the budget,
    the subject (``payer``) whose live filters on the collection cost most stops being routed live for
    this collection: its subscriptions go through ``on_behind`` and are fed from the change log, at
    their own pace, beside everyone else's live delivery. Then the next costliest, while still over.
    """

    def __init__(
        self,
        tenant_column: str | None = None,
        on_behind: Callable[[Subscription, Change, int], None] | None = None,
        budget: int = 50_000,
    ) -> None:
        self.tenant_column = tenant_column
        self._on_behind = on_behind
        self.budget = budget
        self.deferred = 0
        """Subscriptions taken off live routing because their subject went over the budget."""
        self.evaluated = 0
        """Filter conditions evaluated for live routing, all changes together (what the budget limits)."""
        self._spent = 0  # conditions evaluated for the change being routed
        self._spending: Change | None = None
        self._held: set[Hashable] = set()  # subjects deferred until the change being routed is done
        self._collections: dict[str, dict[Hashable, _Bucket]] = {}
        self._filtered: dict[str, int] = {}  # groups per collection that need the row parsed
        self._by_sink: dict[Sink, dict[str, Subscription]] = {}

    def subscriptions(self, sink: Sink) -> dict[str, Subscription]:
        return self._by_sink.get(sink, {})

    def groups(self) -> int:
        """How many groups routing checks (none is ever kept empty)."""
        return sum(len(bucket.groups) for buckets in self._collections.values() for bucket in buckets.values())

    def add(self, sub: Subscription, *, live: bool = True) -> None:
        """Register ``sub``, replacing the sink's earlier subscription to the same collection."""
        self.remove(sub.sink, sub.collection)
        self._by_sink.setdefault(sub.sink, {})[sub.collection] = sub
        if live:
            self.attach(sub)

    def remove(self, sink: Sink, collection: str) -> Subscription | None:
        subs = self._by_sink.get(sink)
        sub = subs.pop(collection, None) if subs else None
        if sub is None:
            return None
        if not subs:
            del self._by_sink[sink]
        self.detach(sub)
        return sub

    def drop(self, sink: Sink) -> None:
        """Forget every subscription of ``sink``."""
        for collection in list(self._by_sink.get(sink, ())):
            self.remove(sink, collection)

    def attach(self, sub: Subscription) -> None:
        """Deliver live to ``sub`` from the next row routed on."""
        if sub.live:
            return
        sub.live = True
        buckets = self._collections.setdefault(sub.collection, {})
        bucket = buckets.get(sub.tenant)
        if bucket is None:
            bucket = buckets[sub.tenant] = _Bucket()
        key = (sub.filter.key, sub.operations)
        group = bucket.groups.get(key)
        if group is None:
            group = bucket.groups[key] = _Group(sub.filter, sub.tenant, sub.operations)
            bucket.index(group)
            if sub.filter.conditions:
                self._filtered[sub.collection] = self._filtered.get(sub.collection, 0) + 1
        group.members[sub] = None

    def detach(self, sub: Subscription) -> None:
        """Stop delivering live to ``sub``."""
        if not sub.live:
            return
        sub.live = False
        buckets = self._collections[sub.collection]
        bucket = buckets[sub.tenant]
        key = (sub.filter.key, sub.operations)
        group = bucket.groups[key]
        del group.members[sub]
        if group.members:
            return
        del bucket.groups[key]
        bucket.unindex(group)
        if sub.filter.conditions:
            self._filtered[sub.collection] -= 1
        if not bucket.groups:
            del buckets[sub.tenant]
            if not buckets:
                del self._collections[sub.collection]
                self._filtered.pop(sub.collection, None)

    def route(self, change: Change, index: int) -> None:
        """Deliver row ``index`` of ``change`` (or the truncate ``change``) to the live subscriptions."""
        buckets = self._collections.get(change.collection)
        if not buckets:
            return
        behind: list[Subscription] = []
        if change.kind == "truncate":
            message = protocol.resync_required(change.collection, change.event_id(0))
            for bucket in buckets.values():
                for group in bucket.groups.values():
                    _offer(group, message, behind)
        else:
            if change is not self._spending:
                self._spending, self._spent, self._held = change, 0, set()
            row = _Row(change, index, self.tenant_column, parse=self.tenant_column is not None
                       or self._filtered.get(change.collection, 0) > 0)  # fmt: skip
            candidates = self._candidates(buckets, row)
            spent = sum(len(group.filter.conditions) for group in candidates)
            # Priced before it is paid: this row's work for each row left, the budget's share of this change.
            if spent and self._spent + spent * (change.units - index) > self.budget:
                self._defer(change, index, self._spent + spent * (change.units - index))
                buckets = self._collections.get(change.collection)
                candidates = self._candidates(buckets, row) if buckets else []
                spent = sum(len(group.filter.conditions) for group in candidates)
            for group in candidates:
                kind = row.verdict(group.filter, group.tenant)
                if kind is not None and kind in group.operations:
                    _offer(group, row.message(kind), behind)
            self._spent += spent
            self.evaluated += spent
            if index + 1 == change.units:
                self._held = set()
        for sub in behind:
            self.detach(sub)
            if self._on_behind is not None:
                self._on_behind(sub, change, index)

    def _candidates(self, buckets: dict[Hashable, _Bucket], row: _Row) -> list[_Group]:
        """The groups that may want ``row``: its tenants' groups, through the index when the row is parsed."""
        found: list[_Group] = []
        for tenant in row.tenants():
            bucket = buckets.get(tenant)
            if bucket is not None:
                found += bucket.candidates(row.values()) if row.parsed else bucket.groups.values()
        return found

    def holds(self, sub: Subscription) -> bool:
        """Whether ``sub``'s subject was deferred for the change being routed: it may not rejoin live
        before that change is through, or it would be deferred again row after row."""
        return sub.payer in self._held

    def _defer(self, change: Change, row: int, projected: int) -> None:
        """Take the subjects whose live filters on ``change``'s collection cost most off live routing for it,
        costliest first, until the rest of the change fits the budget: from row ``row`` on, their
        subscriptions are fed from the change log (``on_behind``).

        A group's evaluation is shared by its subjects: each is charged its part, and the work goes only
        once every one of them is deferred.
        """
        groups = [g for b in self._collections[change.collection].values() for g in b.groups.values()]
        payers = {g: {sub.payer for sub in g.members} for g in groups}
        share: dict[Hashable, float] = {}
        for group in groups:
            for payer in payers[group]:
                share[payer] = share.get(payer, 0.0) + len(group.filter.conditions) / len(payers[group])
        per_row = sum(len(g.filter.conditions) for g in groups)
        spent = projected - self._spent  # what the rest of the change would cost as routed now
        chosen: set[Hashable] = set()
        for payer in sorted(share, key=share.__getitem__, reverse=True):
            if self._spent + spent <= self.budget or not share[payer]:
                break
            chosen.add(payer)
            left = sum(len(g.filter.conditions) for g in groups if payers[g] - chosen)
            spent = spent * left // per_row if per_row else 0
            per_row = left
        self._held |= chosen
        for group in groups:
            for sub in [s for s in group.members if s.payer in chosen]:
                self.detach(sub)
                self.deferred += 1
                if self._on_behind is not None:
                    self._on_behind(sub, change, row)

    def message_for(self, sub: Subscription, change: Change, index: int) -> protocol.Message | None:
        """The message ``sub`` gets for row ``index`` of ``change``, if any: how a catch-up sends."""
        if change.kind == "truncate":
            return protocol.resync_required(change.collection, change.event_id(0))
        row = _Row(
            change, index, self.tenant_column, parse=self.tenant_column is not None or bool(sub.filter.conditions)
        )
        kind = row.verdict(sub.filter, sub.tenant)
        return row.message(kind) if kind is not None and kind in sub.operations else None

    def snapshot_message(self, sub: Subscription, raw: bytes) -> protocol.Message | None:
        """The message ``sub`` gets for a row of its table's snapshot, if any: what it would get for the
        row's insert, tenant and filter included."""
        if self.tenant_column is None and not sub.filter.conditions:
            return protocol.snapshot_row(sub.collection, raw)
        values = row_values(raw)
        if self.tenant_column is not None and (
            sub.tenant is None or tenant_key(values.get(self.tenant_column)) != sub.tenant
        ):
            return None
        return protocol.snapshot_row(sub.collection, raw) if sub.filter.matches(values) else None


def _offer(group: _Group, message: protocol.Message, behind: list[Subscription]) -> None:
    for sub in group.members:
        if not sub.sink.offer(message):
            behind.append(sub)


class _Row:
    """One changed row while it is routed: parsed at most once, each message encoded at most once."""

    __slots__ = ("_messages", "change", "index", "new", "old", "old_raw", "parsed", "raw", "tenant_column")

    def __init__(self, change: Change, index: int, tenant_column: str | None, *, parse: bool) -> None:
        self.change, self.index, self.tenant_column, self.parsed = change, index, tenant_column, parse
        self.raw = change.rows[index]
        self.old_raw = change.olds[index] if change.olds is not None else None
        self.new: dict[str, Any] = row_values(self.raw) if parse else {}
        self.old: dict[str, Any] | None = row_values(self.old_raw) if parse and self.old_raw is not None else None
        self._messages: dict[Kind, protocol.Message] = {}

    def values(self) -> tuple[dict[str, Any], ...]:
        return (self.new,) if self.old is None else (self.new, self.old)

    def tenants(self) -> Iterable[Hashable]:
        """The tenant buckets this row concerns: its tenant, and the old row's if an update moved it."""
        if self.tenant_column is None:
            return (None,)
        new = tenant_key(self.new.get(self.tenant_column))
        if self.old is None:
            return (new,)
        old = tenant_key(self.old.get(self.tenant_column))
        return (new,) if old == new else (new, old)

    def verdict(self, filter: RowFilter, tenant: Hashable) -> Op | None:
        """The operation this row is delivered as to a group, or None when the group must not see it."""
        op: Op = self.change.kind  # type: ignore[assignment]  # never a truncate here
        if not self.parsed:
            return op
        new, old, column = self.new, self.old, self.tenant_column
        if column is not None:
            in_new = tenant is not None and tenant_key(new.get(column)) == tenant
            in_old = old is not None and tenant is not None and tenant_key(old.get(column)) == tenant
            if op == "update" and old is not None:
                if not in_new and not in_old:
                    return None
                if not in_new:
                    return "delete" if filter.matches(old) else None
                if not in_old:
                    return "create" if filter.matches(new) else None
            elif not in_new:
                return None
        if op == "update" and old is not None:
            return op if filter.matches(new) or filter.matches(old) else None
        return op if filter.matches(new) else None

    def message(self, op: Op) -> protocol.Message:
        message = self._messages.get(op)
        if message is None:
            change = self.change
            if op == "update":
                body, old = self.raw, self.old_raw
            elif op == "create":
                body, old = self.raw, None
            else:  # a delete, or an update that moved the row out of a tenant: the row as it was
                body = self.old_raw if self.old_raw is not None else self.raw
                old = body
            message = self._messages[op] = protocol.data_event(
                change.collection, op, change.timestamp, change.event_id(self.index), body, old
            )
        return message

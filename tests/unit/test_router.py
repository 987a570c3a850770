"""The pure routing core, without a database: shared evaluation, the filter index, tenants, falling behind."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pgbridge.auth import ALL_OPS
from pgbridge.events import Change
from pgbridge.filters import MATCH_ALL, RowFilter, compile_filter
from pgbridge.protocol import Message
from pgbridge.router import Router, Subscription, tenant_key

ALL = ALL_OPS


class Sink:
    closing = False

    def __init__(self, room: int = 10**9) -> None:
        self.received: list[Message] = []
        self.room = room

    def offer(self, message: Message) -> bool:
        if len(self.received) >= self.room:
            return False
        self.received.append(message)
        return True

    def messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(m.json) for m in self.received]


def counting(flt: RowFilter, calls: list[int]) -> RowFilter:
    predicate = flt.conditions[0][1]

    def count(value: object) -> bool:
        calls.append(1)
        return predicate(value)

    return RowFilter(flt.key, ((flt.conditions[0][0], count),), flt.index, flt.cost)


def change(rows: list[dict[str, Any]], kind: str = "create", olds: list[dict[str, Any]] | None = None) -> Change:
    return Change(
        1,
        7,
        "posts",
        kind,  # type: ignore[arg-type]
        "2026-01-01T00:00:00.000Z",
        tuple(orjson.dumps(r) for r in rows),
        None if olds is None else tuple(orjson.dumps(r) for r in olds),
    )


def route_all(router: Router, c: Change) -> None:
    for row in range(c.units):
        router.route(c, row)


def test_subscribers_sharing_a_filter_share_one_evaluation_and_one_encoding() -> None:
    calls: list[int] = []
    shared = counting(compile_filter({"status": {"neq": "done"}}), calls)
    router = Router()
    sinks = [Sink() for _ in range(500)]
    for sink in sinks:
        router.add(Subscription(sink, "posts", frozenset({"create"}), shared))
    route_all(router, change([{"id": i, "status": "draft" if i % 2 else "done"} for i in range(10)]))
    assert len(calls) == 10  # one per row, not one per row and subscriber
    assert all(len(s.received) == 5 for s in sinks)
    assert all(a is b for a, b in zip(sinks[0].received, sinks[-1].received, strict=True))  # the same messages
    assert sinks[0].messages()[0]["id"] == "1.7.1"  # tick 1, change 7, row 1 (row 0 is done)
    encodings: list[Message] = []

    def codec(message: Message) -> bytes:
        encodings.append(message)
        return b"frame:" + message.json

    assert {s.received[0].encoded(codec) for s in sinks} == {b"frame:" + sinks[0].received[0].json}
    assert len(encodings) == 1  # encoded once per transport kind, however many sessions it goes to


def test_equality_filters_are_looked_up_not_evaluated_one_by_one() -> None:
    calls: list[int] = []
    router = Router()
    sinks = {}
    for author in range(2000):
        sinks[author] = Sink()
        flt = counting(compile_filter({"author_id": author}), calls)
        router.add(Subscription(sinks[author], "posts", ALL, flt))
    route_all(router, change([{"id": 1, "author_id": 42}, {"id": 2, "author_id": 7}, {"id": 3, "author_id": None}]))
    assert len(calls) == 2  # only the two groups whose value matches were evaluated
    assert [m["data"]["id"] for m in sinks[42].messages()] == [1]
    assert [m["data"]["id"] for m in sinks[7].messages()] == [2]
    assert sum(len(s.received) for s in sinks.values()) == 2


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"score": {"gte": 10}}, 10, True),
        ({"score": {"gt": 10}}, 10, False),
        ({"score": {"gt": 10}}, 10.5, True),
        ({"score": {"lt": 10}}, 9, True),
        ({"score": {"lte": 10}}, 10, True),
        ({"score": {"lt": 10}}, 10, False),
        ({"score": {"gte": 10, "lt": 20}}, 20, False),
        ({"score": {"gte": 10}}, "11", False),
        ({"score": {"gte": 10}}, True, False),
        ({"score": {"in": [1, 2.5, "3"]}}, 2.5, True),
        ({"score": {"in": [1, 2.5, "3"]}}, 3, False),
        ({"score": 1}, 1.0, True),
        ({"score": 1}, True, False),
        ({"at": "2026-01-01T00:00:00Z"}, "2026-01-01T01:00:00+01:00", True),
        ({"at": "2026-01-01T00:00:00"}, "2026-01-01T00:00:00Z", False),
        ({"score": None}, None, True),
        ({"score": {"neq": 3}}, None, True),
    ],
)
def test_the_index_finds_exactly_what_the_filter_matches(spec: dict[str, Any], value: Any, expected: bool) -> None:
    flt = compile_filter(spec)
    assert flt.matches({"score": value, "at": value}) is expected  # the filter's own verdict...
    router = Router()
    sink = Sink()
    router.add(Subscription(sink, "posts", ALL, flt))
    router.add(Subscription(Sink(), "posts", ALL, compile_filter({"other": 1})))  # an index with other entries
    route_all(router, change([{"score": value, "at": value}]))
    assert bool(sink.received) is expected  # ...is what routing through the index delivers


def test_an_update_is_found_by_its_old_row_too() -> None:
    router = Router()
    sink = Sink()
    router.add(Subscription(sink, "posts", ALL, compile_filter({"status": "draft", "score": {"gte": 5}})))
    route_all(router, change([{"status": "published", "score": 1}], "update", [{"status": "draft", "score": 9}]))
    [event] = sink.messages()
    assert event["type"] == "posts.update" and event["old"]["status"] == "draft"


def test_tenants_are_exact_json_values() -> None:
    router = Router(tenant_column="account")
    tenants: list[Any] = ["2024-01-01T00:00:00Z", 42, "42", True, 1]  # a list: True and 1 are one dict key
    sinks = [Sink() for _ in tenants]
    for tenant, sink in zip(tenants, sinks, strict=True):
        router.add(Subscription(sink, "posts", ALL, compile_filter(None), tenant_key(tenant)))
    rows: list[dict[str, Any]] = [
        {"account": "2024-01-01T01:00:00+01:00"},
        {"account": "42"},
        {"account": 42.0},
        {"account": True},
    ]
    route_all(router, change(rows))
    got = [[m["data"]["account"] for m in s.messages()] for s in sinks]
    assert got == [[], [42.0], ["42"], [True], []]


def test_a_subscriber_without_room_is_detached_and_reported_at_that_row() -> None:
    behind: list[tuple[Subscription, int]] = []
    router = Router(on_behind=lambda sub, c, row: behind.append((sub, row)))
    slow, fast = Sink(room=3), Sink()
    slow_sub = Subscription(slow, "posts", ALL, compile_filter(None))
    router.add(slow_sub)
    router.add(Subscription(fast, "posts", ALL, compile_filter(None)))
    route_all(router, change([{"id": i} for i in range(10)]))
    assert behind == [(slow_sub, 3)] and not slow_sub.live
    assert len(slow.received) == 3 and len(fast.received) == 10
    router.attach(slow_sub)
    slow.room = 100
    route_all(router, change([{"id": 99}]))
    assert slow.messages()[-1]["data"] == {"id": 99}


def test_removing_subscriptions_leaves_no_empty_groups() -> None:
    router = Router(tenant_column="t")
    sink = Sink()
    router.add(Subscription(sink, "posts", ALL, compile_filter({"a": 1}), tenant_key(1)))
    router.add(Subscription(sink, "notes", ALL, compile_filter({"b": {"gt": 2}}), tenant_key(1)))
    router.add(Subscription(sink, "posts", ALL, compile_filter({"a": {"in": [1, 2]}}), tenant_key(1)))  # replaces
    assert router.groups() == 2
    router.drop(sink)
    assert router.subscriptions(sink) == {}
    assert router.groups() == 0


def test_subjects_whose_filters_cost_most_are_fed_from_the_log_when_a_change_goes_over_budget() -> None:
    """Filters whose indexed condition is broad make every row evaluate them all: the costliest subjects
    pay (they are fed from the change log, losing nothing), the others stay live, a broadcast never pays."""
    deferred: list[tuple[Subscription, int]] = []
    router = Router(on_behind=lambda sub, c, row: deferred.append((sub, row)), budget=20_000)
    broad = {"id": {"lt": 1e15}, "n": {"gt": 10**9}}  # the index takes the first bound: every row is a candidate
    attackers = {f"mallory{i}": [Sink() for _ in range(100)] for i in range(5)}
    for payer, sinks in attackers.items():
        for j, sink in enumerate(sinks):
            flt = compile_filter({**broad, "x": {"neq": j}})  # distinct: no shared evaluation
            router.add(Subscription(sink, "posts", ALL, flt, payer=payer))
    honest, watcher = Sink(), Sink()
    router.add(Subscription(honest, "posts", ALL, compile_filter({"n": {"lt": 5}}), payer="alice"))
    router.add(Subscription(watcher, "posts", ALL, compile_filter(None), payer="bob"))  # costs nothing
    route_all(router, change([{"id": i, "n": i % 10} for i in range(100)]))
    # all of them, priced before the first row was evaluated for them: routing never evaluated them at all
    assert len(deferred) == 500 and {row for _, row in deferred} == {0}
    assert not any(sink.received for sinks in attackers.values() for sink in sinks)
    assert {sub.payer for sub, _ in deferred} == set(attackers)
    assert router.deferred == 500 and router.groups() == 2
    assert [m["data"]["id"] for m in honest.messages()] == [i for i in range(100) if i % 10 < 5]
    assert len(watcher.received) == 100


def test_a_broadcast_never_goes_over_budget() -> None:
    deferred: list[Subscription] = []
    router = Router(on_behind=lambda sub, c, row: deferred.append(sub), budget=1)
    sinks = [Sink() for _ in range(500)]
    for i, sink in enumerate(sinks):
        router.add(Subscription(sink, "posts", ALL, MATCH_ALL, payer=f"user{i}"))
    route_all(router, change([{"id": i} for i in range(100)]))
    assert not deferred and all(len(s.received) == 100 for s in sinks)


def test_a_shared_filter_costs_one_evaluation_however_many_share_it() -> None:
    deferred: list[Subscription] = []
    router = Router(on_behind=lambda sub, c, row: deferred.append(sub), budget=100 * 2)
    shared = compile_filter({"id": {"gte": 0}, "n": {"lt": 100}})
    for i in range(300):
        router.add(Subscription(Sink(), "posts", ALL, shared, payer=f"user{i}"))
    route_all(router, change([{"id": i, "n": i} for i in range(100)]))
    assert not deferred  # 100 rows x one group of 2 conditions: within the budget

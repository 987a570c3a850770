"""The pure routing core: one evaluation per filter group, not per subscriber."""

from __future__ import annotations

import orjson

from pgbridge.events import Change
from pgbridge.filters import RowFilter, compile_filter
from pgbridge.router import Router, Subscription


class Sink:
    closing = False

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.received.append(data)

    def overflow(self) -> None:
        raise AssertionError("not expected")


def counting(flt: RowFilter, calls: list[int]) -> RowFilter:
    def count(value: object, predicate=flt.conditions[0][1]) -> bool:  # type: ignore[no-untyped-def]
        calls.append(1)
        return predicate(value)

    return RowFilter(flt.key, ((flt.conditions[0][0], count),))


def test_subscribers_sharing_a_filter_share_one_evaluation_and_one_encoding() -> None:
    calls: list[int] = []
    shared = counting(compile_filter({"status": "draft"}), calls)
    router = Router()
    sinks = [Sink() for _ in range(500)]
    for sink in sinks:
        router.add(Subscription(sink, "posts", frozenset({"create"}), shared))
    rows = tuple(orjson.dumps({"id": i, "status": "draft" if i % 2 else "done"}) for i in range(10))
    router.route(Change(7, "posts", "create", "2026-01-01T00:00:00.000Z", rows, None))
    assert len(calls) == 10  # one per row, not one per row and subscriber
    assert all(len(s.received) == 5 for s in sinks)
    assert all(a is b for a, b in zip(sinks[0].received, sinks[-1].received, strict=True))  # the same bytes
    assert orjson.loads(sinks[0].received[0])["id"] == "7.1"


def test_removing_subscriptions_leaves_no_empty_groups() -> None:
    router = Router()
    sink = Sink()
    router.add(Subscription(sink, "posts", frozenset({"create"}), compile_filter({"a": 1})))
    router.add(Subscription(sink, "notes", frozenset({"create"}), compile_filter(None)))
    router.drop(sink)
    assert router.subscriptions(sink) == {}
    assert router._groups == {}

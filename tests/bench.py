"""``make bench``: pgbridge's speed as ratios against baselines measured in the same run.

1. write cost: single-row INSERT transactions per second into a published table vs. the same table
   unpublished (4 concurrent writers);
2. ingest: changes per second through the bridge's listener and router vs. a bare asyncpg listener
   that only decodes each notification with orjson (the ceiling);
3. fan-out: deliveries per second to 1000 subscribers with encode-once vs. encoding per subscriber.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg
import orjson

from pgbridge import protocol
from pgbridge.events import Change
from pgbridge.filters import MATCH_ALL
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.migrate import migrate
from pgbridge.router import Router, Subscription
from tests.helpers import Cluster, wait_for

WRITE_SECONDS = 3.0
CHANGES = 20_000
SUBSCRIBERS = 1000


class CountingSink:
    closing = False

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    def send(self, data: bytes) -> None:
        self.count += 1
        self.bytes += len(data)

    def overflow(self) -> None:
        raise AssertionError("unbounded sink")


async def writes_per_second(dsn: str, table: str) -> float:
    stop = time.monotonic() + WRITE_SECONDS

    async def writer() -> int:
        conn = await asyncpg.connect(dsn)
        n = 0
        while time.monotonic() < stop:
            await conn.execute(f"INSERT INTO {table} (title) VALUES ('x')")
            n += 1
        await conn.close()
        return n

    return sum(await asyncio.gather(*(writer() for _ in range(4)))) / WRITE_SECONDS


async def burst(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DO $$ BEGIN FOR i IN 1..{CHANGES} LOOP INSERT INTO pub (title) VALUES ('x'); END LOOP; END $$")
    await conn.close()


async def bare_listener_rate(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    done = asyncio.Event()
    seen = 0

    def on(_c: object, _p: int, _ch: str, payload: str) -> None:
        nonlocal seen
        head, _, _body = payload.partition("\n")
        orjson.loads(head)
        seen += 1
        if seen == CHANGES:
            done.set()

    await conn.add_listener("pgbridge", on)
    started = time.perf_counter()  # from the write to the last delivery: what PostgreSQL can deliver
    await burst(dsn)
    await done.wait()
    elapsed = time.perf_counter() - started
    await conn.close()
    return CHANGES / elapsed


async def bridge_listener_rate(dsn: str) -> float:
    router = Router()
    sink = CountingSink()
    router.add(Subscription(sink, "pub", frozenset({"create", "update", "delete"}), MATCH_ALL))
    done = asyncio.Event()
    listener = Listener(
        ListenerSettings(dsn), lambda c: (router.route(c), sink.count >= CHANGES and done.set()), lambda _: None
    )
    task = asyncio.create_task(listener.run())
    await wait_for(lambda: listener.connected, what="listener")
    started = time.perf_counter()
    await burst(dsn)
    await done.wait()
    elapsed = time.perf_counter() - started
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return CHANGES / elapsed


def fan_out_rates() -> tuple[float, float]:
    row = orjson.dumps({"id": 1, "title": "hello world", "author_id": 42, "status": "draft"})
    change = Change(1, "posts", "create", "2026-01-01T00:00:00.000Z", (row,) * 100, None)
    router = Router()
    sinks = [CountingSink() for _ in range(SUBSCRIBERS)]
    for s in sinks:
        router.add(Subscription(s, "posts", frozenset({"create"}), MATCH_ALL))
    started = time.perf_counter()
    for _ in range(10):
        router.route(change)
    once = 10 * 100 * SUBSCRIBERS / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(10):
        for index, raw in enumerate(change.rows):
            for s in sinks:  # what encode-per-subscriber costs
                s.send(protocol.data_event("posts", "create", change.timestamp, change.event_id(index), raw, None))
    each = 10 * 100 * SUBSCRIBERS / (time.perf_counter() - started)
    return once, each


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "pg")
        try:
            dsn = cluster.dsn()
            conn = await asyncpg.connect(dsn)
            await migrate(conn)
            await conn.execute(
                """CREATE TABLE plain (id bigserial PRIMARY KEY, title text);
                   CREATE TABLE pub (id bigserial PRIMARY KEY, title text);
                   SELECT pgbridge.publish('pub');"""
            )
            await conn.close()
            plain = await writes_per_second(dsn, "plain")
            published = await writes_per_second(dsn, "pub")
            bare = await bare_listener_rate(dsn)
            bridged = await bridge_listener_rate(dsn)
            once, each = fan_out_rates()
        finally:
            cluster.cleanup()
    print(
        f"write, 1 row/tx, 4 writers:  unpublished {plain:9.0f} tx/s   published {published:9.0f} tx/s"
        f"   ratio {published / plain:.2f}"
    )
    print(
        f"ingest, {CHANGES} changes:     bare listener {bare:7.0f} /s   bridge {bridged:9.0f} /s"
        f"   ratio {bridged / bare:.2f}"
    )
    print(
        f"fan-out to {SUBSCRIBERS} sockets:  per-subscriber encode {each:7.0f} /s   encode once {once:7.0f} /s"
        f"   ratio {once / each:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())

"""``make bench``: pgbridge's speed as ratios against baselines measured in the same run.

1. write cost: INSERT transactions per second into a published table vs. the same table unpublished,
   one row per transaction (4 writers) and 100 rows per transaction (2 writers);
2. ingest: changes per second from the writer's statement to the last delivery, through the bridge's
   listener and router vs. a bare asyncpg listener (what PostgreSQL itself delivers); and the CPU
   per change in process: the bridge's decode and route vs. a bare orjson decode of the payload;
3. fan-out: deliveries per second to 1000 subscribers with encode-once vs. encoding per subscriber;
4. memory: the bridge's peak Python heap while one 200,000-row statement flows through it, vs. the
   size of those rows.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path

import asyncpg
import orjson

from pgbridge import protocol
from pgbridge.events import Change, decode_notification
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


async def writes_per_second(dsn: str, table: str, rows: int = 1, writers: int = 4) -> float:
    stop = time.monotonic() + WRITE_SECONDS
    sql = f"INSERT INTO {table} (title) SELECT 'x' FROM generate_series(1, {rows})"

    async def writer() -> int:
        conn = await asyncpg.connect(dsn)
        n = 0
        while time.monotonic() < stop:
            await conn.execute(sql)
            n += 1
        await conn.close()
        return n

    return sum(await asyncio.gather(*(writer() for _ in range(writers)))) / WRITE_SECONDS


async def burst(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DO $$ BEGIN FOR i IN 1..{CHANGES} LOOP INSERT INTO pub (title) VALUES ('x'); END LOOP; END $$")
    await conn.close()


async def bare_listener_rate(dsn: str, captured: list[str]) -> float:
    conn = await asyncpg.connect(dsn)
    done = asyncio.Event()

    def on(_c: object, _p: int, _ch: str, payload: str) -> None:
        head, _, _body = payload.partition("\n")
        orjson.loads(head)
        captured.append(payload)
        if len(captured) == CHANGES:
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


async def bulk_memory(dsn: str, rows: int = 200_000) -> tuple[float, float]:
    """Peak heap (MB) while a ``rows``-row statement is delivered, and the size of its rows (MB)."""
    router = Router()
    sink = CountingSink()
    router.add(Subscription(sink, "pub", frozenset({"create", "update", "delete"}), MATCH_ALL))
    done = asyncio.Event()

    def route(change: Change) -> None:
        router.route(change)
        if sink.count >= rows:
            done.set()

    listener = Listener(ListenerSettings(dsn), route, lambda _: None)
    task = asyncio.create_task(listener.run())
    await wait_for(lambda: listener.connected, what="listener")
    tracemalloc.start()
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"INSERT INTO pub (title) SELECT repeat('m', 200) FROM generate_series(1, {rows})")
    await done.wait()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = await conn.fetchval("SELECT sum(octet_length(body)) FROM pgbridge.changes WHERE nrows > 1")
    await conn.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return peak / 2**20, total / 2**20


def processing_rates(payloads: list[str]) -> tuple[float, float]:
    """Per-change CPU in process: a bare orjson decode of every line vs. the bridge's decode and route."""
    started = time.perf_counter()
    for payload in payloads:
        for line in payload.split("\n"):
            orjson.loads(line)
    bare = len(payloads) / (time.perf_counter() - started)
    router = Router()
    router.add(Subscription(CountingSink(), "pub", frozenset({"create"}), MATCH_ALL))
    started = time.perf_counter()
    for payload in payloads:
        change = decode_notification(payload)
        assert isinstance(change, Change)
        router.route(change)
    return bare, len(payloads) / (time.perf_counter() - started)


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
            plain_bulk = await writes_per_second(dsn, "plain", rows=100, writers=2)
            published_bulk = await writes_per_second(dsn, "pub", rows=100, writers=2)
            payloads: list[str] = []
            bare = await bare_listener_rate(dsn, payloads)
            bridged = await bridge_listener_rate(dsn)
            decode_bare, decode_bridge = processing_rates(payloads)
            once, each = fan_out_rates()
            peak, data = await bulk_memory(dsn)
        finally:
            cluster.cleanup()
    report = [
        ("write, 1 row/tx, 4 writers", "unpublished tx/s", plain, "published tx/s", published),
        ("write, 100 rows/tx, 2 writers", "unpublished tx/s", plain_bulk, "published tx/s", published_bulk),
        (f"ingest, {CHANGES} changes, write to socket", "bare listener /s", bare, "bridge /s", bridged),
        ("ingest CPU, decode and route", "orjson decode /s", decode_bare, "bridge /s", decode_bridge),
        (f"fan-out to {SUBSCRIBERS} sockets", "encode per socket /s", each, "encode once /s", once),
        ("memory, one 200,000-row statement", "rows MB", data, "peak heap MB", peak),
    ]
    for what, base_name, base, name, value in report:
        print(f"{what:36} {base_name:>20} {base:11.1f}   {name:>16} {value:11.1f}   ratio {value / base:5.2f}")


if __name__ == "__main__":
    asyncio.run(main())

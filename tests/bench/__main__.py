"""``make bench``: pgbridge's speed as ratios against baselines measured in the same run.

Every figure sits next to a baseline measured on the same machine in the same run, as a median of
interleaved repetitions; absolute numbers vary from machine to machine, ratios much less. The table is
printed and written as JSON to ``.pgbridge/bench.json``. ``PGBRIDGE_BENCH_QUICK=1`` runs a short
version (what ``make test`` runs, to keep the benchmark working).

1. writers: one-row INSERT transactions per second at 1, 4, 16 and 64 concurrent writers (pgbench):
   the table unpublished, with the row-level ``pg_notify(row_to_json(NEW))`` trigger most users would
   write (a listener draining it), published (the bridge running), and published with ``wake => false``;
2. ingest, end to end: 4 writers commit one-row transactions; changes per second from the first write
   to the last delivery, through the bridge vs. the row-level trigger and a bare asyncpg listener of its
   notifications (what PostgreSQL itself delivers). Then the listener side alone: 20,000 changes
   committed at once, per second from the commit to the last delivery; and the CPU per change in
   process: decoding and routing a change vs. a bare orjson decode of its row;
3. fan-out: deliveries per second to 1000 subscribers with encode-once vs. encoding per subscriber;
4. memory: the bridge's peak Python heap while one 200,000-row statement flows through it, vs. the
   size of those rows;
5. on real sockets, the bridge as ``pgbridge serve`` and its clients in processes of their own
   (picows, so that the client side costs little; ``tests/bench/client.py``):
   - fan-out ceiling: 500 subscribers of one collection, rows written as fast as possible, deliveries
     per second once every delivery is complete, vs. a minimal aiohttp server writing pre-encoded
     frames to the same 500 sockets (``tests/bench/baseline.py``); and with 2 workers vs. 1;
   - latency: commit to client receive at 1,000 rows/s and 100 subscribers, p50 and p99, and p99 with
     one subscriber, vs. a bare asyncpg listener's commit to callback;
   - connections: 20,000 subscribed sockets, RSS per connection, and one row broadcast to all of them
     (p99) while heartbeats go out every second;
   - filters: 10,000 subscriptions with distinct filters (equalities, ``in``, ranges) at 5,000 changes
     per second, p99 commit to receive; and routing cost per change with 10,000 distinct filters vs. 100,
     and with 10,000 tenants vs. one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from pgbridge import protocol, websocket
from pgbridge.auth import ALL_OPS
from pgbridge.events import Change, make_change
from pgbridge.filters import MATCH_ALL, compile_filter
from pgbridge.history import History
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.migrate import migrate
from pgbridge.protocol import Message
from pgbridge.router import Router, Subscription, tenant_key
from tests.helpers import BridgeProcess, Cluster, free_port, healthy, token, wait_for

QUICK = bool(os.environ.get("PGBRIDGE_BENCH_QUICK"))
ROUNDS = 1 if QUICK else 3
WRITE_SECONDS = 1 if QUICK else 3
WRITERS = (1, 4) if QUICK else (1, 4, 16, 64)
CHANGES = 2_000 if QUICK else 20_000
SUBSCRIBERS = 1000
ALL = ALL_OPS

TABLES = """
CREATE TABLE plain (id bigserial PRIMARY KEY, title text, author_id int, created_at timestamptz DEFAULT now());
CREATE TABLE posts (id bigserial PRIMARY KEY, title text, author_id int, score int,
                    created_at timestamptz DEFAULT now());
CREATE TABLE naive (LIKE plain INCLUDING ALL);
CREATE TABLE pub (LIKE plain INCLUDING ALL);
CREATE TABLE polled (LIKE plain INCLUDING ALL);
CREATE FUNCTION notify_row() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_notify('naive', row_to_json(NEW)::text); RETURN NULL; END $$;
CREATE TRIGGER notify_row AFTER INSERT ON naive FOR EACH ROW EXECUTE FUNCTION notify_row();
SELECT pgbridge.publish('pub');
SELECT pgbridge.publish('polled', wake => false);
SELECT pgbridge.publish('posts');
"""


@dataclass
class Result:
    scenario: str
    baseline: str
    baseline_value: float
    measure: str
    value: float
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")


class CountingSink:
    closing = False

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    def offer(self, message: Message) -> bool:
        self.count += 1
        self.bytes += len(message.encoded(websocket.encode))  # as a WebSocket session writes it
        return True


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


class Bridge:
    """The bridge's listener and router, in process, delivering to one counting subscriber."""

    def __init__(self, dsn: str, collection: str, poll_interval: float = 0.01) -> None:
        self.router = Router()
        self.sink = CountingSink()
        self.router.add(Subscription(self.sink, collection, ALL, MATCH_ALL))
        self.listener = Listener(
            ListenerSettings(dsn, poll_interval=poll_interval), self.router.route, lambda _: None, History(32 << 20)
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bridge:
        self.task = asyncio.create_task(self.listener.run())
        await wait_for(lambda: self.listener.connected, what="listener")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def pgbench_tps(pgbench: str, dsn: str, table: str, clients: int) -> float:
    script = Path(tempfile.gettempdir()) / f"pgbridge-bench-{table}.sql"
    script.write_text(f"INSERT INTO {table} (title, author_id) VALUES ('hello world', 42);\n")
    proc = await asyncio.create_subprocess_exec(
        pgbench, "-n", "-f", str(script), "-c", str(clients), "-j", "2", "-T", str(WRITE_SECONDS), dsn,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    found = re.search(rb"tps = ([0-9.]+)", out)
    if found is None:
        raise RuntimeError(f"pgbench failed: {err.decode()[-500:]}")
    return float(found.group(1))


async def drain(dsn: str, channel: str) -> Callable[[], Awaitable[None]]:
    """A bare listener that reads (and decodes) every notification of ``channel``, as an app would."""
    conn = await asyncpg.connect(dsn)
    await conn.add_listener(channel, lambda _c, _p, _ch, payload: orjson.loads(payload))
    close: Callable[[], Awaitable[None]] = conn.close
    return close


async def writers(cluster: Cluster, dsn: str) -> list[Result]:
    pgbench = str(Path(cluster.bin_path) / "pgbench")
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        for clients in WRITERS:
            for table in ("plain", "naive", "pub", "polled"):
                stop: Callable[[], Awaitable[None]] | None = None
                bridge: Bridge | None = None
                if table == "naive":
                    stop = await drain(dsn, "naive")
                elif table in ("pub", "polled"):
                    bridge = await Bridge(dsn, table).__aenter__()
                try:
                    tps = await pgbench_tps(pgbench, dsn, table, clients)
                finally:
                    if stop is not None:
                        await stop()
                    if bridge is not None:
                        await bridge.__aexit__()
                samples.setdefault((table, clients), []).append(tps)
    results = []
    for clients in WRITERS:
        median = {table: median_of(samples[(table, clients)]) for table in ("plain", "naive", "pub", "polled")}
        results.append(
            Result(
                f"writes, {clients} writers, published",
                "row-level NOTIFY trigger tps",
                median["naive"],
                "published tps",
                median["pub"],
                "target >= 0.9",
            )
        )
        results.append(
            Result(
                f"writes, {clients} writers, wake => false",
                "unpublished tps",
                median["plain"],
                "published tps",
                median["polled"],
                "target >= 0.7 at 64 writers" if clients == 64 else "",
            )
        )
    return results


async def burst(dsn: str, table: str) -> float:
    """Commit ``CHANGES`` one-row statements in one transaction; return when the commit returned."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        f"DO $$ BEGIN FOR i IN 1..{CHANGES} LOOP INSERT INTO {table} (title) VALUES ('x'); END LOOP; END $$"
    )
    committed = time.perf_counter()
    await conn.close()
    return committed


async def stream(dsn: str, table: str, transactions: int) -> None:
    """4 writers, each committing ``transactions`` one-row INSERTs."""

    async def writer() -> None:
        conn = await asyncpg.connect(dsn)
        for _ in range(transactions):
            await conn.execute(f"INSERT INTO {table} (title) VALUES ('x')")
        await conn.close()

    await asyncio.gather(*(writer() for _ in range(4)))


async def bare_listener(dsn: str, count: int, rows: list[bytes]) -> tuple[asyncpg.Connection, asyncio.Event]:
    """A listener of the row-level trigger's notifications that decodes each and counts them."""
    conn = await asyncpg.connect(dsn)
    done = asyncio.Event()
    seen = [0]

    def on(_c: object, _p: int, _ch: str, payload: str) -> None:
        rows.append(payload.encode())
        orjson.loads(payload)
        seen[0] += 1
        if seen[0] == count:
            done.set()

    await conn.add_listener("naive", on)
    return conn, done


async def ingest(dsn: str) -> list[Result]:
    per_writer = CHANGES // 8
    rates: dict[str, list[float]] = {}
    rows: list[bytes] = []
    for _ in range(ROUNDS):
        for how in ("stream", "burst"):
            count = 4 * per_writer if how == "stream" else CHANGES
            conn, done = await bare_listener(dsn, count, rows)
            started = time.perf_counter()
            if how == "stream":
                await stream(dsn, "naive", per_writer)
            else:
                started = await burst(dsn, "naive")
            await done.wait()
            rates.setdefault(f"bare {how}", []).append(count / (time.perf_counter() - started))
            await conn.close()

            async with Bridge(dsn, "pub") as bridge:
                base = bridge.sink.count
                started = time.perf_counter()
                if how == "stream":
                    await stream(dsn, "pub", per_writer)
                else:
                    started = await burst(dsn, "pub")
                target = base + count
                await wait_for(lambda: bridge.sink.count >= target, timeout=120, what="the changes")  # noqa: B023
                rates.setdefault(f"bridge {how}", []).append(count / (time.perf_counter() - started))

    # CPU per change, in process: the bridge's decode and route of a one-row change vs. decoding the row
    sample = rows[: min(len(rows), 20_000)]
    started = time.perf_counter()
    for raw in sample:
        orjson.loads(raw)
    bare_cpu = len(sample) / (time.perf_counter() - started)
    router = Router()
    router.add(Subscription(CountingSink(), "pub", frozenset({"create"}), MATCH_ALL))
    started = time.perf_counter()
    for n, raw in enumerate(sample):
        change = make_change(1, n, "pub", "create", "2026-01-01T00:00:00.000Z", 1, raw.decode())
        router.route(change, 0)
    bridge_cpu = len(sample) / (time.perf_counter() - started)
    return [
        Result(
            f"ingest, end to end, 4 writers, {4 * per_writer} tx",
            "trigger + bare listener /s",
            median_of(rates["bare stream"]),
            "bridge /s",
            median_of(rates["bridge stream"]),
            "target >= 0.8",
        ),
        Result(
            f"ingest, {CHANGES} changes, commit to delivery",
            "bare listener /s",
            median_of(rates["bare burst"]),
            "bridge /s",
            median_of(rates["bridge burst"]),
        ),
        Result("ingest CPU, decode and route", "orjson decode /s", bare_cpu, "bridge /s", bridge_cpu),
    ]


def fan_out() -> list[Result]:
    row = orjson.dumps({"id": 1, "title": "hello world", "author_id": 42, "status": "draft"})
    change = Change(1, 1, "posts", "create", "2026-01-01T00:00:00.000Z", (row,) * 100, None)
    router = Router()
    sinks = [CountingSink() for _ in range(SUBSCRIBERS)]
    for s in sinks:
        router.add(Subscription(s, "posts", frozenset({"create"}), MATCH_ALL))
    started = time.perf_counter()
    for _ in range(10):
        for index in range(100):
            router.route(change, index)
    once = 10 * 100 * SUBSCRIBERS / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(10):
        for index, raw in enumerate(change.rows):
            for s in sinks:  # what encoding per subscriber costs
                s.offer(protocol.data_event("posts", "create", change.timestamp, change.event_id(index), raw, None))
    each = 10 * 100 * SUBSCRIBERS / (time.perf_counter() - started)
    return [Result(f"fan-out to {SUBSCRIBERS} sinks", "encode per sink /s", each, "encode once /s", once)]


async def bulk_memory(dsn: str) -> list[Result]:
    """Peak heap (MB) while a 200,000-row statement is delivered, vs. the size of its rows (MB)."""
    rows = 20_000 if QUICK else 200_000
    async with Bridge(dsn, "pub") as bridge:
        base = bridge.sink.count
        tracemalloc.start()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"INSERT INTO pub (title) SELECT repeat('m', 200) FROM generate_series(1, {rows})")
        await wait_for(lambda: bridge.sink.count >= base + rows, timeout=300, what="the statement")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        total = await conn.fetchval("SELECT sum(octet_length(body)) FROM pgbridge.changes WHERE nrows > 1")
        await conn.close()
    return [Result(f"memory, one {rows:,}-row statement", "rows MB", total / 2**20, "peak heap MB", peak / 2**20,
                   "the bridge's history window (32 MB) is the most it keeps")]  # fmt: skip


SUBSCRIBE = '{"action": "subscribe", "collection": "posts"}'


# The processes raise their own open-file limit to the hard one; it bounds how many sockets one holds.
FILE_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class Fleet:
    """Benchmark clients (tests/bench/client.py) in processes of their own, at most 5000 connections each."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def open(
        self, url: str, count: int, subscribe: str = SUBSCRIBE, first: int = 0, sample: int = 0, connections: int = 1
    ) -> None:
        """Open ``count`` connections; record receive times of every ``sample``-th row on every
        ``connections``-th connection (0: none)."""
        started = []
        for offset in range(0, count, 5000):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.client", url, str(min(5000, count - offset)), str(first + offset),
                subscribe, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 30,
                env={**os.environ, "PGBRIDGE_SAMPLE": str(sample), "PGBRIDGE_SAMPLE_CONNECTIONS": str(connections)},
            )  # fmt: skip
            started.append(proc)
        for proc in started:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            assert line == b"ready\n", line
        self.procs += started

    async def report(self) -> tuple[list[int], dict[int, list[float]]]:
        frames: list[int] = []
        received: dict[int, list[float]] = {}
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"report\n")
        for proc in self.procs:
            assert proc.stdout is not None
            report = orjson.loads(await proc.stdout.readline())
            frames += report["frames"]
            for row, times in report["received"].items():
                received.setdefault(int(row), []).extend(times)
        return frames, received

    async def latencies(self, acked: dict[int, float]) -> list[float]:
        """Seconds from each row's commit (``acked``: when, by row id) to each timed receipt of it."""
        received = (await self.report())[1]
        return [since_commit(t, acked[row]) for row, times in received.items() if row in acked for t in times]

    async def count(self) -> int:
        """The data events received by all connections so far."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"count\n")
        total = 0
        for proc in self.procs:
            assert proc.stdout is not None
            total += int(await proc.stdout.readline())
        return total

    async def until(self, total: int, timeout: float = 120) -> float:
        """Wait until the connections have received ``total`` data events in all; return when."""
        deadline = time.monotonic() + timeout
        while (got := await self.count()) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {got} of {total} deliveries arrived")
            await asyncio.sleep(0.005)
        return time.perf_counter()

    async def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        await asyncio.gather(*(proc.wait() for proc in self.procs))
        self.procs = []


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def serve(dsn: str, **env: str) -> BridgeProcess:
    settings = {"PGBRIDGE_HEARTBEAT": "3600", "PGBRIDGE_MAX_CONNECTIONS_PER_SUBJECT": "100000",
                "PGBRIDGE_MAX_FILTER_COST_PER_SUBJECT": "1000000", "PGBRIDGE_LOG_LEVEL": "WARNING", **env}  # fmt: skip
    bridge = BridgeProcess(dsn, free_port(), settings)
    await bridge.ready()
    return bridge


def stop(bridge: BridgeProcess) -> None:
    bridge.proc.terminate()
    bridge.proc.communicate(timeout=30)


def since_commit(received: float, acked: float) -> float:
    """Seconds from a commit, known by when its writer had the reply, to a receipt of the change. A
    listener of the same database can be told before the writer is (the two replies race): that is 0,
    not a negative latency."""
    return max(0.0, received - acked)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def insert_rows(dsn: str, rows: int, per_statement: int = 10) -> None:
    conn = await asyncpg.connect(dsn)
    for _ in range(rows // per_statement):
        await conn.execute(f"INSERT INTO posts (title) SELECT 'hello world' FROM generate_series(1, {per_statement})")
    await conn.close()


async def fan_out_sockets(dsn: str) -> list[Result]:
    subscribers, rows = (50, 40) if QUICK else (500, 400)
    base: list[float] = []
    single: list[float] = []
    double: list[float] = []
    fleet = Fleet()
    for _ in range(ROUNDS):
        port = free_port()
        server = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.bench.baseline", str(port))
        try:
            await healthy(port)
            await fleet.open(f"ws://127.0.0.1:{port}/api/v1/realtime/ws", subscribers)
            async with aiohttp.ClientSession() as http:
                started = time.perf_counter()
                await http.post(f"http://127.0.0.1:{port}/blast?n={rows}")
                done = await fleet.until(rows * subscribers)
            base.append(rows * subscribers / (done - started))
        finally:
            await fleet.close()
            server.kill()
            await server.wait()
        for workers, rates in ((1, single), (2, double)):
            bridge = await serve(dsn, PGBRIDGE_WORKERS=str(workers))
            try:
                await fleet.open(bridge.url(token()), subscribers)
                started = time.perf_counter()
                await insert_rows(dsn, rows)
                rates.append(rows * subscribers / (await fleet.until(rows * subscribers) - started))
            finally:
                await fleet.close()
                stop(bridge)
    return [
        Result(f"fan-out, {subscribers} sockets, deliveries/s", "minimal aiohttp /s", median_of(base),
               "bridge /s", median_of(single), "target >= 0.7"),
        Result(f"fan-out, {subscribers} sockets, 2 workers", "1 worker /s", median_of(single),
               "2 workers /s", median_of(double)),
    ]  # fmt: skip


async def paced_writes(dsn: str, table: str, per_second: int, seconds: float) -> dict[int, float]:
    """One-row transactions at ``per_second``; the time each commit was acknowledged, by row id."""
    conn = await asyncpg.connect(dsn)
    acked: dict[int, float] = {}
    start = time.perf_counter()
    for n in range(int(per_second * seconds)):
        await asyncio.sleep(max(0.0, start + n / per_second - time.perf_counter()))
        row = await conn.fetchval(f"INSERT INTO {table} (title) VALUES ('x') RETURNING id")
        acked[row] = time.time()
    await conn.close()
    return acked


async def stamped_listener(dsn: str) -> tuple[asyncpg.Connection, dict[int, float]]:
    """A bare listener of the row-level trigger: when each row's notification arrived, by row id."""
    conn = await asyncpg.connect(dsn)
    heard: dict[int, float] = {}

    def on(_c: object, _p: int, _ch: str, payload: str) -> None:
        heard.setdefault(orjson.loads(payload)["id"], time.time())

    await conn.add_listener("naive", on)
    return conn, heard


async def latency(dsn: str) -> list[Result]:
    seconds = 0.5 if QUICK else 3.0
    subscribers = 10 if QUICK else 100
    bare: list[float] = []
    bridged: dict[int, list[float]] = {1: [], subscribers: []}
    for _ in range(ROUNDS):
        conn, heard = await stamped_listener(dsn)
        acked = await paced_writes(dsn, "naive", 1000, seconds)
        await asyncio.sleep(0.5)
        bare += [since_commit(heard[row], at) for row, at in acked.items() if row in heard]
        await conn.close()

        # One socket shows the bridge's own path (tick, read, durable wait); many add fan-out, and the
        # clients' processes competing for the same cores.
        for count, found in bridged.items():
            bridge = await serve(dsn)
            fleet = Fleet()
            try:
                await fleet.open(bridge.url(token()), count, sample=1, connections=10)
                acked = await paced_writes(dsn, "posts", 1000, seconds)
                await fleet.until(len(acked) * count)  # every delivery is counted; 1 in 10 sockets is timed
                found += await fleet.latencies(acked)
            finally:
                await fleet.close()
                stop(bridge)
    ms = 1000
    target = f"target <= {2 * percentile(bare, 99) * ms + 1:.1f} (2x + 1 ms)"
    return [
        Result(f"latency p50 ms, 1000 rows/s, {subscribers} sockets", "bare listener p50", percentile(bare, 50) * ms,
               "bridge p50", percentile(bridged[subscribers], 50) * ms),
        Result(f"latency p99 ms, 1000 rows/s, {subscribers} sockets", "bare listener p99", percentile(bare, 99) * ms,
               "bridge p99", percentile(bridged[subscribers], 99) * ms, target),
        Result("latency p99 ms, 1000 rows/s, 1 socket", "bare listener p99", percentile(bare, 99) * ms,
               "bridge p99", percentile(bridged[1], 99) * ms, target),
    ]  # fmt: skip


async def connections(dsn: str) -> list[Result]:
    # 20,000, or what this machine lets one process hold (its hard open-file limit, less what the bridge
    # needs for itself)
    count = 300 if QUICK else min(20_000, FILE_LIMIT - 500)
    bridge = await serve(dsn, PGBRIDGE_HEARTBEAT="1")
    fleet = Fleet()
    try:
        await asyncio.sleep(1)
        before = rss(bridge.proc.pid)
        await fleet.open(bridge.url(token()), count, sample=1)
        await asyncio.sleep(2)
        after = rss(bridge.proc.pid)
        acked: dict[int, float] = {}
        conn = await asyncpg.connect(dsn)
        for n in range(1 if QUICK else 5):  # one row at a time, a second apart, while heartbeats go out
            row = await conn.fetchval("INSERT INTO posts (title) VALUES ('broadcast') RETURNING id")
            acked[row] = time.time()
            await fleet.until(count * (n + 1))
            await asyncio.sleep(1)
        await conn.close()
        latencies = await fleet.latencies(acked)
    finally:
        await fleet.close()
        stop(bridge)
    per_connection = (after - before) / count / 1024
    return [
        Result(f"memory, {count:,} subscribed sockets", "RSS before MiB", before / 2**20, "RSS after MiB",
               after / 2**20, f"{per_connection:.1f} KiB per connection (target <= 16)"),
        Result(f"broadcast to {count:,} sockets, ms", "p50", percentile(latencies, 50) * 1000, "p99",
               percentile(latencies, 99) * 1000, "heartbeats every second meanwhile"),
    ]  # fmt: skip


FILTERS = [  # (share of the subscriptions, filter): each change matches about one subscription
    (0.7, '{"action": "subscribe", "collection": "posts", "filter": {"author_id": {i}}}'),
    (0.15, '{"action": "subscribe", "collection": "posts", "filter": {"author_id": {"in": [{i}, -1, -2]}}}'),
    (0.15, '{"action": "subscribe", "collection": "posts", "filter": {"title": "t{i}", "score": {"gte": 50}}}'),
]


async def filters(dsn: str) -> list[Result]:
    count = 300 if QUICK else 10_000
    per_second, seconds = (1000, 1.0) if QUICK else (5000, 4.0)
    bridge = await serve(dsn)
    fleet = Fleet()
    try:
        first = 0
        for share, template in FILTERS:
            n = int(count * share)
            await fleet.open(bridge.url(token()), n, template, first=first, sample=1)
            first += n
        conn = await asyncpg.connect(dsn)
        acked: dict[int, float] = {}
        rng = random.Random(1)
        start = time.perf_counter()
        statements = int(per_second * seconds / 50)
        for s in range(statements):  # 50 rows a statement
            await asyncio.sleep(max(0.0, start + s * 50 / per_second - time.perf_counter()))
            authors = [rng.randrange(count) for _ in range(50)]
            titles = [f"t{rng.randrange(count)}" for _ in range(50)]
            ids = await conn.fetch(
                "INSERT INTO posts (title, author_id, score) SELECT * FROM unnest($1::text[], $2::int[], $3::int[])"
                " RETURNING id", titles, authors, [rng.randrange(100) for _ in range(50)],
            )  # fmt: skip
            now = time.time()
            acked.update((r["id"], now) for r in ids)
        sustained = len(acked) / (time.perf_counter() - start)
        await asyncio.sleep(2)
        await conn.close()
        latencies = await fleet.latencies(acked)
    finally:
        await fleet.close()
        stop(bridge)
    return [
        Result(f"filters, {count:,} distinct, changes/s", "offered /s", per_second, "sustained /s", sustained),
        Result(f"filters, {count:,} distinct, {len(latencies)} deliveries, ms", "p50", percentile(latencies, 50) * 1000,
               "p99", percentile(latencies, 99) * 1000, "target p99 <= 100 at 5,000 changes/s"),
        routing_cost(count),
        routing_cost(count, tenants=True),
    ]  # fmt: skip


def routing_cost(count: int, *, tenants: bool = False) -> Result:
    """In process: the time to route one change with ``count`` distinct filters vs. 100, or with ``count``
    tenants (tenant isolation on ``author_id``, no filter) vs. one."""
    rng = random.Random(2)
    timings = []
    fewer = 1 if tenants else 100
    for subscriptions in (fewer, count):
        # each change matches exactly one subscription, whatever their number
        rows = [Change(1, n, "posts", "create", "2026-01-01T00:00:00.000Z",
                       (orjson.dumps({"id": n, "author_id": rng.randrange(subscriptions), "title": "x"}),), None)
                for n in range(5000)]  # fmt: skip
        router = Router("author_id" if tenants else None)
        for i in range(subscriptions):
            router.add(Subscription(CountingSink(), "posts", ALL, compile_filter(None if tenants else {"author_id": i}),
                                    tenant_key(i) if tenants else None))  # fmt: skip
        started = time.perf_counter()
        for change in rows:
            router.route(change, 0)
        timings.append((time.perf_counter() - started) / len(rows) * 1e6)
    what = "tenants" if tenants else "filters"
    return Result(f"routing per change, {count:,} vs {fewer} {what}", f"{fewer} {what} us", timings[0],
                  f"{count:,} {what} us", timings[1], "cost follows matches, not subscriptions: ratio ~1")  # fmt: skip


async def checkpoint(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CHECKPOINT")
    await conn.close()


async def main() -> None:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "pg")
        try:
            dsn = cluster.dsn()
            conn = await asyncpg.connect(dsn)
            await migrate(conn)
            await conn.execute(TABLES)
            await conn.close()
            sections: list[tuple[str, Callable[[], Awaitable[list[Result]]]]] = [
                ("writers", lambda: writers(cluster, dsn)),
                ("ingest", lambda: ingest(dsn)),
                ("memory", lambda: bulk_memory(dsn)),
                ("fan-out", lambda: fan_out_sockets(dsn)),
                ("latency", lambda: latency(dsn)),
                ("connections", lambda: connections(dsn)),
                ("filters", lambda: filters(dsn)),
            ]
            for name, run in sections:
                # what earlier sections wrote is flushed now, not by a checkpoint in the middle of a timing
                await checkpoint(dsn)
                started = time.monotonic()
                found = await run()
                report(found)
                results += found
                print(f"  ({name}: {time.monotonic() - started:.0f} s)", flush=True)
        finally:
            cluster.cleanup()
    found = fan_out()
    report(found)
    results += found
    out = Path(".pgbridge") / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([{**asdict(r), "ratio": round(r.ratio, 3)} for r in results], indent=2))
    print(f"\n{len(results)} figures written to {out}")


def report(results: list[Result]) -> None:
    for r in results:
        print(
            f"{r.scenario:44} {r.baseline:>28} {r.baseline_value:11.1f}   {r.measure:>16} {r.value:11.1f}"
            f"   ratio {r.ratio:5.2f}   {r.target}",
            flush=True,
        )


def run(args: Any = None) -> None:
    asyncio.run(main())


if __name__ == "__main__":
    run()

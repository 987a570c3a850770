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
     and with 10,000 tenants vs. one;
   - snapshot: a ``"snapshot": true`` subscription of a 1,000,000-row table, rows per second from its
     confirmation to the last row vs. asyncpg's ``copy_from_query`` of the same rows as JSON, and the
     bridge's peak RSS meanwhile vs. its RSS before;
   - SSE: the fan-out ceiling over Server-Sent Events vs. over WebSockets with the same 500 subscribers
     (``tests/bench/sse_client.py``: bare HTTP/1.1 streams that count events), and the memory per idle
     subscribed SSE stream vs. per idle WebSocket;
   - flood: 1,000,000 ``pg_notify`` on the channel ``pgbridge`` (and on a few other names) from a role
     with no grants, the slowest ``/healthz`` answer and marker row meanwhile vs. without the flood, on
     asyncio and on uvloop;
   - broad filters: five subjects at their connection cap with filters that defeat the routing index, an
     honest client's delay for a 100-row INSERT vs. without them.

``PGBRIDGE_BENCH_ONLY=snapshot,flood`` runs only the sections named (their names are printed after each).
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
ONLY = {name.strip() for name in os.environ.get("PGBRIDGE_BENCH_ONLY", "").split(",") if name.strip()}
ROUNDS = 1 if QUICK else 3
WRITE_SECONDS = 1 if QUICK else 3
WRITERS = (4,) if QUICK else (1, 4, 16, 64)
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


async def pgbench_run(
    pgbench: str, dsn: str, table: str, clients: int, seconds: int = WRITE_SECONDS
) -> tuple[float, int]:
    """One-row INSERT transactions into ``table`` by ``clients`` writers for ``seconds``: their tps, and
    how many committed."""
    script = Path(tempfile.gettempdir()) / f"pgbridge-bench-{table}.sql"
    script.write_text(f"INSERT INTO {table} (title, author_id) VALUES ('hello world', 42);\n")
    proc = await asyncio.create_subprocess_exec(
        pgbench, "-n", "-f", str(script), "-c", str(clients), "-j", "2", "-T", str(seconds), dsn,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    tps = re.search(rb"tps = ([0-9.]+)", out)
    done = re.search(rb"number of transactions actually processed: (\d+)", out)
    if tps is None or done is None:
        raise RuntimeError(f"pgbench failed: {err.decode()[-500:]}")
    return float(tps.group(1)), int(done.group(1))


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
                    tps = (await pgbench_run(pgbench, dsn, table, clients))[0]
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
        self, url: str, count: int, subscribe: str = SUBSCRIBE, first: int = 0, sample: int = 0, connections: int = 1,
        counting: str = '{"type":"posts.',
    ) -> None:  # fmt: skip
        """Open ``count`` connections; record receive times of every ``sample``-th row on every
        ``connections``-th connection (0: none). The frames counted are those that start with ``counting``."""
        started = []
        for offset in range(0, count, 5000):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.client", url, str(min(5000, count - offset)), str(first + offset),
                subscribe, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 30,
                env={**os.environ, "PGBRIDGE_SAMPLE": str(sample), "PGBRIDGE_SAMPLE_CONNECTIONS": str(connections),
                     "PGBRIDGE_COUNT": counting},
            )  # fmt: skip
            started.append(proc)
        for proc in started:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            assert line == b"ready\n", line
        self.procs += started

    async def reports(self) -> list[dict[str, Any]]:
        """What each client process reports (see tests/bench/client.py)."""
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"report\n")
        found = []
        for proc in self.procs:
            assert proc.stdout is not None
            found.append(orjson.loads(await proc.stdout.readline()))
        return found

    async def report(self) -> tuple[list[int], dict[int, list[float]]]:
        frames: list[int] = []
        received: dict[int, list[float]] = {}
        for report in await self.reports():
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


async def settle(seconds: float) -> None:
    """Wait for a bridge to settle: its memory after a start or after opening sockets, deliveries still on
    their way. The short run waits a fifth as long: its figures show only that every scenario runs."""
    await asyncio.sleep(seconds / 5 if QUICK else seconds)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def serve(dsn: str, tree: Path | None = None, **env: str) -> BridgeProcess:
    """A bridge process of this tree, or of ``tree`` (another checkout of it), with ``env`` set."""
    settings = {"PGBRIDGE_HEARTBEAT": "3600", "PGBRIDGE_MAX_CONNECTIONS_PER_SUBJECT": "100000",
                "PGBRIDGE_MAX_FILTER_COST_PER_SUBJECT": "1000000", "PGBRIDGE_LOG_LEVEL": "WARNING", **env}  # fmt: skip
    bridge = BridgeProcess(dsn, free_port(), settings, tree=tree)
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
        await settle(0.5)
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
        await settle(1)
        before = rss(bridge.proc.pid)
        await fleet.open(bridge.url(token()), count, sample=1)
        await settle(2)
        after = rss(bridge.proc.pid)
        acked: dict[int, float] = {}
        conn = await asyncpg.connect(dsn)
        for n in range(1 if QUICK else 5):  # one row at a time, a second apart, while heartbeats go out
            row = await conn.fetchval("INSERT INTO posts (title) VALUES ('broadcast') RETURNING id")
            acked[row] = time.time()
            await fleet.until(count * (n + 1))
            await settle(1)
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
        await settle(2)
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


SNAPSHOT_TABLE = """
CREATE TABLE IF NOT EXISTS snap (id bigserial PRIMARY KEY, title text, author_id int,
                                 created_at timestamptz DEFAULT now());
TRUNCATE snap;
INSERT INTO snap (title, author_id) SELECT 'hello world ' || g, g % 1000 FROM generate_series(1, $ROWS) g;
SELECT pgbridge.publish('snap') WHERE NOT EXISTS (SELECT FROM pgbridge.publications WHERE collection = 'snap');
ANALYZE snap;
"""


def peak_rss(pid: int) -> int:
    """The most RSS the process held since :func:`reset_peak` (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def reset_peak(pid: int) -> None:
    """Start the process's peak RSS over from its RSS now (Linux: ``clear_refs`` 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


async def snapshot(dsn: str) -> list[Result]:
    """A ``"snapshot": true`` subscription of a 1,000,000-row table read by one picows client, rows per
    second from its confirmation (which the bridge sends before it reads the table) to the last row, vs.
    asyncpg's ``copy_from_query`` of the same rows as JSON; and the bridge's peak RSS meanwhile vs. its RSS
    before (flow control: it never holds the table)."""
    rows = 20_000 if QUICK else 1_000_000
    conn = await asyncpg.connect(dsn)
    await conn.execute(SNAPSHOT_TABLE.replace("$ROWS", str(rows)))
    table = await conn.fetchval("SELECT sum(octet_length(to_jsonb(s)::text)) FROM snap s")
    await conn.close()
    copied: list[float] = []
    streamed: list[float] = []
    before: list[float] = []
    peak: list[float] = []
    received = [0]

    async def sink(chunk: bytes) -> None:
        received[0] += chunk.count(b"\n")

    for _ in range(ROUNDS):
        conn = await asyncpg.connect(dsn)
        received[0] = 0
        started = time.perf_counter()
        await conn.copy_from_query("SELECT to_jsonb(s)::text FROM snap s", output=sink)
        copied.append(received[0] / (time.perf_counter() - started))
        await conn.close()
        assert received[0] == rows, received[0]

        bridge = await serve(dsn)
        fleet = Fleet()
        try:
            await settle(0.5)  # the bridge settles after its start
            before.append(rss(bridge.proc.pid))
            reset_peak(bridge.proc.pid)
            await fleet.open(bridge.url(token()), 1, '{"action": "subscribe", "collection": "snap", "snapshot": true}',
                             counting='{"type":"snap.snapshot"')  # fmt: skip
            await fleet.until(rows, timeout=600)
            done = time.time()
            # from the confirmation, which comes before the snapshot is read (not from the client's start)
            started = (await fleet.reports())[0]["confirmed"][0]
            streamed.append(rows / (done - started))
            peak.append(peak_rss(bridge.proc.pid))
        finally:
            await fleet.close()
            stop(bridge)
    return [
        Result(f"snapshot, {rows:,} rows, rows/s", "copy_from_query /s", median_of(copied), "bridge /s",
               median_of(streamed), "target >= 0.5"),
        Result(f"snapshot, {rows:,} rows, bridge RSS", "RSS before MiB", median_of(before) / 2**20, "peak RSS MiB",
               median_of(peak) / 2**20, f"the rows are {table / 2**20:.0f} MiB: never held"),
    ]  # fmt: skip


class Streams(Fleet):
    """Benchmark SSE clients (tests/bench/sse_client.py) in processes of their own, at most 5000 streams
    each; they answer ``count`` as the WebSocket ones do."""

    async def open_streams(self, port: int, query: str, count: int) -> None:
        started = []
        for offset in range(0, count, 5000):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.sse_client", str(port), f"{protocol.SSE_PATH}?{query}",
                str(min(5000, count - offset)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            started.append(proc)
        for proc in started:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            assert line == b"ready\n", line
        self.procs += started


async def sse_fan_out(dsn: str) -> list[Result]:
    """The fan-out ceiling over SSE vs. over WebSockets: the same subscribers, the same rows, each side on
    a bridge of its own; and the memory each idle subscribed stream costs, SSE vs. WebSocket."""
    subscribers, rows = (50, 40) if QUICK else (500, 400)
    idle = 300 if QUICK else min(5_000, FILE_LIMIT - 500)
    query = f"collection=posts&token={token()}"
    rates: dict[str, list[float]] = {"ws": [], "sse": []}
    memory: dict[str, list[float]] = {"ws": [], "sse": []}
    for _ in range(ROUNDS):
        for kind in ("ws", "sse"):
            bridge = await serve(dsn)
            clients = Fleet() if kind == "ws" else Streams()
            try:
                if isinstance(clients, Streams):
                    await clients.open_streams(bridge.port, query, subscribers)
                else:
                    await clients.open(bridge.url(token()), subscribers)
                started = time.perf_counter()
                await insert_rows(dsn, rows)
                rates[kind].append(rows * subscribers / (await clients.until(rows * subscribers) - started))
            finally:
                await clients.close()
                stop(bridge)
            bridge = await serve(dsn)
            clients = Fleet() if kind == "ws" else Streams()
            try:
                await settle(1)
                before = rss(bridge.proc.pid)
                if isinstance(clients, Streams):
                    await clients.open_streams(bridge.port, query, idle)
                else:
                    await clients.open(bridge.url(token()), idle)
                await settle(2)
                memory[kind].append((rss(bridge.proc.pid) - before) / idle / 1024)
            finally:
                await clients.close()
                stop(bridge)
    return [
        Result(f"fan-out, {subscribers} SSE streams, deliveries/s", "WebSocket /s", median_of(rates["ws"]), "SSE /s",
               median_of(rates["sse"]), "target >= 0.8"),
        Result(f"memory, {idle:,} idle subscribed streams", "WebSocket KiB each", median_of(memory["ws"]),
               "SSE KiB each", median_of(memory["sse"])),
    ]  # fmt: skip


class Watcher:
    """One WebSocket subscriber of ``posts`` in this process: when each row arrived, by row id."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.changed = asyncio.Event()

    async def run(self, url: str, subscribed: asyncio.Future[None]) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(SUBSCRIBE)
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                if not subscribed.done():
                    subscribed.set_result(None)
                    continue
                body = orjson.loads(msg.data)
                if body.get("type", "").startswith("posts."):
                    self.arrived[body["data"]["id"]] = time.time()
                    self.changed.set()

    async def arrival(self, row: int, timeout: float = 60) -> float:
        async with asyncio.timeout(timeout):
            while row not in self.arrived:
                self.changed.clear()
                await self.changed.wait()
        return self.arrived[row]


FLOOD_NAMES = ("pgbridge", "posts", "pgbridge_wake", "pgbridge.wake", "wake")
"""The channels a flood goes to: the one the sweep used, and names a role might guess."""


async def flood(dsn: str) -> list[Result]:
    """1,000,000 ``pg_notify`` on the channel ``pgbridge`` (and a tenth of that on each of a few other
    names) from a role with no grants, in transactions of 100,000: the slowest ``/healthz`` answer and the
    slowest marker row (commit to a subscriber's receipt) while it lasts and for half a second after, vs.
    the same measurements without it; on asyncio and on uvloop."""
    total = 20_000 if QUICK else 1_000_000
    per_transaction = min(total, 100_000)
    settle = 0.2 if QUICK else 0.5
    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP ROLE IF EXISTS bench_flooder; CREATE ROLE bench_flooder LOGIN")
    await conn.close()
    as_flooder = dsn.replace("postgres:@", "bench_flooder:@")
    assert as_flooder != dsn, dsn

    async def send_flood() -> None:
        flooder = await asyncpg.connect(as_flooder)
        try:
            for name in FLOOD_NAMES:
                count = total if name == "pgbridge" else total // 10
                for first in range(0, count, per_transaction):  # distinct payloads: none is folded into another
                    await flooder.execute(
                        f"SELECT pg_notify($1, g::text) FROM generate_series({first + 1}, "
                        f"{min(count, first + per_transaction)}) g", name
                    )  # fmt: skip
        finally:
            await flooder.close()

    async def probe(
        port: int, watcher: Watcher, writer: asyncpg.Connection, until: Callable[[], bool]
    ) -> tuple[float, float]:
        """The slowest /healthz answer and marker delivery, probing one after the other until ``until()``."""
        health, marker = [], []
        async with aiohttp.ClientSession() as http:
            while True:
                started = time.perf_counter()
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    await resp.read()
                health.append(time.perf_counter() - started)
                row = await writer.fetchval("INSERT INTO posts (title) VALUES ('marker') RETURNING id")
                acked = time.time()
                marker.append(since_commit(await watcher.arrival(row), acked))
                if until():
                    return max(health), max(marker)
                await asyncio.sleep(0.02)

    def settled(task: asyncio.Task[None] | None, seconds: float) -> Callable[[], bool]:
        """Whether ``seconds`` have passed since ``task`` ended (since now, without one)."""
        ended: list[float] = [] if task is not None else [time.monotonic()]
        if task is not None:
            task.add_done_callback(lambda _: ended.append(time.monotonic()))
        return lambda: bool(ended) and time.monotonic() > ended[0] + seconds

    results = []
    for loop in ("asyncio", "uvloop"):
        quiet: dict[str, list[float]] = {"health": [], "marker": []}
        flooded: dict[str, list[float]] = {"health": [], "marker": []}
        bridge = await serve(dsn, PGBRIDGE_LOOP=loop)
        watcher = Watcher()
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watching = asyncio.create_task(watcher.run(bridge.url(token()), subscribed))
        writer = await asyncpg.connect(dsn)
        try:
            await asyncio.wait_for(subscribed, 30)
            for _ in range(ROUNDS):
                h, m = await probe(bridge.port, watcher, writer, settled(None, 1.0))
                quiet["health"].append(h)
                quiet["marker"].append(m)
                sending = asyncio.create_task(send_flood())
                h, m = await probe(bridge.port, watcher, writer, settled(sending, settle))
                await sending
                flooded["health"].append(h)
                flooded["marker"].append(m)
        finally:
            await writer.close()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            stop(bridge)
        ms, name = 1000, f"flood, {total:,} NOTIFY, {loop}"
        results += [
            Result(f"{name}, /healthz ms", "without flood, slowest", median_of(quiet["health"]) * ms,
                   "during flood, slowest", median_of(flooded["health"]) * ms, "target within 100 ms of normal"),
            Result(f"{name}, marker ms", "without flood, slowest", median_of(quiet["marker"]) * ms,
                   "during flood, slowest", median_of(flooded["marker"]) * ms, "target within 200 ms of normal"),
        ]  # fmt: skip
    return results


# Conditions that hold for every row the scenario writes, on every column, with numeric bounds broad enough
# that the index (which takes an equality, else the first numeric bound) finds every row a candidate; the
# distinct `neq` keeps each filter its own, so that no two subscriptions share an evaluation.
BROAD = ('{"action": "subscribe", "collection": "posts", "filter": {'
         '"author_id": {"gt": -1e15, "gte": -1e15, "lt": 1e15, "lte": 1e15, "neq": -{i}}, '
         '"id": {"gt": -1e15, "gte": -1e15, "lt": 1e15, "lte": 1e15, "neq": -{i}}, '
         '"score": {"gt": -1e15, "gte": -1e15, "lt": 1e15, "lte": 1e15, "neq": -{i}}, '
         '"title": {"gt": "", "gte": "", "lt": "~", "lte": "~", "neq": "x{i}"}, '
         '"created_at": {"gt": "2000-01-01T00:00:00Z", "gte": "2000-01-01T00:00:00Z", "lt": "2100-01-01T00:00:00Z", '
         '"lte": "2100-01-01T00:00:00Z", "neq": "2000-01-01T00:00:00Z"}}}')  # fmt: skip


async def subscriptions(port: int, collection: str) -> int:
    """The bridge's live subscriptions of ``collection``, as its /metrics says."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf'^pgbridge_subscriptions{{collection="{collection}"}} ([0-9.]+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


async def only_honest(port: int) -> bool:
    """Whether the bridge has closed the attackers: the next round starts alone."""
    return await subscriptions(port, "posts") == 1


async def broad_filters(dsn: str) -> list[Result]:
    """Five subjects, each at its cap of connections (100, the default) with broad filters of 25
    conditions that defeat the routing index; an honest client's delay from the commit of a
    100-row INSERT to its last row, vs. the same without the attackers (``--routing-budget`` at its
    default)."""
    subjects, per_subject = (5, 10) if QUICK else (5, 100)
    statements = 3 if QUICK else 10
    bridge = await serve(dsn, PGBRIDGE_MAX_CONNECTIONS_PER_SUBJECT="100", PGBRIDGE_MAX_FILTER_COST_PER_SUBJECT="10000")
    honest = Fleet()
    attackers = Fleet()
    delays: dict[str, list[float]] = {"alone": [], "attacked": []}
    try:
        await honest.open(bridge.url(token(sub="alice")), 1, sample=1)
        conn = await asyncpg.connect(dsn)
        expected = 0
        for _ in range(ROUNDS):
            for case in ("alone", "attacked"):
                if case == "attacked":
                    for s in range(subjects):
                        await attackers.open(bridge.url(token(sub=f"attacker{s}")), per_subject, BROAD,
                                             first=s * per_subject, sample=0)  # fmt: skip
                    # every one accepted (a refusal would be a frame the clients take for a confirmation)
                    assert await subscriptions(bridge.port, "posts") == 1 + subjects * per_subject
                for _ in range(statements):
                    ids = [r["id"] for r in await conn.fetch(
                        "INSERT INTO posts (title, author_id, score) SELECT 't' || g, g, g "
                        "FROM generate_series(1, 100) g RETURNING id")]  # fmt: skip
                    acked = time.time()
                    expected += len(ids)
                    await honest.until(expected)
                    received = (await honest.report())[1]
                    delays[case].append(max(since_commit(received[row][0], acked) for row in ids))
                    await asyncio.sleep(0.2)  # the deferred subjects are fed from the change log meanwhile
                if case == "attacked":
                    await attackers.close()
                    await wait_for(lambda: only_honest(bridge.port), what="the attackers' connections closed")
        await conn.close()
    finally:
        await honest.close()
        await attackers.close()
        stop(bridge)
    ms, name = 1000, f"filters defeating the index, {subjects} subjects x {per_subject}, 100-row INSERT"
    alone, attacked = delays["alone"], delays["attacked"]
    return [
        Result(f"{name}, p50 ms", "without attackers", median_of(alone) * ms, "with attackers",
               median_of(attacked) * ms, "target < 50"),
        Result(f"{name}, max ms", "without attackers", max(alone) * ms, "with attackers", max(attacked) * ms,
               "target < 50"),
    ]  # fmt: skip


async def checkpoint(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CHECKPOINT")
    await conn.close()


async def main() -> None:
    from tests.bench import haproxy, replicas  # they use this module's helpers

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
                ("snapshot", lambda: snapshot(dsn)),
                ("sse", lambda: sse_fan_out(dsn)),
                ("flood", lambda: flood(dsn)),
                ("broad-filters", lambda: broad_filters(dsn)),
                ("replicas", lambda: replicas.cost_per_replica(cluster, dsn, QUICK)),
                ("follower", lambda: replicas.follower_latency(dsn, QUICK)),
                ("haproxy", lambda: haproxy.replicas_behind_haproxy(dsn)),
            ]
            for name, run in sections:
                if ONLY and name not in ONLY:
                    continue
                # what earlier sections wrote is flushed now, not by a checkpoint in the middle of a timing
                await checkpoint(dsn)
                started = time.monotonic()
                found = await run()
                report(found)
                results += found
                print(f"  ({name}: {time.monotonic() - started:.0f} s)", flush=True)
        finally:
            cluster.cleanup()
    if not ONLY or "encoding" in ONLY:
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

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
   size of those rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from pgbridge import frames, protocol
from pgbridge.auth import ALL_OPS
from pgbridge.events import Change, make_change
from pgbridge.filters import MATCH_ALL
from pgbridge.history import History
from pgbridge.listener import Listener, ListenerSettings
from pgbridge.migrate import migrate
from pgbridge.router import Router, Subscription
from tests.helpers import Cluster, wait_for

QUICK = bool(os.environ.get("PGBRIDGE_BENCH_QUICK"))
ROUNDS = 1 if QUICK else 3
WRITE_SECONDS = 1 if QUICK else 3
WRITERS = (1, 4) if QUICK else (1, 4, 16, 64)
CHANGES = 2_000 if QUICK else 20_000
SUBSCRIBERS = 1000
ALL = ALL_OPS

TABLES = """
CREATE TABLE plain (id bigserial PRIMARY KEY, title text, author_id int, created_at timestamptz DEFAULT now());
CREATE TABLE naive (LIKE plain INCLUDING ALL);
CREATE TABLE pub (LIKE plain INCLUDING ALL);
CREATE TABLE polled (LIKE plain INCLUDING ALL);
CREATE FUNCTION notify_row() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_notify('naive', row_to_json(NEW)::text); RETURN NULL; END $$;
CREATE TRIGGER notify_row AFTER INSERT ON naive FOR EACH ROW EXECUTE FUNCTION notify_row();
SELECT pgbridge.publish('pub');
SELECT pgbridge.publish('polled', wake => false);
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

    def offer(self, frame: bytes) -> bool:
        self.count += 1
        self.bytes += len(frame)
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
                s.offer(frames.text_frame(protocol.data_event("posts", "create", change.timestamp,
                                                              change.event_id(index), raw, None)))  # fmt: skip
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
            ]
            for name, run in sections:
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

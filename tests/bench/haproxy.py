"""``make bench``, replicas behind HAProxy: deliveries per second and commit-to-receive p99 with 1, 2 and 3
``pgbridge serve`` replicas behind Debian's haproxy (the configuration of docs/deployment.md, as
``tests/process/haproxy.py`` runs it), vs. one bridge that the clients reach directly.

The clients are the benchmark's own (``tests/bench/client.py``, in a process of their own), connected
through HAProxy, which spreads them round robin. For each count of replicas: one-row transactions at a
steady rate, the time from each commit to each receipt on 1 in 10 sockets (p99); then rows written as
fast as one writer can, deliveries per second until every socket has every row. Every process shares
this machine's cores: PostgreSQL, the replicas, HAProxy, the clients and the writer.

``python -m tests.bench.haproxy`` runs it alone on a PostgreSQL of its own (``PGBRIDGE_BENCH_QUICK=1``:
the short sizes).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from tests.helpers import BridgeProcess, token
from tests.process.haproxy import HAProxy

if TYPE_CHECKING:
    from tests.bench.__main__ import Fleet, Result

QUICK = bool(os.environ.get("PGBRIDGE_BENCH_QUICK"))


async def _clients(bridges: list[BridgeProcess]) -> list[int]:
    """How many clients each bridge has, by its own /healthz."""
    counts = []
    async with aiohttp.ClientSession() as http:
        for bridge in bridges:
            async with http.get(f"http://127.0.0.1:{bridge.port}/healthz") as resp:
                counts.append(int((await resp.json())["clients"]))
    return counts


async def _measure(dsn: str, url: str, bridges: list[BridgeProcess], subscribers: int, rows: int, rate: int,
                   seconds: float) -> tuple[float, list[float], list[int]]:  # fmt: skip
    """Latencies at ``rate`` rows/s for ``seconds``, then deliveries/s of ``rows`` rows; and the spread."""
    from tests.bench.__main__ import Fleet, insert_rows, paced_writes

    fleet: Fleet = Fleet()
    try:
        await fleet.open(url, subscribers, sample=1, connections=10)
        spread = await _clients(bridges)
        if sum(spread) != subscribers or 0 in spread:
            raise RuntimeError(f"the {subscribers} sockets are not spread over every replica: {spread}")
        acked = await paced_writes(dsn, "posts", rate, seconds)
        delivered = len(acked) * subscribers
        await fleet.until(delivered)
        latencies = await fleet.latencies(acked)
        started = asyncio.get_running_loop().time()
        await insert_rows(dsn, rows)
        await fleet.until(delivered + rows * subscribers)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await fleet.close()
    return rows * subscribers / elapsed, latencies, spread


async def replicas_behind_haproxy(
    dsn: str,
    *,
    counts: tuple[int, ...] = (1, 2, 3),
    subscribers: int | None = None,
    rows: int | None = None,
    rate: int = 1000,
    seconds: float | None = None,
    rounds: int | None = None,
) -> list[Result]:
    """The figures, for a database with the benchmark's tables (``posts``, published): ``subscribers``
    sockets (60 quick, 300 full), ``rows`` written as fast as possible (200 / 2,000), and ``rate`` rows/s
    for ``seconds`` (1 / 3) for the latency; medians of ``rounds`` (1 / 3), the counts interleaved."""
    from tests.bench.__main__ import Result, percentile, serve, stop

    subscribers = subscribers or (60 if QUICK else 300)
    rows = rows or (200 if QUICK else 2000)
    seconds = seconds or (1.0 if QUICK else 3.0)
    rounds = rounds or (1 if QUICK else 3)
    rates: dict[int, list[float]] = {0: [], **{n: [] for n in counts}}  # 0: one bridge, reached directly
    latencies: dict[int, list[float]] = {0: [], **{n: [] for n in counts}}
    spreads: dict[int, list[int]] = {}
    for _ in range(rounds):
        for n in (0, *counts):
            bridges = [await serve(dsn) for _ in range(max(n, 1))]
            try:
                if n == 0:
                    found, lat, _ = await _measure(dsn, bridges[0].url(token()), bridges, subscribers, rows, rate,
                                                   seconds)  # fmt: skip
                else:
                    with tempfile.TemporaryDirectory(prefix="pgb-haproxy-") as tmp:
                        proxy = HAProxy(Path(tmp), [b.port for b in bridges])
                        try:
                            await proxy.start()
                            for name in proxy.names:
                                await proxy.until(name, "UP")
                            url = proxy.ws_url(f"/api/v1/realtime/ws?token={token()}")
                            found, lat, spreads[n] = await _measure(dsn, url, bridges, subscribers, rows, rate,
                                                                    seconds)  # fmt: skip
                        finally:
                            await proxy.stop()
                rates[n].append(found)
                latencies[n] += lat
            finally:
                for bridge in bridges:
                    stop(bridge)
    ms = 1000
    results = []
    for n in counts:
        spread = "/".join(map(str, spreads[n]))
        results.append(Result(f"haproxy, {n} replica{'s' if n > 1 else ''}, {subscribers} sockets, deliveries/s",
                              "1 bridge direct /s", statistics.median(rates[0]), "via haproxy /s",
                              statistics.median(rates[n]), f"sockets per replica {spread}"))  # fmt: skip
        results.append(Result(f"haproxy, {n} replica{'s' if n > 1 else ''}, p99 ms, {rate} rows/s",
                              "1 bridge direct p99", percentile(latencies[0], 99) * ms, "via haproxy p99",
                              percentile(latencies[n], 99) * ms, f"{len(latencies[n])} receipts timed"))  # fmt: skip
    return results


async def _alone() -> None:
    import asyncpg

    from tests.bench.__main__ import TABLES, report
    from tests.helpers import Cluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "pg")
        try:
            from pgbridge.migrate import migrate

            conn = await asyncpg.connect(cluster.dsn())
            await migrate(conn)
            await conn.execute(TABLES)
            await conn.close()
            report(await replicas_behind_haproxy(cluster.dsn()))
        finally:
            cluster.cleanup()


if __name__ == "__main__":
    asyncio.run(_alone())

"""``make bench``, replicas: what each more bridge on one database costs the database and its writers.

pgbench runs 16 writers of one-row INSERT transactions into a published table for a few seconds while
1, 2, 4, 8, 16 and 32 ``pgbridge serve`` processes run on the same database (no clients: a bridge's
database work does not depend on them). For each count: writer tps, ticks per second, sessions waiting
on the ticks table's lock and on NOTIFY's commit lock (sampled), and CPU per writer transaction of the
database (every PostgreSQL process, the writers' backends included) and of the bridges. Then commit to
receive p99, at 1,000 rows/s, on the ticking bridge and on a follower.

Each count runs with this tree's bridges and, as the baseline, with the bridges of the last version in
which every bridge ticked (``BEFORE``, checked out with ``git worktree``; ``PGBRIDGE_BENCH_BEFORE``
names another revision, or ``none`` to skip it; the short version skips it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from tests.helpers import BridgeProcess, Cluster, token

if TYPE_CHECKING:
    from tests.bench.__main__ import Result

BEFORE = os.environ.get("PGBRIDGE_BENCH_BEFORE", "2a4b657")
"""The last revision in which every bridge took its own ticks."""
ROOT = Path(__file__).resolve().parents[2]
WRITERS = 16
_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path | None]:
    """This repository at ``revision``, in a temporary work tree; None where git or the revision is missing."""
    if revision == "none":
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
                               capture_output=True, text=True)  # fmt: skip
        if added.returncode != 0:
            print(f"  (no baseline: git cannot check out {revision}: {added.stderr.strip()[-200:]})", flush=True)
            yield None
            return
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU the processes ``pids`` have used so far (those gone count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def postgres_pids(cluster: Cluster) -> list[int]:
    """The postmaster and every process it started (backends, the writers' included)."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


@contextlib.asynccontextmanager
async def bridges(dsn: str, count: int, tree: Path | None) -> AsyncIterator[list[BridgeProcess]]:
    """``count`` bridge processes, of this tree or of ``tree``, started at once and stopped after."""
    from tests.bench.__main__ import serve, stop

    started = await asyncio.gather(*(serve(dsn, tree) for _ in range(count)))
    try:
        yield list(started)
    finally:
        for b in started:
            stop(b)


async def sample_waits(dsn: str, stop: asyncio.Event) -> tuple[float, float]:
    """Average sessions waiting on the ticks table's lock and on NOTIFY's commit lock, until ``stop``."""
    conn = await asyncpg.connect(dsn)
    ticks, notify, samples = 0, 0, 0
    try:
        while not stop.is_set():
            row = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE l.relation = 'pgbridge.ticks'::regclass) AS ticks,
                          count(*) FILTER (WHERE l.locktype = 'object' AND l.classid = 'pg_database'::regclass)
                            AS notify
                   FROM pg_locks l WHERE NOT l.granted"""
            )
            ticks, notify, samples = ticks + row["ticks"], notify + row["notify"], samples + 1
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return ticks / max(samples, 1), notify / max(samples, 1)


async def one_count(cluster: Cluster, dsn: str, count: int, tree: Path | None, seconds: float) -> dict[str, float]:
    from tests.bench.__main__ import pgbench_run

    pgbench = str(Path(cluster.bin_path) / "pgbench")
    async with bridges(dsn, count, tree) as running:
        conn = await asyncpg.connect(dsn)
        first_tick = await conn.fetchval("SELECT max(n) FROM pgbridge.ticks")
        database, ours = postgres_pids(cluster), [b.proc.pid for b in running]
        db_cpu, bridge_cpu, started = cpu_seconds(database), cpu_seconds(ours), time.monotonic()
        stop = asyncio.Event()
        waits = asyncio.create_task(sample_waits(dsn, stop))
        tps, transactions = await pgbench_run(pgbench, dsn, "pub", WRITERS, round(seconds))
        stop.set()
        elapsed = time.monotonic() - started
        db_cpu = cpu_seconds(postgres_pids(cluster)) - db_cpu  # the writers' backends came and went
        bridge_cpu = cpu_seconds(ours) - bridge_cpu
        tick_waits, notify_waits = await waits
        ticks = await conn.fetchval("SELECT max(n) FROM pgbridge.ticks") - first_tick
        await conn.close()
    return {
        "tps": tps,
        "ticks/s": ticks / elapsed,
        "tick-lock waits": tick_waits,
        "notify-lock waits": notify_waits,
        "db us/txn": 1e6 * db_cpu / transactions,
        "bridges us/txn": 1e6 * bridge_cpu / transactions,
    }


async def cost_per_replica(cluster: Cluster, dsn: str, quick: bool) -> list[Result]:
    from tests.bench.__main__ import Result

    counts = (1, 4) if quick else (1, 2, 4, 8, 16, 32)
    seconds = 1.0 if quick else 5.0
    results: list[Result] = []
    with checkout("none" if quick else BEFORE) as before:
        measured: dict[tuple[str, int], dict[str, float]] = {}
        for count in counts:
            for name, tree in (("before", before), ("now", None)):
                if name == "before" and before is None:
                    continue
                measured[name, count] = await one_count(cluster, dsn, count, tree, seconds)
        one = measured["now", 1]
        for count in counts:
            now = measured["now", count]
            old = measured.get(("before", count))
            for figure, value in now.items():
                target = ""
                if count == 16 and figure == "tps":
                    target = f"target >= {0.9 * one['tps']:.0f} (0.9x 1 bridge's)"
                elif count == 16 and figure == "db us/txn":
                    target = f"target <= {1.15 * one['db us/txn']:.0f} (1.15x 1 bridge's)"
                results.append(Result(f"replicas: {count:2} bridges, {figure}", "before" if old else "1 bridge now",
                                      old[figure] if old else one[figure], "now", value, target))  # fmt: skip
    return results


async def follower_latency(dsn: str, quick: bool) -> list[Result]:
    """Commit to receive at 1,000 rows/s, one socket on the ticking bridge and one on a follower."""
    from tests.bench.__main__ import Fleet, paced_writes, percentile

    seconds = 0.5 if quick else 5.0
    async with bridges(dsn, 2, None) as running:
        roles = {}
        async with aiohttp.ClientSession() as http:
            for b in running:
                async with http.get(f"http://127.0.0.1:{b.port}/healthz") as resp:
                    roles["ticker" if (await resp.json())["ticker"] else "follower"] = b
        if set(roles) != {"ticker", "follower"}:
            raise RuntimeError(f"two bridges, not one ticker and one follower: {sorted(roles)}")
        fleets = {role: Fleet() for role in roles}
        try:
            for role, fleet in fleets.items():
                await fleet.open(roles[role].url(token()), 1, sample=1)
            acked = await paced_writes(dsn, "posts", 1000, seconds)
            p99 = {}
            for role, fleet in fleets.items():
                await fleet.until(len(acked))
                p99[role] = percentile(await fleet.latencies(acked), 99) * 1000
        finally:
            for fleet in fleets.values():
                await fleet.close()
    from tests.bench.__main__ import Result

    target = f"target <= {p99['ticker'] + 2:.1f} (ticker's + 2 ms)"
    return [Result("replicas: commit to receive p99 ms, 1000 rows/s", "ticker p99", p99["ticker"],
                   "follower p99", p99["follower"], target)]  # fmt: skip

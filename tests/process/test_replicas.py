"""Replicas behind HAProxy: three ``pgbridge serve`` processes on one PostgreSQL, Debian's haproxy in front
with the configuration of docs/deployment.md, and clients that reconnect and resume through it (the
project's Python client), each checked against the table: every change once, in commit order.

Which replica a client is on is read from each replica's own ``/healthz`` (its ``clients``), on its own
port; HAProxy's view of each replica from its stats socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson
import pytest

from pgbridge.client import Client, Disconnect, State, Subscription
from pgbridge.protocol import SSE_PATH, WS_PATH, EventStreamParser
from tests.db.test_recovery import POSTS, write_for
from tests.helpers import BridgeProcess, Cluster, Ledger, free_port, token, wait_for
from tests.process.haproxy import HAProxy, needs_haproxy

if TYPE_CHECKING:
    from tests.conftest import Processes

pytestmark = needs_haproxy

REPLICAS = 3
# WARNING: the bridges' output goes to a pipe nobody reads while they run
BRIDGE_ENV = {"PGBRIDGE_LOG_LEVEL": "WARNING", "PGBRIDGE_PROBE_INTERVAL": "0.5", "PGBRIDGE_PROBE_TIMEOUT": "2"}


class Follower:
    """A :class:`~pgbridge.client.Client` through HAProxy with one subscription to ``posts``, everything it
    yields in a :class:`~tests.helpers.Ledger`, and how each of its connections ended."""

    def __init__(self, url: str, since: str | None = None) -> None:
        self.ledger = Ledger()
        self.ended: list[Disconnect] = []  # how each connection the server had accepted ended
        self.client = Client(url, token=token(), base_delay=0.05, max_delay=0.5, on_state=self._state)
        self.since = since
        self.sub: Subscription | None = None
        self.task: asyncio.Task[None] | None = None

    def _state(self, state: State, disconnect: Disconnect | None) -> None:
        if state is State.CONNECTING and disconnect is not None and self.client.connections > len(self.ended):
            self.ended.append(disconnect)

    async def start(self) -> None:
        await self.client.start()
        self.sub = self.client.subscribe("posts", since=self.since)
        self.task = asyncio.create_task(self._read())
        await self.sub.ready()

    async def _read(self) -> None:
        assert self.sub is not None
        async for event in self.sub:
            self.ledger.add([{"type": f"{event.collection}.{event.op}", "id": event.id, "data": event.data}])

    @property
    def received(self) -> int:
        return len(self.ledger.received)

    async def close(self) -> None:
        await self.client.close()
        if self.task is not None:
            await self.task


class SSEFollower:
    """An event stream through HAProxy, read with the protocol's own parser, into a Ledger."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ledger = Ledger()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        self.subscribed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._read())
        await asyncio.wait_for(self.subscribed.wait(), 20)

    async def _read(self) -> None:
        parser = EventStreamParser()
        async with self.http.get(self.url) as response:
            assert response.status == 200, await response.text()
            while chunk := await response.content.readany():
                for event in parser.feed(chunk):
                    if event.event == "subscribed":
                        self.subscribed.set()
                    elif event.event.startswith("posts."):
                        self.ledger.add([orjson.loads(event.data)])

    @property
    def received(self) -> int:
        return len(self.ledger.received)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.http.close()


class Replicas:
    """The environment: replicas as processes (each on a port of its own, kept across restarts), haproxy
    in front of them, writers, and followers; :meth:`stop` ends all of it."""

    def __init__(self, dsn: str, start_process: Processes, directory: Path, dsns: list[str]) -> None:
        self.dsn = dsn
        self._start_process = start_process
        self.dsns = dsns
        self.ports = [free_port() for _ in dsns]
        self.processes: list[BridgeProcess] = []
        self.haproxy = HAProxy(directory, self.ports)
        self.names = self.haproxy.names
        self.followers: list[Follower | SSEFollower] = []
        self.stop_writing = asyncio.Event()
        self.writers: list[asyncio.Task[int]] = []
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def start(self) -> None:
        self.processes = [self._start_process(d, p, env=BRIDGE_ENV) for d, p in zip(self.dsns, self.ports, strict=True)]
        await asyncio.gather(*(p.ready() for p in self.processes))
        await self.haproxy.start()
        for name in self.names:
            await self.haproxy.until(name, "UP")

    # -- the replicas ---------------------------------------------------------------------------------

    async def health(self, i: int) -> tuple[int, dict[str, Any]]:
        """Replica ``i``'s /healthz, asked on its own port: the status and the body."""
        async with self.http.get(f"http://127.0.0.1:{self.ports[i]}/healthz") as resp:
            return resp.status, await resp.json()

    async def clients(self) -> list[int]:
        """How many clients each replica has, by its own /healthz."""
        return [(await self.health(i))[1]["clients"] for i in range(len(self.ports))]

    def kill(self, i: int) -> None:
        self.processes[i].proc.kill()
        self.processes[i].proc.wait()

    async def restart(self, i: int) -> None:
        """Stop replica ``i`` as systemd does (SIGTERM, wait until it exits), start it again on its port,
        and wait until HAProxy has it up."""
        proc = self.processes[i].proc
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        self.processes[i] = self._start_process(self.dsns[i], self.ports[i], env=BRIDGE_ENV)
        await self.processes[i].ready()
        await self.haproxy.until(self.names[i], "UP")

    # -- writers and clients --------------------------------------------------------------------------

    def write(self, writers: int = 2) -> None:
        self.writers += [asyncio.create_task(write_for(self.dsn, self.stop_writing, i)) for i in range(writers)]

    async def follow(self, count: int, since: str | None = None) -> list[Follower]:
        """``count`` new WebSocket clients through HAProxy, each subscribed (one after the other, as
        round robin then spreads them)."""
        started = []
        for _ in range(count):
            follower = Follower(self.haproxy.ws_url(WS_PATH), since)
            self.followers.append(follower)
            await follower.start()
            started.append(follower)
        return started

    async def stream(self) -> SSEFollower:
        follower = SSEFollower(self.haproxy.http_url(f"{SSE_PATH}?collection=posts&token={token()}"))
        self.followers.append(follower)
        await follower.start()
        return follower

    async def until_received(self, more: int) -> None:
        """Wait until every follower has received ``more`` events beyond what it has now."""
        wanted = [(f, f.received + more) for f in self.followers]
        await wait_for(lambda: all(f.received >= n for f, n in wanted), what=f"{more} more events for every client")

    async def finish(self, db: asyncpg.Connection) -> int:
        """Stop the writers, wait for every committed row to reach every follower, and check each one's
        events against the table: each committed row once, nothing else, in commit order, and no event
        the client had to drop as a repeat. Returns the rows committed."""
        self.stop_writing.set()
        commits = sum(await asyncio.gather(*self.writers))
        assert commits >= 5, f"the writers committed only {commits} transactions: the scenario ran without writes"
        rows = await db.fetchval("SELECT count(*) FROM posts")
        await wait_for(lambda: all(f.received >= rows for f in self.followers), timeout=30,
                       what=f"the {rows} rows committed to reach every client")  # fmt: skip
        for follower in self.followers:
            await follower.ledger.verify(db, "posts")
            if isinstance(follower, Follower):
                assert follower.sub is not None and follower.sub.dropped == 0, "a replica sent an event twice"
        return int(rows)

    async def stop(self) -> None:
        self.stop_writing.set()
        try:
            await asyncio.gather(*self.writers, return_exceptions=True)
            for follower in self.followers:
                await follower.close()
        finally:
            await self.haproxy.stop()
            await self.http.close()
        # the processes: the bridge_process fixture kills them


@pytest.fixture
async def replicas(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Replicas]]]:
    """``await replicas(dsns=None)``: three replicas of the test's database (``dsns``: one DSN each) behind
    haproxy, the ``posts`` table published; all of it stopped after the test, whatever happened."""
    await db.execute(POSTS)
    started: list[Replicas] = []

    async def start(dsns: list[str] | None = None) -> Replicas:
        env = Replicas(dsn, bridge_process, tmp_path, dsns or [dsn] * REPLICAS)
        started.append(env)
        await env.start()
        return env

    try:
        yield start
    finally:
        for env in started:
            await env.stop()


async def test_clients_spread_over_the_replicas_all_receive_every_change(
    replicas: Callable[..., Awaitable[Replicas]], db: asyncpg.Connection
) -> None:
    env = await replicas()
    await env.follow(6)
    sse = await env.stream()
    spread = await env.clients()
    assert sorted(spread) == [2, 2, 3], spread  # round robin: seven connections over three replicas
    env.write()
    await env.until_received(50)
    rows = await env.finish(db)
    assert sse.received == rows
    assert all(f.client.connections == 1 for f in env.followers if isinstance(f, Follower))


async def test_a_replica_killed_mid_stream_loses_its_clients_nothing(
    replicas: Callable[..., Awaitable[Replicas]], db: asyncpg.Connection
) -> None:
    env = await replicas()
    followers = await env.follow(6)
    env.write()
    await env.until_received(30)
    victim = 0
    moved = (await env.clients())[victim]
    assert moved == 2
    env.kill(victim)
    await env.haproxy.until(env.names[victim], "DOWN")
    # its clients, and only they, reconnected: to the other two, through HAProxy
    await wait_for(lambda: sum(f.client.connections - 1 for f in followers) == moved, what="its clients to reconnect")
    survivors = [(await env.health(i))[1]["clients"] for i in (1, 2)]
    assert sum(survivors) == len(followers)
    await env.until_received(30)  # each of them, on its new replica
    await env.finish(db)
    assert sum(f.client.connections - 1 for f in followers) == moved
    codes = {d.code for f in followers for d in f.ended}
    assert codes == {1006}, codes  # cut off: no close frame


async def test_a_rolling_restart_under_steady_writes_loses_and_repeats_nothing(
    replicas: Callable[..., Awaitable[Replicas]], db: asyncpg.Connection
) -> None:
    env = await replicas()
    followers = await env.follow(6)
    env.write()
    await env.until_received(20)
    for i in range(REPLICAS):
        await env.restart(i)
        await env.until_received(20)  # the changes go on reaching everyone before the next one stops
    await env.finish(db)
    # every client was on some replica when it stopped, and was told so with 1001, never cut off
    assert all(f.client.connections >= 2 for f in followers), [f.client.connections for f in followers]
    codes = {(d.code, d.reason) for f in followers for d in f.ended}
    assert codes == {(1001, "Server shutting down")}, codes


class CuttableProxy:
    """A proxy in front of PostgreSQL's Unix socket that the test can cut (every connection through it
    ends, and new ones are closed at once) and restore: a replica's network path to the database."""

    def __init__(self, cluster: Cluster) -> None:
        directory = Path(cluster.base_dsn.split("host=")[1].split("&")[0])
        sockets = [s for s in directory.glob(".s.PGSQL.*") if s.suffix != ".lock"]
        assert len(sockets) == 1, sockets
        self.target = str(sockets[0])
        self.directory = tempfile.mkdtemp(prefix="pgb-cut-")  # short: Unix socket paths are limited
        self.path = f"{self.directory}/{sockets[0].name}"
        self.open = True
        self.connections: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    def dsn(self, dsn: str) -> str:
        """``dsn`` (of the cluster), through the proxy."""
        port = self.path.rsplit(".", 1)[1]
        return f"{dsn.split('?', 1)[0]}?host={self.directory}&port={port}"

    async def __aenter__(self) -> CuttableProxy:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        await self.server.wait_closed()
        shutil.rmtree(self.directory, ignore_errors=True)

    def cut(self) -> None:
        self.open = False
        for writer in list(self.connections):
            writer.transport.abort()

    def restore(self) -> None:
        self.open = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.connections -= {writer, up_writer}


async def test_a_replica_cut_off_from_the_database_leaves_the_rotation_and_comes_back(
    replicas: Callable[..., Awaitable[Replicas]], db: asyncpg.Connection, dsn: str, cluster: Cluster
) -> None:
    async with CuttableProxy(cluster) as proxy:
        env = await replicas(dsns=[proxy.dsn(dsn), dsn, dsn])
        assert (await env.health(0))[0] == 200  # through the proxy
        followers = await env.follow(6)
        start = followers[0].sub.last_id if followers[0].sub else None
        assert start is not None  # the position every follower started from: where later ones start too
        env.write()
        await env.until_received(30)
        assert (await env.clients())[0] == 2

        proxy.cut()
        await wait_for(lambda: _status(env, 0, 503), what="the cut replica's /healthz to say 503")
        assert (await env.health(0))[1]["status"] == "unavailable"
        await env.haproxy.until(env.names[0], "DOWN")
        # HAProxy closed its clients' connections: they resumed on the others
        await wait_for(lambda: sum(f.client.connections for f in followers) == 8, what="its clients to move")
        assert (await env.clients())[0] == 0
        later = await env.follow(3, since=start)  # new clients go to the others only
        spread = await env.clients()
        assert spread[0] == 0 and sum(spread) == 9, spread
        await env.until_received(20)

        proxy.restore()
        await wait_for(lambda: _status(env, 0, 200), what="the replica to reconnect to the database")
        await env.haproxy.until(env.names[0], "UP")
        later += await env.follow(3, since=start)
        spread = await env.clients()
        assert spread[0] >= 1, spread  # back in the rotation
        await env.until_received(20)
        await env.finish(db)
        assert all(f.client.connections == 1 for f in later)


async def _status(env: Replicas, i: int, status: int) -> bool:
    return (await env.health(i))[0] == status


async def test_the_ticker_is_taken_over_within_two_seconds_when_it_is_killed(
    replicas: Callable[..., Awaitable[Replicas]], db: asyncpg.Connection
) -> None:
    """One replica ticks at a time (a lease); its /healthz says ``"ticker": true``, the others' false."""
    env = await replicas()
    followers = await env.follow(6)
    env.write()
    await env.until_received(30)
    seen: list[object] = []

    async def one_ticker(among: list[int]) -> bool:
        seen[:] = [(await env.health(i))[1].get("ticker", "missing") for i in among]
        return sorted(seen, key=str) == [False] * (len(among) - 1) + [True]

    try:
        await wait_for(lambda: one_ticker([0, 1, 2]), timeout=10, what="one ticker")
    except AssertionError:
        raise AssertionError(f"expected exactly one replica with ticker true; their /healthz said {seen}") from None
    ticker = seen.index(True)
    others = [i for i in range(REPLICAS) if i != ticker]
    moved = (await env.clients())[ticker]
    env.kill(ticker)
    killed = time.monotonic()
    try:
        await wait_for(lambda: one_ticker(others), timeout=2, what="another ticker")
    except AssertionError:
        raise AssertionError(f"no replica took over within 2 s; their /healthz said {seen}") from None
    print(f"\nticker taken over in {time.monotonic() - killed:.2f} s")
    await wait_for(lambda: sum(f.client.connections - 1 for f in followers) == moved, what="its clients to reconnect")
    await env.until_received(30)
    await env.finish(db)

"""The harness every test shares: one PostgreSQL (per pytest-xdist worker), a fresh database per test (dropped
after), bridges that always stop, and a failure for any exception a background task left unhandled.

Tests are grouped by kind: ``unit/`` (no I/O), ``db/`` (a real PostgreSQL, bridges in process),
``process/`` (``pgbridge`` commands and bridges as processes), ``browser/`` (a real Chromium), and
``bench/`` (the benchmark, with a test that runs its short version).

``PGBRIDGE_TEST_LOOP=uvloop`` runs the tests on uvloop, as production does; ``PYTHONASYNCIODEBUG=1``
turns on asyncio's debug mode (never-awaited coroutines, slow callbacks).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgbridge.migrate import migrate
from tests.helpers import BridgeProcess, Cluster, RunningBridge, free_port, fresh_name, serve_bridge

TEMPLATE = "pgbridge_template"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    if os.environ.get("PGBRIDGE_TEST_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True)
async def _no_unhandled_errors() -> AsyncIterator[None]:
    """Fail the test when the event loop reports an exception nobody handled (a task that died, a
    callback that raised), as asyncpg's test base does."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield
    gc.collect()  # a task that failed unobserved is reported when it is collected
    # What survived a full collection is alive: frozen, the next test's collection looks only at what that test
    # made, instead of at every object of the libraries loaded (some 40 ms a test).
    gc.freeze()
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert not reported, "unhandled in the event loop: " + "; ".join(
        f"{c.get('message')}: {c.get('exception')!r}" for c in reported
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("pg")) / "data")
    yield c
    c.cleanup()


@pytest.fixture(scope="session")
async def template(cluster: Cluster) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(cluster.dsn(TEMPLATE))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return TEMPLATE


@pytest.fixture
async def dsn(cluster: Cluster, template: str) -> AsyncIterator[str]:
    """A fresh database with the pgbridge schema, for one test; dropped after it."""
    name = fresh_name("db")
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await conn.close()
    yield cluster.dsn(name)
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def posts(db: asyncpg.Connection) -> str:
    await db.execute(
        """CREATE TABLE posts (id bigserial PRIMARY KEY, title text NOT NULL, author_id int,
                               status text, secret text, created_at timestamptz DEFAULT now())"""
    )
    await db.execute("SELECT pgbridge.publish('posts', '{secret}')")
    return "posts"


class Bridges:
    """Starts bridges in this process for one test, with settings overridden; all stopped after it."""

    def __init__(self) -> None:
        self.running: list[RunningBridge] = []

    async def __call__(self, dsn: str, *, wait: bool = True, **overrides: Any) -> RunningBridge:
        bridge = await serve_bridge(dsn, wait=wait, **overrides)
        self.running.append(bridge)
        return bridge

    async def stop_all(self) -> None:
        for bridge in reversed(self.running):
            await bridge.stop()  # stopping one twice is harmless


@pytest.fixture
async def start_bridge() -> AsyncIterator[Bridges]:
    """``await start_bridge(dsn, **overrides)``: a bridge in this process, stopped after the test."""
    bridges = Bridges()
    yield bridges
    await bridges.stop_all()


@pytest.fixture
async def bridge(dsn: str, posts: str, start_bridge: Bridges) -> RunningBridge:
    return await start_bridge(dsn)


class Processes:
    """Starts ``pgbridge serve`` processes for one test; all killed after it (their output is kept)."""

    def __init__(self) -> None:
        self.started: list[BridgeProcess] = []

    def __call__(self, dsn: str, port: int | None = None, **options: Any) -> BridgeProcess:
        process = BridgeProcess(dsn, free_port() if port is None else port, **options)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                process.proc.kill()
            process.proc.wait()
            if process.proc.stdout is not None:
                process.proc.stdout.close()


@pytest.fixture
def bridge_process() -> Iterator[Processes]:
    """``bridge_process(dsn, port=None, env=..., preexec=...)``: a ``pgbridge serve`` process, killed
    after the test."""
    processes = Processes()
    yield processes
    processes.stop_all()


@pytest.fixture
def sync_dsn(cluster: Cluster) -> Iterator[str]:
    """A fresh database for a test that runs its own event loop (such as a hypothesis test)."""
    name = fresh_name("db")

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    yield cluster.dsn(name)
    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from pgbridge.migrate import migrate
from tests.helpers import Cluster, RunningBridge, fresh_name, start_bridge

TEMPLATE = "pgbridge_template"


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
async def dsn(cluster: Cluster, template: str) -> str:
    """A fresh database with the pgbridge schema, for one test."""
    name = fresh_name("db")
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await conn.close()
    return cluster.dsn(name)


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


@pytest.fixture
async def bridge(dsn: str, posts: str) -> AsyncIterator[RunningBridge]:
    running = await start_bridge(dsn)
    yield running
    await running.stop()


@pytest.fixture
def sync_dsn(cluster: Cluster) -> str:
    """A fresh database for a test that runs its own event loop (such as a hypothesis test)."""
    import asyncio

    name = fresh_name("db")

    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return cluster.dsn(name)

"""The schema and the code that must agree with it: constants written on both sides, quiet publishing."""

from __future__ import annotations

import re
import subprocess

import asyncpg

from pgbridge import changelog
from pgbridge.events import CHUNK_BYTES, CHUNK_ROWS
from tests.helpers import Cluster


async def _source(db: asyncpg.Connection, function: str) -> str:
    source: str = await db.fetchval("SELECT pg_get_functiondef($1::regprocedure)", function)
    return source


def _constant(source: str, name: str) -> str:
    found = re.findall(rf"\b{name}\s+CONSTANT\s+[a-z ]+:=\s*([0-9.]+);", source)
    assert len(found) == 1, (name, found)
    return found[0]


async def test_the_constants_sql_and_python_share_are_equal(db: asyncpg.Connection) -> None:
    capture = await _source(db, "pgbridge.capture_v3()")
    assert int(_constant(capture, "pgb_max_rows")) == CHUNK_ROWS
    assert int(_constant(capture, "pgb_max_bytes")) == CHUNK_BYTES
    assert float(_constant(capture, "pgb_wake_below")) == changelog.WAKE_BELOW
    announce = await _source(db, "pgbridge.announce_v3(text)")
    assert float(_constant(announce, "pgb_wake_below")) == changelog.WAKE_BELOW
    assert await db.fetchval("SELECT pgbridge.log_format()") == changelog.LOG_FORMAT
    assert await db.fetchval("SELECT max(version) FROM pgbridge.migrations") >= changelog.SCHEMA_VERSION
    assert set(await changelog.channels(db)) == {"wake", "publications"}  # what the listener LISTENs to
    triggers = await db.fetchval("SELECT pg_get_functiondef('pgbridge.attach_v3(regclass)'::regprocedure)")
    assert sorted(re.findall(r"CREATE TRIGGER (pgbridge_capture_\w+)", triggers)) == sorted(changelog.CAPTURE_TRIGGERS)


async def test_publishing_in_psql_prints_nothing_unless_something_is_wrong(
    cluster: Cluster, dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE quiet (id int, secret text)")

    def psql(sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cluster.psql, dsn, "-X", "-q", "-c", sql], capture_output=True, text=True, timeout=60)

    done = psql("SELECT pgbridge.publish('quiet', exclude => '{secret}')")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr  # no NOTICE that a trigger did not exist
    done = psql("SELECT pgbridge.unpublish('quiet'); SELECT pgbridge.publish('quiet')")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    done = psql("SELECT pgbridge.publish('quiet')")
    assert done.returncode == 1 and "ERROR:  table public.quiet is already published" in done.stderr

"""The database side (migrations, publish/unpublish) and the pgbridge command."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import jwt
import pytest

from pgbridge import changelog
from pgbridge.migrate import migrate, migrations
from tests.helpers import SECRET, Cluster, fresh_name, psql

if TYPE_CHECKING:
    from tests.conftest import Processes

ROOT = Path(__file__).resolve().parents[2]


def pgbridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgbridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PGBRIDGE_")}, **(env or {})},
    )


@pytest.fixture
async def empty_dsn(cluster: Cluster) -> str:
    name = fresh_name("empty")
    conn = await asyncpg.connect(cluster.dsn())
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    return cluster.dsn(name)


async def test_migrations_apply_by_hand_again_but_never_downgrade(cluster: Cluster, empty_dsn: str) -> None:
    files = [ROOT / "sql" / (m.name + ".sql") for m in migrations()]
    for path in files:
        psql(cluster, empty_dsn, f"\\i {path}")
    psql(cluster, empty_dsn, f"\\i {files[-1]}")  # the newest again: a no-op
    conn = await asyncpg.connect(empty_dsn)
    try:
        before = await conn.fetchval("SELECT md5(string_agg(prosrc, '' ORDER BY proname)) FROM pg_proc "
                                     "WHERE pronamespace = 'pgbridge'::regnamespace")  # fmt: skip
        for older in files[:-1]:
            with pytest.raises(AssertionError, match=f"schema version {len(files)} is installed; "):
                psql(cluster, empty_dsn, f"\\i {older}")
        after = await conn.fetchval("SELECT md5(string_agg(prosrc, '' ORDER BY proname)) FROM pg_proc "
                                    "WHERE pronamespace = 'pgbridge'::regnamespace")  # fmt: skip
        assert before == after  # no function was put back
        assert [r["name"] for r in await conn.fetch("SELECT name FROM pgbridge.migrations ORDER BY version")] == [
            m.name for m in migrations()
        ]
        assert await migrate(conn) == []  # what psql applied counts
    finally:
        await conn.close()


async def test_migrate_command_applies_once(empty_dsn: str) -> None:
    first = pgbridge("migrate", "--dsn", empty_dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied: " + ", ".join(m.name for m in migrations())
    again = pgbridge("migrate", env={"DATABASE_URL": empty_dsn})
    assert (again.returncode, again.stdout.strip()) == (0, "up to date")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT pgbridge.publish('nope')", 'relation "nope" does not exist'),
        ("SELECT pgbridge.publish('t'); SELECT pgbridge.publish('t')", "table public.t is already published"),
        ("SELECT pgbridge.publish('t', '{nope,id}')", "table public.t has no column(s) nope"),
        ("SELECT pgbridge.publish('v')", "cannot publish public.v: only tables can be published"),
        ("SELECT pgbridge.unpublish('t')", "table public.t is not published"),
        ("SELECT pgbridge.publish('t'); SELECT pgbridge.publish('other.t')", 'collection "t" is already used'),
        ("SELECT pgbridge.publish('t', collection => 'has space')", 'invalid collection name "has space"'),
    ],
)
async def test_publishing_mistakes_are_clear_errors(db: asyncpg.Connection, sql: str, message: str) -> None:
    await db.execute("CREATE TABLE t (id int); CREATE VIEW v AS SELECT 1; CREATE SCHEMA other; CREATE TABLE other.t ()")
    with pytest.raises(asyncpg.PostgresError) as error:
        await db.execute(sql)
    assert message in str(error.value)


async def test_unpublish_stops_capture(db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE t (id int); SELECT pgbridge.publish('t')")
    await db.execute("INSERT INTO t VALUES (1)")
    assert await db.fetchval("SELECT pgbridge.unpublish('t')") == "t"
    await db.execute("INSERT INTO t VALUES (2)")
    assert await db.fetchval("SELECT count(*) FROM pgbridge.changes") == 1
    assert await db.fetchval("SELECT count(*) FROM pgbridge.publications") == 0


async def test_a_write_never_fails_because_of_pgbridge(db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE t (id int, body text); SELECT pgbridge.publish('t')")
    await db.execute("INSERT INTO t SELECT g, repeat('y', 9000) FROM generate_series(1, 300) g")  # 2.7 MB
    await db.execute("UPDATE t SET body = body || 'z'")
    await db.execute("DELETE FROM t")
    counts = await db.fetch("SELECT op, sum(nrows) AS n FROM pgbridge.changes GROUP BY op ORDER BY op")
    assert [(r["op"], r["n"]) for r in counts] == [("create", 300), ("delete", 300), ("update", 300)]


# async, as every test of an async fixture (dsn) must be: a sync one gets another session loop, without the template
async def test_publish_command_names_a_missing_table(dsn: str) -> None:
    done = pgbridge("publish", "--dsn", dsn, "secrets", "--exclude", "password")
    assert done.returncode == 1 and 'relation "secrets" does not exist' in done.stderr


async def test_publish_commands_against_a_table(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE accounts (id int, password text)")
    done = pgbridge("publish", "--dsn", dsn, "accounts", "--exclude", "password")
    assert done.returncode == 0, done.stderr
    assert await db.fetchval("SELECT excluded FROM pgbridge.publications") == ["password"]
    done = pgbridge("unpublish", "--dsn", dsn, "accounts")
    assert (done.returncode, done.stdout.strip()) == (0, "unpublished accounts (collection 'accounts')")


def test_serve_refuses_to_start_without_a_secret() -> None:
    done = pgbridge("serve", "--dsn", "postgresql://nowhere/x")
    assert done.returncode == 2
    assert "no JWT secret" in done.stderr and "PGBRIDGE_JWT_SECRET" in done.stderr


def test_token_command_mints_a_token_the_server_accepts() -> None:
    done = pgbridge("token", "--sub", "alice", "--ttl", "60", "--collections", "posts,notes", "--claim", "account_id=7",
                    env={"PGBRIDGE_JWT_SECRET": SECRET})  # fmt: skip
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["collections"] == ["posts", "notes"] and claims["account_id"] == 7
    assert 55 <= claims["exp"] - claims["iat"] <= 60
    missing = pgbridge("token", "--sub", "alice")
    assert missing.returncode == 2 and "no JWT secret" in missing.stderr


def test_settings_come_from_flags_then_environment() -> None:
    bad = pgbridge("serve", "--jwt-secret", SECRET, env={"PGBRIDGE_PORT": "eighty"})
    assert bad.returncode == 2 and "PGBRIDGE_PORT='eighty' is not a valid int" in bad.stderr


@pytest.mark.parametrize("secret", [" ", "s", "x" * 31, " " * 32, "x" * 31 + " " * 8, "\t" * 40 + "x"])
def test_short_secrets_are_refused(secret: str) -> None:
    done = pgbridge("serve", "--dsn", "postgresql://nowhere/x", env={"PGBRIDGE_JWT_SECRET": secret})
    assert done.returncode == 2 and "the JWT secret is too short: HS256 needs at least 32 bytes" in done.stderr


async def test_migrate_waits_for_its_lock_and_names_who_holds_it(empty_dsn: str) -> None:
    holder = await asyncpg.connect(empty_dsn, server_settings={"application_name": "the-blocker"})
    try:
        await holder.execute("SELECT pg_advisory_lock(7316021946250125311)")  # any role can take it
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        started = time.monotonic()
        done = await asyncio.to_thread(pgbridge, "migrate", "--dsn", empty_dsn, "--lock-timeout", "1")
        waited = time.monotonic() - started
        assert done.returncode == 2, done.stderr
        assert f"waiting up to 1s for pgbridge's migration lock, held by pid {pid} (role postgres, " in done.stderr
        assert "application the-blocker, idle since " in done.stderr
        assert f"another session holds pgbridge's migration lock: pid {pid}" in done.stderr
        assert "SELECT pg_terminate_backend(pid)" in done.stderr and 1 <= waited < 10
        await holder.execute("SELECT pg_advisory_unlock(7316021946250125311)")
        assert (await asyncio.to_thread(pgbridge, "migrate", "--dsn", empty_dsn)).returncode == 0
    finally:
        await holder.close()


def test_a_relay_port_in_use_is_refused_saying_which_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = pgbridge("serve", "--jwt-secret", SECRET, "--port", str(free_port()), "--relay-port", str(port))
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} for the relay to other bridges" in done.stderr
    assert "(choose another --relay-port, or 0 for any free one)" in done.stderr
    workers = pgbridge("serve", "--jwt-secret", SECRET, "--workers", "2", "--relay-port", str(port))
    assert workers.returncode == 2 and "each worker relays on a port of its own" in workers.stderr
    follower = pgbridge("serve", "--jwt-secret", SECRET, "--follow-only", "true", "--relay-port", str(port))
    assert follower.returncode == 2 and "a bridge that never ticks relays nothing" in follower.stderr


def test_the_secret_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    done = pgbridge("serve", "--jwt-secret-file", str(secret), "--port", "1", "--host", "256.0.0.0")
    assert done.returncode == 2 and "cannot listen on 256.0.0.0:" in done.stderr  # the secret itself was accepted
    both = pgbridge("serve", "--jwt-secret-file", str(secret), "--jwt-secret", SECRET)
    assert both.returncode == 2 and "not both" in both.stderr
    gone = pgbridge("serve", "--jwt-secret-file", str(tmp_path / "nope"))
    assert gone.returncode == 2 and f"cannot read the JWT secret file {tmp_path / 'nope'}" in gone.stderr


def test_a_built_wheel_carries_the_migrations_and_the_inspector(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("pgbridge-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        carried = {name for name in whl.namelist() if name.startswith("pgbridge/sql/")}
    assert {"pgbridge/sql/schema.sql", "pgbridge/sql/001_change_log.sql"} <= carried, carried
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import pgbridge.migrate as m; print(m.__file__, [x.name for x in m.migrations()]); "
         "import hashlib; print(hashlib.sha256(m.schema().encode()).hexdigest()); "
         "from importlib import resources; print(len(resources.files('pgbridge').joinpath('static', "
         "'inspector.js').read_bytes()))"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    where, schema, inspector = probe.stdout.splitlines()
    numbered = sorted(path.stem for path in (ROOT / "sql").glob("[0-9][0-9][0-9]_*.sql"))
    assert where.startswith(str(target)) and where.endswith(str(numbered))  # and schema.sql is not a migration
    assert schema == hashlib.sha256((ROOT / "sql" / "schema.sql").read_bytes()).hexdigest()
    assert int(inspector) > 1000


async def test_partitioned_tables_publish_on_the_root(db: asyncpg.Connection) -> None:
    await db.execute(
        """CREATE TABLE m (id int, region text) PARTITION BY LIST (region);
           CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
           CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
           SELECT pgbridge.publish('m');
           INSERT INTO m VALUES (1, 'eu'), (2, 'us');
           UPDATE m SET region = 'us' WHERE id = 1;"""
    )
    rows = await db.fetch("SELECT op, body FROM pgbridge.changes ORDER BY id")
    assert [(r["op"], r["body"]) for r in rows] == [
        ("create", '{"id": 1, "region": "eu"}\n{"id": 2, "region": "us"}'),
        ("update", '{"id": 1, "region": "us"}\n{"id": 1, "region": "eu"}'),  # moved partition: still one update
    ]


def test_serve_says_when_it_cannot_listen_or_read_its_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = pgbridge("serve", "--jwt-secret", SECRET, "--port", str(port), "--dsn", "postgresql://x@127.0.0.1:1/x")
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}:" in done.stderr and "address already in use" in done.stderr
    missing = tmp_path / "nope.pem"
    done = pgbridge("serve", "--jwt-public-key", str(missing), "--dsn", "postgresql://x@127.0.0.1:1/x")
    assert done.returncode == 2
    assert f"cannot read the JWT public key {missing}: No such file or directory" in done.stderr


PREVIOUS_RELEASE = "6ef11ac"  # pgbridge 0.1.0: schema 001, positions from a commit-order lock


def _previous_release(tmp_path: Path) -> Path:
    """The previous release's source, from this repository's history."""
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], check=False)
    if found.returncode != 0:
        pytest.skip(f"release {PREVIOUS_RELEASE} is not in this clone's history (a shallow clone?)")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "pgbridge"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    return tmp_path


async def test_the_previous_release_refuses_the_new_schema_clearly(dsn: str, tmp_path: Path) -> None:
    import aiohttp

    old = _previous_release(tmp_path)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(old), "DATABASE_URL": dsn, "PGBRIDGE_JWT_SECRET": SECRET,
           "PGBRIDGE_PORT": str(port)}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgbridge", "serve", env=env, cwd=old, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        body: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        body = await resp.json()
                        if resp.status == 503 and "schema" in str(body.get("database")):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        assert "pgbridge schema version 2, which pgbridge 0.1 cannot read" in body["database"], body
    finally:
        proc.terminate()
        output = (await proc.communicate())[0].decode()
    assert "Upgrade the bridge" in output or "cannot read" in output


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_refuses_a_schema_it_cannot_read(cluster: Cluster, empty_dsn: str) -> None:
    psql(cluster, empty_dsn, f"\\i {ROOT / 'sql' / '001_change_log.sql'}")  # what the previous release installed
    older = pgbridge("serve", "--dsn", empty_dsn, "--jwt-secret", SECRET)
    assert older.returncode == 2
    assert (
        f"schema version 1, older than this bridge needs ({changelog.SCHEMA_VERSION}): run `pgbridge migrate`"
        in older.stderr
    )
    assert pgbridge("migrate", "--dsn", empty_dsn).returncode == 0
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(
            """INSERT INTO pgbridge.migrations SELECT max(version) + 1, 'from_the_future' FROM pgbridge.migrations;
               CREATE OR REPLACE FUNCTION pgbridge.log_format() RETURNS integer LANGUAGE sql AS 'SELECT 3'"""
        )
    finally:
        await conn.close()
    newer = pgbridge("serve", "--dsn", empty_dsn, "--jwt-secret", SECRET)
    assert newer.returncode == 2
    assert "whose change log (format 3) this bridge cannot read (format 2): upgrade pgbridge" in newer.stderr


async def test_a_failing_migration_reports_its_own_error(cluster: Cluster, empty_dsn: str) -> None:
    psql(cluster, empty_dsn, f"\\i {ROOT / 'sql' / '001_change_log.sql'}")
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("CREATE TABLE pgbridge.ticks (unrelated int)")  # 002 will not be able to use it
    finally:
        await conn.close()
    done = pgbridge("migrate", "--dsn", empty_dsn)
    assert done.returncode == 2
    assert "002_ticks failed:" in done.stderr and "does not exist" in done.stderr
    assert "current transaction is aborted" not in done.stderr


def test_token_takes_its_secret_from_a_file_like_serve(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    done = pgbridge("token", "--sub", "ann", env={"PGBRIDGE_JWT_SECRET_FILE": str(secret), "PGBRIDGE_TTL": "60"})
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "ann" and claims["exp"] - claims["iat"] == 60


async def test_status_shows_publications_the_log_and_the_bridge(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "CREATE TABLE users (id int, pw text); SELECT pgbridge.publish('users', '{pw}');"
        "CREATE TABLE hits (id int); SELECT pgbridge.publish('hits', wake => false);"
    )
    await db.execute("INSERT INTO users VALUES (1, 'x')")
    await db.execute("SELECT pgbridge.tick_v3()")
    done = await asyncio.to_thread(pgbridge, "status", "--dsn", dsn, "--url", "http://127.0.0.1:1")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"schema version {changelog.SCHEMA_VERSION}" in out and "published tables: 2" in out
    assert "users: public.users, hides pw" in out and "hits: public.hits, polled (wake => false)" in out
    assert "change log: 1 transactions" in out
    assert "bridge at http://127.0.0.1:1: not answering" in out


async def test_json_logs_name_the_client_and_the_close_code(
    dsn: str, db: asyncpg.Connection, bridge_process: Processes
) -> None:
    import json

    import aiohttp
    import websockets

    from tests.db.test_recovery import POSTS
    from tests.helpers import subscribe, token, wait_for

    await db.execute(POSTS)
    bridge = bridge_process(dsn, env={"PGBRIDGE_LOG_FORMAT": "json", "PGBRIDGE_LOG_LEVEL": "DEBUG"})
    await bridge.ready()
    async with websockets.connect(bridge.url(token())) as ws:
        await subscribe(ws, "posts")

    async def no_clients() -> bool:  # the bridge has ended the session, and logged it
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{bridge.port}/healthz") as resp:
            return bool((await resp.json())["clients"] == 0)

    await wait_for(no_clients, what="the bridge to see the client go")
    bridge.proc.terminate()
    output = (await asyncio.to_thread(bridge.proc.communicate))[0].decode()
    entries = [json.loads(line) for line in output.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    gone = [e for e in entries if "disconnected" in e["message"]]
    assert gone and gone[0]["client"].startswith("c") and gone[0]["peer"] == "127.0.0.1" and gone[0]["code"] == 1000

"""Capture never gets in a writer's way, whatever the table, and hides what it was told to, by identity."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbridge import changelog, cli
from pgbridge.events import MAX_ID, Change
from tests.helpers import RunningBridge, assert_silent, collect, fresh_name, recv, subscribe, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges

ROOT = Path(__file__).resolve().parents[2]

# Every identifier the SQL of sql/ uses (variables, parameters, aliases, columns, keywords): as column names
# of a published table, none may change what capture does.
SQL_TEXT = "".join(p.read_text() for p in (ROOT / "sql").glob("*.sql"))
SQL_NAMES = sorted(set(re.findall(r"\b[a-z_][a-z0-9_]*\b", SQL_TEXT)))
# the variables declared in plpgsql bodies, which a column name could shadow: drawn more often
VARIABLES = sorted(
    {
        name
        for block in re.findall(r"DECLARE\n(.*?)\nBEGIN", SQL_TEXT, re.S)
        for name in re.findall(r"^ +(\w+) ", block, re.M)
    }
)
ODD_NAMES = ["t", "excl", "select", "Order", "user", "with space", "dot.ted", 'quo"te', "it's", "ünïcødé", "🐘",
             "TG_OP", "new", "old", "row", "*", "-", "1st", "pgbridge_new", "pgbridge_old", "x" * 63]  # fmt: skip

# (type, a few SQL literals of it); NULL is always a candidate too
TYPES: dict[str, list[str]] = {
    "int": ["0", "-7", "2147483647"],
    "text": ["''", "'a\"b\\c'", "E'line\\nbreak'", "'☃ snow'"],
    "numeric": ["123456789012345678901234567890.123456789", "-0.5", "'NaN'"],
    "double precision": ["1.5e300", "'Infinity'", "-0.0"],
    "boolean": ["true", "false"],
    "bytea": ["'\\xdeadbeef'::bytea", "''::bytea"],
    "jsonb": ['\'{"k": [1, null, {"z": true}]}\'', "'\"just a string\"'", "'[]'"],
    "json": ['\'{"b": 1,   "a": 2}\''],
    "int[]": ["'{1,2,NULL}'", "'{}'"],
    "text[][]": ["'{{a,b},{c,d}}'"],
    "timestamptz": ["'2026-01-17 12:34:56.789+05:30'", "'infinity'"],
    "timestamp": ["'2026-01-17 12:34:56.789'", "'-infinity'"],
    "date": ["'2026-01-17'"],
    "time": ["'23:59:59.999999'"],
    "interval": ["'1 year 2 mons 3 days 04:05:06.789'", "'-1 day'"],
    "money": ["12.34", "-1"],
    "int4range": ["'[1,10)'", "'empty'"],
    "tstzrange": ["'[2026-01-01,2026-02-01)'"],
    "uuid": ["'550e8400-e29b-41d4-a716-446655440000'"],
    "inet": ["'192.168.0.1/24'"],
    "mood": ["'sad'", "'happy'"],
    "positive": ["1", "42"],
    "pair": ["ROW(1, 'x')::pair", "ROW(NULL, NULL)::pair"],
}
TYPE_SETUP = """CREATE TYPE mood AS ENUM ('sad', 'happy');
                CREATE DOMAIN positive AS int CHECK (VALUE > 0);
                CREATE TYPE pair AS (n int, s text);"""


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@st.composite
def tables(draw: st.DrawFn) -> dict[str, Any]:
    name = st.one_of(st.sampled_from(VARIABLES), st.sampled_from(SQL_NAMES), st.sampled_from(ODD_NAMES))
    names = draw(st.lists(name, min_size=1, max_size=6, unique=True))
    columns = {name: draw(st.sampled_from(sorted(TYPES))) for name in names}
    rows = draw(
        st.lists(
            st.fixed_dictionaries({n: st.sampled_from(["NULL", *TYPES[t]]) for n, t in columns.items()}),
            min_size=1,
            max_size=4,
        )
    )
    hidden = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    return {"columns": columns, "rows": rows, "hidden": hidden, "generated": draw(st.booleans())}


class Database:
    """A connection with an event loop of its own, for hypothesis's synchronous tests."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(dsn))
        self.run(self.conn.execute(TYPE_SETUP))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


async def read_all(conn: asyncpg.Connection, after: tuple[int, int]) -> tuple[list[Change], tuple[int, int]]:
    """Tick, then read everything the bridge would read after ``after``."""
    upto = (await changelog.tick(conn)).n
    found: list[Change] = []
    while True:
        changes, reached = await changelog.read(conn, after, upto)
        found += changes
        if reached == after:
            return found, after
        after = reached


async def check_table(conn: asyncpg.Connection, spec: dict[str, Any], after: tuple[int, int]) -> tuple[int, int]:
    columns, hidden = spec["columns"], set(spec["hidden"])
    ddl = ", ".join(f"{quote(n)} {t}" for n, t in columns.items())
    if spec["generated"]:
        ddl += ', "pgb gen" int GENERATED ALWAYS AS (42) STORED'
    await conn.execute(f"DROP TABLE IF EXISTS odd; CREATE TABLE odd ({ddl})")
    await conn.execute("SELECT pgbridge.publish('odd', $1::text[])", sorted(hidden))

    async def rendered() -> list[dict[str, Any]]:
        return [orjson.loads(r[0]) for r in await conn.fetch("SELECT to_jsonb(o.*)::text FROM odd o")]

    def shown(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in hidden}

    names = ", ".join(quote(n) for n in columns)
    values = ", ".join("(" + ", ".join(row[n] for n in columns) + ")" for row in spec["rows"])
    await conn.execute(f"INSERT INTO odd ({names}) VALUES {values}")
    inserted = await rendered()
    first = next(iter(columns))
    await conn.execute(f"UPDATE odd SET {quote(first)} = {quote(first)}")  # every row, nothing changed: delivered
    await conn.execute("DELETE FROM odd")
    changes, after = await read_all(conn, after)
    got = [(c.kind, [orjson.loads(r) for r in c.rows], [orjson.loads(r) for r in c.olds or ()]) for c in changes]
    expected = [
        ("create", [shown(r) for r in inserted], []),
        ("update", [shown(r) for r in inserted], [shown(r) for r in inserted]),
        ("delete", [shown(r) for r in inserted], []),
    ]
    assert got == expected, spec
    await conn.execute("SELECT pgbridge.unpublish('odd')")
    return after


def test_any_column_names_and_types_are_captured_exactly(sync_dsn: str, cluster: Any) -> None:
    database = Database(sync_dsn)
    database.run(_migrate(database.conn))
    position: list[tuple[int, int]] = [(0, MAX_ID)]

    @settings(
        max_examples=int(os.environ.get("PGBRIDGE_CAPTURE_EXAMPLES", "60")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(tables())
    def captured(spec: dict[str, Any]) -> None:
        position[0] = database.run(check_table(database.conn, spec, position[0]))

    try:
        captured()
    finally:
        database.close()


async def _migrate(conn: asyncpg.Connection) -> None:
    from pgbridge.migrate import migrate

    await migrate(conn)


async def test_a_table_of_hostile_names_arrives_through_the_bridge(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    await db.execute(TYPE_SETUP)
    await db.execute(
        """CREATE TABLE evil (t int, excl text, pgb_pub int, "pgbridge_new" int, "select" text, "with space" mood,
                              "dot.ted" numeric, secret text, g int GENERATED ALWAYS AS (t * 2) STORED);
           SELECT pgbridge.publish('evil', '{secret}')"""
    )
    await wait_for(lambda: "evil" in (bridge.bridge.publications or ()), what="the bridge to learn of evil")
    async with bridge.connect() as ws:
        await subscribe(ws, "evil")
        await db.execute(
            """INSERT INTO evil VALUES (1, 'a', 2, 3, 's', 'happy', 123456789012345678901234567890.1, 'hidden'),
                                       (2, 'b', 4, 5, 'z', 'sad', -1, 'hidden');
               UPDATE evil SET excl = excl || '!';
               DELETE FROM evil WHERE t = 1"""
        )
        created, created2, updated, updated2, deleted = await collect(ws, 5)
    assert created["data"] == {"t": 1, "excl": "a", "pgb_pub": 2, "pgbridge_new": 3, "select": "s",
                               "with space": "happy", "dot.ted": 123456789012345678901234567890.1, "g": 2}  # fmt: skip
    assert (updated["data"]["excl"], updated["old"]["excl"]) == ("a!", "a")
    assert deleted["type"] == "evil.delete" and deleted["data"]["t"] == 1
    assert all("secret" not in e["data"] for e in (created, created2, updated, updated2, deleted))


async def test_hidden_columns_stay_hidden_when_renamed_dropped_or_added_again(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    await db.execute("CREATE TABLE users (id int, name text, password_hash text)")
    await db.execute("SELECT pgbridge.publish('users', '{password_hash}')")
    await wait_for(lambda: "users" in (bridge.bridge.publications or ()), what="the bridge to learn of users")
    async with bridge.connect() as ws:
        await subscribe(ws, "users")
        await db.execute("INSERT INTO users VALUES (1, 'ann', 'h1')")
        assert (await recv(ws))["data"] == {"id": 1, "name": "ann"}
        await db.execute("ALTER TABLE users RENAME COLUMN password_hash TO pw_hash")
        await db.execute("INSERT INTO users VALUES (2, 'bob', 'h2')")
        assert (await recv(ws))["data"] == {"id": 2, "name": "bob"}
        await db.execute("UPDATE users SET pw_hash = 'h3' WHERE id = 1")  # only a hidden column changed
        await db.execute("UPDATE users SET name = 'Ann' WHERE id = 1")
        update = await recv(ws)
        assert (update["data"], update["old"]) == ({"id": 1, "name": "Ann"}, {"id": 1, "name": "ann"})
        await db.execute("ALTER TABLE users DROP COLUMN pw_hash, ADD COLUMN password_hash text")
        await db.execute("INSERT INTO users VALUES (3, 'cy', 'h4')")  # the old name, a new column: still hidden
        assert (await recv(ws))["data"] == {"id": 3, "name": "cy"}
        await assert_silent(ws, 0.3)
    bodies = " ".join(r["body"] for r in await db.fetch("SELECT body FROM pgbridge.changes"))
    assert "h1" not in bodies and "h2" not in bodies and "h3" not in bodies and "h4" not in bodies


async def test_truncate_asks_for_a_resync_live_and_in_a_replay(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as ws, bridge.connect() as filtered:
        await subscribe(ws, "posts")
        await subscribe(filtered, "posts", filter={"author_id": 7}, operations=["delete"])
        await db.execute("INSERT INTO posts (title) VALUES ('before')")
        before = await recv(ws)
        await db.execute("TRUNCATE posts")
        truncated = await recv(ws)
        assert truncated["type"] == "resync_required" and truncated["collection"] == "posts"
        assert await recv(filtered) == truncated  # whatever the filter: that view of the data is gone too
        await db.execute("INSERT INTO posts (title) VALUES ('after')")
        assert (await recv(ws))["data"]["title"] == "after"
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", since=before["id"])
        assert await recv(ws) == truncated
        assert (await recv(ws))["data"]["title"] == "after"
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", since=truncated["id"])  # resuming after the truncate
        assert (await recv(ws))["data"]["title"] == "after"
        await assert_silent(ws, 0.3)


async def test_dropping_a_published_table_unpublishes_it(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE notes (id int); SELECT pgbridge.publish('notes')")
    oid = await db.fetchval("SELECT 'notes'::regclass::oid")
    await db.execute("DROP TABLE notes")
    assert await db.fetchval("SELECT count(*) FROM pgbridge.publications WHERE collection = 'notes'") == 0
    await db.execute("CREATE TABLE notes2 (id int); SELECT pgbridge.publish('notes2', collection => 'notes')")
    with pytest.raises(asyncpg.PostgresError, match=f"table {oid} is not published"):
        await db.execute(f"SELECT pgbridge.unpublish({oid})")
    await wait_for(lambda: "notes" in (bridge.bridge.publications or ()), what="the bridge to learn of notes")
    async with bridge.connect() as ws:
        await subscribe(ws, "notes")
        await db.execute("INSERT INTO notes2 VALUES (1)")
        assert (await recv(ws))["data"] == {"id": 1}


async def test_a_table_dropped_without_the_event_trigger_frees_its_collection(db: asyncpg.Connection) -> None:
    await db.execute("ALTER EVENT TRIGGER pgbridge_forget_dropped DISABLE")
    await db.execute("CREATE TABLE gone (id int); SELECT pgbridge.publish('gone')")
    oid = await db.fetchval("SELECT 'gone'::regclass::oid")
    await db.execute("DROP TABLE gone")
    assert await db.fetchval(f"SELECT pgbridge.unpublish({oid})") == "gone"  # by its number: no error
    await db.execute("CREATE TABLE gone2 (id int); SELECT pgbridge.publish('gone2')")
    await db.execute("DROP TABLE gone2")
    await db.execute("CREATE TABLE again (id int); SELECT pgbridge.publish('again', collection => 'gone2')")
    assert await changelog.publications(db) == {"gone2"}


async def test_pgbridge_tables_cannot_be_published(db: asyncpg.Connection) -> None:
    for table in ("pgbridge.changes", "pgbridge.ticks", "pgbridge.publications"):
        with pytest.raises(asyncpg.PostgresError, match="pgbridge's own tables are not published"):
            await db.execute(f"SELECT pgbridge.publish('{table}', collection => 'x')")


async def test_tables_published_without_wake_ups_are_polled(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute("CREATE TABLE quiet (id int); SELECT pgbridge.publish('quiet', wake => false)")
    heard: list[str] = []
    await db.add_listener((await changelog.channels(db))["wake"], lambda *args: heard.append(args[3]))
    running = await start_bridge(dsn, poll_interval=0.02)
    async with running.connect() as ws:
        await subscribe(ws, "quiet")
        await db.execute("INSERT INTO quiet SELECT generate_series(1, 3)")
        assert [e["data"]["id"] for e in await collect(ws, 3)] == [1, 2, 3]
        await assert_silent(ws, 0.5)
    assert heard == []  # the writer sent no NOTIFY, so it took no database-wide lock


async def test_capture_a_table_owner_switches_off_is_reported(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """A table's owner may disable or drop its capture triggers; pgbridge cannot stop that, but says so:
    in `pgbridge status`, /healthz (degraded, naming no collection) and /metrics."""
    role = fresh_name("owner")  # roles are the cluster's: one name per test
    await db.execute(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}")
    owner = await asyncpg.connect(dsn.replace("postgres:@", f"{role}:@"))
    try:
        await owner.execute("CREATE TABLE docs (id int); CREATE TABLE notes (id int)")
        await db.execute("SELECT pgbridge.publish('docs'), pgbridge.publish('notes')")
        running = await start_bridge(dsn, stats_interval=0.05)
        health = f"http://127.0.0.1:{running.port}/healthz"

        async def state() -> tuple[str, Any, str]:
            async with aiohttp.ClientSession() as http:
                async with http.get(health) as resp:
                    body = await resp.json()
                async with http.get(f"http://127.0.0.1:{running.port}/metrics") as resp:
                    metrics = await resp.text()
            return body["status"], body.get("publications_not_captured"), metrics

        await wait_for(lambda: running.bridge.stats is not None, what="the first maintenance round")
        status, uncaptured, metrics = await state()
        assert (status, uncaptured) == ("ok", None) and 'pgbridge_capture_broken{collection="docs"} 0' in metrics
        await owner.execute("ALTER TABLE docs DISABLE TRIGGER pgbridge_capture_insert")
        await wait_for(lambda: "docs" in running.bridge.capture_problems, what="the disabled trigger to be seen")
        status, uncaptured, metrics = await state()
        assert (status, uncaptured) == ("degraded", 1)
        assert 'pgbridge_capture_broken{collection="docs"} 1' in metrics
        assert 'pgbridge_capture_broken{collection="notes"} 0' in metrics
        await owner.execute("DROP TRIGGER pgbridge_capture_delete ON docs; ALTER TABLE notes DISABLE TRIGGER ALL")
        await wait_for(lambda: len(running.bridge.capture_problems) == 2, what="both tables to be reported")
        report = await cli._status(dsn, f"http://127.0.0.1:{running.port}")
        assert (
            "  docs: public.docs\n    NOT CAPTURED: disabled: pgbridge_capture_insert; missing: "
            "pgbridge_capture_delete (its changes are not captured: unpublish and publish it again)" in report
        ), report
        assert (
            "  notes: public.notes\n    NOT CAPTURED: disabled: pgbridge_capture_delete, pgbridge_capture_insert, "
            "pgbridge_capture_truncate, pgbridge_capture_update (" in report
        ), report
        await db.execute("SELECT pgbridge.unpublish('docs'), pgbridge.publish('docs')")
        await owner.execute("ALTER TABLE notes ENABLE TRIGGER ALL")
        await wait_for(lambda: not running.bridge.capture_problems, what="capture to be whole again")
        assert (await state())[:2] == ("ok", None)
    finally:
        await owner.close()

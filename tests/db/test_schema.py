"""The schema and what must agree with it: the code (constants written on both sides, quiet publishing),
and sql/schema.sql with the migrations (the same catalog either way)."""

from __future__ import annotations

import difflib
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from pgbridge import changelog
from pgbridge.events import CHUNK_BYTES, CHUNK_ROWS
from pgbridge.migrate import SCHEMA, Migration, migrate, migrations
from tests import helpers
from tests.helpers import Cluster, fresh_name


async def _source(db: asyncpg.Connection, function: str) -> str:
    source: str = await db.fetchval("SELECT pg_get_functiondef($1::regprocedure)", function)
    return source


def _constant(source: str, name: str) -> str:
    found: list[str] = re.findall(rf"\b{name}\s+CONSTANT\s+[a-z ]+:=\s*([0-9.]+);", source)
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
    assert set(await changelog.channels(db)) == {"wake", "publications"}  # what pgbridge notifies on
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


# --- sql/schema.sql and the migrations ------------------------------------------------------------------
# schema.sql installs the current schema in one file; the numbered migrations upgrade. These tests hold
# them to the same schema, by comparing what each leaves in the catalog.

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_SQL = ROOT / "sql" / SCHEMA
MIRROR = (
    "A change to the SQL is a new numbered migration AND the same change in sql/schema.sql: if you changed a "
    "migration, mirror the change into sql/schema.sql (see CONTRIBUTING.md)."
)

_KINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "S": "sequence",
          "f": "foreign table", "c": "composite type"}  # fmt: skip
_VOLATILITY = {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}
_PARALLEL = {"s": "PARALLEL SAFE", "r": "PARALLEL RESTRICTED", "u": "PARALLEL UNSAFE"}
_PROKINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window function"}
# Each object's privileges as they are in effect: a NULL ACL stands for its kind's default, which for a
# function includes EXECUTE for PUBLIC.
_SCHEMA_ACL = "coalesce(n.nspacl, acldefault('n', n.nspowner))"
_RELATION_ACL = """coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))"""
_FUNCTION_ACL = "coalesce(p.proacl, acldefault('f', p.proowner))"


def _public(acl: str) -> str:
    """SQL for what PUBLIC may do under the aclitem[] expression ``acl`` ('nothing' if nothing)."""
    return (f"(SELECT coalesce(string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type), 'nothing') "
            f"FROM aclexplode({acl}) a WHERE a.grantee = 0)")  # fmt: skip


def _privileges(owner: str, acl: str | None, public: str) -> list[str]:
    return [f"  owner: {owner}", f"  acl: {acl if acl is not None else 'default'}", f"  PUBLIC may: {public}"]


def _comment(comment: str | None, indent: str = "  ") -> list[str]:
    return [] if comment is None else [f"{indent}comment: {comment!r}"]


async def _catalog(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The pgbridge schema as the catalog has it: each object's name, and its definition as lines.

    Nothing that differs between two installs of the same schema (oids, times, random channel names)."""
    objects: dict[str, list[str]] = {}
    nsp = "'pgbridge'::regnamespace"
    schema = await conn.fetchrow(
        f"""SELECT pg_get_userbyid(n.nspowner) AS owner, n.nspacl::text AS acl,
                   {_public(_SCHEMA_ACL)} AS public,
                   obj_description(n.oid, 'pg_namespace') AS comment
            FROM pg_namespace n WHERE n.nspname = 'pgbridge'"""
    )
    if schema is None:
        return {"schema pgbridge": ["(does not exist)"]}
    objects["schema pgbridge"] = [*_privileges(schema["owner"], schema["acl"], schema["public"]),
                                  *_comment(schema["comment"])]  # fmt: skip
    objects["everything in schema pgbridge"] = sorted(
        r[0]
        for r in await conn.fetch(
            f"""SELECT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d
                WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = {nsp}"""
        )
    )

    relations: dict[int, str] = {}  # oid: the name of its object
    for r in await conn.fetch(
        f"""SELECT c.oid, c.relname, c.relkind::text, pg_get_userbyid(c.relowner) AS owner, c.relacl::text AS acl,
                   {_public(_RELATION_ACL)} AS public,
                   obj_description(c.oid, 'pg_class') AS comment, c.relpersistence::text, c.relreplident::text,
                   c.reloptions::text AS options, c.relrowsecurity, c.relforcerowsecurity,
                   CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS query
            FROM pg_class c WHERE c.relnamespace = {nsp} AND c.relkind NOT IN ('i', 'I')"""
    ):  # fmt: skip
        name = f"{_KINDS.get(r['relkind'], 'relation ' + r['relkind'])} pgbridge.{r['relname']}"
        relations[r["oid"]] = name
        lines = _privileges(r["owner"], r["acl"], r["public"]) + _comment(r["comment"])
        lines += [f"  persistence: {r['relpersistence']}, replica identity: {r['relreplident']}, "
                  f"options: {r['options']}, row security: {r['relrowsecurity']} "
                  f"(forced: {r['relforcerowsecurity']})"]  # fmt: skip
        if r["query"] is not None:
            lines += ["  query:", *(f"  | {line}" for line in r["query"].splitlines())]
        objects[name] = lines

    for r in await conn.fetch(
        f"""SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity::text, a.attgenerated::text,
                   CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END AS collation,
                   col_description(a.attrelid, a.attnum) AS comment, a.attacl::text AS acl
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE c.relnamespace = {nsp} AND c.relkind NOT IN ('i', 'I', 'S') AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attrelid, a.attnum"""
    ):  # fmt: skip
        column = f"  column {r['attname']} {r['type']}" + (" NOT NULL" if r["attnotnull"] else "")
        column += f" DEFAULT {r['default']}" if r["default"] is not None else ""
        column += f" identity {r['attidentity']}" if r["attidentity"] else ""
        column += f" generated {r['attgenerated']}" if r["attgenerated"] else ""
        column += f" COLLATE {r['collation']}" if r["collation"] else ""
        column += f" acl {r['acl']}" if r["acl"] is not None else ""
        objects[relations[r["attrelid"]]] += [column, *_comment(r["comment"], "    ")]

    for r in await conn.fetch(
        f"""SELECT con.conrelid, con.contypid::regtype::text AS domain, con.conname,
                   pg_get_constraintdef(con.oid) AS def, con.condeferrable, con.condeferred, con.convalidated
            FROM pg_constraint con WHERE con.connamespace = {nsp} ORDER BY con.conname"""
    ):  # fmt: skip
        owner = relations.get(r["conrelid"]) or f"type {r['domain']}"
        objects.setdefault(owner, []).append(
            f"  constraint {r['conname']}: {r['def']}" + (" DEFERRABLE" if r["condeferrable"] else "")
            + (" INITIALLY DEFERRED" if r["condeferred"] else "") + ("" if r["convalidated"] else " NOT VALID")
        )  # fmt: skip
    for r in await conn.fetch(
        f"""SELECT i.indrelid, pg_get_indexdef(i.indexrelid) AS def, i.indisclustered, i.indisreplident,
                   obj_description(i.indexrelid, 'pg_class') AS comment
            FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = {nsp}
            ORDER BY 2"""
    ):  # fmt: skip
        objects[relations[r["indrelid"]]] += [
            f"  index {r['def']}" + (" (CLUSTER)" if r["indisclustered"] else "")
            + (" (REPLICA IDENTITY)" if r["indisreplident"] else ""), *_comment(r["comment"], "    ")
        ]  # fmt: skip
    for r in await conn.fetch(
        f"""SELECT t.tgrelid, t.tgrelid::regclass::text AS rel, t.tgname, pg_get_triggerdef(t.oid) AS def,
                   t.tgenabled::text, t.tgisinternal
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            WHERE c.relnamespace = {nsp} OR t.tgfoid IN (SELECT p.oid FROM pg_proc p WHERE p.pronamespace = {nsp})
            ORDER BY t.tgname"""
    ):  # fmt: skip
        line = f"  trigger {r['def']} (enabled: {r['tgenabled']}, internal: {r['tgisinternal']})"
        objects.setdefault(relations.get(r["tgrelid"], f"table {r['rel']}, outside the schema"), []).append(line)
    for r in await conn.fetch(
        """SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check FROM pg_policies
           WHERE schemaname = 'pgbridge' ORDER BY policyname"""
    ):
        objects[f"table pgbridge.{r['tablename']}"].append(
            f"  policy {r['policyname']} {r['permissive']} {r['cmd']} TO {r['roles']} USING {r['qual']} "
            f"WITH CHECK {r['with_check']}"
        )
    for r in await conn.fetch(
        "SELECT tablename, rulename, definition FROM pg_rules WHERE schemaname = 'pgbridge' ORDER BY rulename"
    ):
        objects.setdefault(f"table pgbridge.{r['tablename']}", []).append(f"  rule {r['definition']}")
    for r in await conn.fetch(
        f"""SELECT s.seqrelid, format_type(s.seqtypid, NULL) AS type, s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                   s.seqcache, s.seqcycle, pg_sequence_last_value(s.seqrelid) AS last_value,
                   (SELECT d.refobjid::regclass::text || '.' || a.attname
                    FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid AND d.deptype IN ('a', 'i')
                      AND d.refclassid = 'pg_class'::regclass) AS owned_by
            FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = {nsp}"""
    ):  # fmt: skip
        objects[relations[r["seqrelid"]]] += [
            f"  AS {r['type']} START {r['seqstart']} INCREMENT {r['seqincrement']} MINVALUE {r['seqmin']} "
            f"MAXVALUE {r['seqmax']} CACHE {r['seqcache']}" + (" CYCLE" if r["seqcycle"] else ""),
            f"  owned by: {r['owned_by']}, last value: {r['last_value']}",
        ]

    body = "CASE WHEN p.prosrc = '' THEN pg_get_function_sqlbody(p.oid) ELSE p.prosrc END"  # BEGIN ATOMIC's
    if await conn.fetchval("SELECT current_setting('server_version_num')::int < 140000"):
        body = "p.prosrc"
    for r in await conn.fetch(
        f"""SELECT p.oid::regprocedure::text AS ident, p.prokind::text, pg_get_function_arguments(p.oid) AS args,
                   pg_get_function_result(p.oid) AS result, l.lanname, p.provolatile::text, p.proparallel::text,
                   p.proisstrict, p.prosecdef, p.proleakproof, p.procost, p.prorows, p.proconfig,
                   pg_get_userbyid(p.proowner) AS owner, p.proacl::text AS acl, {_public(_FUNCTION_ACL)} AS public,
                   obj_description(p.oid, 'pg_proc') AS comment, {body} AS body
            FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.pronamespace = {nsp}"""
    ):  # fmt: skip
        objects[f"{_PROKINDS.get(r['prokind'], 'routine')} {r['ident']}"] = [
            f"  arguments: {r['args']}",
            f"  returns: {r['result']}",
            f"  LANGUAGE {r['lanname']} {_VOLATILITY[r['provolatile']]} {_PARALLEL[r['proparallel']]}"
            + (" STRICT" if r["proisstrict"] else "") + (" SECURITY DEFINER" if r["prosecdef"] else "")
            + (" LEAKPROOF" if r["proleakproof"] else "") + f" COST {r['procost']:g} ROWS {r['prorows']:g}",
            *(f"  SET {setting}" for setting in r["proconfig"] or []),
            *_privileges(r["owner"], r["acl"], r["public"]),
            *_comment(r["comment"]),
            "  body:",
            *(f"  | {line}" for line in (r["body"] or "").splitlines()),
        ]  # fmt: skip

    for r in await conn.fetch(
        """SELECT e.evtname, e.evtevent, e.evtfoid::regprocedure::text AS function, e.evtenabled::text, e.evttags::text,
                  pg_get_userbyid(e.evtowner) AS owner, obj_description(e.oid, 'pg_event_trigger') AS comment
           FROM pg_event_trigger e"""
    ):  # fmt: skip
        objects[f"event trigger {r['evtname']}"] = [
            f"  ON {r['evtevent']} EXECUTE FUNCTION {r['function']} (enabled: {r['evtenabled']}, tags: {r['evttags']})",
            f"  owner: {r['owner']}",
            *_comment(r["comment"]),
        ]
    objects["types in schema pgbridge"] = [
        f"  {r['typname']}: {r['typtype']}" + (f" over {r['base']}" if r["base"] else "")
        + (f" {r['labels']}" if r["labels"] else "") + (f" acl {r['typacl']}" if r["typacl"] else "")
        for r in await conn.fetch(
            f"""SELECT t.typname, t.typtype::text,
                       CASE WHEN t.typbasetype <> 0 THEN format_type(t.typbasetype, t.typtypmod) END AS base,
                       (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)::text FROM pg_enum e
                        WHERE e.enumtypid = t.oid) AS labels, t.typacl::text
                FROM pg_type t WHERE t.typnamespace = {nsp} ORDER BY t.typname"""
        )
    ]  # fmt: skip
    objects["default privileges in schema pgbridge"] = [
        f"  {r[0]} {r[1]}: {r[2]}"
        for r in await conn.fetch(
            f"""SELECT pg_get_userbyid(d.defaclrole), d.defaclobjtype::text, d.defaclacl::text FROM pg_default_acl d
                WHERE d.defaclnamespace = {nsp} ORDER BY 1, 2"""
        )
    ]

    # The rows install sets up (not the random channel names, nor the first tick's snapshot and time).
    rows = {
        "migrations": "SELECT version || ' ' || name FROM pgbridge.migrations ORDER BY version",
        "leases": "SELECT name FROM pgbridge.leases ORDER BY name",
        "channels": """SELECT purpose || ': ' || CASE WHEN name ~ ('^pgbridge_' || purpose || '_[0-9a-f]{32}$')
                                                 THEN 'pgbridge_' || purpose || '_<32 random hex digits>' ELSE name END
                       FROM pgbridge.channels ORDER BY purpose""",
        "ticks": """SELECT format('tick %s: ids %s..%s, %s changes, %s transactions, total %s, snap_xmax %s',
                                  n, min_id, max_id, changes, transactions, total,
                                  CASE WHEN snap_xmax = pg_snapshot_xmax(snap) THEN 'that of snap'
                                       ELSE 'not that of snap' END)
                    FROM pgbridge.ticks ORDER BY n""",
        "publications": "SELECT count(*) || ' rows' FROM pgbridge.publications",
        "changes": "SELECT count(*) || ' rows' FROM pgbridge.changes",
    }  # fmt: skip
    for table, query in rows.items():
        if await conn.fetchval("SELECT to_regclass($1)", f"pgbridge.{table}") is None:
            objects[f"rows of pgbridge.{table}"] = ["(no such table)"]
        else:
            objects[f"rows of pgbridge.{table}"] = [f"  {r[0]}" for r in await conn.fetch(query)]
    return objects


async def _contents(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table of pgbridge's, as it is (for checking that nothing changed)."""
    found = {}
    for table in await conn.fetch("SELECT c.oid::regclass::text FROM pg_class c "
                                  "WHERE c.relnamespace = 'pgbridge'::regnamespace AND c.relkind = 'r'"):  # fmt: skip
        rows = await conn.fetch(f"SELECT to_jsonb(t)::text FROM {table[0]} t ORDER BY 1")
        found[f"rows of {table[0]}, as they are"] = [r[0] for r in rows]
    return found


def _differences(left: dict[str, list[str]], right: dict[str, list[str]], names: tuple[str, str]) -> str:
    """Each object that differs, by name, with a diff of its definition ('' if none)."""
    out = []
    for key in sorted(left.keys() | right.keys()):
        a, b = left.get(key), right.get(key)
        if a == b:
            continue
        if b is None:
            out.append(f"{key}: only in {names[0]}")
        elif a is None:
            out.append(f"{key}: only in {names[1]}")
        else:
            out.append(f"{key} differs:")
        diff = difflib.unified_diff(a or [], b or [], *names, n=2, lineterm="")
        out.extend("    " + line for line in diff)
    return "\n".join(out)


def _psql_files(cluster: Cluster, dsn: str, *files: Path, stop: bool = True) -> subprocess.CompletedProcess[str]:
    """``psql -v ON_ERROR_STOP=1 -f FILE ...``, as README tells users to apply the files by hand."""
    args = [cluster.psql, dsn, "-X", "-q", *(["-v", "ON_ERROR_STOP=1"] if stop else [])]
    return subprocess.run([*args, *(a for f in files for a in ("-f", str(f)))], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def _numbered() -> list[Path]:
    return [ROOT / "sql" / f"{m.name}.sql" for m in migrations()]


@pytest.fixture
async def new_database(cluster: Cluster) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``await new_database(prefix)``: the dsn of a new, empty database; all dropped after the test."""
    made: list[str] = []

    async def make(prefix: str) -> str:
        name = fresh_name(prefix)
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        made.append(name)
        return cluster.dsn(name)

    yield make
    conn = await asyncpg.connect(cluster.dsn())
    try:
        for name in made:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def _snapshot(dsn: str, *, contents: bool = False) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {**await _catalog(conn), **(await _contents(conn) if contents else {})}
    finally:
        await conn.close()


async def test_schema_sql_makes_the_schema_the_migrations_make(
    cluster: Cluster, new_database: Callable[[str], Awaitable[str]]
) -> None:
    migrated, installed = await new_database("migrated"), await new_database("installed")
    files = _numbered()
    done = _psql_files(cluster, migrated, *files)
    assert done.returncode == 0, f"the migrations failed: {done.stderr}"
    done = _psql_files(cluster, installed, SCHEMA_SQL)
    assert (done.returncode, done.stderr) == (0, ""), f"sql/schema.sql failed or was not quiet: {done.stderr}"

    differences = _differences(await _snapshot(migrated), await _snapshot(installed),
                               ("the migrations", "sql/schema.sql"))  # fmt: skip
    if differences:
        pytest.fail(
            f"sql/schema.sql does not make the schema that the migrations make "
            f"({', '.join('sql/' + f.name for f in files)}, applied in order to another database).\n{MIRROR}\n"
            f"Differences, by object ('-' as the migrations make it, '+' as sql/schema.sql makes it):\n\n{differences}",
            pytrace=False,
        )

    for dsn in (migrated, installed):  # and what they agree on closes everything to other roles
        conn = await asyncpg.connect(dsn)
        try:
            open_to_public = await conn.fetch(
                f"""SELECT o.kind || ' ' || o.name || ': ' || a.privilege_type
                    FROM (SELECT 'schema' AS kind, n.nspname::text AS name, {_SCHEMA_ACL} AS acl
                          FROM pg_namespace n WHERE n.nspname = 'pgbridge'
                          UNION ALL
                          SELECT 'relation', c.oid::regclass::text, {_RELATION_ACL}
                          FROM pg_class c
                          WHERE c.relnamespace = 'pgbridge'::regnamespace AND c.relkind NOT IN ('i', 'I')
                          UNION ALL
                          SELECT 'function', p.oid::regprocedure::text, {_FUNCTION_ACL}
                          FROM pg_proc p WHERE p.pronamespace = 'pgbridge'::regnamespace) o,
                         aclexplode(o.acl) a
                    WHERE a.grantee = 0"""
            )  # fmt: skip
        finally:
            await conn.close()
        assert [r[0] for r in open_to_public] == [], f"PUBLIC has privileges in the pgbridge schema of {dsn}"


async def test_the_migrations_over_schema_sql_change_nothing(
    cluster: Cluster, new_database: Callable[[str], Awaitable[str]]
) -> None:
    """What schema.sql records is what it made: the migrations it stands for are done, and are not done again."""
    dsn = await new_database("installed")
    assert _psql_files(cluster, dsn, SCHEMA_SQL).returncode == 0
    before = await _snapshot(dsn, contents=True)
    files = _numbered()
    newest = max(m.version for m in migrations())
    recorded = [line.split()[0] for line in before["rows of pgbridge.migrations"]]
    assert recorded == [str(m.version) for m in migrations()], f"sql/schema.sql records {recorded}. {MIRROR}"
    for path, m in zip(files, migrations(), strict=True):
        done = _psql_files(cluster, dsn, path)
        if m.version < newest:  # an older file refuses, naming the version installed
            assert done.returncode != 0 and f"schema version {newest} is installed; " in done.stderr, done.stderr
        else:  # the newest again: a no-op
            assert (done.returncode, done.stderr) == (0, ""), done.stderr
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate(conn) == []
    finally:
        await conn.close()
    differences = _differences(before, await _snapshot(dsn, contents=True), ("installed", "then migrated"))
    assert not differences, f"the migrations changed a database installed from sql/schema.sql:\n{differences}"


async def test_migrate_installs_schema_sql_then_applies_the_migrations_it_lacks(
    cluster: Cluster, new_database: Callable[[str], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    later = Migration(
        version=max(m.version for m in migrations()) + 1,
        name="999_later",
        sql="""BEGIN;
               CREATE FUNCTION pgbridge.later() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM pgbridge.ticks';
               INSERT INTO pgbridge.migrations (version, name)
               SELECT max(version) + 1, '999_later' FROM pgbridge.migrations;
               COMMIT;""",
    )  # fmt: skip
    names = [m.name for m in migrations()]
    monkeypatch.setattr("pgbridge.migrate.migrations", lambda: [*migrations(), later])

    fresh = await asyncpg.connect(await new_database("fresh"))
    try:
        assert await migrate(fresh) == [*names, "999_later"]
        times = await fresh.fetch("SELECT applied_at FROM pgbridge.migrations ORDER BY version")
        assert len({r[0] for r in times[:-1]}) == 1, "not one transaction: not schema.sql"
        assert times[-1][0] != times[0][0], "the later migration is a transaction of its own"
        assert await fresh.fetchval("SELECT pgbridge.later()") == 1  # the first tick
        assert await migrate(fresh) == []
    finally:
        await fresh.close()

    upgraded = await new_database("upgraded")  # a database that has the schema gets the migrations it lacks
    assert _psql_files(cluster, upgraded, *_numbered()[:-1]).returncode == 0
    conn = await asyncpg.connect(upgraded)
    try:
        assert await migrate(conn) == [names[-1], "999_later"]
    finally:
        await conn.close()

    empty_schema = await new_database("created")  # a schema a DBA created for pgbridge: the numbered files
    helpers.psql(cluster, empty_schema, "CREATE SCHEMA pgbridge")
    conn = await asyncpg.connect(empty_schema)
    try:
        assert await migrate(conn) == [*names, "999_later"]
    finally:
        await conn.close()


async def test_schema_sql_refuses_an_existing_schema_and_changes_nothing(
    cluster: Cluster, new_database: Callable[[str], Awaitable[str]]
) -> None:
    newest = max(m.version for m in migrations())
    installed, older, created = [await new_database(p) for p in ("installed", "older", "created")]
    assert _psql_files(cluster, installed, SCHEMA_SQL).returncode == 0
    assert _psql_files(cluster, older, _numbered()[0]).returncode == 0
    helpers.psql(cluster, created, "CREATE SCHEMA pgbridge")
    cases = [
        (installed, f"ERROR:  pgbridge schema version {newest} is already installed: sql/schema.sql is only for a "
                    "database without the pgbridge schema, and changed nothing"),
        (older, "ERROR:  pgbridge schema version 1 is already installed"),
        (created, "ERROR:  this database already has a schema named pgbridge (without pgbridge.migrations)"),
    ]  # fmt: skip
    for dsn, message in cases:
        before = await _snapshot(dsn, contents=True)
        for stop in (True, False):  # without ON_ERROR_STOP, psql goes on, in a transaction that is aborted
            done = _psql_files(cluster, dsn, SCHEMA_SQL, stop=stop)
            assert message in done.stderr, done.stderr
            assert "HINT:  " in done.stderr and "`pgbridge migrate`" in done.stderr
            assert "applies the migrations a database lacks" in done.stderr
            if stop:
                assert done.returncode != 0 and done.stderr.count("ERROR:") == 1, done.stderr
        differences = _differences(before, await _snapshot(dsn, contents=True), ("before", "after"))
        assert not differences, f"sql/schema.sql changed a database it refused:\n{differences}"

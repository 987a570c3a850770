"""Install or upgrade the pgbridge schema from ``sql/`` (shipped inside the package as ``pgbridge.sql``).

``schema.sql`` is the current schema in one file, for a database that has none; the numbered files
``NNN_name.sql`` are the migrations, which upgrade a database that has it. Both record the versions
they stand for in ``pgbridge.migrations``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

from pgbridge.errors import MigrationError

log = logging.getLogger(__name__)

_MIGRATE_LOCK = 7316021946250125311
_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")  # a migration; schema.sql is not one
SCHEMA = "schema.sql"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration file, in order."""
    found = []
    for entry in resources.files("pgbridge.sql").iterdir():
        if m := _NAME.fullmatch(entry.name):
            found.append(Migration(int(m.group(1)), entry.name.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if not found:
        raise MigrationError("no migration files found in the pgbridge.sql package: the installation is broken")
    return found


def schema() -> str:
    """``schema.sql``: the whole current schema, which installs into a database without the pgbridge schema."""
    try:
        return resources.files("pgbridge.sql").joinpath(SCHEMA).read_text("utf-8")
    except FileNotFoundError:
        raise MigrationError(f"{SCHEMA} is missing from the pgbridge.sql package: the installation is broken") from None


async def migrate(conn: asyncpg.Connection, *, lock_timeout: float = 60.0) -> list[str]:
    """Bring this database's pgbridge schema up to date, under an advisory lock; return the names of the
    migrations it gained.

    A database without the pgbridge schema gets ``schema.sql``, which records every migration it stands
    for; then, as a database that has the schema, each numbered migration it lacks, in order. Each file
    records itself in ``pgbridge.migrations``, so files applied by hand with psql count too. (A schema
    named pgbridge without that table, such as one a DBA created empty, takes all the numbered files.)
    While another session holds the lock, it waits up to ``lock_timeout`` seconds, saying who holds it.
    """
    await _lock(conn, lock_timeout)
    try:
        numbered = migrations()
        applied: list[str] = []
        if await conn.fetchval("SELECT to_regnamespace('pgbridge') IS NULL"):
            try:
                await conn.execute(schema())
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{SCHEMA} failed: {exc}") from exc
            applied = [r["name"] for r in await conn.fetch("SELECT name FROM pgbridge.migrations ORDER BY version")]
            log.info("installed %s (%s)", SCHEMA, ", ".join(applied))
        exists = await conn.fetchval("SELECT to_regclass('pgbridge.migrations') IS NOT NULL")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM pgbridge.migrations")} if exists else set()
        for m in numbered:
            if m.version in done:
                continue
            try:
                await conn.execute(m.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{m.name} failed: {exc}") from exc
            log.info("applied %s", m.name)
            applied.append(m.name)
        return applied
    finally:
        if conn.is_in_transaction():  # a file failed inside its BEGIN ... COMMIT: end it, keep its error
            await conn.execute("ROLLBACK")
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)


async def _lock(conn: asyncpg.Connection, patience: float) -> None:
    deadline = time.monotonic() + patience
    said = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MIGRATE_LOCK):
        holder = await _holder(conn)
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"another session holds pgbridge's migration lock: {holder}. End it (SELECT pg_terminate_backend(pid)) "
                f"or let it finish, then run `pgbridge migrate` again (waited {patience:g}s; --lock-timeout)"
            )
        if not said:
            log.warning("waiting up to %gs for pgbridge's migration lock, held by %s", patience, holder)
            said = True
        await asyncio.sleep(0.2)


async def _holder(conn: asyncpg.Connection) -> str:
    """Who holds the migration lock, as a DBA finds them in pg_stat_activity."""
    row = await conn.fetchrow(
        """SELECT l.pid, a.usename, a.application_name, a.state, a.state_change
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::bigint::oid
             AND l.objid = $2::bigint::oid AND l.objsubid = 1""",
        _MIGRATE_LOCK >> 32,
        _MIGRATE_LOCK & 0xFFFFFFFF,
    )
    if row is None:
        return "a session that has since let go"
    since = f" since {row['state_change']:%Y-%m-%d %H:%M:%S %Z}" if row["state_change"] else ""
    return (f"pid {row['pid']} (role {row['usename'] or '?'}, application {row['application_name'] or '?'}, "
            f"{row['state'] or 'state unknown'}{since})")  # fmt: skip

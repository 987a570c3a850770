"""Apply the SQL migrations in ``sql/`` (shipped inside the package as ``pgbridge.sql``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from pgbridge.errors import MigrationError

log = logging.getLogger(__name__)

_MIGRATE_LOCK = 7316021946250125311
_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


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


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations this database lacks, under an advisory lock; return their names.

    Each file records itself in ``pgbridge.migrations``, so files applied by hand with psql count too.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
    try:
        exists = await conn.fetchval("SELECT to_regclass('pgbridge.migrations') IS NOT NULL")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM pgbridge.migrations")} if exists else set()
        applied = []
        for m in migrations():
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

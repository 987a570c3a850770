"""Reading, ticking and pruning the change log (``pgbridge.changes`` and ``pgbridge.ticks``).

A change's position is ``(tick, id)``: the tick whose batch holds its transaction, then its change-log
id (see ``sql/002_ticks.sql``). Ticks are durable and a batch never changes once its tick exists, so
positions are the same for every bridge process and any replica can resume any client.

Every query here is one statement, so each reads one consistent snapshot; driver errors are left to the
caller, which treats them as the database being unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pgbridge.database import MIGRATE
from pgbridge.errors import DecodeError, Pruned, SchemaError
from pgbridge.events import MAX_ID, Change, make_change

log = logging.getLogger(__name__)

LOG_FORMAT = 2
"""The format of the change log this bridge reads (``pgbridge.log_format()``)."""
SCHEMA_VERSION = 5
"""The oldest schema (``pgbridge.migrations``) that has everything this bridge uses."""
WAKE_BELOW = 0.5
"""Writers send wake-ups only while the NOTIFY queue is less full than this (``capture_v3``): past it,
the bridge polls."""

PAGE = 1000
"""At most this many change-log entries per read..."""
PAGE_BYTES = 4 << 20
"""...and about this many bytes of rows (past them, one more entry: each holds at most about
:data:`~pgbridge.events.CHUNK_BYTES`)."""


@dataclass(frozen=True, slots=True)
class Stats:
    notification_queue_usage: float
    changelog_transactions: int
    changelog_bytes: int
    oldest_tick: int
    newest_tick: int
    oldest_at: datetime
    """When the oldest tick the log holds was taken."""


@dataclass(frozen=True, slots=True)
class Publication:
    table: str
    """Schema-qualified, quoted as SQL needs it."""
    collection: str
    excluded: list[str]
    wake: bool


async def check_schema(conn: asyncpg.Connection) -> int:
    """The database's pgbridge schema version; refuse, saying what to do, when it is not one this bridge
    reads."""
    row = await conn.fetchrow(
        """SELECT to_regclass('pgbridge.migrations') IS NOT NULL AS installed,
                  to_regprocedure('pgbridge.log_format()') IS NOT NULL AS versioned"""
    )
    if not row["installed"]:
        raise SchemaError(f"the pgbridge schema is missing: {MIGRATE}")
    version = await conn.fetchval("SELECT max(version) FROM pgbridge.migrations")
    if version < SCHEMA_VERSION or not row["versioned"]:
        raise SchemaError(
            f"the database has pgbridge schema version {version}, older than this bridge needs "
            f"({SCHEMA_VERSION}): {MIGRATE}"
        )
    log_format = await conn.fetchval("SELECT pgbridge.log_format()")
    if log_format != LOG_FORMAT:
        raise SchemaError(
            f"the database has pgbridge schema version {version}, whose change log (format {log_format}) "
            f"this bridge cannot read (format {LOG_FORMAT}): upgrade pgbridge"
        )
    return int(version)


@dataclass(frozen=True, slots=True)
class Tick:
    n: int
    """The newest tick."""
    at: datetime
    """When it was taken (a tick taken again after a crash lost it has another time)."""
    queue: float
    """How full the NOTIFY queue was (0 to 1): past :data:`WAKE_BELOW`, writers send no wake-ups."""


async def tick(conn: asyncpg.Connection) -> Tick:
    """Record a tick if transactions with changes committed since the last one; return the newest.

    Must run outside a transaction block. The tick may commit without waiting for its WAL to be flushed
    (the listener's session does so): call :func:`durable` before routing its batch.
    """
    row = await conn.fetchrow("SELECT t.n, t.at, pg_notification_queue_usage() AS queue FROM pgbridge.tick_v3() t")
    return Tick(int(row["n"]), row["at"], float(row["queue"]))


async def channels(conn: asyncpg.Connection) -> dict[str, str]:
    """The NOTIFY channels pgbridge's functions notify on, by purpose (``wake``, ``publications``)."""
    return {r["purpose"]: r["name"] for r in await conn.fetch("SELECT purpose, name FROM pgbridge.channels")}


async def durable(conn: asyncpg.Connection, patience: float, wal: Wal | None = None) -> bool:
    """Wait until everything committed so far, ticks included, is flushed to disk; True if it forced it.

    A tick whose commit is lost in a crash would be taken again with another snapshot, and the positions
    clients saw would change. Writers' commits flush the WAL all the time, so under load this waits for
    one of them instead of paying a flush of its own; after ``patience`` seconds it commits a transaction
    synchronously, which flushes everything before it. ``wal``: where the WAL stood after the last commit
    that must be durable, when a statement since (:func:`read_with_wal`) said so; else it is asked.
    """
    if wal is None:
        target, flushed = await conn.fetchrow("SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()")
    else:
        target, flushed = wal.inserted, wal.flushed
    if flushed >= target:
        return False
    deadline = asyncio.get_running_loop().time() + patience
    delay = patience / 8
    while await conn.fetchval("SELECT pg_current_wal_flush_lsn()") < target:
        if asyncio.get_running_loop().time() >= deadline:
            await conn.execute("BEGIN; SET LOCAL synchronous_commit = on; SELECT pgbridge.flush_v2(); COMMIT")
            return True
        await asyncio.sleep(delay)
        delay = min(2 * delay, patience)
    return False


async def newest_tick(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT max(n) FROM pgbridge.ticks"))


@dataclass(frozen=True, slots=True)
class Lease:
    held: bool
    """Whether the bridge that asked holds the ticker lease."""
    queue: float
    """How full the NOTIFY queue is (0 to 1)."""
    publications: str
    """A digest of the publications: it changes whenever they do."""
    key: int
    """The class of the advisory locks the ticker announces with (:func:`announce`)."""
    announced: int
    """The newest tick the ticker announced (0 before any)."""
    announced_at: datetime | None
    """When it was taken (None before any, or once pruned)."""
    relay: tuple[str, str] | None
    """Where the ticker relays its pages, and the secret to show there (None: it does not, or none ticks)."""


async def lease(
    conn: asyncpg.Connection, holder: str, seconds: float, relay: tuple[str, str] | None, *, take: bool = True
) -> Lease:
    """Take or renew the ticker lease for ``holder`` for ``seconds``, if it is free, lapsed or already
    ``holder``'s, recording ``relay`` (its URL and secret) as where it relays its pages; say whether
    ``holder`` holds it, with what every bridge checks that often. ``take=False``: only say.

    The database's clock decides, so the bridges' clocks need not agree."""
    row = await conn.fetchrow(
        """WITH taken AS (
               UPDATE pgbridge.leases
               SET holder = $1, until = clock_timestamp() + make_interval(secs => $2), relay = $3, relay_secret = $4
               WHERE name = 'ticker' AND $5 AND (holder = $1 OR until IS NULL OR until < clock_timestamp())
               RETURNING relay, relay_secret
           )
           SELECT EXISTS (SELECT FROM taken) AS held, pg_notification_queue_usage() AS queue, l.key, l.announced,
                  (SELECT t.at FROM pgbridge.ticks t WHERE t.n = l.announced) AS announced_at,
                  CASE WHEN l.until >= clock_timestamp() THEN l.relay END AS relay, l.relay_secret,
                  (SELECT coalesce(md5(string_agg(p::text, ',' ORDER BY p.collection)), '')
                   FROM pgbridge.publications p) AS publications
           FROM pgbridge.leases l WHERE l.name = 'ticker'""",
        holder,
        seconds,
        *(relay or (None, None)),
        take,
    )
    relayed = None if row["relay"] is None or row["relay_secret"] is None else (row["relay"], row["relay_secret"])
    return Lease(bool(row["held"]), float(row["queue"]), row["publications"], int(row["key"]),
                 int(row["announced"] or 0), row["announced_at"], relayed)  # fmt: skip


async def release(conn: asyncpg.Connection, holder: str) -> None:
    """Give the ticker lease up, if ``holder`` holds it, so that another bridge takes it at once."""
    await conn.execute("UPDATE pgbridge.leases SET until = NULL WHERE name = 'ticker' AND holder = $1", holder)


def _lock(n: int) -> int:
    return n % 2**31  # the advisory lock that stands for "tick n is not announced yet"


async def announce(conn: asyncpg.Connection, holder: str, key: int, n: int, held: int | None) -> int | None:
    """As the ticker ``holder``, announce durable tick ``n`` to the bridges that follow it: take the lock
    they will wait on next, record ``n``, and let go of ``held``, the lock they wait on now. Returns the
    tick whose lock it now holds (None if it no longer holds the lease).

    The next lock is taken before ``n`` is visible, so that a follower that sees ``n`` always finds the
    lock for ``n + 1`` held, and waits on it."""
    recorded = await conn.fetchval(
        """WITH locked AS (SELECT pg_advisory_lock($3, $4))
           UPDATE pgbridge.leases SET announced = $2 FROM locked
           WHERE name = 'ticker' AND holder = $1 RETURNING true""",
        holder, n, key, _lock(n + 1),
    )  # fmt: skip
    if held is not None and held != n + 1:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", key, _lock(held))
    if recorded is None:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        return None
    return n + 1


async def await_tick(conn: asyncpg.Connection, after: int, seconds: float) -> tuple[int, datetime | None, bool]:
    """Wait at most ``seconds`` for the ticker to announce a tick after ``after``; return the newest
    announced tick (``after`` or older when none came), when it was taken, and whether it waited for the
    ticker (False with nothing newer: nobody ticks, so wait before asking again)."""
    row = await conn.fetchrow("SELECT * FROM pgbridge.await_tick_v4($1, $2)", after, max(1, int(seconds * 1000)))
    return (after if row["n"] is None else int(row["n"])), row["at"], bool(row["waited"])


async def tick_time(conn: asyncpg.Connection, n: int) -> datetime | None:
    """When tick ``n`` was taken: a tick taken again (after a crash lost it) has another time."""
    at: datetime | None = await conn.fetchval("SELECT at FROM pgbridge.ticks WHERE n = $1", n)
    return at


# Ticks are taken in order of their cumulative number of entries, so that one read covers many small ticks
# or part of one large tick, and sorts at most about two pages of entries: each tick's entries come from
# the primary key in id order, bounded by the tick's id range.
_READ = """
SELECT w.oldest, w.last_tick, w.inserted, w.flushed, r.n, r.id, r.collection, r.op, r.ts, r.nrows, r.body, r.cut
FROM (
    SELECT pg_current_wal_insert_lsn() AS inserted, pg_current_wal_flush_lsn() AS flushed,
           (SELECT min(n) FROM pgbridge.ticks) AS oldest,
           (SELECT max(s.n) FROM (SELECT t.n, sum(t.changes) OVER (ORDER BY t.n) - t.changes AS before
                                  FROM pgbridge.ticks t WHERE t.n >= $6 AND t.n <= $3
                                  ORDER BY t.n LIMIT $5) s
            WHERE s.before < $5) AS last_tick
) w
LEFT JOIN LATERAL (
    SELECT p.*, p.listed > count(*) OVER () AS cut
    FROM (
        SELECT t.n, c.id, c.collection, c.op, pgbridge.iso(c.changed_at) AS ts, c.nrows, c.body,
               sum(octet_length(c.body)) OVER (ORDER BY t.n, c.id) - octet_length(c.body) AS before,
               count(*) OVER () AS listed
        FROM pgbridge.ticks t
        JOIN pgbridge.ticks p ON p.n = t.n - 1
        CROSS JOIN LATERAL (
            SELECT c.id, c.collection, c.op, c.changed_at, c.nrows, c.body
            FROM pgbridge.changes c
            WHERE c.id > CASE WHEN t.n > $1 THEN t.min_id - 1 ELSE greatest($2, t.min_id - 1) END
              AND c.id <= t.max_id
              AND pg_visible_in_snapshot(c.xid, t.snap) AND NOT pg_visible_in_snapshot(c.xid, p.snap)
              AND ($4::text[] IS NULL OR c.collection = ANY ($4::text[]))
            ORDER BY c.id
            LIMIT $5
        ) c
        WHERE t.n >= $1 AND t.n <= w.last_tick
        ORDER BY t.n, c.id
        LIMIT $5
    ) p
    WHERE p.before < $7
) r ON true
ORDER BY r.n, r.id
"""


async def read(
    conn: asyncpg.Connection,
    after: tuple[int, int],
    upto: int,
    collections: tuple[str, ...] | None = None,
    limit: int = PAGE,
) -> tuple[list[Change], tuple[int, int]]:
    """Up to ``limit`` changes (of ``collections``, or of all) positioned after ``after`` (a ``(tick, id)``)
    in ticks up to ``upto``.

    Returns them in order, with how far the read got: the next read starts there. ``after`` may be
    ``(tick, MAX_ID)``, meaning all of that tick. Raises :class:`Pruned` when retention has removed
    changes right after ``after``.
    """
    changes, reached, _ = await read_with_wal(conn, after, upto, collections, limit)
    return changes, reached


@dataclass(frozen=True, slots=True)
class Wal:
    """Where the WAL stood as a statement ran: written up to ``inserted``, on disk up to ``flushed``."""

    inserted: int
    flushed: int


async def read_with_wal(
    conn: asyncpg.Connection,
    after: tuple[int, int],
    upto: int,
    collections: tuple[str, ...] | None = None,
    limit: int = PAGE,
) -> tuple[list[Change], tuple[int, int], Wal]:
    """As :func:`read`, and where the WAL stood as it ran: read right after a tick, what :func:`durable`
    must see flushed (one round trip fewer per tick)."""
    tick_, change_id = after
    first = tick_ + 1 if change_id >= MAX_ID else tick_  # the first tick with anything left to read
    rows = await conn.fetch(_READ, tick_, change_id, upto, collections, limit, first, PAGE_BYTES)
    oldest, last_tick = rows[0]["oldest"], rows[0]["last_tick"]
    wal = Wal(rows[0]["inserted"], rows[0]["flushed"])
    needed = tick_ if change_id >= MAX_ID else tick_ - 1  # the tick whose snapshot bounds what comes next
    if oldest is None or oldest > needed:
        raise Pruned(f"the change log no longer reaches back to tick {tick_}")
    found = [r for r in rows if r["id"] is not None]
    if len(found) == limit or (found and found[-1]["cut"]):
        reached = (found[-1]["n"], found[-1]["id"])
    elif last_tick is not None:
        reached = (last_tick, MAX_ID)
    else:
        reached = after
    changes = []
    for r in found:
        try:
            changes.append(make_change(r["n"], r["id"], r["collection"], r["op"], r["ts"], r["nrows"], r["body"]))
        except DecodeError as exc:
            log.error("skipping a damaged change-log entry: %s", exc)
    return changes, reached, wal


async def count(
    conn: asyncpg.Connection, after: tuple[int, int], upto: tuple[int, int], collections: tuple[str, ...]
) -> int:
    """How many positions of ``collections`` lie after ``after`` and up to ``upto`` (both ``(tick, id)``),
    as far as the change log still holds them: a truncate is one, any other change one per row."""
    found: int = await conn.fetchval(
        """SELECT coalesce(sum(greatest(c.nrows, 1)), 0)
           FROM pgbridge.ticks t
           JOIN pgbridge.ticks p ON p.n = t.n - 1
           CROSS JOIN LATERAL (
               SELECT c.nrows FROM pgbridge.changes c
               WHERE c.id > CASE WHEN t.n > $1 THEN t.min_id - 1 ELSE greatest($2, t.min_id - 1) END
                 AND c.id <= CASE WHEN t.n < $3 THEN t.max_id ELSE least($4, t.max_id) END
                 AND pg_visible_in_snapshot(c.xid, t.snap) AND NOT pg_visible_in_snapshot(c.xid, p.snap)
                 AND c.collection = ANY ($5::text[])
           ) c
           WHERE t.n >= $1 AND t.n <= $3""",
        *after,
        *upto,
        list(collections),
    )
    return int(found)


async def locate(conn: asyncpg.Connection, change_id: int) -> int | None:
    """The tick of change ``change_id``; None when it is not (or no longer, or not yet) in the log."""
    found: int | None = await conn.fetchval(
        """SELECT t.n
           FROM pgbridge.changes c
           CROSS JOIN LATERAL (
               SELECT t.n FROM pgbridge.ticks t
               WHERE t.snap_xmax > c.xid AND pg_visible_in_snapshot(c.xid, t.snap)
               ORDER BY t.snap_xmax, t.n LIMIT 1
           ) t
           WHERE c.id = $1 AND t.n > (SELECT min(n) FROM pgbridge.ticks)""",
        change_id,
    )
    return found


async def published_tables(conn: asyncpg.Connection) -> list[Publication]:
    """Every publication whose table still exists, by collection."""
    rows = await conn.fetch(
        """SELECT format('%I.%I', n.nspname, c.relname) AS tbl, p.collection, p.excluded, p.wake
           FROM pgbridge.publications p JOIN pg_class c ON c.oid = p.relid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           ORDER BY p.collection"""
    )
    return [Publication(r["tbl"], r["collection"], list(r["excluded"]), r["wake"]) for r in rows]


async def publish(
    conn: asyncpg.Connection, table: str, *, exclude: list[str] | None = None, collection: str | None = None,
    wake: bool = True,
) -> str:  # fmt: skip
    """Publish ``table`` (see ``pgbridge.publish`` in ``sql/``); return its collection."""
    found: str = await conn.fetchval(
        "SELECT pgbridge.publish($1::text::regclass, $2::text[], $3, $4)", table, exclude or [], collection, wake
    )
    return found


async def unpublish(conn: asyncpg.Connection, table: str) -> str:
    """Stop publishing ``table``; return the collection it was."""
    found: str = await conn.fetchval("SELECT pgbridge.unpublish($1::text::regclass)", table)
    return found


async def publications(conn: asyncpg.Connection) -> frozenset[str]:
    """The published collections (of tables that still exist)."""
    rows = await conn.fetch(
        "SELECT p.collection FROM pgbridge.publications p WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.relid)"
    )
    return frozenset(r["collection"] for r in rows)


async def any_polled(conn: asyncpg.Connection) -> bool:
    """Whether some table is published without wake-ups, so the bridge must poll for its changes."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgbridge.publications WHERE NOT wake)"))


async def prune(conn: asyncpg.Connection, *, max_age: float, max_transactions: int, batch: int = 500) -> int:
    """Remove the oldest ticks beyond the retention limits, at most ``batch`` ticks per transaction.

    Only one bridge prunes at a time (a lease: a row lock on ``pgbridge.leases``), and each batch is its
    own short transaction that removes a prefix of positions: tick k's batch and everything before it
    go, and tick k stays as the base of the next. Returns how many transactions were removed.
    """
    removed = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT true FROM pgbridge.leases WHERE name = 'prune' FOR UPDATE SKIP LOCKED"):
                return removed
            row = await conn.fetchrow(
                """WITH latest AS (SELECT total FROM pgbridge.ticks ORDER BY n DESC LIMIT 1),
                        candidates AS (SELECT n, at, total FROM pgbridge.ticks ORDER BY n LIMIT $3 + 1),
                        expired AS (
                            SELECT c.n, c.total,
                                   bool_and(c.at < now() - make_interval(secs => $1) OR c.total <= l.total - $2)
                                       OVER (ORDER BY c.n) AS gone
                            FROM candidates c, latest l)
                   SELECT (SELECT min(n) FROM candidates) AS oldest, (SELECT min(total) FROM candidates) AS base,
                          e.n AS k, e.total
                   FROM expired e WHERE e.gone ORDER BY e.n DESC LIMIT 1""",
                max_age,
                max_transactions,
                batch,
            )
            if row is None or row["k"] <= row["oldest"]:
                return removed
            await conn.execute(
                """DELETE FROM pgbridge.changes c
                   USING (SELECT snap, (SELECT max(max_id) FROM pgbridge.ticks WHERE n <= $1) AS upto
                          FROM pgbridge.ticks WHERE n = $1) t
                   WHERE c.id <= t.upto AND pg_visible_in_snapshot(c.xid, t.snap)""",
                row["k"],
            )
            await conn.execute("DELETE FROM pgbridge.ticks WHERE n < $1", row["k"])
        removed += row["total"] - row["base"]


CAPTURE_TRIGGERS = ("pgbridge_capture_insert", "pgbridge_capture_update", "pgbridge_capture_delete",
                    "pgbridge_capture_truncate")  # fmt: skip
"""The triggers ``pgbridge.attach_v3`` gives a published table."""


async def capture_problems(conn: asyncpg.Connection) -> dict[str, str]:
    """Published collections whose table does not capture every change, and why: a capture trigger is
    missing (dropped, renamed) or does not fire (disabled, or enabled only for replication)."""
    rows = await conn.fetch(
        """SELECT p.collection,
                  array_agg(e.name ORDER BY e.name) FILTER (WHERE t.oid IS NULL) AS missing,
                  array_agg(e.name ORDER BY e.name) FILTER (WHERE t.tgenabled NOT IN ('O', 'A')) AS disabled
           FROM pgbridge.publications p
           CROSS JOIN unnest($1::name[]) AS e(name)
           LEFT JOIN pg_trigger t ON t.tgrelid = p.relid AND t.tgname = e.name
                                 AND t.tgfoid = 'pgbridge.capture_v3()'::regprocedure
           WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.relid)
           GROUP BY p.collection
           HAVING count(t.oid) < cardinality($1::name[]) OR bool_or(t.tgenabled NOT IN ('O', 'A'))
           ORDER BY p.collection""",
        list(CAPTURE_TRIGGERS),
    )
    problems = {}
    for r in rows:
        parts = []
        if r["disabled"]:
            parts.append(f"disabled: {', '.join(r['disabled'])}")
        if r["missing"]:
            parts.append(f"missing: {', '.join(r['missing'])}")
        problems[r["collection"]] = "; ".join(parts) + " (its changes are not captured: unpublish and publish it again)"
    return problems


async def stats(conn: asyncpg.Connection) -> Stats:
    """What an operator watches: NOTIFY queue fill (0..1) and the change log's extent."""
    row = await conn.fetchrow(
        """SELECT pg_notification_queue_usage() AS queue,
                  max(total) - min(total) AS transactions, min(n) AS oldest, max(n) AS newest, min(at) AS oldest_at,
                  pg_total_relation_size('pgbridge.changes') + pg_total_relation_size('pgbridge.ticks') AS bytes
           FROM pgbridge.ticks"""
    )
    return Stats(row["queue"], row["transactions"], row["bytes"], row["oldest"], row["newest"], row["oldest_at"])

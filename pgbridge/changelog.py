"""Reading, replaying and pruning the change log (``pgbridge.changes`` and ``pgbridge.commits``).

A change's position is ``(seq, id)``: the commit sequence number of its transaction, then its
change-log id. Positions are in commit order, the order in which NOTIFY delivers too, and they are
the same for every bridge process, so any replica can resume any client.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from pgbridge.errors import PgBridgeError
from pgbridge.events import Change, make_change

# Read back at most this many change-log rows per query (each holds at most ~1 MB of rows).
REPLAY_BATCH = 16
_PRUNE_LOCK = 7316021946250125310

_CHANGE_COLUMNS = "l.id, l.collection, l.op, pgbridge.iso(l.changed_at) AS ts, l.nrows, l.body"


class Pruned(PgBridgeError):
    """The position to resume from is no longer in the change log (retention removed it)."""


@dataclass(frozen=True, slots=True)
class Stats:
    notification_queue_usage: float
    changelog_transactions: int
    changelog_bytes: int


def _change(row: asyncpg.Record) -> Change:
    return make_change(row["id"], row["collection"], row["op"], row["ts"], row["nrows"], row["body"])


async def latest_seq(conn: asyncpg.Connection) -> int:
    """The commit sequence number of the newest transaction in the log (0 when there is none)."""
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM pgbridge.commits"))


async def seq_of(conn: asyncpg.Connection, change_id: int) -> int | None:
    """The commit sequence number of change ``change_id``, or None when it is not (or no longer) logged."""
    seq: int | None = await conn.fetchval(
        "SELECT c.seq FROM pgbridge.changes l JOIN pgbridge.commits c ON c.xid = l.xid WHERE l.id = $1",
        change_id,
    )
    return seq


async def fetch_change(conn: asyncpg.Connection, change_id: int) -> tuple[int, Change] | None:
    """Read one committed change back with its commit sequence number; None when it is not in the log."""
    row = await conn.fetchrow(
        f"""SELECT c.seq, {_CHANGE_COLUMNS}
            FROM pgbridge.changes l JOIN pgbridge.commits c ON c.xid = l.xid WHERE l.id = $1""",
        change_id,
    )
    return None if row is None else (row["seq"], _change(row))


async def read_after(
    conn: asyncpg.Connection, seq: int, change_id: int, collection: str | None = None
) -> list[tuple[int, Change]]:
    """Up to :data:`REPLAY_BATCH` committed changes positioned after ``(seq, change_id)``, in order.

    Raises :class:`Pruned` when transaction ``seq`` has left the log: pruning removes a prefix of
    positions at a time, so while ``seq`` is present every later change is present too.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if seq > 0 and not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pgbridge.commits WHERE seq = $1)", seq):
            raise Pruned(f"transaction {seq} is no longer in the change log")
        rows = await conn.fetch(
            f"""SELECT c.seq, {_CHANGE_COLUMNS}
                FROM pgbridge.commits c JOIN pgbridge.changes l ON l.xid = c.xid
                WHERE c.seq >= $1 AND (c.seq, l.id) > ($1, $2)
                  AND ($3::text IS NULL OR l.collection = $3)
                ORDER BY c.seq, l.id
                LIMIT $4""",
            seq,
            change_id,
            collection,
            REPLAY_BATCH,
        )
    return [(row["seq"], _change(row)) for row in rows]


async def publications(conn: asyncpg.Connection) -> frozenset[str]:
    return frozenset(r["collection"] for r in await conn.fetch("SELECT collection FROM pgbridge.publications"))


async def prune(conn: asyncpg.Connection, *, max_age: float, max_transactions: int, batch: int = 500) -> int:
    """Remove the oldest transactions beyond the retention limits, ``batch`` at a time.

    Each batch is its own short transaction, taken only if no other bridge is pruning (advisory
    lock), and removes a prefix of commit positions. Returns how many transactions were removed.
    """
    removed = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PRUNE_LOCK):
                return removed
            deleted = await conn.fetchval(
                """WITH keep_from AS (
                       SELECT seq FROM pgbridge.commits ORDER BY seq DESC OFFSET $2 - 1 LIMIT 1
                   ), oldest AS (
                       SELECT seq, xid, committed_at FROM pgbridge.commits ORDER BY seq LIMIT $3
                   ), doomed AS (
                       SELECT seq, xid FROM (
                           SELECT seq, xid, bool_and(committed_at < now() - make_interval(secs => $1)
                                                     OR seq < coalesce((SELECT seq FROM keep_from), 0))
                                            OVER (ORDER BY seq) AS expired
                           FROM oldest) o
                       WHERE expired
                   ), gone AS (
                       DELETE FROM pgbridge.changes WHERE xid IN (SELECT xid FROM doomed)
                   ), done AS (
                       DELETE FROM pgbridge.commits WHERE seq IN (SELECT seq FROM doomed) RETURNING 1
                   )
                   SELECT count(*) FROM done""",
                max_age,
                max_transactions,
                batch,
            )
        if not deleted:
            return removed
        removed += deleted


async def stats(conn: asyncpg.Connection) -> Stats:
    """What an operator watches: NOTIFY queue fill (0..1) and the change log's extent."""
    row = await conn.fetchrow(
        """SELECT pg_notification_queue_usage() AS queue,
                  coalesce(max(seq) - min(seq) + 1, 0) AS transactions,
                  pg_total_relation_size('pgbridge.changes') AS bytes
           FROM pgbridge.commits"""
    )
    return Stats(row["queue"], row["transactions"], row["bytes"])

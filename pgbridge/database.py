"""Where the driver's errors become pgbridge's: one translation, each with what to do about it.

Everything that talks to PostgreSQL (the listener, the server's pool, the commands) lets asyncpg's
errors through this boundary: :func:`errors` re-raises them as :class:`~pgbridge.errors.SchemaError`
(pgbridge's schema is missing, old, or closed to the role) or
:class:`~pgbridge.errors.DatabaseUnavailable` (anything else: down, unreachable, refusing a statement),
with a message that says what went wrong and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg

from pgbridge.errors import DatabaseUnavailable, PgBridgeError, PoolerError, SchemaError

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
)  # fmt: skip
"""What a database that is down, restarting, unreachable or refusing raises."""

MIGRATE = "run `pgbridge migrate` (or, with psql, sql/schema.sql on a new database, else the sql/NNN_*.sql it lacks)"
"""What to do about a schema that is missing or older than this bridge needs."""


LISTEN_ELSEWHERE = (
    "point --listen-dsn (PGBRIDGE_LISTEN_DSN) at PostgreSQL directly, or at a session-mode pool "
    "(see docs/deployment.md, PgBouncer); --dsn may stay on the transaction-mode pool. A bridge with no such "
    "connection can run with --follow-only: it never takes the ticks, and needs another bridge that does"
)
"""What to do about a listener whose connection goes through a pooler that cannot carry it."""
POOLER_IGNORES = "synchronous_commit, default_transaction_isolation"
"""The startup parameters of the listener's connection that PgBouncer refuses unless told to ignore them."""

_CONNECT_PATIENCE = 10.0  # seconds a check's own connection may take to open
_MISSING = asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedFunctionError


def _schema_problem(exc: BaseException) -> bool:
    """Whether PostgreSQL refused because pgbridge's own schema is missing, old, or closed to the role."""
    return isinstance(exc, (*_MISSING, asyncpg.InsufficientPrivilegeError)) and "pgbridge" in str(exc)


def describe(exc: BaseException) -> str:
    """What went wrong, and what to do: for a log line, a command's error or ``/healthz``'s log pointer."""
    if isinstance(exc, PgBridgeError):
        return str(exc)
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, _MISSING) and _schema_problem(exc):
        return f"{text} (the pgbridge schema is missing or older than this bridge: {MIGRATE})"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError) and _schema_problem(exc):
        return (f"{text} (a bridge's role needs SELECT pgbridge.grant_bridge('<role>'); publishing needs the "
                "pgbridge schema's owner: see docs/security.md)")  # fmt: skip
    if isinstance(exc, asyncpg.ProtocolViolationError) and "unsupported startup parameter" in text:
        return (f"{text} (a pooler such as PgBouncer refused a setting the listener sends as it connects: point "
                "--listen-dsn (PGBRIDGE_LISTEN_DSN) at PostgreSQL directly, or at a session-mode pool with "
                f"ignore_startup_parameters = {POOLER_IGNORES}; see docs/deployment.md, PgBouncer)")  # fmt: skip
    if isinstance(exc, asyncpg.PostgresError):
        hint = getattr(exc, "hint", None)
        return f"{text} ({hint})" if hint else text
    if isinstance(exc, asyncpg.InterfaceError):
        return f"{type(exc).__name__}: {text}"
    return f"cannot reach PostgreSQL: {text} (check --dsn or DATABASE_URL, and that the server is up)"


def translate(exc: BaseException) -> PgBridgeError:
    """The pgbridge error for a driver error (see :func:`describe`)."""
    if isinstance(exc, PgBridgeError):
        return exc
    if _schema_problem(exc):
        return SchemaError(describe(exc))
    return DatabaseUnavailable(describe(exc))


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Re-raise the driver's errors inside as pgbridge's (see :func:`translate`)."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise translate(exc) from exc


POOLED: dict[str, Any] = {"statement_cache_size": 0}
"""What the commands', the start-up checks' and (with a ``--listen-dsn`` of its own) the pool's connections
are opened with: no named prepared statements, so that they work through a transaction-mode pooler.
asyncpg then sends Parse, Bind and Execute in one server transaction, with an unnamed statement, which
PostgreSQL plans at each execution."""


async def connect(dsn: str | None, **options: Any) -> asyncpg.Connection:
    """A connection for a command or a start-up check, without asyncpg's statement cache: through a pooler
    in transaction mode (PgBouncer's ``pool_mode = transaction``) each transaction may run on another server
    connection, where a statement prepared on the last one does not exist (see :data:`POOLED`)."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **POOLED, **options)
    return conn


async def check_notifications(conn: asyncpg.Connection, dsn: str | None, patience: float) -> None:
    """Refuse a listener connection that does not receive notifications: LISTEN on a fresh channel on
    ``conn``, NOTIFY it from another connection to ``dsn``, and wait up to ``patience`` seconds for it.

    Through a pooler in transaction mode LISTEN "works" (the statement succeeds, and an idle pooler even
    hands the same server connection back, so ``pg_listening_channels()`` shows it) but the pooler
    drops what the server sends between transactions: only a notification that arrives tells. Raises
    :class:`PoolerError` saying what to do; a driver error when the database cannot be reached.
    """
    channel = f"pgbridge_probe_{secrets.token_hex(8)}"
    arrived = asyncio.Event()

    def on_notification(_c: object, _pid: int, _channel: str, _payload: str) -> None:
        arrived.set()

    await conn.add_listener(channel, on_notification)
    try:
        # Connecting may take longer than a query on a busy machine; what is checked is the notification.
        sender = await connect(dsn, timeout=max(patience, _CONNECT_PATIENCE), command_timeout=patience,
                               server_settings={"application_name": "pgbridge-check"})  # fmt: skip
        try:
            await sender.execute("SELECT pg_notify($1, '')", channel)
        except asyncpg.ProgramLimitExceededError:
            return  # the NOTIFY queue is full: nothing can be sent, and the listener polls until it drains
        finally:
            await sender.close()
        try:
            async with asyncio.timeout(patience):
                await arrived.wait()
        except TimeoutError:
            raise PoolerError(
                f"the listener's connection receives no notifications: a NOTIFY on a new channel did not arrive "
                f"within {patience:g}s, as happens through a pooler in transaction mode (PgBouncer's "
                f"pool_mode = transaction), where LISTEN never works: {LISTEN_ELSEWHERE}"
            ) from None
    finally:
        await conn.remove_listener(channel, on_notification)

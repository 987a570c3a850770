"""Where the driver's errors become pgbridge's: one translation, each with what to do about it.

Everything that talks to PostgreSQL (the listener, the server's pool, the commands) lets asyncpg's
errors through this boundary: :func:`errors` re-raises them as :class:`~pgbridge.errors.SchemaError`
(pgbridge's schema is missing, old, or closed to the role) or
:class:`~pgbridge.errors.DatabaseUnavailable` (anything else: down, unreachable, refusing a statement),
with a message that says what went wrong and what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from pgbridge.errors import DatabaseUnavailable, PgBridgeError, SchemaError

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
)  # fmt: skip
"""What a database that is down, restarting, unreachable or refusing raises."""

MIGRATE = "run `pgbridge migrate` (or, with psql, sql/schema.sql on a new database, else the sql/NNN_*.sql it lacks)"
"""What to do about a schema that is missing or older than this bridge needs."""


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

"""The ``pgbridge`` command: serve, migrate, publish, unpublish, token, and dev (``make run``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from pgbridge import __version__, changelog
from pgbridge.auth import TokenPolicy, mint
from pgbridge.config import Settings, add_dsn_flag, add_serve_flags, settings_from_args
from pgbridge.errors import ConfigError, PgBridgeError
from pgbridge.migrate import migrate
from pgbridge.server import WS_PATH, create_app, runner

log = logging.getLogger("pgbridge")

DEMO_TABLE = """CREATE TABLE IF NOT EXISTS public.posts (
    id         bigserial PRIMARY KEY,
    title      text NOT NULL,
    body       text,
    created_at timestamptz NOT NULL DEFAULT now()
)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgbridge", description="Push PostgreSQL table changes to WebSocket clients.")
    parser.add_argument("--version", action="version", version=f"pgbridge {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PGBRIDGE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env PGBRIDGE_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the bridge")
    add_dsn_flag(serve)
    add_serve_flags(serve)

    migrate_cmd = commands.add_parser("migrate", help="apply the SQL migrations this database lacks")
    add_dsn_flag(migrate_cmd)

    publish = commands.add_parser("publish", help="deliver a table's changes as a collection")
    add_dsn_flag(publish)
    publish.add_argument("table", help="table name, optionally schema-qualified")
    publish.add_argument("--exclude", nargs="+", default=[], metavar="COLUMN", help="columns never sent to clients")
    publish.add_argument("--collection", help="collection name (default: the table's name)")

    unpublish = commands.add_parser("unpublish", help="stop delivering a table's changes")
    add_dsn_flag(unpublish)
    unpublish.add_argument("table")

    token = commands.add_parser("token", help="print a client token signed with the server's secret")
    token.add_argument("--sub", required=True, help="the token's subject")
    token.add_argument("--ttl", type=float, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--collections", default="*", help="comma-separated collections, or * (default)")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra claim, e.g. account_id=42 (numbers stay numbers)",
    )
    token.add_argument("--jwt-secret", default=None, help="HS256 secret (env PGBRIDGE_JWT_SECRET)")

    dev = commands.add_parser("dev", help="run on an embedded PostgreSQL with a demo table (make run)")
    dev.add_argument("--data-dir", type=Path, default=Path(".pgbridge"), help="where the database lives")
    add_dsn_flag(dev)
    add_serve_flags(dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except PgBridgeError as exc:
        print(f"pgbridge: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"pgbridge: error: {_explain(exc)}", file=sys.stderr)
        return 1


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        hint = getattr(exc, "hint", None)
        if isinstance(exc, asyncpg.UndefinedFunctionError | asyncpg.InvalidSchemaNameError) and "pgbridge" in text:
            hint = "the pgbridge schema is missing: run `pgbridge migrate` first"
        return f"{text}" + (f" ({hint})" if hint else "")
    return f"cannot reach PostgreSQL: {text} (set --dsn or DATABASE_URL)"


def _policy(settings: Settings) -> TokenPolicy:
    key = None
    if settings.jwt_public_key is not None:
        try:
            key = settings.jwt_public_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the JWT public key {settings.jwt_public_key}: {exc.strerror}") from None
    if key is None and not settings.jwt_secret:
        raise ConfigError(
            "no JWT secret: pass --jwt-secret or set PGBRIDGE_JWT_SECRET (for example to the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or give --jwt-public-key"
        )
    return TokenPolicy.from_settings(
        secret=settings.jwt_secret,
        public_key_pem=key,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
        unscoped=settings.unscoped_tokens,
        tenant_claim=settings.tenant_claim,
    )


async def _check_schema(dsn: str | None) -> None:
    """Refuse to start on a database whose pgbridge schema this bridge cannot read.

    A database that cannot be reached yet is not refused: the bridge waits for it.
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        log.warning("cannot reach PostgreSQL yet (%s); serving, and connecting when it is up", exc)
        return
    try:
        await changelog.check_schema(conn)
    finally:
        await conn.close()


def _serve(settings: Settings, banner: str | None = None) -> None:
    policy = _policy(settings)
    asyncio.run(_check_schema(settings.dsn))
    app = create_app(settings, policy)
    url = f"ws://{settings.host}:{settings.port}{WS_PATH}"

    def ready() -> None:
        log.info("serving %s", url)
        if banner:
            print(banner, flush=True)

    try:
        asyncio.run(_run(runner(app), settings, ready))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} (choose another --port)"
        ) from None


async def _run(served: web.AppRunner, settings: Settings, ready: Callable[[], None]) -> None:
    """Serve until SIGTERM or SIGINT, then shut down in order: clients closed with 1001, tasks stopped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await served.setup()
    try:
        await web.TCPSite(served, settings.host, settings.port).start()
        ready()
        await stop.wait()
    finally:
        await served.cleanup()


def _cmd_serve(args: argparse.Namespace) -> None:
    _serve(settings_from_args(args))


async def _with_conn(dsn: str | None, sql: str, *params: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *params)
    finally:
        await conn.close()


def _cmd_migrate(args: argparse.Namespace) -> None:
    async def run() -> list[str]:
        conn = await asyncpg.connect(args.dsn)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    print("applied: " + ", ".join(applied) if applied else "up to date")


def _cmd_publish(args: argparse.Namespace) -> None:
    collection = asyncio.run(
        _with_conn(
            args.dsn,
            "SELECT pgbridge.publish($1::text::regclass, $2::text[], $3)",
            args.table,
            args.exclude,
            args.collection,
        )
    )
    print(f"published {args.table} as collection {collection!r}")


def _cmd_unpublish(args: argparse.Namespace) -> None:
    collection = asyncio.run(_with_conn(args.dsn, "SELECT pgbridge.unpublish($1::text::regclass)", args.table))
    print(f"unpublished {args.table} (collection {collection!r})")


def _claim_value(raw: str) -> Any:
    try:
        return int(raw)
    except ValueError:
        return raw


def _cmd_token(args: argparse.Namespace) -> None:
    secret = args.jwt_secret or os.environ.get("PGBRIDGE_JWT_SECRET")
    if not secret:
        raise ConfigError("no JWT secret: pass --jwt-secret or set PGBRIDGE_JWT_SECRET (the one the server uses)")
    claims: dict[str, Any] = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--claim takes NAME=VALUE, not {item!r}")
        claims[name] = _claim_value(value)
    collections = (
        "*" if args.collections.strip() == "*" else [c.strip() for c in args.collections.split(",") if c.strip()]
    )
    print(mint(secret, args.sub, args.ttl, collections=collections, **claims))


def _cmd_dev(args: argparse.Namespace) -> None:
    from pgbridge.embedded import EmbeddedPostgres

    data: Path = args.data_dir.resolve()
    server = None
    if args.dsn is None:
        server = EmbeddedPostgres(data / "pgdata")
        args.dsn = server.dsn
    secret_file = data / "jwt-secret"
    secret = os.environ.get("PGBRIDGE_JWT_SECRET") or args.jwt_secret
    if not secret:
        if not secret_file.exists():
            data.mkdir(parents=True, exist_ok=True)
            secret_file.write_text(secrets.token_urlsafe(32))
            secret_file.chmod(0o600)
        secret = secret_file.read_text().strip()
    settings = settings_from_args(args, jwt_secret=secret)

    async def prepare() -> None:
        conn = await asyncpg.connect(settings.dsn)
        try:
            await migrate(conn)
            await conn.execute(DEMO_TABLE)
            if not await conn.fetchval("SELECT 1 FROM pgbridge.publications WHERE relid = 'public.posts'::regclass"):
                await conn.execute("SELECT pgbridge.publish('public.posts')")
        finally:
            await conn.close()

    asyncio.run(prepare())
    token = mint(secret, "dev", 24 * 3600, collections="*")
    psql = server.psql() if server else "psql"
    banner = f"""
pgbridge is ready.

  WebSocket: ws://{settings.host}:{settings.port}{WS_PATH}?token={token}
  Token (24 h): {token}
  Database:  {settings.dsn}

Insert a post from another terminal:
  {psql} "{settings.dsn}" -c "INSERT INTO posts (title) VALUES ('hello')"
"""
    try:
        _serve(settings, banner)
    finally:
        if server is not None:
            server.stop()


_COMMANDS = {
    "serve": _cmd_serve,
    "migrate": _cmd_migrate,
    "publish": _cmd_publish,
    "unpublish": _cmd_unpublish,
    "token": _cmd_token,
    "dev": _cmd_dev,
}

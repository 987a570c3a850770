"""The ``pgbridge`` command: serve, dev (``make run``), migrate, publish, unpublish, token, status.

Every option of every command is a flag and a ``PGBRIDGE_*`` variable (see :mod:`pgbridge.config`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from pgbridge import __version__, changelog, config, database, logs
from pgbridge.auth import TokenPolicy, mint
from pgbridge.config import Settings
from pgbridge.errors import ConfigError, DatabaseUnavailable, PgBridgeError
from pgbridge.migrate import migrate
from pgbridge.protocol import WS_PATH
from pgbridge.server import create_app, runner

log = logging.getLogger("pgbridge")

DEMO_TABLE = """CREATE TABLE IF NOT EXISTS public.posts (
    id         bigserial PRIMARY KEY,
    title      text NOT NULL,
    body       text,
    created_at timestamptz NOT NULL DEFAULT now()
)"""

_HELP = {
    "serve": "run the bridge",
    "dev": "run on an embedded PostgreSQL with a demo table (make run)",
    "migrate": "apply the SQL migrations this database lacks",
    "publish": "deliver a table's changes as a collection",
    "unpublish": "stop delivering a table's changes",
    "token": "print a client token signed with the server's secret",
    "status": "show the publications, the change log and a running bridge's health",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgbridge", description="Push PostgreSQL table changes to WebSocket clients.")
    parser.add_argument("--version", action="version", version=f"pgbridge {__version__}")
    config.add_options(parser, config.LOGGING)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, options in config.COMMANDS.items():
        command = commands.add_parser(name, help=_HELP[name], description=_HELP[name])
        if name in ("publish", "unpublish"):
            command.add_argument("table", help="table name, optionally schema-qualified")
        if name == "serve":  # set by --workers on the processes it starts
            command.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
        config.add_options(command, options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logging_values = config.resolve(args, config.LOGGING)
        logs.configure(logging_values["log_level"], logging_values["log_format"])
        values = config.resolve(args, config.COMMANDS[args.command])
        with database.errors():
            return int(_COMMANDS[args.command](args, values) or 0)
    except DatabaseUnavailable as exc:  # PostgreSQL could not be reached, or refused
        print(f"pgbridge: error: {exc}", file=sys.stderr)
        return 1
    except PgBridgeError as exc:  # a setting, the schema, a migration
        print(f"pgbridge: error: {exc}", file=sys.stderr)
        return 2


def _policy(settings: Settings) -> TokenPolicy:
    key = None
    if settings.jwt_public_key is not None:
        try:
            key = settings.jwt_public_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the JWT public key {settings.jwt_public_key}: {exc.strerror}") from None
    if key is None and not settings.jwt_secret:
        raise ConfigError(
            "no JWT secret: pass --jwt-secret-file or --jwt-secret, or set PGBRIDGE_JWT_SECRET_FILE or "
            "PGBRIDGE_JWT_SECRET (for example to the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or give --jwt-public-key"
        )
    return TokenPolicy.from_settings(
        secret=settings.jwt_secret,
        public_key_pem=key,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
        unscoped=settings.unscoped_tokens,
        subjectless=settings.subjectless_tokens,
        tenant_claim=settings.tenant_claim,
    )


async def _check_database(settings: Settings) -> None:
    """Refuse to start on a database whose pgbridge schema this bridge cannot read, or with a listener
    connection that receives no notifications (one through a transaction-mode pooler).

    A database that cannot be reached yet is not refused: the bridge waits for it, and its listener makes
    the same check of its connection whenever it connects.
    """
    try:
        with database.errors():
            conn = await database.connect(settings.dsn, timeout=10)
    except DatabaseUnavailable as exc:
        log.warning("%s; serving, and connecting when it is up", exc)
        return
    try:
        await changelog.check_schema(conn)
    finally:
        await conn.close()
    listen_dsn = settings.dsn if settings.listen_dsn is None else settings.listen_dsn
    if settings.follow_only:  # its listener never LISTENs
        return
    try:
        with database.errors():
            conn = await database.connect(listen_dsn, timeout=10)
    except DatabaseUnavailable as exc:
        log.warning("the listener's connection (--listen-dsn): %s; serving, and connecting when it is up", exc)
        return
    try:
        await database.check_notifications(conn, listen_dsn, settings.probe_timeout)
    finally:
        await conn.close()


def _serve(settings: Settings, banner: str | None = None, *, reuse_port: bool = False) -> None:
    policy = _policy(settings)
    asyncio.run(_check_database(settings))
    app = create_app(settings, policy)
    url = f"ws://{settings.host}:{settings.port}{WS_PATH}"

    def ready() -> None:
        log.info("serving %s", url)
        if banner:
            print(banner, flush=True)

    try:
        _event_loop(settings.loop)(_run(runner(app), settings, ready, reuse_port))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} (choose another --port)"
        ) from None


def _event_loop(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """How to run the server: uvloop when asked for, or (auto) when the `fast` extra installed it."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("--loop uvloop needs uvloop: pip install 'pgbridge[fast]'") from None
        else:
            return uvloop.run
    return asyncio.run


async def _run(served: web.AppRunner, settings: Settings, ready: Callable[[], None], reuse_port: bool) -> None:
    """Serve until SIGTERM or SIGINT, then shut down in order: clients closed with 1001, tasks stopped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await served.setup()
    try:
        await web.TCPSite(served, settings.host, settings.port, reuse_port=reuse_port or None).start()
        # What exists now (modules, the application) lives as long as the process: kept out of the
        # collector's full passes, which otherwise stall every delivery for tens of milliseconds.
        gc.collect()
        gc.freeze()
        ready()
        await stop.wait()
    finally:
        await served.cleanup()


def _cmd_serve(args: argparse.Namespace, values: dict[str, Any]) -> None:
    settings = config.settings(values)
    if args.worker:
        _serve(settings, reuse_port=True)
    elif settings.workers > 1:
        _workers(settings.workers)
    else:
        _serve(settings)


def _workers(count: int) -> None:
    """Run ``count`` bridges on one port (SO_REUSEPORT); stop them all on SIGTERM; replace one that dies."""
    argv = [sys.executable, "-m", "pgbridge", *sys.argv[1:], "--worker"]
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            proc.send_signal(signal.SIGTERM)

    procs = [subprocess.Popen(argv) for _ in range(count)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is None:
                continue
            if stopping:
                continue
            log.error("worker %d (pid %d) exited with %s; starting another", i, proc.pid, code)
            time.sleep(1)
            procs[i] = subprocess.Popen(argv)
        if stopping and all(p.poll() is not None for p in procs):
            return
        time.sleep(0.2)


async def _with_connection(dsn: str | None, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await database.connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _cmd_migrate(args: argparse.Namespace, values: dict[str, Any]) -> None:
    async def run() -> list[str]:
        conn = await database.connect(values["dsn"])
        try:
            return await migrate(conn, lock_timeout=values["lock_timeout"])
        finally:
            await conn.close()

    applied = asyncio.run(run())
    print("applied: " + ", ".join(applied) if applied else "up to date")


def _cmd_publish(args: argparse.Namespace, values: dict[str, Any]) -> None:
    collection = asyncio.run(_with_connection(values["dsn"], lambda conn: changelog.publish(
        conn, args.table, exclude=values["exclude"], collection=values["collection"], wake=values["wake"]
    )))  # fmt: skip
    print(f"published {args.table} as collection {collection!r}")


def _cmd_unpublish(args: argparse.Namespace, values: dict[str, Any]) -> None:
    collection = asyncio.run(_with_connection(values["dsn"], lambda conn: changelog.unpublish(conn, args.table)))
    print(f"unpublished {args.table} (collection {collection!r})")


def _claim_value(raw: str) -> Any:
    try:
        return int(raw)
    except ValueError:
        return raw


def _cmd_token(args: argparse.Namespace, values: dict[str, Any]) -> None:
    secret = config.read_secret(values)
    if not secret:
        raise ConfigError("no JWT secret: pass --jwt-secret-file or --jwt-secret (the one the server uses)")
    if not values["sub"]:
        raise ConfigError("a token needs a subject: pass --sub NAME")
    claims: dict[str, Any] = {}
    for item in values["claim"]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--claim takes NAME=VALUE, not {item!r}")
        claims[name] = _claim_value(value)
    text = values["collections"].strip()
    collections = "*" if text == "*" else [c.strip() for c in text.split(",") if c.strip()]
    print(mint(secret, values["sub"], values["ttl"], collections=collections, **claims))


def _cmd_dev(args: argparse.Namespace, values: dict[str, Any]) -> None:
    from pgbridge.embedded import EmbeddedPostgres

    data: Path = Path(values["data_dir"]).resolve()
    server = None
    if values["dsn"] is None:
        server = EmbeddedPostgres(data / "pgdata")
        values["dsn"] = server.dsn
    if not values["jwt_secret"] and not values["jwt_secret_file"]:
        values["jwt_secret_file"] = secret_file = data / "jwt-secret"
        if not secret_file.exists():
            data.mkdir(parents=True, exist_ok=True)
            secret_file.write_text(secrets.token_urlsafe(32))
            secret_file.chmod(0o600)
    settings = config.settings(values)
    assert settings.jwt_secret is not None

    async def prepare() -> None:
        conn = await database.connect(settings.dsn)
        try:
            await migrate(conn)
            await conn.execute(DEMO_TABLE)
            if "posts" not in await changelog.publications(conn):
                await changelog.publish(conn, "public.posts")
        finally:
            await conn.close()

    asyncio.run(prepare())
    token = mint(settings.jwt_secret, "dev", 24 * 3600, collections="*")
    psql = server.psql() if server else "psql"
    banner = f"""
pgbridge is ready.

  Inspector: http://{settings.host}:{settings.port}/#collection=posts&token={token}
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


def _cmd_status(args: argparse.Namespace, values: dict[str, Any]) -> None:
    print(asyncio.run(_status(values["dsn"], values["url"])))


async def _status(dsn: str | None, url: str) -> str:
    lines = []
    conn = await database.connect(dsn)
    try:
        version = await changelog.check_schema(conn)
        lines.append(f"schema version {version}")
        tables = await changelog.published_tables(conn)
        lines.append(f"published tables: {len(tables)}")
        problems = await changelog.capture_problems(conn)
        for t in tables:
            hidden = f", hides {', '.join(t.excluded)}" if t.excluded else ""
            wake = "" if t.wake else ", polled (wake => false)"
            broken = f"\n    NOT CAPTURED: {problems[t.collection]}" if t.collection in problems else ""
            lines.append(f"  {t.collection}: {t.table}{hidden}{wake}{broken}")
        stats = await changelog.stats(conn)
        lines.append(
            f"change log: {stats.changelog_transactions} transactions, {stats.changelog_bytes / 2**20:.1f} MiB, "
            f"ticks {stats.oldest_tick} to {stats.newest_tick}, oldest from {stats.oldest_at:%Y-%m-%d %H:%M:%S %Z}"
        )
        lines.append(f"NOTIFY queue: {100 * stats.notification_queue_usage:.1f}% full")
    finally:
        await conn.close()
    health = url.rstrip("/") + "/healthz"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, http.get(health) as resp:
            body = await resp.json()
        figures = ", ".join(f"{k} {v}" for k, v in body.items() if k != "status")
        lines.append(f"bridge at {url}: {body['status']} ({figures})")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        lines.append(f"bridge at {url}: not answering ({type(exc).__name__}: {exc})")
    return "\n".join(lines)


_COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], None]] = {
    "serve": _cmd_serve,
    "migrate": _cmd_migrate,
    "publish": _cmd_publish,
    "unpublish": _cmd_unpublish,
    "token": _cmd_token,
    "dev": _cmd_dev,
    "status": _cmd_status,
}

